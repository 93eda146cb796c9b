"""Foundation acceptance: RTN on SmolLM2-135M, in place (float) vs exported packed and reloaded.

    python benchmarks/bench_rtn.py [--text ../shared/data/wikitext-2/test.txt] [--specs w4g64 w4g32 w3g64]

Prints a markdown table: spec, format, ppl (float RTN in place), ppl (packed export reloaded with
qft.load), relative difference, KL to the FP model, bits/weight and size from `qft info`.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time

import torch

from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
from qft.export import info, load, save
from qft.models import load_model
from qft.nn import quantize_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--specs", nargs="+", default=["w4g64", "w4g32", "w3g64"])
    ap.add_argument("--format", default="pack-quantized")
    ap.add_argument("--n-windows", type=int, default=20)
    args = ap.parse_args()
    proto = EvalProtocol(n_windows=args.n_windows)
    model, tok = load_model(args.model)
    w = windows_from_text(tok, read_text(args.text), proto, source=args.text)
    fp = evaluate(model, w, desc="fp")
    rows = [f"| full precision | - | {fp['ppl']:.3f} | - | - | 0 | 32 | - |"]
    for name in args.specs:
        t0 = time.time()
        q = quantize_model(copy.deepcopy(model), name)
        inplace = evaluate(q, w, teacher=model, desc=f"{name} in place")
        with tempfile.TemporaryDirectory() as d:
            save(q, f"{d}/ck", tok, format=args.format)
            i = info(f"{d}/ck")
            packed = evaluate(load(f"{d}/ck"), w, teacher=model, desc=f"{name} packed")
        rel = packed["ppl"] / inplace["ppl"] - 1
        rows.append(f"| RTN {name} | {args.format} | {inplace['ppl']:.3f} | {packed['ppl']:.3f} | {rel * 100:+.3f}% | "
                    f"{packed['kl']:.4f} | {i['bits_per_weight']:.3f} | {i['size_on_disk_bytes'] / 2**20:.1f} MiB |")
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    print(f"\nSmolLM2-135M, {args.text}, {proto.describe()}; {platform.machine()} CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| method | format | ppl (float, in place) | ppl (packed, reloaded) | diff | KL | bits/weight | size |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
