"""W4A16 for M >= 64 and the qlora training path, every candidate side by side (section ``train``).

    python benchmarks/bench_kernels.py --sections train          # or: python benchmarks/bench_kernels_train.py

Per Llama shape (K x N) and M in 64, 256, 2048, with W4 g128 asymmetric weights, bf16 activations:

* forward: cuBLAS bf16 (``F.linear`` on the dense weight), dequantize-then-cuBLAS, the canonical fused
  GEMM (``wq_triton.gemm``), each ``wq_gemm_tc`` configuration (in-loop 16-bit decode, tensor cores),
  the K-sliced tensor-core kernels at M = 64, and ``qlinear`` after the dispatcher's one-time choice;
* backward (qlora's dX = dY deq(W), [M, N] @ [N, K]): cuBLAS bf16 on the dense weight, the fused
  kernel (``grad_input_fused``), dequantize-then-cuBLAS (``grad_input_deq``), and the dispatcher;
* dequantization kernels (packed -> dense bf16), GB/s against the copy ceiling.

Timing as in ``bench_kernels``: CUDA graph of 20 calls rotating over weight copies (> 200 MB in all),
L2 flushed before each replay, median. Every row checks its output against an fp32 reference.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qft.kernels import reference as R  # noqa: E402

if hasattr(sys.modules["__main__"], "gbench"):  # run from bench_kernels.py: share its table of lines
    BK = sys.modules["__main__"]
else:
    import bench_kernels as BK  # noqa: E402

MS_TRAIN = [64, 256, 2048]
DEV = os.environ.get("QFT_BENCH_DEVICE", "cuda")  # 'cpu' + TRITON_INTERPRET=1: a smoke test of this script


def gbench(fns, calls=20):
    """bench_kernels.gbench with a shorter measurement (warm-up 10 ms, 40 ms of replays)."""
    from triton.testing import do_bench
    if DEV != "cuda":
        return BK.gbench(fns, calls)
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return do_bench(g.replay, warmup=10, rep=40, return_mode="median") * 1e3 / calls


def _rows(say, shape, m, t_ref, variants, ref, label):
    res = []
    for name, fns in variants:
        try:
            out = fns[0]()
            err = BK.rel(out, ref)
            t = gbench(fns)
        except Exception as e:  # a candidate that fails to compile / run is reported, not fatal
            say(f"| {shape} | {m} | {label} | {name} | failed: {type(e).__name__}: {str(e)[:100]} | | |")
            continue
        res.append((t, name, err))
    for t, name, err in sorted(res):
        say(f"| {shape} | {m} | {label} | {name} | {t:.1f} | {t_ref / t:.2f} | {err:.1e} |")
    return res


def section_train(args=None, ceiling=None):
    from qft.kernels import wq_gemm_tc as T, wq_gemm_tc2 as T2, wq_triton as W

    say = BK.say
    say("\n## W4A16 g128 for M >= 64 and the qlora backward: every path (graph timing, weight copies rotated)\n")
    say("`x ref` = cuBLAS bf16 time / this time (forward: F.linear on the dense weight; backward: dY @ W dense).\n")
    say("| K x N | M | pass | path | us | x ref | rel err |")
    say("|---|---|---|---|---|---|---|")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    summary = []
    deq_rows = []
    for (k, n) in BK.SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        qw, s, z = R.quantize_rtn(w, 4, 128)
        s = s.to(torch.bfloat16)
        wd = R.dequant(qw, s, z, 4, 128, k, torch.float32)
        wbytes = qw.numel() * 4 + s.numel() * 2 * 2
        cq = BK.copies_for(wbytes)
        cb = BK.copies_for(n * k * 2)
        ps = [W.prepare(qw if i == 0 else qw.clone(), s, z, 4, 128, k, torch.bfloat16, sliced=True) for i in range(cq)]
        dense = [wd.to(torch.bfloat16)] + [wd.to(torch.bfloat16) for _ in range(cb - 1)]
        # dequantization kernels
        ref_w = W.dequant(ps[0], torch.bfloat16)
        dvars = [("dequant (fp32 FMA, BN 32)", [lambda p=p: W.dequant(p, torch.bfloat16) for p in ps])]
        for cfg in [(32, 128, 4), (64, 128, 4), (64, 256, 8)]:
            dvars.append((f"dequant16 {cfg}", [lambda p=p, c=cfg: T.dequant(p.qweight, p.scales, p.zeros, 4, 128, k,
                                                                            torch.bfloat16, bn=c[0], bk=c[1],
                                                                            num_warps=c[2]) for p in ps]))
        for name, fns in dvars:
            try:
                out = fns[0]()
                exact = torch.equal(out, ref_w)
                t = gbench(fns)
                gbs = (wbytes + n * k * 2) / (t * 1e-6) / 1e9
                deq_rows.append(f"| {k}x{n} | {name} | {t:.1f} | {gbs:.0f} | {'yes' if exact else 'NO'} |")
            except Exception as e:
                deq_rows.append(f"| {k}x{n} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | |")
        for m in MS_TRAIN:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ref = x.float() @ wd.t()
            t_bf = gbench([lambda d=d: F.linear(x, d) for d in dense])
            say(f"| {k}x{n} | {m} | fwd | cuBLAS bf16 | {t_bf:.1f} | 1.00 | |")
            var = [("deq+cuBLAS", [lambda p=p: F.linear(x, W.dequant(p, x.dtype)) for p in ps]),
                   ("gemm (canonical fused)", [lambda p=p: W.gemm(x, p) for p in ps])]
            for key in [("tc",) + c for c in T.configs_for(m)] + [("tc2",) + c for c in T2.configs_for(m)]:
                var.append((" ".join(map(str, key)), [lambda p=p, kk=key: W.run_path(kk, x, p) for p in ps]))
            if m <= W.SLICED_MMA_MAX_M:  # the K-sliced kernel that won at M = 16 (BENCHMARKS.md)
                var.append(("sliced ('mma8', 64, 4, 4)", [lambda p=p: dict(W._sliced_candidates(x, p, None, sms))[
                    ("mma8", 64, 4, 4)]() for p in ps]))
            W.linear(x, ps[0])  # the dispatcher's one-time choice
            var.append(("qlinear (dispatch)", [lambda p=p: W.linear(x, p) for p in ps]))
            res = _rows(say, f"{k}x{n}", m, t_bf, var, ref, "fwd")
            bucket = 1 << (m - 1).bit_length()
            choice = W._CHOICE.get((bucket, n, k, 4, 128, torch.bfloat16, x.device)) if m > 64 else \
                W._SLICED_CFG.get((bucket, n, k, 4, 128, torch.bfloat16, x.device))
            best = min(res) if res else (float("nan"), "-", 0)
            disp = next((r for r in res if r[1] == "qlinear (dispatch)"), (float("nan"),))
            deq = next((r for r in res if r[1] == "deq+cuBLAS"), (float("nan"),))
            # backward
            gy = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
            gref = gy.float() @ wd
            t_gb = gbench([lambda d=d: torch.mm(gy, d) for d in dense])
            say(f"| {k}x{n} | {m} | bwd | cuBLAS bf16 | {t_gb:.1f} | 1.00 | |")
            W.grad_input(gy, ps[0])
            bvar = [("fused (grad_input_fused)", [lambda p=p: W.grad_input_fused(gy, p) for p in ps]),
                    ("deq+cuBLAS (grad_input_deq)", [lambda p=p: W.grad_input_deq(gy, p) for p in ps])]
            for c in T.BWD_CONFIGS:
                bvar.append((f"tc bwd {c}", [lambda p=p, c=c: W.run_bwd_path(("tc",) + c, gy, p) for p in ps]))
            bvar.append(("grad_input (dispatch)", [lambda p=p: W.grad_input(gy, p) for p in ps]))
            bres = _rows(say, f"{k}x{n}", m, t_gb, bvar, gref, "bwd")
            bdisp = next((r for r in bres if r[1] == "grad_input (dispatch)"), (float("nan"),))
            bchoice = W._BWD_CHOICE.get((bucket, n, k, 4, 128, torch.bfloat16, x.device))
            summary.append(f"| {k}x{n} | {m} | {t_bf:.1f} | {disp[0]:.1f} | {t_bf / disp[0]:.2f} | {t_bf / deq[0]:.2f} | "
                           f"{best[1]} {t_bf / best[0]:.2f} | {choice} | {t_gb:.1f} | {bdisp[0]:.1f} | "
                           f"{t_gb / bdisp[0]:.2f} | {bchoice} |")
        del ps, dense, w, wd
        torch.cuda.empty_cache()
    say("\n### Dequantization kernels (packed W4 g128 -> dense bf16)\n")
    say("| K x N | kernel | us | GB/s | bit-identical |")
    say("|---|---|---|---|---|")
    for r in deq_rows:
        say(r)
    if ceiling:
        say(f"\ncopy ceiling (device-to-device, read+write): {ceiling:.0f} GB/s")
    say("\n### Summary: W4 g128, dispatcher vs cuBLAS bf16 (forward and qlora backward)\n")
    say("| K x N | M | cuBLAS us | qft us | x cuBLAS | deq+cuBLAS x | best path x | chosen | bwd cuBLAS us | "
        "bwd qft us | x cuBLAS | bwd chosen |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        say(r)
    if W.FAILED:
        say("\ncandidates that failed: " + "; ".join(f"{k}: {v}" for k, v in W.FAILED.items()))


if __name__ == "__main__":
    os.environ.setdefault("QFT_KERNELS", "triton")
    section_train(None, BK.copy_bandwidth())
