"""QuIP: quantization with incoherence processing (random orthogonal transforms + adaptive rounding).

Paper: Chee et al., "QuIP: 2-Bit Quantization of Large Language Models With Guarantees" (NeurIPS
2023). Rounding error hurts most when a few weights or Hessian directions are much larger than the
rest. Multiplying the weight on both sides by random orthogonal matrices, W' = U W V^T, makes W'
and the transformed Hessian H' = V H V^T *incoherent* (no entry is large relative to the norm), so
a uniform grid fits them well. W' is then rounded with adaptive rounding against H' (QuIP's LDLQ,
which the paper shows is equivalent to OPTQ/GPTQ: here ``qft.ptq.gptq.gptq_quantize``). At inference
the transforms stay: y = U^T Q(W') V x, applied on the fly by :class:`qft.nn.hadamard.HadamardLinear`
with cheap structured transforms ((A kron B) diag(signs), see that module; ``transform`` chooses
randomized Hadamard or random Kronecker-orthogonal factors).

Every layer gets its own transforms, seeded from ``seed`` and the layer's name (reproducible).
Simplified: no diagonal rescaling of W by the Hessian before the transforms, no greedy "QuIP-G"
passes; the grid is qft's per-group min-max grid (QuIP uses per-tensor ranges), with GPTQ's
act-order and group clip search available through the GPTQ options.
"""

from __future__ import annotations

import zlib

import torch

from qft.nn import quant as Q
from qft.nn.hadamard import TRANSFORMS, apply_transform, make_transform, transform_matrix, HadamardLinear
from qft.ptq.calibrate import BlockContext, sequential
from qft.ptq.gptq import GPTQConfig, check_int_spec, gptq_quantize
from qft.registry import METHODS
from qft.spec import resolve_spec

__all__ = ["layer_transforms", "incoherent", "quip_quantize", "quip"]


def layer_transforms(name: str, n: int, k: int, kind: str, seed: int = 0, device=None):
    """(t_in for V [K], t_out for U [N]) of a layer, reproducible from (seed, name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t_in = make_transform(k, kind, gen)
    t_out = make_transform(n, kind, gen)
    return tuple(t.to(device) for t in t_in), tuple(t.to(device) for t in t_out)


def incoherent(w: torch.Tensor, h: torch.Tensor, t_in, t_out):
    """(W' = U W V^T, H' = V H V^T)."""
    w1 = apply_transform(w.float(), *t_in)                     # W V^T (rows times V^T)
    w2 = apply_transform(w1.t().contiguous(), *t_out).t()     # U (W V^T)
    v = transform_matrix(*t_in).to(h.device)
    return w2.contiguous(), v @ h.float() @ v.t()


@torch.no_grad()
def quip_quantize(w, h, t_in, t_out, bits: int, group_size: int, symmetric: bool = False, **gptq_kw):
    """(codes [N, K], scale, zero) of Q(U W V^T) rounded by GPTQ against V H V^T."""
    wt, ht = incoherent(w, h, t_in, t_out)
    res = gptq_quantize(wt, ht, bits, group_size, symmetric, **gptq_kw)
    return Q.quantize(res.w_q, res.scale, res.zero, bits, group_size), res.scale, res.zero


def quip_block(ctx: BlockContext, cfg: GPTQConfig, kind: str, seed: int) -> None:
    spec = ctx.spec
    stats = ctx.collect(hessian=True)
    for short, lin in list(ctx.linears.items()):
        w = lin.weight.data
        n, k = w.shape
        gs = spec.group_for(k)
        name = f"{ctx.name}.{short}"
        t_in, t_out = layer_transforms(name, n, k, kind, seed, w.device)
        codes, scale, zero = quip_quantize(w, stats[short].H, t_in, t_out, spec.bits, gs, spec.symmetric,
                                           percdamp=cfg.percdamp, block_size=cfg.block_size, act_order=cfg.act_order,
                                           clip_grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
        ctx.replace(short, HadamardLinear.from_parts(codes, scale, zero, spec.bits, gs, t_in, t_out, kind,
                                                     None if lin.bias is None else lin.bias.data,
                                                     dtype=w.dtype, name=name))


@METHODS.register("quip")
def quip(model, spec, calib=None, **options):
    """QuIP over every targeted linear (in place). Options: ``transform`` (hadamard | kron, default
    hadamard), ``seed`` (default 0) and the GPTQ options (percdamp, block_size, act_order, clip_grid,
    max_shrink, batch_size, device)."""
    spec = resolve_spec(spec)
    check_int_spec("quip", spec)
    kind = options.pop("transform", "hadamard")
    seed = options.pop("seed", 0)
    if kind not in TRANSFORMS:
        raise ValueError(f"quip: transform={kind!r} is not valid; allowed: {', '.join(TRANSFORMS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"quip: seed={seed!r} is not valid; allowed: an integer >= 0")
    cfg = GPTQConfig.from_options("quip", options)
    if calib is None:
        raise ValueError("quip needs calibration data: calib=qft.ptq.calibrate.calib_windows(tokenizer, path)")
    model = sequential(model, calib, spec, lambda ctx: quip_block(ctx, cfg, kind, seed), device=cfg.device,
                       batch_size=cfg.batch_size, desc="quip")
    model.qft_spec = spec.replace(format="qft")  # its modules exist only in the native format
    return model
