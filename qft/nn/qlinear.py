"""QuantLinear: one module, two states.

* ``fake`` (training / calibration): a float ``weight`` and float32 ``scale`` / ``zero`` [N, G].
  The forward fake-quantizes the weight (STE), so the output equals what the packed model computes
  on the same integers. With ``dynamic=True`` the quantization parameters are recomputed from the
  current weight at every forward (latent-weight QAT); otherwise they are fixed until
  :meth:`requantize`.
* ``packed`` (deployment): ``qweight`` int32 words in the canonical layout of
  ``qft.kernels.reference``, ``scales`` [N, G] in the model dtype and ``zeros`` uint8 [N, G];
  the forward goes through ``qft.kernels`` (Triton on GPU, the torch reference elsewhere).

Codebook schemes (nf, fp, sign) store level indices instead of affine integers; their zeros are
unused (kept at 0).
"""

from __future__ import annotations

import torch
from torch import nn

from qft import kernels
from qft.nn import quant as Q
from qft.spec import QuantSpec


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, name: str = "",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        spec.check_layer(name or "<layer>", in_features)
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.layer_name = spec, name
        self.bits, self.scheme, self.symmetric = spec.bits, spec.scheme, spec.symmetric
        self.group_size = spec.group_for(in_features)
        self.state = "fake"
        self.dynamic = False
        g = in_features // self.group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_buffer("scale", torch.ones(out_features, g, device=device))
        self.register_buffer("zero", torch.zeros(out_features, g, device=device))

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, name: str = "",
                    scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap an nn.Linear (fake state); qparams are min-max unless ``scale``/``zero`` are given."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, name,
                dtype=linear.weight.dtype, device=linear.weight.device)
        m.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data)
        m.requantize(None, scale=scale, zero=zero)
        return m

    @classmethod
    def packed_empty(cls, in_features, out_features, bias, spec, name="", dtype=torch.float32, device=None):
        """A packed module with empty buffers of the right shapes (for loading checkpoints)."""
        m = cls(in_features, out_features, bias, spec, name, dtype=dtype, device="meta")
        m._to_packed_buffers(dtype, device)
        if bias:
            m.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        return m

    def _to_packed_buffers(self, dtype, device):
        g = self.in_features // self.group_size
        del self.weight
        self.weight = None
        for k in ("scale", "zero"):
            delattr(self, k)
        self.register_buffer("qweight", torch.zeros(self.out_features, kernels.packed_cols(self.in_features, self.bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(self.out_features, g, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(self.out_features, g, dtype=torch.uint8, device=device))
        self.state = "packed"

    # --- quantization parameters -------------------------------------------------------------
    def compute_qparams(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0):
        if self.scheme == "int":
            return Q.minmax_qparams(w, self.bits, self.group_size, self.symmetric, clip)
        return Q.codebook_qparams(w, self.scheme, self.bits, self.group_size, clip)

    def codes(self) -> torch.Tensor:
        """Integer codes u [N, K] (uint8) of the current weight."""
        if self.state == "packed":
            return kernels.unpack_int32(self.qweight, self.bits, self.in_features)
        w = self.weight.detach()
        if self.scheme == "int":
            return Q.quantize(w, self.scale, self.zero, self.bits, self.group_size)
        return Q.codebook_quantize(w, self.scale, self.scheme, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective (quantized) weight [N, K] as a dense float tensor."""
        if self.state == "packed":
            dtype = dtype or self.scales.dtype
            if self.scheme == "int":
                return kernels.dequant(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                       self.in_features, dtype)
            u = kernels.unpack_int32(self.qweight, self.bits, self.in_features)
            return Q.codebook_dequantize(u, self.scales, self.scheme, self.bits, self.group_size, dtype)
        dtype = dtype or self.weight.dtype
        u = self.codes()
        if self.scheme == "int":
            return Q.dequantize(u, self.scale, self.zero, self.group_size, dtype)
        return Q.codebook_dequantize(u, self.scale, self.scheme, self.bits, self.group_size, dtype)

    @torch.no_grad()
    def requantize(self, w: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None, clip: float | torch.Tensor = 1.0) -> "QuantLinear":
        """Set a new float weight (default: keep the current one) and recompute (or set) qparams.

        In the packed state the new weight is quantized and re-packed.
        """
        if w is None:
            if self.state == "packed":
                raise ValueError(f"{self.layer_name}: requantize() of a packed layer needs a weight")
            w = self.weight.data
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.layer_name}: weight shape {tuple(w.shape)} != "
                             f"({self.out_features}, {self.in_features})")
        s, z = self.compute_qparams(w, clip)
        s = s if scale is None else scale.float().to(w.device)
        z = z if zero is None else zero.float().to(w.device)
        if self.state == "fake":
            self.weight.data.copy_(w)
            self.scale, self.zero = s.contiguous(), z.contiguous()
        else:
            tmp = QuantLinear(self.in_features, self.out_features, False, self.spec, self.layer_name,
                              dtype=self.scales.dtype, device=w.device)
            tmp.weight.data.copy_(w)
            tmp.scale, tmp.zero = s, z
            tmp.pack()
            self.qweight, self.scales, self.zeros = tmp.qweight, tmp.scales, tmp.zeros
        return self

    @torch.no_grad()
    def pack(self) -> "QuantLinear":
        """fake -> packed, in place. The integers are exactly those the fake forward used."""
        if self.state == "packed":
            return self
        u = self.codes()
        dtype, device = self.weight.dtype, self.weight.device
        scale, zero = self.scale, self.zero
        self._to_packed_buffers(dtype, device)
        self.qweight = kernels.pack_int32(u, self.bits)
        self.scales = scale.to(dtype).contiguous()
        self.zeros = zero.round().to(torch.uint8).contiguous()
        return self

    # --- forward -----------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight with STE gradients (fake state)."""
        w = self.weight
        if self.dynamic:
            s, z = self.compute_qparams(w.detach())
        else:
            s, z = self.scale, self.zero
        if self.scheme == "int":
            return Q.fake_quant(w.float(), s, z, self.bits, self.group_size).to(w.dtype)
        return Q.fake_quant_codebook(w.float(), s, self.scheme, self.bits, self.group_size).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.act_bits:
            x = Q.fake_quant_act(x, self.spec.act_bits, self.spec.act_granularity, self.spec.act_symmetric)
        if self.state == "packed":
            if self.scheme == "int":
                return kernels.qlinear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                       self.in_features, self.bias)
            w = self.dequantize(x.dtype)
        else:
            w = self.quantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, scheme={self.scheme}, symmetric={self.symmetric}, "
                f"state={self.state}")
