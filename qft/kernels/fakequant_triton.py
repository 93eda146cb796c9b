"""Group-wise weight fake quantization for QAT in Triton: one pass over W per direction.

The lora-in-quantizer forward quantizes W = W0 + s B A every step: per group of ``gs`` weights,
min-max (times optional clip ratios) -> scale, zero -> round -> clamp -> dequantize -> cast. In
plain torch that is ~20 kernels over [N, K] per layer; on a GPU, where a 135M model's layers are
small, the launches (not the bytes) set the step time. Here:

* ``_fq_fwd_kernel``: W fp32 [N, K] -> W_q [N, K] (compute dtype), scale and zero [N, G] fp32
  (or takes given scale / zero: ``fixed`` qparams). One read of W, one write of W_q.
* ``_fq_bwd_kernel``: recomputes the codes from W and the saved (scale, zero) and writes W_q
  (for grad_x = g @ W_q) and the straight-through gradient grad_W * [0 <= code <= 2^b - 1]
  (fp32) in the same pass.

Bit-exact with the torch path (:func:`kernels.reference.fake_quant_weight`): the same float32
operations in the same order, no FMA contraction (``mul_rn``), IEEE division (``div_rn``) and round-half-to-even (the 1.5 * 2**23 trick), so
the integers trained are the integers the (torch) merge exports. Each program takes ``BR``
group-rows of the [N * G, gs] view; a group size that is not a power of two (per-channel 576)
is padded with masked zeros, which change neither max(w, 0) nor min(w, 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._util import alloc, interpreting, next_pow2


@triton.jit
def _rint(x):
    # round half to even, exact for |x| < 2**22 (codes and zero points; anything larger is clamped
    # to the grid's end anyway): adding 1.5 * 2**23 leaves no fraction bits, fp32 rounds to nearest even
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    # a * b that the compiler may not contract with a following add into an FMA (NVPTX does that by
    # default, and then max * clip - min * clip rounds differently from torch's two products); the CPU
    # interpreter evaluates each op on its own and has no libdevice
    if EXACT:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _codes(w, s, z):
    return _rint(tl.math.div_rn(w, s)) + z


@triton.jit
def _tile(R, GS, BR: tl.constexpr, BG: tl.constexpr):
    """This program's BR group-rows of the [R, GS] view: (rows, row mask, element mask, offsets)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BG)
    rmask = rows < R
    return rows, rmask, rmask[:, None] & (cols[None, :] < GS), rows[:, None] * GS + cols[None, :]


@triton.jit
def _fq_fwd_kernel(w_ptr, cmax_ptr, cmin_ptr, s_ptr, z_ptr, out_ptr, R, GS,
                   MAXQ: tl.constexpr, SYM: tl.constexpr, HAS_CLIP: tl.constexpr, GIVEN: tl.constexpr,
                   BR: tl.constexpr, BG: tl.constexpr, EXACT: tl.constexpr):
    rows, rmask, m, offs = _tile(R, GS, BR, BG)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    if GIVEN:
        s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows, mask=rmask, other=0.0)
    else:
        if HAS_CLIP:
            cmax = tl.load(cmax_ptr + rows, mask=rmask, other=1.0)
            cmin = tl.load(cmin_ptr + rows, mask=rmask, other=1.0)
        else:
            cmax = 1.0
            cmin = 1.0
        if SYM:
            amax = tl.max(tl.abs(w), axis=1) * cmax
            s = tl.maximum(tl.math.div_rn(2.0 * amax, MAXQ * 1.0), 1e-8)
            z = tl.zeros([BR], dtype=tl.float32) + (MAXQ + 1) // 2
        else:
            wmax = tl.maximum(tl.max(w, axis=1), 0.0)
            wmin = tl.minimum(tl.min(w, axis=1), 0.0)
            if HAS_CLIP:
                wmax = _mul(wmax, cmax, EXACT)
                wmin = _mul(wmin, cmin, EXACT)
            s = tl.maximum(tl.math.div_rn(wmax - wmin, MAXQ * 1.0), 1e-8)
            z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-wmin, s)), 0.0), MAXQ * 1.0)
        tl.store(s_ptr + rows, s, mask=rmask)
        tl.store(z_ptr + rows, z, mask=rmask)
    q = tl.minimum(tl.maximum(_codes(w, s[:, None], z[:, None]), 0.0), MAXQ * 1.0)
    wq = (q - z[:, None]) * s[:, None]
    tl.store(out_ptr + offs, wq.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fq_bwd_kernel(w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, gout_ptr, R, GS,
                   MAXQ: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    rows, rmask, m, offs = _tile(R, GS, BR, BG)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    s = tl.load(s_ptr + rows, mask=rmask, other=1.0)[:, None]
    z = tl.load(z_ptr + rows, mask=rmask, other=0.0)[:, None]
    q = _codes(w, s, z)
    inside = (q >= 0.0) & (q <= MAXQ * 1.0)
    wq = (tl.minimum(tl.maximum(q, 0.0), MAXQ * 1.0) - z) * s
    tl.store(out_ptr + offs, wq.to(out_ptr.dtype.element_ty), mask=m)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(gout_ptr + offs, tl.where(inside, g, 0.0), mask=m)


def _tiles(gs: int):
    bg = next_pow2(gs)
    return bg, max(1, min(64, 4096 // bg))


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_max=1.0,
                      clip_min=None, scale=None, zero=None, out_dtype=torch.bfloat16):
    """(W_q [N, K] out_dtype, scale [N, G] fp32, zero [N, G] fp32); ``scale``/``zero`` given: use them."""
    n, k = w.shape
    w = w.float().contiguous()
    r = n * (k // group_size)
    given = scale is not None
    if given:
        s, z = scale.float().contiguous(), zero.float().contiguous()
    else:
        s = alloc((n, k // group_size), torch.float32, w.device)
        z = alloc((n, k // group_size), torch.float32, w.device)
    clip_min = clip_max if clip_min is None else clip_min
    has_clip = not given and any(torch.is_tensor(c) or float(c) != 1.0 for c in (clip_max, clip_min))
    if has_clip:
        cmax, cmin = (c.float().expand_as(s).contiguous() if torch.is_tensor(c) else torch.full_like(s, float(c))
                      for c in (clip_max, clip_min))
    else:
        cmax = cmin = s  # unused
    out = alloc((n, k), out_dtype, w.device)
    bg, br = _tiles(group_size)
    _fq_fwd_kernel[(triton.cdiv(r, br),)](w, cmax, cmin, s, z, out, r, group_size, MAXQ=2 ** bits - 1,
                                          SYM=bool(symmetric), HAS_CLIP=has_clip, GIVEN=given, BR=br, BG=bg,
                                          EXACT=not interpreting())
    return out, s, z


def fake_quant_weight_grad(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grad_w: torch.Tensor,
                           bits: int, group_size: int, out_dtype=torch.bfloat16):
    """(W_q [N, K] out_dtype, straight-through grad_W [N, K] fp32: grad_w where the code was not clamped)."""
    n, k = w.shape
    w, g = w.float().contiguous(), grad_w.contiguous()
    r = n * (k // group_size)
    out = alloc((n, k), out_dtype, w.device)
    gout = alloc((n, k), torch.float32, w.device)
    bg, br = _tiles(group_size)
    _fq_bwd_kernel[(triton.cdiv(r, br),)](w, scale.float().contiguous(), zero.float().contiguous(), g, out, gout,
                                          r, group_size, MAXQ=2 ** bits - 1, BR=br, BG=bg)
    return out, gout
