"""SmoothQuant: migrate activation outliers into the weights, then W8A8 (Xiao et al., 2023, arXiv:2211.10438).

Activations of LLMs have a few input channels with huge magnitudes, which ruin per-token int8
quantization; weights are flat. For each input channel j of a linear layer, divide the activation
by s_j and multiply the weight column by s_j (an exact identity in floating point):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (alpha = 0.5 by default)

The division is folded offline into the operation that produces X: the RMSNorm weight before
q/k/v and before gate/up, the rows of v_proj before o_proj (per kv head with GQA: the o_proj input
channels of all query heads sharing a kv head get the same s) and the rows of up_proj before
down_proj (down's input is act(gate) * up, linear in up). Then every targeted linear becomes an
:class:`qft.nn.int8.Int8Linear` (int8 per-channel weights, per-token dynamic int8 activations,
int8 GEMM through ``qft.kernels.int8_linear`` or torch) when the spec is W8A8 per channel, or a
fake-quant QuantLinear for other specs (e.g. W4A8).

alpha can be searched per smoothing group on a grid, minimizing the quantized output error of that
group's linears on captured calibration inputs. ``smooth=False`` gives the naive W8A8 baseline.

Statistics come block by block from ``qft.ptq.calibrate.sequential`` (each block sees the outputs
of the already-quantized blocks before it). Simplified: max |X| over the calibration tokens (no
EMA); the alpha search is local (each group's own output MSE on sampled tokens), not end-to-end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from qft.nn import quantize_model, set_module
from qft.nn.int8 import Int8Linear, int8_linear_ref, quantize_weight_int8
from qft.nn.quant import fake_quant_act, qdq_weight
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["SmoothQuantConfig", "smooth_scales", "smoothing_groups", "apply_smoothing",
           "smoothquant", "decoder_layers", "options_to_config", "group_scales"]


@dataclass
class SmoothQuantConfig:
    alpha: float = field(default=0.5, metadata={"help": "migration strength in [0, 1]"})
    search: bool = field(default=False, metadata={"help": "search alpha per smoothing group on alpha_grid"})
    alpha_grid: tuple = field(default=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), metadata={"help": "alphas tried by the search"})
    smooth: bool = field(default=True, metadata={"help": "False: naive W8A8 without smoothing (baseline)"})
    fold_vo: bool = field(default=True, metadata={"help": "also smooth o_proj inputs through v_proj"})
    fold_up_down: bool = field(default=True, metadata={"help": "also smooth down_proj inputs through up_proj"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per forward"})
    samples_per_layer: int = field(default=1024, metadata={"help": "tokens kept per layer for the alpha search"})

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"smoothquant alpha={self.alpha!r} is not valid; allowed: a number in [0, 1]")
        if any(not 0.0 <= float(a) <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"smoothquant alpha_grid={self.alpha_grid!r} is not valid; allowed: numbers in [0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"smoothquant batch_size={self.batch_size!r} is not valid; allowed: >= 1")


def options_to_config(cls, method: str, options: dict):
    """Build a config dataclass from method options, naming unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{method} got unknown option(s) {unknown}; allowed: {sorted(known)}")
    return cls(**options)


# --- model structure ----------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> list:
    """The Llama-style decoder layers (``model.model.layers``), checked for the modules we fold into."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers; this method "
                         f"needs a Llama-style causal LM (input_layernorm, self_attn.{{q,k,v,o}}_proj, "
                         f"post_attention_layernorm, mlp.{{gate,up,down}}_proj)")
    need = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for i, layer in enumerate(layers):
        missing = [n for n in need if _get(layer, n) is None]
        if missing:
            raise ValueError(f"decoder layer {i} ({type(layer).__name__}) lacks {missing}; this method needs a "
                             f"Llama-style layout")
    return list(layers)


def _get(mod, path):
    for p in path.split("."):
        mod = getattr(mod, p, None)
        if mod is None:
            return None
    return mod


@dataclass
class SmoothGroup:
    """Linears sharing one input, and what produces that input (a norm, or a linear's rows)."""
    kind: str  # "norm" | "linear"
    prev: nn.Module
    linears: list  # [(name, nn.Linear)]
    rep: int = 1  # GQA: query heads per kv head (v_proj -> o_proj)
    head_dim: int = 0


def smoothing_groups(model: nn.Module, fold_vo: bool = True, fold_up_down: bool = True) -> list[SmoothGroup]:
    layers = decoder_layers(model)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    groups = []
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        groups.append(SmoothGroup("norm", layer.input_layernorm,
                                  [(p + "self_attn.q_proj", a.q_proj), (p + "self_attn.k_proj", a.k_proj),
                                   (p + "self_attn.v_proj", a.v_proj)]))
        if fold_vo:
            groups.append(SmoothGroup("linear", a.v_proj, [(p + "self_attn.o_proj", a.o_proj)],
                                      rep=n_heads // n_kv, head_dim=hd))
        groups.append(SmoothGroup("norm", layer.post_attention_layernorm,
                                  [(p + "mlp.gate_proj", m.gate_proj), (p + "mlp.up_proj", m.up_proj)]))
        if fold_up_down:
            groups.append(SmoothGroup("linear", m.up_proj, [(p + "mlp.down_proj", m.down_proj)]))
    return groups


# --- the math -------------------------------------------------------------------------------------

def smooth_scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), guarded against zeros."""
    x = x_amax.float().clamp_min(1e-5)
    w = w_amax.float().clamp_min(1e-5)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(1e-5, 1e5)


def group_scales(g: SmoothGroup, x_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scales for the group's input channels; with GQA (v->o) tied across query heads of a kv head."""
    w_amax = torch.stack([lin.weight.detach().abs().amax(0).float() for _, lin in g.linears]).amax(0)
    if g.kind == "linear" and g.rep > 1:
        n_kv = x_amax.numel() // (g.rep * g.head_dim)
        xs = x_amax.reshape(n_kv, g.rep, g.head_dim).amax(1)
        ws = w_amax.reshape(n_kv, g.rep, g.head_dim).amax(1)
        return smooth_scales(xs, ws, alpha).unsqueeze(1).expand(n_kv, g.rep, g.head_dim).reshape(-1)
    return smooth_scales(x_amax, w_amax, alpha)


@torch.no_grad()
def apply_smoothing(g: SmoothGroup, s: torch.Tensor) -> None:
    """Fold 1/s into the producer and s into the consumers' weight columns (exact in float)."""
    s = s.to(g.linears[0][1].weight.device)
    if g.kind == "norm":
        g.prev.weight.div_(s.to(g.prev.weight.dtype))
    else:
        s_rows = s.reshape(-1, g.rep, g.head_dim)[:, 0].reshape(-1) if g.rep > 1 else s
        g.prev.weight.div_(s_rows.to(g.prev.weight.dtype).unsqueeze(1))
        if g.prev.bias is not None:
            g.prev.bias.div_(s_rows.to(g.prev.bias.dtype))
    for _, lin in g.linears:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def _quant_error(x: torch.Tensor, linears: list, s: torch.Tensor, spec: QuantSpec) -> float:
    xs = x / s
    err = 0.0
    for _, lin in linears:
        w = lin.weight.detach().float()
        y = x @ w.t()
        ws = w * s.unsqueeze(0)
        if _is_w8a8(spec):
            q, sw = quantize_weight_int8(ws)
            yq = int8_linear_ref(xs, q, sw)
        else:
            gs = spec.group_for(ws.shape[1])
            yq = fake_quant_act(xs, spec.act_bits or 16) if spec.act_bits else xs
            yq = yq @ qdq_weight(ws, spec.bits, gs, spec.symmetric, spec.scheme).t()
        err += (yq - y).pow(2).mean().item()
    return err


def _is_w8a8(spec: QuantSpec) -> bool:
    return spec.bits == 8 and spec.group_size is None and spec.act_bits == 8 and spec.scheme == "int"


# --- the method -----------------------------------------------------------------------------------

@METHODS.register("smoothquant")
def smoothquant(model: nn.Module, spec: "QuantSpec | str" = "w8a8", calib: torch.Tensor | None = None,
                **options) -> nn.Module:
    """Smooth (fold scales offline) and quantize ``model`` in place; ``calib`` [n, seq_len] token ids.

    Runs block by block through :func:`qft.ptq.calibrate.sequential`: each block's input statistics
    come from the already-quantized blocks before it.
    """
    cfg = options_to_config(SmoothQuantConfig, "smoothquant", options)
    spec = resolve_spec(spec)
    if spec.act_bits is None:
        raise ValueError("smoothquant needs activation quantization: QuantSpec.act_bits=None; use e.g. preset "
                         "'w8a8' (act_bits=8)")
    groups = smoothing_groups(model, cfg.fold_vo, cfg.fold_up_down)  # also checks the layout
    if not cfg.smooth:
        return quantize_linears_w8a8(model, spec)
    if calib is None or len(calib) == 0:
        raise ValueError("smoothquant needs calibration windows (calib=[n, seq_len] token ids); got none")
    from qft.ptq.calibrate import sequential
    alphas = {}

    def process(ctx):
        stats = ctx.collect(hessian=False, absmax=True, store_tokens=cfg.samples_per_layer if cfg.search else 0)
        for g in groups:
            name = g.linears[0][0]
            if not name.startswith(ctx.name + "."):
                continue
            st = stats.get(name[len(ctx.name) + 1:])
            if st is None:  # not targeted by the spec: leave this input alone
                continue
            alpha = cfg.alpha
            if cfg.search:
                x = st.tokens.to(g.linears[0][1].weight.device)
                errs = {a: _quant_error(x, g.linears, group_scales(g, st.absmax, a), spec) for a in cfg.alpha_grid}
                alpha = min(errs, key=errs.get)
            alphas[name] = alpha
            apply_smoothing(g, group_scales(g, st.absmax, alpha))
        for short, lin in list(ctx.linears.items()):
            ctx.replace(short, _quantized(lin, spec, f"{ctx.name}.{short}"))

    sequential(model, calib, spec, process, batch_size=cfg.batch_size, desc="smoothquant")
    model.qft_smoothquant_alphas = alphas
    return model


def _quantized(lin: nn.Linear, spec: QuantSpec, name: str) -> nn.Module:
    if _is_w8a8(spec):
        return Int8Linear.from_linear(lin)
    from qft.nn.qlinear import QuantLinear
    return QuantLinear.from_linear(lin, spec, name=name)


def quantize_linears_w8a8(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Int8Linear for every targeted linear when the spec is W8A8 per channel, else QuantLinear."""
    if not _is_w8a8(spec):
        return quantize_model(model, spec)
    from qft.nn import target_linears
    layers = list(target_linears(model, spec))
    if not layers:
        raise ValueError(f"no nn.Linear matches targets={list(spec.targets)} with ignore={list(spec.ignore)}")
    for name, lin in layers:
        set_module(model, name, Int8Linear.from_linear(lin))
    model.qft_spec = spec
    return model
