"""LLM-FP4: floating-point W4A8 / W4A4 with searched exponent bias (Liu et al., 2023, arXiv:2310.16836).

The idea: an FP format ExMy with exponent bias b represents +-2^(e - b) (1 + m / 2^y); a real-valued
bias is the same as scaling the format's level set, i.e. choosing its **maximum value**. LLM-FP4
searches that maximum (hence the bias) per output channel of the weights and per tensor of the
activations, minimizing the quantization error, instead of taking absmax (the "default bias").

Activations have a few channels far wider than the rest, which a per-tensor bias cannot serve.
The **pre-shifted exponent bias** gives each input channel j an extra *integer* exponent bias p_j
(a power-of-two factor): X_j is quantized as X_j / 2^p_j, and 2^p_j is reparameterized into the
weights' column j, so the inference cost is nil. Here the factor is folded into the producer of X
(the RMSNorm weight, v_proj's rows before o_proj, up_proj's rows before down_proj) with
SmoothQuant's helpers (:func:`qft.ptq.smoothquant.apply_smoothing`); a power of two is exact in
floating point. p_j = max(0, ceil(log2(max|X_j| / T))) for a reference maximum T chosen on a grid
(T = max|X| / 2^k) by the group's quantized output error.

Weights: FP4 e2m1 (``QuantSpec(bits=4, scheme="fp")``, per channel or per group) in a QuantLinear
with the searched scale. Activations: FP8 e4m3 (act_bits=8) or FP4 e2m1 (act_bits=4), one static
searched scale per tensor (:class:`qft.nn.reorder.ClusterQuantLinear` with one cluster).

Simplified: the formats are fixed (e2m1 weights, e4m3 / e2m1 activations; the paper also searches
the exponent/mantissa split); the maximum is searched on a grid of ratios of absmax, weights by
the diag(E[x^2])-weighted error, activations by the consumers' output error on sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qft.nn import quant as Q
from qft.nn.qlinear import QuantLinear
from qft.nn.reorder import ClusterQuantLinear, fp_round
from qft.ptq.rptq import calibrate_blocks
from qft.ptq.smoothquant import apply_smoothing, options_to_config, smoothing_groups
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["LLMFP4Config", "fp_max", "search_weight_scale", "search_act_scale", "preshift_factors", "llm_fp4"]

FP_MAX = {4: 6.0, 8: 448.0}


@dataclass
class LLMFP4Config:
    search: bool = field(default=True, metadata={"help": "search the maxima (False: absmax, the default bias)"})
    weight_grid: int = field(default=20, metadata={"help": "weight maxima tried: absmax * (1 - i / (2 * grid))"})
    act_grid: tuple = field(default=(1.0, 0.85, 0.7, 0.5, 0.35, 0.25),
                            metadata={"help": "activation maxima tried, as fractions of the calibration absmax"})
    preshift: bool = field(default=True, metadata={"help": "per-channel power-of-two exponent bias folded into W"})
    preshift_max_k: int = field(default=4, metadata={"help": "reference maxima tried: max|X| / 2^k, k = 0..max_k"})
    samples_per_layer: int = field(default=256, metadata={"help": "tokens sampled per input for the searches"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per forward"})

    def __post_init__(self):
        if not isinstance(self.weight_grid, int) or self.weight_grid < 1:
            raise ValueError(f"llm_fp4 weight_grid={self.weight_grid!r} is not valid; allowed: an integer >= 1")
        if not self.act_grid or any(not 0 < float(r) <= 1 for r in self.act_grid):
            raise ValueError(f"llm_fp4 act_grid={self.act_grid!r} is not valid; allowed: fractions in (0, 1]")


# --- the math -------------------------------------------------------------------------------------

def fp_max(bits: int) -> float:
    """Largest magnitude of the FP format (e2m1: 6, e4m3fn: 448)."""
    if bits not in FP_MAX:
        raise ValueError(f"FP bits={bits} is not valid; allowed: 4 (e2m1), 8 (e4m3)")
    return FP_MAX[bits]


def search_weight_scale(w: torch.Tensor, bits: int, group_size: int, d: torch.Tensor | None = None,
                        grid: int = 20) -> torch.Tensor:
    """Per-group scale [N, G] of the FP codebook minimizing sum_k d_k (w_k - Q(w_k))^2 over maxima
    absmax * r, r = 1, 1 - 1/(2 grid), ..., 0.5 (r = 1 is the default bias, so never worse)."""
    N, K = w.shape
    G = K // group_size
    wf = w.float()
    dk = (torch.ones(K, device=w.device) if d is None else d.float().to(w.device)).reshape(1, G, group_size)
    s0, _ = Q.codebook_qparams(wf, "fp", bits, group_size)
    if grid < 1:
        return s0
    best_e, best_s = None, s0
    for i in range(grid + 1):
        s = s0 * (1 - i / (2 * grid))
        e = ((_qdq(wf, s, bits, group_size) - wf).reshape(N, G, group_size).pow(2) * dk).sum(-1)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return best_s


def _qdq(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Nearest FP level times the per-group scale (the values QuantLinear's FP codebook gives)."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size) / scale.unsqueeze(-1)
    return (fp_round(g, bits) * scale.unsqueeze(-1)).reshape(n, k)


def act_error(x: torch.Tensor, scale: float, bits: int, weights: list) -> float:
    """sum over consumers of ||(Q(x) - x) W^T||^2 / n for a per-tensor FP scale."""
    dx = fp_round(x / scale, bits) * scale - x
    return sum((dx @ w.t()).pow(2).mean().item() for w in weights)


def search_act_scale(x: torch.Tensor, bits: int, weights: list, grid=(1.0,), amax: float | None = None):
    """(scale, error): the per-tensor FP scale amax * r / fp_max minimizing :func:`act_error`."""
    amax = float(x.abs().max()) if amax is None else float(amax)
    cands = [(act_error(x, max(amax * r, 1e-8) / fp_max(bits), bits, weights), max(amax * r, 1e-8) / fp_max(bits))
             for r in grid]
    e, s = min(cands)
    return s, e


def preshift_factors(cmax: torch.Tensor, ref: float) -> torch.Tensor:
    """Per-channel power-of-two factors 2^p, p = max(0, ceil(log2(max|X_j| / ref)))."""
    p = torch.ceil(torch.log2(cmax.float().clamp_min(1e-12) / ref)).clamp_min(0)
    return torch.pow(2.0, p)


# --- wiring ---------------------------------------------------------------------------------------

def _tie(c: torch.Tensor, g) -> torch.Tensor:
    if g.kind != "linear" or g.rep <= 1:
        return c
    t = c.reshape(-1, g.rep, g.head_dim).amax(1)
    return t.unsqueeze(1).expand(-1, g.rep, g.head_dim).reshape(-1)


def _plan_group(g, x, cmax, spec: QuantSpec, cfg: LLMFP4Config):
    """(factors s, act scale) for one group: the preshift reference and the activation maximum are
    chosen jointly by the group's output error (weights at the default bias meanwhile)."""
    wb, ab = spec.bits, spec.act_bits
    gs = spec.group_for(x.shape[1])
    refs = [float(cmax.max()) / 2 ** k for k in range(cfg.preshift_max_k + 1)] if cfg.preshift else [None]
    best = None
    for ref in refs:
        s = torch.ones_like(cmax) if ref is None else preshift_factors(cmax, ref)
        xs = x / s
        ws = [lin.weight.detach().float() * s for _, lin in g.linears]
        wsc = [Q.codebook_qparams(w, "fp", wb, gs)[0] for w in ws]  # default bias here; searched in the end
        wq = [_qdq(w, sc, wb, gs) for w, sc in zip(ws, wsc)]
        amax = float((cmax / s).max())
        asc, _ = search_act_scale(xs, ab, wq, cfg.act_grid if cfg.search else (1.0,), amax)
        xq = fp_round(xs / asc, ab) * asc
        err = sum((xq @ q.t() - x @ lin.weight.float().t()).pow(2).mean().item() for q, (_, lin) in zip(wq, g.linears))
        if best is None or err < best[0]:
            best = (err, s, asc)
    return best[1], best[2]


def llm_fp4_block(ctx, model, spec: QuantSpec, cfg: LLMFP4Config) -> dict:
    prefix = ctx.name + "."
    groups = [g for g in smoothing_groups(model) if g.linears[0][0].startswith(prefix)
              and all(n[len(prefix):] in ctx.linears for n, _ in g.linears)]
    stats = ctx.collect(hessian=False, absmax=True, store_tokens=cfg.samples_per_layer)
    wspec = spec.replace(act_bits=None)
    plans, shifts = [], {}
    for g in groups:  # 1. plan every group on the block's float weights
        first = g.linears[0][0][len(prefix):]
        st = stats[first]
        dev = g.linears[0][1].weight.device
        cmax = _tie(st.absmax.float(), g).to(dev)
        x = st.tokens.to(dev)
        s, asc = _plan_group(g, x, cmax, spec, cfg)
        plans.append((g, s, asc, (x / s).pow(2).mean(0)))
        shifts[first] = int(torch.log2(s).max())
    for g, s, _, _ in plans:  # 2. fold the power-of-two factors (v_proj / up_proj rows change here)
        if bool((s != 1).any()):
            apply_smoothing(g, s)
    for g, s, asc, d in plans:  # 3. quantize the final weights
        for name, lin in g.linears:
            dev = lin.weight.device
            sc = search_weight_scale(lin.weight.detach(), spec.bits, spec.group_for(lin.in_features), d,
                                     cfg.weight_grid if cfg.search else 0)
            inner = QuantLinear.from_linear(lin, wspec, name=name, scale=sc)
            one = torch.zeros(inner.in_features, dtype=torch.long, device=dev)
            ctx.replace(name[len(prefix):], ClusterQuantLinear.build(
                inner, torch.tensor([asc], device=dev), torch.zeros(1, device=dev), one, spec.act_bits, "fp"))
    return shifts


@METHODS.register("llm_fp4")
def llm_fp4(model: nn.Module, spec: "QuantSpec | str | None" = None, calib: torch.Tensor | None = None, **options):
    """FP4 weights (searched maxima) x static FP activations (searched maximum, pre-shifted bias)."""
    cfg = options_to_config(LLMFP4Config, "llm_fp4", options)
    spec = resolve_spec(spec or QuantSpec(bits=4, group_size=None, scheme="fp", act_bits=8))
    if spec.scheme != "fp":
        raise ValueError(f"llm_fp4: QuantSpec.scheme={spec.scheme!r} is not valid; allowed: 'fp' "
                         f"(e.g. --scheme fp --bits 4 --group-size none)")
    if spec.act_bits not in (4, 8):
        raise ValueError(f"llm_fp4: QuantSpec.act_bits={spec.act_bits!r} is not valid; allowed: 4 (e2m1), 8 (e4m3)")
    per_block = calibrate_blocks("llm_fp4", model, calib, spec, lambda ctx: llm_fp4_block(ctx, model, spec, cfg),
                                 cfg.batch_size)
    model.qft_llm_fp4_max_shift = {f"{b}.{k}": v for b, d in per_block.items() for k, v in d.items()}
    return model
