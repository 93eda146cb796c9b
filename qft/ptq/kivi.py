"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024, arXiv:2402.02750).

The idea: key caches have a few fixed outlier *channels*, value caches do not, and the attention
output error depends on the values token by token. So keys are quantized **per channel** (a group
of ``G`` consecutive tokens shares one scale and minimum per channel), values **per token** (groups
of ``G`` channels), both asymmetric min-max at 2 or 4 bits, and the most recent ``R`` tokens stay
in full precision. No calibration, no training.

The math and the transformers ``Cache`` live in :mod:`qft.nn.kv_cache` (``KIVICache``), so the
modules and trainers can use it too; this file holds the method's entry points:
:func:`kivi_cache` (a factory) and :func:`evaluate_kv` (perplexity with the cache in the loop: each
window is fed in chunks of ``chunk_size`` tokens, each chunk attends to the quantized past;
``chunk_size=1`` is token-by-token decoding).

Two options beyond the paper, both off by default (plain KIVI): ``sink_tokens=S`` keeps the first
S tokens of the sequence in full precision for good (the attention sink: every later query puts
much of its attention there, and its key is unlike the others, so it stretches its group's range;
StreamingLLM / IntactKV / KVQuant keep it intact), and ``pre_rope=True`` quantizes keys before the
rotary embedding (KVQuant's pre-RoPE key quantization: RoPE spins each channel pair with the token
position, which widens a channel's range inside a group of tokens; the cache undoes the rotation of
the tokens it quantizes and redoes it on dequantization, an exact rotation). On SmolLM2-135M, KV2
g32 R128 over 20 x 512 wikitext-2 windows: plain 1.080x FP perplexity, ``sink_tokens=1`` 1.042x,
both options 1.038x (docs/ptq_core.md).

Simplified from the paper: no fused CUDA kernels (the past is dequantized, then attention runs in
torch); the full-precision window always holds between R and R + G - 1 tokens (the paper flushes
the whole window at once, so it briefly holds fewer); scales and minima are float16. KIVI is not
a weight method, so it is not in ``METHODS``: use ``past_key_values=KIVICache(model.config, ...)``.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qft.nn.kv_cache import KIVICache, kivi_check, qdq_keys, qdq_values  # noqa: F401  (re-exported)

__all__ = ["KIVICache", "kivi_cache", "evaluate_kv", "qdq_keys", "qdq_values"]


def kivi_cache(model, bits: int = 2, group_size: int = 32, residual_length: int = 128,
               value_bits: int | None = None, sink_tokens: int = 0, pre_rope: bool = False):
    """A zero-argument factory of fresh KIVI caches for ``model`` (validated now). ``sink_tokens``
    and ``pre_rope`` are the two options beyond the paper (default off), see the module docstring."""
    kw = dict(bits=bits, group_size=group_size, residual_length=residual_length, value_bits=value_bits,
              sink_tokens=sink_tokens, pre_rope=pre_rope)
    KIVICache(model.config, **kw)
    return lambda: KIVICache(model.config, **kw)


@torch.no_grad()
def evaluate_kv(model, windows: torch.Tensor, make_cache, chunk_size: int = 32, batch_size: int = 4,
                desc: str = "eval (kv in the loop)", progress: bool = True, offset: int | None = None) -> dict:
    """Perplexity with a KV cache in the loop: each window is fed ``chunk_size`` tokens at a time;
    every chunk attends to the cache built from the previous chunks (quantized where the cache
    quantizes). ``chunk_size=1`` is generate-style token-by-token decoding. ``make_cache()`` returns
    a fresh transformers Cache. The first chunk is ``offset`` tokens longer (default: the cache's
    ``sink_tokens``), so that chunks of G tokens end where KIVI's groups end and give exactly the
    token-by-token result. Returns {ppl, nll, tokens, kv} (kv: the last cache's memory report
    if it has one)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"evaluate_kv chunk_size={chunk_size!r} is not valid; allowed: a positive integer")
    if offset is None:
        offset = getattr(make_cache(), "kivi", {}).get("sink_tokens", 0)
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"evaluate_kv offset={offset!r} is not valid; allowed: an integer >= 0")
    model.eval()
    dev = next(model.parameters()).device
    # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` is deprecated there)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    nll_sum, count, report = 0.0, 0, None
    n_batches = math.ceil(len(windows) / batch_size)
    bar = tqdm(total=n_batches * math.ceil(windows.shape[1] / chunk_size), desc=desc, disable=not progress,
               leave=False)
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size].to(dev)
        cache = make_cache()
        logits = []
        bounds = [0] + list(range(chunk_size + offset, batch.shape[1], chunk_size)) + [batch.shape[1]]
        for s, e in zip(bounds[:-1], bounds[1:]):
            out = model(input_ids=batch[:, s:e], use_cache=True, **{key: cache})
            logits.append(out.logits.float())
            bar.update(1)
        logp = F.log_softmax(torch.cat(logits, 1)[:, :-1], -1)
        target = batch[:, 1:]
        nll_sum += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if hasattr(cache, "memory_report"):
            report = cache.memory_report()
    bar.close()
    return {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count, "kv": report}
