"""qft.kernels on one GPU: every kernel beside its peers in one run.

    python benchmarks/bench_kernels.py [--sections w4,lowbit,int8,kv,e2e,sweep] [--out DIR]

Protocol: random weights / inputs (never zeros); each timing is the median of
``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, warm-up 25 ms,
100 ms of repetitions); all peers timed in the same process on the same inputs. Peers: cuBLAS
bf16 (``F.linear``), torch's int4 tinygemm (``torch._weight_int4pack_mm``, g128), bitsandbytes
nf4 (if importable). GB/s counts the bytes each method must move (packed weight + scales/zeros
+ activations in + out); the copy ceiling is measured in the same run. Tables are printed and
written to DIR/bench_kernels.md (default: $OUT or ./out).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import qft.kernels as K
from qft.kernels import reference as R

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # (K, N)
MS = [1, 16, 64, 256, 2048]
LINES: list[str] = []


def say(s=""):
    print(s, flush=True)
    LINES.append(s)


def bench(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def gbench(fns, calls=20):
    """Per-call time (us) of a CUDA graph replaying ``calls`` calls round-robin over ``fns``
    (closures over distinct copies of the data, so repeated calls do not hit L2). No CPU launch
    overhead: what a decode step captured in a graph pays. Falls back to eager do_bench."""
    try:
        for f in fns:
            f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fns[i % len(fns)]()
        return bench(g.replay) / calls
    except Exception as e:  # not capturable
        print(f"graph capture failed ({type(e).__name__}: {e}); eager timing", file=sys.stderr)
        return bench(fns[0])


def copies_for(nbytes, budget=200e6, cap=8):
    return int(min(cap, max(1, math.ceil(budget / max(nbytes, 1)))))


def copy_bandwidth():
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return 2 * a.numel() * 2 / (t * 1e-6) / 1e9


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def tinygemm_setup(w, gs=128):
    """torch's int4 tinygemm (what torchao int4 weight-only uses): returns a callable or a reason."""
    try:
        n, k = w.shape
        wg = w.float().reshape(n, k // gs, gs)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-6)
        u = torch.round((wg - lo.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15).to(torch.int32).reshape(n, k)
        # tinygemm dequant: (u - 8) * s + zero, with zero = lo + 8 s
        packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
        sz = torch.stack([s, lo + 8 * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        wdeq = ((u.reshape(n, k // gs, gs).float() - 8) * s.unsqueeze(-1) + (lo + 8 * s).unsqueeze(-1)).reshape(n, k)

        def f(x):
            return torch._weight_int4pack_mm(x, wp, gs, sz)
        x = torch.randn(3, k, device=w.device, dtype=torch.bfloat16)
        err = rel(f(x), x.float() @ wdeq.t())
        if err > 2e-2:
            return None, f"tinygemm check failed (rel err {err:.3g})"
        return f, None
    except Exception as e:  # API differs between torch versions
        return None, f"tinygemm unavailable: {type(e).__name__}: {str(e)[:120]}"


def bnb_setup(w):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception as e:
        return None, f"bitsandbytes not importable ({type(e).__name__})"
    try:
        qw, state = bf.quantize_4bit(w.to(torch.bfloat16), quant_type="nf4", blocksize=64)

        def f(x):
            return bnb.matmul_4bit(x, qw.t(), quant_state=state)
        f(torch.randn(1, w.shape[1], device=w.device, dtype=torch.bfloat16))
        return f, None
    except Exception as e:
        return None, f"bnb failed: {type(e).__name__}: {str(e)[:120]}"


# ------------------------------------------------------------------------------------------------
def section_w4(args, ceiling):
    from qft.kernels import wq_triton as W

    say("\n## W4A16 (g128, asymmetric integer zeros) vs peers, bf16 activations\n")
    say("Timing: CUDA graph of 20 calls rotating over weight copies (> 200 MB in all, so L2 holds none),"
        " L2 flushed before each replay, median; `eager` = same qft call timed without a graph (includes"
        " Python + launch overhead).\n")
    say("| K x N | M | cuBLAS bf16 us | qft W4 us | x bf16 | GB/s | qft eager us | tinygemm us | x bf16 | bnb nf4 us | x bf16 | qft path |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = set()
    for (k, n) in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, s, z = R.quantize_rtn(w, 4, 128)
        s = s.to(torch.bfloat16)
        wbytes = qw.numel() * 4 + s.numel() * 2 * 2
        cb = copies_for(n * k * 2)
        cq = copies_for(wbytes)
        ws = [w] + [w.clone() for _ in range(cb - 1)]
        qs = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(cq - 1)]
        tgs, bns = [], []
        for i in range(min(cq, 4)):
            tg, why = tinygemm_setup(ws[i % cb])
            if why:
                notes.add(why)
                break
            tgs.append(tg)
        for i in range(min(cq, 4)):
            bn, why = bnb_setup(ws[i % cb])
            if why:
                notes.add(why)
                break
            bns.append(bn)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.qlinear(x.float(), qw, s, z, 4, 128, k)
            y = K.qlinear(x, qw, s, z, 4, 128, k)
            err = rel(y, ref)
            if err > 1e-2:
                say(f"!! W4 mismatch K={k} N={n} M={m}: rel err {err:.3g}")
            t_bf = gbench([lambda wi=wi: F.linear(x, wi) for wi in ws])
            t_q = gbench([lambda t=t: K.qlinear(x, t[0], t[1], t[2], 4, 128, k) for t in qs])
            t_e = bench(lambda: K.qlinear(x, qw, s, z, 4, 128, k))
            bucket = 1 << (m - 1).bit_length()
            ch = W._CHOICE.get((bucket, n, k, 4, 128, torch.bfloat16, x.device), "gemm")
            path = "gemv" if m <= W.GEMV_MAX_M else ("deq+cuBLAS" if ch == "deq" else "gemm")
            sl = W._SLICED_CFG.get((m if m <= W.SLICED_GEMV_MAX_M else bucket, n, k, 4, 128, torch.bfloat16, x.device))
            if sl is not None and sl != "canonical":
                path = "sliced " + "/".join(map(str, sl))
            elif sl == "canonical":
                path = "canonical " + path
            t_tg = gbench([lambda f=f: f(x) for f in tgs]) if tgs else float("nan")
            t_bnb = gbench([lambda f=f: f(x) for f in bns]) if bns else float("nan")
            gbs = (wbytes + m * (k + n) * 2) / (t_q * 1e-6) / 1e9
            say(f"| {k}x{n} | {m} | {t_bf:.1f} | {t_q:.1f} | {t_bf / t_q:.2f} | {gbs:.0f} | {t_e:.1f} | {t_tg:.1f} | "
                f"{t_bf / t_tg:.2f} | {t_bnb:.1f} | {t_bf / t_bnb:.2f} | {path} |")
        del w, ws, qs, tgs, bns
        torch.cuda.empty_cache()
    say(f"\ncopy ceiling (device-to-device, read+write): {ceiling:.0f} GB/s")
    for nt in sorted(notes):
        say(f"note: {nt}")


def section_lowbit(args):
    say("\n## Other weight formats at M=1 (and M=16), 8192x28672\n")
    say("| format | M | cuBLAS bf16 us | qft us | x bf16 | GB/s | rel err |")
    say("|---|---|---|---|---|---|---|")
    k, n = 8192, 28672
    torch.manual_seed(1)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t_bf = gbench([lambda: F.linear(x, w)])
        for bits, gs, name in ((2, 128, "W2 g128"), (3, 128, "W3 g128 (4-bit container)"), (8, 128, "W8 g128"),
                               (4, None, "W4 per-channel"), (4, 32, "W4 g32")):
            qw, s, z = R.quantize_rtn(w, bits, gs)
            s = s.to(torch.bfloat16)
            err = rel(K.qlinear(x, qw, s, z, bits, gs, k), R.qlinear(x.float(), qw, s, z, bits, gs or k, k))
            cp = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(copies_for(qw.numel() * 4) - 1)]
            t = gbench([lambda c=c: K.qlinear(x, c[0], c[1], c[2], bits, gs, k) for c in cp])
            del cp
            cb = 4 if bits == 3 else bits
            byts = n * k * cb / 8 + s.numel() * 4 + m * (k + n) * 2
            say(f"| {name} | {m} | {t_bf:.1f} | {t:.1f} | {t_bf / t:.2f} | {byts / (t * 1e-6) / 1e9:.0f} | {err:.1e} |")
        ps = R.pack_signs(w)
        g = torch.rand(k, device="cuda") + 0.5
        h = torch.rand(n, device="cuda") * 0.02
        err = rel(K.onebit_linear(x, ps, g, h, k), R.onebit_linear(x.float(), ps, g, h, k))
        pcs = [ps] + [ps.clone() for _ in range(copies_for(ps.numel() * 4) - 1)]
        t = gbench([lambda p_=p_: K.onebit_linear(x, p_, g, h, k) for p_ in pcs])
        byts = ps.numel() * 4 + (k + n) * 4 + m * (k + n) * 2
        say(f"| W1 OneBit | {m} | {t_bf:.1f} | {t:.1f} | {t_bf / t:.2f} | {byts / (t * 1e-6) / 1e9:.0f} | {err:.1e} |")


def section_int8(args):
    say("\n## W8A8 (per-token dynamic int8 activations, per-channel int8 weights)\n")
    say("| K x N | M | cuBLAS bf16 us | qft W8A8 us | x bf16 | act-quant us | torch._int_mm us | rel err |")
    say("|---|---|---|---|---|---|---|---|")
    from qft.kernels import int8_triton
    for (k, n) in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = R.quantize_weight_int8(w)
        for m in (1024, 2048, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err = rel(K.int8_linear(x, wq, ws), R.int8_linear(x.float(), wq, ws))
            t_bf = bench(lambda: F.linear(x, w))
            t = bench(lambda: K.int8_linear(x, wq, ws))
            t_aq = bench(lambda: int8_triton.quantize_rows(x))
            xq, _ = int8_triton.quantize_rows(x)
            wt = wq.t()
            try:
                t_im = bench(lambda: torch._int_mm(xq, wt))
            except Exception:
                t_im = float("nan")
            say(f"| {k}x{n} | {m} | {t_bf:.1f} | {t:.1f} | {t_bf / t:.2f} | {t_aq:.1f} | {t_im:.1f} | {err:.1e} |")


def section_kv(args):
    say("\n## KIVI decode attention (B=1, 32 heads, head_dim 128, group 32, window 128) vs bf16 SDPA\n")
    say("| context | bf16 SDPA us | KV4 us | x | KV2 us | x | KV2 rel err vs ref | append (quantize 128 tok) us |")
    say("|---|---|---|---|---|---|---|---|")
    b, h, d = 1, 32, 128
    for t in (4096, 16384, 32768):
        torch.manual_seed(t)
        k = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
        t_sdpa = gbench([lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v)])
        res = {}
        for bits in (4, 2):
            caches = []
            for _ in range(4 if t <= 16384 else 2):
                cache = K.KiviCache(b, h, d, t + 128, bits=bits, group=32, residual=128, device="cuda")
                cache.append(k, v)
                caches.append(cache)
            tens = cache.tensors()
            out = cache.attention(q)
            err = rel(out, R.kv_decode_attention(q.float(), *tens, bits, 32))
            res[bits] = (gbench([lambda c=c: c.attention(q) for c in caches]), err)
            del caches
            kb, vb = k[:, :, :128].contiguous(), v[:, :, :128].contiguous()
            t_app = bench(lambda: K.kv_quantize_into(kb, vb, cache.kq, cache.k_scale, cache.k_min, cache.vq,
                                                     cache.v_scale, cache.v_min, 0, bits, 32))
        say(f"| {t} | {t_sdpa:.1f} | {res[4][0]:.1f} | {t_sdpa / res[4][0]:.2f} | {res[2][0]:.1f} | "
            f"{t_sdpa / res[2][0]:.2f} | {res[2][1]:.1e} | {t_app:.1f} |")


def section_sweep(args):
    """Config sweep for the weight-only kernels on the target shapes (sets the heuristics)."""
    from qft.kernels import wq_triton as W
    say("\n## sweep (W4 g128, graph timing with weight copies)\n")
    for (k, n) in [(8192, 28672)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, s, z = R.quantize_rtn(w, 4, 128)
        ps = [W.prepare(qw.clone(), s, z, 4, 128, k, torch.bfloat16) for _ in range(copies_for(qw.numel() * 4))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        t_bf = gbench([lambda: F.linear(x, w)])
        rows = []
        for bn in (8, 16, 32):
            for nw in (1, 2):
                for sk in (1, 2, 4):
                    try:
                        t = gbench([lambda p=p: W.gemv(x, p, bn=bn, num_warps=nw, split_k=sk) for p in ps])
                    except Exception as e:
                        t = float("inf")
                    rows.append((t, f"gemv bn={bn} nw={nw} sk={sk}"))
        rows.sort()
        say(f"K={k} N={n} M=1 bf16 {t_bf:.1f} us; default {gbench([lambda p=p: W.gemv(x, p) for p in ps]):.1f}; best: "
            + "; ".join(f"{r} {t:.1f}" for t, r in rows[:6]))
        for m in (16,):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf = gbench([lambda: F.linear(x, w)])
            rows = []
            for bn in (64, 128):
                for nw in (4,):
                    for ns in (3, 4):
                        for sk in (None, 1, 4):
                            try:
                                t = gbench([lambda p=p: W.gemm(x, p, bn=bn, num_warps=nw, num_stages=ns, split_k=sk)
                                            for p in ps])
                            except Exception:
                                t = float("inf")
                            rows.append((t, f"gemm bn={bn} nw={nw} ns={ns} sk={sk}"))
            rows.sort()
            say(f"K={k} N={n} M={m} bf16 {t_bf:.1f} us; default {gbench([lambda p=p: W.gemm(x, p) for p in ps]):.1f}; "
                "best: " + "; ".join(f"{r} {t:.1f}" for t, r in rows[:4]))
        del w, qw, ps


def section_quick(args):
    """A short re-check: W4 g128 M=1/16 on the two target shapes and KV2/KV4 at 16K."""
    say("\n## quick re-check (graph timing)\n")
    say("| case | bf16 us | qft us | x bf16 | tinygemm us | x bf16 |")
    say("|---|---|---|---|---|---|")
    for (k, n) in [(8192, 28672), (4096, 11008)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, s, z = R.quantize_rtn(w, 4, 128)
        s = s.to(torch.bfloat16)
        cq = copies_for(qw.numel() * 4)
        qs = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(cq - 1)]
        ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        tg, _ = tinygemm_setup(w)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err = rel(K.qlinear(x, qw, s, z, 4, 128, k), R.qlinear(x.float(), qw, s, z, 4, 128, k))
            t_bf = gbench([lambda wi=wi: F.linear(x, wi) for wi in ws])
            t_q = gbench([lambda t=t: K.qlinear(x, t[0], t[1], t[2], 4, 128, k) for t in qs])
            t_tg = gbench([lambda: tg(x)]) if tg else float("nan")
            say(f"| W4 g128 {k}x{n} M={m} (err {err:.1e}) | {t_bf:.1f} | {t_q:.1f} | {t_bf / t_q:.2f} | {t_tg:.1f} | "
                f"{t_bf / t_tg:.2f} |")
        del w, ws, qs
    from qft.kernels import wq_triton as W
    say(f"tuned GEMV configs: {W._GEMV_CFG}")
    b, h, d, t = 1, 32, 128, 16384
    k_ = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    v_ = torch.randn_like(k_)
    q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
    t_sdpa = gbench([lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k_, v_)])
    for bits in (4, 2):
        caches = []
        for _ in range(4):
            c = K.KiviCache(b, h, d, t + 128, bits=bits, group=32, residual=128, device="cuda")
            c.append(k_, v_)
            caches.append(c)
        err = rel(caches[0].attention(q), R.kv_decode_attention(q.float(), *caches[0].tensors(), bits, 32))
        t_kv = gbench([lambda c=c: c.attention(q) for c in caches])
        say(f"| KV{bits} decode 16K (err {err:.1e}) | {t_sdpa:.1f} (SDPA) | {t_kv:.1f} | {t_sdpa / t_kv:.2f} | | |")


def section_fast(args):
    """K-sliced kernels (wq_sliced) against the canonical ones, cuBLAS bf16 and tinygemm, per config."""
    from qft.kernels import wq_triton as W, wq_sliced as S
    say("\n## K-sliced weight-only kernels (graph timing, weight copies rotated)\n")
    say("| case | M | cuBLAS bf16 us | variant | us | x bf16 | GB/s | rel err |")
    say("|---|---|---|---|---|---|---|---|")
    sms = W._num_sms(torch.device("cuda"))
    for (k, n, bits, gs) in [(8192, 28672, 4, 128), (4096, 11008, 4, 128), (8192, 28672, 2, 128)]:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, sc, z = R.quantize_rtn(w, bits, gs)
        sc = sc.to(torch.bfloat16)
        wbytes = qw.numel() * 4 + sc.numel() * 4
        ps = [W.prepare(qw if i == 0 else qw.clone(), sc, z, bits, gs, k, torch.bfloat16)
              for i in range(copies_for(wbytes, cap=6))]
        ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        tg = None
        if bits == 4:
            tg, _ = tinygemm_setup(w)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.qlinear(x.float(), qw, sc, z, bits, gs, k)
            t_bf = gbench([lambda wi=wi: F.linear(x, wi) for wi in ws])
            var = {"canonical (previous kernels)": lambda p: W.linear(x, p, sliced=False)}
            for cfg, _ in W._sliced_candidates(x, ps[0], None, sms):
                var["sliced " + " ".join(map(str, cfg))] = (
                    lambda p, cfg=cfg: dict(W._sliced_candidates(x, p, None, sms))[cfg]())
            var["qlinear (dispatch)"] = lambda p: W.linear(x, p)
            rows = []
            for name, fn in var.items():
                try:
                    err = rel(fn(ps[0]), ref)
                    t = gbench([lambda p=p: fn(p) for p in ps])
                except Exception as e:
                    say(f"| {k}x{n} W{bits} | {m} | {t_bf:.1f} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                    continue
                rows.append((t, name, err))
            say(f"chosen for {k}x{n} W{bits} M={m}: {W._SLICED_CFG.get((m if m <= 4 else 16, n, k, bits, gs, torch.bfloat16, x.device))}")
            if tg is not None:
                rows.append((gbench([lambda: tg(x)]), "tinygemm", float("nan")))
            for t, name, err in sorted(rows):
                gbs = (wbytes + m * (k + n) * 2) / (t * 1e-6) / 1e9
                bad = " !!" if err > 1e-2 else ""
                say(f"| {k}x{n} W{bits} g{gs} | {m} | {t_bf:.1f} | {name} | {t:.1f} | {t_bf / t:.2f} | {gbs:.0f} | {err:.1e}{bad} |")
        del w, ws, ps
        torch.cuda.empty_cache()
    # OneBit at M=1
    k, n = 8192, 28672
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    psg = R.pack_signs(w)
    g = torch.rand(k, device="cuda") + 0.5
    h = torch.rand(n, device="cuda") * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t_bf = gbench([lambda: F.linear(x, w)])
    err = rel(K.onebit_linear(x, psg, g, h, k), R.onebit_linear(x.float(), psg, g, h, k))
    pcs = [psg] + [psg.clone() for _ in range(copies_for(psg.numel() * 4) - 1)]
    t = gbench([lambda p_=p_: K.onebit_linear(x, p_, g, h, k) for p_ in pcs])
    say(f"| {k}x{n} OneBit | 1 | {t_bf:.1f} | onebit_linear (sliced gemv) | {t:.1f} | {t_bf / t:.2f} | "
        f"{(psg.numel() * 4) / (t * 1e-6) / 1e9:.0f} | {err:.1e} |")


def section_e2e(args):
    """Greedy decode, Llama-7B-shaped (random weights), batch 1, CUDA graph per step."""
    say("\n## End-to-end greedy decode, Llama-7B-shaped random weights, batch 1\n")
    L, H, D, FF, V = args.layers, 4096, 128, 11008, 32000
    nh = H // D
    ctx = 512
    torch.manual_seed(0)
    dev = "cuda"

    def lin(o, i):
        return torch.randn(o, i, device=dev, dtype=torch.bfloat16) * (i ** -0.5)

    layers = []
    for _ in range(L):
        layers.append({"qkv": lin(3 * H, H), "o": lin(H, H), "gu": lin(2 * FF, H), "down": lin(H, FF)})
    emb = torch.randn(V, H, device=dev, dtype=torch.bfloat16)
    head = lin(V, H)
    kc = torch.randn(L, 1, nh, ctx, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    qlayers = []
    for lw in layers:
        d = {}
        for name, wt in lw.items():
            qw, s, z = R.quantize_rtn(wt, 4, 128)
            d[name] = (qw, s.to(torch.bfloat16), z, wt.shape[1])
        qlayers.append(d)

    def rms(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def step(tok, pos, quant):
        x = emb[tok]  # [1, H]
        for i in range(L):
            if quant:
                def mm(t, name):
                    qw, s, z, kk = qlayers[i][name]
                    return K.qlinear(t, qw, s, z, 4, 128, kk)
            else:
                def mm(t, name):
                    return F.linear(t, layers[i][name])
            hcur = rms(x)
            q, k, v = mm(hcur, "qkv").view(3, 1, nh, 1, D).unbind(0)
            kc[i, :, :, pos:pos + 1] = k
            vc[i, :, :, pos:pos + 1] = v
            a = F.scaled_dot_product_attention(q, kc[i], vc[i])  # full static cache (simplification)
            x = x + mm(a.reshape(1, H), "o")
            gu = mm(rms(x), "gu")
            g_, u_ = gu.chunk(2, dim=-1)
            x = x + mm(F.silu(g_) * u_, "down")
        return F.linear(rms(x), head).argmax(-1)

    res = {}
    for quant in (False, True):
        tok = torch.zeros(1, dtype=torch.long, device=dev)
        step(tok, ctx - 1, quant)  # warm-up (compiles, prepares)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nxt = step(tok, ctx - 1, quant)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        n_tok = 50
        t0 = time.perf_counter()
        for _ in range(n_tok):
            g.replay()
            tok.copy_(nxt)
        torch.cuda.synchronize()
        res[quant] = n_tok / (time.perf_counter() - t0)
    wb = sum(t.numel() for lw in layers for t in lw.values()) * 2
    say(f"{L} layers (hidden 4096, MLP 11008, vocab 32000, context {ctx}, bf16 KV/SDPA, no RoPE), CUDA graph per token")
    say("| model | tokens/s | x bf16 |")
    say("|---|---|---|")
    say(f"| bf16 (cuBLAS) | {res[False]:.1f} | 1.00 |")
    say(f"| W4A16 g128 (qft) | {res[True]:.1f} | {res[True] / res[False]:.2f} |")
    say(f"(layer weights {wb / 1e9:.1f} GB in bf16)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="w4,lowbit,int8,kv,e2e")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--paths", action="store_true", help="also time each W4 path for M >= 16")
    args = ap.parse_args()
    os.environ.setdefault("QFT_KERNELS", "triton")
    os.makedirs(args.out, exist_ok=True)
    prop = torch.cuda.get_device_properties(0)
    import triton
    say(f"# qft.kernels benchmark\n\n{prop.name}, {prop.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(f"command: python benchmarks/bench_kernels.py --sections {args.sections}")
    ceiling = copy_bandwidth()
    secs = args.sections.split(",")
    fns = {"w4": lambda: section_w4(args, ceiling), "lowbit": lambda: section_lowbit(args),
           "int8": lambda: section_int8(args), "kv": lambda: section_kv(args), "e2e": lambda: section_e2e(args),
           "sweep": lambda: section_sweep(args), "quick": lambda: section_quick(args),
           "fast": lambda: section_fast(args),
           "train": lambda: __import__("bench_kernels_train").section_train(args, ceiling)}
    for sname in secs:
        t0 = time.time()
        try:
            fns[sname]()
        except Exception as e:
            import traceback
            traceback.print_exc()
            say(f"!! section {sname} failed: {type(e).__name__}: {e}")
        print(f"[section {sname}: {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
        with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
