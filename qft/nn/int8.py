"""Int8 linear layers: W8A8 (SmoothQuant, ZeroQuant-style) and LLM.int8() mixed precision.

* :class:`Int8Linear`: int8 weights with one scale per output channel (symmetric, absmax / 127)
  and per-token dynamic int8 activations; ``y = (xq @ wq^T) * sx[m] * sw[n] + b`` with the
  int8 x int8 -> int32 product computed exactly (``qft.kernels.int8_linear`` when the kernels
  package provides it, else ``torch._int_mm``, else a float64 matmul, which is exact for int8
  products: every partial sum stays below 2**53).
* :class:`Int8MixedLinear` (LLM.int8(), Dettmers et al. 2022): the same vector-wise int8 product
  for the ordinary input dimensions, while the *outlier feature dimensions* (input columns where
  some token's |x| >= ``threshold``, decided per forward) are computed in floating point against
  the (dequantized int8) weight columns, as bitsandbytes does, so the weight is stored once.

Activation rounding is round-half-up of ``x * 127 / absmax`` clamped to [-127, 127] and weights
round(w / s), the conventions of ``qft.kernels`` (Triton and its reference), so every path sees the
same integers; a test checks the torch path against ``qft.kernels.int8_linear``.
Both modules implement the native-format hooks (``qft_type``, ``export_tensors``,
``export_config``, ``from_export``, ``bits_per_weight``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["quantize_rows_int8", "quantize_weight_int8", "int8_matmul", "int8_linear_ref", "Int8Linear",
           "Int8MixedLinear"]


def quantize_rows_int8(x: torch.Tensor):
    """Per-row (token) symmetric int8: (q int8 [M, K], scale float32 [M]); absmax / 127 scales."""
    xf = x.float()
    amax = xf.abs().amax(-1).clamp_min(1e-8)
    q = torch.floor(xf * (127.0 / amax).unsqueeze(-1) + 0.5).clamp_(-127, 127).to(torch.int8)
    return q, amax / 127.0


def quantize_weight_int8(w: torch.Tensor):
    """Per-output-channel symmetric int8 of a weight [N, K]: round(w / s), s = absmax / 127
    (``qft.kernels.reference.quantize_weight_int8``, so kernel and torch paths hold the same integers)."""
    s = w.float().abs().amax(-1).clamp_min(1e-8) / 127.0
    return torch.round(w.float() / s.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), s


_INT_MM_OK = {}


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 result of int8 a [M, K] @ int8 b [N, K]^T."""
    key = a.device.type
    if _INT_MM_OK.get(key, True) and hasattr(torch, "_int_mm"):
        try:
            if a.device.type == "cuda" and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[0] % 8):
                raise RuntimeError("shape not supported by cuBLAS int8")
            return torch._int_mm(a.contiguous(), b.t())
        except RuntimeError:
            if a.device.type != "cuda":
                _INT_MM_OK[key] = False
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_linear_ref(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None = None):
    """Torch W8A8: dynamic per-token int8 x, int8 per-channel w; returns x.dtype [..., N]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, sx = quantize_rows_int8(x2)
    y = int8_matmul(xq, wq).float() * sx.unsqueeze(1) * sw.float().unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


def _kernel_int8_linear():
    try:
        from qft import kernels
    except ImportError:  # pragma: no cover
        return None
    return getattr(kernels, "int8_linear", None)


class Int8Linear(nn.Module):
    """W8A8 linear: int8 per-channel weights, per-token dynamic int8 activations."""

    qft_type = "int8_w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("wscale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                linear.weight.dtype)
        q, s = quantize_weight_int8(linear.weight.detach())
        m.qweight.copy_(q)
        m.wscale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.wscale.unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = _kernel_int8_linear()
        if fn is not None and x.is_cuda:
            return fn(x, self.qweight, self.wscale, self.bias)
        return int8_linear_ref(x, self.qweight, self.wscale, self.bias)

    # --- native export hooks -------------------------------------------------------------------
    def export_tensors(self) -> dict:
        t = {"qweight": self.qweight, "wscale": self.wscale}
        if self.bias is not None:
            t["bias"] = self.bias
        return t

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_export(cls, config: dict, tensors: dict, dtype=torch.float32) -> "Int8Linear":
        m = cls(config["in_features"], config["out_features"], config.get("bias", False), dtype=dtype)
        for k, v in tensors.items():
            getattr(m, k).copy_(v)
        return m

    def bits_per_weight(self) -> float:
        return 8 + 32 / self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 per-channel/per-token"


def mixed_int8_linear(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, threshold: float,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8() forward: outlier input columns (any |x| >= threshold) in float, the rest W8A8."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    cols = (x2.abs() >= threshold).any(0) if threshold > 0 else torch.zeros(x2.shape[1], dtype=torch.bool,
                                                                            device=x.device)
    x_in = x2.masked_fill(cols, 0.0) if bool(cols.any()) else x2
    xq, sx = quantize_rows_int8(x_in)
    y = int8_matmul(xq, wq).float() * sx.unsqueeze(1) * sw.float().unsqueeze(0)
    if bool(cols.any()):
        idx = cols.nonzero().squeeze(1)
        w_out = wq.index_select(1, idx).float() * sw.float().unsqueeze(1)
        y = y + x2.index_select(1, idx) @ w_out.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


class Int8MixedLinear(Int8Linear):
    """LLM.int8(): vector-wise int8 with outlier feature dimensions computed in floating point."""

    qft_type = "llm_int8"

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=torch.float32,
                 threshold: float = 6.0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.threshold = float(threshold)
        self.last_outliers = 0  # number of outlier dimensions in the last forward (diagnostics)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Int8MixedLinear":
        m = super().from_linear(linear)
        m.threshold = float(threshold)
        return m

    def forward(self, x):
        if self.threshold > 0:
            self.last_outliers = int((x.detach().reshape(-1, x.shape[-1]).abs() >= self.threshold).any(0).sum())
        return mixed_int8_linear(x, self.qweight, self.wscale, self.threshold, self.bias)

    def export_config(self) -> dict:
        return {**super().export_config(), "threshold": self.threshold}

    @classmethod
    def from_export(cls, config, tensors, dtype=torch.float32):
        m = super().from_export(config, tensors, dtype)
        m.threshold = float(config.get("threshold", 6.0))
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outlier threshold={self.threshold}"


def _register():
    try:
        from qft.formats import register_module_type
    except ImportError:
        return
    for cls in (Int8Linear, Int8MixedLinear):
        try:
            register_module_type(cls)
        except (KeyError, ValueError):
            pass


_register()
