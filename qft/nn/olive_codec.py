"""OliVe outlier-victim pair (OVP) encoding and its linear layer (Guo et al., ISCA 2023, arXiv:2304.07493).

Values are taken in adjacent pairs (channels 2i, 2i+1). A *normal* value is a signed integer in
[-nmax, nmax] (nmax = 2^(bits-1) - 1: 7 at 4 bits, 127 at 8 bits), two's complement, so one code
is free: 2^(bits-1) (-8 / -128), the **identifier**. A value whose magnitude rounds beyond nmax is
an **outlier**; its neighbour in the pair becomes its **victim**: the victim is pruned to zero and
its slot holds the identifier, while the outlier's slot holds an *abfloat* code: sign bit plus a
(bits-1)-bit magnitude index into an FP level set shifted above the normal range (adaptive bias):

* 4 bits: e2m1 normals x 8 = {8, 12, 16, 24, 32, 48, 64};
* 8 bits: e4m3 normals x 128 = {128, 144, ..., 1.75 * 2^22}.

Index 0 (float zero) is never used by an outlier, so a pair never holds two identifiers. If both
values of a pair are outliers, the larger is kept and the other is the victim. Decoding needs only
the pair: the slot next to an identifier is an abfloat, everything else is an integer. At 4 bits a
pair is exactly one byte, so memory stays aligned (the point of OliVe's hardware design).

:class:`OliVeLinear` stores OVP-encoded weights (per-output-channel scale) and decodes them in the
forward; its input is OVP fake-quantized with a static per-tensor scale. Native-format hooks included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qft.nn.mixed import ExportMixin

__all__ = ["outlier_levels", "ovp_encode", "ovp_decode", "ovp_qdq", "pack_pairs", "unpack_pairs", "OliVeLinear"]

BITS = (4, 8)


def _check(bits):
    if bits not in BITS:
        raise ValueError(f"OliVe bits={bits!r} is not valid; allowed: {BITS}")


def outlier_levels(bits: int, device=None) -> torch.Tensor:
    """Magnitudes [2^(bits-1)] of the abfloat outlier codes; index 0 is unused (0). Index i >= 1 is
    the normal float (1 + m / 2^M) 2^e with e = (i-1) // 2^M, m = (i-1) % 2^M (M = 1 mantissa bit at
    4 bits: e2m1; M = 3 at 8 bits: e4m3), times nmax + 1, the adaptive bias that puts the smallest
    outlier right above the normal integer range."""
    _check(bits)
    mbits = 1 if bits == 4 else 3
    i = torch.arange(1, 2 ** (bits - 1), dtype=torch.float64)
    e, m = torch.div(i - 1, 2 ** mbits, rounding_mode="floor"), torch.remainder(i - 1, 2 ** mbits)
    lv = (1 + m / 2 ** mbits) * torch.pow(2.0, e) * 2 ** (bits - 1)
    return torch.cat([torch.zeros(1, dtype=torch.float64), lv]).float().to(device)


def _outlier_index(mag: torch.Tensor, bits: int) -> torch.Tensor:
    lv = outlier_levels(bits, mag.device)[1:]
    mids = (lv[1:] + lv[:-1]) / 2
    return torch.bucketize(mag.contiguous(), mids) + 1


def ovp_encode(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Codes uint8 [..., K] (K even) of x already divided by its scale; see the module docstring."""
    _check(bits)
    if x.shape[-1] % 2:
        raise ValueError(f"OliVe pairs adjacent channels: the last dimension ({x.shape[-1]}) must be even")
    nmax, ident, mask = 2 ** (bits - 1) - 1, 2 ** (bits - 1), 2 ** bits - 1
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    normal = torch.round(xf).clamp(-nmax, nmax).to(torch.int32) & mask
    na, nb = normal[..., 0::2], normal[..., 1::2]
    out = xf.abs() > nmax + 0.5
    pair_out = out[..., 0::2] | out[..., 1::2]
    b_wins = b.abs() > a.abs()
    v = torch.where(b_wins, b, a)
    ocode = ((v < 0).to(torch.int32) << (bits - 1)) | _outlier_index(v.abs(), bits).to(torch.int32)
    ident_t = torch.full_like(ocode, ident)
    ca = torch.where(pair_out, torch.where(b_wins, ident_t, ocode), na)
    cb = torch.where(pair_out, torch.where(b_wins, ocode, ident_t), nb)
    return torch.stack([ca, cb], -1).reshape(x.shape).to(torch.uint8)


def ovp_decode(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Values (in scale units, float32) of OVP codes [..., K]."""
    _check(bits)
    half, mask = 2 ** (bits - 1), 2 ** bits - 1
    c = codes.to(torch.int32) & mask
    normal = torch.where(c >= half, c - 2 ** bits, c).float()
    lv = outlier_levels(bits, codes.device)
    outl = lv[c & (half - 1)] * (1 - 2 * (c >> (bits - 1))).float()
    ca, cb = c[..., 0::2], c[..., 1::2]
    ia, ib = ca == half, cb == half
    va = torch.where(ia, 0.0, torch.where(ib, outl[..., 0::2], normal[..., 0::2]))
    vb = torch.where(ib, 0.0, torch.where(ia, outl[..., 1::2], normal[..., 1::2]))
    return torch.stack([va, vb], -1).reshape(codes.shape)


def ovp_qdq(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Fake quant through the OVP code (straight-through gradient); ``scale`` broadcasts against x."""
    out = (ovp_decode(ovp_encode(x / scale, bits), bits) * scale).to(x.dtype)
    return (out - x).detach() + x if x.requires_grad else out


def pack_pairs(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """4-bit codes: one byte per pair (first value in the low nibble); 8-bit codes are left as they are."""
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_pairs(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class OliVeLinear(ExportMixin, nn.Module):
    """OVP-encoded weights (per output channel scale) x OVP fake-quantized inputs (static scale)."""

    qft_type = "olive_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, w_bits: int = 4,
                 act_bits: int | None = 8, dtype=torch.float32, device=None):
        super().__init__()
        _check(w_bits)
        if act_bits is not None:
            _check(act_bits)
        if in_features % 2:
            raise ValueError(f"OliVeLinear: in_features={in_features} must be even (pairs of channels)")
        self.in_features, self.out_features, self.w_bits, self.act_bits = in_features, out_features, w_bits, act_bits
        cols = in_features // 2 if w_bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("wscale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device) if act_bits else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self._cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, wscale: torch.Tensor, w_bits: int = 4, act_bits: int | None = 8,
                    act_scale: float | None = None) -> "OliVeLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w_bits, act_bits, w.dtype, w.device)
        with torch.no_grad():
            m.qweight.copy_(pack_pairs(ovp_encode(w.float() / wscale.float().unsqueeze(1), w_bits), w_bits))
            m.wscale.copy_(wscale.float())
            if act_bits:
                m.act_scale.fill_(float(act_scale if act_scale is not None else 1.0))
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        key = (self.qweight.data_ptr(), self.qweight._version, self.wscale._version, dtype)
        if self._cache is None or self._cache[0] != key:
            w = ovp_decode(unpack_pairs(self.qweight, self.w_bits), self.w_bits) * self.wscale.unsqueeze(1)
            self._cache = (key, w.to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = ovp_qdq(x, self.act_scale.to(x.device), self.act_bits)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def _from_config(cls, c: dict, dtype) -> "OliVeLinear":
        return cls(c["in_features"], c["out_features"], c["bias"], c["w_bits"], c["act_bits"], dtype=dtype)

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "w_bits": self.w_bits, "act_bits": self.act_bits}

    def bits_per_weight(self) -> float:
        return self.w_bits + 32 / self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, OVP w{self.w_bits}"
                f"a{self.act_bits or 16}")


def _register():
    try:
        from qft.formats import register_module_type
    except ImportError:  # pragma: no cover
        return
    register_module_type(OliVeLinear)


_register()
