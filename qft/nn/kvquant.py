"""KV-cache fake quantization during QAT and evaluation (LLM-QAT's W4A8KV4), via forward hooks.

LLM-QAT (Liu et al., 2023) quantizes the key/value cache per token during training so the model
learns to live with it. The cache holds exactly the outputs of the k/v projections (before RoPE
for keys in Llama; LLM-QAT quantizes the projection outputs too), so a forward hook on every
``k_proj`` / ``v_proj`` module replaces its output by Q(output) with a straight-through estimator:
no forked modeling code, and it works the same on nn.Linear, QuantLinear and peft LoRA wrappers
(the hook sits on the outermost module of that name, so the LoRA contribution is quantized too).

Granularity (``spec.kv_granularity``): ``token`` — asymmetric min-max per token and head (or per
``kv_group_size`` channels of a head); ``channel`` — per channel over the tokens of the sequence
(KIVI's key layout; it looks at the whole sequence, so it is a training / evaluation
approximation of a streaming cache). Simplified: RoPE is applied after quantization.
"""

from __future__ import annotations

import torch
from torch import nn

from qft.nn.quant import round_ste
from qft.spec import QuantSpec

__all__ = ["kv_fake_quant", "install_kv_quant", "remove_kv_quant", "KV_MODULES"]

KV_MODULES = ("k_proj", "v_proj")


def kv_fake_quant(t: torch.Tensor, bits: int, head_dim: int, granularity: str = "token",
                  group_size: int | None = None) -> torch.Tensor:
    """Asymmetric fake quant (STE) of a projection output [B, T, heads * head_dim]."""
    if t.shape[-1] % head_dim:
        raise ValueError(f"kv output width {t.shape[-1]} is not a multiple of head_dim={head_dim}")
    gs = group_size or head_dim
    if head_dim % gs:
        raise ValueError(f"kv_group_size={gs} does not divide head_dim={head_dim}")
    shape = t.shape
    x = t.float().reshape(*shape[:-1], shape[-1] // gs, gs)
    if granularity == "token":
        lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    elif granularity == "channel":
        dim = x.dim() - 3  # the token axis
        lo, hi = x.amin(dim, keepdim=True).clamp_max(0), x.amax(dim, keepdim=True).clamp_min(0)
    else:
        raise ValueError(f"kv_granularity={granularity!r} is not valid; allowed: token, channel")
    maxq = 2 ** bits - 1
    s = ((hi - lo) / maxq).clamp_min(1e-8).detach()
    z = torch.round(-lo / s).detach()
    q = (torch.clamp(round_ste(x / s) + z, 0, maxq) - z) * s
    return q.reshape(shape).to(t.dtype)


def _head_dim(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    hd = getattr(cfg, "head_dim", None)
    if hd is None and cfg is not None:
        hd = cfg.hidden_size // cfg.num_attention_heads
    if hd is None:
        raise ValueError("cannot find head_dim: the model has no config with head_dim or hidden_size/num_attention_heads")
    return int(hd)


def remove_kv_quant(model: nn.Module) -> None:
    for h in getattr(model, "_qft_kv_hooks", []):
        h.remove()
    model._qft_kv_hooks = []


def install_kv_quant(model: nn.Module, spec: QuantSpec) -> int:
    """Hook KV fake quant on every outermost k_proj / v_proj; idempotent. Returns the number hooked."""
    remove_kv_quant(model)
    if not spec.kv_bits:
        return 0
    hd = _head_dim(getattr(model, "base_model", model) if not hasattr(model, "config") else model)
    bits, gran, gs = spec.kv_bits, spec.kv_granularity, spec.kv_group_size

    def hook(_mod, _inp, out):
        return kv_fake_quant(out, bits, hd, gran, gs)

    handles = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if parts[-1] in KV_MODULES and "base_layer" not in parts:
            handles.append(mod.register_forward_hook(hook))
    if not handles:
        raise ValueError(f"kv_bits={bits} but the model has no modules named {', '.join(KV_MODULES)}")
    model._qft_kv_hooks = handles
    return len(handles)
