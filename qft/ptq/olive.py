"""OliVe: outlier-victim pair quantization (Guo et al., ISCA 2023, arXiv:2304.07493).

The idea: outliers matter but are rare, and the value next to an outlier rarely matters. So keep
every outlier (in an FP-like *abfloat* code placed above the normal integer range) and pay for it
by pruning its neighbour, the *victim*, to zero; the pair still fits the same number of bits and
memory stays aligned. Encoding and decoding: :mod:`qft.nn.olive_codec`.

Here every targeted linear becomes an :class:`qft.nn.olive_codec.OliVeLinear`: weights OVP-encoded
at ``spec.bits`` (4 or 8) with one scale per output channel, inputs OVP fake-quantized at
``spec.act_bits`` (4 or 8, or none) with one static scale per tensor. Both scales are searched on
a grid between "no outliers" (absmax maps to nmax) and "absmax is the largest outlier level":
the weight scale by its mean squared error, the activation scale by the layer's output error on
sampled calibration tokens (each block sees the outputs of the already-quantized blocks).

Simplified: the outlier threshold is fixed by the scale (any value rounding beyond nmax is an
outlier), where the paper picks the normal range from the distribution (e.g. 3 sigma) and searches
a small set of ratios; activations are static per tensor (OliVe's setting), computed in torch with a
decode in the forward (no systolic-array hardware).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qft.nn.olive_codec import OliVeLinear, outlier_levels, ovp_qdq
from qft.ptq.smoothquant import options_to_config
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["OliVeConfig", "scale_candidates", "search_weight_scale", "search_act_scale", "olive"]


@dataclass
class OliVeConfig:
    grid: int = field(default=8, metadata={"help": "scales tried between absmax/nmax and absmax/max_outlier"})
    samples_per_layer: int = field(default=512, metadata={"help": "tokens sampled per input for the act search"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per forward"})

    def __post_init__(self):
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"olive grid={self.grid!r} is not valid; allowed: an integer >= 1")


def scale_candidates(amax: torch.Tensor, bits: int, grid: int) -> list[torch.Tensor]:
    """Geometric grid from amax / nmax (every value normal) to amax / largest outlier level."""
    nmax = 2 ** (bits - 1) - 1
    top = float(outlier_levels(bits)[-1])
    lo, hi = torch.log(torch.tensor(1.0 / nmax)), torch.log(torch.tensor(1.0 / top))
    return [amax.float().clamp_min(1e-8) * torch.exp(lo + (hi - lo) * i / grid) for i in range(grid + 1)]


def search_weight_scale(w: torch.Tensor, bits: int, grid: int = 8) -> torch.Tensor:
    """Per-output-channel scale [N] minimizing the OVP reconstruction error of each row."""
    wf = w.float()
    best_e, best_s = None, None
    for s in scale_candidates(wf.abs().amax(1), bits, grid):
        e = (ovp_qdq(wf, s.unsqueeze(1), bits) - wf).pow(2).sum(1)
        if best_e is None:
            best_e, best_s = e, s
            continue
        better = e < best_e
        best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return best_s


def search_act_scale(x: torch.Tensor, w_q: torch.Tensor, bits: int, grid: int = 8) -> float:
    """Per-tensor scale minimizing ||(Q(x) - x) W_q^T||^2 on sampled rows x."""
    best = None
    for s in scale_candidates(x.abs().max(), bits, grid):
        e = ((ovp_qdq(x, s, bits) - x) @ w_q.t()).pow(2).mean().item()
        if best is None or e < best[0]:
            best = (e, float(s))
    return best[1]


@METHODS.register("olive")
def olive(model: nn.Module, spec: "QuantSpec | str" = "w4a8", calib: torch.Tensor | None = None, **options):
    """OVP weights (spec.bits) and OVP activations (spec.act_bits, static per tensor) for every target."""
    cfg = options_to_config(OliVeConfig, "olive", options)
    spec = resolve_spec(spec)
    if spec.bits not in (4, 8):
        raise ValueError(f"olive: QuantSpec.bits={spec.bits} is not valid; allowed: 4, 8")
    if spec.act_bits not in (None, 4, 8):
        raise ValueError(f"olive: QuantSpec.act_bits={spec.act_bits} is not valid; allowed: None, 4, 8")
    if spec.group_size is not None:
        raise ValueError(f"olive: QuantSpec.group_size={spec.group_size} is not valid; allowed: None "
                         f"(one scale per output channel; outliers make groups unnecessary)")
    from qft.ptq.calibrate import sequential
    if spec.act_bits and (calib is None or len(calib) == 0):
        raise ValueError("olive needs calibration windows for the activation scales (calib=[n, seq_len] token "
                         "ids); got none")

    def convert(ctx):
        samples = ctx.collect(hessian=False, store_tokens=cfg.samples_per_layer) if spec.act_bits else {}
        for short, lin in list(ctx.linears.items()):
            if lin.in_features % 2:
                raise ValueError(f"olive: layer '{ctx.name}.{short}' has odd in_features={lin.in_features}")
            ws = search_weight_scale(lin.weight.detach(), spec.bits, cfg.grid)
            q = OliVeLinear.from_linear(lin, ws, spec.bits, spec.act_bits)
            if spec.act_bits:
                x = samples[short].tokens.to(lin.weight.device)
                with torch.no_grad():
                    q.act_scale.fill_(search_act_scale(x, q.dequantize(), spec.act_bits, cfg.grid))
            ctx.replace(short, q)

    if calib is None or len(calib) == 0:  # weights only: no calibration needed
        from qft.nn import set_module, target_linears
        for name, lin in list(target_linears(model, spec)):
            set_module(model, name, OliVeLinear.from_linear(lin, search_weight_scale(lin.weight.detach(), spec.bits,
                                                                                    cfg.grid), spec.bits, None))
    else:
        sequential(model, calib, spec, convert, batch_size=cfg.batch_size, desc="olive")
    model.qft_spec = spec.replace(format="qft")
    return model
