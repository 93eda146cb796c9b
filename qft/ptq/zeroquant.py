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

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.nn import quantize_model
from qft.nn.qlinear import QuantLinear
from qft.ptq.smoothquant import decoder_layers, options_to_config
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["ZeroQuantConfig", "zeroquant", "train_block", "block_forward", "minibatches"]


@dataclass
class ZeroQuantConfig:
    lkd: bool = field(default=False, metadata={"help": "layer-by-layer distillation of each quantized block"})
    steps: int = field(default=32, metadata={"help": "LKD Adam steps per block (unless epochs is set)"})
    epochs: float = field(default=0.0, metadata={
        "help": "LKD passes over the calibration windows per block; > 0 overrides steps with "
                "ceil(epochs * n_windows / train_batch)"})
    max_seconds: float = field(default=0.0, metadata={
        "help": "wall-clock cap on the LKD training of all blocks together (0 = none), shared out over the blocks"})
    lr: float = field(default=1e-4, metadata={"help": "LKD learning rate for the latent weights"})
    train_batch: int = field(default=1, metadata={"help": "calibration windows per LKD step"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward when capturing"})
    seed: int = field(default=0, metadata={"help": "minibatch order"})

    def __post_init__(self):
        for k in ("steps", "train_batch", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"zeroquant {k}={v!r} is not valid; allowed: an integer >= {0 if k == 'steps' else 1}")
        for k in ("epochs", "max_seconds"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"zeroquant {k}={v!r} is not valid; allowed: a number >= 0")
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


def minibatches(sizes: list[int], train_batch: int, gen: torch.Generator):
    """Endless epochs of (batch index, row indices): every pass visits each calibration row once, in
    chunks of ``train_batch`` rows of one captured batch (their masks / position embeddings match),
    the chunks in random order."""
    while True:
        chunks = []
        for b, n in enumerate(sizes):
            perm = torch.randperm(n, generator=gen)
            chunks += [(b, perm[i:i + train_batch]) for i in range(0, n, train_batch)]
        for j in torch.randperm(len(chunks), generator=gen).tolist():
            yield chunks[j]


def train_block(block: nn.Module, params: list, inputs: list, kwargs: list, targets: list, steps: int,
                lr: float | list, train_batch: int, seed: int = 0, desc: str = "distill",
                deadline: float | None = None) -> list[float]:
    """Minimize MSE(block(x), target) over ``params`` with Adam on minibatches of calibration rows.

    ``inputs`` / ``kwargs`` / ``targets`` are the per-batch lists the calibration driver holds; each
    step takes ``train_batch`` rows of one batch, epoch by epoch (:func:`minibatches`). ``lr`` is one
    rate or a list of param groups. ``deadline`` (a ``time.monotonic()`` value) stops early.
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
        return _train(block, groups, inputs, kwargs, targets, steps, train_batch, seed, desc, deadline)
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _train(block, groups, inputs, kwargs, targets, steps, train_batch, seed, desc, deadline):
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    batches = minibatches([x.shape[0] for x in inputs], train_batch, gen)
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        if deadline is not None and time.monotonic() > deadline:
            break
        b, idx = next(batches)
        n = inputs[b].shape[0]
        idx = idx.to(inputs[b].device)
        with torch.enable_grad():
            out = block_forward(block, inputs[b][idx], _slice_kwargs(kwargs[b], idx, n))
            loss = (out.float() - targets[b][idx].float()).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [x.item() for x in torch.stack(losses).cpu()] if losses else []


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
    from qft.ptq.calibrate import find_layers, sequential
    log, clock = {}, {"spent": 0.0, "steps": []}
    n_blocks = len(find_layers(model)[1])
    steps = math.ceil(cfg.epochs * len(calib) / cfg.train_batch) if cfg.epochs else cfg.steps

    def process(ctx):
        targets = ctx.forward()  # the FP block's outputs on the current inputs
        for short, lin in list(ctx.linears.items()):
            ctx.replace(short, QuantLinear.from_linear(lin, spec, name=f"{ctx.name}.{short}"))
        qls = [m for m in ctx.linears.values() if isinstance(m, QuantLinear)]
        before = _mse(ctx, targets)
        if steps:
            t0 = time.monotonic()
            deadline = None
            if cfg.max_seconds:
                deadline = t0 + max(cfg.max_seconds - clock["spent"], 0.0) / (n_blocks - ctx.index)
            losses = train_block(ctx.block, [q.weight for q in qls], ctx.inputs, ctx.kwargs, targets, steps, cfg.lr,
                                 cfg.train_batch, cfg.seed + ctx.index, desc=f"zeroquant lkd {ctx.name}",
                                 deadline=deadline)
            clock["spent"] += time.monotonic() - t0
            clock["steps"].append(len(losses))
        log[ctx.name] = (before, _mse(ctx, targets))

    sequential(model, calib, spec, process, batch_size=cfg.batch_size, desc="zeroquant lkd")
    model.qft_zeroquant_log = log  # {block: (mse before LKD, mse after)}
    model.qft_zeroquant_steps = clock["steps"]  # LKD steps each block ran (fewer than asked: max_seconds)
    return model


@torch.no_grad()
def _mse(ctx, targets) -> float:
    outs = ctx.forward()
    return sum((o.float() - t.float()).pow(2).mean().item() for o, t in zip(outs, targets)) / len(outs)


