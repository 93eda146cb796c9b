"""Mixed-precision weight-only linear: a low-bit dense grid plus full-precision side parts.

Used by OWQ (fp16 *columns* beside a GPTQ-quantized matrix) and SpQR (small groups with
*quantized* group statistics, plus unstructured fp16 *outliers* stored sparse, CSR):

    W_eff = dequant(dense) + C (fp columns at col_idx) + S (sparse outliers)

* dense: b-bit codes u [N, K] in qft's canonical int32 packing (``qft.kernels.pack_int32``),
  integer zero points ``zeros`` uint8 [N, G], and either plain ``scales`` [N, G] or SpQR's
  second-level quantized scales: ``scale_codes`` uint8 [N, G] (``stat_bits`` bits) with one
  (``stat_scale``, ``stat_min``) pair per ``stat_group`` consecutive output rows and group,
  scale = code * stat_scale + stat_min.
* columns: ``col_idx`` int32 [r] and ``col_weight`` [N, r]; the dense codes there equal the zero
  point, so the dense part is exactly 0 in those columns.
* sparse: CSR ``sp_rowptr`` int32 [N + 1], ``sp_col`` int16 (int32 if K > 32767) [nnz],
  ``sp_val`` [nnz]; the dense codes at outlier positions are the zero point too, so W_eff holds
  exactly the stored outlier value there.

The forward runs the dense part through ``qft.kernels.qlinear`` (Triton on GPU, torch elsewhere),
the columns as a small matmul and the outliers with a gather / index_add (no dense scatter).
The module is deployment-only (no training state) and implements the native export contract;
``state_dict()`` keys are exactly the exported tensors, so ``from_export(config, None, dtype)``
returns an empty module that transformers fills by name.

Bits per weight count what a deployment stores: codes at b bits, floats at 16 bits, integer zeros
and scale codes at their bit widths, outliers at 16 + 16 bits plus the row pointers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qft import kernels

__all__ = ["csr_from_mask", "sparse_to_dense", "sparse_linear", "quantize_stats", "dequantize_stats",
           "ExportMixin", "MixedLinear"]


# --- sparse outliers (CSR) --------------------------------------------------------------------

def _col_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= 32767 else torch.int32


def csr_from_mask(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None):
    """(rowptr int32 [N+1], col int16/int32 [nnz], val [nnz]) of ``values`` where ``mask`` (row-major)."""
    n, k = values.shape
    rows, cols = torch.nonzero(mask, as_tuple=True)
    counts = torch.bincount(rows, minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=values.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return (rowptr.to(torch.int32), cols.to(_col_dtype(k)), values[rows, cols].to(dtype or values.dtype))


def _rows(rowptr: torch.Tensor) -> torch.Tensor:
    n = rowptr.numel() - 1
    counts = (rowptr[1:] - rowptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(n, device=rowptr.device), counts)


def sparse_to_dense(rowptr, col, val, n: int, k: int, dtype=torch.float32) -> torch.Tensor:
    out = torch.zeros(n, k, dtype=dtype, device=val.device)
    out[_rows(rowptr), col.long()] = val.to(dtype)
    return out


def sparse_linear(x: torch.Tensor, rowptr, col, val, n: int) -> torch.Tensor:
    """x [..., K] @ S^T for the CSR matrix S [n, K]: gather the inputs each outlier reads, scale,
    add into its output row."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = torch.zeros(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if val.numel():
        y.index_add_(1, _rows(rowptr), x2[:, col.long()] * val.to(x.dtype))
    return y.reshape(*shape[:-1], n)


# --- second-level statistics (SpQR) ------------------------------------------------------------

def quantize_stats(s: torch.Tensor, bits: int, group: int, store_dtype=torch.float16):
    """Quantize per-group statistics s [N, G] along N in blocks of ``group`` rows, asymmetric min-max.

    Returns (codes uint8 [N, G], st_scale [ceil(N/group), G], st_min [...]) with the second-level
    parameters already rounded to ``store_dtype`` (so what is stored reproduces the values used)."""
    n, g = s.shape
    nb = math.ceil(n / group)
    pad = nb * group - n
    sp = torch.cat([s.float(), s[-1:].float().expand(pad, g)]) if pad else s.float()
    blk = sp.reshape(nb, group, g)
    lo, hi = blk.amin(1), blk.amax(1)
    maxq = 2 ** bits - 1
    st_scale = ((hi - lo) / maxq).clamp_min(1e-10).to(store_dtype).float()
    st_min = lo.to(store_dtype).float()
    codes = torch.clamp(torch.round((blk - st_min[:, None]) / st_scale[:, None]), 0, maxq)
    return codes.reshape(nb * group, g)[:n].to(torch.uint8), st_scale, st_min


def dequantize_stats(codes: torch.Tensor, st_scale: torch.Tensor, st_min: torch.Tensor, group: int) -> torch.Tensor:
    """[N, G] float32 statistics from their codes (inverse of :func:`quantize_stats`)."""
    n = codes.shape[0]
    sc = st_scale.float().repeat_interleave(group, 0)[:n]
    mn = st_min.float().repeat_interleave(group, 0)[:n]
    return codes.float() * sc + mn


# --- export helpers shared by the field's module types -----------------------------------------

class ExportMixin:
    """Native export contract for a module whose ``state_dict()`` is exactly what it stores."""

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_export(cls, config: dict, tensors: dict | None, dtype: torch.dtype):
        m = cls._from_config(config, dtype)
        if tensors is None:
            return m
        own = m.state_dict()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"{cls.qft_type} layer lacks tensors {missing}")
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise ValueError(f"{cls.qft_type} layer has unexpected tensors {unexpected}")
        for k, ref in own.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            ref.copy_(t.to(ref.dtype))
        return m


@torch.no_grad()
def fill_sparse_bias(m: nn.Module, sparse=None, bias: torch.Tensor | None = None) -> nn.Module:
    """Copy CSR outliers ``sparse = (rowptr, col, val)`` and ``bias`` into a freshly built module."""
    if sparse is not None:
        m.sp_rowptr.copy_(sparse[0])
        m.sp_col.copy_(sparse[1])
        m.sp_val.copy_(sparse[2])
    if bias is not None:
        m.bias.copy_(bias)
    return m


def _bias_param(n, bias, dtype, device):
    return nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False) if bias else None


class MixedLinear(ExportMixin, nn.Module):
    qft_type = "mixed"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 n_cols: int = 0, nnz: int = 0, stat_bits: int = 0, stat_group: int = 16,
                 dtype: torch.dtype = torch.float32, device=None, name: str = ""):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"{name or 'MixedLinear'}: group_size={group_size} does not divide "
                             f"in_features={in_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.n_cols, self.nnz, self.stat_bits, self.stat_group, self.layer_name = n_cols, nnz, stat_bits, stat_group, name
        n, g = out_features, in_features // group_size
        z = dict(device=device)
        self.register_buffer("qweight", torch.zeros(n, kernels.packed_cols(in_features, bits), dtype=torch.int32, **z))
        self.register_buffer("zeros", torch.zeros(n, g, dtype=torch.uint8, **z))
        if stat_bits:
            nb = math.ceil(n / stat_group)
            self.register_buffer("scale_codes", torch.zeros(n, g, dtype=torch.uint8, **z))
            self.register_buffer("stat_scale", torch.ones(nb, g, dtype=dtype, **z))
            self.register_buffer("stat_min", torch.zeros(nb, g, dtype=dtype, **z))
        else:
            self.register_buffer("scales", torch.ones(n, g, dtype=dtype, **z))
        if n_cols:
            self.register_buffer("col_idx", torch.zeros(n_cols, dtype=torch.int32, **z))
            self.register_buffer("col_weight", torch.zeros(n, n_cols, dtype=dtype, **z))
        if nnz:
            self.register_buffer("sp_rowptr", torch.zeros(n + 1, dtype=torch.int32, **z))
            self.register_buffer("sp_col", torch.zeros(nnz, dtype=_col_dtype(in_features), **z))
            self.register_buffer("sp_val", torch.zeros(nnz, dtype=dtype, **z))
        self.bias = _bias_param(n, bias, dtype, device)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_parts(cls, codes: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                   scales: torch.Tensor | None = None, stats: tuple | None = None, stat_bits: int = 0,
                   stat_group: int = 16, col_idx: torch.Tensor | None = None, col_weight: torch.Tensor | None = None,
                   sparse: tuple | None = None, bias: torch.Tensor | None = None, dtype=torch.float32,
                   name: str = "") -> "MixedLinear":
        """Build from integer codes u [N, K] and zeros [N, G]; ``scales`` [N, G] or ``stats`` =
        (scale_codes, stat_scale, stat_min); optional fp columns and CSR ``sparse`` = (rowptr, col, val)."""
        n, k = codes.shape
        r = 0 if col_idx is None else int(col_idx.numel())
        nnz = 0 if sparse is None else int(sparse[2].numel())
        m = cls(k, n, bias is not None, bits, group_size, r, nnz, stat_bits if stats is not None else 0, stat_group,
                dtype=dtype, device=codes.device, name=name)
        m.qweight.copy_(kernels.pack_int32(codes, bits))
        m.zeros.copy_(zeros.round().to(torch.uint8))
        if stats is not None:
            m.scale_codes.copy_(stats[0])
            m.stat_scale.copy_(stats[1])
            m.stat_min.copy_(stats[2])
        else:
            m.scales.copy_(scales)
        if r:
            m.col_idx.copy_(col_idx.to(torch.int32))
            m.col_weight.copy_(col_weight)
        return fill_sparse_bias(m, sparse if nnz else None, bias)

    @classmethod
    def _from_config(cls, c: dict, dtype) -> "MixedLinear":
        return cls(int(c["in_features"]), int(c["out_features"]), bool(c["bias"]), int(c["bits"]),
                   int(c["group_size"]), int(c.get("n_cols", 0)), int(c.get("nnz", 0)), int(c.get("stat_bits", 0)),
                   int(c.get("stat_group", 16)), dtype=dtype)

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size, "n_cols": self.n_cols, "nnz": self.nnz,
                "stat_bits": self.stat_bits, "stat_group": self.stat_group}

    # --- views -------------------------------------------------------------------------------
    def dense_scales(self) -> torch.Tensor:
        """Per-group scales [N, G] (float32), dequantized from their codes when SpQR-quantized."""
        if self.stat_bits:
            return dequantize_stats(self.scale_codes, self.stat_scale, self.stat_min, self.stat_group)
        return self.scales.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight [N, K]."""
        w = kernels.reference.dequant(self.qweight, self.dense_scales(), self.zeros, self.bits, self.group_size,
                                      self.in_features, torch.float32)
        if self.n_cols:
            w[:, self.col_idx.long()] += self.col_weight.float()
        if self.nnz:
            w += sparse_to_dense(self.sp_rowptr, self.sp_col, self.sp_val, self.out_features, self.in_features)
        return w.to(dtype)

    def _kernel_scales(self, dtype) -> torch.Tensor:
        """Scales in the activation dtype, built once (a stable tensor for the kernels' prepare cache)."""
        if not self.stat_bits:
            return self.scales.to(dtype)
        parts = (self.scale_codes, self.stat_scale, self.stat_min)
        key = (dtype, self.scale_codes.device, *((t.data_ptr(), t._version) for t in parts))
        cache = self.__dict__.get("_scales_cache")
        if cache is None or cache[0] != key:
            cache = (key, self.dense_scales().to(dtype))
            self.__dict__["_scales_cache"] = cache
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.qlinear(x, self.qweight, self._kernel_scales(x.dtype), self.zeros, self.bits, self.group_size,
                            self.in_features, None if self.bias is None else self.bias.to(x.dtype))
        if self.n_cols:
            y = y + nn.functional.linear(x[..., self.col_idx.long()], self.col_weight.to(x.dtype))
        if self.nnz:
            y = y + sparse_linear(x, self.sp_rowptr, self.sp_col, self.sp_val, self.out_features)
        return y

    def bits_per_weight(self) -> float:
        n, k, b = self.out_features, self.in_features, self.bits
        g = k // self.group_size
        total = n * k * b + n * g * b  # codes + integer zeros
        if self.stat_bits:
            total += n * g * self.stat_bits + 2 * 16 * math.ceil(n / self.stat_group) * g
        else:
            total += 16 * n * g
        total += self.n_cols * (16 * n + 32)
        if self.nnz:
            total += self.nnz * (16 + 16) + 32 * (n + 1)
        return total / (n * k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, fp_cols={self.n_cols}, outliers={self.nnz}, "
                f"stat_bits={self.stat_bits}")


def _register():
    from qft.formats import register_module_type
    register_module_type(MixedLinear)


_register()
