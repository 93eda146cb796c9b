"""Clipping search: BitDistiller's asymmetric clip initialization, also a PTQ method ("clip").

Paper: Du et al., "BitDistiller: Unleashing the Potential of Sub-4-Bit LLMs via Self-Distillation"
(ACL 2024), following AWQ's clip search (Lin et al., MLSys 2024). Before QAT, every weight group
gets its own range: the group maximum is shrunk by a ratio a and the minimum by a ratio b,
a, b in {1, 1 - 1/n, ..., 1 - max_shrink}, chosen to minimize the error of the layer's output on
calibration activations, E_x[(x_g . (w_g - Q_ab(w_g)))^2], where x_g are the inputs of group g.

That error is a quadratic form d^T C_g d with C_g the group's block of the input Gram matrix
X^T X, so the search needs the block-diagonal of the Hessian that ``qft.ptq.calibrate`` already
collects, not the activations themselves: each candidate costs N*K*group_size multiply-adds.

Simplified: instead of the full n x n grid per group, a coordinate search: first a joint ratio
(a = b, AWQ's setting), then ``rounds`` passes of "best a given b" and "best b given a" (every
group picks its own best in each pass). Symmetric and codebook grids have one ratio (the absmax).
Blocks are processed in order on the outputs of the already-clipped blocks (sequential
calibration). The chosen per-group ratios stay on each QuantLinear as ``qft_clip = (a, b)`` (an
attribute, not a buffer) so LoRA-in-quantizer training can keep using them with dynamic ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from qft.nn import quant as Q
from qft.nn.qlinear import QuantLinear
from qft.ptq.calibrate import BlockContext, sequential
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

__all__ = ["ClipConfig", "group_grams", "clip_error", "search_clip", "clip"]


@dataclass
class ClipConfig:
    n_grid: int = field(default=20, metadata={"help": "grid steps: ratios 1, 1 - 1/n_grid, ..."})
    max_shrink: float = field(default=0.5, metadata={"help": "smallest ratio tried is 1 - max_shrink"})
    rounds: int = field(default=1, metadata={"help": "coordinate passes (max given min, min given max)"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward"})
    device: str | None = field(default=None, metadata={"help": "where each block runs (default: the model's)"})

    def __post_init__(self):
        for k in ("n_grid", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"clip: {k}={v!r} is not valid; allowed: a positive integer")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"clip: rounds={self.rounds!r} is not valid; allowed: an integer >= 0")
        if not isinstance(self.max_shrink, (int, float)) or not 0 < self.max_shrink < 1:
            raise ValueError(f"clip: max_shrink={self.max_shrink!r} is not valid; allowed: a number in (0, 1)")

    def ratios(self) -> list[float]:
        steps = int(self.max_shrink * self.n_grid)
        return [1.0 - i / self.n_grid for i in range(steps + 1)]


def group_grams(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks of X^T X [K, K] -> [G, gs, gs]."""
    k = hessian.shape[0]
    g = k // group_size
    h = hessian.reshape(g, group_size, g, group_size)
    idx = torch.arange(g)
    return h[idx, :, idx, :]


def _qdq(w, spec: QuantSpec, gs: int, cmax, cmin):
    if spec.scheme == "int":
        s, z = Q.minmax_qparams(w, spec.bits, gs, spec.symmetric, cmax, cmin)
        return Q.dequantize(Q.quantize(w, s, z, spec.bits, gs), s, z, gs)
    s, _ = Q.codebook_qparams(w, spec.scheme, spec.bits, gs, cmax)
    return Q.codebook_dequantize(Q.codebook_quantize(w, s, spec.scheme, spec.bits, gs), s, spec.scheme, spec.bits, gs)


def clip_error(w: torch.Tensor, w_q: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """Output error per (row, group): d^T C_g d with d = w - w_q; [N, G]."""
    gs = grams.shape[-1]
    d = Q.group_view((w - w_q).float(), gs)
    return torch.einsum("ngk,gkl,ngl->ng", d, grams, d)


@torch.no_grad()
def search_clip(w: torch.Tensor, grams: torch.Tensor, spec: QuantSpec, cfg: ClipConfig = ClipConfig()):
    """Per-group clip ratios (a for the max, b for the min), each [N, G], minimizing the output error."""
    w = w.float()
    n, k = w.shape
    gs = spec.group_for(k)
    g = k // gs
    ones = torch.ones(n, g, device=w.device)
    ratios = cfg.ratios()

    def best_over(make):  # make(r) -> (a, b); every group keeps its best candidate
        best_err = torch.full((n, g), float("inf"), device=w.device)
        best_a, best_b = ones.clone(), ones.clone()
        for r in ratios:
            a, b = make(r)
            err = clip_error(w, _qdq(w, spec, gs, a, b), grams)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
        return best_a, best_b, best_err

    a, b, err = best_over(lambda r: (ones * r, ones * r))
    asym = spec.scheme == "int" and not spec.symmetric
    for _ in range(cfg.rounds if asym else 0):
        a, b, err = best_over(lambda r, b=b: (ones * r, b))
        a, b, err = best_over(lambda r, a=a: (a, ones * r))
    return a, b


@METHODS.register("clip")
def clip(model, spec: "QuantSpec | str | dict", calib=None, **options):
    """Quantize ``model`` with per-group clipping ratios searched on ``calib`` windows."""
    spec = resolve_spec(spec)
    known = {f.name for f in fields(ClipConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"clip: unknown option(s) {bad}; allowed: {sorted(known)}")
    cfg = ClipConfig(**options)
    if calib is None:
        raise ValueError("clip: needs calibration windows (calib=LongTensor [n, seq_len]); "
                         "see qft.ptq.calibrate.calib_windows")

    def process(ctx: BlockContext):
        stats = ctx.collect(hessian=True)
        for short, lin in list(ctx.linears.items()):
            gs = spec.group_for(lin.in_features)
            grams = group_grams(stats[short].hessian / max(stats[short].count, 1), gs)
            a, b = search_clip(lin.weight.data, grams, spec, cfg)
            w = lin.weight.data.float()
            if spec.scheme == "int":
                s, z = Q.minmax_qparams(w, spec.bits, gs, spec.symmetric, a, b)
            else:
                s, z = Q.codebook_qparams(w, spec.scheme, spec.bits, gs, a)
            q = QuantLinear.from_linear(lin, spec, name=f"{ctx.name}.{short}", scale=s, zero=z)
            q.qft_clip = (a, b)
            ctx.replace(short, q)

    return sequential(model, calib, spec, process, device=cfg.device, batch_size=cfg.batch_size, desc="clip search")
