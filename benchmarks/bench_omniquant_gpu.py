"""OmniQuant and ZeroQuant against GPTQ / RTN / SmoothQuant on SmolLM2-135M, in one (GPU) run.

Rows, in priority order (a run that reaches its time budget skips the rest and says so):

  FP; W4A16 g64: GPTQ, OmniQuant (LWC), RTN; W4A8 (g64 weights, per-token 8-bit activations):
  RTN, SmoothQuant, GPTQ, OmniQuant (LWC + LET); W6A6 (per-channel 6-bit weights, per-token 6-bit
  activations): the same four; ZeroQuant W8A8 g64 and W4A8 g64, each without and with LKD.

Every row: perplexity on wikitext-2 test and tinyshakespeare (default protocol: 20 x 512-token
windows, no BOS), KL(FP || quantized) per token on both, the seconds it took to quantize.
Calibration: --n-calib x 512-token windows of wikitext-2 valid.txt, the same windows for every
method. Each row is appended to <out>/rows.jsonl as soon as it is measured, and the table is
printed at the end and written to <out>/table.md (--table-only rebuilds it from rows.jsonl).

    TQDM_DISABLE=1 python benchmarks/bench_omniquant_gpu.py --out out/omni_gpu      # CUDA, full run
    python benchmarks/bench_omniquant_gpu.py --device cpu --n-calib 2 --epochs 1 --windows 2  # smoke test

OmniQuant / ZeroQuant-LKD training is capped in wall-clock time (``max_seconds``, a share of the
time left); a row that ran out of time before its epochs were done says how many steps it ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

W4 = dict(bits=4, group_size=64)
W4A8 = dict(bits=4, group_size=64, act_bits=8)
W6A6 = dict(bits=6, group_size=None, act_bits=6)
W8A8G = dict(bits=8, group_size=64, act_bits=8)
# name: (setting, method, spec fields, options, calibrated, share of the training budget or 0)
ROWS = {
    "fp": ("FP", "fp", None, {}, False, 0),
    "gptq_w4g64": ("W4A16 g64", "gptq", W4, {}, True, 0),
    "omniquant_w4g64": ("W4A16 g64", "omniquant", W4, {"target": "fp"}, True, 0.40),
    "rtn_w4g64": ("W4A16 g64", "rtn", W4, {}, False, 0),
    "rtn_w4a8": ("W4A8", "rtn", W4A8, {}, False, 0),
    "smoothquant_w4a8": ("W4A8", "smoothquant", W4A8, {"alpha": 0.5}, True, 0),
    "gptq_w4a8": ("W4A8", "gptq", W4A8, {}, True, 0),
    "omniquant_w4a8": ("W4A8", "omniquant", W4A8, {"target": "fp"}, True, 0.25),
    "rtn_w6a6": ("W6A6", "rtn", W6A6, {}, False, 0),
    "smoothquant_w6a6": ("W6A6", "smoothquant", W6A6, {"alpha": 0.5}, True, 0),
    "gptq_w6a6": ("W6A6", "gptq", W6A6, {}, True, 0),
    "omniquant_w6a6": ("W6A6", "omniquant", W6A6, {"target": "fp"}, True, 0.25),
    "zeroquant_w8a8g64": ("W8A8 g64", "zeroquant", W8A8G, {}, False, 0),
    "zeroquant_w8a8g64_lkd": ("W8A8 g64", "zeroquant", W8A8G, {"lkd": True}, True, 0.05),
    "zeroquant_w4a8g64": ("W4A8 g64", "zeroquant", W4A8, {}, False, 0),
    "zeroquant_w4a8g64_lkd": ("W4A8 g64", "zeroquant", W4A8, {"lkd": True}, True, 0.05),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--out", default=str(ROOT / "out" / "omni_gpu"), help="folder for rows.jsonl")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list, in run order, of: {','.join(ROWS)}")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration windows of 512 tokens (wikitext-2 valid)")
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows of 512 tokens per corpus")
    ap.add_argument("--epochs", type=float, default=20.0,
                    help="OmniQuant / ZeroQuant-LKD passes over the calibration windows per block (the paper: 20)")
    ap.add_argument("--train-batch", type=int, default=4, help="calibration windows per Adam step")
    ap.add_argument("--lwc-lr", type=float, default=2e-2,
                    help="OmniQuant LWC learning rate (the paper: 1e-2 at 1 window per step; ~sqrt(4) x for 4)")
    ap.add_argument("--let-lr", type=float, default=5e-3, help="OmniQuant LET learning rate (the paper: 5e-3)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for the whole run (from the start of the script); training rows share "
                         "what is left after the reserve, later rows are skipped when it is spent")
    ap.add_argument("--reserve", type=float, default=60.0,
                    help="seconds kept back for the rows that do not train and for evaluation")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA), help="folder with wikitext-2/ and tinyshakespeare/")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (cpu device)")
    ap.add_argument("--max-layers", type=int, default=0, help="keep only the first N decoder blocks (smoke tests)")
    ap.add_argument("--table-only", action="store_true", help="print the table from <out>/rows.jsonl and exit")
    a = ap.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown row(s) {bad}; allowed: {', '.join(ROWS)}")
    for k in ("n_calib", "windows", "train_batch"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')}={getattr(a, k)} is not valid; allowed: an integer >= 1")
    if a.epochs < 0 or a.budget <= 0 or a.reserve < 0:
        ap.error("--epochs and --reserve must be >= 0 and --budget > 0")
    if a.device.startswith("cuda") and not torch.cuda.is_available() and not a.table_only:
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    a.rows = rows
    return a


def table(recs: list[dict]) -> str:
    fp = next((r for r in recs if r["row"] == "fp" and "results" in r), None)
    head = ("| setting | method | ppl wikitext-2 (x FP) | ppl tinyshakespeare (x FP) | KL wikitext-2 | "
            "KL tinyshakespeare | quantize s | notes |")
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if "results" not in r:
            out.append(f"| {r['setting']} | {r['row']} | - | - | - | - | - | {r.get('error', r.get('skipped', ''))} |")
            continue
        cells = []
        for c in ("wikitext-2", "tinyshakespeare"):
            p = r["results"][c]["ppl"]
            cells.append(f"{p:.2f} ({p / fp['results'][c]['ppl']:.3f}x)" if fp else f"{p:.2f}")
        kls = [f"{r['results'][c].get('kl', 0.0):.4f}" for c in ("wikitext-2", "tinyshakespeare")]
        out.append(f"| {r['setting']} | {r['row']} | {cells[0]} | {cells[1]} | {kls[0]} | {kls[1]} | "
                   f"{r['quantize_s']:.1f} | {r.get('notes', '')} |")
    return "\n".join(out)


def main(argv=None):
    t_start = time.monotonic()
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "rows.jsonl"
    if a.table_only:
        print(table([json.loads(x) for x in log.read_text().splitlines() if x.strip()]))
        return
    torch.set_num_threads(a.threads)
    import qft.ptq  # noqa: F401  (registers the methods)
    from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
    from qft.models import load_model
    from qft.ptq import run
    from qft.ptq.calibrate import calib_windows
    from qft.spec import QuantSpec

    dev = a.device
    model, tok = load_model(a.model, device=dev)
    if a.max_layers:
        model.model.layers = model.model.layers[:a.max_layers]
        model.config.num_hidden_layers = a.max_layers
    data = Path(a.data)
    proto = EvalProtocol(n_windows=a.windows)
    corpora = {"wikitext-2": data / "wikitext-2" / "test.txt", "tinyshakespeare": data / "tinyshakespeare" / "input.txt"}
    evals = {c: windows_from_text(tok, read_text(p), proto, source=c) for c, p in corpora.items()}
    calib = calib_windows(tok, data / "wikitext-2" / "valid.txt", n=a.n_calib, seq_len=512)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {a.threads} thread(s)"
    print(f"device: {name}; {proto.describe()}; calibration {a.n_calib} x 512 tokens of wikitext-2 valid.txt; "
          f"epochs {a.epochs}, train batch {a.train_batch}; budget {a.budget:.0f} s; setup "
          f"{time.monotonic() - t_start:.0f} s", flush=True)
    shares_left = sum(ROWS[r][5] for r in a.rows)
    recs = []
    for r in a.rows:
        setting, method, fields, opts, calibrated, share = ROWS[r]
        rec = {"row": r, "setting": setting, "method": method, "device": name,
               "n_calib": a.n_calib if calibrated else 0, "windows": a.windows}
        left = a.budget - (time.monotonic() - t_start)
        if left < 20 or (share and left - a.reserve < 5):
            rec["skipped"] = f"skipped: {left:.0f} s of the budget left"
        else:
            opts = dict(opts)
            if share:  # training rows: epochs, batch, and their share of the time left after the reserve
                cap = max(left - a.reserve, 5.0) * share / shares_left
                if method == "omniquant" or opts.get("lkd"):
                    opts.update(epochs=a.epochs, train_batch=a.train_batch, max_seconds=round(cap, 1))
                    if method == "omniquant":
                        opts.update(lwc_lr=a.lwc_lr, let_lr=a.let_lr)
                    if method == "zeroquant":
                        # 2 epochs x lr 5e-5 at 4 windows a step: the same lr x steps as the CPU run
                        # (32 steps of 1 window at 1e-4) that took W4A8 g64 from 38.27 to 34.39
                        opts.update(epochs=min(a.epochs, 2.0), lr=5e-5)
            shares_left -= share
            rec["options"] = opts
            try:
                m = model if method == "fp" else copy.deepcopy(model)
                t0 = time.monotonic()
                if method != "fp":
                    run(method, m, QuantSpec(**fields), calib if calibrated else None, **opts)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                rec["quantize_s"] = time.monotonic() - t0
                steps = getattr(m, "qft_omniquant_steps", None) or getattr(m, "qft_zeroquant_steps", None)
                if steps:
                    want = math.ceil(opts["epochs"] * a.n_calib / opts["train_batch"])
                    rec["steps"] = steps
                    rec["notes"] = (f"{sum(steps) / len(steps):.0f} of {want} steps per block"
                                    + (" (time cap)" if min(steps) < want else ""))
                res = {}
                for c, w in evals.items():
                    e = evaluate(m, w, teacher=None if method == "fp" else model, batch_size=4, progress=False)
                    res[c] = {"ppl": e["ppl"], **({"kl": e["kl"]} if "kl" in e else {})}
                rec["results"] = res
                del m
            except Exception as e:  # keep going: one failing row must not lose the others
                rec["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        rec["elapsed_s"] = time.monotonic() - t_start
        recs.append(rec)
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if "results" in rec:
            res = rec["results"]
            print(f"[{rec['elapsed_s']:6.1f} s] {r:24s} wikitext-2 {res['wikitext-2']['ppl']:.2f}  tinyshakespeare "
                  f"{res['tinyshakespeare']['ppl']:.2f}  KL {res['wikitext-2'].get('kl', 0.0):.4f}  quantize "
                  f"{rec['quantize_s']:.1f} s  {rec.get('notes', '')}", flush=True)
        else:
            print(f"[{rec['elapsed_s']:6.1f} s] {r:24s} {rec.get('error') or rec.get('skipped')}", flush=True)
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    text = (f"SmolLM2-135M on {name}; {proto.describe()}; calibration {a.n_calib} x 512 tokens of wikitext-2 "
            f"valid.txt; KL(FP || quantized) per token; total {time.monotonic() - t_start:.0f} s\n\n{table(recs)}\n")
    (out / "table.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
