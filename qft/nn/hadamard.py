"""Orthogonally transformed quantized linear (QuIP's incoherence processing at inference).

QuIP quantizes W' = U W V^T instead of W, with U [N, N] and V [K, K] random orthogonal matrices
that spread every weight's magnitude over all entries (incoherence), so no outlier dominates a
quantization range. At inference the transforms are applied on the fly:

    y = x W_eff^T with W_eff = U^T Q(W') V   =>   y = T_out^T( Q(W') . T_in(x) )

A transform is structured so that it is cheap to store and apply: T = (A kron B) diag(s) with A
[p, p], B [q, q] orthogonal (p * q = n) and s a vector of random signs. Applied to x reshaped
[..., p, q] it is A (s * x) B^T: O(n (p + q)) work instead of O(n^2). Two kinds
(:func:`make_transform`):

* ``kron``: A and B Haar-random orthogonal with p, q close to sqrt(n) (QuIP's Kronecker construction);
* ``hadamard``: B the normalized Walsh-Hadamard matrix of the largest power of two dividing n
  (rebuilt at load, not stored), A a random orthogonal matrix of the remaining odd factor (a
  randomized Hadamard transform when n is a power of two; SmolLM2's 576 = 9 * 64 and
  1536 = 3 * 512 need the small random factor).

The quantized W' uses qft's uniform grid (canonical int32 packing, per-group scales / integer zeros)
and runs through ``qft.kernels.qlinear``; the module implements the native export contract.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qft import kernels
from qft.nn.mixed import ExportMixin, _bias_param, fill_sparse_bias

__all__ = ["TRANSFORMS", "factor_sizes", "random_orthogonal", "hadamard_matrix", "make_transform", "apply_transform",
           "apply_transform_t", "transform_matrix", "HadamardLinear"]

TRANSFORMS = ("hadamard", "kron")


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal [n, n] (QR of a Gaussian matrix with the sign fix)."""
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).clamp_min(-1)[None, :]).float()


def hadamard_matrix(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix [n, n] (n a power of two)."""
    if n & (n - 1):
        raise ValueError(f"hadamard_matrix: n={n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def factor_sizes(n: int, kind: str) -> tuple[int, int]:
    """(p, q) with p * q = n for the Kronecker factors A [p, p], B [q, q]."""
    if kind == "hadamard":
        q = n & -n  # largest power of two dividing n
        return n // q, q
    if kind == "kron":
        p = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
        return p, n // p
    raise ValueError(f"transform={kind!r} is not valid; allowed: {', '.join(TRANSFORMS)}")


def make_transform(n: int, kind: str, gen: torch.Generator):
    """(signs [n] of +-1, A [p, p], B [q, q]) of a random orthogonal T = (A kron B) diag(signs)."""
    p, q = factor_sizes(n, kind)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    a = random_orthogonal(p, gen)
    b = hadamard_matrix(q) if kind == "hadamard" else random_orthogonal(q, gen)
    return signs, a, b


def apply_transform(x: torch.Tensor, signs, a, b) -> torch.Tensor:
    """T x for row vectors x [..., n]: A (s * x).view(p, q) B^T."""
    p, q = a.shape[0], b.shape[0]
    m = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], p, q)
    return (a.to(x.dtype) @ m @ b.to(x.dtype).t()).reshape(x.shape)


def apply_transform_t(x: torch.Tensor, signs, a, b) -> torch.Tensor:
    """T^T x for row vectors x [..., n]."""
    p, q = a.shape[0], b.shape[0]
    m = x.reshape(*x.shape[:-1], p, q)
    return (a.to(x.dtype).t() @ m @ b.to(x.dtype)).reshape(x.shape) * signs.to(x.dtype)


def transform_matrix(signs, a, b) -> torch.Tensor:
    """Dense T [n, n] (column j = T e_j)."""
    n = signs.numel()
    return apply_transform(torch.eye(n, dtype=a.dtype), signs, a, b).t()


class HadamardLinear(ExportMixin, nn.Module):
    qft_type = "incoherent"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 kind: str = "hadamard", dtype: torch.dtype = torch.float32, device=None, name: str = ""):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"{name or 'HadamardLinear'}: group_size={group_size} does not divide "
                             f"in_features={in_features}")
        self.in_features, self.out_features, self.bits, self.group_size, self.kind, self.layer_name = \
            in_features, out_features, bits, group_size, kind, name
        n, k, g = out_features, in_features, in_features // group_size
        z = dict(dtype=dtype, device=device)
        self.register_buffer("qweight", torch.zeros(n, kernels.packed_cols(k, bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(n, g, **z))
        self.register_buffer("zeros", torch.zeros(n, g, dtype=torch.uint8, device=device))
        for side, size in (("in", k), ("out", n)):
            p, q = factor_sizes(size, kind)
            self.register_buffer(f"{side}_signs", torch.ones(size, dtype=torch.int8, device=device))
            self.register_buffer(f"{side}_a", torch.eye(p, **z))
            if kind != "hadamard":  # the Hadamard factor is deterministic: built on use, not stored
                self.register_buffer(f"{side}_b", torch.eye(q, **z))
        self.bias = _bias_param(n, bias, dtype, device)

    @classmethod
    @torch.no_grad()
    def from_parts(cls, codes, scales, zeros, bits, group_size, t_in, t_out, kind, bias=None, dtype=torch.float32,
                   name="") -> "HadamardLinear":
        """codes/scales/zeros of Q(W'); t_in = (signs, A, B) of V, t_out of U."""
        n, k = codes.shape
        m = cls(k, n, bias is not None, bits, group_size, kind, dtype=dtype, device=codes.device, name=name)
        m.qweight.copy_(kernels.pack_int32(codes, bits))
        m.scales.copy_(scales)
        m.zeros.copy_(zeros.round().to(torch.uint8))
        for side, (s, a, b) in (("in", t_in), ("out", t_out)):
            getattr(m, f"{side}_signs").copy_(s.to(torch.int8))
            getattr(m, f"{side}_a").copy_(a)
            if kind != "hadamard":
                getattr(m, f"{side}_b").copy_(b)
        return fill_sparse_bias(m, None, bias)

    @classmethod
    def _from_config(cls, c, dtype):
        return cls(int(c["in_features"]), int(c["out_features"]), bool(c["bias"]), int(c["bits"]),
                   int(c["group_size"]), c.get("kind", "hadamard"), dtype=dtype)

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size, "kind": self.kind}

    def _b(self, side: str) -> torch.Tensor:
        if self.kind != "hadamard":
            return getattr(self, f"{side}_b")
        a = getattr(self, f"{side}_a")
        n = getattr(self, f"{side}_signs").numel() // a.shape[0]
        key = (side, a.device, a.dtype)
        cache = self.__dict__.setdefault("_hadamard", {})
        if key not in cache:
            cache[key] = hadamard_matrix(n).to(device=a.device, dtype=a.dtype)
        return cache[key]

    def transforms(self):
        return ((self.in_signs, self.in_a, self._b("in")), (self.out_signs, self.out_a, self._b("out")))

    def quantized_transformed(self, dtype=torch.float32) -> torch.Tensor:
        """Q(W') [N, K], the dequantized weight in the transformed basis."""
        return kernels.reference.dequant(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                         self.in_features, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_eff = U^T Q(W') V [N, K]."""
        t_in, t_out = self.transforms()
        w = self.quantized_transformed(torch.float32)
        w = apply_transform_t(w, *t_in)                       # Q(W') V (row vectors times V)
        w = apply_transform_t(w.t().contiguous(), *t_out).t()  # U^T (Q(W') V)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_in, t_out = self.transforms()
        xt = apply_transform(x, *t_in)
        y = kernels.qlinear(xt, self.qweight, self.scales.to(x.dtype), self.zeros, self.bits, self.group_size,
                            self.in_features)
        y = apply_transform_t(y, *t_out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def bits_per_weight(self) -> float:
        n, k, b = self.out_features, self.in_features, self.bits
        g = k // self.group_size
        stored = self.state_dict()
        side = k + n + 16 * sum(stored[f"{s}_{f}"].numel() for s in ("in", "out") for f in ("a", "b")
                                if f"{s}_{f}" in stored)  # signs at 1 bit, factor matrices at 16
        return (n * k * b + n * g * (16 + b) + side) / (n * k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, transform={self.kind}")


def _register():
    from qft.formats import register_module_type
    register_module_type(HadamardLinear)


_register()
