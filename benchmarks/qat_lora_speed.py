"""Step time and peak GPU memory of the LoRA modes on a Llama-7B-shaped stack (random weights).

    python benchmarks/qat_lora_speed.py --layers 4 --tokens 2048 --bits 4 --group-size 128

One training step = forward + backward + AdamW step on LoRA (r=16, all linears) of a
LlamaForCausalLM with hidden 4096, intermediate 11008, 32 heads, vocab 32000, bf16. Modes:
``bf16-lora`` (peft over nn.Linear), ``qlora`` (packed QuantLinear base, qft kernels),
``lora-in-quantizer`` (float bf16 base, Q(W0 + s B A) with STE). Median of ``--iters`` steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def build(layers, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(dtype)
    return m


def make(mode, a):
    from peft import LoraConfig, get_peft_model
    from qft.nn import quantize_model
    from qft.spec import QuantSpec
    from qft.train.lora import apply_lora
    spec = QuantSpec(bits=a.bits, group_size=a.group_size)
    m = build(a.layers, torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if mode == "bf16-lora":
        for p in m.parameters():
            p.requires_grad_(False)
        return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    quantize_model(m, spec)
    return apply_lora(m, mode, r=16, alpha=32)


def bench(mode, a):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = make(mode, a)
    m.train()
    if a.grad_ckpt:
        m.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, 32000, (1, a.tokens), device="cuda")
    times = []
    for i in range(a.warmup + a.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del m, opt, out
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times) * 1000, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--modes", nargs="*", default=["bf16-lora", "qlora", "lora-in-quantizer"])
    a = ap.parse_args()
    from qft import kernels
    print(f"{torch.cuda.get_device_name()}, {a.layers} Llama-7B-shaped layers, {a.tokens} tokens/step, "
          f"w{a.bits}g{a.group_size}, kernels backend {kernels.backend(torch.device('cuda'))}")
    print("| mode | step ms | x bf16-lora | peak GiB | x bf16-lora |")
    print("|---|---|---|---|---|")
    base = None
    for mode in a.modes:
        try:
            ms, gib = bench(mode, a)
        except Exception as e:  # report and continue with the other modes
            print(f"| {mode} | failed: {type(e).__name__}: {str(e)[:120]} | | | |", flush=True)
            continue
        base = base or (ms, gib)
        print(f"| {mode} | {ms:.1f} | {ms / base[0]:.2f} | {gib:.2f} | {gib / base[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
