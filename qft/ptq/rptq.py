"""RPTQ: reorder-based post-training quantization (Yuan et al., 2023, arXiv:2304.01089).

The idea: activation channels of LLMs differ wildly in range, so one scale per tensor (static
quantization) wastes the grid on the few wide channels. RPTQ clusters the input channels of each
linear by their calibration range (k-means on the per-channel (min, max) points), **reorders** the
channels so each cluster is contiguous, and quantizes each cluster with its own static asymmetric
scale and zero point. The reordering costs nothing at inference: it is folded into the producer
and the consumers.

* q/k/v inputs and gate/up inputs: the permutation is fused into the RMSNorm, which writes its
  output in cluster order (:class:`qft.nn.reorder.FoldedRMSNorm`), and the consumers' weight
  columns are permuted the same way.
* down_proj input (``act(gate) * up``): the rows of gate_proj and up_proj are permuted, and
  down_proj's columns.
* o_proj input: clustered like the others, but not physically reordered (the permutation would have
  to stay inside each attention head); the cluster of each channel is stored instead, which is the
  same quantization (only the memory layout of a kernel differs).

Each targeted linear becomes a :class:`qft.nn.reorder.ClusterQuantLinear`: weights by RTN or GPTQ
(``weights``) on the reordered columns, inputs statically quantized per cluster.

Simplified: no KV-cache reordering/quantization (RPTQ also reorders K/V for its W4A4KV setting);
k-means starts from range quantiles (deterministic) instead of random restarts; clusters' ranges
are plain calibration min/max (no clipping search).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qft.nn.qlinear import QuantLinear
from qft.nn.reorder import ClusterQuantLinear, FoldedRMSNorm
from qft.ptq.smoothquant import decoder_layers, options_to_config
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["RPTQConfig", "kmeans", "cluster_channels", "cluster_qparams", "channel_minmax", "quantize_block_weights",
           "SITES", "rptq"]

# site: (producer, consumers) inside one decoder layer
SITES = {
    "attn_in": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o_in": (None, ("self_attn.o_proj",)),
    "mlp_in": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "down_in": ("mlp.gate_proj+mlp.up_proj", ("mlp.down_proj",)),
}


@dataclass
class RPTQConfig:
    clusters: int = field(default=8, metadata={"help": "activation clusters per linear input"})
    kmeans_iters: int = field(default=30, metadata={"help": "k-means iterations"})
    reorder: bool = field(default=True, metadata={"help": "fold the channel permutation into norms/weights"})
    weights: str = field(default="rtn", metadata={"help": "weight quantizer: rtn | gptq"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per forward"})

    def __post_init__(self):
        if not isinstance(self.clusters, int) or self.clusters < 1:
            raise ValueError(f"rptq clusters={self.clusters!r} is not valid; allowed: an integer >= 1")
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"rptq weights={self.weights!r} is not valid; allowed: rtn, gptq")


# --- the math -------------------------------------------------------------------------------------

def kmeans(points: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """Labels [n] of a k-means clustering of points [n, d]; deterministic init at quantiles of the
    points' spread (max - min for (min, max) points). Empty clusters are dropped (labels stay dense)."""
    n = points.shape[0]
    k = min(k, n)
    order = torch.argsort(points[:, -1] - points[:, 0])
    centers = points[order[torch.linspace(0, n - 1, k).round().long()]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(points, centers).argmin(1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for c in range(centers.shape[0]):
            sel = labels == c
            if sel.any():
                centers[c] = points[sel].mean(0)
    _, labels = torch.unique(labels, return_inverse=True)
    return labels


def cluster_channels(cmin: torch.Tensor, cmax: torch.Tensor, k: int, iters: int = 30):
    """(labels [K] ranked by cluster range, perm [K]) for per-channel ranges: cluster c holds the
    c-th narrowest channels; ``perm`` makes every cluster contiguous (stable within a cluster)."""
    pts = torch.stack([cmin.float(), cmax.float()], 1).cpu()
    labels = kmeans(pts, k, iters)
    n = int(labels.max()) + 1
    width = torch.stack([(cmax.float().cpu()[labels == c] - cmin.float().cpu()[labels == c]).max() for c in range(n)])
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(width)] = torch.arange(n)
    labels = rank[labels]
    perm = torch.sort(labels, stable=True).indices
    return labels, perm


def cluster_qparams(cmin: torch.Tensor, cmax: torch.Tensor, labels: torch.Tensor, bits: int):
    """Static asymmetric (scale, zero) per cluster from the channels' calibration min/max."""
    n = int(labels.max()) + 1
    lo = torch.stack([cmin.float()[labels == c].min() for c in range(n)]).clamp_max(0)
    hi = torch.stack([cmax.float()[labels == c].max() for c in range(n)]).clamp_min(0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-lo / scale)


# --- wiring ---------------------------------------------------------------------------------------

@torch.no_grad()
def channel_minmax(ctx, names) -> dict:
    """{short name: (min [K], max [K])} of the inputs of ``names`` over the block's calibration inputs."""
    out, handles = {}, []

    def make(n):
        def hook(_m, inp, _o):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            lo, hi = x.amin(0), x.amax(0)
            if n in out:
                lo, hi = torch.minimum(out[n][0], lo), torch.maximum(out[n][1], hi)
            out[n] = (lo, hi)
        return hook

    for n in names:
        handles.append(ctx.block.get_submodule(n).register_forward_hook(make(n)))
    try:
        ctx.forward()
    finally:
        for h in handles:
            h.remove()
    return out


def quantize_block_weights(ctx, wspec: QuantSpec, how: str = "rtn") -> dict:
    """Replace every targeted nn.Linear of the block by a weight-only QuantLinear (RTN or GPTQ on the
    block's current inputs); returns {short name: QuantLinear}."""
    if how == "gptq":
        from qft.ptq.gptq import GPTQConfig, gptq_block
        spec = ctx.spec
        ctx.spec = wspec
        try:
            gptq_block(ctx, GPTQConfig())
        finally:
            ctx.spec = spec
    else:
        for short, lin in list(ctx.linears.items()):
            if not isinstance(lin, QuantLinear):
                ctx.replace(short, QuantLinear.from_linear(lin, wspec, name=f"{ctx.name}.{short}"))
    return dict(ctx.linears)


def _permute_site(block: nn.Module, site: str, perm: torch.Tensor) -> None:
    prod, cons = SITES[site]
    with torch.no_grad():
        if site == "down_in":
            for p in prod.split("+"):
                lin = block.get_submodule(p)
                lin.weight.copy_(lin.weight[perm.to(lin.weight.device)])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias[perm.to(lin.bias.device)])
        else:
            parent, _, child = prod.rpartition(".")
            host = block.get_submodule(parent) if parent else block
            setattr(host, child, FoldedRMSNorm.from_norm(getattr(host, child), perm=perm))
        for c in cons:
            lin = block.get_submodule(c)
            lin.weight.copy_(lin.weight[:, perm.to(lin.weight.device)])


def rptq_block(ctx, spec: QuantSpec, cfg: RPTQConfig) -> dict:
    """Cluster, reorder and quantize one block; returns {site: labels} (in the stored channel order)."""
    sites = {s: c for s, (_, c) in SITES.items() if all(n in ctx.linears for n in c)}
    mm = channel_minmax(ctx, [c[0] for c in sites.values()])
    plan = {}
    for site, cons in sites.items():
        lo, hi = mm[cons[0]]
        labels, perm = cluster_channels(lo, hi, cfg.clusters, cfg.kmeans_iters)
        if cfg.reorder and site != "o_in":
            _permute_site(ctx.block, site, perm)
            labels, lo, hi = labels[perm], lo[perm.to(lo.device)], hi[perm.to(hi.device)]
        plan[site] = (labels, *cluster_qparams(lo.cpu(), hi.cpu(), labels, spec.act_bits))
    wspec = spec.replace(act_bits=None)
    qlins = quantize_block_weights(ctx, wspec, cfg.weights)
    for site, cons in sites.items():
        labels, scale, zero = plan[site]
        for n in cons:
            inner = qlins[n]
            dev = inner.weight.device
            ctx.replace(n, ClusterQuantLinear.build(inner, scale.to(dev), zero.to(dev), labels.to(dev), spec.act_bits))
    return {s: p[0] for s, p in plan.items()}


@METHODS.register("rptq")
def rptq(model: nn.Module, spec: "QuantSpec | str" = "w4a8", calib: torch.Tensor | None = None, **options):
    """Cluster, reorder and quantize ``model`` in place (W{bits}A{act_bits}, static per-cluster acts)."""
    cfg = options_to_config(RPTQConfig, "rptq", options)
    spec = resolve_spec(spec)
    if spec.act_bits is None:
        raise ValueError("rptq quantizes activations per cluster: QuantSpec.act_bits=None; use e.g. preset 'w4a8'")
    if spec.act_bits > 8:
        raise ValueError(f"rptq: QuantSpec.act_bits={spec.act_bits} is not valid; allowed: 2..8")
    if spec.scheme != "int":
        raise ValueError(f"rptq: QuantSpec.scheme={spec.scheme!r} is not valid; allowed: 'int'")
    clusters = calibrate_blocks("rptq", model, calib, spec, lambda ctx: rptq_block(ctx, spec, cfg), cfg.batch_size)
    model.qft_rptq_clusters = clusters
    return model


def calibrate_blocks(method: str, model: nn.Module, calib, spec: QuantSpec, block_fn, batch_size: int) -> dict:
    """The shared driver of the activation methods (RPTQ, OS+, LLM-FP4): checks the Llama layout and the
    calibration, runs ``block_fn(ctx)`` on every decoder block in order (qft.ptq.calibrate.sequential:
    each block sees the outputs of the already-quantized ones), marks the model for the native format
    (its module types exist only there) and returns {block name: block_fn's result}."""
    decoder_layers(model)
    if calib is None or len(calib) == 0:
        raise ValueError(f"{method} needs calibration windows (calib=[n, seq_len] token ids); got none")
    from qft.ptq.calibrate import sequential
    out = {}

    def process(ctx):
        out[ctx.name] = block_fn(ctx)

    sequential(model, calib, spec, process, batch_size=batch_size, desc=method)
    model.qft_spec = spec.replace(format="qft")
    return out
