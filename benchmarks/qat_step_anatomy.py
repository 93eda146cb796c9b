"""Anatomy of one SmolLM2 QAT step on a GPU: step time of the LoRA modes side by side, and a profile.

    python benchmarks/qat_step_anatomy.py --random                      # eager, every variant, profile 'fused'
    python benchmarks/qat_step_anatomy.py --random --compile --variants fused plain-lora --profile none
    python benchmarks/qat_step_anatomy.py --device cpu --random --layers 2 --bs 1 --seq 8 --iters 3  # smoke test

One step = teacher forward (no grad) + student forward + CAKLD (g 0.5) + backward + grad clipping +
AdamW (lr 1e-5) on 16 x 256 random tokens under bf16 autocast (CUDA). ``--random``: SmolLM2-135M shapes
with random weights (no model file needed); otherwise the embedded SmolLM2. Variants: ``fused``
(lora-in-quantizer, dynamic qparams: the fused function + Triton fake quant), ``lwc`` (learnable clipping,
plain autograd), ``qlora`` (packed base), ``plain-lora`` (peft LoRA on the float model, no quantizer),
``fwd-only`` / ``teacher-only`` (no backward). W{--bits} g64 asymmetric, r 64 on all linears. Prints the
mean of ``--iters`` timed steps after 2 warm-up steps and the peak memory; for ``--profile`` the
aten call count, the top ops by self GPU (CPU) time, the CUDA kernel count and the summed GPU time.
"""
import argparse
import copy
import time

import torch
from qft.models import load_model
from qft.nn import quantize_model
from qft.spec import QuantSpec
from qft.train.lora import apply_lora
from qft.train.losses import cakld

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--device", default="cuda"); ap.add_argument("--bs", type=int, default=16)
ap.add_argument("--seq", type=int, default=256); ap.add_argument("--iters", type=int, default=8)
ap.add_argument("--variants", nargs="+", default=["fused", "lwc", "qlora", "plain-lora", "fwd-only", "teacher-only"])
ap.add_argument("--profile", default="fused"); ap.add_argument("--compile", action="store_true")
ap.add_argument("--bits", type=int, default=3); ap.add_argument("--random", action="store_true")
ap.add_argument("--layers", type=int, default=30)
a = ap.parse_args()
dev = torch.device(a.device)
if a.random:  # SmolLM2-135M shapes, random weights (no GGUF needed)
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=a.layers, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    teacher = LlamaForCausalLM(cfg).to(dev)
else:
    teacher, tok = load_model("smollm2-135m", device=a.device)
teacher.eval().requires_grad_(False)
ids = torch.randint(0, 49152, (a.bs, a.seq), device=dev)
amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

def student(v):
    m = copy.deepcopy(teacher)
    if v == "plain-lora":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(m, LoraConfig(r=64, lora_alpha=64, target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]))
    quantize_model(m, QuantSpec(bits=a.bits, group_size=64, symmetric=False))
    mode = "qlora" if v == "qlora" else "lora-in-quantizer"
    qp = "lwc" if v == "lwc" else "dynamic"
    return apply_lora(m, mode, 64, 64.0, 0.0, None, qp)

def make_step(v, m, opt):
    def step():
        with amp:
            with torch.no_grad():
                t = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
            if v == "teacher-only":
                return
            if v == "fwd-only":
                with torch.no_grad():
                    m(input_ids=ids, use_cache=False)
                return
            s = m(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = cakld(s, t.to(s.dtype), ids[:, 1:], None, confidence=0.5)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        bool(torch.isfinite(loss.detach()))
    return step

rows = []
for v in a.variants:
    try:
        m = student("fused" if v in ("fwd-only", "teacher-only") else v).to(dev).train()
        if a.compile:
            m = torch.compile(m)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        step = make_step(v, m, opt)
        for _ in range(2): step()
        sync(); t0 = time.perf_counter()
        for _ in range(a.iters): step()
        sync(); dt = (time.perf_counter() - t0) / a.iters
        if v == a.profile:
            from torch.profiler import profile, ProfilerActivity
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as p:
                step(); sync()
            ka = p.key_averages()
            n_ops = sum(e.count for e in ka if e.key.startswith("aten::"))
            print(f"[{v}] aten calls/step {n_ops}")
            sk = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(ka.table(sort_by=sk, row_limit=22, max_name_column_width=40))
            if dev.type == "cuda":
                gpu = sum(e.self_device_time_total for e in ka) / 1e3
                nk = sum(e.count for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA)
                print(f"[{v}] CUDA kernels/step {nk}")
                print(f"[{v}] summed GPU self time {gpu:.1f} ms vs wall {dt*1e3:.1f} ms")
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0
        rows.append((v, dt * 1e3, mem)); print(f"{v:14s} {dt*1e3:8.1f} ms/step  peak {mem:.2f} GiB", flush=True)
        del m, opt, step
        if dev.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    except Exception as e:
        print(f"{v}: FAILED {type(e).__name__}: {e}"[:600], flush=True)
print("\n".join(f"| {v} | {t:.1f} | {m:.2f} |" for v, t, m in rows))
