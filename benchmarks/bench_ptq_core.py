"""PTQ core B on SmolLM2-135M: SmoothQuant, LLM.int8(), ZeroQuant, OmniQuant, KIVI.

Perplexity with the default protocol (20 x 512-token windows, no BOS) on wikitext-2 test and on
tinyshakespeare; calibration windows of 512 tokens from wikitext-2 valid.txt (never from the
evaluation texts). Prints a markdown table (ratio to FP beside each number, time to quantize) and
appends one JSON line per row to --out, so a long run keeps what it measured.

    python benchmarks/bench_ptq_core.py                       # the full table
    python benchmarks/bench_ptq_core.py --windows 4 --calib 16 --rows fp,smoothquant  # quick look

Use ``--threads 1`` on a loaded shared CPU: OpenMP threads fighting over busy cores are many
times slower than one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
from qft.models import load_model
from qft.ptq import run
from qft.ptq.calibrate import calib_windows
from qft.ptq.kivi import evaluate_kv, kivi_cache
from qft.spec import QuantSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

W8A8 = "w8a8"
# name: (method, spec, options, needs calibration)
ROWS = {
    "w8a8_naive": ("smoothquant", W8A8, {"smooth": False}, False),
    "smoothquant": ("smoothquant", W8A8, {"alpha": 0.5}, True),
    "smoothquant_a07": ("smoothquant", W8A8, {"alpha": 0.7}, True),
    "smoothquant_search": ("smoothquant", W8A8, {"search": True}, True),
    "llm_int8": ("llm_int8", W8A8, {"threshold": 6.0}, False),
    "llm_int8_t2": ("llm_int8", W8A8, {"threshold": 2.0}, False),
    "zeroquant_w8a8g64": ("zeroquant", QuantSpec(bits=8, group_size=64, act_bits=8), {}, False),
    "zeroquant_w4a8g64": ("zeroquant", QuantSpec(bits=4, group_size=64, act_bits=8), {}, False),
    "zeroquant_w4a8g64_lkd": ("zeroquant", QuantSpec(bits=4, group_size=64, act_bits=8),
                              {"lkd": True, "steps": 20}, True),
    "rtn_w4g64": ("rtn", "w4g64", {}, False),
    "gptq_w4g64": ("gptq", "w4g64", {}, True),
    "omniquant_w4a16g64": ("omniquant", "w4g64", {"steps": 10, "train_batch": 1}, True),
    "omniquant_w6a6": ("omniquant", QuantSpec(bits=6, group_size=None, act_bits=6), {"steps": 10, "train_batch": 1}, True),
    "omniquant_w4a8": ("omniquant", QuantSpec(bits=4, group_size=64, act_bits=8), {"steps": 10, "train_batch": 1}, True),
    "kivi_kv4": ("kivi", None, {"bits": 4, "group_size": 32, "residual_length": 128}, False),
    "kivi_kv2": ("kivi", None, {"bits": 2, "group_size": 32, "residual_length": 128}, False),
    "kivi_kv2_sink1": ("kivi", None, {"bits": 2, "group_size": 32, "residual_length": 128, "sink_tokens": 1}, False),
    "kivi_kv2_prerope": ("kivi", None, {"bits": 2, "group_size": 32, "residual_length": 128, "pre_rope": True}, False),
    "kivi_kv2_sink1_prerope": ("kivi", None, {"bits": 2, "group_size": 32, "residual_length": 128, "sink_tokens": 1,
                                              "pre_rope": True}, False),
    "kivi_kv4_sink1": ("kivi", None, {"bits": 4, "group_size": 32, "residual_length": 128, "sink_tokens": 1}, False),
}
DEFAULT_ROWS = ["fp", "w8a8_naive", "smoothquant", "llm_int8", "zeroquant_w8a8g64", "zeroquant_w4a8g64",
                "zeroquant_w4a8g64_lkd", "rtn_w4g64", "omniquant_w4a16g64", "omniquant_w6a6", "omniquant_w4a8",
                "kivi_kv4", "kivi_kv2"]


def parse(opts: list[str]) -> dict:
    """k=v pairs (numbers and booleans parsed) to override a row's options."""
    out = {}
    for kv in opts:
        k, v = kv.split("=", 1)
        out[k] = {"true": True, "false": False}.get(v.lower(), v)
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of: fp,{','.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows per corpus")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows (512 tokens, wikitext-2 valid)")
    ap.add_argument("--corpora", default="wikitext2,tinyshakespeare")
    ap.add_argument("--kv-chunk", type=int, default=32, help="tokens per step for KIVI (1 = token by token)")
    ap.add_argument("--opt", action="append", default=[], help="row option override k=v (all rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m", help="model name or directory")
    ap.add_argument("--data", default=str(DATA), help="folder holding wikitext-2/ and tinyshakespeare/")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="out/bench_ptq_core.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r != "fp" and r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; known: fp, {', '.join(ROWS)}")
    model, tok = load_model(args.model, device=args.device)
    data = Path(args.data)
    corpora = {"wikitext2": data / "wikitext-2" / "test.txt", "tinyshakespeare": data / "tinyshakespeare" / "input.txt"}
    proto = EvalProtocol(n_windows=args.windows)
    evals = {c: windows_from_text(tok, read_text(corpora[c]), proto, source=c) for c in args.corpora.split(",")}
    calib = calib_windows(tok, data / "wikitext-2" / "valid.txt", n=args.calib, seq_len=512)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp_ppl, lines = {}, []
    head = "| row | method | spec / options | " + " | ".join(f"{c} ppl (x FP)" for c in evals) + " | quantize s | notes |"
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"protocol: {proto.describe()}; calibration: {args.calib} x 512 tokens of wikitext-2 valid.txt; "
          f"device: {dev}", flush=True)
    for r in rows:
        notes, t_q = "", 0.0
        if r == "fp":
            method, spec, opts = "fp", None, {}
            m = model
        else:
            method, spec, opts, needs = ROWS[r]
            opts = {**opts, **parse(args.opt)} if method != "kivi" else opts
            if method != "kivi":
                m = copy.deepcopy(model)
                t0 = time.time()
                m = run(method, m, spec, calib if needs else None, **opts)
                t_q = time.time() - t0
                for attr in ("qft_smoothquant_alphas",):
                    if hasattr(m, attr) and opts.get("search"):
                        vals = list(getattr(m, attr).values())
                        notes = f"alphas mean {sum(vals) / len(vals):.2f}"
        res = {}
        for c, w in evals.items():
            t0 = time.time()
            if method == "kivi":
                e = evaluate_kv(model, w, kivi_cache(model, **opts), chunk_size=args.kv_chunk, desc=f"{r} {c}")
                kv = e["kv"]
                notes = (f"cache in the loop, chunks of {args.kv_chunk}; KV bytes at 512 tokens: "
                         f"{kv['bytes'] / 2**20:.2f} MiB vs fp16 {kv['fp16_bytes'] / 2**20:.2f} MiB "
                         f"({100 * kv['saved']:.1f}% saved)")
            else:
                e = evaluate(m, w, desc=f"{r} {c}")
            res[c] = {"ppl": e["ppl"], "eval_s": time.time() - t0}
            if r == "fp":
                fp_ppl[c] = e["ppl"]
        spec_s = spec.name if isinstance(spec, QuantSpec) else (spec or "")
        rec = {"row": r, "method": method, "spec": spec_s, "options": opts, "quantize_s": t_q, "results": res,
               "calib": args.calib if r != "fp" else 0, "windows": args.windows, "notes": notes}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        cells = []
        for c in evals:
            p = res[c]["ppl"]
            cells.append(f"{p:.2f} ({p / fp_ppl[c]:.3f}x)" if c in fp_ppl else f"{p:.2f}")
        optstr = ", ".join(f"{k}={v}" for k, v in opts.items())
        line = f"| {r} | {method} | {spec_s} {optstr} | " + " | ".join(cells) + f" | {t_q:.0f} | {notes} |"
        lines.append(line)
        print(line, flush=True)
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
