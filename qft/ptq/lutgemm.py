"""LUT-GEMM's weight format: binary-coded quantization (BCQ) with per-group scales and offset.

Paper: Park et al., "LUT-GEMM: Quantized Matrix Multiplication based on LUTs for Efficient Inference
in Large-Scale Generative Language Models" (ICLR 2024); BCQ fitting after Xu et al., "Alternating
Multi-bit Quantization for Recurrent Neural Networks" (ICLR 2018). Each group of ``group_size``
input weights of a row is written as a sum of q = ``spec.bits`` binary vectors with their own scales,
plus an offset (which lets BCQ represent any uniform asymmetric grid as a special case):

    w ~ sum_i alpha_i * b_i + z,   b_i in {-1, +1}^group_size

The matmul then needs no dequantization: LUT-GEMM precomputes, for every 8 inputs, the 256 possible
+-sums and reads them with the weight bytes (``qft.kernels.lut_gemm``, used by
:class:`qft.nn.lut.BCQLinear`).

Fitting (pure functions, no gradient): greedy init (b_i = sign of the residual, alpha_i its mean
|.|), then ``iters`` alternating rounds: least squares for (alpha, z) given the binary codes, and
the best of the 2**q sign patterns for every weight given (alpha, z). With calibration data the
least squares are weighted by diag(X^T X) of the layer input (activation-aware); without, plain.
Simplified: no error feedback across columns (GPTQ-style) — the paper pairs the kernel with
whatever BCQ fitting one has; its own results use round-to-nearest-like BCQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import product

import torch
from tqdm.auto import tqdm

from qft.nn import set_module, target_linears
from qft.nn.lut import BCQLinear
from qft.ptq.calibrate import sequential
from qft.registry import METHODS
from qft.spec import resolve_spec

__all__ = ["LUTGEMMConfig", "bcq_quantize", "bcq_reconstruct", "lutgemm"]


@dataclass
class LUTGEMMConfig:
    offset: bool = field(default=True, metadata={"help": "fit a per-group offset z (BCQ with offset)"})
    iters: int = field(default=15, metadata={"help": "alternating least-squares / code refinement rounds"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward"})
    device: str | None = field(default=None, metadata={"help": "where each block runs (default: the model's)"})

    def __post_init__(self):
        if not isinstance(self.offset, bool):
            raise ValueError(f"lutgemm: offset={self.offset!r} is not valid; allowed: true or false")
        for k in ("batch_size",):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"lutgemm: {k}={v!r} is not valid; allowed: a positive integer")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise ValueError(f"lutgemm: iters={self.iters!r} is not valid; allowed: an integer >= 0")


def bcq_reconstruct(signs, alpha, offset, group_size):
    """Dense [N, K] from signs [q, N, K], alpha [q, N, G], offset [N, G] | None."""
    w = (signs.float() * alpha.float().repeat_interleave(group_size, -1)).sum(0)
    return w if offset is None else w + offset.float().repeat_interleave(group_size, -1)


@torch.no_grad()
def bcq_quantize(w: torch.Tensor, n_planes: int, group_size: int, offset: bool = True, iters: int = 15,
                 col_weight: torch.Tensor | None = None):
    """Fit BCQ to w [N, K]: (signs [q, N, K] of +-1, alpha [q, N, G], offset [N, G] | None).

    ``col_weight`` [K] (e.g. diag(X^T X)) weights the least-squares fit of alpha and z."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"lutgemm: group_size={group_size} does not divide in_features={k}")
    q, gs, g = n_planes, group_size, k // group_size
    x = w.float().reshape(n, g, gs)
    d = torch.ones(g, gs, device=w.device) if col_weight is None else \
        (col_weight.float() / col_weight.float().mean().clamp_min(1e-30) + 1e-6).reshape(g, gs)
    z = (x.amax(-1) + x.amin(-1)) / 2 if offset else torch.zeros(n, g, device=w.device)
    r = x - z[..., None]
    bs, al = [], []
    for _ in range(q):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(-1)
        r = r - a[..., None] * b
        bs.append(b)
        al.append(a)
    B = torch.stack(bs, -1)  # [N, G, gs, q]
    alpha = torch.stack(al, -1)  # [N, G, q]
    combos = torch.tensor(list(product([-1.0, 1.0], repeat=q)), device=w.device)  # [2^q, q]
    eye = torch.eye(q + int(offset), device=w.device)
    for _ in range(iters):
        D = torch.cat([B, torch.ones_like(B[..., :1])], -1) if offset else B  # [N, G, gs, m]
        Dw = D * d[None, :, :, None]
        DtD = Dw.transpose(-1, -2) @ D + 1e-8 * eye
        Dtx = (Dw * x[..., None]).sum(-2)
        sol = torch.linalg.solve(DtD, Dtx.unsqueeze(-1)).squeeze(-1)  # [N, G, m]
        alpha, z = (sol[..., :q], sol[..., q]) if offset else (sol, torch.zeros(n, g, device=w.device))
        vals = z[..., None] + alpha @ combos.t()  # [N, G, 2^q]
        idx = (x[..., None] - vals[:, :, None, :]).abs().argmin(-1)  # [N, G, gs]
        B = combos[idx]
    signs = B.permute(3, 0, 1, 2).reshape(q, n, k)
    return signs, alpha.permute(2, 0, 1).contiguous(), (z if offset else None)


def _replace(lin, spec, cfg, name, col_weight=None):
    w = lin.weight.data
    gs = spec.group_for(w.shape[1])
    signs, alpha, off = bcq_quantize(w, spec.bits, gs, cfg.offset, cfg.iters, col_weight)
    return BCQLinear.from_parts(signs, alpha, off, gs, None if lin.bias is None else lin.bias.data, dtype=w.dtype,
                                name=name)


@METHODS.register("lutgemm")
def lutgemm(model, spec, calib=None, **options):
    """BCQ over every targeted linear (in place): ``spec.bits`` binary planes, ``spec.group_size`` columns
    per scale group. With ``calib`` the fit is weighted by each layer's input statistics (block by
    block); without, it is data-free. Options: see :class:`LUTGEMMConfig`."""
    spec = resolve_spec(spec)
    known = {f.name for f in fields(LUTGEMMConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"lutgemm: unknown option(s) {bad}; allowed: {sorted(known)}")
    cfg = LUTGEMMConfig(**options)
    if spec.scheme != "int":
        raise ValueError(f"lutgemm: QuantSpec.scheme={spec.scheme!r} is not supported; allowed: 'int' "
                         f"(bits = number of binary planes)")
    if spec.bits > 4:
        raise ValueError(f"lutgemm: QuantSpec.bits={spec.bits} is not supported; allowed: 1..4 binary planes")
    if calib is not None:
        def process(ctx):
            stats = ctx.collect(hessian=True)
            for short, lin in list(ctx.linears.items()):
                ctx.replace(short, _replace(lin, spec, cfg, f"{ctx.name}.{short}", torch.diag(stats[short].H)))
        model = sequential(model, calib, spec, process, device=cfg.device, batch_size=cfg.batch_size, desc="lutgemm")
    else:
        layers = list(target_linears(model, spec))
        if not layers:
            raise ValueError(f"lutgemm: no nn.Linear matches targets={list(spec.targets)} ignore={list(spec.ignore)}")
        for name, lin in tqdm(layers, desc="lutgemm bcq", unit="layer"):
            spec.check_layer(name, lin.in_features)
            set_module(model, name, _replace(lin, spec, cfg, name))
    model.qft_spec = spec.replace(format="qft")  # its modules exist only in the native format
    return model
