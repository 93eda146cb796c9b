"""GPTQ / AWQ / AWQ+GPTQ on SmolLM2-135M, side by side with llm-compressor's GPTQ.

Stages (each writes under --out, default out/bench_ptq; later stages reuse earlier results):

  calib  --n-calib x 512-token windows (default 128) from ../shared/data/wikitext-2/valid.txt
  peer   llm-compressor GPTQ (own venv, benchmarks/llmc_gptq.py) -> llmc-w{b}g64[-n{N}]/
  quant  one qft method -> qft-{method}-w{b}g64[-n{N}]/ (dequantized weights + time)
  pair   peer and qft GPTQ for the same bits and calibration: back-to-back by default, or started
         together with --concurrent (both then see the same load on a shared machine)
  eval   every result found: ppl on wikitext-2 test and tinyshakespeare (default protocol:
         20 x 512-token windows, no BOS) and KL(FP || quantized) on wikitext-2 (--kl-all: both)

Examples:
  python benchmarks/bench_ptq_gptq.py pair --bits 4
  python benchmarks/bench_ptq_gptq.py quant --method awq --bits 3
  python benchmarks/bench_ptq_gptq.py eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPORA = {"wikitext-2": DATA / "wikitext-2" / "test.txt", "tinyshakespeare": DATA / "tinyshakespeare" / "input.txt"}
LLMC_PY = os.environ.get("LLMC_PYTHON", "/work/venv-llmc/bin/python")


def load_uptime_load():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


def calib_path(out: Path, n: int) -> Path:
    return out / ("calib.pt" if n == 128 else f"calib-n{n}.pt")


def suffix(n: int) -> str:
    return "" if n == 128 else f"-n{n}"


def stage_calib(out: Path, n: int = 128):
    from qft.models import load_model
    from qft.ptq.calibrate import calib_windows
    _, tok = load_model("smollm2-135m")
    w = calib_windows(tok, DATA / "wikitext-2" / "valid.txt", n=n, seq_len=512)
    torch.save(w, calib_path(out, n))
    return w


def get_calib(out: Path, n: int = 128):
    p = calib_path(out, n)
    return torch.load(p) if p.exists() else stage_calib(out, n)


def peer_cmd(out: Path, bits: int, gs: int, n: int):
    get_calib(out, n)
    from qft.models import resolve
    return [LLMC_PY, str(ROOT / "benchmarks" / "llmc_gptq.py"), "--model", resolve("smollm2-135m"),
            "--calib", str(calib_path(out, n)), "--bits", str(bits), "--group-size", str(gs),
            "--out", str(out / f"llmc-w{bits}g{gs}{suffix(n)}")]


def peer_result(out: Path, bits: int, gs: int, n: int, load0):
    d = out / f"llmc-w{bits}g{gs}{suffix(n)}"
    res = json.loads((d / "result.json").read_text())
    res["load_before"], res["load_after"] = load0, load_uptime_load()
    (d / "result.json").write_text(json.dumps(res))
    return res


def stage_peer(out: Path, bits: int, gs: int, n: int = 128):
    cmd = peer_cmd(out, bits, gs, n)
    print("$", " ".join(cmd), flush=True)
    load0 = load_uptime_load()
    subprocess.run(cmd, check=True)
    return peer_result(out, bits, gs, n, load0)


def stage_quant(out: Path, method: str, bits: int, gs: int, options: dict, n: int = 128, tag: str = ""):
    import qft.ptq  # noqa: F401  (registers methods)
    from qft.models import load_model
    from qft.nn import QuantLinear
    from qft.ptq import run
    from qft.spec import QuantSpec
    from safetensors.torch import save_file
    calib = get_calib(out, n)
    model, _ = load_model("smollm2-135m")
    spec = QuantSpec(bits=bits, group_size=gs, symmetric=False)
    load0 = load_uptime_load()
    t0 = time.perf_counter()
    run(method, model, spec, calib=calib, **options)
    elapsed = time.perf_counter() - t0
    print(f"qft {method} w{bits}g{gs}: {elapsed:.1f} s", flush=True)
    d = out / f"qft-{method}{'-' + tag if tag else ''}-w{bits}g{gs}{suffix(n)}"
    d.mkdir(parents=True, exist_ok=True)
    # every parameter that differs from the float model may have changed (AWQ folds into norms): save all
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            sd[name + ".weight"] = mod.dequantize(torch.float32).contiguous()
    for k, v in model.state_dict().items():
        if k.endswith(("norm.weight", "layernorm.weight")):
            sd[k] = v.contiguous()
    save_file(sd, str(d / "weights.safetensors"))
    res = {"method": method, "bits": bits, "group_size": gs, "time_s": elapsed, "options": options, "n_calib": n,
           "load_before": load0, "load_after": load_uptime_load()}
    (d / "result.json").write_text(json.dumps(res))
    return res


def _dense_model(result_dir: Path):
    from qft.models import load_model
    model, _ = load_model("smollm2-135m")
    if result_dir is None:
        return model
    if (result_dir / "dense").exists():  # peer: a float HF dir with dequantized weights
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(result_dir / "dense", dtype=torch.float32).eval()
    from safetensors.torch import load_file
    sd = load_file(str(result_dir / "weights.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise SystemExit(f"{result_dir}: unexpected tensors {unexpected[:3]}")
    return model


@torch.no_grad()
def _eval(model, windows, teacher_logp=None, batch_size=4):
    """ppl (and KL(teacher || model) against cached teacher log-probs): qft.eval.evaluate's
    definitions, with the teacher computed once per corpus instead of once per model."""
    import math
    import torch.nn.functional as F
    model.eval()
    nll, kl, count = 0.0, 0.0, 0
    for bi, i in enumerate(range(0, len(windows), batch_size)):
        b = windows[i:i + batch_size]
        logp = F.log_softmax(model(input_ids=b).logits.float()[:, :-1], -1)
        tgt = b[:, 1:]
        nll += -logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += tgt.numel()
        if teacher_logp is not None:
            t = teacher_logp[bi]
            kl += (t.exp() * (t - logp)).sum().item()
    out = {"ppl": math.exp(nll / count), "tokens": count}
    if teacher_logp is not None:
        out["kl"] = kl / count
    return out


def stage_eval(out: Path, only: list[str] | None, rtn: bool, kl_all: bool = False, n_windows: int = 20,
               wait_for: int = 0):
    import torch.nn.functional as F
    from qft.eval import EvalProtocol, read_text, windows_from_text
    from qft.models import load_model
    teacher, tok = load_model("smollm2-135m")
    proto = EvalProtocol(n_windows=n_windows)
    wins = {c: windows_from_text(tok, read_text(p), proto, source=c) for c, p in CORPORA.items()}
    tlogp = {}
    for c, w in wins.items():
        if kl_all or c == "wikitext-2":
            with torch.no_grad():
                tlogp[c] = [F.log_softmax(teacher(input_ids=w[i:i + 4]).logits.float()[:, :-1], -1)
                            for i in range(0, len(w), 4)]
    cache = out / f"eval-w{n_windows}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    while True:
        dirs = sorted(p for p in out.iterdir() if p.is_dir() and (p / "result.json").exists())
        rows = [("fp", None)] + ([(f"rtn-w{b}g64", f"rtn{b}") for b in (4, 3, 2)] if rtn else [])
        rows += [(p.name, p) for p in dirs]
        todo = [(n, s) for n, s in rows if n not in done and (not only or n in only or n == "fp")]
        for name, src in todo:
            if src is None:
                model = teacher
            elif isinstance(src, str):
                from qft.ptq import run
                from qft.spec import QuantSpec
                model, _ = load_model("smollm2-135m")
                run("rtn", model, QuantSpec(bits=int(src[-1]), group_size=64))
            else:
                model = _dense_model(src)
            r = {}
            for c, w in wins.items():
                e = _eval(model, w, tlogp.get(c) if src is not None else None)
                r[c] = {"ppl": e["ppl"], "kl": e.get("kl", 0.0 if src is None else float("nan"))}
                print(name, c, r[c], flush=True)
            if src is not None and not isinstance(src, str):
                r["time_s"] = json.loads((src / "result.json").read_text())["time_s"]
            done[name] = r
            cache.write_text(json.dumps(done, indent=1))
        if len([n for n in done if n != "fp"]) >= wait_for:
            break
        time.sleep(30)
    print(f"\nSmolLM2-135M, {proto.describe()}; calibration N x 512 tokens of wikitext-2 valid.txt "
          f"(N = 128 unless the name ends in -nN); KL(FP || quantized) per token")
    print("| method | ppl wikitext-2 | ppl tinyshakespeare | KL wikitext-2 | KL tinyshakespeare | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in done.items():
        t = f"{r['time_s']:.0f}" if "time_s" in r else "-"
        print(f"| {name} | {r['wikitext-2']['ppl']:.2f} | {r['tinyshakespeare']['ppl']:.2f} | "
              f"{r['wikitext-2']['kl']:.3f} | {r['tinyshakespeare']['kl']:.3f} | {t} |")
    print_pairs(done)


def print_pairs(done: dict):
    """llm-compressor GPTQ and qft GPTQ side by side per bit width (same calibration), and the bars."""
    rows = []
    for name in done:
        if name.startswith("llmc-"):
            q = "qft-gptq-" + name[len("llmc-"):]
            if q in done:
                rows.append((name[len("llmc-"):], done[name], done[q]))
    if not rows:
        return
    print("\n| setting | ppl wikitext-2: llm-compressor / qft | ppl tinyshakespeare: llm-compressor / qft | "
          "time (s): llm-compressor / qft | qft <= peer (ppl both, time) |")
    print("|---|---|---|---|---|")
    for setting, p, q in rows:
        ok = all(q[c]["ppl"] <= p[c]["ppl"] for c in CORPORA) and q.get("time_s", 1e9) <= p.get("time_s", 0)
        print(f"| {setting} | {p['wikitext-2']['ppl']:.2f} / {q['wikitext-2']['ppl']:.2f} | "
              f"{p['tinyshakespeare']['ppl']:.2f} / {q['tinyshakespeare']['ppl']:.2f} | "
              f"{p.get('time_s', float('nan')):.0f} / {q.get('time_s', float('nan')):.0f} | {'yes' if ok else 'no'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["calib", "peer", "quant", "pair", "eval"])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_ptq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--opt", action="append", default=[], help="method option key=value (json value)")
    ap.add_argument("--only", nargs="*", help="eval: result names to evaluate")
    ap.add_argument("--rtn", action="store_true", help="eval: add RTN rows")
    ap.add_argument("--n-windows", type=int, default=20, help="eval: windows per corpus (default 20)")
    ap.add_argument("--wait-for", type=int, default=0, help="eval: keep polling until this many results are done")
    ap.add_argument("--kl-all", action="store_true", help="eval: KL on every corpus (default: wikitext-2 only)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration windows of 512 tokens (default 128)")
    ap.add_argument("--tag", default="", help="quant: result name qft-{method}-{tag}-w{b}g64 (keeps variants apart)")
    ap.add_argument("--concurrent", action="store_true", help="pair: start the peer and qft together")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = {k: json.loads(v) for k, v in (o.split("=", 1) for o in a.opt)}
    n = a.n_calib
    if a.stage == "calib":
        stage_calib(out, n)
    elif a.stage == "peer":
        stage_peer(out, a.bits, a.group_size, n)
    elif a.stage == "quant":
        stage_quant(out, a.method, a.bits, a.group_size, opts, n, a.tag)
    elif a.stage == "pair":
        if a.concurrent:
            cmd = peer_cmd(out, a.bits, a.group_size, n)
            load0 = load_uptime_load()
            proc = subprocess.Popen(cmd)
            q = stage_quant(out, "gptq", a.bits, a.group_size, opts, n)
            if proc.wait() != 0:
                raise SystemExit("the llm-compressor run failed")
            p = peer_result(out, a.bits, a.group_size, n, load0)
        else:
            p = stage_peer(out, a.bits, a.group_size, n)
            q = stage_quant(out, "gptq", a.bits, a.group_size, opts, n)
        how = "started together" if a.concurrent else "back-to-back"
        print(f"{how} w{a.bits}g{a.group_size}, {n} x 512 calibration: llm-compressor {p['time_s']:.1f} s, "
              f"qft {q['time_s']:.1f} s (1-min load average at the start: {p['load_before']}, {q['load_before']})")
    else:
        stage_eval(out, a.only, a.rtn, a.kl_all, a.n_windows, a.wait_for)


if __name__ == "__main__":
    sys.exit(main())
