"""WKVQuant's KV cache: past-only, two-dimensional quantization, as a transformers ``Cache``.

Two-dimensional quantization (WKVQuant, Yue et al., 2024, arXiv:2402.12065): a **static,
per-channel** smoothing learned at calibration, ``x' = (x - shift) / scale`` (channel dimension),
followed by **dynamic, per-token** asymmetric min-max quantization of x' in groups of channels
(token dimension); dequantization is ``x = x'^ * scale + shift``. The per-token part reuses KIVI's
value quantizer (:func:`qft.nn.kv_cache.quantize_values`: packed codes, float16 scale and minimum).

**Past-only**: at every step the tokens being processed attend to their own keys and values in
full precision; they are quantized when stored, so only *past* tokens are ever seen quantized (no
full-precision window beyond the current step). :class:`WKVCache` does exactly that.

The smoothing parameters of a layer travel with the model in :class:`WKVProj`, which replaces
``k_proj`` / ``v_proj`` (same weights, plus ``kv_shift`` / ``kv_scale`` buffers and the KV settings;
native-format hooks included); :func:`wkv_cache` builds a cache from a model that has them.
Tensors follow transformers' layout ``[batch, kv_heads, tokens, head_dim]``; keys are stored after RoPE.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from qft.nn.kv_cache import BatchOpsMixin, cat_q, dequantize_values, nbytes, quantize_values
from qft.nn.mixed import ExportMixin
from qft.nn.quant import round_ste

__all__ = ["quantize_2d", "dequantize_2d", "fake_quant_2d", "WKVLayer", "WKVCache", "WKVProj", "wkv_cache",
           "wkv_check"]

KV_BITS = (2, 4, 8)


def wkv_check(bits: int, group_size: int, head_dim: int | None = None) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"WKVQuant kv bits={bits!r} is not valid; allowed: {KV_BITS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"WKVQuant group_size={group_size!r} is not valid; allowed: a positive integer")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"WKVQuant group_size={group_size} does not divide head_dim={head_dim}")


def _bcast(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """[H, D] channel parameters -> [1, H, 1, D]."""
    return None if p is None else p.to(device=x.device, dtype=torch.float32).reshape(1, x.shape[1], 1, x.shape[3])


def quantize_2d(x: torch.Tensor, shift, scale, bits: int, group_size: int) -> dict:
    """x [B, H, T, D] -> per-token packed codes of (x - shift) / scale (shift/scale [H, D] or None)."""
    xf = x.float()
    if shift is not None:
        xf = xf - _bcast(shift, x)
    if scale is not None:
        xf = xf / _bcast(scale, x)
    return quantize_values(xf, bits, group_size)


def dequantize_2d(q: dict, shift, scale, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    x = dequantize_values(q, bits, group_size)
    if scale is not None:
        x = x * _bcast(scale, x)
    if shift is not None:
        x = x + _bcast(shift, x)
    return x.to(dtype)


def _fp16_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (t.half().float() - t).detach()


def fake_quant_2d(x: torch.Tensor, shift, scale, bits: int, group_size: int) -> torch.Tensor:
    """Differentiable version for calibration: gradients reach x (STE) and the shift / scale
    (through the per-token ranges, which are not detached, and the rounding residue)."""
    b, h, t, d = x.shape
    y = x.float()
    if shift is not None:
        y = y - _bcast(shift, x)
    if scale is not None:
        y = y / _bcast(scale, x)
    g = y.reshape(b, h, t, d // group_size, group_size)
    maxq = 2 ** bits - 1
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = _fp16_ste(((mx - mn) / maxq).clamp_min(1e-6))  # the cache stores step and minimum in float16
    mn = _fp16_ste(mn)
    q = torch.clamp(round_ste((g - mn) / step), 0, maxq) * step + mn  # KIVI's min-based grid
    y = q.reshape(b, h, t, d)
    if scale is not None:
        y = y * _bcast(scale, x)
    if shift is not None:
        y = y + _bcast(shift, x)
    return y.to(x.dtype)


class WKVLayer(BatchOpsMixin, DynamicLayer):
    """One layer's past-only 2-D quantized cache. ``params``: {k_shift, k_scale, v_shift, v_scale} [H, D]."""

    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = 32, params: dict | None = None, **kwargs):
        super().__init__()
        wkv_check(bits, group_size)
        self.bits, self.group_size, self.params = bits, group_size, params or {}
        self.qkeys = self.qvalues = None
        self.n = 0

    def lazy_initialization(self, key_states, value_states):
        wkv_check(self.bits, self.group_size, key_states.shape[-1])
        super().lazy_initialization(key_states, value_states)

    def _p(self, name):
        return self.params.get(name)

    def dequantized_past(self, dtype):
        if self.n == 0:
            return None, None
        return (dequantize_2d(self.qkeys, self._p("k_shift"), self._p("k_scale"), self.bits, self.group_size, dtype),
                dequantize_2d(self.qvalues, self._p("v_shift"), self._p("v_scale"), self.bits, self.group_size, dtype))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pk, pv = self.dequantized_past(key_states.dtype)
        out_k = key_states if pk is None else torch.cat([pk, key_states], dim=-2)
        out_v = value_states if pv is None else torch.cat([pv, value_states], dim=-2)
        qk = quantize_2d(key_states, self._p("k_shift"), self._p("k_scale"), self.bits, self.group_size)
        qv = quantize_2d(value_states, self._p("v_shift"), self._p("v_scale"), self.bits, self.group_size)
        self.qkeys, self.qvalues = cat_q(self.qkeys, qk, -2), cat_q(self.qvalues, qv, -2)
        self.n += key_states.shape[-2]
        return out_k, out_v

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None
        self.n = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("WKVCache cannot crop quantized tokens (assisted decoding is not supported)")

    def _map_batch(self, fn):
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                for k in q:
                    q[k] = fn(q[k])

    def memory(self) -> dict:
        if not self.is_initialized or self.n == 0:
            return {"bytes": 0, "fp16_bytes": 0, "tokens": 0}
        b, h, t, packed = self.qkeys["codes"].shape
        d = packed * 8 // self.bits
        extra = sum(4 * p.numel() for p in self.params.values() if p is not None)
        return {"bytes": nbytes(self.qkeys) + nbytes(self.qvalues) + extra, "fp16_bytes": 2 * b * h * t * d * 2,
                "tokens": t}


class WKVCache(Cache):
    """Past-only 2-D quantized KV cache; ``layer_params`` holds one params dict per layer (or None:
    plain per-token quantization)."""

    def __init__(self, config=None, bits: int = 4, group_size: int = 32, layer_params: list | None = None):
        wkv_check(bits, group_size)
        self.wkv = {"bits": bits, "group_size": group_size}
        if config is not None:
            cfg = config.get_text_config(decoder=True)
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            wkv_check(bits, group_size, hd)
            n = cfg.num_hidden_layers
            lp = layer_params or [None] * n
            if len(lp) != n:
                raise ValueError(f"WKVCache: {len(lp)} layer_params for {n} layers")
            super().__init__(layers=[WKVLayer(bits, group_size, p) for p in lp])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(WKVLayer, bits=bits, group_size=group_size))

    def memory_report(self) -> dict:
        ms = [layer.memory() for layer in self.layers if isinstance(layer, WKVLayer)]
        held, fp16 = sum(m["bytes"] for m in ms), sum(m["fp16_bytes"] for m in ms)
        return {"bytes": held, "fp16_bytes": fp16, "saved": 1 - held / fp16 if fp16 else 0.0,
                "tokens": ms[0]["tokens"] if ms else 0, **self.wkv}


class WKVProj(ExportMixin, nn.Module):
    """k_proj / v_proj in full precision, carrying its layer's WKVQuant smoothing and KV settings."""

    qft_type = "wkv_proj"

    def __init__(self, in_features: int, out_features: int, bias: bool, head_dim: int, kv_bits: int,
                 group_size: int, role: str, dtype=torch.float32, device=None):
        super().__init__()
        if role not in ("key", "value"):
            raise ValueError(f"WKVProj role={role!r} is not valid; allowed: key, value")
        wkv_check(kv_bits, group_size, head_dim)
        self.in_features, self.out_features, self.head_dim = in_features, out_features, head_dim
        self.kv_bits, self.group_size, self.role = kv_bits, group_size, role
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_buffer("kv_shift", torch.zeros(out_features, device=device))
        self.register_buffer("kv_scale", torch.ones(out_features, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear, head_dim: int, kv_bits: int, group_size: int, role: str,
                    shift: torch.Tensor, scale: torch.Tensor) -> "WKVProj":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, head_dim, kv_bits, group_size, role,
                lin.weight.dtype, lin.weight.device)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
            m.kv_shift.copy_(shift.reshape(-1))
            m.kv_scale.copy_(scale.reshape(-1))
        return m

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) as [kv_heads, head_dim]."""
        return self.kv_shift.reshape(-1, self.head_dim), self.kv_scale.reshape(-1, self.head_dim)

    @classmethod
    def _from_config(cls, c: dict, dtype) -> "WKVProj":
        return cls(c["in_features"], c["out_features"], c["bias"], c["head_dim"], c["kv_bits"], c["group_size"],
                   c["role"], dtype=dtype)

    def export_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "head_dim": self.head_dim, "kv_bits": self.kv_bits, "group_size": self.group_size, "role": self.role}

    def bits_per_weight(self) -> float:
        return float(8 * self.weight.element_size())

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.role} cache: kv{self.kv_bits} g{self.group_size}"


def wkv_cache(model: nn.Module):
    """A zero-argument factory of fresh :class:`WKVCache` built from the model's WKVProj modules."""
    layers = model.model.layers
    params = []
    bits = group = None
    for i, layer in enumerate(layers):
        k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
        if not isinstance(k, WKVProj) or not isinstance(v, WKVProj):
            raise ValueError(f"layer {i} has no WKVProj k_proj/v_proj: quantize the model with "
                             f"qft.ptq.run('wkvquant', ...) first")
        bits, group = k.kv_bits, k.group_size
        (ks, kc), (vs, vc) = k.params(), v.params()
        params.append({"k_shift": ks, "k_scale": kc, "v_shift": vs, "v_scale": vc})
    return lambda: WKVCache(model.config, bits, group, params)


def _register():
    try:
        from qft.formats import register_module_type
    except ImportError:  # pragma: no cover
        return
    register_module_type(WKVProj)


_register()
