"""SpQR: sparse-quantized representation (small groups, quantized statistics, sparse fp16 outliers).

Paper: Dettmers et al., "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
Compression" (ICLR 2024). GPTQ-style column-by-column quantization with error feedback, with three
changes that make very small groups affordable and isolate the weights that hurt most:

1. small groups (``group_size`` 16) along the input dimension;
2. the per-group statistics are themselves quantized: each group's scale vector over the N output
   rows is min-max quantized to ``stat_bits`` (3) bits in blocks of ``stat_group`` (16) rows, with one
   16-bit (scale, min) pair per block (zero points are b-bit integers already);
3. outliers: in each group the weights with the largest sensitivity-weighted deviation are kept
   exactly in high precision, excluded from the group's min-max range, and contribute no error to
   the feedback; they are stored as a sparse CSR matrix.

Export: :class:`qft.nn.mixed.MixedLinear` with quantized statistics and CSR outliers; the dense codes
at outlier positions are the zero point, so the effective weight there is exactly the outlier value.

Simplified: outliers are chosen per group as the top ``outlier_fraction`` of N * group_size weights
by ((w - row median) / d_j)^2 with d_j GPTQ's inverse-Hessian factor diagonal (the paper tests each
weight's leave-one-out loss reduction against a threshold, so its outlier count varies); each
group's inlier range comes from GPTQ's diag(H)-weighted shrink search (``clip_grid``, as the GPTQ
baseline; 0 = plain min-max, the paper's); no act-order (the natural column order keeps the canonical group layout); zero points are not
second-level quantized (they are already b-bit integers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from qft.nn import quant as Q
from qft.nn.mixed import MixedLinear, csr_from_mask, dequantize_stats, quantize_stats
from qft.ptq.calibrate import BlockContext, sequential
from qft.ptq.gptq import check_int_spec, group_qparams, inverse_hessian_factor
from qft.registry import METHODS
from qft.spec import resolve_spec

__all__ = ["SpQRConfig", "SpQRResult", "pick_outliers", "spqr_quantize", "spqr"]


@dataclass
class SpQRConfig:
    outlier_fraction: float = field(default=0.005, metadata={"help": "fraction of weights kept as fp outliers"})
    stat_bits: int = field(default=3, metadata={"help": "bits of the quantized group scales (0 = 16-bit scales)"})
    stat_group: int = field(default=16, metadata={"help": "output rows sharing one second-level (scale, min) pair"})
    percdamp: float = field(default=0.01, metadata={"help": "dampening: fraction of mean diag(H) added to H"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy-update block (rounded to groups)"})
    clip_grid: int = field(default=20, metadata={
        "help": "GPTQ's diag(H)-weighted range search for each group's inliers (0 = plain min-max)"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward"})
    device: str | None = field(default=None, metadata={"help": "where each block runs (default: the model's)"})

    def __post_init__(self):
        f = self.outlier_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f < 0.5:
            raise ValueError(f"spqr: outlier_fraction={f!r} is not valid; allowed: a number in [0, 0.5)")
        if not isinstance(self.stat_bits, int) or not 0 <= self.stat_bits <= 8:
            raise ValueError(f"spqr: stat_bits={self.stat_bits!r} is not valid; allowed: an integer 0..8")
        if not isinstance(self.clip_grid, int) or isinstance(self.clip_grid, bool) or self.clip_grid < 0:
            raise ValueError(f"spqr: clip_grid={self.clip_grid!r} is not valid; allowed: an integer >= 0")
        for k in ("stat_group", "block_size", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"spqr: {k}={v!r} is not valid; allowed: a positive integer")
        if not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise ValueError(f"spqr: percdamp={self.percdamp!r} is not valid; allowed: a number in (0, 1)")


@dataclass
class SpQRResult:
    codes: torch.Tensor        # uint8 [N, K] (zero point at outliers)
    zeros: torch.Tensor        # [N, G] integers
    scales: torch.Tensor       # [N, G] float32 (dequantized statistics)
    stats: tuple | None        # (scale_codes, stat_scale, stat_min) when stat_bits > 0
    outliers: torch.Tensor     # bool [N, K]
    values: torch.Tensor       # [N, K] outlier values (0 elsewhere)
    w_q: torch.Tensor          # [N, K] effective weight
    loss: float


def pick_outliers(w: torch.Tensor, d: torch.Tensor, n_out: int) -> torch.Tensor:
    """bool [N, g]: the ``n_out`` weights of a group with the largest ((w - row median) / d)^2."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    if n_out <= 0:
        return mask
    score = ((w - w.median(dim=1, keepdim=True).values) / d[None, :]).pow(2)
    mask.view(-1)[torch.topk(score.reshape(-1), min(n_out, score.numel())).indices] = True
    return mask


@torch.no_grad()
def spqr_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  outlier_fraction: float = 0.005, stat_bits: int = 3, stat_group: int = 16,
                  percdamp: float = 0.01, block_size: int = 128, store_dtype=torch.float32,
                  clip_grid: int = 0) -> SpQRResult:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"spqr: group_size={group_size} does not divide in_features={k}")
    maxq = 2 ** bits - 1
    gs, g = group_size, k // group_size
    W = w.clone().float()
    W[:, torch.diag(h) == 0] = 0
    U = inverse_hessian_factor(h, percdamp)
    du = torch.diag(U)
    block = max(gs, (block_size // gs) * gs)
    n_out = int(round(outlier_fraction * n * gs))
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    outl = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    vals = torch.zeros(n, k, device=w.device)
    wq = torch.zeros(n, k, device=w.device)
    scales, zeros = torch.zeros(n, g, device=w.device), torch.zeros(n, g, device=w.device)
    sc_codes = torch.zeros(n, g, dtype=torch.uint8, device=w.device)
    st_s, st_m = [], []
    loss = torch.zeros((), device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:
                gi = j // gs
                grp = W1[:, i:i + gs]
                mask = pick_outliers(grp, du[j:j + gs], n_out)
                inl = torch.where(mask, torch.zeros_like(grp), grp)
                s, z = group_qparams(inl, torch.diag(h)[j:j + gs], bits, gs, symmetric, clip_grid)
                s, z = s[:, 0], z[:, 0]
                if stat_bits:
                    c, ss, sm = quantize_stats(s[:, None], stat_bits, stat_group, store_dtype)
                    s = dequantize_stats(c, ss, sm, stat_group)[:, 0]
                    sc_codes[:, gi] = c[:, 0]
                    st_s.append(ss)
                    st_m.append(sm)
                scales[:, gi], zeros[:, gi] = s, z
                outl[:, j:j + gs] = mask
            s, z = scales[:, j // gs], zeros[:, j // gs]
            col = W1[:, i]
            o = outl[:, j]
            u = torch.clamp(torch.round(col / s) + z, 0, maxq)
            q = torch.where(o, col, (u - z) * s)
            codes[:, j] = torch.where(o, z, u).to(torch.uint8)
            vals[:, j] = torch.where(o, col, torch.zeros_like(col))
            wq[:, j] = q
            err = (col - q) / U1[i, i]
            loss += (err * err).sum() / 2
            if i + 1 < i2 - i1:
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1)
            E1[:, i] = err
        if i2 < k:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
    stats = (sc_codes, torch.cat(st_s, 1), torch.cat(st_m, 1)) if stat_bits else None
    return SpQRResult(codes, zeros, scales, stats, outl, vals, wq, float(loss))


def spqr_block(ctx: BlockContext, cfg: SpQRConfig) -> None:
    spec = ctx.spec
    stats = ctx.collect(hessian=True)
    for short, lin in list(ctx.linears.items()):
        w = lin.weight.data
        gs = spec.group_for(w.shape[1])
        r = spqr_quantize(w, stats[short].H, spec.bits, gs, spec.symmetric, cfg.outlier_fraction, cfg.stat_bits,
                          cfg.stat_group, cfg.percdamp, cfg.block_size, store_dtype=w.dtype, clip_grid=cfg.clip_grid)
        sparse = csr_from_mask(r.values, r.outliers, w.dtype) if bool(r.outliers.any()) else None
        bias = None if lin.bias is None else lin.bias.data
        ctx.replace(short, MixedLinear.from_parts(r.codes, r.zeros, spec.bits, gs, scales=r.scales, stats=r.stats,
                                                  stat_bits=cfg.stat_bits, stat_group=cfg.stat_group, sparse=sparse,
                                                  bias=bias, dtype=w.dtype, name=f"{ctx.name}.{short}"))


@METHODS.register("spqr")
def spqr(model, spec, calib=None, **options):
    """SpQR over every targeted linear (in place); options: see :class:`SpQRConfig`."""
    spec = resolve_spec(spec)
    check_int_spec("spqr", spec)
    known = {f.name for f in fields(SpQRConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"spqr: unknown option(s) {bad}; allowed: {sorted(known)}")
    cfg = SpQRConfig(**options)
    if calib is None:
        raise ValueError("spqr needs calibration data: calib=qft.ptq.calibrate.calib_windows(tokenizer, path)")
    model = sequential(model, calib, spec, lambda ctx: spqr_block(ctx, cfg), device=cfg.device,
                       batch_size=cfg.batch_size, desc="spqr")
    model.qft_spec = spec.replace(format="qft")  # its modules exist only in the native format
    return model
