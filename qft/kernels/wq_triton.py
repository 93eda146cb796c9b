"""Weight-only W{1,2,3,4,8}A16 Triton kernels over the canonical packed layout.

Idea
----
The canonical layout (see ``reference.py``) packs each output row's integers densely along K
into int32 words. For bits in {1, 2, 4, 8} no value straddles a word, so word ``kw`` of row
``n`` holds values ``kw*VPW .. kw*VPW+VPW-1`` (``VPW = 32 // bits``) at bit offsets
``j*bits``: a tile of ``BN`` rows by ``BK // VPW`` words unpacks in registers into a
``[BN, BK]`` tile in canonical K order (copies of each word are made with ``tl.join`` so that
all values of one word stay in one thread, then shifted and masked). The canonical rows are therefore used *as is*: the only
load-time work (:func:`prepare`) is converting scales and integer zero points to the
activation dtype (zeros stay exact integers). Bits 3, 5, 6, 7 are re-packed once at load into
4- or 8-bit containers (simplification: 3-bit weights then move as many bytes as 4-bit ones).

Integer -> float without a conversion instruction: each value is shifted into the fp32
mantissa and OR-ed with the exponent of 1.0, giving ``f = 1 + q / U`` exactly (``U =
2**(7+bits)``; one shift and one 3-input logic op per element, see ``_unit_floats``). The GEMV
then needs one FMA per element: ``sum_j (q_j - z) s x_j = s U (sum_j f_j x_j - (1 + z / U)
sum_j x_j)``, the bracket per packed word (in-thread), scaled and accumulated per word, reduced
across threads once at the end. The GEMM dequantizes with one FMA, ``w = f sU - (1 + z/U) sU``.

Kernels
-------
* ``_gemv_kernel``  (M <= 4): one program per (``BN`` rows, m, K split); products summed
  along K in registers, the next K step's loads issued before the current step's math;
  optional split-K through fp32 atomics. A K step covering several groups gathers scales per
  word. The (K step, rows, warps, split) configuration is timed once per shape on first use
  (``GEMV_CONFIGS``; through a CUDA graph, skipped while a graph is being captured).
* ``_gemm_kernel``  (larger M): computes the transposed product ``acc[BN, BM] = W[BN, BK] @
  x^T[BK, BM]`` so the dequantized weight tile (produced in registers) is the *left* operand
  of ``tl.dot``: Hopper's wgmma takes its A operand from registers, B from shared memory.
  The packed words are prefetched one K step ahead by hand. Optional split-K through fp32
  atomics. From M = 128 on, this kernel and dequantize-then-cuBLAS are timed once per shape
  and the faster is kept (``_large_m_path``).
* ``_gemm_t_kernel`` (qlora backward): ``grad_x[M, K] = grad_y[M, N] @ W[N, K]`` with the
  weight dequantized on the fly (no dense weight materialised).
* ``_dequant_kernel``: packed -> dense ``[N, K]`` (dequantize-then-cuBLAS path for large M,
  and ``qft.kernels.dequant`` on CUDA).

Group sizes that are not a multiple of 32 (and not per-channel) are not handled here; the
dispatcher in ``__init__`` falls back to the torch reference for them.

Small M goes to the K-sliced kernels (``wq_sliced``: a copy of the words re-laid out once in
:func:`prepare`) when the weight has a block size (``wq_sliced.block_words``): the CUDA-core GEMV
for M <= 4, the tensor-core ``mma8`` / ``mma`` kernels up to M = 64 (4-bit). Per (M, shape) the
sliced configurations and the kernels above are timed once on first use and the fastest is kept
(``sliced_linear``), so the sliced path is only used where it measured faster. H100 figures are in
BENCHMARKS.md (W4 g128 M=1 on 8192x28672: 59 us, 2.7x over cuBLAS bf16; these canonical kernels 84 us).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._util import alloc, interpreting, largest_pow2_divisor, next_pow2
from . import wq_gemm_tc, wq_gemm_tc2, wq_sliced, wq_sliced_mma
from .reference import pack_int32, unpack_int32



# --------------------------------------------------------------------------------------------
# load-time preparation
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedQWeight:
    """Kernel-ready view of one canonical packed weight (built once by :func:`prepare`)."""

    qweight: torch.Tensor  # int32 [N, Kw] in `bits`-bit containers (canonical tensor when bits in 1,2,4,8)
    scales: torch.Tensor   # [N, G] in the activation dtype
    zeros: torch.Tensor    # [N, G] integer zero points, stored in the activation dtype (exact)
    bits: int              # container bits (1, 2, 4 or 8)
    orig_bits: int
    group_size: int        # effective group size (in_features for per-channel)
    in_features: int
    out_features: int
    sliced: torch.Tensor | None = None  # K-sliced copy of qweight (wq_sliced.relayout), built once at load
    bkw: int = 0                          # its words per row per block (0: no sliced copy)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]


def container_bits(bits: int) -> int:
    if bits in (1, 2, 4, 8):
        return bits
    return 4 if bits == 3 else 8


def supported(group_size: int, in_features: int) -> bool:
    """Whether the Triton kernels handle this grouping (else the caller falls back to torch)."""
    return group_size == in_features or group_size % 32 == 0


def prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
            group_size: int, in_features: int, dtype: torch.dtype, sliced: bool = True) -> PreparedQWeight:
    """Kernel-ready struct. ``sliced=False`` defers the K-sliced copy (``sliced_copy``) to the first
    call that needs it (M <= 64): a layer that only ever runs large M (qlora training at 2K tokens)
    then never holds a second copy of its words."""
    n = qweight.shape[0]
    cb = container_bits(bits)
    if cb != bits:  # re-pack straddling values into 4/8-bit containers (once, at load)
        qw = pack_int32(unpack_int32(qweight, bits, in_features), cb)
    else:
        qw = qweight.contiguous()
    bkw = wq_sliced.block_words(cb, group_size, in_features)
    sl = wq_sliced.relayout(qw, cb, in_features, bkw) if bkw and sliced else None
    return PreparedQWeight(qw, scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(), cb, bits,
                           group_size, in_features, n, sl, bkw)


_SLICED_COPIES: dict = {}


def sliced_copy(p: PreparedQWeight):
    """The K-sliced words of ``p`` (None when the weight has no block size), built on first use and
    cached per words tensor (identity, data pointer, version); the entry dies with the tensor."""
    if p.sliced is not None or not p.bkw:
        return p.sliced
    qw = p.qweight
    key = (id(qw), qw.data_ptr(), getattr(qw, "_version", 0), p.bits, p.bkw)
    hit = _SLICED_COPIES.get(key)
    if hit is not None and hit[0]() is qw:
        return hit[1]
    sl = wq_sliced.relayout(qw, p.bits, p.in_features, p.bkw)
    _SLICED_COPIES[key] = (weakref.ref(qw), sl)
    weakref.finalize(qw, _SLICED_COPIES.pop, key, None)
    return sl


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _replicate(w, VPW: tl.constexpr):
    """[R, C] -> [R, C, VPW] copies of each word, the new axis held inside one thread (joins)."""
    a = tl.join(w, w)
    if VPW >= 4:
        a = tl.join(a, a)
    if VPW >= 8:
        a = tl.join(a, a)
    if VPW >= 16:
        a = tl.join(a, a)
    if VPW >= 32:
        a = tl.join(a, a)
    return tl.reshape(a, (w.shape[0], w.shape[1], VPW))


@triton.jit
def _unit_floats(w, BITS: tl.constexpr):
    """int32 words [R, C] -> (lo, hi) fp32 [R, C, H] (H = 16 // BITS values per half-word).

    Each value q becomes f = 1 + q * 2**-(7 + BITS) exactly: it is shifted into mantissa bits
    [16 - BITS, 16) and OR-ed with the exponent of 1.0. Values in the low half-word only need
    left shifts and those in the high half-word only right shifts, so each element costs one
    shift and one 3-input logic op (no int->float conversion). ``lo[.., j]`` is value j of the
    word and ``hi[.., j]`` value H + j; the copies live in one thread (see ``_replicate``).
    """
    H: tl.constexpr = 16 // BITS
    T: tl.constexpr = 16 - BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << T
    j = tl.arange(0, H).to(tl.uint32)[None, None, :]
    wr = _replicate(w.to(tl.uint32, bitcast=True), H)
    lo = (((wr << (T - BITS * j)) & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
    hi = (((wr >> (BITS + BITS * j)) & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _dequant_tile(w, s, z, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """words [R, C] + per-row scale / integer zero [R] -> fp32 weights [R, C * 32 // BITS].

    With f = 1 + q / U (U = 2**(7 + BITS)): (q - z) * s = f * (s U) - (1 + z / U) * (s U), one FMA
    per element, accurate to ~2**-16 relative before the cast to the activation dtype.
    """
    U: tl.constexpr = 1 << (7 + BITS)
    s2 = s * U
    c = (1.0 + z * (1.0 / U)) * s2
    lo, hi = _unit_floats(w, BITS)
    f = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (R, C * (32 // BITS)))
    return f * s2[:, None] - c[:, None]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gemv_load(w_ptrs, x_row, s_ptrs, z_ptrs, k0, K, Kw, GS, nmask, rkw, xk0,
               VPW: tl.constexpr, H: tl.constexpr, U: tl.constexpr, EVEN: tl.constexpr, MULTI: tl.constexpr):
    """Loads of one K step: words [BN, BKW], x halves [BKW, H], s*U and 1 + z/U per row ([BN, 1]) or,
    when a step spans several groups (MULTI), per word ([BN, BKW], gathered from L1)."""
    kw = k0 // VPW + rkw
    xk = k0 + xk0
    if EVEN:
        w = tl.load(w_ptrs + kw[None, :], mask=nmask[:, None], other=0)
        x_lo = tl.load(x_row + xk)
        x_hi = tl.load(x_row + xk + H)
    else:
        w = tl.load(w_ptrs + kw[None, :], mask=nmask[:, None] & (kw[None, :] < Kw), other=0)
        x_lo = tl.load(x_row + xk, mask=xk < K, other=0.0)
        x_hi = tl.load(x_row + xk + H, mask=xk + H < K, other=0.0)
    if MULTI:
        g = ((k0 + rkw * VPW) // GS)[None, :]
        gm = nmask[:, None] & (kw[None, :] < Kw)
        s = tl.load(s_ptrs[:, None] + g, mask=gm, other=0.0).to(tl.float32) * U
        c = 1.0 + tl.load(z_ptrs[:, None] + g, mask=gm, other=0.0).to(tl.float32) * (1.0 / U)
    else:
        g = k0 // GS
        s = (tl.load(s_ptrs + g, mask=nmask, other=0.0).to(tl.float32) * U)[:, None]
        c = (1.0 + tl.load(z_ptrs + g, mask=nmask, other=0.0).to(tl.float32) * (1.0 / U))[:, None]
    return w, x_lo.to(tl.float32), x_hi.to(tl.float32), s, c


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 N, K, Kw, G, GS, stride_xm, stride_ym, k_per_split,
                 BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN: tl.constexpr, MULTI: tl.constexpr):
    """One program: BN rows x one K split for one activation row. The next K step's loads are
    issued before the current step's math (register double-buffering)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    H: tl.constexpr = VPW // 2
    U: tl.constexpr = 1 << (7 + BITS)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rkw = tl.arange(0, BKW)
    xk0 = rkw[:, None] * VPW + tl.arange(0, H)[None, :]  # [BKW, H]: values 0..H-1 of each word
    acc = tl.zeros([BN, BKW], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_ptrs = qw_ptr + rn[:, None].to(tl.int64) * Kw
    s_ptrs = s_ptr + rn * G
    z_ptrs = z_ptr + rn * G
    x_row = x_ptr + pid_m * stride_xm
    w, x_lo, x_hi, s, c = _gemv_load(w_ptrs, x_row, s_ptrs, z_ptrs, k_lo, K, Kw, GS, nmask, rkw, xk0,
                                     VPW, H, U, EVEN, MULTI)
    k_last = k_lo + ((k_hi - k_lo - 1) // BK) * BK  # last step; the prefetch past the end re-reads it
    for k0 in range(k_lo, k_hi, BK):
        w_n, x_lo_n, x_hi_n, s_n, c_n = _gemv_load(w_ptrs, x_row, s_ptrs, z_ptrs, tl.minimum(k0 + BK, k_last), K,
                                                   Kw, GS, nmask, rkw, xk0, VPW, H, U, EVEN, MULTI)
        # sum_j (q_j - z) s x_j = s U (sum_j f_j x_j - (1 + z / U) sum_j x_j),  f_j = 1 + q_j / U
        f_lo, f_hi = _unit_floats(w, BITS)
        part = tl.sum(f_lo * x_lo[None, :, :], axis=2) + tl.sum(f_hi * x_hi[None, :, :], axis=2)
        xs = tl.sum(x_lo, axis=1) + tl.sum(x_hi, axis=1)
        acc += (part - c * xs[None, :]) * s
        w, x_lo, x_hi, s, c = w_n, x_lo_n, x_hi_n, s_n, c_n
    acc = tl.sum(acc, axis=1)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    out = y_ptr + pid_m * stride_ym + rn
    if ATOMIC:
        tl.atomic_add(out, acc, mask=nmask)
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 M, N, K, Kw, G, GS, stride_xm, stride_ym, k_per_split,
                 BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    num_m = tl.cdiv(M, BM)
    # grouped ordering: GROUP_N weight tiles are swept against every M tile before moving on
    width = GROUP_N * num_m
    group_id = pid // width
    first_n = group_id * GROUP_N
    gsz = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % gsz
    pid_m = (pid % width) // gsz
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = rn < N
    mmask = rm < M
    rkw = tl.arange(0, BKW)
    rk = tl.arange(0, BK)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_ptrs = qw_ptr + rn[:, None].to(tl.int64) * Kw
    x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm
    # weight words travel global -> registers (they are dequantized there), so the software
    # pipeliner does not cover them: prefetch the next K step's words by hand.
    kw = k_lo // VPW + rkw
    w = tl.load(w_ptrs + kw[None, :], mask=nmask[:, None] & (kw[None, :] < Kw), other=0)
    k_last = k_lo + ((k_hi - k_lo - 1) // BK) * BK  # last step; the prefetch past the end re-reads it
    for k0 in range(k_lo, k_hi, BK):
        kw_n = tl.minimum(k0 + BK, k_last) // VPW + rkw
        w_n = tl.load(w_ptrs + kw_n[None, :], mask=nmask[:, None] & (kw_n[None, :] < Kw), other=0)
        xk = k0 + rk
        xt = tl.load(x_ptrs + xk[:, None], mask=mmask[None, :] & (xk[:, None] < K), other=0.0)
        g = k0 // GS
        s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        wd = _dequant_tile(w, s, z, BITS, BN, BKW)
        if UPCAST:
            acc += tl.dot(wd, xt.to(tl.float32))
        else:
            acc = tl.dot(wd.to(dt), xt, acc)
        w = w_n
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
def _gemm_t_kernel(g_ptr, qw_ptr, s_ptr, z_ptr, dx_ptr,
                   M, N, K, Kw, G, GS, stride_gm, stride_dm,
                   BITS: tl.constexpr, BM: tl.constexpr, BNR: tl.constexpr, BK: tl.constexpr,
                   UPCAST: tl.constexpr):
    """dx[M, K] = gy[M, N] @ deq(W)[N, K]; the reduction runs over N (weight rows)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rkw = pid_k * BKW + tl.arange(0, BKW)
    mmask = rm < M
    g = (pid_k * BK) // GS
    dt = g_ptr.dtype.element_ty
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in range(0, N, BNR):
        rn = n0 + tl.arange(0, BNR)
        nmask = rn < N
        w = tl.load(qw_ptr + rn[:, None].to(tl.int64) * Kw + rkw[None, :],
                    mask=nmask[:, None] & (rkw[None, :] < Kw), other=0)
        s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
        wd = _dequant_tile(w, s, z, BITS, BNR, BKW)
        gy = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                     mask=mmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(gy.to(tl.float32), wd)
        else:
            acc = tl.dot(gy, wd.to(dt), acc)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * stride_dm + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & (rk[None, :] < K))


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, Kw, G, GS,
                    BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    VPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VPW
    rn = pid_n * BN + tl.arange(0, BN)
    rkw = pid_k * BKW + tl.arange(0, BKW)
    rk = pid_k * BK + tl.arange(0, BK)
    nmask = rn < N
    w = tl.load(qw_ptr + rn[:, None].to(tl.int64) * Kw + rkw[None, :],
                mask=nmask[:, None] & (rkw[None, :] < Kw), other=0)
    g = (pid_k * BK) // GS
    s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
    wd = _dequant_tile(w, s, z, BITS, BN, BKW)
    tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], wd.to(w_ptr.dtype.element_ty),
             mask=nmask[:, None] & (rk[None, :] < K))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _step_k(p: PreparedQWeight, cap: int) -> int:
    """A K step that never straddles a group boundary (and holds whole words)."""
    vpw = 32 // p.bits
    if p.n_groups == 1:
        bk = cap
    else:
        bk = largest_pow2_divisor(p.group_size, cap)
    return max(bk, vpw)


_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


# Sweepable configuration hooks (the benchmark sets these; None = heuristics).
OVERRIDE: dict = {}


def gemv(x2: torch.Tensor, p: PreparedQWeight, bias=None, *, bn=None, bk=None, split_k=None,
         num_warps=None) -> torch.Tensor:
    m, k = x2.shape
    n = p.out_features
    cfg = OVERRIDE.get("gemv", {})
    # defaults from the H100 runs (BENCHMARKS.md): one-warp programs, many of them; K steps of
    # 256 values (a step may span several groups: scales are then gathered per word)
    bk = bk or cfg.get("bk") or max(256, 32 // p.bits * 16)
    multi = p.n_groups > 1 and p.group_size % bk != 0
    bn = bn or cfg.get("bn") or min(16, next_pow2(n))
    nw = num_warps or cfg.get("num_warps") or 1
    n_tiles = triton.cdiv(n, bn)
    if split_k is None:
        split_k = cfg.get("split_k")
    if split_k is None:
        sms = _num_sms(x2.device)
        split_k = 1
        while n_tiles * m * split_k < 4 * sms and split_k < 8 and k // (split_k * 2) >= 4 * bk:
            split_k *= 2
    k_per = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_per)
    atomic = split_k > 1
    out = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if atomic else alloc((m, n), x2.dtype, x2.device)
    _gemv_kernel[(n_tiles, m, split_k)](
        x2, p.qweight, p.scales, p.zeros, bias if bias is not None else p.scales, out,
        n, k, p.qweight.shape[1], p.n_groups, p.group_size, x2.stride(0), out.stride(0), k_per,
        BITS=p.bits, BN=bn, BK=bk, HAS_BIAS=bias is not None, ATOMIC=atomic,
        EVEN=(k % bk == 0 and k_per % bk == 0), MULTI=multi, num_warps=nw)
    return out.to(x2.dtype) if atomic else out


def gemm(x2: torch.Tensor, p: PreparedQWeight, bias=None, *, bm=None, bn=None, bk=None, split_k=None,
         num_warps=None, num_stages=None, group_n=8) -> torch.Tensor:
    m, k = x2.shape
    n = p.out_features
    cfg = OVERRIDE.get("gemm", {})
    # defaults from the H100 sweep (BENCHMARKS.md)
    if bm is None:
        bm = cfg.get("bm") or (16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128 if m <= 256 else 256)
    bn = bn or cfg.get("bn") or (64 if m <= 32 else 128 if m <= 64 else 64 if bm <= 128 else 128)
    bk = bk or cfg.get("bk") or (128 if m <= 64 else 64)
    bk = min(bk, _step_k(p, bk))
    nw = num_warps or cfg.get("num_warps") or (8 if bm * bn >= 256 * 128 else 4)
    ns = num_stages or cfg.get("num_stages") or (4 if m <= 64 else 3)
    n_tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    if split_k is None:
        split_k = cfg.get("split_k")
    if split_k is None:
        sms = _num_sms(x2.device)
        split_k = 1
        while n_tiles * split_k < sms and k // (split_k * 2) >= 4 * bk:
            split_k *= 2
    k_per = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_per)
    atomic = split_k > 1
    out = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if atomic else alloc((m, n), x2.dtype, x2.device)
    kw = dict(BITS=p.bits, BM=bm, BN=bn, BK=bk, GROUP_N=group_n, HAS_BIAS=bias is not None,
              ATOMIC=atomic, UPCAST=interpreting() or x2.dtype == torch.float32)
    if not interpreting():
        kw.update(num_warps=nw, num_stages=ns)
    _gemm_kernel[(n_tiles, split_k)](
        x2, p.qweight, p.scales, p.zeros, bias if bias is not None else p.scales, out,
        m, n, k, p.qweight.shape[1], p.n_groups, p.group_size, x2.stride(0), out.stride(0), k_per, **kw)
    return out.to(x2.dtype) if atomic else out


def dequant(p: PreparedQWeight, dtype=None) -> torch.Tensor:
    n, k = p.out_features, p.in_features
    dtype = dtype or p.scales.dtype
    cfg = OVERRIDE.get("dequant16")
    if cfg and wq_gemm_tc.applies(p.bits, dtype):  # 16-bit decode kernel (bit-identical), cfg = (bn, bk, warps)
        return wq_gemm_tc.dequant(p.qweight, p.scales, p.zeros, p.bits, p.group_size, k, dtype,
                                  bn=cfg[0], bk=cfg[1], num_warps=cfg[2])
    out = alloc((n, k), dtype, p.qweight.device)
    bk = min(128, _step_k(p, 128))
    bn = 32
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        p.qweight, p.scales, p.zeros, out, n, k, p.qweight.shape[1], p.n_groups, p.group_size,
        BITS=p.bits, BN=bn, BK=bk)
    return out


_BWD_CHOICE: dict = {}


def grad_input(gy2: torch.Tensor, p: PreparedQWeight) -> torch.Tensor:
    """dx = gy @ deq(W) ([M, N] @ [N, K] -> [M, K]), the qlora backward. Two paths: the fused kernel
    (``grad_input_fused``, weight dequantized tile by tile in the loop) and dequantize-then-cuBLAS
    (one bandwidth-bound pass writes the dense weight, a transient freed right after; nothing is
    saved from the forward). Chosen per (M bucket, shape) by timing both once on first use; under
    CUDA-graph capture or off CUDA: fused below M = 256, else dequantize-then-cuBLAS.
    ``OVERRIDE['grad_input']`` ('fused', 'deq' or a ('tc', ...) key) forces one. The tensor-core
    in-loop-decode kernel (``wq_gemm_tc.grad_input``) is a third candidate."""
    m = gy2.shape[0]
    forced = OVERRIDE.get("grad_input")
    if forced is None:
        bucket = 1 << max(0, (m - 1).bit_length())
        key = (bucket, p.out_features, p.in_features, p.bits, p.group_size, gy2.dtype, gy2.device)
        forced = _BWD_CHOICE.get(key)
        if forced is None:
            if not _can_time(gy2):
                forced = "fused" if m < 256 else "deq"
            else:
                best = (_time_once(lambda: grad_input_deq(gy2, p), graph=False), "deq")
                ref = grad_input_deq(gy2, p)
                for name, fn in _bwd_candidates(gy2, p):
                    t = _try_time(name, fn, ref=ref, graph=False)
                    if t < best[0]:
                        best = (t, name)
                forced = _BWD_CHOICE[key] = best[1]
    return run_bwd_path(forced, gy2, p)


def _bwd_candidates(gy2, p):
    cands = [("fused", lambda: grad_input_fused(gy2, p))]
    if wq_gemm_tc.applies(p.bits, gy2.dtype):
        cands += [(("tc",) + c, lambda c=c: run_bwd_path(("tc",) + c, gy2, p)) for c in wq_gemm_tc.BWD_CONFIGS]
    return cands


def run_bwd_path(path, gy2, p: PreparedQWeight):
    """The qlora backward by key: 'deq', 'fused' or ('tc', BM, BNR, BK, warps, stages)."""
    if path == "deq":
        return grad_input_deq(gy2, p)
    if isinstance(path, tuple) and path[0] == "tc" and wq_gemm_tc.applies(p.bits, gy2.dtype):
        bm, bnr, bk, nw, ns = path[1:6]
        return wq_gemm_tc.grad_input(gy2, p.qweight, p.scales, p.zeros, p.bits, p.group_size, p.in_features,
                                     bm=bm, bnr=bnr, bk=bk, num_warps=nw, num_stages=ns)
    return grad_input_fused(gy2, p)


def grad_input_deq(gy2: torch.Tensor, p: PreparedQWeight) -> torch.Tensor:
    """dx = gy @ dequant(W) through cuBLAS (the dense weight is a transient)."""
    return torch.mm(gy2, dequant(p, gy2.dtype))


def grad_input_fused(gy2: torch.Tensor, p: PreparedQWeight) -> torch.Tensor:
    """dx = gy @ deq(W): [M, N] @ [N, K] -> [M, K], weight dequantized on the fly."""
    m, n = gy2.shape
    k = p.in_features
    bk = min(64, _step_k(p, 64))
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    bnr = 64
    dx = alloc((m, k), gy2.dtype, gy2.device)
    kw = dict(BITS=p.bits, BM=bm, BNR=bnr, BK=bk, UPCAST=interpreting() or gy2.dtype == torch.float32)
    if not interpreting():
        kw.update(num_warps=4 if bm <= 64 else 8, num_stages=3)
    _gemm_t_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        gy2, p.qweight, p.scales, p.zeros, dx, m, n, k, p.qweight.shape[1], p.n_groups, p.group_size,
        gy2.stride(0), dx.stride(0), **kw)
    return dx


# M thresholds for the dispatcher
GEMV_MAX_M = 4
LARGE_M = 65  # from here on, the fused GEMMs and dequantize-then-cuBLAS are timed once per shape
_CHOICE: dict = {}


def _time_once(fn, reps=3, trials=3, graph=True) -> float:
    """GPU time of ``reps`` calls, replayed from a CUDA graph so Python/launch overhead does not
    bias the choice (falls back to plain events where capture fails); the minimum over ``trials``
    replays, so one slow replay (clock ramp, a neighbour's traffic) does not flip a choice.
    ``graph=False``: plain events (the backward runs on autograd's worker thread, where no graph is
    captured; at training sizes launch overhead is negligible there)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    try:
        if not graph:
            raise RuntimeError("plain event timing requested")
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        for _ in range(trials):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
    except Exception:
        for _ in range(trials):
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
    return best


def _large_m_candidates(x2, p, bias):
    """(key, fn) for every large-M path: the canonical fused GEMM, dequantize-then-cuBLAS and the
    tensor-core in-loop-dequant configurations."""
    cands = [("gemm", lambda: gemm(x2, p, bias)),
             ("deq", lambda: torch.nn.functional.linear(x2, dequant(p, x2.dtype), bias))]
    return cands + _tc_candidates(x2, p, bias, _num_sms(x2.device))


def _large_m_path(x2, p, bias):
    """The path for M > 64: measured on first use per (M bucket, shape) (CUDA graph, min of 3
    replays), so never slower than dequantize-then-cuBLAS by more than timing noise. Under CUDA-graph
    capture (no timing possible) the heuristic is used: fused up to M=512. Returns the key."""
    m = x2.shape[0]
    bucket = 1 << (m - 1).bit_length()
    key = (bucket, p.out_features, p.in_features, p.bits, p.group_size, x2.dtype, x2.device)
    forced = OVERRIDE.get("large_m")
    if forced is not None:
        return forced
    if key in _CHOICE:
        return _CHOICE[key]
    if not _can_time(x2):
        return "gemm" if m <= 512 else "deq"
    best = (_time_once(lambda: torch.nn.functional.linear(x2, dequant(p, x2.dtype), bias)), "deq")
    ref = torch.nn.functional.linear(x2, dequant(p, x2.dtype), bias)
    for name, fn in _large_m_candidates(x2, p, bias):
        if name == "deq":
            continue
        t = _try_time(name, fn, ref=ref)
        if t < best[0]:
            best = (t, name)
    _CHOICE[key] = best[1]
    return best[1]


def _can_time(t: torch.Tensor) -> bool:
    """Whether candidates can be timed now (CUDA tensor, no graph being captured)."""
    return t.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


FAILED: dict = {}  # candidate -> "ExceptionType: message" for candidates that failed to compile / run


def _try_time(name, fn, reps=3, ref=None, graph=True) -> float:
    """_time_once, or inf (recorded in FAILED) when the candidate raises or, given ``ref`` (the
    output of dequantize-then-cuBLAS on the same inputs), disagrees with it (rel. error > 1e-2): a
    kernel that does not compile, or computes wrongly, on this GPU / triton version drops out of the
    choice instead of breaking the model."""
    try:
        if ref is not None:
            out = fn()
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()
            if not err <= 1e-2:
                FAILED[name] = f"rel. error {err:.3g} against dequantize-then-cuBLAS"
                return float("inf")
        return _time_once(fn, reps=reps, graph=graph)
    except Exception as e:  # noqa: BLE001 - any compile / launch error
        FAILED[name] = f"{type(e).__name__}: {str(e)[:200]}"
        return float("inf")


# GEMV candidates (K step, rows per program, warps), timed once per shape on first use
GEMV_CONFIGS = [(128, 16, 1, None), (256, 16, 1, None), (512, 16, 1, None), (256, 16, 1, 4), (256, 32, 2, 2),
                (512, 32, 4, 1), (256, 64, 4, 2)]  # (K step, rows per program, warps, split-K or auto)
_GEMV_CFG: dict = {}


def _gemv_tuned(x2, p, bias):
    key = (x2.shape[0], p.out_features, p.in_features, p.bits, p.group_size, x2.dtype, x2.device)
    cfg = _GEMV_CFG.get(key)
    if cfg is None:
        if x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing() or OVERRIDE.get("gemv"):
            return gemv(x2, p, bias)
        best = None
        for bk, bn, nw, sk in GEMV_CONFIGS:
            if bk < 32 // p.bits * 16:
                continue
            t = _time_once(lambda: gemv(x2, p, bias, bk=bk, bn=bn, num_warps=nw, split_k=sk), reps=5)
            if best is None or t < best[0]:
                best = (t, dict(bk=bk, bn=bn, num_warps=nw, split_k=sk))
        cfg = _GEMV_CFG[key] = best[1]
    return gemv(x2, p, bias, **cfg)


# M ranges of the K-sliced kernels (wq_sliced): CUDA-core GEMV up to SLICED_GEMV_MAX_M, tensor-core
# kernel up to SLICED_MMA_MAX_M (4-bit and lower, 16-word blocks)
SLICED_GEMV_MAX_M = 4
SLICED_MMA_MAX_M = 64
TC_MIN_M = 32  # from here on the in-loop-dequant tensor-core GEMM (wq_gemm_tc) is a candidate too


# Candidate configurations of the K-sliced kernels, timed once per (M, shape) on first use (through
# a CUDA graph, outside capture); the canonical kernels are candidates too, so the choice is never
# slower than before. (rows per program, warps, split-K target in programs per SM)
SLICED_GEMV_CONFIGS = [(32, 1, 8), (64, 2, 8), (32, 1, 16), (64, 2, 16)]
# ('mma8' = one joined dot per block, 4-bit; 'mma' = one dot per slot)
SLICED_MMA_CONFIGS = [("mma8", 128, 4, 2), ("mma8", 64, 4, 2), ("mma8", 128, 8, 2), ("mma8", 64, 4, 4),
                      ("mma", 128, 4, 2)]
_SLICED_CFG: dict = {}


def _sliced_candidates(x2, p, bias, sms):
    m = x2.shape[0]
    cands = []
    if m <= SLICED_GEMV_MAX_M and p.bkw:
        sl = sliced_copy(p)
        for bn, nw, tg in SLICED_GEMV_CONFIGS:
            cands.append((("gemv", bn, nw, tg), lambda bn=bn, nw=nw, tg=tg: wq_sliced.gemv(
                x2, sl, p.scales, p.zeros, p.bits, p.group_size, p.bkw, p.out_features, bias,
                bn=bn, num_warps=nw, target=tg, sms=sms)))
    elif m <= SLICED_MMA_MAX_M and p.bits <= 4 and p.bkw >= 8 and x2.dtype != torch.float32:
        sl = sliced_copy(p)
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        for kind, bn, nw, tg in SLICED_MMA_CONFIGS:
            if kind == "mma8" and p.bits == 4:
                cands.append(((kind, bn, nw, tg), lambda bn=bn, nw=nw, tg=tg: wq_sliced_mma.mma8(
                    x2, sl, p.scales, p.zeros, p.group_size, p.bkw, p.out_features, bias,
                    bn=bn, bm=bm, num_warps=nw, target=tg, sms=sms, upcast=interpreting())))
            elif kind == "mma" and p.bkw >= 16:
                cands.append(((kind, bn, nw, tg), lambda bn=bn, nw=nw, tg=tg: wq_sliced_mma.mma(
                    x2, sl, p.scales, p.zeros, p.bits, p.group_size, p.bkw, p.out_features, bias,
                    bn=bn, bm=bm, num_warps=nw, target=tg, sms=sms, upcast=interpreting())))
    if TC_MIN_M <= m <= SLICED_MMA_MAX_M:
        cands += _tc_candidates(x2, p, bias, sms)
    return cands


def _tc_candidates(x2, p, bias, sms):
    """In-loop-dequant tensor-core GEMM (``wq_gemm_tc``) configurations for this M, keyed ('tc', ...)."""
    m = x2.shape[0]
    if not wq_gemm_tc.applies(p.bits, x2.dtype) or m < TC_MIN_M:
        return []
    keys = [("tc",) + cfg for cfg in wq_gemm_tc.configs_for(m)]
    if wq_gemm_tc2.applies(p.bits, x2.dtype, p.in_features):
        keys += [("tc2",) + cfg for cfg in wq_gemm_tc2.configs_for(m)]
    return [(key, lambda key=key: run_path(key, x2, p, bias)) for key in keys]


def sliced_linear(x2, p: PreparedQWeight, bias=None):
    """The K-sliced path when it applies to this weight and M (and, on CUDA, when it measured faster
    than the canonical kernels for this shape), else None."""
    m = x2.shape[0]
    if m > SLICED_MMA_MAX_M or not (p.bkw or m >= TC_MIN_M):
        return None
    sms = _num_sms(x2.device)
    cands = _sliced_candidates(x2, p, bias, sms)
    if not cands:
        return None
    if x2.device.type != "cuda":  # interpreter: the first candidate
        return cands[0][1]()
    key = (m if m <= SLICED_GEMV_MAX_M else next_pow2(m), p.out_features, p.in_features, p.bits, p.group_size,
           x2.dtype, x2.device)
    cfg = OVERRIDE.get("sliced") or _SLICED_CFG.get(key)
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():
            return cands[0][1]()
        best = (_time_once(lambda: linear(x2, p, bias, sliced=False), reps=5), "canonical")
        ref = torch.nn.functional.linear(x2, dequant(p, x2.dtype), bias)
        for c, fn in cands:
            t = _try_time(c, fn, reps=5, ref=ref) if c[0] in ("tc", "tc2") else _time_once(fn, reps=5)
            if t < best[0]:
                best = (t, c)
        cfg = _SLICED_CFG[key] = best[1]
    if cfg == "canonical":
        return None
    return dict(cands)[cfg]() if cfg in dict(cands) else cands[0][1]()


def linear(x2: torch.Tensor, p: PreparedQWeight, bias=None, sliced: bool = True) -> torch.Tensor:
    """y = x2 @ deq(W)^T (+ bias) for a 2-D contiguous x2 (last dim = in_features)."""
    m = x2.shape[0]
    if m == 0:
        return x2.new_empty((0, p.out_features))
    if sliced and not OVERRIDE.get("no_sliced"):
        y = sliced_linear(x2, p, bias)
        if y is not None:
            return y
    if m <= GEMV_MAX_M:
        return _gemv_tuned(x2, p, bias)
    if m >= LARGE_M:
        return run_path(_large_m_path(x2, p, bias), x2, p, bias)
    return gemm(x2, p, bias)


def run_path(path, x2, p: PreparedQWeight, bias=None):
    """Run one large-M path by key: 'gemm', 'deq', ('tc', BM, BN, BK, warps, stages[, 'f32']) or
    ('tc2', BM, BN, BK, warps, stages)."""
    if path == "deq":
        return torch.nn.functional.linear(x2, dequant(p, x2.dtype), bias)
    if isinstance(path, tuple) and path[0] == "tc" and wq_gemm_tc.applies(p.bits, x2.dtype):
        bm, bn, bk, nw, ns = path[1:6]
        return wq_gemm_tc.linear(x2, p.qweight, p.scales, p.zeros, p.bits, p.group_size, p.out_features, bias,
                                 bm=bm, bn=bn, bk=bk, num_warps=nw, num_stages=ns, sms=_num_sms(x2.device),
                                 f32math="f32" in path[6:])
    if isinstance(path, tuple) and path[0] == "tc2" and wq_gemm_tc2.applies(p.bits, x2.dtype, p.in_features):
        bm, bn, bk, nw, ns = path[1:6]
        return wq_gemm_tc2.linear(x2, p.qweight, p.scales, p.zeros, p.group_size, p.out_features, bias, bm=bm,
                                  bn=bn, bk=bk, num_warps=nw, num_stages=ns, sms=_num_sms(x2.device))
    return gemm(x2, p, bias)
