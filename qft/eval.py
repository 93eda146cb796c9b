"""Evaluation: perplexity on text with a fixed protocol, KL(teacher || student), generation.

Protocol (the default everywhere numbers are reported): tokenize the whole text without special
tokens (no BOS), cut ``n_windows`` non-overlapping windows of ``seq_len`` tokens from the start
(stride = seq_len unless given), and average the next-token negative log-likelihood over every
predicted position (seq_len - 1 per window). Perplexity = exp(mean NLL). KL(teacher || student) is
the mean over the same positions of sum_v p_t(v) (log p_t(v) - log p_s(v)).

With no text at all, :func:`heldout_selfgen` samples held-out text from the teacher itself
(seeded), so evaluation runs offline on any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class EvalProtocol:
    seq_len: int = field(default=512, metadata={"help": "tokens per window"})
    n_windows: int = field(default=20, metadata={"help": "number of windows (0 = all that fit)"})
    stride: int | None = field(default=None, metadata={"help": "window stride (default seq_len: no overlap)"})
    batch_size: int = field(default=2, metadata={"help": "windows per forward pass"})

    def __post_init__(self):
        for k in ("seq_len", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 2:
                raise ValueError(f"EvalProtocol.{k}={v!r} is not valid; allowed: an integer >= 2")
        if not isinstance(self.n_windows, int) or self.n_windows < 0:
            raise ValueError(f"EvalProtocol.n_windows={self.n_windows!r} is not valid; allowed: integer >= 0")
        if self.stride is not None and (not isinstance(self.stride, int) or self.stride < 1):
            raise ValueError(f"EvalProtocol.stride={self.stride!r} is not valid; allowed: a positive integer")

    def describe(self) -> str:
        st = self.stride or self.seq_len
        return f"{self.n_windows or 'all'} x {self.seq_len}-token windows, stride {st}, no BOS"


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def windows_from_text(tokenizer, text: str, protocol: EvalProtocol = EvalProtocol(), source: str = "text") -> torch.Tensor:
    """[n, seq_len] token windows following the protocol; raises if the text is too short."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    L, st = protocol.seq_len, protocol.stride or protocol.seq_len
    starts = list(range(0, len(ids) - L + 1, st))
    if protocol.n_windows:
        starts = starts[: protocol.n_windows]
    if not starts or (protocol.n_windows and len(starts) < protocol.n_windows):
        raise ValueError(f"{source} has {len(ids)} tokens: too short for {protocol.n_windows or 1} window(s) of "
                         f"{L} tokens (stride {st}); give more text or lower --seq-len / --n-windows")
    return torch.stack([ids[s:s + L] for s in starts])


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch.to(_device(model))).logits.float()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, teacher=None, batch_size: int = 2, desc: str = "eval",
             progress: bool = True) -> dict:
    """Perplexity of ``model`` on the windows, and KL(teacher || model) when a teacher is given."""
    model.eval()
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[i:i + batch_size]
        logits = _logits(model, batch)[:, :-1]
        target = batch[:, 1:].to(logits.device)
        logp = F.log_softmax(logits, -1)
        nll_sum += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if teacher is not None:
            tlogp = F.log_softmax(_logits(teacher, batch)[:, :-1].to(logits.device), -1)
            kl_sum += (tlogp.exp() * (tlogp - logp)).sum().item()
    out = {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count}
    if teacher is not None:
        out["kl"] = kl_sum / count
    return out


@torch.no_grad()
def heldout_selfgen(model, tokenizer, n_seqs: int = 8, seq_len: int = 256, seed: int = 1234,
                    batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Held-out evaluation text sampled from ``model`` (temperature 1, seeded): [n_seqs, seq_len].

    The first token is drawn uniformly from the non-special vocabulary, the rest sampled.
    """
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), model.config.vocab_size)) if i not in special]
    out = []
    dev = _device(model)
    for i in tqdm(range(0, n_seqs, batch_size), desc="held-out self-generated text", disable=not progress, leave=False):
        b = min(batch_size, n_seqs - i)
        first = torch.tensor(vocab)[torch.randint(len(vocab), (b,), generator=gen)].unsqueeze(1)
        torch.manual_seed(seed + i)
        seq = model.generate(first.to(dev), attention_mask=torch.ones_like(first).to(dev), do_sample=True,
                             top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=seq_len - 1,
                             min_new_tokens=seq_len - 1, pad_token_id=tokenizer.pad_token_id or 0)
        out.append(seq[:, :seq_len].cpu())
    return torch.cat(out)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True, **kw) -> str:
    """Greedy (default) continuation of a prompt; uses the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = {k: v.to(_device(model)) for k, v in enc.items()}
    kw.setdefault("do_sample", False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kw)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
