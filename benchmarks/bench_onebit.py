"""OneBit initialization quality on SmolLM2-135M: perplexity and KL right after SVID, against
sign-only with a per-row scale and against RTN at 1 and 2 bits (no training anywhere).

    python benchmarks/bench_onebit.py [--rows fp,rtn2g64,...] [--n-windows 20] [--out results.json]
    python benchmarks/bench_onebit.py --weights-only      # layer errors only (no perplexity; fast)

Protocol: qft.eval default (20 x 512-token windows, stride 512, no BOS) on wikitext-2 test and on
tinyshakespeare (other domain); KL(teacher || model) on the same positions. Calibration data for
the activation-aware row: 16 x 512 tokens of wikitext-2 *valid*. Every linear layer of the 30
blocks is replaced; embeddings and the (tied) lm_head stay in full precision. bpw = stored bits per
weight of the replaced layers (fp16 scales / zeros / value vectors).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
from qft.models import load_model
from qft.nn import quantize_model
from qft.spec import QuantSpec

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ROWS = {
    "fp": "full precision (fp32)",
    "rtn2g64": "RTN 2-bit, group 64 (asym)",
    "rtn2": "RTN 2-bit, per channel (asym)",
    "rtn1g64": "RTN 1-bit sign, group 64 (scale = mean |w|)",
    "rtn1": "RTN 1-bit sign, per channel (= sign x row mean |w|)",
    "signrow": "OneBit layer, sign x row mean |w| (g = 1)",
    "svid": "OneBit layer, SVID (power iteration)",
    "svid_nmf": "OneBit layer, SVID (rank-1 NMF)",
    "svid_act": "OneBit layer, SVID activation-aware (ours)",
}


def build(row: str, base, calib):
    from qft.ptq.svid import onebit_svid
    m = copy.deepcopy(base)
    if row == "fp":
        return m, 16.0
    if row.startswith("rtn"):
        bits = int(row[3])
        gs = int(row.split("g")[1]) if "g" in row else None
        spec = QuantSpec(bits=bits, group_size=gs, scheme="sign" if bits == 1 else "int")
        quantize_model(m, spec)
        from qft.nn.swap import quant_linears
        layers = [l for _, l in quant_linears(m)]
        per_group = 16 if bits == 1 else 32  # fp16 scale (+ zero for int) per group
        tot = sum(l.in_features * l.out_features for l in layers)
        return m, sum((bits + per_group / l.group_size) * l.in_features * l.out_features for l in layers) / tot
    opts = {"signrow": dict(init="sign_rowmean"), "svid": {}, "svid_nmf": dict(decomposition="nmf"),
            "svid_act": dict(act_aware=True)}[row]
    onebit_svid(m, "w1", calib=calib, **opts)
    from qft.nn.onebit import onebit_layers
    layers = [l for _, l in onebit_layers(m)]
    tot = sum(l.in_features * l.out_features for l in layers)
    return m, sum(l.bits_per_weight() * l.in_features * l.out_features for l in layers) / tot


def weight_errors(model, base, rms: dict) -> tuple[float, float]:
    """Mean over replaced layers of ||W - W^|| / ||W|| and of the same with columns weighted by the
    calibration input RMS (a diagonal proxy of the layer-output error)."""
    from qft.nn import QuantLinear
    from qft.nn.onebit import OneBitLinear
    plain, weighted = [], []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, OneBitLinear)):
            w = base.get_submodule(name).weight.data.float()
            d = (m.dequantize(torch.float32) - w)
            plain.append(float(d.norm() / w.norm()))
            r = rms[name].to(w.device)
            weighted.append(float((d * r).norm() / (w * r).norm()))
    return sum(plain) / len(plain), sum(weighted) / len(weighted)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--n-windows", type=int, default=20)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--weights-only", action="store_true", help="only the layer weight errors (no perplexity)")
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        sys.exit(f"--rows: unknown {bad}; allowed: {', '.join(ROWS)}")
    torch.manual_seed(0)
    teacher, tok = load_model("smollm2-135m", device=args.device)
    proto = EvalProtocol(n_windows=args.n_windows)
    data = Path(args.data)
    sets = {"wikitext-2 test": windows_from_text(tok, read_text(data / "wikitext-2" / "test.txt"), proto),
            "tinyshakespeare": windows_from_text(tok, read_text(data / "tinyshakespeare" / "input.txt"), proto)}
    calib = windows_from_text(tok, read_text(data / "wikitext-2" / "valid.txt"), EvalProtocol(n_windows=16))
    results = []
    if args.weights_only:
        from qft.nn.swap import target_linears
        from qft.ptq.svid import input_rms
        names = [n for n, _ in target_linears(teacher, QuantSpec(bits=1, scheme="sign", group_size=None))]
        rms = input_rms(teacher, names, calib)
        print("| method | bpw | rel. weight error | input-RMS-weighted rel. error |\n|---|---|---|---|")
        for row in rows:
            if row == "fp":
                continue
            model, bpw = build(row, teacher, calib)
            e, ew = weight_errors(model, teacher, rms)
            print(f"| {ROWS[row]} | {bpw:.3f} | {e:.4f} | {ew:.4f} |", flush=True)
        return
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"protocol: {proto.describe()}; device: {dev}", flush=True)
    for row in rows:
        t0 = time.time()
        model, bpw = build(row, teacher, calib)
        res = {"row": row, "what": ROWS[row], "bpw": round(bpw, 3)}
        for name, win in sets.items():
            r = evaluate(model, win, teacher=None if row == "fp" else teacher, desc=f"{row} {name}")
            res[name] = {"ppl": round(r["ppl"], 2), "kl": round(r.get("kl", 0.0), 3)}
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        del model
    fp = next((r for r in results if r["row"] == "fp"), None)
    print("\n| method | bpw | wikitext-2 ppl | KL | tinyshakespeare ppl | KL |")
    print("|---|---|---|---|---|---|")
    for r in results:
        w, s = r["wikitext-2 test"], r["tinyshakespeare"]
        ratio = (lambda d, k: f" ({d['ppl'] / fp[k]['ppl']:.1f}x)" if fp and r is not fp else "")
        print(f"| {r['what']} | {r['bpw']:.2f} | {w['ppl']:.2f}{ratio(w, 'wikitext-2 test')} | {w['kl']:.3f} | "
              f"{s['ppl']:.2f}{ratio(s, 'tinyshakespeare')} | {s['kl']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"protocol": proto.describe(), "device": dev, "results": results},
                                             indent=2))


if __name__ == "__main__":
    main()
