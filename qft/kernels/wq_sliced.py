"""K-sliced re-layout of packed weights and the small-M kernels that read it (W{1,2,4,8}A16).

Idea
----
The canonical layout puts values ``8 kw .. 8 kw + 7`` of a row (4-bit) into word ``kw``, so a
kernel that decodes one *slot* (bit field) of many words at once gets activations at a stride.
At load (once, cached by ``ops.prepared``) each row is re-packed block by block: a block of
``KB = VPW * BKW`` values (``VPW = 32 // bits`` values per word, ``BKW`` words per row) puts value
``blk * KB + p * BKW + c`` into slot ``p`` of word ``blk * BKW + c``. Decoding slot ``p`` of a
``[BN, BKW]`` tile of words is then one elementwise op on the tile, and it pairs with the
*contiguous* activations ``x[blk * KB + p * BKW : ... + BKW]``. The tile is never reshaped or
joined (no layout conversions inside the loop). ``KB`` divides the group size (or K for
per-channel), so every block lies in one group. Rows are stored in groups of ``RG = 16``: the
``RG x BKW`` words of one row group and block are contiguous, and a group's blocks follow each
other, so each program streams contiguous memory (instead of 64-byte pieces of rows 4 KB apart).

Decode without a conversion instruction (``_slot_float``): the slot's bits are placed in the fp32
mantissa and OR-ed with the exponent of 1.0, giving ``f = 1 + q 2**(pos - 23)`` exactly. A slot at
bit ``P = p * bits`` keeps its place when ``P`` lies in the window ``[LOW, 23 - bits]`` (LOW = 8 for
4/8-bit, 10 for 1/2-bit: lower positions cost precision, since ``f x'`` carries ``x'`` and the
``x'`` sum is subtracted afterwards) and needs one LOP3 (mask + OR); the others are moved into the
window by a shift shared with every slot moved by the same distance (two shifts per word at most;
the exponent constant is a kernel argument, otherwise ptxas re-materialises the masks). The
different ``2**(pos - 23)`` are undone by pre-scaling the activations by ``2**(23 - pos)``
(exact) in a tiny pre-pass (``_xprep_kernel``), which also stores x as fp32 (no conversions in the
GEMV loop) and per-block sums ``sum x'`` and ``sum x`` for the correction: per row and block,
``sum_k (q_k - z) s x_k = s (sum_k f_k x'_k - sum_k x'_k - z sum_k x_k)``. Measured error against
an fp64 reference in an fp32 emulation at K = 8192 (no FMA): 5e-4 (4-bit), 3e-4 (2-bit), 5e-4 (1-bit), before the bf16
output rounding.

Kernels
-------
* ``_gemv_kernel`` (M <= 4): CUDA cores, one FFMA per element, per-thread accumulators
  ``[BN, BKW]`` reduced across threads once at the end; words, scales and zeros prefetched two
  blocks ahead in registers; split-K through fp32 atomics. About 3.1 SASS instructions per element
  (4-bit); W4 g128 M=1 on 8192x28672: 59 us on an H100, 2.7x over cuBLAS bf16 (BENCHMARKS.md).
* The tensor-core kernels for M up to 64 over the same layout are in ``wq_sliced_mma``.

OneBit (signs, ``y = h * ((x * g) @ sign(W)^T)``) is the 1-bit case with ``z = 1/2``, ``s = 2 h``
and ``g`` folded into the pre-pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import alloc



def block_words(bits: int, group_size: int, in_features: int, cap: int = 16) -> int:
    """BKW: words per row per block (power of two <= cap) with KB = BKW * 32 // bits dividing the
    group (and K); 0 when no such block exists (the caller then uses the canonical kernels)."""
    vpw = 32 // bits
    bkw = cap
    while bkw >= 1:
        kb = bkw * vpw
        if in_features % kb == 0 and group_size % kb == 0:
            return bkw
        bkw //= 2
    return 0


RG = 16  # rows per row group: a block of RG rows is stored contiguously (RG * BKW words)


def relayout(qweight: torch.Tensor, bits: int, in_features: int, bkw: int) -> torch.Tensor:
    """Canonical int32 [N, Kw] -> K-sliced, row-grouped int32 [ceil(N / RG) * RG, Kw].

    Within a block, value ``blk * KB + p * BKW + c`` of row n goes to slot p of word c (see the
    module docstring). Blocks are stored row group by row group: the RG x BKW words of rows
    ``RG g .. RG g + RG - 1``, block blk, are contiguous at word ``(g * nblk + blk) * RG * BKW``, so a
    program streams each of its row groups as one contiguous range of memory (rows padded with 0).
    """
    vpw = 32 // bits
    n, kw = qweight.shape
    nblk = kw // bkw
    npad = -(-n // RG) * RG
    mask = (1 << bits) - 1
    out = torch.zeros((npad, kw), dtype=torch.int32, device=qweight.device)
    rows = max(RG, ((1 << 25) // max(kw, 1)) // RG * RG)  # bound the temporaries (~32 M words at a time)
    for r0 in range(0, n, rows):
        w = qweight[r0:r0 + rows]
        r = w.shape[0]
        # values in canonical order: u[:, k] = slot k % vpw of word k // vpw
        u = torch.stack([(w >> (j * bits)) & mask for j in range(vpw)], dim=-1).reshape(r, -1)
        u = u.reshape(r, nblk, vpw, bkw)  # block-local order (p, c) -> word c, slot p
        acc = torch.zeros(r, nblk, bkw, dtype=torch.int64, device=w.device)
        for p in range(vpw):
            acc |= u[:, :, p, :].to(torch.int64) << (p * bits)
        acc = torch.where(acc >= (1 << 31), acc - (1 << 32), acc).to(torch.int32)
        rp = -(-r // RG) * RG
        if rp > r:
            acc = torch.cat([acc, acc.new_zeros(rp - r, nblk, bkw)])
        # [groups, RG, nblk, bkw] -> [groups, nblk, RG, bkw]
        acc = acc.reshape(rp // RG, RG, nblk, bkw).permute(0, 2, 1, 3).reshape(rp, kw)
        out[r0:r0 + rp] = acc
    return out


def unlayout(sliced: torch.Tensor, bits: int, n: int, bkw: int) -> torch.Tensor:
    """Inverse of :func:`relayout` (tests): K-sliced, row-grouped words -> canonical int32 [n, Kw]."""
    vpw = 32 // bits
    npad, kw = sliced.shape
    nblk = kw // bkw
    a = sliced.reshape(npad // RG, nblk, RG, bkw).permute(0, 2, 1, 3).reshape(npad, nblk, bkw)[:n]
    u = torch.stack([(a >> (p * bits)) & ((1 << bits) - 1) for p in range(vpw)], dim=2)  # [n, nblk, p, c]
    u = u.reshape(n, -1, vpw).to(torch.int64)  # canonical order: word k // vpw, slot k % vpw
    acc = torch.zeros(n, u.shape[1], dtype=torch.int64, device=sliced.device)
    for j in range(vpw):
        acc |= u[:, :, j] << (j * bits)
    return torch.where(acc >= (1 << 31), acc - (1 << 32), acc).to(torch.int32)


# --------------------------------------------------------------------------------------------
@triton.jit
def _slot_pos(p, BITS: tl.constexpr):
    """Mantissa position of slot p's lowest bit after decoding: slot p sits at P = p * BITS and is
    moved by a multiple d of the window width into the window [LOW, 23 - BITS]; all slots moved by
    the same d share one shift (at most two shifts per word)."""
    LOW: tl.constexpr = 8 if BITS >= 4 else 10  # lower costs precision (f x' - x' cancels)
    WD: tl.constexpr = 24 - BITS - LOW
    P = p * BITS
    d = ((P - LOW + 4 * WD) // WD - 4) * WD
    return P - d


@triton.jit
def _slot_float(wu, p: tl.constexpr, BITS: tl.constexpr, EXP):
    """uint32 words -> fp32 1 + q_p 2**(pos - 23) for slot p (exact): a mask-or, after a shift
    shared with the other slots of the same window."""
    LOW: tl.constexpr = 8 if BITS >= 4 else 10  # lower costs precision (f x' - x' cancels)
    WD: tl.constexpr = 24 - BITS - LOW
    P: tl.constexpr = p * BITS
    D: tl.constexpr = ((P - LOW + 4 * WD) // WD - 4) * WD
    M: tl.constexpr = (1 << BITS) - 1
    if D == 0:
        v = wu & (M << P)
    elif D < 0:
        v = (wu << (-D)) & (M << (P - D))
    else:
        v = (wu >> D) & (M << (P - D))
    return (v | EXP).to(tl.float32, bitcast=True)


@triton.jit
def _row_ptrs(qw_ptr, rn, rc, Kw, BKW: tl.constexpr):
    """Word pointers [BN, BKW] of block 0 in the row-grouped layout (block blk: + blk * RG * BKW)."""
    RG_: tl.constexpr = 16
    return qw_ptr + (rn[:, None] // RG_).to(tl.int64) * (RG_ * Kw) + (rn[:, None] % RG_) * BKW + rc[None, :]


@triton.jit
def _load_block(w_ptrs, s_ptrs, z_ptrs, blk, nmask, KB: tl.constexpr, BKW: tl.constexpr, GS):
    """Words [BN, BKW] of block blk and the scale / zero [BN] of its group (fp32)."""
    g = (blk * KB) // GS
    w = tl.load(w_ptrs + blk * (16 * BKW), mask=nmask[:, None], other=0)
    sc = tl.load(s_ptrs + g, mask=nmask, other=0.0).to(tl.float32)
    zp = tl.load(z_ptrs + g, mask=nmask, other=0.0).to(tl.float32)
    return w, sc, zp


@triton.jit
def _xprep_kernel(x_ptr, g_ptr, xp_ptr, xs_ptr, y_ptr, K, N, nblk, stride_xm, zchunk,
                  BITS: tl.constexpr, BKW: tl.constexpr, HAS_G: tl.constexpr, ZERO: tl.constexpr):
    """x [M, K] -> x' [M, K] fp32 (x * 2**(23 - pos(slot))) and per block (sum x', sum x); with ZERO
    also zero-fills the fp32 output y [M, N] that a split-K GEMV then accumulates into (saves a launch)."""
    blk = tl.program_id(0)
    m = tl.program_id(1)
    if ZERO:
        for z0 in range(blk * zchunk, tl.minimum(blk * zchunk + zchunk, N), 1024):
            zi = z0 + tl.arange(0, 1024)
            tl.store(y_ptr + m * N + zi, tl.zeros([1024], dtype=tl.float32),
                     mask=(zi < N) & (zi < blk * zchunk + zchunk))
    VPW: tl.constexpr = 32 // BITS
    p = tl.arange(0, VPW)
    c = tl.arange(0, BKW)
    k = blk * (VPW * BKW) + p[:, None] * BKW + c[None, :]
    x = tl.load(x_ptr + m * stride_xm + k).to(tl.float32)
    if HAS_G:
        x = x * tl.load(g_ptr + k).to(tl.float32)
    e = 23 - _slot_pos(p, BITS)
    sc = ((127 + e) << 23).to(tl.float32, bitcast=True)  # 2**e exactly
    xp = x * sc[:, None]
    tl.store(xp_ptr + m * K + k, xp)
    tl.store(xs_ptr + (m * nblk + blk) * 2, tl.sum(tl.sum(xp, 1), 0))
    tl.store(xs_ptr + (m * nblk + blk) * 2 + 1, tl.sum(tl.sum(x, 1), 0))


@triton.jit
def _gemv_kernel(xp_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 N, K, Kw, G, GS, nblk, stride_ym, blk_per_split, EXP,
                 BITS: tl.constexpr, BKW: tl.constexpr, BN: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    VPW: tl.constexpr = 32 // BITS
    KB: tl.constexpr = VPW * BKW
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rc = tl.arange(0, BKW)
    w_ptrs = _row_ptrs(qw_ptr, rn, rc, Kw, BKW)
    x_row = xp_ptr + pid_m * K + rc
    xs_row = xs_ptr + pid_m * nblk * 2
    b_lo = pid_k * blk_per_split
    b_hi = tl.minimum(b_lo + blk_per_split, nblk)
    acc = tl.zeros([BN, BKW], dtype=tl.float32)
    corr = tl.zeros([BN], dtype=tl.float32)
    xs1 = 0.0
    xs0 = 0.0
    s_ptrs = s_ptr + rn * G
    z_ptrs = z_ptr + rn * G
    # register prefetch two blocks ahead (words, scales, zeros): a block's loads are issued two
    # iterations before its math, so each warp keeps ~2 blocks of weights in flight
    w0, s0, z0 = _load_block(w_ptrs, s_ptrs, z_ptrs, b_lo, nmask, KB, BKW, GS)
    w1, s1, z1 = _load_block(w_ptrs, s_ptrs, z_ptrs, tl.minimum(b_lo + 1, b_hi - 1), nmask, KB, BKW, GS)
    for blk in range(b_lo, b_hi):
        w2, s2, z2 = _load_block(w_ptrs, s_ptrs, z_ptrs, tl.minimum(blk + 2, b_hi - 1), nmask, KB, BKW, GS)
        wu = w0.to(tl.uint32, bitcast=True)
        part = _slot_float(wu, 0, BITS, EXP) * tl.load(x_row + blk * KB)[None, :]
        for p in tl.static_range(1, VPW):
            xv = tl.load(x_row + blk * KB + p * BKW)
            part += _slot_float(wu, p, BITS, EXP) * xv[None, :]
        if PER_CHANNEL:
            acc += part
            xs1 += tl.load(xs_row + blk * 2)
            xs0 += tl.load(xs_row + blk * 2 + 1)
        else:
            acc += part * s0[:, None]
            corr += s0 * (tl.load(xs_row + blk * 2) + z0 * tl.load(xs_row + blk * 2 + 1))
        w0, s0, z0 = w1, s1, z1
        w1, s1, z1 = w2, s2, z2
    if PER_CHANNEL:
        s = tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        out = s * (tl.sum(acc, axis=1) - xs1 - z * xs0)
    else:
        out = tl.sum(acc, axis=1) - corr
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    optr = y_ptr + pid_m * stride_ym + rn
    if ATOMIC:
        tl.atomic_add(optr, out, mask=nmask)
    else:
        tl.store(optr, out.to(y_ptr.dtype.element_ty), mask=nmask)


# --------------------------------------------------------------------------------------------
def _splits(tiles: int, nblk: int, sms: int, target: int, cap: int = 16) -> int:
    sk = 1
    while tiles * sk < target * sms and sk < cap and nblk // (sk * 2) >= 4:
        sk *= 2
    return sk


def prep_x(x2: torch.Tensor, bits: int, bkw: int, g: torch.Tensor | None = None, y: torch.Tensor | None = None):
    """Pre-pass: (x', per-block sums, nblk); zero-fills ``y`` (fp32 [M, N], contiguous) when given."""
    m, k = x2.shape
    nblk = k // (bkw * 32 // bits)
    xp = torch.empty((m, k), device=x2.device, dtype=torch.float32)
    xs = torch.empty((m, nblk, 2), device=x2.device, dtype=torch.float32)
    n = y.shape[1] if y is not None else 0
    _xprep_kernel[(nblk, m)](x2, g if g is not None else x2, xp, xs, y if y is not None else xp, k, n, nblk,
                             x2.stride(0), triton.cdiv(max(n, 1), nblk),
                             BITS=bits, BKW=bkw, HAS_G=g is not None, ZERO=y is not None)
    return xp, xs, nblk


def gemv(x2, qw, scales, zeros, bits, group_size, bkw, n, bias=None, *, g=None, out_dtype=None, bn=None,
         num_warps=None, split_k=None, target=8, sms=132):
    """y[M, N] for small M from K-sliced words ``qw`` (see :func:`relayout`)."""
    m, k = x2.shape
    nblk = k // (bkw * 32 // bits)
    bn = bn or 32
    nw = num_warps or 1
    tiles = triton.cdiv(n, bn) * m
    sk = split_k or _splits(tiles, nblk, sms, target)
    per = triton.cdiv(nblk, sk)
    sk = triton.cdiv(nblk, per)
    atomic = sk > 1
    odt = out_dtype or x2.dtype
    y = alloc((m, n), torch.float32, x2.device) if atomic else alloc((m, n), odt, x2.device)
    xp, xs, nblk = prep_x(x2, bits, bkw, g, y if atomic else None)
    per_ch = scales.shape[1] == 1
    _gemv_kernel[(triton.cdiv(n, bn), m, sk)](
        xp, xs, qw, scales, zeros, bias if bias is not None else scales, y,
        n, k, qw.shape[1], scales.shape[1], group_size, nblk, y.stride(0), per, 0x3F800000,
        BITS=bits, BKW=bkw, BN=bn, PER_CHANNEL=per_ch, HAS_BIAS=bias is not None, ATOMIC=atomic,
        num_warps=nw)
    return y.to(odt) if atomic else y
