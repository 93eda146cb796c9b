"""OmniQuant: learnable weight clipping + learnable equivalent transformation, block by block
(Shao et al., 2024, arXiv:2308.13137).

Each decoder block in turn is trained to reproduce the full-precision block's outputs (MSE) on the
calibration activations, with the weights frozen and only two small sets of parameters learned:

* **LWC** (learnable weight clipping): per group of each linear, clip factors
  sigmoid(gamma), sigmoid(beta) shrink the max and min of the min-max range
  (:func:`qft.nn.quant.lwc_qparams`); gradients flow through the STE. The paper starts every
  factor at sigmoid(4) = 0.982 and trains 20 epochs; with a CPU budget of a few dozen steps per
  block we start from the per-group clip search of :mod:`qft.ptq.clip` (``init='clip'``, on the
  block's Hessian, after LET scaling) and let LWC refine it (``init='minmax'`` is the paper's).
* **LET** (learnable equivalent transformation): per input channel of q/k/v (after the input
  RMSNorm), gate/up (after the post-attention RMSNorm) and o_proj (after v_proj; tied across the
  query heads that share a kv head with GQA), a scale s with X W^T = (X / s)(W * s)^T, initialized
  with SmoothQuant's max|X|^0.5 / max|W|^0.5 and learned; the 1/s is folded into the RMSNorm weight
  or v_proj's rows afterwards, so the deployed model has no extra operation.

The learned block is then frozen into QuantLinear modules (fake state) whose integers are exactly
those the training forward used. Weight-only (W4A16 g64: LWC; LET off by default, as the paper does
for weight-only LLaMA) and weight-activation (W6A6, W4A8: LWC + LET, per-token activations from
``QuantSpec.act_bits``) settings come from the spec.

The training target is, by default, the paper's (``target='fp'``, its fp_inps): the FP model's own
block outputs, carried along block by block in a second stream of calibration activations, so each
block also learns to undo the error the quantized blocks before it left. ``target='quant'`` is the FP
block on the inputs the already-quantized blocks produce (on SmolLM2 W4A16 g64, 16 calibration
windows, 32 steps a block: 28.08 / 57.58 wikitext-2 / tinyshakespeare ppl against 27.89 / 55.50 for
``fp``).

Training runs ``steps`` Adam steps per block, or ``epochs`` passes over the calibration windows
(the paper: 20 epochs of 128 windows, one window a step), in minibatches of ``train_batch`` windows;
``max_seconds`` caps the wall clock of the whole training (shared out over the blocks), so a run
fits a time budget whatever the device.

Simplified: LET is scale-only (the paper also drops the channel-wise shift for LLaMA, whose
linears have no bias), no query/key scaling inside attention, constant learning rates; if training
does not lower a block's MSE on the whole calibration set, the block keeps its initialization.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qft.nn import quant as Q
from qft.nn.qlinear import QuantLinear
from qft.ptq.smoothquant import decoder_layers, options_to_config, smooth_scales
from qft.ptq.zeroquant import train_block
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["OmniQuantConfig", "OmniLinear", "omniquant"]


@dataclass
class OmniQuantConfig:
    lwc: bool = field(default=True, metadata={"help": "learnable weight clipping"})
    let: bool | None = field(default=None, metadata={
        "help": "learnable equivalent transformation; None = on when the spec quantizes activations"})
    steps: int = field(default=60, metadata={"help": "Adam steps per block (unless epochs is set)"})
    epochs: float = field(default=0.0, metadata={
        "help": "passes over the calibration windows per block (the paper: 20); > 0 overrides steps with "
                "ceil(epochs * n_windows / train_batch)"})
    max_seconds: float = field(default=0.0, metadata={
        "help": "wall-clock cap on the training of all blocks together (0 = none): each block gets the time "
                "left divided by the blocks left, and stops early when it is spent"})
    lwc_lr: float = field(default=1e-2, metadata={"help": "learning rate of the clipping logits"})
    let_lr: float = field(default=5e-3, metadata={"help": "learning rate of the LET scales"})
    lwc_init: float = field(default=4.0, metadata={"help": "initial clipping logit (sigmoid(4) = 0.982)"})
    init: str = field(default="clip", metadata={
        "help": "clip: start LWC from the per-group clip search of qft.ptq.clip (output error on the "
                "block's Hessian); minmax: from lwc_init everywhere (the paper)"})
    let_alpha: float = field(default=0.5, metadata={"help": "SmoothQuant alpha of the LET initialization"})
    target: str = field(default="fp", metadata={
        "help": "what each block learns to output: fp = the full-precision model's own block outputs (the "
                "paper's fp_inps: the block also learns to undo the error of the blocks before it); quant = the "
                "FP block on the inputs the quantized blocks before it produce"})
    train_batch: int = field(default=2, metadata={"help": "calibration windows per step"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward when capturing"})
    seed: int = field(default=0, metadata={"help": "minibatch order"})
    check: bool = field(default=False, metadata={
        "help": "also measure the frozen block's MSE (one more pass per block; tests use it)"})

    def __post_init__(self):
        for k in ("steps", "train_batch", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"omniquant {k}={v!r} is not valid; allowed: an integer >= {0 if k == 'steps' else 1}")
        for k in ("epochs", "max_seconds"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"omniquant {k}={v!r} is not valid; allowed: a number >= 0")
        if self.target not in ("quant", "fp"):
            raise ValueError(f"omniquant target={self.target!r} is not valid; allowed: quant, fp")
        if self.init not in ("clip", "minmax"):
            raise ValueError(f"omniquant init={self.init!r} is not valid; allowed: clip, minmax")
        for k in ("lwc_lr", "let_lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"omniquant {k}={getattr(self, k)!r} is not valid; allowed: a positive number")


class OmniLinear(nn.Module):
    """Training view of one linear: frozen W, learnable clip logits, optional LET scales.

    ``in_scale`` multiplies W's columns (and, when ``divide_input``, divides the input: a scale
    folded into a preceding norm); ``out_scale`` divides W's rows (the producer side of v -> o).
    """

    def __init__(self, lin: nn.Linear, spec: QuantSpec, lwc: bool, lwc_init: float):
        super().__init__()
        self.lin, self.spec = lin, spec
        self.gs = spec.group_for(lin.in_features)
        g = lin.in_features // self.gs
        shape = (lin.out_features, g)
        self.gamma = nn.Parameter(torch.full(shape, lwc_init, device=lin.weight.device), requires_grad=lwc)
        self.beta = nn.Parameter(torch.full(shape, lwc_init, device=lin.weight.device), requires_grad=lwc)
        self.lwc = lwc
        self.in_scale = self.out_scale = None  # shared nn.Parameters (or callables returning tensors)
        self.divide_input = False

    def weight(self) -> torch.Tensor:
        w = self.lin.weight.float()
        if self.out_scale is not None:
            w = w / self.out_scale().unsqueeze(1)
        if self.in_scale is not None:
            w = w * self.in_scale().unsqueeze(0)
        return w

    def qparams(self, w):
        if self.lwc:
            return Q.lwc_qparams(w, self.gamma, self.beta, self.spec.bits, self.gs, self.spec.symmetric)
        return Q.minmax_qparams(w, self.spec.bits, self.gs, self.spec.symmetric)

    def forward(self, x):
        if self.divide_input and self.in_scale is not None:
            x = x / self.in_scale().to(x.dtype)
        if self.spec.act_bits:
            x = Q.fake_quant_act(x, self.spec.act_bits, self.spec.act_granularity, self.spec.act_symmetric)
        w = self.weight()
        s, z = self.qparams(w)
        wq = Q.fake_quant(w, s, z, self.spec.bits, self.gs)
        return F.linear(x, wq.to(x.dtype), self.lin.bias)


def _let_groups(block, rep, head_dim):
    """(producer, [consumer short names], kind, rep) for the LET pairs of a Llama block."""
    return [(block.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm", 1),
            (block.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "norm", 1),
            ("self_attn.v_proj", ["self_attn.o_proj"], "linear", rep)]


@METHODS.register("omniquant")
def omniquant(model: nn.Module, spec: "QuantSpec | str" = "w4g64", calib: torch.Tensor | None = None,
              **options) -> nn.Module:
    """OmniQuant in place: LWC (+ LET when activations are quantized), trained block by block."""
    cfg = options_to_config(OmniQuantConfig, "omniquant", options)
    spec = resolve_spec(spec)
    if spec.scheme != "int":
        raise ValueError(f"omniquant learns clipping of a uniform integer grid; QuantSpec.scheme={spec.scheme!r} "
                         f"is not supported (allowed: 'int')")
    let = bool(spec.act_bits) if cfg.let is None else cfg.let
    decoder_layers(model)
    if calib is None or len(calib) == 0:
        raise ValueError("omniquant needs calibration windows (calib=[n, seq_len] token ids); got none")
    mc = model.config
    n_heads, n_kv = mc.num_attention_heads, getattr(mc, "num_key_value_heads", mc.num_attention_heads)
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // n_heads
    rep = n_heads // n_kv
    from qft.ptq.calibrate import find_layers, sequential
    log, fp_stream = {}, {"inputs": None}
    clock = {"spent": 0.0, "steps": []}  # training seconds so far, steps run per block
    n_blocks = len(find_layers(model)[1])

    def process(ctx):
        clip_init = cfg.lwc and cfg.init == "clip"
        stats = ctx.collect(hessian=clip_init, absmax=let) if (let or clip_init) else {}
        if cfg.target == "fp":  # the FP block on the FP model's own inputs (carried along block by block)
            quant_inputs = ctx.inputs
            ctx.inputs = fp_stream["inputs"] or quant_inputs
            targets = ctx.forward()
            ctx.inputs = quant_inputs
            fp_stream["inputs"] = targets
        else:
            targets = ctx.forward()
        views = {short: OmniLinear(lin, spec, cfg.lwc, cfg.lwc_init) for short, lin in ctx.linears.items()}
        let_params, folds = [], []
        if let:
            for prod, cons, kind, r in _let_groups(ctx.block, rep, head_dim):
                cons = [c for c in cons if c in views]
                if not cons or cons[0] not in stats:
                    continue
                if kind == "linear" and prod not in views:
                    continue  # v_proj not quantized: leave o_proj's input alone
                w_amax = torch.stack([views[c].lin.weight.detach().abs().amax(0).float() for c in cons]).amax(0)
                x_amax = stats[cons[0]].absmax
                if r > 1:
                    xs = x_amax.reshape(n_kv, r, head_dim).amax(1).reshape(-1)
                    ws = w_amax.reshape(n_kv, r, head_dim).amax(1).reshape(-1)
                    p = nn.Parameter(smooth_scales(xs, ws, cfg.let_alpha))
                    full = (lambda p=p: p.reshape(n_kv, 1, head_dim).expand(n_kv, r, head_dim).reshape(-1))
                    views[prod].out_scale = (lambda p=p: p)
                else:
                    p = nn.Parameter(smooth_scales(x_amax, w_amax, cfg.let_alpha))
                    full = (lambda p=p: p)
                    if kind == "linear":
                        views[prod].out_scale = (lambda p=p: p)
                for c in cons:
                    views[c].in_scale = full
                    views[c].divide_input = kind == "norm"
                let_params.append(p)
                folds.append((prod, cons, kind, p, full))
        if clip_init:
            _init_clip(views, stats, spec)
        for short, v in views.items():
            ctx.replace(short, v)
        groups = []
        if cfg.lwc:
            groups.append({"params": [t for v in views.values() for t in (v.gamma, v.beta)], "lr": cfg.lwc_lr})
        if let_params:
            groups.append({"params": let_params, "lr": cfg.let_lr})
        before = _mse(ctx, targets)
        trained = before
        steps = block_steps(cfg.steps, cfg.epochs, len(calib), cfg.train_batch)
        if groups and steps:
            init = [p.detach().clone() for g in groups for p in g["params"]]
            t0 = time.monotonic()
            deadline = None
            if cfg.max_seconds:
                deadline = t0 + max(cfg.max_seconds - clock["spent"], 0.0) / (n_blocks - ctx.index)
            losses = train_block(ctx.block, groups, ctx.inputs, ctx.kwargs, targets, steps, 0.0, cfg.train_batch,
                                 cfg.seed + ctx.index, desc=f"omniquant {ctx.name}", deadline=deadline)
            clock["spent"] += time.monotonic() - t0
            clock["steps"].append(len(losses))
            trained = _mse(ctx, targets)
            if trained > before:  # a short noisy run made it worse on the whole calibration set: keep the init
                with torch.no_grad():
                    for p, p0 in zip([p for g in groups for p in g["params"]], init):
                        p.copy_(p0)
                trained = before
        _freeze(ctx, views, folds, spec)
        log[ctx.name] = (before, trained, _mse(ctx, targets) if cfg.check else None)

    sequential(model, calib, spec, process, batch_size=cfg.batch_size, desc="omniquant")
    model.qft_omniquant_log = log  # {block: (mse at init, mse trained, mse of the frozen QuantLinears)}
    model.qft_omniquant_steps = clock["steps"]  # Adam steps each block ran (fewer than asked: max_seconds)
    return model


def block_steps(steps: int, epochs: float, n_windows: int, train_batch: int) -> int:
    """Adam steps per block: ``steps``, or ``ceil(epochs * n_windows / train_batch)`` when epochs > 0."""
    return math.ceil(epochs * n_windows / train_batch) if epochs else steps


@torch.no_grad()
def _init_clip(views: dict, stats: dict, spec: QuantSpec) -> None:
    """LWC logits from the clip search on each (LET-scaled) weight; the inputs scale by 1/s too."""
    from qft.ptq.clip import group_grams, search_clip
    for short, v in views.items():
        st = stats.get(short)
        if st is None or st.hessian is None:
            continue
        h = st.hessian / max(st.count, 1)
        if v.in_scale is not None:
            s = v.in_scale().detach().float()
            h = h / (s.unsqueeze(0) * s.unsqueeze(1))
        a, b = search_clip(v.weight().detach(), group_grams(h, v.gs), spec)
        v.gamma.data.copy_(torch.logit(a.clamp(0.02, 0.995)))
        v.beta.data.copy_(torch.logit(b.clamp(0.02, 0.995)))


@torch.no_grad()
def _freeze(ctx, views, folds, spec):
    """Fold LET scales into norms / producer rows and turn every view into a QuantLinear."""
    final = {short: (v.weight().detach(), *[t.detach() for t in v.qparams(v.weight().detach())])
             for short, v in views.items()}
    for prod, _cons, kind, p, _full in folds:
        if kind == "norm":
            prod.weight.div_(p.detach().to(prod.weight.dtype))
    for short, v in views.items():
        w, s, z = final[short]
        lin = v.lin
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        q = QuantLinear.from_linear(lin, spec, name=f"{ctx.name}.{short}", scale=s, zero=z)
        ctx.replace(short, q)


@torch.no_grad()
def _mse(ctx, targets) -> float:
    outs = ctx.forward()
    return sum((o.float() - t.float()).pow(2).mean().item() for o, t in zip(outs, targets)) / len(outs)
