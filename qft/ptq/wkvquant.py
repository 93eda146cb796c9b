"""WKVQuant: past-only, two-dimensional KV-cache quantization with cross-block reconstruction
regularization (Yue et al., 2024, arXiv:2402.12065). KV part only; weights stay as they are.

* **Past-only quantization**: the tokens of the current step attend to their own K/V in full
  precision; K/V are quantized when stored, so only past tokens are seen quantized
  (:class:`qft.nn.wkv_cache.WKVCache`). During calibration the same semantics run inside a full
  forward through an attention function (``qft_wkv_past_only``): scores against quantized keys,
  except the diagonal (each token against its own key) in full precision; likewise for values.
* **Two-dimensional quantization**: a static per-channel shift and scale (smoothing, learned) and a
  dynamic per-token min-max quantization in groups of channels.
* **Cross-block reconstruction regularization**: the smoothing parameters of block i are learned
  (Adam, STE through the rounding) to minimize the mean *absolute* error of the output of block
  i + 1 (the next full-precision block applied to block i's output), not of block i alone.

Calibration goes block by block through :func:`qft.ptq.calibrate.sequential`: block i sees the
outputs of blocks 0..i-1 with their KV quantization on. The learned parameters travel with the
model in :class:`qft.nn.wkv_cache.WKVProj` (which replaces k_proj / v_proj, weights unchanged);
:func:`qft.nn.wkv_cache.wkv_cache` builds the cache, :func:`evaluate_wkv` measures perplexity with
it in the loop (KIVI's harness, :func:`qft.ptq.kivi.evaluate_kv`).

Simplified: no weight quantization (the paper's W4KV4 also quantizes weights, OmniQuant-style);
one following block in the regularizer; a fixed number of Adam steps per block; initialization
shift = range centre, scale = (half-range / mean half-range of the head)^alpha.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qft.nn.wkv_cache import WKVCache, WKVProj, fake_quant_2d, wkv_cache, wkv_check  # noqa: F401
from qft.ptq.smoothquant import decoder_layers, options_to_config
from qft.ptq.zeroquant import _slice_kwargs, block_forward
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["WKVQuantConfig", "past_only_attend", "past_only_attention", "past_only_eval", "evaluate_wkv",
           "wkvquant", "ATTN_NAME"]

ATTN_NAME = "qft_wkv_past_only"


@dataclass
class WKVQuantConfig:
    kv_bits: int | None = field(default=None, metadata={"help": "KV bits (2, 4, 8); default: QuantSpec.kv_bits"})
    group_size: int = field(default=32, metadata={"help": "channels per token-wise group (divides head_dim)"})
    smooth: bool = field(default=True, metadata={"help": "learned per-channel shift/scale (False: per-token only)"})
    cross_block: bool = field(default=True, metadata={"help": "loss on the next block's output (CRR)"})
    steps: int = field(default=20, metadata={"help": "Adam steps per block"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of shift and log-scale"})
    alpha: float = field(default=0.5, metadata={"help": "initial scale exponent on the channel half-range"})
    train_batch: int = field(default=2, metadata={"help": "calibration windows per step"})
    batch_size: int = field(default=4, metadata={"help": "calibration windows per forward"})
    seed: int = field(default=0, metadata={"help": "minibatch order"})

    def __post_init__(self):
        for k in ("steps", "train_batch", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"wkvquant {k}={v!r} is not valid; allowed: an integer >= {0 if k == 'steps' else 1}")
        if not self.lr > 0:
            raise ValueError(f"wkvquant lr={self.lr!r} is not valid; allowed: a positive number")


# --- past-only attention (calibration and exact token-level simulation) ---------------------------

def past_only_attend(q, k, v, kq, vq, mask, scaling: float, n_rep: int):
    """Attention where every query sees quantized keys/values (kq, vq) except its own, which it sees
    in full precision (k, v). q [B, Hq, Tq, D]; k, v, kq, vq [B, Hkv, Tk, D]; the last Tq keys are
    the queries' own. ``mask``: None (causal), bool (True = attend) or additive float [B, 1, Tq, Tk]."""
    rep = (lambda t: t.repeat_interleave(n_rep, 1)) if n_rep > 1 else (lambda t: t)
    k, v, kq, vq = rep(k), rep(v), rep(kq), rep(vq)
    tq, tk = q.shape[2], k.shape[2]
    own = torch.arange(tq, device=q.device) + (tk - tq)
    rows = torch.arange(tq, device=q.device)
    s = (q @ kq.transpose(2, 3)) * scaling
    s_own = (q * k[:, :, own]).sum(-1) * scaling
    diag = torch.zeros(tq, tk, dtype=torch.bool, device=q.device)
    diag[rows, own] = True
    s = torch.where(diag, s_own.unsqueeze(-1), s)
    if mask is None:
        s = s.masked_fill(torch.arange(tk, device=q.device)[None, :] > own[:, None], float("-inf"))
    elif mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask
    p = torch.softmax(s.float(), -1).to(q.dtype)
    out = p @ vq + p[:, :, rows, own].unsqueeze(-1) * (v[:, :, own] - vq[:, :, own])
    return out.transpose(1, 2).contiguous()


def past_only_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention function: past-only fake KV quantization when the layer's
    ``_qft_wkv`` state is active; records per-channel K/V ranges when asked; else plain SDPA."""
    st = getattr(module, "_qft_wkv", None)
    if st is None or not st["active"]:
        if st is not None and st.get("record") is not None:
            rec = st["record"]
            for name, t in (("k", key), ("v", value)):
                lo, hi = t.detach().float().amin((0, 2)), t.detach().float().amax((0, 2))
                if name in rec:
                    lo, hi = torch.minimum(rec[name][0], lo), torch.maximum(rec[name][1], hi)
                rec[name] = (lo, hi)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    bits, g = st["bits"], st["group_size"]
    ks, vs = st.get("k_logs"), st.get("v_logs")
    kq = fake_quant_2d(key, st.get("k_shift"), None if ks is None else ks.exp(), bits, g)
    vq = fake_quant_2d(value, st.get("v_shift"), None if vs is None else vs.exp(), bits, g)
    n_rep = query.shape[1] // key.shape[1]
    return past_only_attend(query, key, value, kq, vq, attention_mask, scaling, n_rep), None


AttentionInterface.register(ATTN_NAME, past_only_attention)


@contextlib.contextmanager
def _attn_impl(model, name):
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


@contextlib.contextmanager
def past_only_eval(model):
    """Inside: a plain forward of a WKVQuant model simulates its cache exactly at token level
    (every token sees the quantized past and itself in full precision)."""
    layers = decoder_layers(model)
    for layer in layers:
        k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
        if not isinstance(k, WKVProj):
            raise ValueError("past_only_eval needs a model quantized with wkvquant (WKVProj k_proj/v_proj)")
        (ks, kc), (vs, vc) = k.params(), v.params()
        layer.self_attn._qft_wkv = {"active": True, "bits": k.kv_bits, "group_size": k.group_size,
                                    "k_shift": ks, "k_logs": kc.log(), "v_shift": vs, "v_logs": vc.log()}
    try:
        with _attn_impl(model, ATTN_NAME):
            yield model
    finally:
        for layer in layers:
            layer.self_attn.__dict__.pop("_qft_wkv", None)


def evaluate_wkv(model, windows: torch.Tensor, chunk_size: int = 32, batch_size: int = 4, progress: bool = True):
    """Perplexity with the WKVQuant cache in the loop (chunks of ``chunk_size`` tokens)."""
    from qft.ptq.kivi import evaluate_kv
    return evaluate_kv(model, windows, wkv_cache(model), chunk_size=chunk_size, batch_size=batch_size,
                       desc="eval (wkv cache in the loop)", progress=progress)


# --- calibration ----------------------------------------------------------------------------------

def _init_params(rec, alpha, head_dim, dev):
    out = {}
    for n in ("k", "v"):
        lo, hi = (t.reshape(-1, head_dim).to(dev) for t in rec[n])
        half = ((hi - lo) / 2).clamp_min(1e-5)
        out[f"{n}_shift"] = ((hi + lo) / 2).clone().requires_grad_(True)
        out[f"{n}_logs"] = (alpha * torch.log(half / half.mean(-1, keepdim=True))).requires_grad_(True)
    return out


def _train(ctx, st, params, nxt, targets, cfg):
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + ctx.index)
    mods = [ctx.block] + ([nxt] if nxt is not None else [])
    flags = [(p, p.requires_grad) for m in mods for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for _ in tqdm(range(cfg.steps), desc=f"wkv block {ctx.index}", leave=False):
            b = int(torch.randint(len(ctx.inputs), (1,), generator=gen))
            n = ctx.inputs[b].shape[0]
            idx = torch.randperm(n, generator=gen)[:cfg.train_batch]
            kw = _slice_kwargs(ctx.kwargs[b], idx, n)
            with torch.enable_grad():
                st.update(params)
                out = block_forward(ctx.block, ctx.inputs[b][idx], kw)
                if nxt is not None:
                    out = block_forward(nxt, out, kw)
                loss = (out.float() - targets[b][idx].float()).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@METHODS.register("wkvquant")
def wkvquant(model: nn.Module, spec: "QuantSpec | str | None" = None, calib: torch.Tensor | None = None, **options):
    """Learn WKVQuant's KV smoothing block by block; k_proj / v_proj become WKVProj (weights unchanged)."""
    cfg = options_to_config(WKVQuantConfig, "wkvquant", options)
    spec = resolve_spec(spec) if spec is not None else QuantSpec(kv_bits=cfg.kv_bits or 4)
    bits = cfg.kv_bits or spec.kv_bits
    if bits is None:
        raise ValueError("wkvquant needs KV bits: QuantSpec.kv_bits=None and option kv_bits not given "
                         "(e.g. --option kv_bits=4)")
    layers = decoder_layers(model)
    hd = layers[0].self_attn.head_dim
    wkv_check(bits, cfg.group_size, hd)
    if cfg.smooth and (calib is None or len(calib) == 0):
        raise ValueError("wkvquant needs calibration windows (calib=[n, seq_len] token ids); got none")
    from qft.ptq.calibrate import sequential
    kv_spec = QuantSpec(targets=("k_proj", "v_proj"), ignore=(), group_size=None)

    def process(ctx):
        attn = ctx.block.self_attn
        st = {"active": False, "record": {}, "bits": bits, "group_size": cfg.group_size}
        attn._qft_wkv = st
        outs = ctx.forward()  # full precision; records the K/V channel ranges
        dev = outs[0].device
        nxt = layers[ctx.index + 1] if cfg.cross_block and ctx.index + 1 < len(layers) else None
        with torch.no_grad():
            targets = [block_forward(nxt, o, kw) for o, kw in zip(outs, ctx.kwargs)] if nxt is not None else outs
        params = _init_params(st["record"], cfg.alpha, hd, dev) if cfg.smooth else {}
        st.update(active=True, record=None)
        if cfg.smooth and cfg.steps:
            _train(ctx, st, params, nxt, targets, cfg)
        params = {k: v.detach() for k, v in params.items()}
        st.update(params)
        for role, name in (("key", "k"), ("value", "v")):
            lin = getattr(attn, f"{name}_proj")
            shift = params.get(f"{name}_shift", torch.zeros(lin.out_features, device=dev))
            scale = params[f"{name}_logs"].exp() if f"{name}_logs" in params else torch.ones(lin.out_features, device=dev)
            ctx.replace(f"self_attn.{name}_proj", WKVProj.from_linear(lin, hd, bits, cfg.group_size, role, shift, scale))

    try:
        with _attn_impl(model, ATTN_NAME):
            sequential(model, calib if calib is not None else torch.zeros(1, 2, dtype=torch.long), kv_spec, process,
                       batch_size=cfg.batch_size, desc="wkvquant")
    finally:
        for layer in layers:
            layer.self_attn.__dict__.pop("_qft_wkv", None)
    model.qft_spec = spec.replace(kv_bits=bits, kv_group_size=cfg.group_size, format="qft")
    return model
