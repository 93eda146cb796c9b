"""AWQ: activation-aware weight quantization (per-input-channel scales + clipping search).

Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (MLSys 2024). Input channels that see large activations matter most; scaling such a
weight column up by s (and the activation down by s) shrinks its relative rounding error. With
s = mean|x|^alpha (normalized), alpha is grid-searched (``grid`` points in [0, 1)) against the
output error of the layers fed by that input, measured on a sample of calibration tokens. The
division by s is folded into the previous operation so the float model is unchanged:

* q/k/v   <- input_layernorm weight          * gate/up <- post_attention_layernorm weight
* o_proj  <- v_proj output rows. With grouped-query attention one v channel feeds several heads,
  so the scale is tied across the query heads sharing a kv head (mean of their statistics);
  skipped with a warning when the head dimensions do not line up.
* down_proj <- up_proj output rows (act(gate) * up is linear in up).

With ``duo=True`` (off by default) the grid also holds AutoAWQ's "duo" scales
s = mean|x|^alpha / mean|w~|^(1 - alpha), where w~ is |W| normalized by its group's max (weight
columns that are already small relative to their group get a larger scale); both families are
candidates and the output error picks (``duo=False``: the paper's activation-only grid).

Then the clipping search, per output row and group: ``clip_method="awq"`` (the paper) shrinks the
min-max range by one ratio r in [1 - max_shrink, 1] (``clip_grid`` steps) with the least output
error sum_t (x_g . (w_g - q_g))^2 on sampled tokens; ``clip_method="asym"`` (default; BitDistiller)
shrinks the max and the min separately, on the group blocks of the Hessian (all calibration tokens).

"awq_gptq" composes it with GPTQ: scales found and folded as above, then GPTQ quantizes the scaled
weights with the Hessian of the scaled inputs, H / (s s^T) (no second calibration pass), using the
clip-searched grid as static group parameters when ``clip`` is on.

Scale-search options beyond the paper (measured in docs/ptq_gptq_awq.md, where the defaults come
from): ``search_quant="final"`` (default) scores a candidate after the method's own quantizer
(clip search + RTN, or GPTQ against H / (s s^T)) instead of plain min-max RTN, so with alpha = 0
among the candidates each layer's error is at most the quantizer's alone; ``objective`` is the
error scored: "block" (default for awq: the attention output for q/k/v on ``block_windows``
windows, as AutoAWQ's module2inspect; the MLP output for gate/up on ``n_tokens`` sampled rows;
o/down: as "hessian"), "hessian" (default for awq_gptq, grid 10: each linear's output error on all
calibration tokens, tr(D H D^T)) or "tokens" (the earlier behaviour: q/k/v outputs, MLP output
for gate/up, on sampled rows). The searches themselves are in :mod:`qft.ptq.awq_search`.

Simplified: the attention-output error keeps o_proj in float and uses the first whole batches of
calibration windows; every token-based search runs on ``n_tokens`` sampled rows (per block, from
the inputs the quantized model really produces); o_proj / down_proj see the float block's inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from qft.nn import quant as Q
from qft.ptq.calibrate import BlockContext, make_quant_linear, sequential
from qft.ptq.awq_search import (asym_clip_qparams, attn_error as _attn_error, hessian_error,
                                mlp_forward as _mlp_forward, qdq as _qdq, scaled_hessian, search_clip, search_scale,
                                weight_mean)
from qft.ptq.gptq import GPTQConfig, check_int_spec, gptq_block, gptq_quantize
from qft.registry import METHODS
from qft.spec import resolve_spec

__all__ = ["AWQConfig", "search_scale", "search_clip", "weight_mean", "awq_block", "awq", "awq_gptq"]


@dataclass
class AWQConfig:
    grid: int = field(default=20, metadata={"help": "alpha grid points in [0, 1) for the scale search "
                                                    "(awq_gptq's default: 10)"})
    duo: bool = field(default=False, metadata={
        "help": "also try AutoAWQ's duo scales mean|x|^a / mean|w/groupmax|^(1-a) (the error picks)"})
    damp_unscaled: bool = field(default=True, metadata={
        "help": "awq_gptq: dampen the Hessian before dividing it by s s^T (as plain GPTQ dampens) "
                "instead of by the scaled Hessian's mean diagonal"})
    objective: str = field(default="block", metadata={
        "help": "scale search error: 'tokens' (linear/MLP outputs on n_tokens sampled rows), 'hessian' "
                "(the linears' outputs on all calibration tokens, tr(D H D^T)) or 'block' (q/k/v: the attention "
                "output on block_windows windows; gate/up: the MLP output on sampled rows; o/down: 'hessian'); "
                "awq_gptq's default: 'hessian'"})
    block_windows: int = field(default=8, metadata={"help": "objective='block': calibration windows (whole "
                                                            "batches) for the attention-output error"})
    search_quant: str = field(default="final", metadata={
        "help": "quantizer inside the scale search: 'rtn' (min-max, the paper) or 'final' (the method's own: "
                "clip search + RTN, or GPTQ for awq_gptq)"})
    clip: bool = field(default=True, metadata={"help": "search per-group clipping ratios after scaling"})
    clip_method: str = field(default="asym", metadata={
        "help": "'awq' (one shrink ratio per group on clip_tokens sampled rows) or 'asym' (BitDistiller: "
                "separate max/min shrink on the Hessian's group blocks, all calibration tokens)"})
    clip_rounds: int = field(default=1, metadata={"help": "clip_method='asym': coordinate passes (max | min)"})
    clip_grid: int = field(default=20, metadata={"help": "clip ratios 1, 1 - 1/clip_grid, ... down to 1 - max_shrink"})
    max_shrink: float = field(default=0.5, metadata={"help": "largest fraction of the range the clip search removes"})
    n_tokens: int = field(default=2048, metadata={"help": "calibration tokens sampled per input for the scale search"})
    clip_tokens: int = field(default=512, metadata={
        "help": "clip_method='awq': of those, tokens used by the clip search"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward"})
    device: str | None = field(default=None, metadata={"help": "where each block runs (default: the model's device)"})

    def __post_init__(self):
        for k, allowed in (("objective", ("tokens", "hessian", "block")), ("search_quant", ("rtn", "final")),
                           ("clip_method", ("awq", "asym"))):
            if getattr(self, k) not in allowed:
                raise ValueError(f"awq: {k}={getattr(self, k)!r} is not valid; allowed: {', '.join(allowed)}")
        if not isinstance(self.clip_rounds, int) or isinstance(self.clip_rounds, bool) or self.clip_rounds < 0:
            raise ValueError(f"awq: clip_rounds={self.clip_rounds!r} is not valid; allowed: an integer >= 0")
        for k in ("grid", "clip_grid", "n_tokens", "clip_tokens", "batch_size", "block_windows"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"awq: {k}={v!r} is not valid; allowed: a positive integer")
        if not isinstance(self.max_shrink, (int, float)) or not 0 <= self.max_shrink < 1:
            raise ValueError(f"awq: max_shrink={self.max_shrink!r} is not valid; allowed: a number in [0, 1)")


def _get(block, short):
    try:
        return block.get_submodule(short)
    except AttributeError:
        return None


def _scale_groups(block):
    """(prev op, [consumer linears], kind) for a Llama-like block; kinds: norm, v_o, up_down."""
    out = []
    attn = "self_attn"
    groups = [("input_layernorm", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], "norm"),
              (f"{attn}.v_proj", [f"{attn}.o_proj"], "v_o"),
              ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "norm"),
              ("mlp.up_proj", ["mlp.down_proj"], "up_down")]
    for prev, lins, kind in groups:
        if _get(block, prev) is not None and all(isinstance(_get(block, n), nn.Linear) for n in lins):
            out.append((prev, lins, kind))
    return out


def _gqa_layout(block, v_short, o_short):
    """(n_kv, rep, head_dim) when o_proj's inputs line up with v_proj's outputs head by head, else None."""
    attn = _get(block, v_short.rpartition(".")[0])
    v, o = _get(block, v_short), _get(block, o_short)
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int) or hd < 1 or v.out_features % hd or o.in_features % hd:
        return None
    n_kv, n_h = v.out_features // hd, o.in_features // hd
    if n_h % n_kv:
        return None
    return n_kv, n_h // n_kv, hd


@torch.no_grad()
def _fold(block, prev: str, kind: str, s: torch.Tensor, lins: list[str], layout=None):
    """Divide the previous op by s and multiply the consumers' input columns by s (float-exact)."""
    p = _get(block, prev)
    if kind == "norm":
        p.weight.data = (p.weight.data.float() / s).to(p.weight.dtype)
    else:
        sp = s
        if kind == "v_o":  # s is tied across the heads of a kv group: one value per v output row
            n_kv, rep, hd = layout
            sp = s.view(n_kv, rep, hd)[:, 0].reshape(-1)
        p.weight.data = (p.weight.data.float() / sp[:, None]).to(p.weight.dtype)
        if p.bias is not None:
            p.bias.data = (p.bias.data.float() / sp).to(p.bias.dtype)
    for n in lins:
        lin = _get(block, n)
        lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)


def _clip_qparams(cfg: AWQConfig, spec, W, st, s=None):
    """Clip-searched (scale, zero) for W (already multiplied by s, the inputs divided by s)."""
    gs = spec.group_for(W.shape[1])
    if cfg.clip_method == "asym":
        if cfg.max_shrink == 0:
            return Q.minmax_qparams(W, spec.bits, gs, spec.symmetric)
        H = st.hessian if s is None else st.hessian / torch.outer(s, s).to(st.hessian)
        return asym_clip_qparams(W, H, spec, cfg.clip_grid, cfg.max_shrink, cfg.clip_rounds)
    x = st.tokens[:cfg.clip_tokens]
    return search_clip(x if s is None else x / s, W, spec.bits, gs, spec.symmetric, cfg.clip_grid, cfg.max_shrink)


def _final_quantizer(cfg: AWQConfig, gcfg: GPTQConfig | None, spec, st):
    """quantize(Ws, s): the method's own quantizer on a scaled (stacked) weight, for the scale search."""
    def quantize(Ws, s):
        gs = spec.group_for(Ws.shape[1])
        qp = _clip_qparams(cfg, spec, Ws, st, s) if cfg.clip else None
        if gcfg is None:
            return _qdq(Ws, spec.bits, gs, spec.symmetric, *(qp or (None, None)))
        H, damp = scaled_hessian(st.H, s, gcfg.percdamp, cfg.damp_unscaled)
        return gptq_quantize(Ws, H, spec.bits, gs, spec.symmetric, damp, gcfg.block_size, gcfg.act_order, qp,
                             clip_grid=gcfg.clip_grid, max_shrink=gcfg.max_shrink).w_q
    return quantize


@torch.no_grad()
def awq_block(ctx: BlockContext, cfg: AWQConfig, then_gptq: GPTQConfig | None = None) -> None:
    """Scale search + fold, clip search, quantize (RTN, or GPTQ when ``then_gptq``) for one block."""
    spec, block = ctx.spec, ctx.block
    need_h = (then_gptq is not None or cfg.objective in ("hessian", "block")
              or (cfg.clip and cfg.clip_method == "asym"))
    need_tokens = cfg.objective in ("tokens", "block") or (cfg.clip and cfg.clip_method == "awq")
    stats = ctx.collect(hessian=need_h, absmean=True, store_tokens=cfg.n_tokens if need_tokens else 0)
    in_scale = {}  # short name -> s its input was divided by
    for prev, lins, kind in _scale_groups(block):
        st = stats.get(lins[0])
        if st is None or not any(n in ctx.linears for n in lins):
            continue
        tie, layout = None, None
        if kind == "v_o":
            layout = _gqa_layout(block, prev, lins[0])
            if layout is None:
                warnings.warn(f"awq: {ctx.name}: v_proj/o_proj head dims do not line up; o_proj not scaled")
                continue
            n_kv, rep, hd = layout

            def tie(s, n_kv=n_kv, rep=rep, hd=hd):
                return s.view(n_kv, rep, hd).mean(1, keepdim=True).expand(n_kv, rep, hd).reshape(-1)
        W = torch.cat([_get(block, n).weight.float() for n in lins])
        gs = spec.group_for(W.shape[1])
        fwd = _mlp_forward(block) if lins == ["mlp.gate_proj", "mlp.up_proj"] else None
        err = None
        if cfg.objective == "hessian" or (cfg.objective == "block" and kind != "norm"):
            err = (lambda Wq, W=W, H=st.H: hessian_error(W, Wq, H))
        elif cfg.objective == "block" and fwd is None:
            err = _attn_error(ctx, lins, cfg.block_windows)
        quant = _final_quantizer(cfg, then_gptq, spec, st) if cfg.search_quant == "final" else None
        s, _alpha, _loss = search_scale(st.tokens, st.mean_abs, W, spec.bits, gs, spec.symmetric, cfg.grid, fwd, tie,
                                        duo=cfg.duo, quantize=quant, error=err)
        _fold(block, prev, kind, s, lins, layout)
        for n in lins:
            in_scale[n] = s
    qparams = {}
    if cfg.clip:
        for n, lin in ctx.linears.items():
            qparams[n] = _clip_qparams(cfg, spec, lin.weight.float(), stats[n], in_scale.get(n))
    if then_gptq is not None:
        gptq_block(ctx, then_gptq, stats=stats, scales=in_scale, qparams=qparams or None,
                   damp_unscaled=cfg.damp_unscaled)
        return
    for n, lin in list(ctx.linears.items()):
        W = lin.weight.float()
        gs = spec.group_for(lin.in_features)
        s, z = qparams.get(n) or Q.minmax_qparams(W, spec.bits, gs, spec.symmetric)
        w_q = _qdq(W, spec.bits, gs, spec.symmetric, s, z)
        ctx.replace(n, make_quant_linear(lin, spec, f"{ctx.name}.{n}", w_q, s, z))


GPTQ_DEFAULTS = {"objective": "hessian", "grid": 10}  # awq_gptq's defaults that differ from awq's


def _split_options(method, options, with_gptq):
    awq_keys = {f.name for f in fields(AWQConfig)}
    gptq_keys = {f.name for f in fields(GPTQConfig)} - {"batch_size", "device"} if with_gptq else set()
    bad = sorted(set(options) - awq_keys - gptq_keys)
    if bad:
        raise ValueError(f"{method}: unknown option(s) {bad}; allowed: {sorted(awq_keys | gptq_keys)}")
    given = {k: v for k, v in options.items() if k in awq_keys}
    if with_gptq:  # measured best for AWQ then GPTQ (docs/ptq_gptq_awq.md): GPTQ in the search is costlier
        given = {**GPTQ_DEFAULTS, **given}
    a = AWQConfig(**given)
    g = GPTQConfig(**{k: v for k, v in options.items() if k in gptq_keys}) if with_gptq else None
    return a, g


def _run(method, model, spec, calib, options, with_gptq):
    spec = resolve_spec(spec)
    check_int_spec(method, spec)
    cfg, gcfg = _split_options(method, options, with_gptq)
    if calib is None:
        raise ValueError(f"{method} needs calibration data: calib=qft.ptq.calibrate.calib_windows(tokenizer, path)")
    return sequential(model, calib, spec, lambda ctx: awq_block(ctx, cfg, gcfg), device=cfg.device,
                      batch_size=cfg.batch_size, desc=method)


@METHODS.register("awq")
def awq(model, spec, calib=None, **options):
    """AWQ scaling + clip search + round-to-nearest. Options: :class:`AWQConfig`."""
    return _run("awq", model, spec, calib, options, with_gptq=False)


@METHODS.register("awq_gptq")
def awq_gptq(model, spec, calib=None, **options):
    """AWQ scaling (and clip grid), then GPTQ. Options: :class:`AWQConfig` + GPTQ's percdamp,
    block_size, act_order."""
    return _run("awq_gptq", model, spec, calib, options, with_gptq=True)
