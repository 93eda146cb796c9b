"""SVID: Sign-Value-Independent Decomposition, the initialization of OneBit (Xu et al., 2024).

W = sign(W) * |W|, and |W| (non-negative) is approximated by a rank-1 outer product h g^T with
h [N], g [K] >= 0. Because sign(W) * sign(W) = 1, the weight error of the 1-bit layer equals the
rank-1 error of |W|:  ||W - sign(W) * (h g^T)||_F = || |W| - h g^T ||_F,  so the best h, g are the
leading singular pair of |W| (non-negative by Perron-Frobenius). Two ways to get it, in torch:

* ``power``: power iteration on |W| (alternating u = |W| v / |v|, v = |W|^T u);
* ``nmf``: rank-1 NMF with Lee-Seung multiplicative updates (the paper's choice). For rank 1 the
  update equals alternating least squares, so both reach the same optimum; ``nmf`` is kept for
  parity with the paper and as a cross-check.

Activation-aware option (not in the paper): with per-input-channel weights d_k = sqrt(E[x_k^2])
from calibration data, the diagonal approximation of the output error is
||(W - W^) D||_F = || |W| D - h (D g)^T ||_F, so decomposing |W| D and dividing g by d is exact for
that objective. Signs stay sign(W) in every variant.

The scale split between h and g is free; we balance it so both have the same RMS (good for fp16
storage and for Adam, whose steps are relative to the parameter size).

Registers the PTQ method ``onebit_svid``: every targeted nn.Linear becomes a
:class:`qft.nn.onebit.OneBitLinear` (train state; pack or export afterwards).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.nn.onebit import MODES, SURROGATES, OneBitLinear, onebit_layers
from qft.nn.swap import set_module, target_linears
from qft.registry import METHODS
from qft.spec import QuantSpec, resolve_spec

DECOMPOSITIONS = ("power", "nmf")
INITS = ("svid", "sign_rowmean")


# --- pure math -------------------------------------------------------------------------------

def rank1_power(a: torch.Tensor, iters: int = 50, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular pair of a non-negative [N, K] matrix: (h [N], g [K]) >= 0 with a ~ h g^T."""
    a = a.float()
    v = a.mean(0)
    v = v / v.norm().clamp_min(1e-30)
    sigma = torch.zeros((), device=a.device)
    for _ in range(iters):
        u = a @ v
        u = u / u.norm().clamp_min(1e-30)
        v = a.T @ u
        new_sigma = v.norm()
        v = v / new_sigma.clamp_min(1e-30)
        if (new_sigma - sigma).abs() <= tol * new_sigma:
            sigma = new_sigma
            break
        sigma = new_sigma
    return (u * sigma).clamp_min(0), v.clamp_min(0)


def rank1_nmf(a: torch.Tensor, iters: int = 100, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 NMF of a non-negative [N, K] matrix by Lee-Seung multiplicative updates: (h, g)."""
    a = a.float()
    h = a.mean(1).clamp_min(eps)
    g = torch.ones(a.shape[1], device=a.device)
    for _ in range(iters):
        h = h * (a @ g) / (h * (g @ g) + eps)
        g = g * (a.T @ h) / (g * (h @ h) + eps)
    return h, g


def balance(h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale (h * c, g / c) so that both have the same RMS; the product h g^T is unchanged."""
    rh = h.pow(2).mean().sqrt().clamp_min(1e-30)
    rg = g.pow(2).mean().sqrt().clamp_min(1e-30)
    c = (rg / rh).sqrt()
    return h * c, g / c


def svid(w: torch.Tensor, decomposition: str = "power", iters: int | None = None,
         col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signs int8 [N, K], g [K], h [N]) with W ~ signs * (h g^T); float32 values.

    ``col_weight`` [K] > 0: minimize || (|W| - h g^T) diag(col_weight) ||_F instead.
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition={decomposition!r} is not valid; allowed: {', '.join(DECOMPOSITIONS)}")
    wf = w.detach().float()
    a = wf.abs()
    if col_weight is not None:
        d = col_weight.float().to(a.device).clamp_min(1e-8)
        a = a * d
    if decomposition == "power":
        h, g = rank1_power(a, iters or 50)
    else:
        h, g = rank1_nmf(a, iters or 200)
    if col_weight is not None:
        g = g / d
    h, g = balance(h, g)
    return torch.where(wf >= 0, 1, -1).to(torch.int8), g, h


def sign_rowmean(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Baseline: sign(W) times each row's mean |w| (g = 1). Same weights as RTN scheme='sign' per channel."""
    wf = w.detach().float()
    return torch.where(wf >= 0, 1, -1).to(torch.int8), torch.ones(wf.shape[1]), wf.abs().mean(1)


def rel_error(w: torch.Tensor, signs: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> float:
    """||W - signs * h g^T||_F / ||W||_F."""
    wf = w.float()
    approx = signs.float() * h.float()[:, None] * g.float()[None, :]
    return float((wf - approx).norm() / wf.norm())


# --- calibration helpers ---------------------------------------------------------------------

@torch.no_grad()
def input_rms(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int = 4) -> dict:
    """sqrt(mean x_k^2) per input channel of each named module, over the calibration windows."""
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        _run(model, calib, batch_size, "calibration (input RMS)")
    finally:
        for hk in hooks:
            hk.remove()
    return {n: (sums[n] / counts[n]).sqrt() for n in names if n in sums}


def _run(model, calib, batch_size, desc):
    dev = next(model.parameters()).device
    model.eval()
    for i in tqdm(range(0, len(calib), batch_size), desc=desc, leave=False):
        model(input_ids=calib[i:i + batch_size].to(dev))


@torch.no_grad()
def calibrate_layernorm(model: nn.Module, calib: torch.Tensor, batch_size: int = 4) -> None:
    """Fit each OneBit LayerNorm's affine (gamma, beta) by per-channel least squares so that
    LN(y) ~ y on the calibration data (LayerNorms act as the identity while the data runs)."""
    stats, hooks = {}, []

    def hook(name):
        def fn(ln, args, out):
            y = args[0].detach().float().reshape(-1, args[0].shape[-1])
            z = (y - y.mean(-1, keepdim=True)) / (y.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
            s = stats.setdefault(name, [0, 0.0, 0.0, 0.0, 0.0])
            s[0] += y.shape[0]
            s[1], s[2] = s[1] + z.sum(0), s[2] + z.pow(2).sum(0)
            s[3], s[4] = s[3] + y.sum(0), s[4] + (z * y).sum(0)
            return args[0]  # identity while calibrating
        return fn

    for name, m in onebit_layers(model):
        if m.ln is not None:
            hooks.append(m.ln.register_forward_hook(hook(name)))
    if not hooks:
        return
    try:
        _run(model, calib, batch_size, "calibration (LayerNorm affine)")
    finally:
        for hk in hooks:
            hk.remove()
    for name, m in onebit_layers(model):
        if name in stats:
            n, sz, szz, sy, szy = stats[name]
            cov = szy / n - (sz / n) * (sy / n)
            var = (szz / n - (sz / n) ** 2).clamp_min(1e-8)
            gamma = cov / var
            m.ln.weight.copy_(gamma.to(m.ln.weight.dtype))
            m.ln.bias.copy_((sy / n - gamma * sz / n).to(m.ln.bias.dtype))


# --- model transforms ------------------------------------------------------------------------

def _check_options(decomposition, init, mode, surrogate):
    for field_, v, allowed in (("decomposition", decomposition, DECOMPOSITIONS), ("init", init, INITS),
                               ("mode", mode, MODES), ("surrogate", surrogate, SURROGATES)):
        if v not in allowed:
            raise ValueError(f"onebit_svid {field_}={v!r} is not valid; allowed: {', '.join(allowed)}")


@METHODS.register("onebit_svid")
def onebit_svid(model: nn.Module, spec: "QuantSpec | str | dict" = "w1", calib: torch.Tensor | None = None,
                decomposition: str = "power", iters: int | None = None, act_aware: bool = False,
                init: str = "svid", layernorm: bool = False, mode: str = "frozen", surrogate: str = "ste",
                lora_rank: int = 0, lora_alpha: float | None = None, batch_size: int = 4) -> nn.Module:
    """Replace every targeted nn.Linear by a OneBitLinear initialized by SVID (in place).

    ``spec`` chooses the layers (targets / ignore) and must have bits=1. ``act_aware`` and
    ``layernorm`` use ``calib`` (LongTensor [n, seq_len]): the input RMS weights the
    decomposition, the LayerNorm affine is fitted so the layer starts close to identity.
    """
    spec = resolve_spec(spec)
    if spec.bits != 1:
        raise ValueError(f"onebit_svid needs QuantSpec.bits=1 (got bits={spec.bits}); use the preset 'w1'")
    _check_options(decomposition, init, mode, surrogate)
    if act_aware and init != "svid":
        raise ValueError(f"onebit_svid act_aware=True needs init='svid' (got init={init!r})")
    if (act_aware or layernorm) and calib is None:
        need = "act_aware=True" if act_aware else "layernorm=True"
        raise ValueError(f"onebit_svid {need} needs calibration windows (calib=LongTensor [n, seq_len])")
    layers = list(target_linears(model, spec))
    if not layers:
        raise ValueError(f"no nn.Linear in the model matches targets={list(spec.targets)} "
                         f"with ignore={list(spec.ignore)}")
    rms = input_rms(model, [n for n, _ in layers], calib, batch_size) if act_aware else {}
    for name, lin in tqdm(layers, desc="SVID", leave=False):
        w = lin.weight.data
        if init == "svid":
            _, g, h = svid(w, decomposition, iters, rms.get(name))
        else:
            _, g, h = sign_rowmean(w)
        new = OneBitLinear.from_weight(w, g.to(w.device), h.to(w.device), lin.bias.data if lin.bias is not None
                                       else None, name=name, layernorm=layernorm, mode=mode, surrogate=surrogate,
                                       lora_rank=lora_rank, lora_alpha=lora_alpha)
        set_module(model, name, new)
    if layernorm:
        calibrate_layernorm(model, calib, batch_size)
    model.qft_spec = spec.replace(format="qft")
    return model


@torch.no_grad()
def merge_lora(model: nn.Module, decomposition: str = "power", iters: int | None = None) -> nn.Module:
    """Fold every OneBit layer's LoRA into a new 1-bit weight: W' = sign(W) * (h g^T) + s B A is
    re-binarized by SVID (signs of W', rank-1 of |W'|). Changes the function: measure it."""
    for name, m in list(onebit_layers(model)):
        if not m.lora_rank:
            continue
        w = m.dequantize(torch.float32) + m.lora_delta().float()
        _, g, h = svid(w, decomposition, iters)
        new = OneBitLinear.from_weight(w, g, h, None if m.bias is None else m.bias.data, name=name,
                                       layernorm=m.ln is not None, ln_eps=m.ln.eps if m.ln is not None else 1e-5,
                                       dtype=m.h.dtype)
        if m.ln is not None:
            new.ln.load_state_dict(m.ln.state_dict())
        set_module(model, name, new)
    return model
