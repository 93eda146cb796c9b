"""Outlier Suppression+ (OS+): channel-wise shifting and scaling (Wei et al., 2023, arXiv:2304.09145).

The idea: activation outliers are *asymmetric* (a channel sits far from zero on one side) and
*concentrated* in a few channels. OS+ first shifts every channel to the centre of its range,
``z_j = (max_j + min_j) / 2``, then scales down the channels whose half-range exceeds a threshold
t, ``s_j = max(1, max|X_j - z_j| / t)``. Both are exact equivalent transformations:

    X W^T + b = ((X - z) / s) (W * s)^T + (b + z W^T)

The shift and the 1/s fold into the producer (the RMSNorm gets a bias, which Llama's lacks:
:class:`qft.nn.reorder.FoldedRMSNorm`; before o_proj, into v_proj's rows and a new v_proj bias,
exact because softmax rows sum to one), s into the consumers' weight columns and ``z W^T`` into a
new consumer bias. t is searched per group on a grid, minimizing the group's quantized output
error on sampled calibration tokens. down_proj's input (``act(gate) * up``) is not linear in a
shift, so it is scaled only (folded into up_proj's rows), as SmoothQuant does.

The folding helpers are SmoothQuant's (:mod:`qft.ptq.smoothquant`: groups, GQA-tied scales for
v -> o, :func:`apply_smoothing`). Every targeted linear becomes a QuantLinear with a bias, with the
spec's activation quantization (per-token dynamic by default); weights by RTN or GPTQ.

Simplified: the scale threshold is searched on a grid of fractions of the largest half-range
(the paper solves a small optimization per layer); the error is measured on the group's own
outputs (no end-to-end search); statistics are calibration min/max.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qft.nn.quant import fake_quant_act, qdq_weight
from qft.nn.reorder import FoldedRMSNorm
from qft.ptq.rptq import calibrate_blocks, channel_minmax, quantize_block_weights
from qft.ptq.smoothquant import apply_smoothing, options_to_config, smoothing_groups
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["OSPlusConfig", "shift_scale", "tie_heads", "apply_shift", "osplus"]


@dataclass
class OSPlusConfig:
    shift: bool = field(default=True, metadata={"help": "channel-wise shift to the range centre"})
    scale: bool = field(default=True, metadata={"help": "channel-wise scaling of the outlier channels"})
    grid: tuple = field(default=(1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05),
                        metadata={"help": "thresholds tried, as fractions of the group's largest half-range"})
    weights: str = field(default="rtn", metadata={"help": "weight quantizer: rtn | gptq"})
    samples_per_layer: int = field(default=512, metadata={"help": "tokens sampled per input for the search"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per forward"})

    def __post_init__(self):
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"osplus weights={self.weights!r} is not valid; allowed: rtn, gptq")
        if not self.grid or any(not 0 < float(r) <= 1 for r in self.grid):
            raise ValueError(f"osplus grid={self.grid!r} is not valid; allowed: fractions in (0, 1]")


# --- the math -------------------------------------------------------------------------------------

def shift_scale(lo: torch.Tensor, hi: torch.Tensor, t: float, shift: bool = True):
    """(z, s) per channel: z = (max + min) / 2 (0 without shift), s = max(1, max|X - z| / t)."""
    z = (hi + lo) / 2 if shift else torch.zeros_like(lo)
    half = torch.maximum(hi - z, z - lo)
    return z, (half / t).clamp_min(1.0)


def tie_heads(x: torch.Tensor, rep: int, head_dim: int, reduce) -> torch.Tensor:
    """GQA: reduce a per-channel vector of o_proj's input over the query heads that share a kv head,
    then expand it back (shift/scale of v_proj's rows must be the same for all of them)."""
    if rep <= 1:
        return x
    t = reduce(x.reshape(-1, rep, head_dim), 1)
    return t.unsqueeze(1).expand(-1, rep, head_dim).reshape(-1)


def _with_bias(lin: nn.Linear) -> nn.Linear:
    if lin.bias is not None:
        return lin
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        new.bias.zero_()
    return new


@torch.no_grad()
def apply_shift(g, z: torch.Tensor) -> None:
    """Fold X -> X - z: the producer subtracts z (norm bias / v_proj bias rows), every consumer adds
    z W^T to its bias. The producer must already carry a bias (FoldedRMSNorm / biased Linear)."""
    for _, lin in g.linears:
        lin.bias.add_(lin.weight.float() @ z.float().to(lin.weight.device))
    if g.kind == "norm":
        g.prev.bias.sub_(z.to(g.prev.bias))
    else:
        rows = z.reshape(-1, g.rep, g.head_dim)[:, 0].reshape(-1) if g.rep > 1 else z
        g.prev.bias.sub_(rows.to(g.prev.bias))


def _group_error(x, linears, z, s, spec: QuantSpec) -> float:
    xt = (x - z) / s
    if spec.act_bits:
        xt = fake_quant_act(xt, spec.act_bits, spec.act_granularity, spec.act_symmetric)
    err = 0.0
    for _, lin in linears:
        w = lin.weight.float()
        ref = x @ w.t()
        wq = qdq_weight(w * s, spec.bits, spec.group_for(w.shape[1]), spec.symmetric, spec.scheme)
        err += (xt @ wq.t() + w @ z - ref).pow(2).mean().item()
    return err


# --- wiring ---------------------------------------------------------------------------------------

def osplus_block(ctx, model, spec: QuantSpec, cfg: OSPlusConfig) -> dict:
    """Shift, scale and quantize one block; returns {group: chosen threshold fraction}."""
    prefix = ctx.name + "."
    groups = [g for g in smoothing_groups(model) if g.linears[0][0].startswith(prefix)
              and all(n[len(prefix):] in ctx.linears for n, _ in g.linears)]
    firsts = [g.linears[0][0][len(prefix):] for g in groups]
    mm = channel_minmax(ctx, firsts)
    samples = ctx.collect(hessian=False, store_tokens=cfg.samples_per_layer)
    for short in list(ctx.linears):  # consumers (and v_proj / up_proj as producers) need biases
        ctx.replace(short, _with_bias(ctx.linears[short]))
    layer = ctx.block
    chosen = {}
    for g, first in zip(groups, firsts):
        g.linears = [(n, ctx.linears[n[len(prefix):]]) for n, _ in g.linears]
        if g.kind == "linear":
            g.prev = ctx.linears[first.rsplit(".", 1)[0] + (".v_proj" if "self_attn" in first else ".up_proj")]
        lo, hi = (t.float() for t in mm[first])
        dev = g.linears[0][1].weight.device
        lo = tie_heads(lo, g.rep, g.head_dim, lambda t, d: t.amin(d)).to(dev)
        hi = tie_heads(hi, g.rep, g.head_dim, lambda t, d: t.amax(d)).to(dev)
        do_shift = cfg.shift and not first.endswith("down_proj")
        x = samples[first].tokens.to(dev)
        z0, _ = shift_scale(lo, hi, 1.0, do_shift)
        top = float(torch.maximum(hi - z0, z0 - lo).max())
        best = (float("inf"), 1.0)
        for r in (cfg.grid if cfg.scale else (1.0,)):
            z, s = shift_scale(lo, hi, top * r, do_shift)
            best = min(best, (_group_error(x, g.linears, z, s, spec), r))
        z, s = shift_scale(lo, hi, top * best[1], do_shift)
        chosen[first] = best[1]
        if g.kind == "norm":
            child = "input_layernorm" if first.startswith("self_attn.") else "post_attention_layernorm"
            norm = FoldedRMSNorm.from_norm(getattr(layer, child), bias=torch.zeros_like(getattr(layer, child).weight))
            setattr(layer, child, norm)
            g.prev = norm
        if do_shift:
            apply_shift(g, z)
        apply_smoothing(g, s)
        if g.kind == "norm":
            with torch.no_grad():
                g.prev.bias.div_(s.to(g.prev.bias))
    quantize_block_weights(ctx, spec, cfg.weights)
    return chosen


@METHODS.register("osplus")
def osplus(model: nn.Module, spec: "QuantSpec | str" = "w6a6", calib: torch.Tensor | None = None, **options):
    """Channel-wise shift + scale folded into the model, then W{bits}A{act_bits} quantization."""
    cfg = options_to_config(OSPlusConfig, "osplus", options)
    spec = resolve_spec(spec)
    if spec.act_bits is None:
        raise ValueError("osplus targets activation quantization: QuantSpec.act_bits=None; use e.g. preset 'w6a6'")
    per_block = calibrate_blocks("osplus", model, calib, spec, lambda ctx: osplus_block(ctx, model, spec, cfg),
                                 cfg.batch_size)
    model.qft_osplus_thresholds = {f"{b}.{k}": v for b, d in per_block.items() for k, v in d.items()}
    return model
