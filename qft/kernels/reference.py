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
    "quantize_rtn",
    "quantize_per_token_int8",
    "quantize_weight_int8",
    "int8_linear",
    "kivi_quantize_keys",
    "kivi_quantize_values",
    "kivi_dequant_keys",
    "kivi_dequant_values",
    "kv_decode_attention",
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


# ------------------------------------------------------------------------------------------------
# Additions (kernels beyond weight-only / OneBit). Everything below is new API; nothing above
# changed.
# ------------------------------------------------------------------------------------------------

def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False):
    """Round-to-nearest quantization of W [N, K] into the canonical layout (test / bench helper).

    Returns (qweight int32 [N, ceil(K*bits/32)], scales float32 [N, G], zeros int32 [N, G]).
    group_size None means per output channel. Symmetric uses z = 2**(bits-1).
    """
    n, k = w.shape
    gs = k if group_size is None else group_size
    if k % gs:
        raise ValueError(f"group_size={gs} does not divide in_features={k}")
    wg = w.float().reshape(n, k // gs, gs)
    qmax = (1 << bits) - 1
    if symmetric:
        z = torch.full(wg.shape[:2], 1 << (bits - 1), dtype=torch.float32, device=w.device)
        s = wg.abs().amax(-1) / max(1, (1 << (bits - 1)) - 1) if bits > 1 else wg.abs().mean(-1)
        s = s.clamp(min=1e-8)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        z = torch.round(-lo / s).clamp(0, qmax)
    u = torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, qmax)
    return pack_int32(u.reshape(n, k).to(torch.uint8), bits), s, z.to(torch.int32)


def quantize_per_token_int8(x: torch.Tensor):
    """Per-row (token) dynamic symmetric int8: x [M, K] -> (q int8 [M, K], scale float32 [M]).

    scale = max|x_row| / 127 (at least 1e-8 / 127); q = clamp(floor(x * 127/amax + 0.5), -127, 127).
    """
    xf = x.float()
    amax = xf.abs().amax(-1).clamp(min=1e-8)
    q = torch.floor(xf * (127.0 / amax).unsqueeze(-1) + 0.5).clamp(-127, 127).to(torch.int8)
    return q, amax / 127.0


def quantize_weight_int8(w: torch.Tensor):
    """Per-output-channel symmetric int8 for W8A8: W [N, K] -> (int8 [N, K], scales float32 [N])."""
    s = w.float().abs().amax(-1).clamp(min=1e-8) / 127.0
    q = torch.round(w.float() / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, s


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: y = (q(x) @ W_int8^T) * sx[m] * sw[n] (+ bias), q per-token dynamic int8; x.dtype out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, sx = quantize_per_token_int8(x2)
    acc = q.double() @ w_int8.double().t()  # exact integer accumulation
    y = acc * sx.double().unsqueeze(-1) * w_scales.double().unsqueeze(0)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*shape[:-1], w_int8.shape[0])


def _minmax_quant(x: torch.Tensor, dim: int, bits: int):
    """Asymmetric min-max quantization along `dim` (KIVI). Scale / min are rounded to x.dtype first
    and the integers are computed from the rounded values, so dequant(q) uses what quant used."""
    qmax = (1 << bits) - 1
    xf = x.float()
    mn = xf.amin(dim, keepdim=True)
    s = ((xf.amax(dim, keepdim=True) - mn) / qmax).clamp(min=1e-6)
    mn_r, s_r = mn.to(x.dtype), s.to(x.dtype)
    q = torch.floor((xf - mn_r.float()) / s_r.float() + 0.5).clamp(0, qmax).to(torch.uint8)
    return q, s_r, mn_r


def kivi_quantize_keys(k: torch.Tensor, bits: int, group: int):
    """KIVI keys: per channel, over groups of `group` tokens. k [..., T, D], T % group == 0.

    Returns (packed int32 [..., T, D*bits/32] packed along D, scale [..., T/group, D], min same).
    Dequant: k = q * scale + min.
    """
    *lead, t, d = k.shape
    if t % group:
        raise ValueError(f"key block of {t} tokens is not a multiple of group={group}")
    kg = k.reshape(*lead, t // group, group, d)
    q, s, mn = _minmax_quant(kg, -2, bits)
    packed = pack_int32(q.reshape(-1, d), bits).reshape(*lead, t, -1)
    return packed, s.squeeze(-2), mn.squeeze(-2)


def kivi_quantize_values(v: torch.Tensor, bits: int, group: int):
    """KIVI values: per token, over groups of `group` channels. v [..., T, D], D % group == 0.

    Returns (packed int32 [..., T, D*bits/32], scale [..., T, D/group], min same).
    """
    *lead, t, d = v.shape
    if d % group:
        raise ValueError(f"head_dim={d} is not a multiple of group={group}")
    vg = v.reshape(*lead, t, d // group, group)
    q, s, mn = _minmax_quant(vg, -1, bits)
    packed = pack_int32(q.reshape(-1, d), bits).reshape(*lead, t, -1)
    return packed, s.squeeze(-1), mn.squeeze(-1)


def kivi_dequant_keys(packed, scale, mn, bits: int, group: int, head_dim: int):
    *lead, t, w = packed.shape
    q = unpack_int32(packed.reshape(-1, w), bits, head_dim).float().reshape(*lead, t // group, group, head_dim)
    return (q * scale.float().unsqueeze(-2) + mn.float().unsqueeze(-2)).reshape(*lead, t, head_dim)


def kivi_dequant_values(packed, scale, mn, bits: int, group: int, head_dim: int):
    *lead, t, w = packed.shape
    q = unpack_int32(packed.reshape(-1, w), bits, head_dim).float().reshape(*lead, t, head_dim // group, group)
    return (q * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).reshape(*lead, t, head_dim)


def kv_decode_attention(q: torch.Tensor, kq, k_scale, k_min, vq, v_scale, v_min,
                        k_res: torch.Tensor, v_res: torch.Tensor, bits: int, group: int,
                        sm_scale: float | None = None) -> torch.Tensor:
    """One decode step of attention over a KIVI cache.

    q [B, Hq, D]; quantized part kq/vq [B, Hkv, Tq, D*bits/32] with k_scale/k_min
    [B, Hkv, Tq/group, D] and v_scale/v_min [B, Hkv, Tq, D/group]; full-precision recent
    window k_res/v_res [B, Hkv, R, D] (R may be 0). GQA when Hq is a multiple of Hkv.
    Returns [B, Hq, D] in q.dtype (softmax in fp32).
    """
    b, hq, d = q.shape
    hkv = kq.shape[1]
    keys = torch.cat([kivi_dequant_keys(kq, k_scale, k_min, bits, group, d), k_res.float()], dim=2)
    vals = torch.cat([kivi_dequant_values(vq, v_scale, v_min, bits, group, d), v_res.float()], dim=2)
    rep = hq // hkv
    keys = keys.repeat_interleave(rep, dim=1)
    vals = vals.repeat_interleave(rep, dim=1)
    scale = sm_scale if sm_scale is not None else d ** -0.5
    att = torch.einsum("bhd,bhtd->bht", q.float(), keys) * scale
    p = torch.softmax(att, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, vals).to(q.dtype)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_max=1.0,
                      clip_min=None, scale=None, zero=None, out_dtype=torch.bfloat16):
    """Group-wise min-max fake quantization of W [N, K] for QAT: (Q(W) [N, K] out_dtype, scale, zero
    [N, G] float32). Asymmetric: [min(w, 0) * clip_min, max(w, 0) * clip_max] onto [0, 2**bits - 1];
    symmetric: zero 2**(bits-1), scale 2 * absmax * clip_max / (2**bits - 1). Given ``scale`` / ``zero``
    are used as they are. Same float32 operations as ``qft.nn.quant.minmax_qparams`` + ``fake_quant``."""
    n, k = w.shape
    maxq = 2 ** bits - 1
    g = w.float().reshape(n, k // group_size, group_size)
    clip_min = clip_max if clip_min is None else clip_min
    if scale is not None:
        s, z = scale.float(), zero.float()
    elif symmetric:
        amax2 = 2 * (g.abs().amax(-1) * clip_max)
        s = (amax2 / torch.full_like(amax2, float(maxq))).clamp_min(1e-8)  # IEEE division on CUDA too
        z = torch.full_like(s, float(2 ** (bits - 1)))
    else:
        wmax = g.amax(-1).clamp_min(0) * clip_max
        wmin = g.amin(-1).clamp_max(0) * clip_min
        s = ((wmax - wmin) / torch.full_like(wmax, float(maxq))).clamp_min(1e-8)  # IEEE on CUDA too
        z = torch.clamp(torch.round(-wmin / s), 0, maxq)
    q = torch.div(g, s.unsqueeze(-1)).round_().add_(z.unsqueeze(-1)).clamp_(0, maxq)
    return q.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1)).reshape(n, k).to(out_dtype), s, z


def fake_quant_weight_grad(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grad_w: torch.Tensor,
                           bits: int, group_size: int, out_dtype=torch.bfloat16):
    """Backward of :func:`fake_quant_weight` with the straight-through estimator: (Q(W) [N, K] out_dtype,
    grad_w float32 zeroed where the code was clamped), recomputed from W and the forward's scale / zero."""
    n, k = w.shape
    maxq = 2 ** bits - 1
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.div(w.float().reshape(n, k // group_size, group_size), s).round_().add_(z)
    inside = (q >= 0).logical_and_(q <= maxq).reshape(n, k)
    wq = q.clamp_(0, maxq).sub_(z).mul_(s).reshape(n, k).to(out_dtype)
    return wq, torch.where(inside, grad_w.float(), 0.0)
