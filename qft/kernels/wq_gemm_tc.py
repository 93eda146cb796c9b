"""Tensor-core W{1,2,4}A16 GEMM with in-loop dequantization, for M from 32 to a few thousand tokens.

Idea
----
``y[BM, BN] = x[BM, K] @ deq(W)^T`` over the canonical packed words (no re-layout, no second copy
of the weight: what the qlora training path needs). Per K step the program loads

* an activation tile ``x[BM, BK]`` straight into ``tl.dot`` (so Triton's software pipeliner turns
  it into asynchronous copies ``num_stages`` deep), and
* the packed words ``[BN, BK / VPW]`` of its weight rows (contiguous along K), replicates each word
  ``VPW`` times *inside one thread* (``tl.join``), and decodes value j of the word as the exact
  16-bit float ``MAGIC + q`` with one shift and one AND/OR: bf16 ``0x4300 | q`` is ``128 + q`` and
  fp16 ``0x6400 | q`` is ``1024 + q`` (the mantissa's last bit weighs 1 at that exponent). The
  weight is then ``(f - (MAGIC + z)) * s``: the subtraction is exact (small integers), the product
  is rounded once, so the tile is bit-identical to the one ``dequant`` writes for
  dequantize-then-cuBLAS. No int->float conversion, no fp32 round trip, no reshuffle of K: the
  reshape of the joined axis keeps canonical K order (value ``c * VPW + j`` = slot j of word c).

The decoded ``[BN, BK]`` tile is the right-hand operand (``tl.trans``: Triton stages it through
shared memory for wgmma), so the MMA work per decoded weight element is BM multiply-adds: large
BM amortises the decode, the point for M >= 256. Small M (few output tiles) splits K across
programs with fp32 atomics. The launcher takes block sizes as arguments; ``CONFIGS`` lists the
candidates the dispatcher (``wq_triton``) times once per (M bucket, shape) against the other paths.

Simplifications: bits in {1, 2, 4} only (8-bit values do not fit the bf16 mantissa trick; 3-bit
runs in 4-bit containers after ``prepare``); a K step never straddles a group (the launcher picks
BK dividing the group); fp32 activations dequantize in fp32 (``UPCAST``, also used under the CPU
interpreter, whose ``tl.dot`` on cast bf16 operands is unreliable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import alloc, interpreting, largest_pow2_divisor
from .tile_util import grouped_tile, store_tile


@triton.jit
def _decode16(w, s, z, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr, UPCAST: tl.constexpr,
              FP16: tl.constexpr, F32MATH: tl.constexpr):
    """words [R, C] int32, per-row scale s / integer zero z [R] -> weights [R, C * 32 // BITS].

    F32MATH: the subtraction and product in fp32 from the exact 16-bit value (one more conversion
    per element; a fallback in case 16-bit arithmetic is slow or unsupported somewhere)."""
    VPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    wu = w.to(tl.uint32, bitcast=True)
    a = tl.join(wu, wu)
    if VPW >= 4:
        a = tl.join(a, a)
    if VPW >= 8:
        a = tl.join(a, a)
    if VPW >= 16:
        a = tl.join(a, a)
    if VPW >= 32:
        a = tl.join(a, a)
    # the joined axis: copy j of word c; reversed bit order of the join tree is irrelevant since
    # j below is the position along the final axis, which is what reshape flattens
    j = tl.arange(0, VPW).to(tl.uint32)[None, None, :]
    q = (tl.reshape(a, (R, C, VPW)) >> (j * BITS)) & MASK
    if UPCAST:
        wf = (tl.reshape(q, (R, C * VPW)).to(tl.float32) - z[:, None].to(tl.float32)) * s[:, None].to(tl.float32)
        return wf
    if FP16:
        f = (q | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        c = (z + 1024.0).to(tl.float16)
        f = tl.reshape(f, (R, C * VPW))
        return (f - c[:, None]) * s[:, None].to(tl.float16)
    f = (q | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    f = tl.reshape(f, (R, C * VPW))
    if F32MATH:
        return ((f.to(tl.float32) - (z + 128.0)[:, None]) * s[:, None].to(tl.float32)).to(tl.bfloat16)
    c = (z + 128.0).to(tl.bfloat16)
    return (f - c[:, None]) * s[:, None].to(tl.bfloat16)


@triton.jit
def _tc_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
               M, N, K, Kw, G, GS, stride_xm, stride_ym, k_per_split,
               BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
               UPCAST: tl.constexpr, FP16: tl.constexpr, F32MATH: tl.constexpr):
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    rk = tl.arange(0, BK)
    rkw = tl.arange(0, BKW)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = qw_ptr + rn[:, None].to(tl.int64) * Kw + rkw[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        xk = k0 + rk
        xt = tl.load(x_ptrs + k0, mask=mmask[:, None] & (xk[None, :] < K), other=0.0)
        kw = k0 // VPW + rkw
        w = tl.load(w_ptrs + k0 // VPW, mask=nmask[:, None] & (kw[None, :] < Kw), other=0)
        g = k0 // GS
        s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0)
        z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        wd = _decode16(w, s, z, BITS, BN, BKW, UPCAST, FP16, F32MATH)
        if UPCAST:
            acc += tl.dot(xt.to(tl.float32), tl.trans(wd))
        else:
            acc = tl.dot(xt, tl.trans(wd), acc)
    store_tile(acc, y_ptr, b_ptr, rm, rn, mmask, nmask, stride_ym, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def _tc_bwd_kernel(g_ptr, qw_ptr, s_ptr, z_ptr, dx_ptr, M, N, K, Kw, G, GS, stride_gm, stride_dm,
                   BITS: tl.constexpr, BM: tl.constexpr, BNR: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, UPCAST: tl.constexpr, FP16: tl.constexpr):
    """qlora backward dx[BM, BK] = sum over weight rows of gy[BM, BNR] @ deq(W)[BNR, BK]: the decoded
    [BNR, BK] tile is the right operand as it is (rows = reduction), one group per program (BK | GS)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BM, BK, GROUP_M)  # output tiles [BM, BK] of dx
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rkw = pid_k * BKW + tl.arange(0, BKW)
    mmask = rm < M
    g = (pid_k * BK) // GS
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in range(0, N, BNR):
        rn = n0 + tl.arange(0, BNR)
        nmask = rn < N
        gy = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                     mask=mmask[:, None] & nmask[None, :], other=0.0)
        w = tl.load(qw_ptr + rn[:, None].to(tl.int64) * Kw + rkw[None, :],
                    mask=nmask[:, None] & (rkw[None, :] < Kw), other=0)
        s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0)
        z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        wd = _decode16(w, s, z, BITS, BNR, BKW, UPCAST, FP16, False)
        if UPCAST:
            acc += tl.dot(gy.to(tl.float32), wd)
        else:
            acc = tl.dot(gy, wd, acc)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * stride_dm + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & (rk[None, :] < K))


def grad_input(gy2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, k: int, *, bm=128, bnr=64, bk=128, num_warps=8, num_stages=3,
               group_m=8) -> torch.Tensor:
    """dx = gy2 @ deq(W) ([M, N] @ [N, K]) with the 16-bit decode in the loop (bits 1, 2, 4)."""
    m, n = gy2.shape
    vpw = 32 // bits
    bk = max(vpw, largest_pow2_divisor(group_size, bk) if scales.shape[1] > 1 else bk)
    dx = alloc((m, k), gy2.dtype, gy2.device)
    kw = dict(BITS=bits, BM=bm, BNR=bnr, BK=bk, GROUP_M=group_m, UPCAST=interpreting() or gy2.dtype == torch.float32,
              FP16=gy2.dtype == torch.float16)
    if not interpreting():
        kw.update(num_warps=num_warps, num_stages=num_stages)
    _tc_bwd_kernel[(triton.cdiv(m, bm) * triton.cdiv(k, bk),)](
        gy2, qweight, scales, zeros, dx, m, n, k, qweight.shape[1], scales.shape[1], group_size,
        gy2.stride(0), dx.stride(0), **kw)
    return dx


# backward candidates (BM, BNR, BK, warps, stages)
BWD_CONFIGS = [(128, 64, 128, 8, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 4)]


@triton.jit
def _dequant16_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, Kw, G, GS,
                      BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                      FP16: tl.constexpr):
    """packed -> dense [N, K] through ``_decode16`` (one read of the words, one write of the weight)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    rn = pid_n * BN + tl.arange(0, BN)
    rkw = pid_k * BKW + tl.arange(0, BKW)
    rk = pid_k * BK + tl.arange(0, BK)
    nmask = rn < N
    w = tl.load(qw_ptr + rn[:, None].to(tl.int64) * Kw + rkw[None, :], mask=nmask[:, None] & (rkw[None, :] < Kw),
                other=0)
    g = (pid_k * BK) // GS
    s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0)
    z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
    wd = _decode16(w, s, z, BITS, BN, BKW, UPCAST, FP16, False)
    tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], wd.to(w_ptr.dtype.element_ty),
             mask=nmask[:, None] & (rk[None, :] < K))


def dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
            k: int, dtype: torch.dtype, *, bn=64, bk=128, num_warps=4, upcast=None) -> torch.Tensor:
    """Dense [N, K] weight in ``dtype`` from canonical words (bits 1, 2, 4) and kernel-ready scales /
    zeros; bit-identical to ``wq_triton.dequant`` for bf16 / fp16."""
    n = qweight.shape[0]
    vpw = 32 // bits
    bk = max(vpw, largest_pow2_divisor(group_size, bk) if scales.shape[1] > 1 else bk)
    out = alloc((n, k), dtype, qweight.device)
    if upcast is None:
        upcast = interpreting() or dtype == torch.float32
    kw = dict(BITS=bits, BN=bn, BK=bk, UPCAST=upcast, FP16=dtype == torch.float16)
    if not interpreting():
        kw.update(num_warps=num_warps)
    _dequant16_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, zeros, out, n, k, qweight.shape[1], scales.shape[1], group_size, **kw)
    return out


# Candidate configurations (BM, BN, BK, warps, stages), by M range; the dispatcher times them.
CONFIGS = {  # sm_90 compiles read locally: larger tiles spill (255 registers) with this decode
    "small": [(64, 128, 64, 8, 3), (64, 64, 64, 4, 4)],
    "mid": [(128, 128, 32, 8, 4), (64, 128, 64, 8, 3)],
    "large": [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3)],
}
F32MATH_CONFIG = {"small": (64, 128, 64, 8, 3), "mid": (128, 128, 32, 8, 4), "large": (128, 128, 32, 8, 4)}


def configs_for(m: int) -> list:
    """(BM, BN, BK, warps, stages[, 'f32']) candidates for this M; the last one does its decode math in fp32."""
    r = "small" if m <= 128 else "mid" if m <= 512 else "large"
    return CONFIGS[r] + [F32MATH_CONFIG[r] + ("f32",)]


def applies(bits: int, dtype: torch.dtype) -> bool:
    return bits in (1, 2, 4) and dtype in (torch.bfloat16, torch.float16, torch.float32)


def _sms(device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
           group_size: int, n: int, bias=None, *, bm=64, bn=128, bk=64, num_warps=4, num_stages=3,
           split_k=None, group_m=8, sms=None, f32math=False) -> torch.Tensor:
    """y = x2 @ deq(W)^T (+ bias) for x2 [M, K] contiguous, canonical words [N, K * bits / 32] and
    kernel-ready scales / integer zeros [N, G] (as ``wq_triton.prepare`` builds them)."""
    m, k = x2.shape
    vpw = 32 // bits
    gs = group_size
    bk = max(vpw, largest_pow2_divisor(gs, bk) if scales.shape[1] > 1 else bk)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split_k is None:
        sms = sms or _sms(x2.device)
        split_k = 1
        while tiles * split_k * 4 < sms * 3 and k // (split_k * 2) >= 4 * bk and split_k < 16:
            split_k *= 2
    k_per = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_per)
    atomic = split_k > 1
    y = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if atomic else alloc((m, n), x2.dtype, x2.device)
    upcast = interpreting() or x2.dtype == torch.float32
    kw = dict(BITS=bits, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, HAS_BIAS=bias is not None, ATOMIC=atomic,
              UPCAST=upcast, FP16=x2.dtype == torch.float16, F32MATH=f32math)
    if not interpreting():
        kw.update(num_warps=num_warps, num_stages=num_stages)
    _tc_kernel[(tiles, split_k)](
        x2, qweight, scales, zeros, bias if bias is not None else scales, y,
        m, n, k, qweight.shape[1], scales.shape[1], gs, x2.stride(0), y.stride(0), k_per, **kw)
    return y.to(x2.dtype) if atomic else y
