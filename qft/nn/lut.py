"""Non-uniform weight-only linears: per-channel lookup tables and binary-coded quantization.

* :class:`LUTLinear` (SqueezeLLM): every output row n has its own table of 2**b float values
  ``lut[n]`` (the weighted k-means centroids); the weight is ``lut[n, u[n, k]]`` with b-bit indices u
  packed in qft's canonical int32 layout, plus optional sparse full-precision outliers (CSR,
  ``qft.nn.mixed``) holding the residual w - lut[n, u] at their positions (dense-and-sparse).
* :class:`BCQLinear` (LUT-GEMM): W = sum_i alpha_i * B_i (+ offset) per group, binary planes B_i
  packed 32 signs per int32; the forward is the LUT-GEMM kernel (``qft.kernels.lut_gemm``: Triton
  on GPU, the torch reference elsewhere).

Both are deployment modules implementing the native export contract (``state_dict()`` keys are
exactly the stored tensors). Bits per weight count indices / signs at their width, table entries,
scales and offsets at 16 bits, outliers at 16 + 16 bits plus row pointers.
"""

from __future__ import annotations

import torch
from torch import nn

from qft import kernels
from qft.nn.mixed import ExportMixin, _bias_param, _col_dtype, fill_sparse_bias, sparse_linear, sparse_to_dense

__all__ = ["LUTLinear", "BCQLinear"]


class LUTLinear(ExportMixin, nn.Module):
    qft_type = "lut"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, nnz: int = 0,
                 dtype: torch.dtype = torch.float32, device=None, name: str = ""):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.nnz, self.layer_name = \
            in_features, out_features, bits, nnz, name
        n = out_features
        self.register_buffer("qweight", torch.zeros(n, kernels.packed_cols(in_features, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("lut", torch.zeros(n, 2 ** bits, dtype=dtype, device=device))
        if nnz:
            self.register_buffer("sp_rowptr", torch.zeros(n + 1, dtype=torch.int32, device=device))
            self.register_buffer("sp_col", torch.zeros(nnz, dtype=_col_dtype(in_features), device=device))
            self.register_buffer("sp_val", torch.zeros(nnz, dtype=dtype, device=device))
        self.bias = _bias_param(n, bias, dtype, device)

    @classmethod
    @torch.no_grad()
    def from_parts(cls, codes, lut, bits, sparse=None, bias=None, dtype=torch.float32, name="") -> "LUTLinear":
        n, k = codes.shape
        nnz = 0 if sparse is None else int(sparse[2].numel())
        m = cls(k, n, bias is not None, bits, nnz, dtype=dtype, device=codes.device, name=name)
        m.qweight.copy_(kernels.pack_int32(codes, bits))
        m.lut.copy_(lut)
        return fill_sparse_bias(m, sparse if nnz else None, bias)

    @classmethod
    def _from_config(cls, c, dtype):
        return cls(int(c["in_features"]), int(c["out_features"]), bool(c["bias"]), int(c["bits"]),
                   int(c.get("nnz", 0)), dtype=dtype)

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "nnz": self.nnz}

    def dense_weight(self, dtype) -> torch.Tensor:
        u = kernels.unpack_int32(self.qweight, self.bits, self.in_features).long()
        return torch.gather(self.lut.to(dtype), 1, u)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.dense_weight(torch.float32)
        if self.nnz:
            w = w + sparse_to_dense(self.sp_rowptr, self.sp_col, self.sp_val, self.out_features, self.in_features)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.nnz:
            y = y + sparse_linear(x, self.sp_rowptr, self.sp_col, self.sp_val, self.out_features)
        return y

    def bits_per_weight(self) -> float:
        n, k = self.out_features, self.in_features
        total = n * k * self.bits + 16 * n * 2 ** self.bits
        if self.nnz:
            total += self.nnz * 32 + 32 * (n + 1)
        return total / (n * k)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, outliers={self.nnz}"


class BCQLinear(ExportMixin, nn.Module):
    qft_type = "bcq"

    def __init__(self, in_features: int, out_features: int, bias: bool, n_planes: int, group_size: int,
                 offset: bool = True, dtype: torch.dtype = torch.float32, device=None, name: str = ""):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"{name or 'BCQLinear'}: group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.n_planes, self.group_size, self.layer_name = \
            in_features, out_features, n_planes, group_size, name
        n, g = out_features, in_features // group_size
        self.register_buffer("planes", torch.zeros(n_planes, n, kernels.packed_cols(in_features, 1),
                                                   dtype=torch.int32, device=device))
        self.register_buffer("alpha", torch.zeros(n_planes, n, g, dtype=dtype, device=device))
        self.register_buffer("offset", torch.zeros(n, g, dtype=dtype, device=device) if offset else None)
        self.bias = _bias_param(n, bias, dtype, device)

    @classmethod
    @torch.no_grad()
    def from_parts(cls, signs, alpha, offset, group_size, bias=None, dtype=torch.float32, name="") -> "BCQLinear":
        """signs [q, N, K] (+-1), alpha [q, N, G], offset [N, G] or None."""
        q, n, k = signs.shape
        m = cls(k, n, bias is not None, q, group_size, offset is not None, dtype=dtype, device=signs.device, name=name)
        m.planes.copy_(kernels.pack_signs(signs.reshape(q * n, k).float()).reshape(q, n, -1))
        m.alpha.copy_(alpha)
        if offset is not None:
            m.offset.copy_(offset)
        return fill_sparse_bias(m, None, bias)

    @classmethod
    def _from_config(cls, c, dtype):
        return cls(int(c["in_features"]), int(c["out_features"]), bool(c["bias"]), int(c["n_planes"]),
                   int(c["group_size"]), bool(c.get("offset", True)), dtype=dtype)

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "n_planes": self.n_planes, "group_size": self.group_size, "offset": self.offset is not None}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from qft.kernels.lut_gemm import bcq_dequant
        return bcq_dequant(self.planes, self.alpha, self.offset, self.group_size, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qft.kernels.lut_gemm import bcq_linear
        return bcq_linear(x, self.planes, self.alpha, self.offset, self.group_size, self.in_features, self.bias)

    def bits_per_weight(self) -> float:
        n, k, q = self.out_features, self.in_features, self.n_planes
        g = k // self.group_size
        return (q * n * k + 16 * q * n * g + (16 * n * g if self.offset is not None else 0)) / (n * k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, planes={self.n_planes}, "
                f"group_size={self.group_size}, offset={self.offset is not None}")


def _register():
    from qft.formats import register_module_type
    register_module_type(LUTLinear)
    register_module_type(BCQLinear)


_register()
