"""AWQ's searches (pure functions): the per-input-channel scale search and the clip searches.

Error functions for the scale search: :func:`hessian_error` (the linears' outputs, all calibration
tokens), :func:`mlp_forward` (the MLP output for gate/up) and :func:`attn_error` (the attention
output for q/k/v on whole calibration windows: AWQ's "module2inspect").

Scale search (Lin et al., AWQ, MLSys 2024): candidates s = mean|x|^alpha (alpha on a grid in
[0, 1); optionally AutoAWQ's "duo" family mean|x|^alpha / mean|w/groupmax|^(1 - alpha)), each
normalized to sqrt(max * min) = 1; the weight is scaled (W * s), quantized, scaled back, and the
candidate with the least output error wins. alpha = 0 (s = 1) is always a candidate, so the search
never does worse than the quantizer alone *on its own error measure*. What "quantized" and
"output error" mean is pluggable:

* quantizer: plain min-max round-to-nearest (the paper), or the method's full quantizer (clip
  search + RTN, or clip search + GPTQ against the scaled Hessian H / (s s^T)): AWQConfig's
  ``search_quant="final"``;
* error: the output of the linears (or of the MLP for gate/up) on sampled calibration tokens
  (``objective="tokens"``), or the linears' output error on *all* calibration tokens through the
  Hessian, tr(D H D^T) with D = W - Q (``objective="hessian"``; exact and cheaper than tokens).

Clip search, two flavours:

* :func:`search_clip` (AWQ): one shrink ratio r of the min-max range per (row, group), the least
  sum_t (x_g . (w_g - q_g))^2 over sampled tokens;
* :func:`asym_clip_qparams` (BitDistiller, via :mod:`qft.ptq.clip`): separate ratios for the max
  and the min of each group, searched on the group blocks of the Hessian (all calibration tokens).
"""

from __future__ import annotations

from typing import Callable

import torch

from qft.nn import quant as Q
from qft.ptq import clip as C

__all__ = ["mlp_forward", "attn_error", "qdq", "weight_mean", "scale_candidates", "search_scale", "search_clip",
           "hessian_error", "asym_clip_qparams", "scaled_hessian"]


def qdq(W, bits, gs, symmetric, scale=None, zero=None):
    """Round-to-nearest of W [N, K] on the given grid (min-max per group when scale is None)."""
    if scale is None:
        scale, zero = Q.minmax_qparams(W, bits, gs, symmetric)
    return Q.dequantize(Q.quantize(W, scale, zero, bits, gs), scale, zero, gs)


def weight_mean(W: torch.Tensor, gs: int) -> torch.Tensor:
    """Per input channel mean over rows of |W| / (its group's max |W|): [K] (AutoAWQ's w_mean)."""
    N, K = W.shape
    a = W.abs().reshape(N, K // gs, gs)
    return (a / a.amax(-1, keepdim=True).clamp_min(1e-8)).reshape(N, K).mean(0)


def scale_candidates(xmean: torch.Tensor, W: torch.Tensor, gs: int, grid: int, duo: bool = False, tie=None):
    """[(alpha, s)]: alpha = i / grid, i < grid (alpha < 0 marks a duo candidate); s normalized."""
    xm = xmean.clamp_min(1e-4)
    wm = weight_mean(W, gs).clamp_min(1e-4) if duo else None
    out = []
    for alpha, is_duo in [(i / grid, False) for i in range(grid)] + \
            ([(i / grid, True) for i in range(1, grid)] if duo else []):
        s = xm.pow(alpha) / wm.pow(1 - alpha) if is_duo else xm.pow(alpha)
        if tie is not None:
            s = tie(s)
        out.append((-alpha if is_duo else alpha, s / (s.max() * s.min()).sqrt()))
    return out


def _get(block, short):
    try:
        return block.get_submodule(short)
    except AttributeError:
        return None


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Output error of the linear on the calibration set: sum over rows of d H d^T, d = W - Wq."""
    D = (W - Wq).float()
    return float(((D @ H) * D).sum())


@torch.no_grad()
def search_scale(x: torch.Tensor | None, xmean: torch.Tensor, W: torch.Tensor, bits: int, gs: int, symmetric: bool,
                 grid: int = 20, forward=None, tie=None, duo: bool = False,
                 quantize: Callable | None = None, error: Callable | None = None):
    """Best per-input-channel scale s [K] for weight W [N, K].

    ``quantize(Ws, s)`` quantizes the scaled weight (default: min-max RTN); ``error(Wq)`` scores the
    quantized weight in the original space (default: mean squared error of ``forward(x, W)``, which
    is x @ W^T unless given, on the tokens x [T, K]). ``tie(s)`` may average s over channels that
    must share one value. Returns (s, alpha, loss); alpha is reported as -alpha for a duo candidate.
    """
    if error is None:
        forward = forward or (lambda a, w: a @ w.t())
        ref = forward(x, W)

        def error(Wq):
            return (forward(x, Wq) - ref).pow(2).mean().item()
    quantize = quantize or (lambda Ws, s: qdq(Ws, bits, gs, symmetric))
    best = (None, None, float("inf"))
    for alpha, s in scale_candidates(xmean, W, gs, grid, duo, tie):
        loss = error(quantize(W * s, s) / s)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best


@torch.no_grad()
def search_clip(x: torch.Tensor, W: torch.Tensor, bits: int, gs: int, symmetric: bool, grid: int = 20,
                max_shrink: float = 0.5, row_chunk: int = 256):
    """Per (row, group) clip ratio minimizing sum_t (x_g . (w_g - q_g))^2. Returns (scale, zero) [N, G]."""
    N, K = W.shape
    G = K // gs
    xg = x.float().reshape(-1, G, gs)
    ratios = [1 - i / grid for i in range(int(round(max_shrink * grid)) + 1)]
    best_err = torch.full((N, G), float("inf"), device=W.device)
    best_r = torch.ones(N, G, device=W.device)
    for r in ratios:
        s, z = Q.minmax_qparams(W, bits, gs, symmetric, clip_max=r)
        D = (W - Q.dequantize(Q.quantize(W, s, z, bits, gs), s, z, gs)).reshape(N, G, gs)
        err = torch.empty(N, G, device=W.device)
        for a in range(0, N, row_chunk):
            err[a:a + row_chunk] = torch.einsum("tgk,ngk->tng", xg, D[a:a + row_chunk]).pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return Q.minmax_qparams(W, bits, gs, symmetric, clip_max=best_r)


@torch.no_grad()
def asym_clip_qparams(W: torch.Tensor, H: torch.Tensor, spec, grid: int = 20, max_shrink: float = 0.5,
                      rounds: int = 1):
    """BitDistiller's clip: separate max / min shrink per group on the Hessian's group blocks.
    Returns (scale, zero) [N, G] for W [N, K] (H [K, K] in W's coordinates)."""
    gs = spec.group_for(W.shape[1])
    cfg = C.ClipConfig(n_grid=grid, max_shrink=max_shrink, rounds=rounds)
    a, b = C.search_clip(W, C.group_grams(H, gs), spec, cfg)
    return Q.minmax_qparams(W.float(), spec.bits, gs, spec.symmetric, a, b)


def mlp_forward(block):
    """forward(x, [W_gate; W_up]) -> the MLP output (down_proj in float); None without act_fn / down_proj."""
    mlp = _get(block, "mlp")
    act = getattr(mlp, "act_fn", None)
    if act is None or _get(block, "mlp.down_proj") is None:
        return None
    wd = mlp.down_proj.weight.float()

    def fwd(x, W):  # W = [gate; up] stacked
        g, u = (x @ W.t()).chunk(2, dim=-1)
        return (act(g) * u) @ wd.t()
    return fwd


def attn_error(ctx, lins: list[str], n_windows: int):
    """error(Wq) for stacked q/k/v: mean squared error of the attention output (o_proj in float) on
    the first batches holding ``n_windows`` calibration windows (AWQ's module2inspect); None when
    the block has no self_attn / input_layernorm."""
    attn, norm = _get(ctx.block, "self_attn"), _get(ctx.block, "input_layernorm")
    if attn is None or norm is None:
        return None
    mods = [_get(ctx.block, n) for n in lins]
    batches, seen = [], 0
    for x, kw in zip(ctx.inputs, ctx.kwargs):
        if seen >= n_windows:
            break
        batches.append((norm(x), kw))
        seen += x.shape[0]

    def outputs():
        return [attn(hidden_states=h, **kw)[0] for h, kw in batches]
    ref = outputs()

    def error(Wq):
        old = [m.weight.data for m in mods]
        for m, w in zip(mods, Wq.split([m.out_features for m in mods])):
            m.weight.data = w.to(m.weight.dtype)
        try:
            return sum((o - r).float().pow(2).mean().item() for o, r in zip(outputs(), ref)) / len(ref)
        finally:
            for m, w in zip(mods, old):
                m.weight.data = w
    return error


def scaled_hessian(H: torch.Tensor, s: torch.Tensor | None, percdamp: float, damp_unscaled: bool):
    """(H', percdamp') for GPTQ on W * s: H / (s s^T), dampened first in the unscaled space when
    ``damp_unscaled`` (then GPTQ adds a negligible 1e-9); mirrors :func:`qft.ptq.gptq.gptq_block`."""
    if s is None:
        return H, percdamp
    if damp_unscaled:
        H = H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        percdamp = 1e-9
    return H / torch.outer(s, s).to(H), percdamp
