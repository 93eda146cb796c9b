"""ZeroQuant: group-wise weights, per-token activations, layer-by-layer distillation
(Yao et al., 2022, arXiv:2206.01861).

* Weights: fine-grained group-wise quantization (``QuantSpec.group_size``, e.g. w4g64 / w8g64).
* Activations: dynamic per-token quantization (``QuantSpec.act_bits``, per token), computed at
  run time, so no activation range needs calibrating.
* LKD (layer-by-layer knowledge distillation, optional): each decoder block in turn, its
  quantized copy is trained to reproduce the full-precision block's outputs on the calibration
  activations (MSE), a few Adam steps on the latent weights through the straight-through
  estimator; scales and zero points stay at their min-max values, so the trained weights land on
  the same grid. Only one block is in memory with gradients at a time.

Without LKD this is round-to-nearest with the spec's groups and per-token activations (the
paper's ZeroQuant without distillation). Simplified: the teacher output is the FP block applied to
the inputs the already-quantized blocks produce (``qft.ptq.calibrate.sequential``), not to the FP
model's own activations; the distillation data is the calibration set (the paper uses its
training set), and the fused kernels are not reproduced (QuantLinear's fake/packed forward runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.nn import quantize_model
from qft.nn.qlinear import QuantLinear
from qft.ptq.smoothquant import decoder_layers, options_to_config
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["ZeroQuantConfig", "zeroquant", "train_block", "block_forward"]


@dataclass
class ZeroQuantConfig:
    lkd: bool = field(default=False, metadata={"help": "layer-by-layer distillation of each quantized block"})
    steps: int = field(default=20, metadata={"help": "LKD Adam steps per block"})
    lr: float = field(default=5e-5, metadata={"help": "LKD learning rate for the latent weights"})
    train_batch: int = field(default=2, metadata={"help": "calibration windows per LKD step"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward when capturing"})
    seed: int = field(default=0, metadata={"help": "minibatch order"})

    def __post_init__(self):
        for k in ("steps", "train_batch", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"zeroquant {k}={v!r} is not valid; allowed: an integer >= {0 if k == 'steps' else 1}")
        if not self.lr > 0:
            raise ValueError(f"zeroquant lr={self.lr!r} is not valid; allowed: a positive number")


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _slice_kwargs(kw: dict, idx: torch.Tensor, n: int) -> dict:
    """Select rows ``idx`` of batch-shaped tensors in the block kwargs (masks); others pass through."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n and n > 1:
            out[k] = v[idx]
        else:
            out[k] = v
    return out


def train_block(block: nn.Module, params: list, inputs: list, kwargs: list, targets: list, steps: int,
                lr: float | list, train_batch: int, seed: int = 0, desc: str = "distill") -> list[float]:
    """Minimize MSE(block(x), target) over ``params`` with Adam on minibatches of calibration rows.

    ``inputs`` / ``kwargs`` / ``targets`` are the per-batch lists the calibration driver holds; each
    step draws ``train_batch`` rows from one batch. ``lr`` is one rate or a list of param groups.
    Returns the loss per step.
    """
    groups = params if params and isinstance(params[0], dict) else [{"params": params, "lr": lr}]
    flags = [(p, p.requires_grad) for p in block.parameters()]  # restored afterwards
    train_ids = {id(p) for g in groups for p in g["params"]}
    for p in block.parameters():
        p.requires_grad_(id(p) in train_ids)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    try:
        return _train(block, groups, inputs, kwargs, targets, steps, train_batch, seed, desc)
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _train(block, groups, inputs, kwargs, targets, steps, train_batch, seed, desc):
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        b = int(torch.randint(len(inputs), (1,), generator=gen))
        n = inputs[b].shape[0]
        idx = torch.randperm(n, generator=gen)[:train_batch].to(inputs[b].device)
        with torch.enable_grad():
            out = block_forward(block, inputs[b][idx], _slice_kwargs(kwargs[b], idx, n))
            loss = (out.float() - targets[b][idx].float()).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@METHODS.register("zeroquant")
def zeroquant(model: nn.Module, spec: "QuantSpec | str" = "w4a8", calib: torch.Tensor | None = None,
              **options) -> nn.Module:
    """Group-wise weights + per-token activations (from ``spec``), optionally LKD-trained per block."""
    cfg = options_to_config(ZeroQuantConfig, "zeroquant", options)
    spec = resolve_spec(spec)
    if not cfg.lkd:
        return quantize_model(model, spec)
    decoder_layers(model)
    if calib is None or len(calib) == 0:
        raise ValueError("zeroquant lkd=True needs calibration windows (calib=[n, seq_len] token ids); got none")
    from qft.ptq.calibrate import sequential
    log = {}

    def process(ctx):
        targets = ctx.forward()  # the FP block's outputs on the current inputs
        for short, lin in list(ctx.linears.items()):
            ctx.replace(short, QuantLinear.from_linear(lin, spec, name=f"{ctx.name}.{short}"))
        qls = [m for m in ctx.linears.values() if isinstance(m, QuantLinear)]
        before = _mse(ctx, targets)
        if cfg.steps:
            train_block(ctx.block, [q.weight for q in qls], ctx.inputs, ctx.kwargs, targets, cfg.steps, cfg.lr,
                        cfg.train_batch, cfg.seed + ctx.index, desc=f"zeroquant lkd {ctx.name}")
        log[ctx.name] = (before, _mse(ctx, targets))

    sequential(model, calib, spec, process, batch_size=cfg.batch_size, desc="zeroquant lkd")
    model.qft_zeroquant_log = log  # {block: (mse before LKD, mse after)}
    return model


@torch.no_grad()
def _mse(ctx, targets) -> float:
    outs = ctx.forward()
    return sum((o.float() - t.float()).pow(2).mean().item() for o, t in zip(outs, targets)) / len(outs)


