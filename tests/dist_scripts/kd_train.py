"""Tiny end-to-end QAT-through-LoRA distillation run, launched by tests/test_distributed.py.

Student: tiny random Llama -> QuantLinear (w3 g32) -> peft LoRA (qft.train.lora.apply_lora);
teacher: the same full-precision tiny Llama. Data: a selfgen JSONL (qft.train.data). Trainer:
qft.train.trainer.DistillTrainer (``--interim-trainer``: a minimal Trainer subclass below with the
same contract, kept to tell a trainer bug from a launcher / DeepSpeed one).

Every rank writes ``<out>/rank<r>.json`` with what the test checks: logged losses, a hash of the
frozen quantized base (all-gathered under ZeRO-3) before and after training, how the teacher's
parameters are partitioned, whether the adapters changed.

    accelerate launch --config_file tests/dist_scripts/zero3.yaml tests/dist_scripts/kd_train.py \
        --data selfgen.jsonl --out runs/z3 --steps 6
    python tests/dist_scripts/kd_train.py --data selfgen.jsonl --out runs/single --per-device-batch 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="selfgen JSONL")
ap.add_argument("--out", required=True)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--per-device-batch", type=int, default=1)
ap.add_argument("--grad-accum", type=int, default=1)
ap.add_argument("--save-steps", type=int, default=0, help="0 = no checkpoints")
ap.add_argument("--resume", default=None, help="checkpoint directory to resume from")
ap.add_argument("--mode", default="lora-in-quantizer", help="qlora | lora-in-quantizer")
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--seq-len", type=int, default=32)
ap.add_argument("--bits", type=int, default=3)
ap.add_argument("--logit-scale", type=float, default=20.0, help="sharpen the random tiny model (peaked teacher)")
ap.add_argument("--patch-lora-gather", action="store_true",
                help="work around lora.py's _gathered() re-gathering parameters ZeRO-3 already fetched")
ap.add_argument("--loss", default="forward_kl", help="qft trainer: distillation loss")
ap.add_argument("--interim-trainer", action="store_true", help="use the minimal Trainer below even if qft's exists")
args = ap.parse_args()

import time  # noqa: E402

T0 = time.time()
if os.environ.get("QFT_DIST_DUMP_AFTER"):  # debugging a hang: print every thread's stack, then exit
    import faulthandler
    faulthandler.dump_traceback_later(float(os.environ["QFT_DIST_DUMP_AFTER"]), exit=True)


def tick(what):
    if os.environ.get("QFT_DIST_TIMING"):
        print(f"[timing rank {os.environ.get('RANK', 0)}] {what}: {time.time() - T0:.1f} s", flush=True)

torch.set_num_threads(1)

from transformers import Trainer, TrainingArguments  # noqa: E402

from qft.nn import quantize_model  # noqa: E402
from qft.testing import tiny_llama, tiny_tokenizer  # noqa: E402
from qft.train.data import DataConfig, build_dataset  # noqa: E402
from qft.train.lora import apply_lora  # noqa: E402
from qft.train.losses import forward_kl  # noqa: E402


def zero3_params(params):
    ps = [p for p in params if hasattr(p, "ds_id")]
    if not ps:
        import contextlib
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(ps, modifier_rank=None)


def frozen_base_hash(model) -> str:
    """sha256 over every frozen tensor of the student (parameters gathered under ZeRO-3, and buffers)."""
    h = hashlib.sha256()
    named = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with zero3_params([p for _, p in named]):
        for n, p in sorted(named, key=lambda x: x[0]):
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for n, b in sorted(model.named_buffers(), key=lambda x: x[0]):
        h.update(n.encode())
        h.update(b.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def fixed_batch_kl(student, teacher, batch) -> float:
    """KL(teacher || student) per token on a fixed batch (every rank runs it: ZeRO-3 gathers in forward)."""
    was = student.training
    student.eval()
    ls = torch.log_softmax(student(input_ids=batch).logits.float(), -1)
    lt = torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)
    student.train(was)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def adapter_norms(model) -> dict:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with zero3_params([p for _, p in named]):
        return {n: float(p.detach().float().norm()) for n, p in named}


class InterimKDTrainer(Trainer):
    """Minimal distillation Trainer (placeholder until qft.train.trainer lands)."""

    def __init__(self, *a, teacher=None, **kw):
        super().__init__(*a, **kw)
        self.teacher = teacher.eval().requires_grad_(False)
        self._teacher_ready = False

    def _prepare_teacher(self):
        if self.is_deepspeed_enabled:
            import copy

            import deepspeed
            cfg = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            stage = cfg.get("zero_optimization", {}).get("stage", 0)
            if stage == 3:  # shard the teacher like the student; no optimizer
                for k in ("optimizer", "scheduler"):
                    cfg.pop(k, None)
                cfg["zero_optimization"].pop("offload_optimizer", None)
                engine, *_ = deepspeed.initialize(model=self.teacher, config=cfg)
                self.teacher = engine.module.eval()
                self.teacher_engine = engine
        self._teacher_ready = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._teacher_ready:
            self._prepare_teacher()
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        out = model(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            t = self.teacher(input_ids=ids, attention_mask=mask).logits
        loss = forward_kl(out.logits[:, :-1], t[:, :-1], labels[:, 1:], num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss


def make_trainer(model, teacher, targs, ds, coll):
    if not args.interim_trainer:
        try:
            from qft.train.args import DistillArgs
            from qft.train.trainer import DistillTrainer
        except ImportError:
            pass
        else:
            return DistillTrainer(model=model, teacher=teacher, distill=DistillArgs(loss=args.loss, confidence=0.5),
                                  args=targs, train_dataset=ds, data_collator=coll), "qft"
    return InterimKDTrainer(model=model, teacher=teacher, args=targs, train_dataset=ds, data_collator=coll), "interim"


def patch_lora_gather():
    import contextlib

    import qft.train.lora as L

    def gathered(*params):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        ps = [p for p in params if p is not None and hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if not ps:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(ps, modifier_rank=None)
    L._gathered = gathered


def main():
    if args.patch_lora_gather:
        patch_lora_gather()
    tick("imports")
    out = Path(args.out)
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(hidden=64, layers=2, seed=0), tiny_llama(hidden=64, layers=2, seed=0)
    for m in (teacher, student):
        m.lm_head.weight.data *= args.logit_scale
    student = quantize_model(student, {"bits": args.bits, "group_size": 32})
    model = apply_lora(student, mode=args.mode, r=4, alpha=8)
    ds, coll = build_dataset(DataConfig(sources=[{"type": "selfgen", "path": args.data}], seq_len=args.seq_len,
                                        shuffle=False), tok)
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_steps=args.save_steps or 10 ** 9, save_strategy="steps" if args.save_steps else "no",
        report_to=[], seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, save_only_model=False, weight_decay=0.0)
    trainer, kind = make_trainer(model, teacher, targs, ds, coll)
    rank = trainer.args.process_index
    tick("trainer built")
    before = frozen_base_hash(model)
    probe = torch.stack([ds[i]["input_ids"] for i in range(4)])
    kl_before = fixed_batch_kl(model, teacher, probe)
    init_norms = adapter_norms(model)
    tick("before train")
    trainer.train(resume_from_checkpoint=args.resume)
    tick("trained")
    m = trainer.model_wrapped.module if hasattr(trainer.model_wrapped, "module") else trainer.model
    after = frozen_base_hash(m)
    norms = adapter_norms(m)
    teacher_params = list(trainer.teacher.parameters())
    kl_after = fixed_batch_kl(m, trainer.teacher, probe)
    rec = {
        "trainer": kind,
        "world_size": trainer.args.world_size,
        "rank": rank,
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "steps": [h["step"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
        "kl_before": kl_before,
        "kl_after": kl_after,
        "base_hash_before": before,
        "base_hash_after": after,
        "adapters_changed": sum(abs(norms[k] - init_norms[k]) > 1e-7 for k in norms),
        "adapters": len(norms),
        "teacher_numel_local": sum(p.numel() for p in teacher_params),
        "teacher_ds_numel": sum(getattr(p, "ds_numel", 0) for p in teacher_params),
        "teacher_ds_shard": sum(p.ds_tensor.numel() for p in teacher_params if hasattr(p, "ds_tensor")),
        "teacher_numel_full": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in teacher_params),
        "teacher_ds_shapes_ok": all(int(torch.Size(p.ds_shape).numel()) == p.ds_numel and len(p.ds_shape) >= 1
                                    for p in teacher_params if hasattr(p, "ds_shape")),
        "student_keys": sorted([k for k, _ in m.named_parameters()] + [k for k, _ in m.named_buffers()]),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / f"rank{rank}.json")
    tick("done")


if __name__ == "__main__":
    main()
