"""PTQ field, weight-only: OWQ, SpQR, SqueezeLLM, QuIP, LUT-GEMM against RTN and GPTQ on SmolLM2-135M.

Every method row runs from its recipe (recipes/smollm2-135m/<method>.yaml: quant spec, options,
calibration), then exports in the native "qft" format, reloads with ``qft.load`` (checking that
the reloaded model gives identical logits) and evaluates the *reloaded* model: perplexity and
KL(FP || quantized) on wikitext-2 test and tinyshakespeare with the default protocol (20 x 512-token
windows, no BOS). Calibration: windows of wikitext-2 valid.txt (``--calib``, default 128 x 512).

Bits per weight are state bits: codes, plus every scale / table entry / outlier value at 16 bits,
integer zero points at the weight width, outlier column indices at 16 bits and CSR row pointers at
32 (RTN/GPTQ w3gG: 3 + 19 / G). Rows are grouped so that each method sits next to the RTN/GPTQ
setting of about the same average bits.

    python benchmarks/bench_ptq_field_weights.py                          # the full table
    python benchmarks/bench_ptq_field_weights.py --rows fp,rtn_w3g64,owq --windows 4 --calib 16
    python benchmarks/bench_ptq_field_weights.py --device cuda            # same protocol on a GPU

Prints a markdown table and appends one JSON line per row to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
from qft.export import load, save
from qft.models import load_model
from qft.nn import set_module
from qft.nn.qlinear import QuantLinear
from qft.ptq import run
from qft.ptq.calibrate import calib_windows
from qft.spec import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPES = ROOT / "recipes" / "smollm2-135m"
# row: (method, spec, options) for baselines; recipe name for the field methods
ROWS = {
    "rtn_w3g64": ("rtn", QuantSpec(bits=3, group_size=64, format="qft"), {}),
    "gptq_w3g64": ("gptq", QuantSpec(bits=3, group_size=64, format="qft"), {}),
    "squeezellm": "squeezellm", "quip": "quip", "lutgemm": "lutgemm",
    "rtn_w3g32": ("rtn", QuantSpec(bits=3, group_size=32, format="qft"), {}),
    "gptq_w3g32": ("gptq", QuantSpec(bits=3, group_size=32, format="qft"), {}),
    "owq": "owq", "spqr": "spqr",
    # ablations: SpQR with plain min-max group ranges (the paper's), and also with 16-bit scales
    "spqr_minmax": ("spqr", QuantSpec(bits=3, group_size=16, format="qft"),
                    {"outlier_fraction": 0.003, "stat_bits": 3, "clip_grid": 0}),
    "spqr_fp16_stats": ("spqr", QuantSpec(bits=3, group_size=16, format="qft"),
                        {"outlier_fraction": 0.003, "stat_bits": 0, "clip_grid": 0}),
}
ABLATIONS = ("spqr_minmax", "spqr_fp16_stats")


def from_recipe(name: str):
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    return r["ptq"]["method"], QuantSpec(**r["quant"]), dict(r["ptq"].get("options") or {})


def bits_per_weight(model) -> float:
    """Average state bits per quantized weight (see the module docstring)."""
    bits = numel = 0
    for _, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n = m.in_features * m.out_features
            b = m.bits + (16 + m.bits) / m.group_size
        elif hasattr(m, "bits_per_weight") and hasattr(m, "qft_type"):
            n = m.in_features * m.out_features
            b = m.bits_per_weight()
        else:
            continue
        bits += b * n
        numel += n
    return bits / max(numel, 1)


def _quantized(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QuantLinear) or (hasattr(m, "qft_type") and hasattr(m, "dequantize"))]


@torch.no_grad()
def dense_copy(model):
    """Every quantized module replaced by an nn.Linear holding its effective (dequantized) weight:
    the same function up to float summation order, at the speed of the float model (``--fast-eval``)."""
    for name, m in _quantized(model):
        w = m.dequantize(torch.float32)
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight.data.copy_(w)
        if m.bias is not None:
            lin.bias.data.copy_(m.bias.float())
        set_module(model, name, lin)
    return model


@torch.no_grad()
def teacher_logprobs(teacher, windows, desc):
    return [F.log_softmax(teacher(input_ids=windows[i:i + 1]).logits[0, :-1].float(), -1).half()
            for i in tqdm(range(len(windows)), desc=desc, leave=False)]


@torch.no_grad()
def eval_cached(model, windows, tlogp, desc):
    """qft.eval.evaluate's perplexity and KL(teacher || model), the teacher's log-probs precomputed."""
    nll, kl, count = 0.0, 0.0, 0
    for i in tqdm(range(len(windows)), desc=desc, leave=False):
        logp = F.log_softmax(model(input_ids=windows[i:i + 1]).logits[0, :-1].float(), -1)
        tgt = windows[i, 1:]
        nll += -logp.gather(-1, tgt[:, None]).sum().item()
        t = tlogp[i].float()
        kl += (t.exp() * (t - logp)).sum().item()
        count += tgt.numel()
    return {"ppl": math.exp(nll / count), "kl": kl / count}


# each field method against the GPTQ row of about the same average bits
REFERENCE = {"quip": "gptq_w3g64", "lutgemm": "gptq_w3g64", "squeezellm": "gptq_w3g64",
             "owq": "gptq_w3g32", "spqr": "gptq_w3g32", "spqr_minmax": "gptq_w3g32", "spqr_fp16_stats": "gptq_w3g32"}


def table(path: Path) -> str:
    """The results in --out as a markdown table: x FP, KL, time, and "beats GPTQ" at matched bits."""
    recs = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        recs[r["row"]] = r  # the last run of a row wins
    fp = recs.get("fp", {}).get("results", {})
    corpora = ("wikitext2", "tinyshakespeare")
    out = ["| row | method (options) | bits/weight | wikitext-2 ppl (x FP) | KL | tinyshakespeare ppl (x FP) | KL "
           "| quantize s | eval s | reload identical | beats GPTQ at ~equal bits? |", "|---" * 11 + "|"]
    for r in sorted(recs.values(), key=lambda r: (r["row"] != "fp", round(r["bits_per_weight"], 1),
                                                   not r["row"].startswith("rtn"), not r["row"].startswith("gptq"))):
        cells = []
        for c in corpora:
            p, k = r["results"][c]["ppl"], r["results"][c]["kl"]
            cells += [f"{p:.2f}" + (f" ({p / fp[c]['ppl']:.2f}x)" if c in fp else ""), f"{k:.3f}"]
        ref = recs.get(REFERENCE.get(r["row"], ""))
        verdict = ""
        if ref is not None:
            a = [r["results"][c]["ppl"] for c in corpora]
            b = [ref["results"][c]["ppl"] for c in corpora]
            yes = [x < y for x, y in zip(a, b)]
            word = "yes" if all(yes) else ("no" if not any(yes) else "split")
            verdict = (f"{word}: {a[0]:.2f} vs {b[0]:.2f} / {a[1]:.2f} vs {b[1]:.2f} "
                       f"({ref['row']}, {ref['bits_per_weight']:.3f} bits)")
        opt = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        name = f"{r['method']} {r['spec']}" + (f" ({opt})" if opt else "")
        out.append(f"| {r['row']} | {name} | {r['bits_per_weight']:.3f} | " + " | ".join(cells)
                   + f" | {r['quantize_s']:.0f} | {r.get('eval_s', '')} | {r['reload_identical']} | {verdict} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="fp," + ",".join(r for r in ROWS if r not in ABLATIONS), help=f"comma list of: fp,{','.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows per corpus")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows (512 tokens, wikitext-2 valid)")
    ap.add_argument("--data", default=str(DATA), help="folder with wikitext-2/ and tinyshakespeare/")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="out/bench_ptq_field_weights.jsonl")
    ap.add_argument("--keep", default=None,
                    help="keep each row's export in KEEP/<row> (for `qft eval --model KEEP/<row>` in a fresh process)")
    ap.add_argument("--fast-eval", action="store_true",
                    help="evaluate the reloaded export with its dequantized weights in plain nn.Linear layers "
                         "(after checking the packed modules give identical logits) and the teacher's "
                         "log-probs computed once: the only way the table fits a shared 2-core CPU")
    ap.add_argument("--table", action="store_true", help="print the table of what --out holds and stop")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r != "fp" and r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; known: fp, {', '.join(ROWS)}")
    data = Path(args.data)
    corpora = {"wikitext2": data / "wikitext-2" / "test.txt", "tinyshakespeare": data / "tinyshakespeare" / "input.txt"}
    dev = torch.device(args.device)
    teacher, tok = load_model("smollm2-135m")
    teacher.to(dev).eval()
    proto = EvalProtocol(n_windows=args.windows)
    evals = {c: windows_from_text(tok, read_text(p), proto, source=c) for c, p in corpora.items()}
    calib = calib_windows(tok, data / "wikitext-2" / "valid.txt", n=args.calib, seq_len=512)
    tcache = {c: teacher_logprobs(teacher, w.to(dev), f"teacher {c}") for c, w in evals.items()} \
        if args.fast_eval else None
    if args.fast_eval:  # the teacher is not needed any more: reload a fresh copy per row (less memory)
        del teacher
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"protocol: {proto.describe()}; calibration: {args.calib} x 512 tokens of wikitext-2 valid.txt; "
          f"device {args.device}", flush=True)
    head = ("| row | method | spec / options | bits/weight | wikitext-2 ppl | KL | tinyshakespeare ppl | KL "
            "| quantize s | reload identical |")
    lines = []
    for r in rows:
        t_q, bpw, same = 0.0, 16.0, True
        if r == "fp":
            method, spec, opts, q = "fp", None, {}, (None if args.fast_eval else teacher)
        else:
            method, spec, opts = from_recipe(ROWS[r]) if isinstance(ROWS[r], str) else ROWS[r]
            m = load_model("smollm2-135m")[0].to(dev).eval() if args.fast_eval else copy.deepcopy(teacher)
            t0 = time.time()
            m = run(method, m, spec, calib if method != "rtn" else None, **dict(opts))
            t_q = time.time() - t0
            bpw = bits_per_weight(m)
            x = evals["wikitext2"][:1, :64].to(dev)
            with tempfile.TemporaryDirectory() as d:
                ck = Path(args.keep) / r if args.keep else Path(d) / "ck"
                m.to("cpu")
                save(m, ck, tok, format="qft", overwrite=True,  # packs QuantLinear in place
                     report={"method": method, "spec": spec.to_dict(), "base_model": "smollm2-135m",
                             "quantize_seconds": round(t_q, 1), "options": opts})
                with torch.no_grad():
                    y = m.to(dev)(x).logits
                del m
                q = load(ck).to(dev)
            with torch.no_grad():
                same = torch.equal(y, q(x).logits)
            if args.fast_eval:
                q = dense_copy(q)
        res, t_e = {}, time.time()
        for c, w in evals.items():
            if args.fast_eval and r == "fp":
                nll = -sum(float(lp.gather(-1, w[i, 1:, None].to(dev)).sum()) for i, lp in enumerate(tcache[c]))
                e = {"ppl": math.exp(nll / (w.shape[0] * (w.shape[1] - 1))), "kl": 0.0}
            elif args.fast_eval:
                e = eval_cached(q, w.to(dev), tcache[c], f"{r} {c}")
            else:
                e = evaluate(q, w.to(dev), teacher=None if r == "fp" else teacher, desc=f"{r} {c}")
            res[c] = {"ppl": e["ppl"], "kl": e.get("kl", 0.0)}
        spec_s = spec.name if spec is not None else ""
        rec = {"row": r, "method": method, "spec": spec_s, "options": opts, "bits_per_weight": bpw,
               "quantize_s": t_q, "eval_s": round(time.time() - t_e, 1), "results": res, "calib": args.calib, "windows": args.windows,
               "device": args.device, "reload_identical": same, "fast_eval": args.fast_eval}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        optstr = ", ".join(f"{k}={v}" for k, v in opts.items())
        line = (f"| {r} | {method} | {spec_s} {optstr} | {bpw:.3f} | {res['wikitext2']['ppl']:.2f} | "
                f"{res['wikitext2']['kl']:.4f} | {res['tinyshakespeare']['ppl']:.2f} | "
                f"{res['tinyshakespeare']['kl']:.4f} | {t_q:.0f} | {same} |")
        lines.append(line)
        print(line, flush=True)
        if r != "fp":
            del q
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
