"""LLM.int8(): vector-wise int8 matmul with mixed-precision outlier decomposition
(Dettmers et al., 2022, arXiv:2208.07339).

Per-token int8 activations x per-output-row int8 weights ("vector-wise" quantization: one scale
per row of X and per row of W) work well until a few input feature dimensions carry huge
magnitudes (>= 6 in the paper), which appear systematically in LLMs above a few billion
parameters. LLM.int8() splits the matmul: the columns of X where any token has |x| >= threshold,
and the matching columns of W, are multiplied in floating point; everything else goes through the
int8 GEMM; the two results are added.

Each targeted linear becomes a :class:`qft.nn.int8.Int8MixedLinear`. No calibration: outlier
dimensions are found at run time, per forward. As in bitsandbytes (and unlike the paper's fp16 copy
of W's outlier columns), the weight is stored once in int8 and the float part uses its dequantized
columns, so the memory stays at 8 bits per weight. ``threshold=0`` disables the decomposition
(plain vector-wise W8A8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qft.nn import set_module, target_linears
from qft.nn.int8 import Int8MixedLinear
from qft.ptq.smoothquant import options_to_config
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["LLMInt8Config", "llm_int8", "outlier_counts"]


@dataclass
class LLMInt8Config:
    threshold: float = field(default=6.0, metadata={
        "help": "activation magnitude from which an input dimension is an outlier (float path); 0 = none"})

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"llm_int8 threshold={self.threshold!r} is not valid; allowed: a number >= 0")


@METHODS.register("llm_int8")
def llm_int8(model: nn.Module, spec: "QuantSpec | str" = "w8a8", calib=None, **options) -> nn.Module:
    """Replace every targeted nn.Linear by an Int8MixedLinear (in place). ``calib`` is ignored.

    Only the spec's targets / ignore patterns are used (the method is int8 by definition); a spec
    with bits != 8 is rejected.
    """
    cfg = options_to_config(LLMInt8Config, "llm_int8", options)
    spec = resolve_spec(spec)
    if spec.bits != 8:
        raise ValueError(f"llm_int8 quantizes weights to int8; got QuantSpec.bits={spec.bits} (use preset 'w8a8')")
    layers = list(target_linears(model, spec))
    if not layers:
        raise ValueError(f"no nn.Linear in the model matches targets={list(spec.targets)} with "
                         f"ignore={list(spec.ignore)}")
    for name, lin in layers:
        set_module(model, name, Int8MixedLinear.from_linear(lin, cfg.threshold))
    model.qft_spec = spec
    return model


def outlier_counts(model: nn.Module) -> dict:
    """Outlier dimensions each Int8MixedLinear saw in its last forward (diagnostics)."""
    return {n: m.last_outliers for n, m in model.named_modules() if isinstance(m, Int8MixedLinear)}
