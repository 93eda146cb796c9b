"""SqueezeLLM: sensitivity-weighted non-uniform quantization with dense-and-sparse decomposition.

Paper: Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization" (ICML 2024). Two ideas:

1. *Sensitivity-based non-uniform quantization*: each output row gets its own 2**b levels (a lookup
   table), placed by weighted k-means on the row's weights, the weight of each entry being its
   sensitivity: the diagonal of the Fisher information, i.e. the squared gradient of the loss
   with respect to that weight summed over calibration samples. The levels gather where sensitive
   weights are, minimizing sum_k F_k (w_k - c(w_k))^2, a diagonal approximation of the loss change.
2. *Dense-and-sparse*: the few largest-magnitude weights (``outlier_fraction``, ~0.5%) are stored
   exactly in a sparse matrix and excluded from the k-means, so the tables need not stretch to them.

Export: :class:`qft.nn.lut.LUTLinear` (b-bit indices + per-row table + CSR residuals at outliers).

Sensitivity: ``fisher`` (default) runs the full model forward and backward on the calibration
windows, one window per backward, accumulating squared gradients of every targeted weight;
``hessian`` uses diag(X^T X) per input column from the shared layer-by-layer calibration
(``qft.ptq.calibrate``), a cheaper proxy that needs no backward pass. Simplified: k-means is
initialized at weighted quantiles of the row and runs a fixed number of Lloyd iterations (the paper
uses scikit-learn's k-means++); outliers are chosen by magnitude only (no sensitivity-based
sparse entries); the Fisher pass is not block-sequential (SqueezeLLM is not either).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from tqdm.auto import tqdm

from qft.nn import set_module, target_linears
from qft.nn.lut import LUTLinear
from qft.nn.mixed import csr_from_mask
from qft.ptq.calibrate import sequential
from qft.registry import METHODS
from qft.spec import resolve_spec

__all__ = ["SqueezeLLMConfig", "weighted_kmeans", "lut_quantize", "fisher_diagonal", "squeezellm"]

SENSITIVITIES = ("fisher", "hessian")


@dataclass
class SqueezeLLMConfig:
    sensitivity: str = field(default="fisher", metadata={"help": "fisher (squared gradients) | hessian (diag X^T X)"})
    outlier_fraction: float = field(default=0.0045, metadata={"help": "largest-|w| fraction kept in a sparse fp matrix"})
    iters: int = field(default=25, metadata={"help": "weighted k-means (Lloyd) iterations"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward (hessian)"})
    device: str | None = field(default=None, metadata={"help": "where the work runs (default: the model's)"})

    def __post_init__(self):
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"squeezellm: sensitivity={self.sensitivity!r} is not valid; allowed: "
                             f"{', '.join(SENSITIVITIES)}")
        f = self.outlier_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f < 0.5:
            raise ValueError(f"squeezellm: outlier_fraction={f!r} is not valid; allowed: a number in [0, 0.5)")
        for k in ("iters", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"squeezellm: {k}={v!r} is not valid; allowed: a positive integer")


def _assign(w, c):
    """Index of the nearest centroid per entry; w [N, K], c [N, C] sorted ascending."""
    mids = (c[:, 1:] + c[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), w.contiguous())


@torch.no_grad()
def weighted_kmeans(w: torch.Tensor, weight: torch.Tensor, n_clusters: int, iters: int = 25):
    """Per-row 1-D weighted k-means. w, weight [N, K] (weight >= 0). Returns (centroids [N, C] sorted,
    codes [N, K] long). Empty clusters keep their previous centroid."""
    w = w.float()
    f = weight.float().clamp_min(0)
    f = f / f.mean(1, keepdim=True).clamp_min(1e-30) + 1e-6  # scale-free (squared gradients are tiny)
    # two starts per row, the better one kept: weighted quantiles (dense middle) and an even grid
    # over [min, max] (heavy tails); Lloyd from a single start stalls in poor local optima in 1-D
    order = torch.argsort(w, dim=1)
    ws, fs = torch.gather(w, 1, order), torch.gather(f, 1, order)
    cdf = torch.cumsum(fs, 1) / fs.sum(1, keepdim=True)
    qs = (torch.arange(n_clusters, device=w.device, dtype=torch.float32) + 0.5) / n_clusters
    pos = torch.searchsorted(cdf.contiguous(), qs.expand(w.shape[0], -1).contiguous()).clamp_max(w.shape[1] - 1)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    best_c, best_e = None, None
    for c in (torch.gather(ws, 1, pos), lo + (hi - lo) * qs[None, :]):
        for _ in range(iters):
            c, _ = torch.sort(c, dim=1)
            a = _assign(w, c)
            num = torch.zeros_like(c).scatter_add_(1, a, f * w)
            den = torch.zeros_like(c).scatter_add_(1, a, f)
            c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        c, _ = torch.sort(c, dim=1)
        e = (f * (w - torch.gather(c, 1, _assign(w, c))) ** 2).sum(1)
        if best_c is None:
            best_c, best_e = c, e
        else:
            better = (e < best_e)[:, None]
            best_c, best_e = torch.where(better, c, best_c), torch.minimum(e, best_e)
    return best_c, _assign(w, best_c)


@torch.no_grad()
def lut_quantize(w: torch.Tensor, sens: torch.Tensor, bits: int, outlier_fraction: float = 0.0045, iters: int = 25):
    """(codes uint8 [N, K], lut [N, 2**bits], outlier mask [N, K], residuals [N, K]) of w [N, K].

    Outliers are the largest |w| (a global fraction of the layer); they get zero sensitivity in the
    k-means and keep their exact value as a residual w - lut[code]."""
    w = w.float()
    n_out = int(round(outlier_fraction * w.numel()))
    mask = torch.zeros_like(w, dtype=torch.bool)
    if n_out:
        mask.view(-1)[torch.topk(w.abs().reshape(-1), n_out).indices] = True
    c, a = weighted_kmeans(w, torch.where(mask, torch.zeros_like(sens, dtype=torch.float32), sens.float()),
                           2 ** bits, iters)
    dense = torch.gather(c, 1, a)
    resid = torch.where(mask, w - dense, torch.zeros_like(w))
    return a.to(torch.uint8), c, mask, resid


def fisher_diagonal(model, calib: torch.Tensor, names: list[str], device=None) -> dict[str, torch.Tensor]:
    """Sum over calibration windows of the squared gradient of the next-token loss w.r.t. each named
    linear's weight (one window per backward: the per-sample Fisher diagonal)."""
    mods = {n: model.get_submodule(n) for n in names}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()}
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        for row in tqdm(calib, desc="squeezellm fisher", unit="window"):
            ids = row[None].to(dev)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, [m.weight for m in mods.values()])
            for n, g in zip(mods, grads):
                acc[n] += g.float().pow(2)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return acc


def _replace(lin, sens, bits, cfg, name):
    codes, lut, mask, resid = lut_quantize(lin.weight.data, sens, bits, cfg.outlier_fraction, cfg.iters)
    sparse = csr_from_mask(resid, mask, lin.weight.dtype) if bool(mask.any()) else None
    return LUTLinear.from_parts(codes, lut, bits, sparse, None if lin.bias is None else lin.bias.data,
                                dtype=lin.weight.dtype, name=name)


@METHODS.register("squeezellm")
def squeezellm(model, spec, calib=None, **options):
    """SqueezeLLM over every targeted linear (in place). Uses ``spec.bits`` (the table has 2**bits
    entries per output row; ``group_size`` is ignored: the table is per channel). Options: see
    :class:`SqueezeLLMConfig`."""
    spec = resolve_spec(spec)
    known = {f.name for f in fields(SqueezeLLMConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"squeezellm: unknown option(s) {bad}; allowed: {sorted(known)}")
    cfg = SqueezeLLMConfig(**options)
    if calib is None:
        raise ValueError("squeezellm needs calibration data: calib=qft.ptq.calibrate.calib_windows(tokenizer, path)")
    if spec.scheme != "int":
        raise ValueError(f"squeezellm: QuantSpec.scheme={spec.scheme!r} is not supported; allowed: 'int' "
                         f"(bits sets the table size 2**bits)")
    if cfg.sensitivity == "hessian":
        def process(ctx):
            stats = ctx.collect(hessian=True)
            for short, lin in list(ctx.linears.items()):
                d = torch.diag(stats[short].H)[None, :].expand_as(lin.weight)
                ctx.replace(short, _replace(lin, d, spec.bits, cfg, f"{ctx.name}.{short}"))
        return sequential(model, calib, spec, process, device=cfg.device, batch_size=cfg.batch_size,
                          desc="squeezellm")
    layers = list(target_linears(model, spec))
    if not layers:
        raise ValueError(f"squeezellm: no nn.Linear matches targets={list(spec.targets)} ignore={list(spec.ignore)}")
    was_training = model.training
    model.eval()
    fisher = fisher_diagonal(model, calib.long(), [n for n, _ in layers])
    for name, lin in tqdm(layers, desc="squeezellm k-means", unit="layer"):
        set_module(model, name, _replace(lin, fisher.pop(name), spec.bits, cfg, name))
    model.qft_spec = spec.replace(format="qft")  # its modules exist only in the native format
    model.train(was_training)
    return model
