"""Step time and peak GPU memory of the LoRA modes on a Llama-7B-shaped stack (random weights).

    python benchmarks/qat_lora_speed.py --layers 32 --tokens 2048 --bits 4 --group-size 128 --grad-ckpt \\
        --modes bf16-lora qlora bnb-nf4

One training step = forward + backward + AdamW step on LoRA (r=16, all linears of the decoder layers)
of a LlamaForCausalLM with hidden 4096, intermediate 11008, 32 heads, vocab 32000, bf16, batch 1 x
``--tokens``. Modes (all peft LoRA over a frozen base, the same adapters and optimizer):

* ``bf16-lora``: nn.Linear bf16 base.
* ``qlora``: packed QuantLinear base (w{bits} g{group}), qft kernels; forward and the input gradient
  dX = dY deq(W) each pick dequantize-then-cuBLAS or a fused kernel by timing once per shape.
* ``qlora-fused-bwd``: as ``qlora`` with the backward forced onto the fused in-loop-dequant kernel
  (the backward before this benchmark's revision; for the before/after).
* ``qlora-custom-op``: as ``qlora`` but every eager call goes through the ``torch.ops.qft.wq_linear``
  custom op (the dispatch before this revision) instead of ``ops._WQLinearEager``.
* ``bnb-nf4``: peft's QLoRA path over bitsandbytes ``Linear4bit`` (nf4, double-quantized absmax,
  blocksize 64, bf16 compute), the linears replaced in place (what ``load_in_4bit`` builds).
* ``lora-in-quantizer``: float bf16 base, Q(W0 + s B A) with STE.

Step time: median of ``--iters`` steps after ``--warmup`` (the dispatcher's one-time timing runs in
the warm-up). Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (statistics reset
after the warm-up, so model building and one-time kernel tuning are not counted); ``model GiB`` is
what is allocated before the first step (weights, packed or not). ``--profile MODE`` prints the
top CUDA kernels of one step of that mode. ``--device cpu`` with small ``--hidden`` etc. is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

MODES = ("bf16-lora", "qlora", "qlora-fused-bwd", "qlora-custom-op", "bnb-nf4", "lora-in-quantizer")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(a, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                      max_position_embeddings=max(4096, a.tokens), use_cache=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly (no fp32 copy of a 7B model)
    try:
        with torch.device(a.device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    m.to(dtype)
    if a.grad_ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def to_bnb_nf4(model):
    """Replace the decoder's nn.Linear layers by bitsandbytes Linear4bit (nf4, double quant, bf16 compute)."""
    import bitsandbytes as bnb
    from torch import nn
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and cname in TARGETS:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                        device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4", blocksize=64, module=new).to(child.weight.device)
                if child.bias is not None:
                    new.bias = child.bias
                setattr(mod, cname, new)
                del child
    model.is_loaded_in_4bit = True
    return model


def make(mode, a):
    from peft import LoraConfig, get_peft_model
    m = build(a)
    if mode in ("bf16-lora", "bnb-nf4"):
        if mode == "bnb-nf4":
            to_bnb_nf4(m)
        for p in m.parameters():
            p.requires_grad_(False)
        return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    from qft.nn import quantize_model
    from qft.spec import QuantSpec
    from qft.train.lora import apply_lora
    spec = QuantSpec(bits=a.bits, group_size=a.group_size)
    quantize_model(m, spec, pack=mode != "lora-in-quantizer")  # pack layer by layer: low build peak
    return apply_lora(m, "lora-in-quantizer" if mode == "lora-in-quantizer" else "qlora", r=16, alpha=32,
                      target_modules=TARGETS)


@contextlib.contextmanager
def mode_overrides(mode):
    from qft.kernels import ops, wq_triton as W
    saved = dict(W.OVERRIDE)
    if mode == "qlora-fused-bwd":
        W.OVERRIDE["grad_input"] = "fused"
    if mode == "qlora-custom-op":
        ops.EAGER_AUTOGRAD = False
    try:
        yield
    finally:
        W.OVERRIDE.clear()
        W.OVERRIDE.update(saved)
        ops.EAGER_AUTOGRAD = True


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(mode, a):
    cuda = a.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    with mode_overrides(mode):
        m = make(mode, a)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randint(0, a.vocab, (1, a.tokens), device=a.device)
        model_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")

        def step():
            out = m(input_ids=x, labels=x)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        for _ in range(a.warmup):
            loss = step()
        _sync(a.device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.iters):
            _sync(a.device)
            t0 = time.perf_counter()
            step()
            _sync(a.device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        if cuda and mode in (a.profile or []):
            try:
                profile(step, a.profile_rows, mode)
            except Exception as e:  # the profiler is a diagnostic: never lose the timing for it
                print(f"(profile failed: {type(e).__name__}: {e})")
        del m, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times) * 1000, peak, model_gib


def profile(step, rows, mode):
    """One step under torch.profiler: CUDA kernel time (kernel events only) against the wall time,
    so a CPU-bound step shows (kernel time well under the step time), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile as prof
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    ev = [e for e in p.key_averages() if e.device_type.name == "CUDA"]
    tot = sum(e.self_device_time_total for e in ev) / 1e3
    print(f"\nprofile {mode}: {tot:.1f} ms of CUDA kernels in a {wall:.1f} ms step (under the profiler); top {rows}")
    print("| kernel | calls | ms | % |")
    print("|---|---|---|---|")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:rows]:
        t = e.self_device_time_total / 1e3
        print(f"| {e.key[:80]} | {e.count} | {t:.2f} | {100 * t / max(tot, 1e-9):.1f} |")
    print()


def check(a):
    bad = [md for md in a.modes if md not in MODES]
    if bad:
        raise SystemExit(f"--modes {bad} not valid; allowed: {', '.join(MODES)}")
    for k in ("layers", "tokens", "hidden", "intermediate", "heads", "vocab", "iters"):
        if getattr(a, k) < 1:
            raise SystemExit(f"--{k}={getattr(a, k)} is not valid; allowed: a positive integer")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu for a smoke test")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (every mode)")
    ap.add_argument("--modes", nargs="*", default=["bf16-lora", "qlora", "bnb-nf4"], help=f"of {MODES}")
    ap.add_argument("--profile", nargs="*", default=None, help="print the top CUDA kernels of one step of these modes")
    ap.add_argument("--profile-rows", type=int, default=8)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    check(a)
    from qft import kernels
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"{dev}, {a.layers} Llama-7B-shaped layers (hidden {a.hidden}, inter {a.intermediate}), {a.tokens} "
          f"tokens/step, w{a.bits}g{a.group_size}, grad ckpt {'on' if a.grad_ckpt else 'off'}, kernels backend "
          f"{kernels.backend(torch.device(a.device))}, torch {torch.__version__}")
    print("| mode | step ms | x bf16-lora | peak GiB | x bf16-lora | model GiB |")
    print("|---|---|---|---|---|---|", flush=True)
    base = None
    rows = []
    for mode in a.modes:
        try:
            ms, gib, model_gib = bench(mode, a)
        except Exception as e:  # report and continue with the other modes
            print(f"| {mode} | failed: {type(e).__name__}: {str(e)[:160]} | | | | |", flush=True)
            gc.collect()
            continue
        if mode == "bf16-lora":
            base = (ms, gib)
        rows.append((mode, ms, gib, model_gib))
        b = base or (ms, gib)
        print(f"| {mode} | {ms:.1f} | {ms / b[0]:.2f} | {gib:.2f} | {gib / b[1]:.2f} | {model_gib:.2f} |", flush=True)
    if base is not None and len(rows) > 1:
        bases = [r for r in rows if r[0] == "bf16-lora"]
        b = (statistics.mean(r[1] for r in bases), statistics.mean(r[2] for r in bases))
        print(f"\nratios against bf16-lora (mean of its {len(bases)} run(s) in this process):")
        print("| mode | step ms | x bf16-lora | peak GiB | x bf16-lora | model GiB |")
        print("|---|---|---|---|---|---|")
        for mode, ms, gib, model_gib in rows:
            print(f"| {mode} | {ms:.1f} | {ms / b[0]:.2f} | {gib:.2f} | {gib / b[1]:.2f} | {model_gib:.2f} |")


if __name__ == "__main__":
    main()
