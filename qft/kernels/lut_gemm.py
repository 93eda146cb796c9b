"""LUT-GEMM: matmul with binary-coded quantized (BCQ) weights through lookup tables.

Paper: Park et al., "LUT-GEMM: Quantized Matrix Multiplication based on LUTs for Efficient
Inference in Large-Scale Generative Language Models" (ICLR 2024). A BCQ weight is a sum of q
scaled binary matrices plus an optional offset, per group of ``group_size`` input columns:

    W[n, k] = sum_i alpha[i, n, g(k)] * B_i[n, k] + offset[n, g(k)],   B_i in {-1, +1}

so y[n] = sum_g sum_i alpha[i, n, g] * (sum_{k in g} B_i[n, k] x[k]) + offset[n, g] * sum_{k in g} x[k].
The inner sums of +-x over 8 consecutive inputs take only 256 values: LUT-GEMM builds that table
once per input vector (``_lut_build_kernel``: [M, ceil(K/8), 256]) and then every byte of every
binary plane is one table lookup instead of 8 multiply-adds (``_lut_gemv_kernel``); the group's
x-sum for the offset is the table entry 255 (all +1).

Layout (what lives on disk, shared with ``qft.nn.lut.BCQLinear``): ``planes`` int32 [q, N, ceil(K/32)]
in qft's canonical 1-bit packing (``reference.pack_signs``: bit 1 = +1, element k in bit k % 32 of
word k // 32, so byte b of word w covers inputs 32w + 8b .. 32w + 8b + 7), ``alpha`` [q, N, G],
``offset`` [N, G] or None.

The torch reference (``bcq_dequant`` + ``bcq_linear_ref``) is the CPU path and the test oracle;
the Triton path needs ``group_size % 32 == 0`` (whole words per group) and falls back otherwise.
Simplified: one program per (output block, input row), so it is a GEMV kernel (decode-sized M);
the table lives in global memory (L2-resident at these sizes), not shared memory; no torch custom
op registration (it is called eagerly by ``BCQLinear``).
"""

from __future__ import annotations

import math

import torch

from .reference import unpack_int32

try:  # the reference must import without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["bcq_dequant", "bcq_linear_ref", "bcq_linear_triton", "bcq_linear"]


def bcq_dequant(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, group_size: int,
                in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense W [N, K] from BCQ planes int32 [q, N, W], alpha [q, N, G], offset [N, G] | None."""
    q, n, kw = planes.shape
    k = in_features
    signs = unpack_int32(planes.reshape(q * n, kw), 1, k).float().reshape(q, n, k) * 2 - 1
    w = (signs * alpha.float().repeat_interleave(group_size, -1)).sum(0)
    if offset is not None:
        w = w + offset.float().repeat_interleave(group_size, -1)
    return w.to(dtype)


def bcq_linear_ref(x, planes, alpha, offset, group_size, in_features, bias=None):
    """y = x @ W^T (+ bias) with the dense dequantized BCQ weight, in x's dtype."""
    w = bcq_dequant(planes, alpha, offset, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


if triton is not None:
    @triton.jit
    def _lut_build_kernel(x_ptr, lut_ptr, K, C, stride_xm, BC: tl.constexpr):
        pid_c = tl.program_id(0)
        m = tl.program_id(1)
        rc = pid_c * BC + tl.arange(0, BC)
        j = tl.arange(0, 8)
        v = tl.arange(0, 256)
        xk = rc[:, None] * 8 + j[None, :]
        xv = tl.load(x_ptr + m * stride_xm + xk, mask=(rc[:, None] < C) & (xk < K), other=0.0).to(tl.float32)
        sgn = ((v[None, :] >> j[:, None]) & 1).to(tl.float32) * 2.0 - 1.0  # [8, 256]
        lut = tl.sum(xv[:, :, None] * sgn[None, :, :], axis=1)  # [BC, 256]
        tl.store(lut_ptr + (m * C + rc[:, None]).to(tl.int64) * 256 + v[None, :], lut, mask=rc[:, None] < C)

    @triton.jit
    def _lut_gemv_kernel(lut_ptr, w_ptr, a_ptr, o_ptr, b_ptr, y_ptr, N, Kw, C, G, WPG, stride_ym,
                         Q: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
                         HAS_OFF: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        rw = tl.arange(0, BW)
        rcc = tl.arange(0, BC)
        lut_m = lut_ptr + m.to(tl.int64) * C * 256
        acc = tl.zeros([BN], dtype=tl.float32)
        for g in range(0, G):
            for i in tl.static_range(Q):
                part = tl.zeros([BN], dtype=tl.float32)
                plane = w_ptr + i * N * Kw + rn[:, None].to(tl.int64) * Kw
                for w0 in range(0, WPG, BW):
                    wl = w0 + rw
                    wi = g * WPG + wl
                    wm = nmask[:, None] & (wl[None, :] < WPG)
                    word = tl.load(plane + wi[None, :], mask=wm, other=0)
                    for b in tl.static_range(4):
                        byte = (word >> (8 * b)) & 255
                        c = wi * 4 + b
                        val = tl.load(lut_m + c[None, :] * 256 + byte, mask=wm & (c[None, :] < C), other=0.0)
                        part += tl.sum(val, axis=1)
                alpha = tl.load(a_ptr + i * N * G + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
                acc += alpha * part
            if HAS_OFF:
                xs = tl.zeros([BC], dtype=tl.float32)
                for c0 in range(0, WPG * 4, BC):
                    cl = c0 + rcc
                    cc = g * WPG * 4 + cl
                    xs += tl.load(lut_m + cc * 256 + 255, mask=(cl < WPG * 4) & (cc < C), other=0.0)
                off = tl.load(o_ptr + rn * G + g, mask=nmask, other=0.0).to(tl.float32)
                acc += off * tl.sum(xs, axis=0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def bcq_linear_triton(x, planes, alpha, offset, group_size, in_features, bias=None, bn: int = 32, bw: int = 4):
    """The LUT-GEMM Triton path (CUDA, or CPU under TRITON_INTERPRET=1); group_size % 32 == 0."""
    if triton is None:
        raise RuntimeError("bcq_linear_triton needs triton")
    if group_size % 32 or in_features % group_size:
        raise ValueError(f"LUT-GEMM kernel needs group_size % 32 == 0 dividing in_features; got "
                         f"group_size={group_size}, in_features={in_features}")
    q, n, kw = planes.shape
    shape = x.shape
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    c = math.ceil(in_features / 8)
    g = in_features // group_size
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        lut = torch.empty(m, c, 256, dtype=torch.float32, device=x.device)
        _lut_build_kernel[(triton.cdiv(c, 16), m)](x2, lut, in_features, c, x2.stride(0), BC=16)
        a = alpha.contiguous()
        o = offset.contiguous() if offset is not None else a
        b = bias.contiguous() if bias is not None else a
        _lut_gemv_kernel[(triton.cdiv(n, bn), m)](lut, planes.contiguous(), a, o, b, y, n, kw, c, g, group_size // 32,
                                                  y.stride(0), Q=q, BN=bn, BW=bw, BC=16,
                                                  HAS_OFF=offset is not None, HAS_BIAS=bias is not None)
    return y.reshape(*shape[:-1], n)


LUT_MAX_M = 16  # above this many input rows the dense dequantize + matmul is faster (tensor cores)


def bcq_linear(x, planes, alpha, offset, group_size, in_features, bias=None):
    """BCQ linear: Triton LUT-GEMM where the backend allows (see ``qft.kernels.backend``) and the
    input has at most ``LUT_MAX_M`` rows (decode); otherwise the reference (dequantize, matmul)."""
    from . import backend
    m = x.numel() // max(in_features, 1)
    if triton is None or group_size % 32 or m > LUT_MAX_M or backend(x.device) == "torch":
        return bcq_linear_ref(x, planes, alpha, offset, group_size, in_features, bias)
    return bcq_linear_triton(x, planes, alpha, offset, group_size, in_features, bias)
