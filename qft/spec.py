"""QuantSpec: one frozen description of a quantization, shared by QAT, PTQ, kernels and export.

Validation happens in ``__post_init__``; every message names the field, the bad value and what
is allowed, because this object is built straight from user input (CLI flags, recipe YAML).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

SCHEMES = ("int", "nf", "fp", "sign")
FORMATS = ("pack-quantized", "gptq", "qft")
ACT_GRANULARITIES = ("token", "tensor")
KV_GRANULARITIES = ("token", "channel")


class QuantSpecError(ValueError):
    """A QuantSpec field holds a value that is not allowed."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = field(default=4, metadata={"help": "weight bits, 1..8"})
    group_size: int | None = field(default=64, metadata={
        "help": "input channels sharing one scale/zero; None = one per output channel"})
    symmetric: bool = field(default=False, metadata={
        "help": "symmetric (zero point fixed at 2**(bits-1)) or asymmetric (min-max, integer zero)"})
    scheme: str = field(default="int", metadata={
        "help": "int: uniform integer grid; nf: NormalFloat4 levels; fp: e2m1 (4 bits) or e4m3 (8 bits); "
                "sign: 1-bit sign times a scale"})
    act_bits: int | None = field(default=None, metadata={"help": "activation fake-quant bits (None = float)"})
    act_granularity: str = field(default="token", metadata={"help": "activation scales: token | tensor"})
    act_symmetric: bool = field(default=True, metadata={"help": "symmetric activation quantization"})
    kv_bits: int | None = field(default=None, metadata={"help": "KV-cache bits (None = float)"})
    kv_granularity: str = field(default="token", metadata={"help": "KV scales: token | channel"})
    kv_group_size: int | None = field(default=None, metadata={"help": "KV group size (None = whole head dim)"})
    targets: tuple[str, ...] = field(default=("*",), metadata={
        "help": "fnmatch patterns of nn.Linear module names to quantize"})
    ignore: tuple[str, ...] = field(default=("lm_head",), metadata={
        "help": "fnmatch patterns of module names left in full precision"})
    format: str = field(default="pack-quantized", metadata={
        "help": "export format: pack-quantized (compressed-tensors), gptq (v1 layout), qft (native)"})

    def __post_init__(self):
        def bad(name, value, allowed):
            raise QuantSpecError(f"QuantSpec.{name}={value!r} is not valid; allowed: {allowed}")

        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            bad("bits", self.bits, "an integer 1..8")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 1):
            bad("group_size", self.group_size, "a positive integer or None (per output channel)")
        if self.scheme not in SCHEMES:
            bad("scheme", self.scheme, ", ".join(SCHEMES))
        if self.scheme == "nf" and self.bits != 4:
            bad("bits", self.bits, "4 with scheme='nf' (NormalFloat4)")
        if self.scheme == "fp" and self.bits not in (4, 8):
            bad("bits", self.bits, "4 (e2m1) or 8 (e4m3) with scheme='fp'")
        if self.scheme == "sign" and self.bits != 1:
            bad("bits", self.bits, "1 with scheme='sign'")
        if self.scheme in ("nf", "fp", "sign") and not self.symmetric:
            object.__setattr__(self, "symmetric", True)  # codebook schemes are symmetric by construction
        for name in ("act_bits", "kv_bits"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16):
                bad(name, v, "None or an integer 2..16")
        if self.act_granularity not in ACT_GRANULARITIES:
            bad("act_granularity", self.act_granularity, ", ".join(ACT_GRANULARITIES))
        if self.kv_granularity not in KV_GRANULARITIES:
            bad("kv_granularity", self.kv_granularity, ", ".join(KV_GRANULARITIES))
        if self.kv_group_size is not None and (not isinstance(self.kv_group_size, int) or self.kv_group_size < 1):
            bad("kv_group_size", self.kv_group_size, "a positive integer or None")
        for name in ("targets", "ignore"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, (tuple, list)) or not all(isinstance(p, str) for p in v):
                bad(name, v, "a list of module-name patterns (strings)")
            object.__setattr__(self, name, tuple(v))
        if self.format not in FORMATS:
            bad("format", self.format, ", ".join(FORMATS))

    # --- helpers -------------------------------------------------------------------------
    def group_for(self, in_features: int) -> int:
        """The group size used for a layer with ``in_features`` inputs (per-channel -> in_features)."""
        return in_features if self.group_size is None else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise a clear error if this spec cannot quantize a layer of this width."""
        gs = self.group_size
        if gs is not None and in_features % gs != 0:
            valid = [d for d in (16, 32, 48, 64, 96, 128, 192, 256) if in_features % d == 0]
            raise QuantSpecError(
                f"group_size={gs} does not divide in_features={in_features} of layer '{name}'; "
                f"valid group sizes for this layer: {valid} or None (per output channel)")

    def matches(self, name: str) -> bool:
        """True if module ``name`` is targeted and not ignored."""
        def hit(patterns):
            return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.split(".")[-1], p)
                       for p in patterns)
        return hit(self.targets) and not hit(self.ignore)

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QuantSpecError(f"unknown QuantSpec field(s) {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        for k in ("targets", "ignore"):
            if k in d and isinstance(d[k], list):
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def name(self) -> str:
        g = "c" if self.group_size is None else str(self.group_size)
        s = {"int": "", "nf": "nf", "fp": "fp", "sign": "sign"}[self.scheme]
        out = f"w{self.bits}{s}g{g}" + ("sym" if self.symmetric and self.scheme == "int" else "")
        if self.act_bits:
            out += f"a{self.act_bits}"
        if self.kv_bits:
            out += f"kv{self.kv_bits}"
        return out


PRESETS: dict[str, QuantSpec] = {
    "w8g128": QuantSpec(bits=8, group_size=128),
    "w8": QuantSpec(bits=8, group_size=None, symmetric=True),
    "w4g32": QuantSpec(bits=4, group_size=32),
    "w4g64": QuantSpec(bits=4, group_size=64),
    "w4g128": QuantSpec(bits=4, group_size=128),
    "w4": QuantSpec(bits=4, group_size=None),
    "w3g64": QuantSpec(bits=3, group_size=64),
    "w3g32": QuantSpec(bits=3, group_size=32),
    "w2g64": QuantSpec(bits=2, group_size=64),
    "w2g32": QuantSpec(bits=2, group_size=32),
    "nf4g64": QuantSpec(bits=4, group_size=64, scheme="nf"),
    "fp4g32": QuantSpec(bits=4, group_size=32, scheme="fp"),
    "fp8": QuantSpec(bits=8, group_size=None, scheme="fp"),
    "w8a8": QuantSpec(bits=8, group_size=None, symmetric=True, act_bits=8),
    "w4a8kv4": QuantSpec(bits=4, group_size=64, act_bits=8, kv_bits=4),
    "w4a8": QuantSpec(bits=4, group_size=64, act_bits=8),
    "w6a6": QuantSpec(bits=6, group_size=None, act_bits=6),
    "w1": QuantSpec(bits=1, group_size=None, scheme="sign"),
}


def preset(name: str) -> QuantSpec:
    """Look up a named preset (case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise QuantSpecError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def resolve_spec(spec: "QuantSpec | str | dict") -> QuantSpec:
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        return preset(spec)
    if isinstance(spec, dict):
        return QuantSpec.from_dict(spec)
    raise QuantSpecError(f"cannot make a QuantSpec from {type(spec).__name__}; give a QuantSpec, preset name or dict")
