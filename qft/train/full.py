"""Full QAT (BitDistiller's setting): every quantized weight trainable, no LoRA.

Each ``QuantLinear`` keeps its float latent weight W, made trainable; the forward fake-quantizes it
with min-max quantization parameters recomputed from the current weight (``dynamic``) and a
straight-through estimator, so what trains is exactly what is exported and "merging" is the
identity. Before training, weights are clamped to the per-group ranges chosen by the clipping
search (``qft_clip`` ratios of ``qft.ptq.clip``), so the dynamic min-max starts from the searched
clipping, as BitDistiller does. Costs the most memory of the three modes (fp32 weights + Adam
moments for every linear), which is why it is the comparison point, not the default.
"""

from __future__ import annotations

import torch
from torch import nn

from qft.nn import quant_linears


@torch.no_grad()
def clamp_to_clip(m) -> None:
    """Clamp a QuantLinear's weight to its searched per-group clip range (no-op without ``qft_clip``)."""
    ratios = getattr(m, "qft_clip", None)
    if ratios is None:
        return
    a, b = ratios
    g = m.weight.data.view(m.out_features, -1, m.group_size)
    hi = (g.amax(-1).clamp_min(0) * a.to(g.device)).unsqueeze(-1)
    lo = (g.amin(-1).clamp_max(0) * b.to(g.device)).unsqueeze(-1)
    g.copy_(torch.maximum(torch.minimum(g, hi), lo))


def apply_full_qat(model: nn.Module) -> nn.Module:
    """Make every QuantLinear weight trainable (dynamic min-max, STE); freeze everything else."""
    layers = list(quant_linears(model))
    if not layers:
        raise ValueError("lora.mode=full: the model has no QuantLinear; quantize it first")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in layers:
        if m.state != "fake":
            raise ValueError(f"lora.mode=full: {m.layer_name} is packed; full QAT needs the float latent weight")
        clamp_to_clip(m)
        m.dynamic = True
        m.weight.requires_grad_(True)
    model.qft_lora_mode = "full"
    return model
