"""CPU cost of the fused lora-in-quantizer function on one SmolLM2 block's 7 linears.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora_quantizer_fn.py [--bits 4] [--group-size 64] [--rank 16]

Forward + backward of ``qft.train.lora._LoraInQuantizerFn`` (y = x Q(W0 + s B A)^T, STE) for the
shapes of one SmolLM2-135M decoder block (q/k/v/o 576-wide, gate/up/down 1536), x = 4 x 128 tokens,
per-group clip ratios as the clipping search leaves them. Prints the median wall time of 5 runs and,
from one run under torch.profiler, the time in GEMMs against everything else (the quantizer's
elementwise work and dispatch), plus the number of aten calls. Run it at two revisions to compare.
"""
import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qft.train.lora import _LoraInQuantizerFn

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--group-size", type=int, default=64)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
layers = []
for n, k in SHAPES:
    clip = torch.rand(n, k // a.group_size) * 0.2 + 0.8
    layers.append((torch.randn(1, a.tokens, k).requires_grad_(), torch.randn(n, k) * 0.02,
                   (torch.randn(a.rank, k) * 0.01).requires_grad_(), (torch.randn(n, a.rank) * 0.01).requires_grad_(),
                   (a.bits, a.group_size, False, clip, clip, None, None)))


def block():
    for x, w0, la, lb, qcfg in layers:
        y = _LoraInQuantizerFn.apply(x, w0, la, lb, None, 2.0, qcfg)
        torch.autograd.grad(y.square().sum(), (x, la, lb))


block()
times = []
for _ in range(5):
    t = time.perf_counter()
    block()
    times.append(time.perf_counter() - t)
with profile(activities=[ProfilerActivity.CPU]) as p:
    block()
ev = p.key_averages()
total = sum(e.self_cpu_time_total for e in ev) / 1e3
gemm = sum(e.self_cpu_time_total for e in ev if e.key in GEMMS) / 1e3
calls = sum(e.count for e in ev if e.key.startswith("aten::"))
print(f"W{a.bits} g{a.group_size} r{a.rank}, {a.tokens} tokens, {a.threads} thread(s): one block's 7 linears fwd+bwd "
      f"{1e3 * statistics.median(times):.1f} ms (median of 5); profiled {total:.1f} ms = GEMMs {gemm:.1f} ms + "
      f"other {total - gemm:.1f} ms; {calls} aten calls")
