"""Tensor-core kernels over the K-sliced layout of ``wq_sliced`` (4-bit and lower, M up to 64).

Idea
----
Slot p of a K-sliced word (see ``wq_sliced``) becomes the exact bf16 ``128 + q`` with one OR into
the mantissa of 0x4300 (bits <= 4), no conversion and no subtraction; the tensor cores multiply it
with x^T, and the zero point and scale are applied per block in the epilogue,
``acc += s * dot - s (128 + z) * sum_block x`` (products exact in fp32, so no cancellation issue).
``sum_block x`` comes from the ``wq_sliced`` pre-pass, which also zero-fills a split-K output.

* ``_mma8_kernel`` (4-bit): the 8 decoded slots are joined (``tl.join``) into one
  ``[BN, 8 BKW]`` tile, one ``tl.dot`` per block, against x permuted by ``_xperm_kernel`` into the
  joined column order (column j of a block holds value ``slot(j) * BKW + j // 8``, ``slot(j)`` the
  bit-reversed ``j % 8``). Fewer shared-memory round trips and barriers than one dot per slot.
* ``_mma_kernel``: one ``tl.dot`` (K = BKW) per slot; simpler, slower on large layers.

Measured on an H100 (BENCHMARKS.md): W4 g128 M=16 on 8192x28672 115.7 us (1.40x over cuBLAS bf16),
against 142 us for the canonical GEMM; the dispatcher times these against the canonical kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import alloc
from .wq_sliced import _load_block, _row_ptrs, _splits, prep_x


@triton.jit
def _mma_kernel(x_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                M, N, K, Kw, G, GS, nblk, stride_xm, stride_ym, blk_per_split,
                BITS: tl.constexpr, BKW: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr):
    """acc[BN, BM] = deq(W)[BN, K] @ x^T[K, BM]; slot p of a block times x^T slice p (bits <= 4)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    VPW: tl.constexpr = 32 // BITS
    KB: tl.constexpr = VPW * BKW
    M_: tl.constexpr = (1 << BITS) - 1
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = rn < N
    mmask = rm < M
    rc = tl.arange(0, BKW)
    dt = x_ptr.dtype.element_ty
    w_ptrs = _row_ptrs(qw_ptr, rn, rc, Kw, BKW)
    x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + rc[:, None]  # [BKW, BM]
    b_lo = pid_k * blk_per_split
    b_hi = tl.minimum(b_lo + blk_per_split, nblk)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    s_ptrs = s_ptr + rn * G
    z_ptrs = z_ptr + rn * G
    w0, s0, z0 = _load_block(w_ptrs, s_ptrs, z_ptrs, b_lo, nmask, KB, BKW, GS)
    w1, s1, z1 = _load_block(w_ptrs, s_ptrs, z_ptrs, tl.minimum(b_lo + 1, b_hi - 1), nmask, KB, BKW, GS)
    for blk in range(b_lo, b_hi):
        w2, s2, z2 = _load_block(w_ptrs, s_ptrs, z_ptrs, tl.minimum(blk + 2, b_hi - 1), nmask, KB, BKW, GS)
        wu = w0.to(tl.uint32, bitcast=True)
        accb = tl.zeros([BN, BM], dtype=tl.float32)
        xsum = tl.load(xs_ptr + (rm * nblk + blk) * 2 + 1, mask=mmask, other=0.0)
        for p in tl.static_range(VPW):
            xt = tl.load(x_ptrs + blk * KB + p * BKW, mask=mmask[None, :], other=0.0)
            f = (((wu >> (p * BITS)) & M_) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # 128 + q
            if UPCAST:
                accb += tl.dot(f.to(tl.float32), xt.to(tl.float32))
            else:
                accb = tl.dot(f.to(dt), xt, accb)
        acc += accb * s0[:, None] - (s0 * (128.0 + z0))[:, None] * xsum[None, :]
        w0, s0, z0 = w1, s1, z1
        w1, s1, z1 = w2, s2, z2
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=omask)
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _xperm_kernel(x_ptr, xq_ptr, K, stride_xm, BKW: tl.constexpr):
    """4-bit: x [M, K] -> x permuted per block into the column order of ``_mma8_kernel``'s joined tile:
    column j of a block holds value slot(j) * BKW + j // 8, slot(j) = bit-reversed (j % 8)."""
    blk = tl.program_id(0)
    m = tl.program_id(1)
    KB: tl.constexpr = 8 * BKW
    j = tl.arange(0, KB)
    slot = 4 * (j & 1) + 2 * ((j >> 1) & 1) + ((j >> 2) & 1)
    src = blk * KB + slot * BKW + (j >> 3)
    tl.store(xq_ptr + m * K + blk * KB + j, tl.load(x_ptr + m * stride_xm + src))


@triton.jit
def _mma8_kernel(xq_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 M, N, K, Kw, G, GS, nblk, stride_ym, blk_per_split,
                 BKW: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr):
    """4-bit tensor-core kernel with one dot per block: the 8 decoded slots are joined into one
    [BN, 8 BKW] tile (joins keep each word's values in one thread), against x permuted to match."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    KB: tl.constexpr = 8 * BKW
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = rn < N
    mmask = rm < M
    rc = tl.arange(0, BKW)
    rj = tl.arange(0, KB)
    dt = xq_ptr.dtype.element_ty
    w_ptrs = _row_ptrs(qw_ptr, rn, rc, Kw, BKW)
    x_ptrs = xq_ptr + rm[None, :].to(tl.int64) * K + rj[:, None]  # [KB, BM]
    s_ptrs = s_ptr + rn * G
    z_ptrs = z_ptr + rn * G
    b_lo = pid_k * blk_per_split
    b_hi = tl.minimum(b_lo + blk_per_split, nblk)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    w0, s0, z0 = _load_block(w_ptrs, s_ptrs, z_ptrs, b_lo, nmask, KB, BKW, GS)
    w1, s1, z1 = _load_block(w_ptrs, s_ptrs, z_ptrs, tl.minimum(b_lo + 1, b_hi - 1), nmask, KB, BKW, GS)
    for blk in range(b_lo, b_hi):
        w2, s2, z2 = _load_block(w_ptrs, s_ptrs, z_ptrs, tl.minimum(blk + 2, b_hi - 1), nmask, KB, BKW, GS)
        xt = tl.load(x_ptrs + blk * KB, mask=mmask[None, :], other=0.0)
        xsum = tl.load(xs_ptr + (rm * nblk + blk) * 2 + 1, mask=mmask, other=0.0)
        wu = w0.to(tl.uint32, bitcast=True)
        f0 = ((wu & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f1 = (((wu >> 4) & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f2 = (((wu >> 8) & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f3 = (((wu >> 12) & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f4 = (((wu >> 16) & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f5 = (((wu >> 20) & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f6 = (((wu >> 24) & 0xF) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        f7 = ((wu >> 28) | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        a = tl.join(tl.join(tl.join(f0, f1), tl.join(f2, f3)), tl.join(tl.join(f4, f5), tl.join(f6, f7)))
        a = tl.reshape(a, (BN, KB))
        if UPCAST:
            accb = tl.dot(a.to(tl.float32), xt.to(tl.float32))
        else:
            accb = tl.dot(a.to(dt), xt)
        acc += accb * s0[:, None] - (s0 * (128.0 + z0))[:, None] * xsum[None, :]
        w0, s0, z0 = w1, s1, z1
        w1, s1, z1 = w2, s2, z2
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=omask)
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------------------------
def mma(x2, qw, scales, zeros, bits, group_size, bkw, n, bias=None, *, bn=None, bm=None, num_warps=None,
        split_k=None, target=2, sms=132, upcast=False):
    m, k = x2.shape
    nblk = k // (bkw * 32 // bits)
    bm = bm or (16 if m <= 16 else 32 if m <= 32 else 64)
    bn = bn or 64
    nw = num_warps or 4
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    sk = split_k or _splits(tiles, nblk, sms, target)
    per = triton.cdiv(nblk, sk)
    sk = triton.cdiv(nblk, per)
    atomic = sk > 1
    y = alloc((m, n), torch.float32, x2.device) if atomic else alloc((m, n), x2.dtype, x2.device)
    _, xs, nblk = prep_x(x2, bits, bkw, None, y if atomic else None)
    kw = dict(BITS=bits, BKW=bkw, BN=bn, BM=bm, HAS_BIAS=bias is not None, ATOMIC=atomic, UPCAST=upcast)
    if not upcast:
        kw.update(num_warps=nw, num_stages=1)
    _mma_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), sk)](
        x2, xs, qw, scales, zeros, bias if bias is not None else scales, y,
        m, n, k, qw.shape[1], scales.shape[1], group_size, nblk, x2.stride(0), y.stride(0), per, **kw)
    return y.to(x2.dtype) if atomic else y

def mma8(x2, qw, scales, zeros, group_size, bkw, n, bias=None, *, bn=None, bm=None, num_warps=None,
         split_k=None, target=2, sms=132, upcast=False):
    """4-bit only: one joined dot per block (``_mma8_kernel``)."""
    m, k = x2.shape
    nblk = k // (bkw * 8)
    bm = bm or (16 if m <= 16 else 32 if m <= 32 else 64)
    bn = bn or 64
    nw = num_warps or 4
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    sk = split_k or _splits(tiles, nblk, sms, target)
    per = triton.cdiv(nblk, sk)
    sk = triton.cdiv(nblk, per)
    atomic = sk > 1
    y = alloc((m, n), torch.float32, x2.device) if atomic else alloc((m, n), x2.dtype, x2.device)
    _, xs, nblk = prep_x(x2, 4, bkw, None, y if atomic else None)
    xq = torch.empty((m, k), device=x2.device, dtype=x2.dtype)
    _xperm_kernel[(nblk, m)](x2, xq, k, x2.stride(0), BKW=bkw)
    kw = dict(BKW=bkw, BN=bn, BM=bm, HAS_BIAS=bias is not None, ATOMIC=atomic, UPCAST=upcast)
    if not upcast:
        kw.update(num_warps=nw, num_stages=1)
    _mma8_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), sk)](
        xq, xs, qw, scales, zeros, bias if bias is not None else scales, y,
        m, n, k, qw.shape[1], scales.shape[1], group_size, nblk, y.stride(0), per, **kw)
    return y.to(x2.dtype) if atomic else y
