"""Run report of a QAT job: per-layer quantization error and a PNG of the training curves.

* ``layer_errors(teacher, student)``: for every ``QuantLinear`` of the student, the relative weight
  error ``||W_q - W_fp||_F / ||W_fp||_F`` of its effective (dequantized) weight against the
  full-precision teacher's weight of the same name. Measured on the initial student (before
  training) and on the merged model (after), it shows where QAT moved the quantized weights; after
  distillation the error need not shrink (the student compensates, it does not copy), so the plot
  reads beside the loss curves, not instead of them.
* ``write_png(path, log_history, before, after)``: train loss (and eval loss when the run
  evaluated) against the step, and the per-layer error before / after, one PNG (matplotlib, Agg).
  Loss curves also go to tensorboard through the Trainer (``report_to: tensorboard``, default when
  the package is installed; ``<output_dir>/tb``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


@torch.no_grad()
def layer_errors(teacher: torch.nn.Module, student: torch.nn.Module) -> dict[str, float]:
    """{layer name: relative Frobenius error of the student's dequantized weight vs the teacher's}."""
    from qft.nn import quant_linears
    ref = dict(teacher.named_modules())
    out = {}
    for name, q in quant_linears(student):
        t = ref.get(name)
        if t is None or not hasattr(t, "weight"):
            continue
        w = t.weight.detach().float()
        wq = q.dequantize(torch.float32).to(w.device)
        out[name] = float((wq - w).norm() / w.norm().clamp_min(1e-12))
    if "bitsandbytes" in sys.modules:  # the bnb-nf4 baseline's Linear4bit layers
        from qft.train.bnb import nf4_linears, nf4_weight
        for name, q in nf4_linears(student):
            t = ref.get(name.replace(".base_layer", ""))
            if t is not None and hasattr(t, "weight"):
                w = t.weight.detach().float()
                out[name.replace(".base_layer", "")] = float((nf4_weight(q).to(w.device) - w).norm() / w.norm().clamp_min(1e-12))
    return out


def _curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_png(path: str | Path, history: list[dict], before: dict[str, float], after: dict[str, float],
              title: str = "") -> Path | None:
    """Write the report PNG; returns its path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        xs, ys = _curve(history, key)
        if xs:
            ax1.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("distillation loss")
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    ax1.legend()
    names = [n for n in before if n in after] or list(before)
    x = range(len(names))
    ax2.plot(x, [before[n] for n in names], label="before training (init)", lw=1)
    if after:
        ax2.plot(x, [after.get(n, float("nan")) for n in names], label="after training (merged)", lw=1)
    ax2.set_xlabel("quantized layer (model order)")
    ax2.set_ylabel("||W_q - W_fp|| / ||W_fp||")
    ax2.set_title("per-layer weight quantization error")
    ax2.grid(alpha=0.3)
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
