"""OWQ: outlier-aware weight quantization (weak columns kept in fp16, the rest by GPTQ).

Paper: Lee et al., "OWQ: Outlier-Aware Weight Quantization for Efficient Fine-Tuning and Inference
of Large Language Models" (AAAI 2024). A few input channels carry activation outliers; quantizing
the weight columns that multiply them costs most of the output error. OWQ scores column j by
sensitivity_j = H_jj * ||W[:, j] - Q(W[:, j])||^2 (the Hessian diagonal times the column's
round-to-nearest error), keeps the top-k "weak" columns in fp16 and quantizes the rest with GPTQ,
whose error feedback also flows into the kept columns (they absorb part of the others' error).

Here that feedback is done in closed form: with R the kept columns and S the rest, GPTQ runs on S
against the Schur complement H_SS - H_SR H_RR^-1 H_RS (the Hessian left once R re-optimizes), and
afterwards R takes its optimal values W_R + (W_S - Q_S) H_SR H_RR^-1. This equals GPTQ with R
ordered last and never rounded, and reuses ``qft.ptq.gptq.gptq_quantize`` unchanged: the kept
columns stay in place in the dense matrix as zero columns (their codes are the zero point, so the
dense part is exactly 0 there) and the group layout stays the canonical one.

Export: :class:`qft.nn.mixed.MixedLinear` (b-bit dense + fp16 columns). Bits per weight grow by
about 16 * k / K. Simplified: k is a fraction of each layer's in_features (``col_fraction``),
not the paper's per-model budget spread by sensitivity; no act-order inside the kept set.
"""

from __future__ import annotations

import torch

from qft.nn import quant as Q
from qft.nn.mixed import MixedLinear
from qft.ptq.calibrate import BlockContext, sequential
from qft.ptq.gptq import GPTQConfig, check_int_spec, gptq_quantize
from qft.registry import METHODS
from qft.spec import resolve_spec

__all__ = ["column_sensitivity", "select_columns", "owq_quantize", "owq"]


def column_sensitivity(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool = False):
    """OWQ's score per input column: H_jj * sum_n (w_nj - rtn(w)_nj)^2, [K]."""
    err = w.float() - Q.qdq_weight(w.float(), bits, group_size, symmetric)
    return torch.diag(h).float() * err.pow(2).sum(0)


def select_columns(w, h, bits, group_size, n_cols: int, symmetric: bool = False) -> torch.Tensor:
    """Indices (sorted) of the ``n_cols`` most sensitive input columns."""
    if n_cols <= 0:
        return torch.zeros(0, dtype=torch.long, device=w.device)
    s = column_sensitivity(w, h, bits, group_size, symmetric)
    return torch.sort(torch.topk(s, min(n_cols, s.numel())).indices).values


@torch.no_grad()
def owq_quantize(w: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool = False, percdamp: float = 0.01, **gptq_kw):
    """GPTQ on the columns outside ``idx`` against the Schur complement, optimal fp values for ``idx``.

    Returns (w_q [N, K] dense dequantized weight with zeros at ``idx``, scale, zero, col_weight [N, r])."""
    w = w.float()
    h = h.float()
    k = w.shape[1]
    dead = torch.diag(h) == 0
    hd = h.clone()
    hd[dead, dead] = 1
    hd += percdamp * torch.mean(torch.diag(hd)) * torch.eye(k, device=h.device)
    keep = torch.zeros(k, dtype=torch.bool, device=w.device)
    keep[idx] = True
    rest = ~keep
    h_eff = torch.zeros_like(h)
    w0 = w.clone()
    w0[:, keep] = 0
    if keep.any():
        h_rr = hd[keep][:, keep]
        h_sr = hd[rest][:, keep]
        sol = torch.linalg.solve(h_rr, h_sr.t())  # H_RR^-1 H_RS  [r, |S|]
        schur = hd[rest][:, rest] - h_sr @ sol
        h_eff[rest.nonzero()[:, 0][:, None], rest.nonzero()[:, 0][None, :]] = schur
    else:
        h_eff = hd
    h_eff[dead, :] = 0
    h_eff[:, dead] = 0
    res = gptq_quantize(w0, h_eff, bits, group_size, symmetric, percdamp=percdamp, **gptq_kw)
    col_w = w[:, keep]
    if keep.any():
        e_s = (w[:, rest] - res.w_q[:, rest])
        col_w = col_w + e_s @ sol.t()
    res.w_q[:, keep] = 0
    return res.w_q, res.scale, res.zero, col_w


def owq_block(ctx: BlockContext, cfg: GPTQConfig, col_fraction: float) -> None:
    spec = ctx.spec
    stats = ctx.collect(hessian=True)
    for short, lin in list(ctx.linears.items()):
        h = stats[short].H
        w = lin.weight.data.float()
        k = w.shape[1]
        gs = spec.group_for(k)
        idx = select_columns(w, h, spec.bits, gs, int(round(col_fraction * k)), spec.symmetric)
        w_q, scale, zero, col_w = owq_quantize(w, h, idx, spec.bits, gs, spec.symmetric, cfg.percdamp,
                                               block_size=cfg.block_size, act_order=cfg.act_order,
                                               clip_grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
        codes = Q.quantize(w_q, scale, zero, spec.bits, gs)
        bias = None if lin.bias is None else lin.bias.data
        ctx.replace(short, MixedLinear.from_parts(codes, zero, spec.bits, gs, scales=scale, col_idx=idx,
                                                  col_weight=col_w, bias=bias, dtype=lin.weight.dtype,
                                                  name=f"{ctx.name}.{short}"))


@METHODS.register("owq")
def owq(model, spec, calib=None, **options):
    """OWQ over every targeted linear (in place). Options: ``col_fraction`` (fraction of each layer's
    input columns kept in fp16, default 0.01) and the GPTQ options (percdamp, block_size, act_order,
    clip_grid, max_shrink, batch_size, device)."""
    spec = resolve_spec(spec)
    check_int_spec("owq", spec)
    frac = options.pop("col_fraction", 0.01)
    if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac < 0.5:
        raise ValueError(f"owq: col_fraction={frac!r} is not valid; allowed: a number in [0, 0.5)")
    cfg = GPTQConfig.from_options("owq", options)
    if calib is None:
        raise ValueError("owq needs calibration data: calib=qft.ptq.calibrate.calib_windows(tokenizer, path)")
    model = sequential(model, calib, spec, lambda ctx: owq_block(ctx, cfg, float(frac)), device=cfg.device,
                       batch_size=cfg.batch_size, desc="owq")
    model.qft_spec = spec.replace(format="qft")  # its modules exist only in the native format
    return model
