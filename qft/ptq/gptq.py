"""GPTQ: column-by-column quantization with second-order error feedback.

Paper: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023). For a linear layer with calibration inputs X, minimize
||W X - Q X||^2 one column (input channel) at a time: quantize column j, then spread its error
over the columns not yet quantized with the inverse Hessian H^-1, H = 2 X^T X / n. Using the upper
Cholesky factor U of H^-1 makes this exact and stable; updates are applied lazily in blocks of
``block_size`` columns (one rank-1 update per column inside the block, one matmul per block).

Options: a per-group grid search (``clip_grid``, on by default): each group's min-max range may
shrink by up to ``max_shrink``, choosing the ratio with the least diag(H)-weighted rounding error
(in the spirit of GPTQ's optional MSE grid and AWQ's clip search; plain min-max with clip_grid=0).
Dampening (``percdamp`` * mean diag(H) added to the diagonal), groups (per-group min-max
scale/zero), act-order (columns in order of decreasing diag(H)) with *static groups*: each group's
scale/zero is computed on the original weights in the original column order before permuting, so
the exported g_idx stays the plain ``k // group_size`` and qft's canonical layout holds the result.
Without act-order, each group's parameters are computed when the loop reaches its first column,
from the weights as already updated by the error feedback (the reference algorithm). Symmetric
and asymmetric grids use qft's min-max definition (``qft.nn.quant.minmax_qparams``).

Linears fed the same input (q/k/v, gate/up) share one Hessian, so they are quantized together as
one stacked matrix (GPTQ is independent per output row given H). Every block is calibrated on the
outputs of the already-quantized blocks (``qft.ptq.calibrate.sequential``).

Simplified: no "true sequential" re-run inside a block (o_proj and down_proj see the float block's
inputs, as in most implementations); the Cholesky retries with 10x dampening if H is not positive
definite instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from qft.nn import quant as Q
from qft.ptq.calibrate import BlockContext, make_quant_linear, sequential
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["GPTQConfig", "GPTQResult", "gptq_quantize", "inverse_hessian_factor", "gptq_block", "gptq"]


@dataclass
class GPTQConfig:
    percdamp: float = field(default=0.01, metadata={"help": "dampening: fraction of mean diag(H) added to H's diagonal"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy-update block"})
    act_order: bool = field(default=True, metadata={
        "help": "quantize columns by decreasing diag(H) (static groups: g_idx stays k // group_size)"})
    clip_grid: int = field(default=20, metadata={
        "help": "group grid search: shrink ratios 1, 1 - 1/clip_grid, ... (0 = plain min-max)"})
    max_shrink: float = field(default=0.5, metadata={"help": "largest fraction of a group's range the search removes"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward"})
    device: str | None = field(default=None, metadata={"help": "where each block runs (default: the model's device)"})

    def __post_init__(self):
        if not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise ValueError(f"gptq: percdamp={self.percdamp!r} is not valid; allowed: a number in (0, 1)")
        for k in ("block_size", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"gptq: {k}={v!r} is not valid; allowed: a positive integer")
        if not isinstance(self.clip_grid, int) or isinstance(self.clip_grid, bool) or self.clip_grid < 0:
            raise ValueError(f"gptq: clip_grid={self.clip_grid!r} is not valid; allowed: an integer >= 0")
        if not isinstance(self.max_shrink, (int, float)) or not 0 <= self.max_shrink < 1:
            raise ValueError(f"gptq: max_shrink={self.max_shrink!r} is not valid; allowed: a number in [0, 1)")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"gptq: act_order={self.act_order!r} is not valid; allowed: true or false")

    @classmethod
    def from_options(cls, method: str, options: dict, extra: tuple = ()) -> "GPTQConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(options) - known - set(extra))
        if bad:
            raise ValueError(f"{method}: unknown option(s) {bad}; allowed: {sorted(known | set(extra))}")
        return cls(**{k: v for k, v in options.items() if k in known})


@dataclass
class GPTQResult:
    w_q: torch.Tensor    # [N, K] quantized-dequantized weight, original column order
    scale: torch.Tensor  # [N, G]
    zero: torch.Tensor   # [N, G]
    perm: torch.Tensor | None  # column order used (act-order), None = natural
    loss: float          # sum of (w - q)^2 / d^2 / 2, GPTQ's proxy of the output error


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 (H permuted by ``perm`` first). Dead inputs
    (diag 0) get diag 1. Retries with 10x dampening if H is not positive definite."""
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if perm is not None:
        H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = damp * 10
    raise ValueError("gptq: the Hessian is not positive definite even with strong dampening; "
                     "use more calibration data or a larger percdamp")


def group_qparams(w: torch.Tensor, d: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  clip_grid: int = 20, max_shrink: float = 0.5):
    """Per-group (scale, zero) [N, G] for w [N, K]: min-max shrunk by the ratio r in
    {1, 1 - 1/clip_grid, ..., 1 - max_shrink} minimizing sum_k d_k (w_k - q_k)^2 (d = diag(H): the
    error GPTQ cannot feed back is weighted by how strongly each input fires). clip_grid=0: min-max."""
    if not clip_grid:
        return Q.minmax_qparams(w, bits, group_size, symmetric)
    N, K = w.shape
    G = K // group_size
    dg = d.float().reshape(1, G, group_size)
    best_e = torch.full((N, G), float("inf"), device=w.device)
    best_r = torch.ones(N, G, device=w.device)
    for i in range(int(round(max_shrink * clip_grid)) + 1):
        r = 1 - i / clip_grid
        s, z = Q.minmax_qparams(w, bits, group_size, symmetric, clip_max=r)
        e = ((w - Q.dequantize(Q.quantize(w, s, z, bits, group_size), s, z, group_size)).reshape(N, G, group_size)
             .pow(2) * dg).sum(-1)
        better = e < best_e
        best_e, best_r = torch.where(better, e, best_e), torch.where(better, torch.full_like(best_r, r), best_r)
    return Q.minmax_qparams(w, bits, group_size, symmetric, clip_max=best_r)


def _quant_cols(w, s, z, maxq):
    return (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  percdamp: float = 0.01, block_size: int = 128, act_order: bool = True,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None, U: torch.Tensor | None = None,
                  clip_grid: int = 0, max_shrink: float = 0.5) -> GPTQResult:
    """Quantize W [N, K] against the Hessian H [K, K]. ``qparams`` (scale, zero [N, G]) fixes the grid
    (static groups); otherwise each group's grid comes from :func:`group_qparams` (min-max, or the
    diag(H)-weighted shrink search when ``clip_grid`` > 0). ``U`` reuses a factor from
    :func:`inverse_hessian_factor` (must have been built with the same act-order permutation)."""
    N, K = W.shape
    if K % group_size:
        raise ValueError(f"gptq: group_size={group_size} does not divide in_features={K}")
    maxq = 2 ** bits - 1
    W = W.clone().float()
    W[:, torch.diag(H) == 0] = 0
    G = K // group_size
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    static = act_order or qparams is not None
    if static:
        scale, zero = qparams if qparams is not None else \
            group_qparams(W, torch.diag(H), bits, group_size, symmetric, clip_grid, max_shrink)
        scale, zero = scale.float().clone(), zero.float().clone()
    else:
        scale = torch.zeros(N, G, device=W.device)
        zero = torch.zeros(N, G, device=W.device)
    col_group = torch.arange(K, device=W.device) // group_size
    dH = torch.diag(H)
    if perm is not None:
        dH = dH[perm]
        W = W[:, perm]
        col_group = col_group[perm]
    if U is None:
        U = inverse_hessian_factor(H, percdamp, perm)
    Wq = torch.zeros_like(W)
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if static:
            S1, Z1 = scale[:, col_group[i1:i2]], zero[:, col_group[i1:i2]]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % group_size == 0:
                cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :group_size]
                s, z = group_qparams(cur, dH[j:j + group_size], bits, group_size, symmetric, clip_grid, max_shrink)
                scale[:, j // group_size], zero[:, j // group_size] = s[:, 0], z[:, 0]
            if static:
                s, z = S1[:, i], Z1[:, i]
            else:
                s, z = scale[:, j // group_size], zero[:, j // group_size]
            w = W1[:, i]
            d = U1[i, i]
            q = _quant_cols(w, s, z, maxq)
            Q1[:, i] = q
            err = (w - q) / d
            loss += (err * err).sum() / 2
            if i + 1 < i2 - i1:
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1)
            E1[:, i] = err
        Wq[:, i1:i2] = Q1
        if i2 < K:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
    if perm is not None:
        Wq = Wq[:, torch.argsort(perm)]
    return GPTQResult(Wq, scale, zero, perm, float(loss))


def gptq_block(ctx: BlockContext, cfg: GPTQConfig, stats: dict | None = None, scales: dict | None = None,
               qparams: dict | None = None, damp_unscaled: bool = False) -> None:
    """Quantize every targeted linear of one block with GPTQ (linears sharing an input share H).

    ``stats`` (from ``ctx.collect``) is collected here when not given. ``scales`` {short name:
    per-input-channel s} means the weights were multiplied by s after the stats were taken: the
    Hessian becomes H / (s s^T) (AWQ then GPTQ; ``damp_unscaled``: dampened before the division, as
    plain GPTQ would be, instead of by the scaled diagonal's mean). ``qparams`` {short name: (scale, zero)} fixes grids.
    """
    spec = ctx.spec
    if stats is None:
        stats = ctx.collect(hessian=True)
    done = set()
    for st in {id(s): s for s in stats.values()}.values():
        names = [n for n in st.names if n in ctx.linears and n not in done]
        if not names:
            continue
        H = st.H
        s = (scales or {}).get(names[0])
        damp = cfg.percdamp
        if s is not None and damp_unscaled:  # dampen in the unscaled space (as plain GPTQ does), then
            # change coordinates: dampening H / (s s^T) by its own mean diagonal regularizes the
            # strongly scaled channels far more than plain GPTQ would
            H = H + cfg.percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
            damp = 1e-9
        if s is not None:
            H = H / torch.outer(s, s).to(H)
        W = torch.cat([ctx.linears[n].weight.data.float() for n in names])
        gs = spec.group_for(W.shape[1])
        qp = None
        if qparams and all(n in qparams for n in names):
            qp = (torch.cat([qparams[n][0] for n in names]), torch.cat([qparams[n][1] for n in names]))
        res = gptq_quantize(W, H, spec.bits, gs, spec.symmetric, damp, cfg.block_size, cfg.act_order, qp,
                            clip_grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
        row = 0
        for n in names:
            lin = ctx.linears[n]
            r = slice(row, row + lin.out_features)
            row += lin.out_features
            ctx.replace(n, make_quant_linear(lin, spec, f"{ctx.name}.{n}", res.w_q[r], res.scale[r], res.zero[r]))
            done.add(n)


def check_int_spec(method: str, spec: QuantSpec) -> None:
    if spec.scheme != "int":
        raise ValueError(f"{method}: QuantSpec.scheme={spec.scheme!r} is not supported; allowed: 'int' "
                         f"(GPTQ/AWQ work on a uniform integer grid)")


@METHODS.register("gptq")
def gptq(model, spec, calib=None, **options):
    """GPTQ over every targeted linear of ``model`` (in place), block by block on ``calib`` windows.

    Options: see :class:`GPTQConfig` (percdamp, block_size, act_order, batch_size, device).
    """
    spec = resolve_spec(spec)
    check_int_spec("gptq", spec)
    cfg = GPTQConfig.from_options("gptq", options)
    if calib is None:
        raise ValueError("gptq needs calibration data: calib=qft.ptq.calibrate.calib_windows(tokenizer, path)")
    return sequential(model, calib, spec, lambda ctx: gptq_block(ctx, cfg), device=cfg.device,
                      batch_size=cfg.batch_size, desc="gptq")
