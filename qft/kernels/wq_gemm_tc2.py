"""4-bit tensor-core GEMM with a paired decode: two weights per 32-bit logic op (W4A16, bf16 / fp16).

Idea
----
``wq_gemm_tc`` decodes each 4-bit value into its own 16-bit float, which costs about a dozen SASS
instructions per value (shift, mask, 16-bit truncation, re-packing into pairs, predicates) and
leaves the kernel instruction-bound on the decode (sm_90 compile read locally: ~380 instructions per
thread and K step for a 64 x 128 x 64 tile). Here one 32-bit word of 8 values is decoded as four
*pairs*: ``((w >> 4 j) & 0x000F000F) | 0x43004300`` holds the exact bf16 ``128 + q`` of value j in
its low half and of value j + 4 in its high half (fp16: ``0x64006400``, ``1024 + q``), so a pair costs
one shift and one LOP3, and is reinterpreted as two 16-bit floats without a move
(``tl.inline_asm_elementwise``, ``mov.b32``, two elements per instance). ``(f - (MAGIC + z)) * s``
then runs as packed HADD2 / HMUL2 (exact subtraction, one rounding: the tile is bit-identical to
``dequant``'s).

The decoded K order inside each word is j, j + 4 for j = 0..3, i.e. column ``8 c + 2 j + h`` of the
tile holds value ``8 c + j + 4 h``. A dot product does not care about the order of K as long as both
operands agree, so the activations are permuted the same way once per call (one copy of x, cheap next
to the GEMM: ``permute_x``). ``EVEN`` (K a multiple of BK, N of BN) drops the bound masks.

Simplifications: 4-bit only (bits 1 and 2 stay on ``wq_gemm_tc``); a K step never straddles a group;
under the CPU interpreter (no inline assembly) the pairs are decoded through fp32 (``UPCAST``), which
checks the K permutation but not the reinterpretation (GPU tests cover that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import alloc, interpreting, largest_pow2_divisor
from .tile_util import grouped_tile, store_tile


@triton.jit
def _pairs_to_16(t, FP16: tl.constexpr):
    """uint32 [..., 2] (both copies of one pair word) -> the two 16-bit floats it holds (no move)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [t], dtype=tl.float16 if FP16 else tl.bfloat16,
                                     is_pure=True, pack=2)


@triton.jit
def _decode_pairs(w, s, z, R: tl.constexpr, C: tl.constexpr, UPCAST: tl.constexpr, FP16: tl.constexpr):
    """4-bit words [R, C] + per-row scale / integer zero [R] -> weights [R, 8 C] in paired K order."""
    wu = w.to(tl.uint32, bitcast=True)
    a = tl.join(wu, wu)
    a = tl.reshape(tl.join(a, a), (R, C, 4))
    j = tl.arange(0, 4).to(tl.uint32)[None, None, :]
    if UPCAST:
        ql = ((a >> (4 * j)) & 0xF).to(tl.float32)
        qh = ((a >> (4 * j + 16)) & 0xF).to(tl.float32)
        q = tl.reshape(tl.join(ql, qh), (R, C * 8))
        out = (q - z[:, None].to(tl.float32)) * s[:, None].to(tl.float32)
    else:
        if FP16:
            t = ((a >> (4 * j)) & 0x000F000F) | 0x64006400
            f = tl.reshape(_pairs_to_16(tl.join(t, t), True), (R, C * 8))
            c = (z + 1024.0).to(tl.float16)
            out = (f - c[:, None]) * s[:, None].to(tl.float16)
        else:
            t = ((a >> (4 * j)) & 0x000F000F) | 0x43004300
            f = tl.reshape(_pairs_to_16(tl.join(t, t), False), (R, C * 8))
            c = (z + 128.0).to(tl.bfloat16)
            out = (f - c[:, None]) * s[:, None].to(tl.bfloat16)
    return out


@triton.jit
def _tc2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                M, N, K, Kw, G, stride_xm, stride_ym, k_per_split, GS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, FP16: tl.constexpr,
                EVEN: tl.constexpr):
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    BKW: tl.constexpr = BK // 8
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
        g = k0 // GS
        if EVEN:
            xt = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
            w = tl.load(w_ptrs + k0 // 8)
            s = tl.load(s_ptr + rn * G + g)
            z = tl.load(z_ptr + rn * G + g).to(tl.float32)
        else:
            xt = tl.load(x_ptrs + k0, mask=mmask[:, None] & ((k0 + rk)[None, :] < K), other=0.0)
            w = tl.load(w_ptrs + k0 // 8, mask=nmask[:, None] & ((k0 // 8 + rkw)[None, :] < Kw), other=0)
            s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0)
            z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        wd = _decode_pairs(w, s, z, BN, BKW, UPCAST, FP16)
        if UPCAST:
            acc += tl.dot(xt.to(tl.float32), tl.trans(wd))
        else:
            acc = tl.dot(xt, tl.trans(wd), acc)
    store_tile(acc, y_ptr, b_ptr, rm, rn, mmask, nmask, stride_ym, pid_k, HAS_BIAS, ATOMIC)


def permute_x(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K % 8 == 0) -> the paired K order: column 8 c + 2 j + h holds x[:, 8 c + j + 4 h]."""
    m, k = x2.shape
    return x2.reshape(m, k // 8, 2, 4).transpose(-1, -2).reshape(m, k)


# (BM, BN, BK, warps, stages) candidates by M range; the dispatcher (wq_triton) times them
CONFIGS = {  # chosen from sm_90 compiles read locally: no spills, decode issue close to the MMA time
    "small": [(64, 128, 32, 8, 4), (64, 256, 32, 8, 4), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3)],
    "mid": [(128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (128, 128, 64, 8, 3)],
    "large": [(128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3)],
}


def configs_for(m: int) -> list:
    return CONFIGS["small" if m <= 128 else "mid" if m <= 512 else "large"]


def applies(bits: int, dtype: torch.dtype, k: int) -> bool:
    return bits == 4 and dtype in (torch.bfloat16, torch.float16) and k % 8 == 0


def linear(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           n: int, bias=None, *, bm=64, bn=128, bk=64, num_warps=8, num_stages=3, split_k=None, group_m=8,
           sms=132) -> torch.Tensor:
    """y = x2 @ deq(W)^T (+ bias), 4-bit canonical words, kernel-ready scales / integer zeros [N, G]."""
    m, k = x2.shape
    bk = max(8, largest_pow2_divisor(group_size, bk) if scales.shape[1] > 1 else bk)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split_k is None:
        split_k = 1
        while tiles * split_k * 4 < sms * 3 and k // (split_k * 2) >= 4 * bk and split_k < 16:
            split_k *= 2
    k_per = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_per)
    atomic = split_k > 1
    xp = permute_x(x2)
    y = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if atomic else alloc((m, n), x2.dtype, x2.device)
    kw = dict(BM=bm, BN=bn, BK=bk, GROUP_M=group_m, HAS_BIAS=bias is not None, ATOMIC=atomic,
              UPCAST=interpreting(), FP16=x2.dtype == torch.float16,
              EVEN=(k % bk == 0 and k_per % bk == 0 and n % bn == 0))
    if not interpreting():
        kw.update(num_warps=num_warps, num_stages=num_stages)
    _tc2_kernel[(tiles, split_k)](
        xp, qweight, scales, zeros, bias if bias is not None else scales, y,
        m, n, k, qweight.shape[1], scales.shape[1], xp.stride(0), y.stride(0), k_per, GS=group_size, **kw)
    return y.to(x2.dtype) if atomic else y
