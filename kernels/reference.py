"""Torch reference implementations of every qft kernel: the CPU fallback and the test oracle.

The canonical packed layout (shared with compressed-tensors ``pack-quantized``):

* A weight W of shape [N, K] (out_features, in_features) is quantized to unsigned integers
  u in [0, 2**bits) with per-group scales s and integer zero points z, both [N, G] where
  G = K // group_size (group_size = K for per-channel). Dequantization: W = (u - z) * s.
  Symmetric quantization is the special case z = 2**(bits-1).
* The integers are packed densely along K into int32 words, row by row: element k of a row
  occupies bits [k*bits, (k+1)*bits) of the row's bit stream, and bit j of the stream is
  bit (j % 32) of word j // 32 (little-endian). Values may straddle two words (3, 5, 6, 7
  bits). A row takes ceil(K * bits / 32) words.

Kernels are free to re-layout at load time; this layout is what lives on disk.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "packed_cols",
    "pack_int32",
    "unpack_int32",
    "dequant",
    "qlinear",
    "pack_signs",
    "unpack_signs",
    "onebit_linear",
]


def packed_cols(k: int, bits: int) -> int:
    """Number of int32 words that hold ``k`` values of ``bits`` bits."""
    return math.ceil(k * bits / 32)


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers u [R, K] (any int dtype, values in [0, 2**bits)) into int32 [R, W].

    Dense little-endian bit stream along the last dimension; see the module docstring.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; allowed: 1..8")
    if u.dim() != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(u.shape)}")
    rows, k = u.shape
    v = u.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]")
    kp = math.ceil(k / 32) * 32  # 32 values take exactly `bits` words
    if kp > k:
        v = torch.nn.functional.pad(v, (0, kp - k))
    v = v.view(rows, kp // 32, 32)
    pos = torch.arange(32, device=u.device) * bits
    word, off = pos // 32, pos % 32
    out = torch.zeros(rows, kp // 32, bits, dtype=torch.int64, device=u.device)
    out.scatter_add_(2, word.expand_as(v), (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32
    if bool(spill.any()):
        idx = (word[spill] + 1).expand(rows, kp // 32, -1)
        out.scatter_add_(2, idx, v[..., spill] >> (32 - off[spill]))
    out = out.view(rows, -1)[:, : packed_cols(k, bits)]
    # reinterpret the low 32 bits as a signed int32
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)
    return out.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 [R, W] -> uint8 [R, k]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; allowed: 1..8")
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    rows, words = packed.shape
    if words != packed_cols(k, bits):
        raise ValueError(f"packed width {words} does not match k={k} at {bits} bits "
                         f"(expected {packed_cols(k, bits)} words)")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(k, device=packed.device) * bits
    word, off = pos // 32, pos % 32
    lo = p[:, word] >> off
    nxt = torch.clamp(word + 1, max=words - 1)
    hi = p[:, nxt] << (32 - off)
    spill = (off + bits > 32)
    val = torch.where(spill, lo | hi, lo) & ((1 << bits) - 1)
    return val.to(torch.uint8)


def dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
            group_size: int, in_features: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed int32 [N, W] + scales/zeros [N, G] -> dense weight [N, K] in ``dtype`` (default scales')."""
    u = unpack_int32(qweight, bits, in_features)
    n, k = u.shape
    g = k // group_size
    w = (u.view(n, g, group_size).float() - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.view(n, k).to(dtype or scales.dtype)


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias, computed in x's dtype."""
    w = dequant(qweight, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """sign bits of W [N, K] (1 where w >= 0, i.e. sign +1) packed 32 per int32 along K."""
    return pack_int32((w >= 0).to(torch.uint8), 1)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """int32 [N, ceil(K/32)] -> +-1 matrix [N, K]."""
    return unpack_int32(packed, 1, in_features).to(dtype) * 2 - 1


def onebit_linear(x: torch.Tensor, packed_signs: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                  in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """OneBit sign-value layer: y = ((x * g) @ sign(W)^T) * h (+ bias). g: [K], h: [N]."""
    s = unpack_signs(packed_signs, in_features, dtype=x.dtype)
    y = torch.nn.functional.linear(x * g.to(x.dtype), s) * h.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
