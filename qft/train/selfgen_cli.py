"""`qft selfgen`: the teacher writes its own training data (LLM-QAT) into a resumable JSONL file.

    qft selfgen --model smollm2-135m --n 512 --seq-len 256 --out data/selfgen.jsonl [--batch-size 16] [--seed 0]

Re-running the same command after an interruption continues the file (same data as an
uninterrupted run); a larger --n extends it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

from qft.train.selfgen import SelfGenConfig, SelfGenError

_FLAG_TYPES = {int: int, float: float, str: str, "int": int, "float": float, "str": str}


def add_selfgen_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("selfgen", help="generate LLM-QAT training data from the teacher (resumable JSONL)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="teacher: embedded name, HF id or local directory")
    p.add_argument("--out", required=True, help="output JSONL file (resumed if it exists)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="teacher dtype")
    p.add_argument("--device", default="cpu", help="device of the teacher (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for f in fields(SelfGenConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_FLAG_TYPES[f.type],
                       default=f.default, help=f.metadata["help"] + f" (default: {f.default})")
    p.set_defaults(fn=run_selfgen, func=run_selfgen)
    return p


def run_selfgen(args) -> int:
    import torch

    from qft.models import load_model
    from qft.train.selfgen import read_selfgen, selfgen

    try:
        cfg = SelfGenConfig(**{f.name: getattr(args, f.name) for f in fields(SelfGenConfig)})
    except SelfGenError as e:  # report with the flag spelling
        name = str(e).split("=", 1)[0].replace("SelfGenConfig.", "")
        raise SelfGenError(str(e).replace(f"SelfGenConfig.{name}", "--" + name.replace("_", "-"))) from None
    if args.threads:
        if args.threads < 1:
            raise SelfGenError(f"--threads={args.threads} is not valid; allowed: an integer >= 1")
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    t0 = time.time()
    path = selfgen(model, tok, args.out, cfg, model_id=str(args.model))
    dt = time.time() - t0
    n = len(read_selfgen(path, warn=False))
    print(f"{path}: {n} sequences x {cfg.seq_len} tokens ({dt:.1f} s this run)")
    return 0
