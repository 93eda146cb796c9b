"""Training data for QAT: self-generated sequences, a text file, a `datasets` dataset, or a mixture.

Every source becomes a list of token sequences of at most ``seq_len`` tokens:
* ``selfgen``: a JSONL file written by ``qft selfgen`` (records longer than ``seq_len`` are cut);
* ``text``: a UTF-8 file tokenized without special tokens and cut into windows of ``seq_len``
  tokens (stride ``stride``; the incomplete tail is dropped);
* ``hf``: a `datasets` dataset (hub name, a local script/data directory, or a directory written by
  ``save_to_disk``); a pre-tokenized ``input_ids`` column is used as is, otherwise ``text_field`` is
  concatenated (documents separated by EOS) and windowed like a text file (``pack=True``) or each
  document truncated on its own (``pack=False``).

A mixture draws ``round(weight_i / sum(weights) * num_samples)`` sequences from source i (cycling
through a shuffled order when a source is smaller than its share), then shuffles the whole set
(seeded). ``build_dataset`` returns a torch Dataset of dicts (input_ids, attention_mask, labels;
padding has attention 0 and label -100) and ``collate`` pads a batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

SOURCE_TYPES = ("selfgen", "text", "hf")


class DataConfigError(ValueError):
    """A data setting holds a value that is not allowed."""


def _bad(where: str, name: str, value, allowed: str):
    raise DataConfigError(f"{where}.{name}={value!r} is not valid; allowed: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SourceConfig:
    type: str = field(default="selfgen", metadata={"help": "selfgen (qft selfgen JSONL) | text (a text file) | "
                                                           "hf (a `datasets` dataset)"})
    path: str = field(default="", metadata={
        "help": "selfgen/text: the file; hf: a hub name, a local dataset directory or a save_to_disk directory"})
    name: str | None = field(default=None, metadata={"help": "hf: the dataset configuration name (e.g. wikitext-2-raw-v1)"})
    split: str = field(default="train", metadata={"help": "hf: the split"})
    text_field: str = field(default="text", metadata={"help": "hf: the column holding the text"})
    pack: bool = field(default=True, metadata={
        "help": "hf: concatenate documents and cut windows (True) or truncate each document (False)"})
    weight: float = field(default=1.0, metadata={"help": "relative share of this source in a mixture (> 0)"})
    max_samples: int | None = field(default=None, metadata={"help": "use at most this many sequences of this source"})

    def validate(self, where: str = "SourceConfig") -> "SourceConfig":
        if self.type not in SOURCE_TYPES:
            _bad(where, "type", self.type, " | ".join(SOURCE_TYPES))
        if not isinstance(self.path, str) or not self.path:
            _bad(where, "path", self.path, "a file (selfgen, text) or a dataset name/directory (hf)")
        if self.type in ("selfgen", "text") and not Path(self.path).is_file():
            raise DataConfigError(f"{where}.path={self.path!r}: no such file (type={self.type!r})")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not math.isfinite(self.weight) \
                or self.weight <= 0:
            _bad(where, "weight", self.weight, "a finite number > 0 (relative share; drop the source instead of 0)")
        if self.max_samples is not None and (not _is_int(self.max_samples) or self.max_samples < 1):
            _bad(where, "max_samples", self.max_samples, "None or an integer >= 1")
        return self


@dataclass
class DataConfig:
    sources: list = field(default_factory=list, metadata={
        "help": "one or more sources (SourceConfig or dicts with its fields); several make a weighted mixture"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence (>= 2)"})
    stride: int | None = field(default=None, metadata={"help": "text windows: stride (default seq_len, no overlap)"})
    num_samples: int | None = field(default=None, metadata={
        "help": "mixture size (default: every sequence of every source, i.e. no resampling for one source)"})
    seed: int = field(default=0, metadata={"help": "seed of the mixture draw and shuffle"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the final list (the Trainer shuffles again)"})

    def __post_init__(self):
        if isinstance(self.sources, (dict, SourceConfig)):
            self.sources = [self.sources]
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            _bad("DataConfig", "sources", self.sources, "a non-empty list of sources (type: selfgen | text | hf)")
        known = {f.name for f in fields(SourceConfig)}
        srcs = []
        for i, s in enumerate(self.sources):
            where = f"DataConfig.sources[{i}]"
            if isinstance(s, dict):
                unknown = sorted(set(s) - known)
                if unknown:
                    raise DataConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
                s = SourceConfig(**s)
            if not isinstance(s, SourceConfig):
                _bad("DataConfig", f"sources[{i}]", s, "a SourceConfig or a dict of its fields")
            srcs.append(s.validate(where))
        self.sources = srcs
        if not _is_int(self.seq_len) or self.seq_len < 2:
            _bad("DataConfig", "seq_len", self.seq_len, "an integer >= 2 (a sequence must predict at least one token)")
        if self.stride is not None and (not _is_int(self.stride) or self.stride < 1):
            _bad("DataConfig", "stride", self.stride, "None or an integer >= 1")
        if self.num_samples is not None and (not _is_int(self.num_samples) or self.num_samples < 1):
            _bad("DataConfig", "num_samples", self.num_samples, "None or an integer >= 1")
        if not _is_int(self.seed):
            _bad("DataConfig", "seed", self.seed, "an integer")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        """From a recipe block; unknown keys are refused with the list of valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataConfigError(f"data: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]


# --- sources -> token sequences --------------------------------------------------------------------
def windows(ids: list[int], seq_len: int, stride: int | None = None) -> list[list[int]]:
    """Full windows of ``seq_len`` tokens every ``stride`` tokens (the tail that does not fill one is dropped)."""
    st = stride or seq_len
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, st)]


def _text_sequences(src: SourceConfig, cfg: DataConfig, tokenizer, where: str) -> list[list[int]]:
    from qft.eval import read_text
    ids = tokenizer(read_text(src.path), add_special_tokens=False).input_ids
    out = windows(ids, cfg.seq_len, cfg.stride)
    if not out:
        raise DataConfigError(f"{where}.path={src.path!r} has {len(ids)} tokens: too short for one window of "
                              f"DataConfig.seq_len={cfg.seq_len} tokens")
    return out


def _selfgen_sequences(src: SourceConfig, cfg: DataConfig, where: str) -> list[list[int]]:
    from qft.train.selfgen import read_selfgen
    seqs = [s[:cfg.seq_len] for s in read_selfgen(src.path)]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise DataConfigError(f"{where}.path={src.path!r} holds no record of 2 or more tokens")
    return seqs


def _load_hf(src: SourceConfig):
    try:
        import datasets
    except ImportError:
        raise DataConfigError("type='hf' needs the datasets package: pip install datasets") from None
    p = Path(src.path)
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataConfigError(f"split={src.split!r} is not in {src.path!r}; splits: {list(ds)}")
            ds = ds[src.split]
        return ds
    return datasets.load_dataset(src.path, src.name, split=src.split)


def _hf_sequences(src: SourceConfig, cfg: DataConfig, tokenizer, where: str) -> list[list[int]]:
    ds = _load_hf(src)
    cols = ds.column_names
    if "input_ids" in cols:
        docs = [list(x) for x in ds["input_ids"]]
    elif src.text_field in cols:
        texts = [t for t in ds[src.text_field] if isinstance(t, str) and t.strip()]
        docs = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    else:
        raise DataConfigError(f"{where}.text_field={src.text_field!r} is not a column of {src.path!r}; columns: {cols}")
    if src.pack:
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        flat = [t for d in docs for t in list(d) + sep]
        out = windows(flat, cfg.seq_len, cfg.stride)
    else:
        out = [list(d)[:cfg.seq_len] for d in docs if len(d) >= 2]
    if not out:
        raise DataConfigError(f"{where}: {src.path!r} ({src.split}) yields no sequence of DataConfig.seq_len="
                              f"{cfg.seq_len} tokens")
    return out


def source_sequences(src: SourceConfig, cfg: DataConfig, tokenizer, where: str = "source") -> list[list[int]]:
    if src.type == "selfgen":
        seqs = _selfgen_sequences(src, cfg, where)
    elif src.type == "text":
        seqs = _text_sequences(src, cfg, tokenizer, where)
    else:
        seqs = _hf_sequences(src, cfg, tokenizer, where)
    return seqs[:src.max_samples] if src.max_samples else seqs


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Integer counts proportional to ``weights`` summing to ``total`` (largest remainders)."""
    raw = [w * total for w in weights]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(seq_lists: list[list[list[int]]], weights: list[float], total: int, seed: int) -> list[list[int]]:
    """Draw ``mixture_counts`` sequences from each list (shuffled; cycling if a list is short)."""
    rng = random.Random(seed)
    out = []
    for seqs, n in zip(seq_lists, mixture_counts(weights, total)):
        order = list(range(len(seqs)))
        picked = []
        while len(picked) < n:
            rng.shuffle(order)
            picked.extend(order[: n - len(picked)])
        out.extend(seqs[i] for i in picked)
    return out


# --- dataset and collator --------------------------------------------------------------------------
class TokenDataset(torch.utils.data.Dataset):
    """Token sequences as dicts of input_ids, attention_mask, labels (all length ``len(seq)``)."""

    def __init__(self, seqs: list[list[int]]):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        ids = torch.tensor(self.seqs[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Collator:
    """Right-pads a batch to its longest sequence (or ``pad_to``): pad id in input_ids, 0 in the
    attention mask, -100 in labels."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id, self.pad_to = pad_token_id, pad_to

    def __call__(self, items: list[dict]) -> dict:
        L = max(len(x["input_ids"]) for x in items)
        L = max(L, self.pad_to or 0)
        out = {"input_ids": torch.full((len(items), L), self.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros(len(items), L, dtype=torch.long),
               "labels": torch.full((len(items), L), -100, dtype=torch.long)}
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            out["input_ids"][i, :n] = torch.as_tensor(x["input_ids"])
            out["attention_mask"][i, :n] = torch.as_tensor(x.get("attention_mask", torch.ones(n, dtype=torch.long)))
            lab = torch.as_tensor(x.get("labels", x["input_ids"])).clone()
            lab[out["attention_mask"][i, :n] == 0] = -100
            out["labels"][i, :n] = lab
        return out


def build_dataset(cfg: DataConfig, tokenizer) -> tuple[TokenDataset, Collator]:
    """(dataset, collator) for a DataConfig; see the module docstring."""
    if isinstance(cfg, dict):
        cfg = DataConfig.from_dict(cfg)
    lists = [source_sequences(s, cfg, tokenizer, f"DataConfig.sources[{i}]") for i, s in enumerate(cfg.sources)]
    if len(lists) == 1 and cfg.num_samples is None:
        seqs = list(lists[0])
    else:
        total = cfg.num_samples or sum(len(x) for x in lists)
        seqs = mix(lists, cfg.weights(), total, cfg.seed)
    if cfg.shuffle:
        random.Random(cfg.seed + 1).shuffle(seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenDataset(seqs), Collator(pad)
