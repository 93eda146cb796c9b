"""OneBit sign-value linear in Triton: y = ((x * g) @ sign(W)^T) * h (+ bias).

Signs are packed 32 per int32 along K (``reference.pack_signs``; bit 1 = +1).

* Small M (<= 4) where K has a block size: the K-sliced 1-bit GEMV of ``wq_sliced`` (signs
  re-laid out once per tensor, cached; sign = 2q - 1 is the 1-bit form with z = 1/2, s = 2h, and
  g folded into the activation pre-pass). 4.4x over cuBLAS bf16 on 8192x28672 (BENCHMARKS.md).

* ``_gemv_kernel`` (small M, K without a block size): each sign bit becomes ``f = 1 + q/256`` with a shift and one logic
  op (``wq_triton._unit_floats``), one FMA per element into a per-word partial, and
  ``sum_k sign_k xg_k = 512 sum_k f_k xg_k - 513 sum_k xg_k`` per packed word.
* ``_gemm_kernel`` (larger M): unpacks the signs to +-1 in the activation dtype (exact) and uses
  ``tl.dot`` in the transposed orientation (weight tile as the register operand), ``h`` and
  bias in the epilogue.

Simplification: ``x * g`` is recomputed by every program (it is [K], negligible next to W).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import weakref

from . import wq_sliced
from ._util import alloc, interpreting
from .wq_triton import _num_sms as _sms, _unit_floats


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, g_ptr, h_ptr, b_ptr, y_ptr, N, K, Kw, stride_xm, stride_ym,
                 BN: tl.constexpr, BKW: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    BK: tl.constexpr = BKW * 32
    U: tl.constexpr = 256  # _unit_floats(BITS=1): f = 1 + q / 256
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rkw = tl.arange(0, BKW)
    xk0 = rkw[:, None] * 32 + tl.arange(0, 16)[None, :]
    acc = tl.zeros([BN, BKW], dtype=tl.float32)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * Kw
    x_row = x_ptr + pid_m * stride_xm
    for k0 in range(0, K, BK):
        kw = k0 // 32 + rkw
        w = tl.load(w_ptrs + kw[None, :], mask=nmask[:, None] & (kw[None, :] < Kw), other=0)
        xk = k0 + xk0
        xg_lo = tl.load(x_row + xk, mask=xk < K, other=0.0).to(tl.float32) * \
            tl.load(g_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
        xg_hi = tl.load(x_row + xk + 16, mask=xk + 16 < K, other=0.0).to(tl.float32) * \
            tl.load(g_ptr + xk + 16, mask=xk + 16 < K, other=0.0).to(tl.float32)
        f_lo, f_hi = _unit_floats(w, 1)
        # sign = 2q - 1 = 2U (f - 1) - 1:  sum sign * xg = 2U sum f xg - (2U + 1) sum xg
        part = tl.sum(f_lo * xg_lo[None, :, :], axis=2) + tl.sum(f_hi * xg_hi[None, :, :], axis=2)
        xs = tl.sum(xg_lo, axis=1) + tl.sum(xg_hi, axis=1)
        acc += part * (2.0 * U) - xs[None, :] * (2.0 * U + 1.0)
    out = tl.sum(acc, axis=1) * tl.load(h_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, g_ptr, h_ptr, b_ptr, y_ptr, M, N, K, Kw, stride_xm, stride_ym,
                 BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, HAS_BIAS: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    BK: tl.constexpr = BKW * 32
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = rn < N
    mmask = rm < M
    rkw = tl.arange(0, BKW)
    rk = tl.arange(0, BK)
    j = tl.arange(0, 32)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * Kw
    for k0 in range(0, K, BK):
        kw = k0 // 32 + rkw
        w = tl.load(w_ptrs + kw[None, :], mask=nmask[:, None] & (kw[None, :] < Kw), other=0)
        bit = (w[:, :, None] >> j[None, None, :]) & 1
        sgn = tl.reshape(bit.to(tl.float32) * 2.0 - 1.0, (BN, BK))
        xk = k0 + rk
        km = xk < K
        xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + xk[:, None],
                     mask=mmask[None, :] & km[:, None], other=0.0).to(tl.float32)
        xt = xt * tl.load(g_ptr + xk, mask=km, other=0.0).to(tl.float32)[:, None]
        if UPCAST:
            acc += tl.dot(sgn, xt)
        else:
            acc = tl.dot(sgn.to(dt), xt.to(dt), acc)
    out = acc * tl.load(h_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None], out.to(y_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


GEMV_MAX_M = 4
OVERRIDE: dict = {}
_SLICED: dict = {}


def _row_params(h: torch.Tensor):
    """(2 h, 1/2) as fp32 [N, 1] (per-channel scale and zero of the 1-bit form), cached per h."""
    key = ("h", h.data_ptr(), getattr(h, "_version", 0), tuple(h.shape), h.device)
    hit = _SLICED.get(key)
    if hit is not None and hit[0]() is h:
        return hit[1]
    s2 = (2.0 * h.float()).reshape(-1, 1).contiguous()
    val = (s2, torch.full_like(s2, 0.5))
    _SLICED[key] = (weakref.ref(h), val)
    weakref.finalize(h, _SLICED.pop, key, None)
    return val


def sliced_signs(packed: torch.Tensor, k: int):
    """K-sliced copy of the packed signs (``wq_sliced.relayout``, 1 bit), built once per tensor
    (cached by data_ptr / version, dropped with the tensor), or None where K has no block size."""
    bkw = wq_sliced.block_words(1, k, k)
    if not bkw:
        return None, 0
    key = (packed.data_ptr(), getattr(packed, "_version", 0), tuple(packed.shape), packed.device)
    hit = _SLICED.get(key)
    if hit is not None and hit[0]() is packed:
        return hit[1], bkw
    sl = wq_sliced.relayout(packed, 1, k, bkw)
    _SLICED[key] = (weakref.ref(packed), sl)
    weakref.finalize(packed, _SLICED.pop, key, None)
    return sl, bkw


def linear(x2: torch.Tensor, packed: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias=None):
    m, k = x2.shape
    n, kw = packed.shape
    y = alloc((m, n), x2.dtype, x2.device)
    if m == 0:
        return y
    b = bias if bias is not None else h
    if m <= GEMV_MAX_M and not OVERRIDE.get("no_sliced"):
        sl, bkw = sliced_signs(packed, k)
        if sl is not None:  # sign = 2 q - 1: the 1-bit case with z = 1/2, s = 2 h, g folded into x
            s2, z = _row_params(h)
            return wq_sliced.gemv(x2, sl, s2, z, 1, k, bkw, n, bias, g=g, sms=_sms(x2.device),
                                  **OVERRIDE.get("sliced_gemv", {}))
    if m <= GEMV_MAX_M:
        cfg = OVERRIDE.get("gemv", {})
        bn, bkw, nw = cfg.get("bn", 16), cfg.get("bkw", 4), cfg.get("num_warps", 1)
        _gemv_kernel[(triton.cdiv(n, bn), m)](x2, packed, g, h, b, y, n, k, kw, x2.stride(0), y.stride(0),
                                              BN=bn, BKW=bkw, HAS_BIAS=bias is not None, num_warps=nw)
        return y
    cfg = OVERRIDE.get("gemm", {})
    bm = cfg.get("bm") or (16 if m <= 16 else 64 if m <= 64 else 128)
    bn, bkw = cfg.get("bn", 128), cfg.get("bkw", 2)
    kwargs = dict(BM=bm, BN=bn, BKW=bkw, HAS_BIAS=bias is not None,
                  UPCAST=interpreting() or x2.dtype == torch.float32)
    if not interpreting():
        kwargs.update(num_warps=cfg.get("num_warps", 8 if bm >= 128 else 4), num_stages=cfg.get("num_stages", 3))
    _gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](x2, packed, g, h, b, y, m, n, k, kw,
                                                           x2.stride(0), y.stride(0), **kwargs)
    return y
