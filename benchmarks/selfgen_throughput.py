"""Self-generation throughput of `qft selfgen` on this machine (tokens/s), a few batch sizes and thread counts.

    python benchmarks/selfgen_throughput.py [--model smollm2-135m] [--n 16] [--seq-len 128]
"""
import argparse
import os
import tempfile
import time

import torch

from qft.models import load_model
from qft.train.selfgen import SelfGenConfig, selfgen

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--n", type=int, default=32)
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--batch-sizes", default="4,16,32")
ap.add_argument("--threads", default="1")
a = ap.parse_args()
model, tok = load_model(a.model)
print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
print("| threads | batch | sequences x tokens | wall s | tokens/s (wall) | CPU s | tokens per CPU-second |")
print("|---|---|---|---|---|---|---|")
for th in map(int, a.threads.split(",")):
    torch.set_num_threads(th)
    for bs in map(int, a.batch_sizes.split(",")):
        with tempfile.TemporaryDirectory() as d:
            t, c = time.time(), time.process_time()
            selfgen(model, tok, os.path.join(d, "s.jsonl"), SelfGenConfig(n=a.n, seq_len=a.seq_len, batch_size=bs),
                    progress=False)
            dt, dc = time.time() - t, time.process_time() - c
        ntok = a.n * a.seq_len
        print(f"| {th} | {bs} | {a.n} x {a.seq_len} | {dt:.1f} | {ntok / dt:.0f} | {dc:.1f} | {ntok / dc:.0f} |",
              flush=True)
