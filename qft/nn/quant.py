"""Fake-quantization primitives in torch: the reference math and the training path.

All functions are pure. A weight ``w`` is [N, K] (out, in); groups run along K with
``group_size`` columns each, so per-group parameters are [N, K // group_size] and per-channel is
``group_size = K``. Integers live in the unsigned domain u in [0, 2**bits) with dequantization
(u - zero) * scale, the layout ``qft.kernels`` packs (see qft/kernels/reference.py).

Rounding uses a straight-through estimator (STE): forward rounds, backward passes the gradient
unchanged, so latent weights, scales, zero points (LSQ-style) and clipping factors
(OmniQuant-LWC-style, through a sigmoid) all receive gradients. Codebook schemes (NormalFloat4,
FP4 e2m1, FP8 e4m3, 1-bit sign) scale a fixed level set by the group's absolute maximum (sign:
by the mean absolute value, which minimizes the L2 error of sign(w) * s).
"""

from __future__ import annotations

import torch

__all__ = [
    "round_ste", "group_view", "minmax_qparams", "quantize", "dequantize", "fake_quant",
    "codebook", "codebook_qparams", "codebook_quantize", "codebook_dequantize", "fake_quant_codebook",
    "lwc_qparams", "fake_quant_act", "qdq_weight",
]

# NormalFloat4 levels (QLoRA): quantiles of N(0, 1) normalized to [-1, 1], with an exact zero.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]
# FP4 e2m1: sign, 2 exponent bits, 1 mantissa bit.
_FP4 = [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


def div_exact(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d rounded as IEEE division on every device (CUDA turns a division by a Python number into a
    multiplication by its reciprocal, which can differ in the last bit), so GPU and CPU, the Triton QAT
    kernels and the merge compute the same scales."""
    return x / torch.full_like(x, float(d))


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K // group_size, group_size]; raises a clear error if the size does not divide."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    return w.reshape(n, k // group_size, group_size)


def minmax_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                   clip_max: torch.Tensor | float = 1.0, clip_min: torch.Tensor | float | None = None):
    """Min-max scale and integer zero point per group, optionally shrunk by clip ratios.

    Asymmetric: the range [min(w, 0) * clip_min, max(w, 0) * clip_max] maps onto [0, 2**bits - 1].
    Symmetric: zero = 2**(bits-1), scale = 2 * absmax * clip_max / (2**bits - 1).
    Returns (scale, zero), float32 tensors [N, G]; zero holds integers.
    """
    maxq = 2 ** bits - 1
    g = group_view(w.float(), group_size)
    if clip_min is None:
        clip_min = clip_max
    if symmetric:
        amax = g.abs().amax(-1) * clip_max
        scale = div_exact(2 * amax, maxq).clamp_min(1e-8)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    wmax = g.amax(-1).clamp_min(0) * clip_max
    wmin = g.amin(-1).clamp_max(0) * clip_min
    scale = div_exact(wmax - wmin, maxq).clamp_min(1e-8)
    zero = torch.clamp(round_ste(-wmin / scale), 0, maxq)
    return scale, zero


def lwc_qparams(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group_size: int,
                symmetric: bool = False):
    """OmniQuant learnable weight clipping: clip factors sigmoid(gamma), sigmoid(beta) in (0, 1),
    gamma/beta [N, G] logits (init e.g. 4.0 -> 0.982). Gradients reach gamma and beta."""
    return minmax_qparams(w, bits, group_size, symmetric, torch.sigmoid(gamma), torch.sigmoid(beta))


def _expand(p: torch.Tensor) -> torch.Tensor:
    return p.unsqueeze(-1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes u = clamp(round(w / scale) + zero, 0, 2**bits - 1) as uint8 [N, K]."""
    n, k = w.shape
    q = torch.round(group_view(w.float(), group_size) / _expand(scale.float())) + _expand(zero.float())
    return q.clamp(0, 2 ** bits - 1).reshape(n, k).to(torch.uint8)


def dequantize(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(u - zero) * scale, [N, K]."""
    n, k = u.shape
    w = (group_view(u.float(), group_size) - _expand(zero.float())) * _expand(scale.float())
    return w.reshape(n, k).to(dtype)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Differentiable quantize-dequantize (STE through round, clamp gradients zero outside the grid)."""
    n, k = w.shape
    s = _expand(scale)
    q = torch.clamp(round_ste(group_view(w, group_size) / s) + _expand(zero), 0, 2 ** bits - 1)
    return ((q - _expand(zero)) * s).reshape(n, k).to(w.dtype)


# --- codebook schemes -------------------------------------------------------------------------

def codebook(scheme: str, bits: int, device=None) -> torch.Tensor:
    """Sorted level set (float32) for a codebook scheme; indices into it are the stored codes."""
    if scheme == "nf":
        lv = torch.tensor(_NF4)
    elif scheme == "fp" and bits == 4:
        lv = torch.tensor(_FP4)
    elif scheme == "fp" and bits == 8:
        lv = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        lv = torch.where(torch.isnan(lv), torch.zeros_like(lv), lv)  # NaN codes never chosen below
    elif scheme == "sign":
        lv = torch.tensor([-1.0, 1.0])
    else:
        raise ValueError(f"no codebook for scheme={scheme!r} bits={bits}")
    return lv.to(device)


def codebook_qparams(w: torch.Tensor, scheme: str, bits: int, group_size: int, clip: float | torch.Tensor = 1.0):
    """Per-group scale: absmax / max|level| (sign: mean |w|). Returns (scale, zero=0)."""
    g = group_view(w.float(), group_size)
    if scheme == "sign":
        scale = g.abs().mean(-1)
    else:
        scale = g.abs().amax(-1) * clip / codebook(scheme, bits).abs().max()
    scale = scale.clamp_min(1e-8)
    return scale, torch.zeros_like(scale)


def codebook_quantize(w: torch.Tensor, scale: torch.Tensor, scheme: str, bits: int, group_size: int) -> torch.Tensor:
    """Index of the nearest level for w / scale, uint8 [N, K]."""
    n, k = w.shape
    lv = codebook(scheme, bits, w.device)
    x = (group_view(w.float(), group_size) / _expand(scale.float())).reshape(n, k)
    if scheme == "sign":
        return (x >= 0).to(torch.uint8)
    if scheme == "fp" and bits == 8:
        # e4m3fn has codes 0..255 with two NaNs; round-to-nearest through the dtype cast
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    # nearest level by midpoints of the sorted level set
    uniq, first = _unique_levels(lv)
    mids = (uniq[1:] + uniq[:-1]) / 2
    idx = torch.bucketize(x.contiguous(), mids)
    return first[idx].to(torch.uint8)


def _unique_levels(lv: torch.Tensor):
    uniq = torch.unique(lv)  # sorted
    first = torch.stack([torch.nonzero(lv == u)[-1, 0] for u in uniq])
    return uniq, first


def codebook_dequantize(u: torch.Tensor, scale: torch.Tensor, scheme: str, bits: int, group_size: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = u.shape
    lv = codebook(scheme, bits, u.device)
    w = group_view(lv[u.long()], group_size) * _expand(scale.float())
    return w.reshape(n, k).to(dtype)


def fake_quant_codebook(w: torch.Tensor, scale: torch.Tensor, scheme: str, bits: int, group_size: int) -> torch.Tensor:
    """STE quantize-dequantize for codebook schemes: value of the nearest level, gradient of identity
    with respect to w, and of (level / scale) * dscale with respect to the scale."""
    with torch.no_grad():
        u = codebook_quantize(w.detach(), scale.detach(), scheme, bits, group_size)
        lv = codebook(scheme, bits, w.device)[u.long()]
    n, k = w.shape
    s = _expand(scale)
    wq = (group_view(lv, group_size) * s).reshape(n, k)
    return (wq - w.detach() + w).to(w.dtype) if w.requires_grad else wq.to(w.dtype)


def qdq_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, scheme: str = "int",
               clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """One-call round-to-nearest quantize-dequantize of a weight (no gradient tricks needed)."""
    if scheme == "int":
        s, z = minmax_qparams(w, bits, group_size, symmetric, clip)
        return dequantize(quantize(w, s, z, bits, group_size), s, z, group_size, w.dtype)
    s, _ = codebook_qparams(w, scheme, bits, group_size, clip)
    return codebook_dequantize(codebook_quantize(w, s, scheme, bits, group_size), s, scheme, bits, group_size, w.dtype)


def fake_quant_act(x: torch.Tensor, bits: int, granularity: str = "token", symmetric: bool = True) -> torch.Tensor:
    """Dynamic activation fake quant (per token over the last dim, or per tensor), STE.

    The dynamic range is treated as a constant in the backward pass (pure straight-through)."""
    xf = x.float()
    xd = xf.detach()
    if granularity == "token":
        red = dict(dim=-1, keepdim=True)
        amax, amin = xd.abs().amax(**red), xd.amin(**red)
        xmax = xd.amax(**red)
    else:
        amax, amin, xmax = xd.abs().amax(), xd.amin(), xd.amax()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (amax / qmax).clamp_min(1e-8)
        return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
    maxq = 2 ** bits - 1
    lo, hi = amin.clamp_max(0), xmax.clamp_min(0)
    s = ((hi - lo) / maxq).clamp_min(1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(round_ste(xf / s) + z, 0, maxq) - z) * s).to(x.dtype)
