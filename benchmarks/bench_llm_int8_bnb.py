"""LLM.int8() side by side with bitsandbytes' own Linear8bitLt on SmolLM2-135M (CPU torch backend).

    python benchmarks/bench_llm_int8_bnb.py --thresholds 6 2 --windows 20

Same model, same protocol (the foundation's: N x 512-token windows, no BOS, wikitext-2 test and
tinyshakespeare), every targeted linear (q/k/v/o/gate/up/down; lm_head in float) replaced by
qft's Int8MixedLinear or by bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False, threshold=t).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPORA = {"wikitext-2": DATA / "wikitext-2" / "test.txt", "tinyshakespeare": DATA / "tinyshakespeare" / "input.txt"}


def bnb_int8(model, threshold):
    import bitsandbytes as bnb
    from qft.nn import set_module, target_linears
    from qft.spec import resolve_spec
    m = copy.deepcopy(model)
    for name, lin in list(target_linears(m, resolve_spec("w8a8"))):
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
        q.weight = bnb.nn.Int8Params(lin.weight.detach().to(torch.float16).clone(), requires_grad=False,
                                     has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        set_module(m, name, q.to("cpu"))
    return m.eval()  # eval mode: MatMul8bitLt (int8 activations); in training mode bitsandbytes' CPU path is W8A16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 2.0])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out", default="out/int8/llm_int8_bnb.jsonl")
    a = ap.parse_args()
    from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
    from qft.models import load_model
    from qft.ptq import run
    model, tok = load_model("smollm2-135m")
    sets = {k: windows_from_text(tok, read_text(p), EvalProtocol(512, a.windows)) for k, p in CORPORA.items()}
    fp = {k: evaluate(model, w)["ppl"] for k, w in sets.items()}
    rows = [("fp", None, fp, {k: 0.0 for k in sets})]
    print(f"FP {fp}", flush=True)
    for t in a.thresholds:
        for who in ("qft", "bitsandbytes"):
            t0 = time.time()
            m = run("llm_int8", copy.deepcopy(model), "w8a8", threshold=t) if who == "qft" else bnb_int8(model, t)
            r = {k: evaluate(m, w, teacher=model) for k, w in sets.items()}
            rows.append((who, t, {k: v["ppl"] for k, v in r.items()}, {k: v["kl"] for k, v in r.items()}))
            with open(a.out, "a") as f:
                f.write(json.dumps({"who": who, "threshold": t, **{k: v for k, v in r.items()},
                                    "s": round(time.time() - t0, 1)}, default=float) + "\n")
            print(rows[-1], flush=True)
    print("\n| implementation | threshold | " + " | ".join(f"{k} ppl (x FP) | {k} KL" for k in sets) + " |")
    print("|---|---|" + "---|---|" * len(sets))
    for who, t, p, kl in rows:
        print(f"| {who} | {'-' if t is None else t} | " + " | ".join(
            f"{p[k]:.3f} ({p[k] / fp[k]:.4f}x) | {kl[k]:.4f}" for k in sets) + " |")


if __name__ == "__main__":
    main()
