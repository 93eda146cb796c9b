"""QAT on SmolLM2-135M: RTN vs clip-search init vs QAT (LoRA modes, full QAT) on one CPU budget.

    python benchmarks/qat_smollm2.py --windows 20 --steps 40 --modes lora-in-quantizer qlora full

Shares the teacher, evaluation windows, self-generated data and the clip-search initialization
between runs (one process). Perplexity and KL(teacher || model) on wikitext-2 test and
tinyshakespeare (never trained or calibrated on), protocol printed with the table. For each
trained mode: wall time per step, peak extra RSS during training (sampled), frozen-base MiB,
trainable parameters, ppl/KL before and after the merge. ``full`` = BitDistiller-style QAT of
all quantized weights (latent float weights, dynamic min-max, STE), no LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import threading
import time
from pathlib import Path

import psutil
import torch

from qft.eval import EvalProtocol, evaluate, read_text, windows_from_text
from qft.models import load_model
from qft.nn import quant_linears
from qft.ptq import run as run_ptq
from qft.spec import resolve_spec
from qft.train.args import DistillArgs
from qft.train.data import DataConfig, build_dataset
from qft.train.full import apply_full_qat
from qft.train.lora import apply_lora, lora_summary, merge_lora
from qft.train.selfgen import SelfGenConfig, selfgen
from qft.train.trainer import DistillTrainer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class RssPeak:
    """Peak resident memory above the level at start, sampled every 50 ms."""

    def __enter__(self):
        self.p, self.base, self.peak, self.stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.p.memory_info().rss - self.base)
            time.sleep(0.05)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()


def measure(model, sets, teacher, tag):
    out = {}
    for name, w in sets.items():
        r = evaluate(model, w, teacher=teacher, desc=f"{tag} {name}")
        out[name] = {"ppl": r["ppl"], "kl": r.get("kl", 0.0)}
        print(f"  {tag:>24} {name:>14}: ppl {r['ppl']:8.3f}  KL {out[name]['kl']:.4f}", flush=True)
    return out


def train(mode, init_student, teacher, ds, coll, a, out_dir):
    student = copy.deepcopy(init_student)
    lr = a.lr
    if mode == "full":
        model, lr = apply_full_qat(student), a.full_lr  # clamp to the searched clip range, latent weights, STE
        summary = lora_summary(student)
    else:
        qp = "lwc" if mode == "lora-in-quantizer-lwc" else "dynamic"
        model = apply_lora(student, "lora-in-quantizer" if mode.startswith("lora-in") else mode, r=a.r,
                           alpha=2.0 * a.r, qparams=qp)
        summary = lora_summary(model)
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(out_dir / mode), max_steps=a.steps, per_device_train_batch_size=a.bs,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, a.steps // 10),
                             logging_steps=10, report_to="none", save_strategy="no", remove_unused_columns=False,
                             seed=0, data_seed=0, weight_decay=0.0)
    tr = DistillTrainer(model=model, args=args, train_dataset=ds, data_collator=coll, teacher=teacher,
                        distill=DistillArgs(loss=a.loss, confidence_batches=4))
    t0 = time.time()
    with RssPeak() as mem:
        tr.train()
    dt = time.time() - t0
    return model, {"train_s": dt, "s_per_step": dt / a.steps, "peak_extra_rss_mib": mem.peak / 2**20,
                   "frozen_mib": summary["frozen_bytes"] / 2**20, "trainable": summary["trainable"],
                   "confidence": getattr(tr, "confidence", None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default="w4g64")
    ap.add_argument("--windows", type=int, default=20, help="eval windows per corpus (protocol: 20)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--loss", default="cakld")
    ap.add_argument("--selfgen-n", type=int, default=128)
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--modes", nargs="*", default=["lora-in-quantizer", "qlora", "full"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_qat"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-baselines", action="store_true", help="skip the fp / rtn / clip evaluations")
    ap.add_argument("--skip-exact-before", action="store_true",
                    help="lora-in-quantizer: skip the before-merge evaluation (the merge is bit-exact, tested)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = resolve_spec(a.spec)
    t_all = time.time()
    teacher, tok = load_model("smollm2-135m")
    proto = EvalProtocol(seq_len=a.seq_len, n_windows=a.windows)
    sets = {"wikitext2-test": windows_from_text(tok, read_text(SHARED / "wikitext-2" / "test.txt"), proto),
            "tinyshakespeare": windows_from_text(tok, read_text(SHARED / "tinyshakespeare" / "input.txt"), proto)}
    t0 = time.time()
    data_path = out / f"selfgen-{a.train_len}.jsonl"
    selfgen(teacher, tok, data_path, SelfGenConfig(n=a.selfgen_n, seq_len=a.train_len, batch_size=16, seed=0))
    t_selfgen = time.time() - t0
    ds, coll = build_dataset(DataConfig(sources=[{"type": "selfgen", "path": str(data_path)}], seq_len=a.train_len), tok)
    res, info = {}, {"selfgen_s": t_selfgen}
    print(f"protocol: {proto.describe()}; train: {a.steps} steps x {a.bs} x {a.train_len} self-generated tokens",
          flush=True)
    if not a.no_baselines:
        res["fp"] = measure(teacher, sets, None, "fp")
        rtn = run_ptq("rtn", copy.deepcopy(teacher), spec)
        res["rtn"] = measure(rtn, sets, teacher, "rtn")
        del rtn
    calib = torch.stack([ds[i]["input_ids"] for i in range(16)])
    t0 = time.time()
    clip = run_ptq("clip", copy.deepcopy(teacher), spec, calib=calib)
    info["clip_s"] = time.time() - t0
    if not a.no_baselines:
        res["clip"] = measure(clip, sets, teacher, "clip")
    for mode in a.modes:
        model, st = train(mode, clip, teacher, ds, coll, a, out)
        info[mode] = st
        print(f"  {mode}: {st}", flush=True)
        model.eval()
        if mode != "full":
            if not (a.skip_exact_before and mode.startswith("lora-in")):
                res[f"{mode} before merge"] = measure(model, sets, teacher, f"{mode} before")
            model = merge_lora(model)
        else:
            for _, m in quant_linears(model):
                m.dynamic = False
                m.requantize()
        res[f"{mode} after merge"] = measure(model, sets, teacher, f"{mode} merged")
        del model
    info["total_s"] = time.time() - t_all
    (out / f"results-{a.spec}-{a.windows}w-{a.steps}s.json").write_text(json.dumps({"args": vars(a), "results": res,
                                                                                   "info": info}, indent=2))
    if "fp" not in res:
        return
    fp = res["fp"]
    print(f"\n{spec.name}, {proto.describe()}, {a.steps} steps x {a.bs} x {a.train_len} tokens, loss {a.loss}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print("| model | wikitext-2 ppl (x FP) | wikitext-2 KL | tinyshakespeare ppl (x FP) | tinyshakespeare KL |")
    print("|---|---|---|---|---|")
    for k, v in res.items():
        w, s = v["wikitext2-test"], v["tinyshakespeare"]
        print(f"| {k} | {w['ppl']:.2f} ({w['ppl'] / fp['wikitext2-test']['ppl']:.3f}x) | {w['kl']:.4f} | "
              f"{s['ppl']:.2f} ({s['ppl'] / fp['tinyshakespeare']['ppl']:.3f}x) | {s['kl']:.4f} |")
    print("\n| mode | s/step | train s | peak extra RSS MiB | frozen base MiB | trainable params |")
    print("|---|---|---|---|---|---|")
    for m in a.modes:
        st = info[m]
        print(f"| {m} | {st['s_per_step']:.2f} | {st['train_s']:.0f} | {st['peak_extra_rss_mib']:.0f} | "
              f"{st['frozen_mib']:.1f} | {st['trainable']:,} |")
    print(f"\nselfgen {info['selfgen_s']:.0f}s, clip search {info['clip_s']:.0f}s, total {info['total_s']:.0f}s")


if __name__ == "__main__":
    main()
