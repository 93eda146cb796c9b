"""Distillation losses as pure functions, registered in ``qft.registry.LOSSES``.

Every loss has one signature::

    fn(student, teacher, labels, num_items_in_batch=None, *, temperature=1.0, **options) -> scalar

* ``student`` / ``teacher``: logits [B, T, V] already aligned with ``labels`` (position t predicts
  ``labels[:, t]``, i.e. the caller shifted them), or hidden states [B, T, H] (``hidden_mse``;
  a list/tuple of such tensors for several layers).
* ``labels`` [B, T]: next-token ids, ``-100`` marks padding / ignored positions (masked out).
* The per-position losses are **summed** over unmasked positions and divided by
  ``num_items_in_batch`` when given (the Trainer's count of valid labels over every micro-batch of
  the gradient-accumulation step and over every rank), otherwise by the local count. So the sum
  of the accumulated micro-batch losses equals the loss of one big batch.

Temperature ``tau`` softens both distributions; KL-type losses are multiplied by ``tau**2`` so
the gradient scale does not depend on it (Hinton et al., 2015).

Losses (P = teacher, Q = student distributions at a position):
* ``ce``: cross-entropy of the student on the labels (no teacher).
* ``forward_kl``: KL(P || Q) (mean-seeking; LLM-QAT).
* ``reverse_kl``: KL(Q || P) (mode-seeking; MiniLLM).
* ``jsd``: generalized Jensen-Shannon (GKD, Agarwal et al. 2024) with ``beta``:
  M = beta P + (1 - beta) Q, JSD = beta KL(P || M) + (1 - beta) KL(Q || M); as in GKD, beta = 0 is
  taken as forward KL and beta = 1 as reverse KL (the mixture formula degenerates to 0 there).
* ``cakld``: confidence-aware KL (BitDistiller, Du et al. 2024):
  ``confidence * reverse_KL + (1 - confidence) * forward_KL``, ``confidence`` in [0, 1] estimated
  once before training (see :mod:`qft.train.confidence`).
* ``hidden_mse``: MSE between L2-normalized hidden states (OneBit's representation term),
  averaged over the given layers, summed over positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qft.registry import LOSSES

IGNORE = -100

__all__ = ["IGNORE", "ce", "forward_kl", "reverse_kl", "jsd", "cakld", "hidden_mse", "token_kl", "reduce"]


def reduce(per_token: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Sum ``per_token`` [B, T] over unmasked positions and divide by the item count."""
    mask = labels.ne(IGNORE)
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    if num_items_in_batch is None:
        denom = mask.sum().clamp_min(1)
    else:
        denom = num_items_in_batch
        if torch.is_tensor(denom):
            denom = denom.to(total.device).float().clamp_min(1)
        elif denom <= 0:
            raise ValueError(f"num_items_in_batch={num_items_in_batch!r} is not valid; allowed: a positive count")
    return total / denom


def _check(student, teacher, labels):
    if teacher is not None and student.shape != teacher.shape:
        raise ValueError(f"student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(student.shape)}[:-1]")


def _logp(logits, temperature):
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; allowed: a positive number")
    return F.log_softmax(logits.float() / temperature, dim=-1)


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position from log-probabilities [..., V] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


@LOSSES.register("ce")
def ce(student, teacher, labels, num_items_in_batch=None, *, temperature: float = 1.0):
    """Cross-entropy on the labels (teacher ignored; temperature unused)."""
    _check(student, None, labels)
    logq = F.log_softmax(student.float(), -1)
    nll = -logq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return reduce(nll, labels, num_items_in_batch)


@LOSSES.register("forward_kl")
def forward_kl(student, teacher, labels, num_items_in_batch=None, *, temperature: float = 1.0):
    """KL(teacher || student) per position, masked, summed / count, times temperature**2."""
    _check(student, teacher, labels)
    kl = token_kl(_logp(teacher, temperature), _logp(student, temperature))
    return reduce(kl, labels, num_items_in_batch) * temperature ** 2


@LOSSES.register("reverse_kl")
def reverse_kl(student, teacher, labels, num_items_in_batch=None, *, temperature: float = 1.0):
    """KL(student || teacher) per position, masked, summed / count, times temperature**2."""
    _check(student, teacher, labels)
    kl = token_kl(_logp(student, temperature), _logp(teacher, temperature))
    return reduce(kl, labels, num_items_in_batch) * temperature ** 2


@LOSSES.register("jsd")
def jsd(student, teacher, labels, num_items_in_batch=None, *, temperature: float = 1.0, beta: float = 0.5):
    """Generalized JSD(beta); beta = 0 -> forward KL, beta = 1 -> reverse KL (GKD convention)."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"jsd beta={beta!r} is not valid; allowed: a number in [0, 1]")
    if beta == 0:
        return forward_kl(student, teacher, labels, num_items_in_batch, temperature=temperature)
    if beta == 1:
        return reverse_kl(student, teacher, labels, num_items_in_batch, temperature=temperature)
    _check(student, teacher, labels)
    logp, logq = _logp(teacher, temperature), _logp(student, temperature)
    logm = torch.logsumexp(torch.stack([logp + torch.log(torch.tensor(beta)),
                                        logq + torch.log(torch.tensor(1.0 - beta))]), dim=0)
    per = beta * token_kl(logp, logm) + (1 - beta) * token_kl(logq, logm)
    return reduce(per, labels, num_items_in_batch) * temperature ** 2


@LOSSES.register("cakld")
def cakld(student, teacher, labels, num_items_in_batch=None, *, temperature: float = 1.0,
          confidence: float | None = None):
    """BitDistiller's confidence-aware KL: g * reverse_KL + (1 - g) * forward_KL, g = ``confidence``."""
    if confidence is None:
        raise ValueError("cakld needs confidence=g in [0, 1] (estimate it with qft.train.confidence.estimate_confidence)")
    g = float(confidence)
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"cakld confidence={confidence!r} is not valid; allowed: a number in [0, 1]")
    _check(student, teacher, labels)
    logp, logq = _logp(teacher, temperature), _logp(student, temperature)
    per = g * token_kl(logq, logp) + (1 - g) * token_kl(logp, logq)
    return reduce(per, labels, num_items_in_batch) * temperature ** 2


@LOSSES.register("hidden_mse")
def hidden_mse(student, teacher, labels, num_items_in_batch=None, *, temperature: float = 1.0, eps: float = 1e-6):
    """Squared distance of L2-normalized hidden states per position, mean over layers (OneBit).

    ``student`` / ``teacher``: [B, T, H] or lists of them (one per layer); temperature unused.
    """
    s_list = list(student) if isinstance(student, (list, tuple)) else [student]
    t_list = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError(f"hidden_mse needs as many student as teacher hidden states; got {len(s_list)} and {len(t_list)}")
    per = 0.0
    for hs, ht in zip(s_list, t_list):
        _check(hs, ht, labels)
        d = F.normalize(hs.float(), dim=-1, eps=eps) - F.normalize(ht.float(), dim=-1, eps=eps)
        per = per + d.pow(2).sum(-1)
    return reduce(per / len(s_list), labels, num_items_in_batch)
