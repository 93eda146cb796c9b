"""PTQ, the rest of the field (weight-activation and KV): RPTQ, OliVe, OS+, LLM-FP4, WKVQuant on SmolLM2-135M.

Every quantized row is exported (native "qft" format), reloaded with ``qft.load`` and evaluated
reloaded, so the table measures what a user gets back. Perplexity with the default protocol
(20 x 512-token windows, no BOS) on wikitext-2 test and tinyshakespeare; calibration windows of
512 tokens from wikitext-2 valid.txt. KV rows (KIVI, WKVQuant) run with the cache in the loop
(``evaluate_kv``, chunks of --kv-chunk tokens). One JSON line per row is appended to --out, so
rows can run one process at a time (the CPU is shared):

    python benchmarks/bench_ptq_field_acts.py --rows fp,rtn_w4a8,olive_w4a8 --calib 32
    python benchmarks/bench_ptq_field_acts.py --table          # print the table of what --out holds
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
from qft.export import info, load, save
from qft.models import load_model
from qft.ptq import run
from qft.ptq.calibrate import calib_windows
from qft.ptq.kivi import evaluate_kv, kivi_cache
from qft.spec import QuantSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {"wikitext2": DATA / "wikitext-2" / "test.txt", "tinyshakespeare": DATA / "tinyshakespeare" / "input.txt"}

W4A8 = QuantSpec(bits=4, group_size=None, act_bits=8, format="qft")      # per-channel int4, per-token int8
W6A6 = QuantSpec(bits=6, group_size=None, act_bits=6, format="qft")
W8A8 = QuantSpec(bits=8, group_size=None, symmetric=True, act_bits=8, format="qft")
FP4A8 = QuantSpec(bits=4, group_size=None, scheme="fp", act_bits=8, format="qft")
# name: (setting, method, spec, options, needs calibration)
ROWS = {
    "rtn_w4a8": ("W4A8", "rtn", W4A8, {}, False),
    "gptq_w4a8": ("W4A8", "gptq", W4A8, {}, True),
    "smoothquant_w4a8": ("W4A8", "smoothquant", W4A8, {"alpha": 0.5}, True),
    "rptq_w4a8": ("W4A8", "rptq", W4A8, {"clusters": 8}, True),
    "rptq_gptq_w4a8": ("W4A8", "rptq", W4A8, {"clusters": 8, "weights": "gptq"}, True),
    "olive_w4a8": ("W4A8", "olive", W4A8, {}, True),
    "rtn_fp4a8": ("W4A8", "llm_fp4", FP4A8, {"search": False, "preshift": False}, True),
    "llm_fp4_w4a8": ("W4A8", "llm_fp4", FP4A8, {}, True),
    "rtn_w6a6": ("W6A6", "rtn", W6A6, {}, False),
    "gptq_w6a6": ("W6A6", "gptq", W6A6, {}, True),
    "smoothquant_w6a6": ("W6A6", "smoothquant", W6A6, {"alpha": 0.5}, True),
    "osplus_w6a6": ("W6A6", "osplus", W6A6, {}, True),
    "rtn_w8a8": ("W8A8", "smoothquant", W8A8, {"smooth": False}, False),
    "smoothquant_w8a8": ("W8A8", "smoothquant", W8A8, {"alpha": 0.5}, True),
    "osplus_w8a8": ("W8A8", "osplus", W8A8.replace(symmetric=False), {}, True),
    "kivi_kv4": ("KV4", "kivi", None, {"bits": 4, "group_size": 32, "residual_length": 128}, False),
    "kivi_kv2": ("KV2", "kivi", None, {"bits": 2, "group_size": 32, "residual_length": 128}, False),
    "kivi_kv2_r0": ("KV2", "kivi", None, {"bits": 2, "group_size": 32, "residual_length": 0}, False),
    "wkvquant_kv4": ("KV4", "wkvquant", None, {"kv_bits": 4, "group_size": 32, "steps": 8, "train_batch": 1}, True),
    "wkvquant_kv2": ("KV2", "wkvquant", None, {"kv_bits": 2, "group_size": 32, "steps": 8, "train_batch": 1}, True),
    "wkvquant_kv2_init": ("KV2", "wkvquant", None, {"kv_bits": 2, "group_size": 32, "steps": 0}, True),
    "pertoken_kv2": ("KV2", "wkvquant", None, {"kv_bits": 2, "group_size": 32, "smooth": False}, False),
}


def bits_note(path: Path) -> str:
    i = info(path)
    return f"{i['bits_per_weight']:.2f}"


def run_row(r, model, tok, evals, calib, args) -> dict:
    setting, method, spec, opts, needs = ROWS[r] if r != "fp" else ("FP", "fp", None, {}, False)
    rec = {"row": r, "setting": setting, "method": method, "spec": spec.name if spec else "", "options": opts,
           "calib": args.calib if needs else 0, "windows": args.windows, "results": {}, "notes": ""}
    t0 = time.time()
    m, make_cache = model, None
    if method == "kivi":
        make_cache = kivi_cache(model, **opts)
    elif method != "fp":
        m = run(method, copy.deepcopy(model), spec, calib if needs or method == "wkvquant" else None, **opts)
    rec["quantize_s"] = round(time.time() - t0, 1)
    if method not in ("fp", "kivi"):
        with tempfile.TemporaryDirectory() as d:
            save(m, Path(d) / "ck", format="qft")
            rec["bits_per_weight"] = bits_note(Path(d) / "ck")
            m = load(Path(d) / "ck")  # evaluate what comes back
    if method == "wkvquant":
        from qft.nn.wkv_cache import wkv_cache
        make_cache = wkv_cache(m)
    for c, w in evals.items():
        t1 = time.time()
        if make_cache is not None:
            e = evaluate_kv(m, w, make_cache, chunk_size=args.kv_chunk, batch_size=args.eval_batch, desc=f"{r} {c}")
            kv = e["kv"]
            rec["notes"] = (f"cache in the loop, chunks of {args.kv_chunk}; KV at 512 tokens: {kv['bytes'] / 2**20:.2f} "
                            f"MiB vs fp16 {kv['fp16_bytes'] / 2**20:.2f} MiB")
        else:
            e = evaluate(m, w, batch_size=args.eval_batch, desc=f"{r} {c}")
        rec["results"][c] = {"ppl": e["ppl"], "eval_s": round(time.time() - t1, 1)}
    return rec


def table(path: Path) -> str:
    recs = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        recs[r["row"]] = r  # the last run of a row wins
    fp = recs.get("fp", {}).get("results", {})
    corpora = list(CORPORA)
    out = ["| setting | row | method (options) | bits/weight | " + " | ".join(f"{c} ppl (x FP)" for c in corpora)
           + " | quantize s | notes |", "|---" * (6 + len(corpora)) + "|"]
    for r in sorted(recs.values(), key=lambda r: (["FP", "W4A8", "W6A6", "W8A8", "KV4", "KV2"].index(r["setting"]),
                                                  list(ROWS).index(r["row"]) if r["row"] in ROWS else -1)):
        cells = []
        for c in corpora:
            p = r["results"].get(c, {}).get("ppl")
            cells.append("" if p is None else f"{p:.2f}" + (f" ({p / fp[c]['ppl']:.3f}x)" if c in fp else ""))
        opt = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        out.append(f"| {r['setting']} | {r['row']} | {r['method']} {('(' + opt + ')') if opt else ''} | "
                   f"{r.get('bits_per_weight', '')} | " + " | ".join(cells) + f" | {r.get('quantize_s', 0)} | {r['notes']} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help=f"comma list of: fp,{','.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows per corpus (512 tokens)")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (512 tokens of wikitext-2 valid)")
    ap.add_argument("--corpora", default="wikitext2,tinyshakespeare")
    ap.add_argument("--kv-chunk", type=int, default=32, help="tokens per step for the KV rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-batch", type=int, default=4, help="windows per forward (1 saves memory)")
    ap.add_argument("--out", default="out/bench_ptq_field_acts.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(out))
        return
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r != "fp" and r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; known: fp, {', '.join(ROWS)}")
    model, tok = load_model("smollm2-135m")
    proto = EvalProtocol(n_windows=args.windows)
    evals = {c: windows_from_text(tok, read_text(CORPORA[c]), proto, source=c) for c in args.corpora.split(",")}
    calib = calib_windows(tok, DATA / "wikitext-2" / "valid.txt", n=args.calib, seq_len=512)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"protocol: {proto.describe()}; calibration: {args.calib} x 512 tokens of wikitext-2 valid.txt; "
          f"threads {args.threads}", flush=True)
    for r in rows:
        rec = run_row(r, model, tok, evals, calib, args)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
