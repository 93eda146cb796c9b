"""DistillTrainer: ``transformers.Trainer`` with a frozen full-precision teacher and a registered loss.

Only ``__init__`` and ``compute_loss`` are overridden, so checkpointing, resume, gradient
accumulation, DDP / DeepSpeed / multi-node and logging are the Trainer's own.

* The teacher is put in eval mode with gradients off and prepared for the backend: under
  DeepSpeed it becomes an inference engine with the training run's ZeRO stage 3 config (so ZeRO-3
  shards it like the student; other stages replicate it), otherwise ``accelerator.prepare_model(
  evaluation_mode=True)``. It is an attribute of the trainer, never ``self.model``, so checkpoints
  (``save_model`` / ``_save_checkpoint``) hold the student only.
* Loss: ``LOSSES[distill.loss](student_logits, teacher_logits, labels, num_items_in_batch)`` on
  shifted positions (logits at t predict labels at t + 1; -100 masked), plus optional
  ``ce_weight`` x cross-entropy and ``hidden_weight`` x normalized hidden-state MSE. The sum over
  tokens is divided by ``num_items_in_batch`` (the Trainer counts valid labels over the whole
  gradient-accumulation step and, with ``average_tokens_across_devices``, over all ranks); the
  loss is then multiplied by the number of processes because DDP / DeepSpeed average gradients
  over ranks. Net effect: the gradient of one optimizer step is that of the mean over every token
  of the global batch, whatever the accumulation and world size.
* CAKLD's confidence g is estimated once in ``__init__`` on ``confidence_batches`` batches of the
  training dataloader (summed over ranks), unless given.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import Trainer

from qft.registry import LOSSES
from qft.train.args import DistillArgs
from qft.train.confidence import estimate_confidence
from qft.train.losses import IGNORE, ce, hidden_mse


def _resolve_ds_auto(cfg: dict, hidden: int | None) -> dict:
    """Fill / drop the "auto" entries of a ZeRO section that only the Trainer would resolve."""
    zero = cfg.get("zero_optimization", {})
    if hidden:
        fill = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden}
        for k, v in fill.items():
            if zero.get(k) == "auto":
                zero[k] = v
    for k in [k for k, v in zero.items() if v == "auto"]:
        del zero[k]
    return cfg


def prepare_teacher(trainer: Trainer, teacher: torch.nn.Module):
    """Frozen teacher ready for the trainer's backend (see the module docstring)."""
    teacher.eval()
    teacher.requires_grad_(False)
    if getattr(trainer, "is_deepspeed_enabled", False):
        import deepspeed
        plugin = trainer.accelerator.state.deepspeed_plugin
        cfg = copy.deepcopy(plugin.deepspeed_config)
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        if stage != 3:
            cfg["zero_optimization"] = {"stage": 0}  # replicate: only ZeRO-3 shards parameters
        for k in ("optimizer", "scheduler"):
            cfg.pop(k, None)
        a = trainer.args
        cfg["train_micro_batch_size_per_gpu"] = a.per_device_train_batch_size
        cfg["gradient_accumulation_steps"] = a.gradient_accumulation_steps
        cfg["train_batch_size"] = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        for k in ("bf16", "fp16"):
            if isinstance(cfg.get(k), dict) and cfg[k].get("enabled") == "auto":
                cfg[k]["enabled"] = bool(getattr(a, k))
        cfg.pop("gradient_clipping", None)
        _resolve_ds_auto(cfg, getattr(getattr(teacher, "config", None), "hidden_size", None))
        engine, *_ = deepspeed.initialize(model=teacher, config=cfg)
        engine.eval()
        return engine
    return trainer.accelerator.prepare_model(teacher, evaluation_mode=True)


class DistillTrainer(Trainer):
    """Trainer(model=student, ..., teacher=fp_model, distill=DistillArgs(...))."""

    def __init__(self, *args, teacher: torch.nn.Module | None = None, distill: DistillArgs | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill or DistillArgs()
        self.loss_fn = LOSSES.get(self.distill.loss)
        needs_teacher = self.distill.loss != "ce" or self.distill.hidden_weight > 0
        if needs_teacher and teacher is None:
            raise ValueError(f"distill.loss={self.distill.loss!r} needs a teacher model (teacher=...)")
        # we consume num_items_in_batch ourselves and normalize over the whole accumulated batch
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_is_scaled_for_ga = None
        self.teacher = prepare_teacher(self, teacher) if teacher is not None else None
        self.loss_options = self.distill.loss_options()
        if self.distill.loss == "cakld":
            g = self.distill.confidence
            if g is None:
                g = estimate_confidence(self.teacher, self.get_train_dataloader(), self.distill.confidence_def,
                                        self.distill.confidence_batches,
                                        reduce=lambda t: self.accelerator.reduce(t, reduction="sum"))
            self.loss_options["confidence"] = g
            self.confidence = g

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        d = self.distill
        hidden = d.hidden_weight > 0
        labels = inputs["labels"]
        fwd = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        outputs = model(**fwd, output_hidden_states=hidden, use_cache=False)
        shifted = labels[:, 1:].contiguous()
        s_logits = outputs.logits[:, :-1]
        loss = 0.0
        if d.loss == "ce":
            loss = ce(s_logits, None, shifted, num_items_in_batch)
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(**fwd, output_hidden_states=hidden, use_cache=False)
            if d.loss != "ce":
                loss = self.loss_fn(s_logits, t_out.logits[:, :-1].to(s_logits.dtype), shifted, num_items_in_batch,
                                    **self.loss_options)
            if hidden:
                loss = loss + d.hidden_weight * hidden_mse([h[:, :-1] for h in outputs.hidden_states[1:]],
                                                           [h[:, :-1] for h in t_out.hidden_states[1:]],
                                                           shifted, num_items_in_batch)
        if d.ce_weight > 0 and d.loss != "ce":
            loss = loss + d.ce_weight * ce(s_logits, None, shifted, num_items_in_batch)
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            loss = loss * self.accelerator.num_processes
        self._stop_if_nonfinite(loss, shifted, model.training)
        return (loss, outputs) if return_outputs else loss

    def _stop_if_nonfinite(self, loss: torch.Tensor, shifted: torch.Tensor, training: bool) -> None:
        """Stop on a NaN/inf loss with a saved, resumable state (the weights and optimizer of the last
        good step: the bad step's backward and update have not run). Every rank decides together, so a
        loss that goes bad on one rank stops all of them at the same step (and the save is collective)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(bad)], device=loss.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            return
        step = self.state.global_step
        where = ""
        if training:
            self._save_checkpoint(self.model_wrapped, trial=None)
            ckpt = Path(self.args.output_dir) / f"checkpoint-{step}"
            where = f"; the state before this step is saved in {ckpt} (resume from it with a lower learning rate)"
        n_valid = int(shifted.ne(IGNORE).sum())
        raise FloatingPointError(f"non-finite loss {loss.detach().float().sum().item()} at step {step} ({n_valid} "
                                 f"valid tokens in the micro-batch on this rank){where}")
