"""Teacher confidence g for CAKLD (BitDistiller), estimated once on K batches before training.

BitDistiller weighs reverse KL (mode-seeking) by the teacher's confidence and forward KL
(mean-seeking) by the rest: a confident teacher (peaked distributions) is best imitated by
reverse KL. Two definitions of g (``CONFIDENCE_DEFS``), both averaged over unmasked positions:

* ``top1``: the mean probability of the teacher's most likely next token;
* ``target``: the mean probability the teacher gives the actual next token of the data.

Positions follow the shifted-label convention of :mod:`qft.train.losses` (logits at t predict
``labels[t + 1]``; ``-100`` is ignored).
"""

from __future__ import annotations

from typing import Iterable

import torch

CONFIDENCE_DEFS = ("top1", "target")


def confidence_terms(logits: torch.Tensor, labels: torch.Tensor, definition: str = "top1"):
    """(sum of per-position confidences, number of positions) for aligned logits [B, T, V] / labels [B, T]."""
    if definition not in CONFIDENCE_DEFS:
        raise ValueError(f"confidence definition={definition!r} is not valid; allowed: {', '.join(CONFIDENCE_DEFS)}")
    mask = labels.ne(-100)
    probs = torch.softmax(logits.float(), -1)
    if definition == "top1":
        per = probs.amax(-1)
    else:
        per = probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (per * mask).sum(), mask.sum()


@torch.no_grad()
def estimate_confidence(teacher, batches: Iterable[dict], definition: str = "top1", max_batches: int = 8,
                        reduce=None) -> float:
    """Mean teacher confidence over the first ``max_batches`` batches (dicts with input_ids,
    attention_mask, labels). ``reduce`` (e.g. ``accelerator.reduce`` with sum) combines the
    (sum, count) pair across processes."""
    if not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"confidence batches={max_batches!r} is not valid; allowed: a positive integer")
    total = count = None
    device = next(teacher.parameters()).device
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        ids = batch["input_ids"].to(device)
        am = batch.get("attention_mask")
        labels = batch.get("labels", ids)
        logits = teacher(input_ids=ids, attention_mask=None if am is None else am.to(device)).logits
        s, n = confidence_terms(logits[:, :-1], labels[:, 1:].to(device), definition)
        total = s if total is None else total + s
        count = n if count is None else count + n
    if total is None:
        raise ValueError("estimate_confidence: no batches to estimate the teacher confidence on")
    pair = torch.stack([total.float(), count.float()])
    if reduce is not None:
        pair = reduce(pair)
    return float(pair[0] / pair[1].clamp_min(1))
