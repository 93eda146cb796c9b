"""Self-generated training data (LLM-QAT, Liu et al. 2023, "Data-Free Quantization Aware Training").

The full-precision teacher writes its own training text: the first token is drawn from the
vocabulary (special tokens excluded), the next 3-5 tokens are greedy (the paper found that a few
deterministic tokens after a random start give coherent text), the rest are sampled, up to a fixed
length. Distilling on this text keeps the quantized student close to the teacher on the teacher's
own distribution, not only on one corpus.

Implementation:
* a hand-written KV-cache decode loop (one forward per position for the whole batch; no padding is
  ever needed since every row starts with one token and runs to ``seq_len``);
* special tokens (and vocabulary slots beyond the tokenizer) are masked out, so every record is
  exactly ``seq_len`` tokens;
* every sequence owns a ``torch.Generator`` seeded from (seed, index): its first token, its greedy
  count and one uniform number per sampled step (inverse-CDF sampling) come from it, so a
  sequence does not depend on which other rows share its batch;
* batches are aligned to global indices (batch b holds indices b*B .. b*B+B-1) and written as one
  write + flush + fsync of complete JSON lines. Resume reads the file, drops a truncated tail, rolls
  back to the last batch boundary and continues: same seed and batch size give byte-identical files
  whether or not the run was interrupted. Settings that change the content are kept in a sidecar
  ``<out>.meta.json``; resuming with different ones is refused, naming the field.

Simplified from the paper: the paper enumerates first tokens over the whole vocabulary; here
``first_token="enumerate"`` walks the non-special vocabulary in order (from a seeded offset) and
``"sample"`` (default) draws uniformly.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

FIRST_TOKEN_MODES = ("sample", "enumerate")
# settings that change the generated content: a resume must use the same values
CONTENT_FIELDS = ("seq_len", "batch_size", "seed", "greedy_min", "greedy_max", "temperature", "top_k", "top_p",
                  "first_token")


class SelfGenError(ValueError):
    """Bad self-generation settings or an existing output that cannot be resumed."""


@dataclass
class SelfGenConfig:
    n: int = field(default=512, metadata={"help": "number of sequences to generate (in total, counting a resumed file)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence, first token included"})
    batch_size: int = field(default=16, metadata={"help": "sequences decoded together (one forward per position)"})
    seed: int = field(default=0, metadata={"help": "seed: same seed and batch size -> identical data, also across a resume"})
    greedy_min: int = field(default=3, metadata={"help": "fewest greedy tokens after the first token"})
    greedy_max: int = field(default=5, metadata={
        "help": "most greedy tokens after the first token; each sequence draws its count uniformly in "
                "[greedy_min, greedy_max] (set both equal for a fixed count)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0) of the sampled part"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1] (1 = off)"})
    first_token: str = field(default="sample", metadata={
        "help": "sample: first token uniform over the non-special vocabulary; enumerate: walk it in order"})

    def __post_init__(self):
        def bad(name, allowed):
            raise SelfGenError(f"SelfGenConfig.{name}={getattr(self, name)!r} is not valid; allowed: {allowed}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            bad("n", "an integer >= 1")
        if not is_int(self.seq_len) or self.seq_len < 2:
            bad("seq_len", "an integer >= 2")
        if not is_int(self.batch_size) or self.batch_size < 1:
            bad("batch_size", "an integer >= 1")
        if not is_int(self.seed) or self.seed < 0:
            bad("seed", "an integer >= 0")
        if not is_int(self.greedy_min) or self.greedy_min < 0:
            bad("greedy_min", "an integer >= 0")
        if not is_int(self.greedy_max) or self.greedy_max < self.greedy_min:
            bad("greedy_max", f"an integer >= greedy_min ({self.greedy_min})")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature <= 0:
            bad("temperature", "a finite number > 0")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if self.first_token not in FIRST_TOKEN_MODES:
            bad("first_token", " | ".join(FIRST_TOKEN_MODES))

    def content(self) -> dict:
        return {k: getattr(self, k) for k in CONTENT_FIELDS}


# --- pure pieces ---------------------------------------------------------------------------------
def allowed_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids the generator may emit: tokenizer ids below the model's vocab size, special tokens excluded."""
    special = set(tokenizer.all_special_ids)
    n = min(len(tokenizer), vocab_size)
    ids = [i for i in range(n) if i not in special]
    if not ids:
        raise SelfGenError("the tokenizer has no non-special token below the model's vocab size")
    return torch.tensor(ids, dtype=torch.long)


def sequence_generator(seed: int, idx: int) -> torch.Generator:
    """The private RNG of sequence ``idx`` (independent of batching)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + idx * 7_919 + 1) % (2 ** 63 - 1))


def filter_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """(probs [B, m], ids [B, m] or None): the sampling distribution over m candidates, sorted
    by decreasing probability when top-k / top-p restrict it (ids then map back to the vocabulary)."""
    logits = logits.float() / temperature
    if top_k <= 0 and top_p >= 1.0:
        return torch.softmax(logits, -1), None
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    vals, ids = torch.topk(logits, k, dim=-1)  # sorted, descending
    probs = torch.softmax(vals, -1)
    if top_p < 1.0:
        before = torch.cumsum(probs, -1) - probs  # mass strictly above each candidate
        probs = probs.masked_fill(before >= top_p, 0.0)  # keeps at least the first candidate
    return probs, ids


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row: the first index whose cumulative probability exceeds u * total (u in [0, 1))."""
    cdf = torch.cumsum(probs.double(), -1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    pick = pick.clamp_max(probs.shape[-1] - 1)
    # never land on a zero-probability slot (can only happen through rounding at the very end)
    zero = probs.gather(-1, pick.unsqueeze(-1)).squeeze(-1) <= 0
    if zero.any():
        last_nz = (probs > 0).long().cumsum(-1).argmax(-1)
        pick = torch.where(zero, last_nz, pick)
    return pick if ids is None else ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def plan_sequences(cfg: SelfGenConfig, allowed: torch.Tensor, start: int, count: int):
    """(first token ids [count], greedy counts [count], generators) of sequences start..start+count-1."""
    gens, first, greedy = [], [], []
    offset = None
    if cfg.first_token == "enumerate":
        offset = int(torch.randint(len(allowed), (1,), generator=torch.Generator().manual_seed(cfg.seed)))
    for i in range(start, start + count):
        g = sequence_generator(cfg.seed, i)
        if cfg.first_token == "sample":
            first.append(int(allowed[torch.randint(len(allowed), (1,), generator=g)]))
        else:
            first.append(int(allowed[(offset + i) % len(allowed)]))
        greedy.append(int(torch.randint(cfg.greedy_min, cfg.greedy_max + 1, (1,), generator=g)))
        gens.append(g)
    return torch.tensor(first), torch.tensor(greedy), gens


def _cache_kwarg(model) -> str:
    """The name of the KV-cache argument/output: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_batch(model, first: torch.Tensor, n_greedy: torch.Tensor, gens: list, cfg: SelfGenConfig,
                   banned: torch.Tensor) -> torch.Tensor:
    """[B, seq_len] token ids: first token, ``n_greedy`` greedy tokens per row, the rest sampled."""
    dev = next(model.parameters()).device
    B, L = len(first), cfg.seq_len
    seq = torch.empty(B, L, dtype=torch.long)
    seq[:, 0] = first
    mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    mask[banned] = True
    mask = mask.to(dev)
    cache_kw = _cache_kwarg(model)
    out = model(input_ids=first.view(B, 1).to(dev), use_cache=True)
    for t in range(1, L):
        logits = out.logits[:, -1].float().masked_fill(mask, float("-inf"))
        greedy = logits.argmax(-1).cpu()
        sampled_rows = n_greedy < t
        if sampled_rows.any():
            probs, ids = filter_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            # every row draws its uniform at every sampled step, so a row's RNG stream is batch-independent
            u = torch.tensor([float(torch.rand(1, generator=g)) if s else 0.0 for g, s in zip(gens, sampled_rows)])
            sampled = sample_inverse_cdf(probs, u.to(probs.device), ids).cpu()
            nxt = torch.where(sampled_rows, sampled, greedy)
        else:
            nxt = greedy
        seq[:, t] = nxt
        if t < L - 1:
            out = model(input_ids=nxt.view(B, 1).to(dev), use_cache=True,
                        **{cache_kw: getattr(out, cache_kw)})
    return seq


# --- the resumable JSONL file ----------------------------------------------------------------------
def scan_records(path: Path, seq_len: int | None = None) -> tuple[int, int, bool]:
    """(number of valid leading records, byte offset after them, whether a tail was dropped).

    A record is valid when its line ends with a newline, parses as JSON, has ``idx`` equal to its
    position and a list of ``input_ids`` (of length ``seq_len`` when given). A bad line in the middle
    raises; only the tail (what a killed writer can leave) is dropped.
    """
    count, good_end, offset = 0, 0, 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for ln, raw in enumerate(lines):
        offset += len(raw)
        ok = raw.endswith(b"\n")
        if ok:
            try:
                rec = json.loads(raw)
                ok = (isinstance(rec, dict) and rec.get("idx") == count and isinstance(rec.get("input_ids"), list)
                      and (seq_len is None or len(rec["input_ids"]) == seq_len))
            except ValueError:
                ok = False
        if not ok:
            if ln < len(lines) - 1:
                raise SelfGenError(f"{path}: line {ln + 1} is not a valid record (idx {count} expected); "
                                   f"the file is corrupt beyond a truncated tail, start a new --out")
            return count, good_end, True
        count += 1
        good_end = offset
    return count, good_end, False


def _offset_after(path: Path, keep: int) -> int:
    """Byte offset after the first ``keep`` lines of ``path``."""
    end = 0
    with open(path, "rb") as f:
        for _ in range(keep):
            end += len(f.readline())
    return end


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _write_meta(out: Path, meta: dict) -> None:
    p = _meta_path(out)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, p)


def _check_meta(out: Path, meta: dict) -> None:
    p = _meta_path(out)
    if not p.exists():
        raise SelfGenError(f"{out} exists but {p.name} (its settings) is missing: cannot tell whether resuming is "
                           f"safe; delete {out} or choose another --out")
    old = json.loads(p.read_text())
    for k in ("model",) + CONTENT_FIELDS:
        if old.get(k) != meta.get(k):
            raise SelfGenError(f"cannot resume {out}: it was generated with {k}={old.get(k)!r}, now {k}={meta.get(k)!r}; "
                               f"use the same value or another --out")


def selfgen(model, tokenizer, out: str | Path, cfg: SelfGenConfig = SelfGenConfig(), model_id: str = "",
            progress: bool = True, on_batch: Callable[[int], None] | None = None) -> Path:
    """Generate ``cfg.n`` sequences into the JSONL file ``out`` (resuming it if it exists).

    Each line: ``{"idx": i, "input_ids": [...], "n_greedy": g}``. ``on_batch(n_done)`` is called
    after each batch is durably written. Returns ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_id, **cfg.content(), "format": "qft-selfgen-v1"}
    done = 0
    if out.exists():
        _check_meta(out, meta)
        done, end, dropped = scan_records(out, cfg.seq_len)
        if dropped:
            warnings.warn(f"{out}: dropped a truncated last record (interrupted write)")
        if done >= cfg.n and not dropped:
            return out
        if done < cfg.n:
            # roll back to a batch boundary: the interrupted batch is regenerated exactly as it was
            done -= done % cfg.batch_size
            end = _offset_after(out, done)
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        if done >= cfg.n:
            return out
    else:
        _write_meta(out, meta)
        out.touch()
    model.eval()
    allowed = allowed_token_ids(tokenizer, model.config.vocab_size)
    banned = torch.tensor(sorted(set(range(model.config.vocab_size)) - set(allowed.tolist())), dtype=torch.long)
    bar = tqdm(total=cfg.n, initial=done, desc="selfgen", unit="seq", disable=not progress)
    with open(out, "ab") as f:
        while done < cfg.n:
            b = min(cfg.batch_size, cfg.n - done)
            first, n_greedy, gens = plan_sequences(cfg, allowed, done, b)
            seq = generate_batch(model, first, n_greedy, gens, cfg, banned)
            lines = "".join(json.dumps({"idx": done + j, "input_ids": seq[j].tolist(), "n_greedy": int(n_greedy[j])},
                                       separators=(",", ":")) + "\n" for j in range(b))
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())
            done += b
            bar.update(b)
            if on_batch is not None:
                on_batch(done)
    bar.close()
    return out


def read_selfgen(path: str | Path, warn: bool = True) -> list[list[int]]:
    """Token id lists of a selfgen JSONL file; a truncated last record is dropped (with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selfgen file {str(path)!r} does not exist")
    count, _, dropped = scan_records(path)
    if dropped and warn:
        warnings.warn(f"{path}: the last record is truncated (interrupted write) and was dropped")
    seqs = []
    with open(path, "rb") as f:
        for _ in range(count):
            seqs.append(json.loads(f.readline())["input_ids"])
    return seqs

