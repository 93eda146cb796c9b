"""OneBit training: SVID-initialized 1-bit student distilled from the full-precision teacher.

Xu et al. (2024), "OneBit": every linear layer becomes sign(W) * (h g^T) (:mod:`qft.nn.onebit`),
initialized by SVID (:mod:`qft.ptq.svid`), then trained by knowledge distillation with
``loss = KL(teacher || student) on the logits + alpha * MSE of L2-normalized hidden states``
(every layer; alpha = ``distill.hidden_weight``). The trainer is the QAT one
(:class:`qft.train.trainer.DistillTrainer`, nothing overridden here); this file only prepares the
student, the optimizer groups, and runs init-eval -> train -> merge -> eval -> export.

What trains (``onebit`` block, :class:`OneBitArgs`):
* ``mode: frozen`` (parameter-efficient): signs fixed, value vectors g, h (+ bias, LayerNorm,
  optional built-in LoRA of rank ``lora_rank``, merged by re-SVID before export) train;
* ``mode: latent`` (the paper's full training): a latent float weight per layer trains through
  sign() with a straight-through (``surrogate: ste``) or tanh-shaped (``surrogate: tanh``)
  gradient, with its own learning rate ``latent_lr`` (latent weights are ~1e-2 in size);
* ``train_norms``: the model's RMSNorm weights train too (full precision, outside the 1-bit layers).
Embeddings and the tied lm_head stay frozen in full precision.

Run: ``python -m qft.train.onebit recipes/smollm2-135m/onebit.yaml [--override key=value ...]``
(the same command on CPU or GPU; the recipe's TrainingArguments keys set the budget).
Simplified from the paper: no self-generated corpus by default (any ``data`` source works,
including ``qft selfgen`` output), one learning-rate schedule for every group.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from qft.nn.onebit import MODES, SURROGATES, onebit_layers
from qft.ptq.svid import DECOMPOSITIONS, merge_lora, onebit_svid
from qft.train.args import Recipe, RecipeError, apply_overrides, unknown_key
from qft.train.pipeline import write_missing_selfgen


@dataclass
class OneBitArgs:
    mode: str = field(default="latent", metadata={"help": f"{' | '.join(MODES)}: frozen signs (PEFT) or latent "
                                                          f"weights trained through sign()"})
    surrogate: str = field(default="ste", metadata={"help": f"latent mode gradient of sign(): {' | '.join(SURROGATES)}"})
    decomposition: str = field(default="power", metadata={"help": f"SVID rank-1 solver: {' | '.join(DECOMPOSITIONS)}"})
    act_aware: bool = field(default=True, metadata={"help": "weight SVID by the input RMS of calibration data"})
    layernorm: bool = field(default=False, metadata={"help": "LayerNorm after every 1-bit layer (the paper's)"})
    lora_rank: int = field(default=0, metadata={"help": "frozen mode: built-in LoRA rank (0 = none)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)"})
    train_norms: bool = field(default=True, metadata={"help": "also train the model's RMSNorm weights"})
    latent_lr: float = field(default=1e-4, metadata={"help": "learning rate of latent weights (latent mode)"})
    calib_samples: int = field(default=16, metadata={"help": "training sequences used for SVID / LayerNorm calibration"})
    time_budget_s: float = field(default=0.0, metadata={
        "help": "> 0: derive max_steps from this many seconds of training, timed on a short probe run "
                "(the learning-rate schedule then fits the budget); 0 = use max_steps"})
    probe_steps: int = field(default=12, metadata={"help": "steps of the timing probe (time_budget_s > 0)"})

    def __post_init__(self):
        def bad(name, allowed):
            raise RecipeError(f"onebit.{name}={getattr(self, name)!r} is not valid; allowed: {allowed}")
        if self.mode not in MODES:
            bad("mode", " | ".join(MODES))
        if self.surrogate not in SURROGATES:
            bad("surrogate", " | ".join(SURROGATES))
        if self.decomposition not in DECOMPOSITIONS:
            bad("decomposition", " | ".join(DECOMPOSITIONS))
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            bad("lora_rank", "an integer >= 0")
        if self.lora_rank and self.mode != "frozen":
            bad("lora_rank", "0 with mode: latent (LoRA needs mode: frozen)")
        if not isinstance(self.latent_lr, (int, float)) or self.latent_lr <= 0:
            bad("latent_lr", "a positive number")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            bad("calib_samples", "a positive integer")
        if not isinstance(self.time_budget_s, (int, float)) or self.time_budget_s < 0:
            bad("time_budget_s", "a number of seconds >= 0")
        if not isinstance(self.probe_steps, int) or self.probe_steps < 4:
            bad("probe_steps", "an integer >= 4")


def load_onebit_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, OneBitArgs]:
    """(Recipe, OneBitArgs) from a YAML recipe with an ``onebit`` block; ``quant`` must be 1-bit."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} does not exist")
    d = apply_overrides(yaml.safe_load(p.read_text()) or {}, overrides or [])
    ob = dict(d.pop("onebit", None) or {})
    known = {f.name for f in fields(OneBitArgs)}
    for k in ob:
        if k not in known:
            raise unknown_key("onebit", k, known)
    d.setdefault("quant", "w1")
    recipe = Recipe.from_dict(d)
    if recipe.quant.bits != 1:
        raise RecipeError(f"quant.bits={recipe.quant.bits} is not valid for OneBit; allowed: 1 (quant: w1)")
    return recipe, OneBitArgs(**ob)


def set_trainable(model: torch.nn.Module, args: OneBitArgs) -> dict:
    """Freeze everything, then unfreeze the OneBit parts (and norms); returns counts of trainables."""
    model.requires_grad_(False)
    n = {"values": 0, "latent": 0, "norms": 0, "lora": 0}
    for _, m in onebit_layers(model):
        for pname, p in m.named_parameters():
            p.requires_grad_(True)
            key = "latent" if pname == "weight" else "lora" if pname.startswith("lora_") else "values"
            n[key] += p.numel()
    if args.train_norms:
        for name, m in model.named_modules():
            if type(m).__name__.endswith("RMSNorm"):
                for p in m.parameters():
                    p.requires_grad_(True)
                    n["norms"] += p.numel()
    return n


def make_optimizer(model: torch.nn.Module, lr: float, latent_lr: float, weight_decay: float = 0.0):
    """AdamW with the latent sign weights in their own group (own learning rate, no decay)."""
    latent, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (latent if name.endswith(".weight") and _is_onebit_latent(model, name) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if latent:
        groups.append({"params": latent, "lr": latent_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


def _is_onebit_latent(model, pname: str) -> bool:
    from qft.nn.onebit import OneBitLinear
    mod = model.get_submodule(pname.rsplit(".", 1)[0])
    return isinstance(mod, OneBitLinear)


def probe_seconds_per_step(student, teacher, recipe: Recipe, ob: OneBitArgs, dataset, collator,
                           bf16: bool = False) -> float:
    """Median seconds per optimizer step over a short run on a copy of the student (warm-up skipped)."""
    from qft.train.budget import probe_seconds_per_step as probe
    from qft.train.trainer import DistillTrainer
    targs = recipe.training_arguments(max_steps=ob.probe_steps, logging_steps=10 ** 6, disable_tqdm=True,
                                      bf16=bf16)
    return probe(student, lambda m, timer: DistillTrainer(
        model=m, args=targs, train_dataset=dataset, data_collator=collator, teacher=teacher, distill=recipe.distill,
        callbacks=[timer], optimizers=(make_optimizer(m, targs.learning_rate, ob.latent_lr), None)), ob.probe_steps)


def calib_windows(dataset, n: int) -> torch.Tensor:
    """The first ``n`` training sequences, cut to a common length, as a LongTensor [n, L]."""
    seqs = [dataset[i]["input_ids"] for i in range(min(n, len(dataset)))]
    L = min(len(s) for s in seqs)
    return torch.stack([torch.as_tensor(s[:L]) for s in seqs])


def _evaluate_all(model, teacher, tok, recipe: Recipe, tag: str, cache: dict) -> dict:
    from qft.eval import EvalProtocol, evaluate, heldout_selfgen, read_text, windows_from_text
    ev = recipe.eval
    proto = EvalProtocol(seq_len=ev.seq_len, n_windows=ev.n_windows)
    out = {}
    for t in ev.texts:
        win = windows_from_text(tok, read_text(t), proto, source=t)
        out[Path(t).parent.name + "/" + Path(t).name] = evaluate(model, win, teacher=teacher, desc=f"{tag} {t}")
    if ev.heldout:
        if "heldout" not in cache:
            cache["heldout"] = heldout_selfgen(teacher or model, tok, ev.heldout, ev.heldout_len, ev.heldout_seed)
        out["heldout-selfgen"] = evaluate(model, cache["heldout"], teacher=teacher, desc=f"{tag} heldout")
    print(f"[onebit] {tag}: " + json.dumps({k: {kk: round(vv, 4) for kk, vv in v.items() if kk != 'tokens'}
                                           for k, v in out.items()}), flush=True)
    return out


def run(recipe: Recipe, ob: OneBitArgs, device: str | None = None) -> dict:
    """init-eval -> train -> (merge LoRA) -> eval -> export; returns the report dict."""
    from qft.models import load_model
    from qft.train.data import DataConfig, build_dataset
    from qft.train.trainer import DistillTrainer
    if not recipe.data:
        raise RecipeError("data: OneBit training needs a data block (e.g. sources: [{type: text, path: FILE}] or a "
                          "`qft selfgen` JSONL with type: selfgen)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(recipe.seed)
    teacher, tok = load_model(recipe.model, device=device)
    gen_seconds = write_missing_selfgen(recipe, teacher, tok)
    dataset, collator = build_dataset(DataConfig.from_dict(recipe.data), tok)
    student = copy.deepcopy(teacher)
    t0 = time.time()
    onebit_svid(student, recipe.quant, calib=calib_windows(dataset, ob.calib_samples),
                decomposition=ob.decomposition, act_aware=ob.act_aware, layernorm=ob.layernorm, mode=ob.mode,
                surrogate=ob.surrogate, lora_rank=ob.lora_rank, lora_alpha=ob.lora_alpha)
    report = {"recipe": {"quant": recipe.quant.to_dict(), "onebit": asdict(ob), "distill": asdict(recipe.distill),
                         "train": recipe.train, "data": recipe.data}, "svid_seconds": round(time.time() - t0, 1),
              "trainable": set_trainable(student, ob), "device": device, "selfgen_seconds": gen_seconds,
              "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    stages, cache = recipe.eval.stages, {}
    if "fp" in stages:
        report["fp"] = _evaluate_all(teacher, None, tok, recipe, "fp", cache)
    if "init" in stages:
        report["init"] = _evaluate_all(student, teacher, tok, recipe, "init (SVID)", cache)
    extra = {}
    if device.startswith("cuda") and not {"bf16", "fp16"} & set(recipe.train) and torch.cuda.is_bf16_supported():
        extra["bf16"] = True  # same recipe on CPU (fp32) and GPU (bf16 autocast) unless it says otherwise
    extra.update(recipe.loader_defaults(len(dataset), recipe.training_arguments().world_size))
    targs = recipe.training_arguments(**extra)
    if ob.time_budget_s:
        sps = probe_seconds_per_step(student, teacher, recipe, ob, dataset, collator, bf16=targs.bf16)
        steps = max(1, int(ob.time_budget_s / sps))
        report["budget"] = {"time_budget_s": ob.time_budget_s, "probe_seconds_per_step": round(sps, 4),
                            "max_steps": steps}
        print(f"[onebit] probe: {sps:.3f} s/step -> max_steps={steps} for {ob.time_budget_s:.0f} s", flush=True)
        targs = recipe.training_arguments(max_steps=steps, **extra)
    opt = make_optimizer(student, targs.learning_rate, ob.latent_lr, targs.weight_decay)
    from qft.train.budget import time_limit_callbacks
    limit = time_limit_callbacks(recipe.time_limit_s)
    trainer = DistillTrainer(model=student, args=targs, train_dataset=dataset, data_collator=collator,
                             teacher=teacher, distill=recipe.distill, optimizers=(opt, None), callbacks=limit)
    t0 = time.time()
    result = trainer.train()
    report["train"] = {"seconds": round(time.time() - t0, 1), "steps": result.global_step,
                       "loss": result.training_loss,
                       "tokens": result.global_step * targs.per_device_train_batch_size
                       * targs.gradient_accumulation_steps * targs.world_size * DataConfig.from_dict(recipe.data).seq_len}
    for cb in limit:
        report["train"].update(cb.report(trainer.state))
    student = trainer.model
    if "before_merge" in stages:
        report["before_merge"] = _evaluate_all(student, teacher, tok, recipe, "trained", cache)
    if any(m.lora_rank for _, m in onebit_layers(student)):
        merge_lora(student, ob.decomposition)
        if "after_merge" in stages:
            report["after_merge"] = _evaluate_all(student, teacher, tok, recipe, "after LoRA merge", cache)
    for _, m in onebit_layers(student):
        m.pack()
    if recipe.export.enabled:
        from qft.export import save
        out = save(student, Path(recipe.output_dir) / "model", tokenizer=tok, format="qft", overwrite=True,
                   report=report)
        report["export"] = str(out)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qft.train.onebit", description="OneBit distillation training")
    ap.add_argument("recipe", help="YAML recipe (see recipes/smollm2-135m/onebit.yaml)")
    ap.add_argument("--override", action="append", default=[], help="key=value (dotted for blocks), repeatable")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--report", default=None, help="also write the report JSON here")
    a = ap.parse_args(argv)
    recipe, ob = load_onebit_recipe(a.recipe, a.override)
    report = run(recipe, ob, a.device)
    text = json.dumps(report, indent=2, default=str)
    if a.report:
        Path(a.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
