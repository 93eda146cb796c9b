"""KIVI KV-cache quantization as a transformers ``Cache`` (math + cache class).

KIVI (Liu et al., 2024, arXiv:2402.02750): keys are quantized per channel (a group of ``G``
consecutive tokens shares one scale and minimum per channel: key caches have outlier channels),
values per token (groups of ``G`` channels of one token's head vector), asymmetric min-max,
2 or 4 bits (8 for checks); the most recent tokens stay in full precision (a residual window of
``R`` tokens) and only whole groups of ``G`` tokens that left the window are quantized.

Tensors follow transformers' cache layout ``[batch, kv_heads, tokens, head_dim]``. Codes are
packed 8 // bits per byte; scales and minima are float16. ``KIVICache`` plugs into
``model.generate(..., past_key_values=KIVICache(model.config))`` and into a plain forward with
``past_key_values=``; :meth:`KIVICache.memory_report` gives the bytes held against a float16
cache. The method page (what was simplified, the evaluation with the cache in the loop) is
``qft/ptq/kivi.py``. This lives in ``qft.nn`` (not ``qft.ptq``) so that modules and trainers can
use it without importing upward.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["KIVICache", "KIVILayer", "kivi_check", "quantize_asym", "dequantize_asym", "pack_codes",
           "unpack_codes", "quantize_keys", "dequantize_keys", "quantize_values", "dequantize_values",
           "qdq_keys", "qdq_values"]

KV_BITS = (2, 4, 8)
STAT_DTYPE = torch.float16


def kivi_check(bits: int, group_size: int, residual_length: int, head_dim: int | None = None,
               sink_tokens: int = 0) -> None:
    """Raise a clear ValueError for settings KIVI cannot use."""
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"KIVI sink_tokens={sink_tokens!r} is not valid; allowed: an integer >= 0")
    if bits not in KV_BITS:
        raise ValueError(f"KIVI bits={bits!r} is not valid; allowed: {KV_BITS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"KIVI group_size={group_size!r} is not valid; allowed: a positive integer")
    if not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"KIVI residual_length={residual_length!r} is not valid; allowed: an integer >= 0")
    if head_dim is not None and head_dim % group_size:
        valid = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0]
        raise ValueError(f"KIVI group_size={group_size} does not divide head_dim={head_dim} (values are grouped "
                         f"along the head dimension); valid group sizes: {valid}")



# --- asymmetric min-max over the last axis ------------------------------------------------------

def quantize_asym(x: torch.Tensor, bits: int):
    """Min-max quantization over the last axis: codes uint8 [..., n], scale and min [..., 1] float16."""
    maxq = 2 ** bits - 1
    xf = x.float()
    mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((mx - mn) / maxq).clamp_min(1e-6).to(STAT_DTYPE)
    mn = mn.to(STAT_DTYPE)
    codes = torch.round((xf - mn.float()) / scale.float()).clamp_(0, maxq).to(torch.uint8)
    return codes, scale, mn


def dequantize_asym(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float() + mn.float()).to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 8 // bits codes per byte along the last axis (its length must be a multiple of 8 // bits)."""
    per = 8 // bits
    if per == 1:
        return codes
    *lead, n = codes.shape
    c = codes.reshape(*lead, n // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


# --- keys: per channel, groups of G tokens --------------------------------------------------------

def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> dict:
    """k [B, H, T, D] with T a multiple of group_size -> packed codes [B, H, D, T*bits/8] and
    scale / min [B, H, D, T // G] (channel-major, so each group of tokens is contiguous)."""
    b, h, t, d = k.shape
    if t % group_size:
        raise ValueError(f"quantize_keys: {t} tokens is not a multiple of group_size={group_size}")
    kt = k.transpose(2, 3).reshape(b, h, d, t // group_size, group_size)
    codes, scale, mn = quantize_asym(kt, bits)
    return {"codes": pack_codes(codes.reshape(b, h, d, t), bits), "scale": scale.squeeze(-1), "min": mn.squeeze(-1)}


def dequantize_keys(q: dict, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_codes(q["codes"], bits)
    b, h, d, t = codes.shape
    x = dequantize_asym(codes.reshape(b, h, d, t // group_size, group_size), q["scale"].unsqueeze(-1),
                        q["min"].unsqueeze(-1), dtype)
    return x.reshape(b, h, d, t).transpose(2, 3)


# --- values: per token, groups of G channels ------------------------------------------------------

def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> dict:
    """v [B, H, T, D] -> packed codes [B, H, T, D*bits/8], scale / min [B, H, T, D // G]."""
    b, h, t, d = v.shape
    if d % group_size:
        kivi_check(bits, group_size, 0, d)
    codes, scale, mn = quantize_asym(v.reshape(b, h, t, d // group_size, group_size), bits)
    return {"codes": pack_codes(codes.reshape(b, h, t, d), bits), "scale": scale.squeeze(-1), "min": mn.squeeze(-1)}


def dequantize_values(q: dict, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_codes(q["codes"], bits)
    b, h, t, d = codes.shape
    x = dequantize_asym(codes.reshape(b, h, t, d // group_size, group_size), q["scale"].unsqueeze(-1),
                        q["min"].unsqueeze(-1), dtype)
    return x.reshape(b, h, t, d)


def qdq_keys(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return dequantize_keys(quantize_keys(k, bits, group_size), bits, group_size, k.dtype)


def qdq_values(v: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return dequantize_values(quantize_values(v, bits, group_size), bits, group_size, v.dtype)


# --- RoPE undo / redo (pre-RoPE key quantization, KVQuant's variant) ---------------------------

def rope_inv_freq(config) -> torch.Tensor:
    """The rotary frequencies [head_dim // 2] of a Llama-style config (its rope type's init function)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = config.get_text_config(decoder=True)
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return ROPE_INIT_FUNCTIONS[rope_type](cfg)[0].float()


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the RoPE angles of ``positions`` [T] (``sign=-1``: undo them), in the
    rotate-half convention of Llama. Undo then redo with the same positions is exact (a rotation), so
    it need not match the model's own positions."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(x.device)[None, :]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos(), sign * ang.sin()
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).to(x.dtype)


def cat_q(a: dict | None, b: dict, dim: int) -> dict:
    """Append quantized chunk ``b`` to store ``a`` along the token axis ``dim`` of every tensor."""
    if a is None:
        return b
    return {k: torch.cat([a[k], b[k]], dim=dim) for k in a}


def nbytes(q: dict | None) -> int:
    return 0 if q is None else sum(t.numel() * t.element_size() for t in q.values())



# --- the cache ------------------------------------------------------------------------------------

class BatchOpsMixin:
    """Beam search / batch expansion for cache layers: each applies ``fn`` through ``_map_batch``."""

    def reorder_cache(self, beam_idx):
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map_batch(lambda t: t[indices, ...])


class KIVILayer(BatchOpsMixin, DynamicLayer):
    """One attention layer's KIVI cache: the first ``sink_tokens`` tokens in full precision (0 by
    default: plain KIVI), a quantized past (keys per channel, values per token) and a full-precision
    window ``self.keys`` / ``self.values`` of the most recent tokens."""

    is_croppable = False

    def __init__(self, bits: int = 2, group_size: int = 32, residual_length: int = 128,
                 value_bits: int | None = None, sink_tokens: int = 0, inv_freq: torch.Tensor | None = None,
                 **kwargs):
        super().__init__()
        self.inv_freq = inv_freq  # set: keys are quantized before RoPE (undone / redone around the codes)
        value_bits = bits if value_bits is None else value_bits
        kivi_check(bits, group_size, residual_length, sink_tokens=sink_tokens)
        kivi_check(value_bits, group_size, residual_length)
        self.key_bits, self.value_bits = bits, value_bits
        self.group_size, self.residual_length, self.sink_tokens = group_size, residual_length, sink_tokens
        self.qkeys = self.qvalues = None  # dicts of packed codes / scale / min, see quantize_keys
        self.sink_keys = self.sink_values = None  # [B, H, <= sink_tokens, D], full precision
        self.n_quantized = 0

    def lazy_initialization(self, key_states, value_states):
        kivi_check(self.key_bits, self.group_size, self.residual_length, value_states.shape[-1])
        super().lazy_initialization(key_states, value_states)

    def dequantized_past(self, dtype):
        if self.n_quantized == 0:
            return None, None
        k = dequantize_keys(self.qkeys, self.key_bits, self.group_size, torch.float32)
        if self.inv_freq is not None:
            k = rotate(k, self.n_sink() + torch.arange(self.n_quantized, device=k.device), self.inv_freq)
        return (k.to(dtype),
                dequantize_values(self.qvalues, self.value_bits, self.group_size, dtype))

    def n_sink(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        take = min(self.sink_tokens - self.n_sink(), key_states.shape[-2])
        if take > 0:  # the first tokens of the sequence (the attention sink) never leave full precision
            sk, sv = key_states[..., :take, :], value_states[..., :take, :]
            self.sink_keys = sk if self.sink_keys is None else torch.cat([self.sink_keys, sk], dim=-2)
            self.sink_values = sv if self.sink_values is None else torch.cat([self.sink_values, sv], dim=-2)
            key_states, value_states = key_states[..., take:, :], value_states[..., take:, :]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        pk, pv = self.dequantized_past(self.keys.dtype)
        parts_k = [t for t in (self.sink_keys, pk, self.keys) if t is not None]
        parts_v = [t for t in (self.sink_values, pv, self.values) if t is not None]
        out_k = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=-2)
        out_v = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, dim=-2)
        self._flush()
        return out_k, out_v

    def _flush(self):
        """Quantize the oldest whole groups once the window holds >= R + G tokens."""
        n_fp, g = self.keys.shape[-2], self.group_size
        if n_fp < self.residual_length + g:
            return
        n = (n_fp - self.residual_length) // g * g
        k_old, v_old = self.keys[..., :n, :], self.values[..., :n, :]
        if self.inv_freq is not None:
            pos = self.n_sink() + self.n_quantized + torch.arange(n, device=k_old.device)
            k_old = rotate(k_old.float(), pos, self.inv_freq, sign=-1.0)
        self.qkeys = cat_q(self.qkeys, quantize_keys(k_old, self.key_bits, g), dim=-1)
        self.qvalues = cat_q(self.qvalues, quantize_values(v_old, self.value_bits, g), dim=-2)
        self.keys, self.values = self.keys[..., n:, :].contiguous(), self.values[..., n:, :].contiguous()
        self.n_quantized += n

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_sink() + self.n_quantized + self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = self.sink_keys = self.sink_values = None
        self.n_quantized = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KIVICache cannot crop quantized tokens (assisted decoding is not supported)")

    def _map_batch(self, fn):
        if self.get_seq_length() == 0:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.sink_keys is not None:
            self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                for k in q:
                    q[k] = fn(q[k])

    def memory(self) -> dict:
        """Bytes held now, and what a float16 cache of the same tokens would hold."""
        if not self.is_initialized:
            return {"bytes": 0, "fp16_bytes": 0, "tokens": 0, "quantized_tokens": 0}
        b, h, _, d = self.keys.shape
        fp_window = 2 * (self.keys.numel() + (0 if self.sink_keys is None else self.sink_keys.numel())) * 2
        held = nbytes(self.qkeys) + nbytes(self.qvalues) + fp_window
        return {"bytes": held, "fp16_bytes": 2 * b * h * self.get_seq_length() * d * 2,
                "tokens": self.get_seq_length(), "quantized_tokens": self.n_quantized}


class KIVICache(Cache):
    """KIVI quantized KV cache for ``model.generate`` / forward ``past_key_values``.

    ``bits`` (keys; values too unless ``value_bits``), ``group_size`` G (key groups along tokens,
    value groups along the head dimension, which it must divide), ``residual_length`` R (recent
    tokens kept in full precision), ``sink_tokens`` (the first tokens of the sequence, kept in full
    precision for good: the attention sink; 0 = plain KIVI, the default). With ``config`` one layer per decoder layer is built up front;
    without, layers are added as they are first used.
    """

    def __init__(self, config=None, bits: int = 2, group_size: int = 32, residual_length: int = 128,
                 value_bits: int | None = None, sink_tokens: int = 0, pre_rope: bool = False):
        kw = dict(bits=bits, group_size=group_size, residual_length=residual_length, value_bits=value_bits,
                  sink_tokens=sink_tokens)
        KIVILayer(**kw)  # validate now, with a clear message
        self.kivi = {**kw, "pre_rope": pre_rope}
        if pre_rope:
            if config is None:
                raise ValueError("KIVICache pre_rope=True needs the model config (for the RoPE frequencies)")
            kw["inv_freq"] = rope_inv_freq(config)
        if config is not None:
            cfg = config.get_text_config(decoder=True)
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kivi_check(bits, group_size, residual_length, head_dim, sink_tokens)
            super().__init__(layers=[KIVILayer(**kw) for _ in range(cfg.num_hidden_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(KIVILayer, **kw))

    def memory_report(self) -> dict:
        """Totals over layers: bytes held, float16 bytes for the same tokens, the fraction saved."""
        ms = [layer.memory() for layer in self.layers if isinstance(layer, KIVILayer)]
        held, fp16 = sum(m["bytes"] for m in ms), sum(m["fp16_bytes"] for m in ms)
        tokens = ms[0]["tokens"] if ms else 0
        return {"bytes": held, "fp16_bytes": fp16, "saved": 1 - held / fp16 if fp16 else 0.0,
                "tokens": tokens, "quantized_tokens": ms[0]["quantized_tokens"] if ms else 0, **self.kivi}
