"""OneBit sign-value linear layer (Xu et al., 2024, "OneBit: Towards Extremely Low-bit LLMs").

A weight W [N, K] is replaced by its signs and two value vectors:

    W ~ sign(W) * (h g^T),     y = ((x * g) @ sign(W)^T) * h  (+ bias)  [-> LayerNorm(y)]

``g`` [K] scales the input channels, ``h`` [N] the output channels; the paper puts a LayerNorm
after every 1-bit layer (``layernorm=True`` here, off by default so an SVID-initialized layer
computes exactly sign(W) * (h g^T)). Signs cost 1 bit a weight, the vectors 16 bits per row and
column: a 576 x 1536 layer stores 1.04 bits per weight.

One module, two states:

* ``train``: ``g``, ``h`` (and bias, LayerNorm) are parameters. The signs are either a frozen
  int8 buffer (``mode="frozen"``, the parameter-efficient mode, optionally with a built-in LoRA
  whose output ``x @ (scale * B A)^T`` is added before the bias and LayerNorm), or
  come from a latent float weight (``mode="latent"``) through ``sign_ste``: sign forward, and
  backward either the identity (``surrogate="ste"``) or the derivative shape of tanh(w / tau)
  (``surrogate="tanh"``, tau = the row's mean |w| at construction, a smooth surrogate).
* ``packed``: signs packed 32 per int32 (``qft.kernels.pack_signs``, bit 1 = +1), ``g`` and ``h``
  in the model dtype; the forward runs ``qft.kernels.onebit_linear`` (Triton on GPU, the torch
  reference elsewhere). On the same signs and values both states compute the same numbers.

The value vectors come from SVID (:mod:`qft.ptq.svid`). LoRA cannot be packed: merge it first
(``qft.ptq.svid.merge_lora``: re-binarizes sign(W) * (h g^T) + B A).
The layer plugs into the native export format (``qft_type``, ``export_tensors``, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qft import kernels

MODES = ("frozen", "latent")
SURROGATES = ("ste", "tanh")


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, tau):
        ctx.save_for_backward(w, tau)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, tau = ctx.saved_tensors
        if tau.numel() == 0:  # straight-through: identity
            return grad, None
        return grad * (1 - torch.tanh(w / tau) ** 2), None


def sign_ste(w: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
    """+-1 (sign of w, +1 at 0) forward; backward identity, or (1 - tanh(w/tau)^2) if tau is given."""
    return _SignSTE.apply(w, tau if tau is not None else w.new_empty(0))


def signs_of(w: torch.Tensor) -> torch.Tensor:
    """int8 +-1 matrix, +1 where w >= 0 (the convention of ``kernels.pack_signs``)."""
    return torch.where(w >= 0, 1, -1).to(torch.int8)


class OneBitLinear(nn.Module):
    qft_type = "onebit"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, layernorm: bool = False,
                 ln_eps: float = 1e-5, mode: str = "frozen", surrogate: str = "ste", lora_rank: int = 0,
                 lora_alpha: float | None = None, name: str = "", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"OneBitLinear mode={mode!r} is not valid; allowed: {', '.join(MODES)}")
        if surrogate not in SURROGATES:
            raise ValueError(f"OneBitLinear surrogate={surrogate!r} is not valid; allowed: {', '.join(SURROGATES)}")
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"OneBitLinear lora_rank={lora_rank!r} is not valid; allowed: an integer >= 0")
        if lora_rank and mode != "frozen":
            raise ValueError(f"OneBitLinear lora_rank={lora_rank} needs mode='frozen' (got mode={mode!r}): "
                             f"latent sign training and LoRA do not combine")
        self.in_features, self.out_features, self.layer_name = in_features, out_features, name
        self.mode, self.surrogate, self.state = mode, surrogate, "train"
        self.g = nn.Parameter(torch.ones(in_features, dtype=dtype, device=device))
        self.h = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.ln = nn.LayerNorm(out_features, eps=ln_eps, dtype=dtype, device=device) if layernorm else None
        if mode == "frozen":
            self.register_buffer("sign", torch.ones(out_features, in_features, dtype=torch.int8, device=device))
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))
            self.register_buffer("tau", torch.ones(out_features, 1, dtype=dtype, device=device))
        self.lora_rank = lora_rank
        self.lora_scale = (lora_alpha if lora_alpha is not None else 2.0 * lora_rank) / lora_rank if lora_rank else 0.0
        if lora_rank:
            self.lora_A = nn.Parameter(torch.empty(lora_rank, in_features, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(out_features, lora_rank, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None,
                    name: str = "", dtype: torch.dtype | None = None, **kw) -> "OneBitLinear":
        """A train-state layer with signs of ``w`` (latent mode keeps ``w`` itself) and values g, h."""
        n, k = w.shape
        if g.shape != (k,) or h.shape != (n,):
            raise ValueError(f"{name or 'OneBitLinear'}: g must be [{k}] and h [{n}]; got {tuple(g.shape)}, "
                             f"{tuple(h.shape)}")
        dtype = dtype or w.dtype
        m = cls(k, n, bias=bias is not None, name=name, dtype=dtype, device=w.device, **kw)
        with torch.no_grad():
            m.g.copy_(g)
            m.h.copy_(h)
            if bias is not None:
                m.bias.copy_(bias)
            if m.mode == "frozen":
                m.sign.copy_(signs_of(w))
            else:
                m.weight.copy_(w)
                m.tau.copy_(w.float().abs().mean(1, keepdim=True).clamp_min(1e-8))
        return m

    # --- views of the weight -----------------------------------------------------------------
    def signs(self) -> torch.Tensor:
        """int8 +-1 [N, K] of the current state."""
        if self.state == "packed":
            return kernels.unpack_signs(self.qweight, self.in_features, dtype=torch.float32).to(torch.int8)
        if self.mode == "frozen":
            return self.sign
        return signs_of(self.weight.detach())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """sign(W) * (h g^T) as a dense [N, K] tensor (LoRA and LayerNorm not included)."""
        dtype = dtype or self.h.dtype
        return (self.signs().to(dtype) * self.h.detach().to(dtype)[:, None] * self.g.detach().to(dtype)[None, :])

    def lora_delta(self) -> torch.Tensor | None:
        """scale * B @ A [N, K] (None without LoRA)."""
        if not self.lora_rank:
            return None
        return (self.lora_B @ self.lora_A) * self.lora_scale

    # --- forward -----------------------------------------------------------------------------
    def _sign_matrix(self, dtype) -> torch.Tensor:
        if self.mode == "frozen":
            return self.sign.to(dtype)
        tau = self.tau if self.surrogate == "tanh" else None
        return sign_ste(self.weight, tau).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "packed":
            y = kernels.onebit_linear(x, self.qweight, self.g, self.h, self.in_features, self.bias)
        else:
            y = nn.functional.linear(x * self.g.to(x.dtype), self._sign_matrix(x.dtype)) * self.h.to(x.dtype)
            if self.lora_rank:
                y = y + nn.functional.linear(nn.functional.linear(x, self.lora_A.to(x.dtype)),
                                             self.lora_B.to(x.dtype)) * self.lora_scale
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return self.ln(y) if self.ln is not None else y

    # --- packing -----------------------------------------------------------------------------
    @torch.no_grad()
    def pack(self) -> "OneBitLinear":
        """train -> packed, in place: signs into int32 words, everything frozen. LoRA must be merged."""
        if self.state == "packed":
            return self
        if self.lora_rank:
            raise ValueError(f"{self.layer_name or 'OneBitLinear'}: merge the LoRA adapter before packing "
                             f"(qft.ptq.svid.merge_lora)")
        s = self.signs()
        self.register_buffer("qweight", kernels.pack_signs(s.to(torch.float32)).to(self.h.device))
        for k in ("sign", "tau"):
            if k in self._buffers:
                del self._buffers[k]
        if self.weight is not None:
            del self.weight
            self.weight = None
        self.state = "packed"
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # --- export contract ---------------------------------------------------------------------
    def _store_dtype(self) -> torch.dtype:
        return self.h.dtype if self.h.dtype in (torch.float16, torch.bfloat16) else torch.float16

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Packed signs (int32) + g, h (+ bias, LayerNorm) in fp16 (bf16 if the model is bf16)."""
        if self.lora_rank:
            raise ValueError(f"{self.layer_name or 'OneBitLinear'}: merge the LoRA adapter before export "
                             f"(qft.ptq.svid.merge_lora)")
        dt = self._store_dtype()
        qweight = self.qweight if self.state == "packed" else kernels.pack_signs(self.signs().float())
        t = {"qweight": qweight.cpu().contiguous(), "g": self.g.detach().to(dt), "h": self.h.detach().to(dt)}
        if self.bias is not None:
            t["bias"] = self.bias.detach().to(dt)
        if self.ln is not None:
            t["ln.weight"], t["ln.bias"] = self.ln.weight.detach().to(dt), self.ln.bias.detach().to(dt)
        return t

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "layernorm": self.ln is not None, "ln_eps": self.ln.eps if self.ln is not None else 1e-5}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> "OneBitLinear":
        """A packed layer from ``export_config()`` + ``export_tensors()``; ``tensors=None`` gives an
        empty packed layer of the right shapes (for loaders that fill the tensors by name)."""
        k, n = int(config["in_features"]), int(config["out_features"])
        m = cls(k, n, bias=bool(config.get("bias")), layernorm=bool(config.get("layernorm")),
                ln_eps=float(config.get("ln_eps", 1e-5)), dtype=dtype, device="meta")
        need = ["qweight", "g", "h"] + (["bias"] if m.bias is not None else []) + \
               (["ln.weight", "ln.bias"] if m.ln is not None else [])
        expect = {"qweight": (n, kernels.packed_cols(k, 1)), "g": (k,), "h": (n,), "bias": (n,),
                  "ln.weight": (n,), "ln.bias": (n,)}
        if tensors is not None:
            missing = [key for key in need if key not in tensors]
            if missing:
                raise KeyError(f"onebit layer lacks tensors {missing}")
            for key in need:
                if tuple(tensors[key].shape) != expect[key]:
                    raise ValueError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {expect[key]}")
        del m._buffers["sign"]
        m.to_empty(device="cpu")
        m.register_buffer("qweight", torch.zeros(expect["qweight"], dtype=torch.int32))
        with torch.no_grad():
            for key in need:
                target = m.qweight if key == "qweight" else m.get_parameter(key)
                if tensors is None:
                    target.zero_() if key in ("qweight", "bias", "ln.bias") else target.fill_(1.0)
                else:
                    target.copy_(tensors[key].to(target.dtype))
        m.state = "packed"
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def bits_per_weight(self) -> float:
        """Stored bits / (N * K): 1 for each sign plus the value vectors (and bias, LayerNorm) as exported."""
        vbits = torch.finfo(self._store_dtype()).bits
        n, k = self.out_features, self.in_features
        extra = n + k + (n if self.bias is not None else 0) + (2 * n if self.ln is not None else 0)
        return (n * kernels.packed_cols(k, 1) * 32 + vbits * extra) / (n * k)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, state={self.state}, "
             f"bias={self.bias is not None}, layernorm={self.ln is not None}")
        if self.state == "train":
            s += f", mode={self.mode}" + (f", surrogate={self.surrogate}" if self.mode == "latent" else "")
            s += f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return s


def onebit_layers(model: nn.Module):
    """(name, OneBitLinear) of every OneBit layer in model order."""
    for name, mod in model.named_modules():
        if isinstance(mod, OneBitLinear):
            yield name, mod


def _register():
    try:
        from qft.formats import register_module_type
    except ImportError:  # formats not available: the methods still exist
        return
    register_module_type(OneBitLinear)


_register()
