"""Where LLM.int8()'s perplexity loss comes from on SmolLM2-135M: weights vs activations, per layer type.

    python benchmarks/ablate_llm_int8.py --windows 8 --threshold 6

Rows (every q/k/v/o/gate/up/down linear unless a layer type is named; lm_head in float):
``full`` qft's LLM.int8() math (int8 weights, per-token int8 activations, outlier columns in float
against the dequantized int8 weight columns, as bitsandbytes does); ``paper`` the same with the
outlier columns against the float weights (the paper's fp16 copy); ``w8`` int8 weights only (float
activations); ``a8`` int8 activations + outlier decomposition only (float weights); ``full:<type>``
full LLM.int8() on one layer type only. Same protocol as the other PTQ benchmarks (N x 512 windows,
no BOS, wikitext-2 test and tinyshakespeare); KL(FP || quantized) per token beside each perplexity.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPORA = {"wikitext-2": DATA / "wikitext-2" / "test.txt", "tinyshakespeare": DATA / "tinyshakespeare" / "input.txt"}
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AblatedInt8(torch.nn.Module):
    """One linear under a variant of the LLM.int8() forward (``mode`` in full | paper | w8 | a8);
    ``full`` is qft's own ``mixed_int8_linear``."""

    def __init__(self, lin: torch.nn.Linear, mode: str, threshold: float):
        super().__init__()
        from qft.nn.int8 import quantize_weight_int8
        self.mode, self.threshold = mode, threshold
        self.w = lin.weight.detach().float()
        self.wq, self.sw = quantize_weight_int8(self.w)
        self.wd = self.wq.float() * self.sw[:, None]

    def forward(self, x):
        from qft.nn.int8 import mixed_int8_linear, quantize_rows_int8
        if self.mode == "full":  # the shipped forward (Int8MixedLinear's)
            return mixed_int8_linear(x, self.wq, self.sw, self.threshold)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.mode == "w8":
            return (x2 @ self.wd.t()).to(x.dtype).reshape(*shape[:-1], -1)
        cols = (x2.abs() >= self.threshold).any(0) if self.threshold > 0 else torch.zeros_like(x2[0], dtype=torch.bool)
        q, sx = quantize_rows_int8(x2.masked_fill(cols, 0.0))
        w_in = self.w if self.mode == "a8" else self.wd  # paper: int8 W for the int8 part, float W for outliers
        y = (q.float() * sx[:, None]) @ w_in.t() + x2[:, cols] @ self.w[:, cols].t()
        return y.to(x.dtype).reshape(*shape[:-1], -1)


def ablated(model, mode: str, threshold: float, only: str | None = None):
    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and name in TYPES and only in (None, name):
                setattr(mod, name, AblatedInt8(child, mode, threshold))
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
    from qft.models import load_model
    model, tok = load_model("smollm2-135m")
    sets = {k: windows_from_text(tok, read_text(p), EvalProtocol(512, a.windows)) for k, p in CORPORA.items()}
    fp = {k: evaluate(model, w)["ppl"] for k, w in sets.items()}
    print("| row | " + " | ".join(f"{k} ppl (x FP) | KL" for k in sets) + " |")
    print("|---|" + "---|---|" * len(sets))
    print("| fp | " + " | ".join(f"{fp[k]:.3f} | 0" for k in sets) + " |", flush=True)
    rows = [(m, None) for m in ("full", "paper", "w8", "a8")] + [("full", t) for t in TYPES]
    for mode, only in rows:
        r = {k: evaluate(ablated(model, mode, a.threshold, only), w, teacher=model) for k, w in sets.items()}
        tag = mode if only is None else f"{mode}:{only}"
        print(f"| {tag} | " + " | ".join(f"{r[k]['ppl']:.3f} ({r[k]['ppl'] / fp[k]:.4f}x) | {r[k]['kl']:.4f}"
                                          for k in sets) + " |", flush=True)


if __name__ == "__main__":
    main()
