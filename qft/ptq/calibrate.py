"""Layer-by-layer calibration shared by every PTQ method (GPTQ, AWQ, OmniQuant, ZeroQuant, ...).

The idea (GPTQ's "sequential" mode): never run the whole model on the calibration set more than
once. Capture the inputs of the first decoder block, then for each block in turn

1. run the block on its inputs with hooks on its linear layers, accumulating what the method needs
   (Hessians X^T X, per-channel activation statistics, a sample of the inputs),
2. let the method change the block (quantize its linears, fold scales into norms, train clip
   factors...),
3. run the *changed* block on the same inputs: its outputs are the next block's inputs, so every
   block is calibrated on the activations the quantized model really produces.

Blocks not in use stay on their original device (CPU) and only the current one moves to
``device``, so a model larger than the GPU fits as long as one block and the activations do.

API (what a method uses)
------------------------
``calib_windows(tokenizer, path, n=128, seq_len=512) -> LongTensor [n, seq_len]``
    Calibration windows cut from a text file (too short -> ValueError naming the file).
``sequential(model, calib, spec, process_block, device=None, batch_size=8, desc=...)``
    The driver. Calls ``process_block(ctx)`` once per decoder block with a :class:`BlockContext`;
    after it returns, the block's outputs are recomputed and fed to the next one. Returns the model.
``BlockContext``: ``index``, ``name`` ("model.layers.3"), ``block``, ``spec``, ``inputs``
    (list of hidden-state batches), ``kwargs`` (the keyword arguments the model passed the block:
    position embeddings, attention mask, ...), ``linears`` ({short name: nn.Linear} targeted by the
    spec, e.g. "self_attn.q_proj"), and helpers:
    * ``ctx.forward(block=None) -> list[Tensor]``: run a block (default this one) on the inputs;
    * ``ctx.collect(hessian=True, absmean=False, absmax=False, store_tokens=0) -> {name: LinearStats}``:
      one forward with hooks on the targeted linears; linears fed the same tensor (q/k/v,
      gate/up) share one LinearStats object, so their Hessian is computed once;
    * ``ctx.replace(short_name, module)``: swap a linear for its quantized version.
``find_layers(model) -> (path, ModuleList)`` finds the decoder blocks (clear error otherwise).
``make_quant_linear(linear, spec, name, w_q, scale, zero)``: a QuantLinear whose integers are those
    behind ``w_q`` (the already-quantized weight) with the given per-group scale/zero.

Simplified: the attention mask / position embeddings are captured once per batch and reused for
every block (true for decoder-only models where they do not depend on the layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.eval import EvalProtocol, read_text, windows_from_text
from qft.nn.qlinear import QuantLinear
from qft.spec import QuantSpec, resolve_spec

__all__ = ["calib_windows", "find_layers", "capture_block_inputs", "BlockContext", "LinearStats",
           "sequential", "make_quant_linear", "LAYER_PATHS"]

LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def calib_windows(tokenizer, path: str | Path, n: int = 128, seq_len: int = 512) -> torch.Tensor:
    """``n`` consecutive windows of ``seq_len`` tokens (no BOS) from the text file at ``path``."""
    for k, v in (("n", n), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "n" else 2):
            raise ValueError(f"calib_windows: {k}={v!r} is not valid; allowed: an integer >= {1 if k == 'n' else 2}")
    text = read_text(path)
    try:
        return windows_from_text(tokenizer, text, EvalProtocol(seq_len=seq_len, n_windows=n),
                                 source=f"calibration file {str(path)!r}")
    except ValueError as e:
        raise ValueError(f"{e} (calibration needs n * seq_len = {n * seq_len} tokens)") from None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: (dotted path, ModuleList)."""
    for path in LAYER_PATHS:
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    raise ValueError(f"model without the expected layers: {type(model).__name__} has none of "
                     f"{', '.join(LAYER_PATHS)} (a non-empty nn.ModuleList of decoder blocks)")


class _Stop(Exception):
    pass


def _batches(calib: torch.Tensor, batch_size: int):
    return [calib[i:i + batch_size] for i in range(0, len(calib), batch_size)]


def _move_kwargs(kw, device):
    if isinstance(kw, torch.Tensor):
        return kw.to(device)
    if isinstance(kw, (tuple, list)):
        return type(kw)(_move_kwargs(v, device) for v in kw)
    if isinstance(kw, dict):
        return {k: _move_kwargs(v, device) for k, v in kw.items()}
    return kw


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, device, batch_size: int = 8):
    """Inputs (hidden states) and keyword arguments of the first decoder block, per batch.

    Hooks the first block's forward and stops the model there with an exception, so nothing after
    block 0 runs. Everything but the decoder blocks is moved to ``device`` for the capture and back.
    """
    path, layers = find_layers(model)
    homes = []  # (module, kind, key, original device): moved tensor by tensor, never recursively

    def move(to_home: bool):
        for mod, kind, key, dev in homes:
            store = getattr(mod, kind)
            t = store[key]
            if kind == "_parameters":
                t.data = t.data.to(dev if to_home else device)
            else:
                store[key] = t.to(dev if to_home else device)

    for name, child in model.named_modules():
        if child is layers or name.startswith(path + "."):
            continue
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(child, kind).items():
                if t is not None and t.device != torch.device(device):
                    homes.append((child, kind, key, t.device))
    move(False)
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("hidden_states",)})
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in _batches(calib, batch_size):
            try:
                model(input_ids=b.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
        move(True)
    return hidden, kwargs


@dataclass
class LinearStats:
    """What the hooks accumulated for one linear input (shared by linears fed the same tensor)."""
    in_features: int
    hessian: torch.Tensor | None = None      # sum over tokens of x x^T (float32), see .H
    absmean: torch.Tensor | None = None      # sum over tokens of |x| per channel
    absmax: torch.Tensor | None = None       # max over tokens of |x| per channel
    tokens: torch.Tensor | None = None       # [T, K] sample of input rows (float32)
    count: int = 0
    names: list = field(default_factory=list)

    @property
    def H(self) -> torch.Tensor:
        """GPTQ's Hessian 2/n * X^T X."""
        return self.hessian * (2.0 / max(self.count, 1))

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.absmean / max(self.count, 1)


def _block_outputs(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockContext:
    def __init__(self, index, name, block, spec, inputs, kwargs, linears, device):
        self.index, self.name, self.block, self.spec = index, name, block, spec
        self.inputs, self.kwargs, self.linears, self.device = inputs, kwargs, linears, device

    @torch.no_grad()
    def forward(self, block: nn.Module | None = None) -> list[torch.Tensor]:
        block = block or self.block
        return [_block_outputs(block(x, **kw)) for x, kw in zip(self.inputs, self.kwargs)]

    @torch.no_grad()
    def collect(self, hessian: bool = True, absmean: bool = False, absmax: bool = False, store_tokens: int = 0,
                seed: int = 0) -> dict[str, LinearStats]:
        """One forward of the block with hooks on its targeted linears; returns {short name: stats}."""
        stats: dict[str, LinearStats] = {}
        last = {"x": None, "owner": None}
        gen = torch.Generator().manual_seed(seed + 1000 * self.index)
        per_batch = math.ceil(store_tokens / max(len(self.inputs), 1)) if store_tokens else 0

        def make_hook(short):
            def hook(_mod, inp, _out):
                x = inp[0]
                if x is last["x"]:  # same tensor as the previous linear (q/k/v, gate/up): share
                    st = stats[last["owner"]]
                    if short not in stats:
                        stats[short] = st
                        st.names.append(short)
                    return
                last["x"], last["owner"] = x, short
                x2 = x.reshape(-1, x.shape[-1]).float()
                st = stats.get(short)
                if st is None:
                    st = stats[short] = LinearStats(x2.shape[1], names=[short])
                    if hessian:
                        st.hessian = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                    if absmean:
                        st.absmean = torch.zeros(x2.shape[1], device=x2.device)
                    if absmax:
                        st.absmax = torch.zeros(x2.shape[1], device=x2.device)
                if hessian:
                    st.hessian.addmm_(x2.t(), x2)
                if absmean:
                    st.absmean += x2.abs().sum(0)
                if absmax:
                    torch.maximum(st.absmax, x2.abs().amax(0), out=st.absmax)
                if per_batch:
                    idx = torch.randperm(x2.shape[0], generator=gen)[:per_batch].to(x2.device)
                    rows = x2[idx].clone()
                    st.tokens = rows if st.tokens is None else torch.cat([st.tokens, rows])
                st.count += x2.shape[0]
            return hook

        handles = [m.register_forward_hook(make_hook(s)) for s, m in self.linears.items()]
        try:
            for x, kw in zip(self.inputs, self.kwargs):
                last["x"] = None
                self.block(x, **kw)
        finally:
            for h in handles:
                h.remove()
        return stats

    def replace(self, short: str, module: nn.Module) -> None:
        parent_name, _, child = short.rpartition(".")
        parent = self.block.get_submodule(parent_name) if parent_name else self.block
        setattr(parent, child, module)
        self.linears[short] = module


def make_quant_linear(linear: nn.Linear, spec: QuantSpec, name: str, w_q: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor) -> QuantLinear:
    """QuantLinear (fake state) holding the already-quantized ``w_q`` with per-group ``scale``/``zero``.

    Re-quantizing ``w_q`` with the same scale/zero reproduces the method's integers exactly
    ((u - z) * s / s rounds back to u - z).
    """
    q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, spec, name,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.data)
    q.requantize(w_q.to(linear.weight.dtype), scale=scale, zero=zero)
    return q


def _targets(block: nn.Module, prefix: str, spec: QuantSpec) -> dict[str, nn.Linear]:
    return {short: m for short, m in block.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and spec.matches(f"{prefix}.{short}")}


def sequential(model: nn.Module, calib: torch.Tensor, spec: "QuantSpec | str | dict",
               process_block: Callable[[BlockContext], None], device=None, batch_size: int = 8,
               desc: str = "ptq") -> nn.Module:
    """Run ``process_block`` on every decoder block in order, feeding each the outputs of the
    already-processed blocks before it. Targeted linears outside the blocks are rounded to nearest.
    """
    spec = resolve_spec(spec)
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32):
        raise ValueError(f"calib must be a LongTensor [n, seq_len] of token ids (see calib_windows); got "
                         f"{type(calib).__name__} {getattr(calib, 'shape', '')}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; allowed: a positive integer")
    path, layers = find_layers(model)
    from qft.nn.swap import target_linears
    outside = []
    for name, lin in target_linears(model, spec):  # check every layer before changing anything
        spec.check_layer(name, lin.in_features)
        if not name.startswith(path + "."):
            outside.append(name)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    inputs, kwargs = capture_block_inputs(model, calib.long(), device, batch_size)
    for i, block in enumerate(tqdm(layers, desc=desc, unit="block")):
        bhome = next(block.parameters()).device
        block.to(device)
        ctx = BlockContext(i, f"{path}.{i}", block, spec, inputs, kwargs, _targets(block, f"{path}.{i}", spec), device)
        process_block(ctx)
        inputs = ctx.forward()
        block.to(bhome)
    if outside:
        from qft.nn import quantize_model
        quantize_model(model, spec.replace(targets=tuple(outside), ignore=()))
    model.qft_spec = spec
    model.train(was_training)
    return model
