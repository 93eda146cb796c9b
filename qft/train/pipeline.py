"""The end-to-end QAT job: teacher -> quantized student -> LoRA -> distill -> merge -> export -> eval.

Steps (each one line of wiring around a module that owns the algorithm):

1. load the full-precision teacher (``qft.models.load_model``);
2. training data: the recipe's ``data`` block (``qft.train.data``), or, when it names no source,
   ``selfgen.n`` sequences the teacher writes itself (``qft.train.selfgen``, resumable file in the
   run directory);
3. evaluation sets: every ``eval.texts`` file (``eval.n_windows`` x ``eval.seq_len`` windows) and
   held-out self-generated text (a different seed from training), so the job runs offline;
4. student = copy of the teacher quantized by ``ptq.method`` (``rtn``, or BitDistiller's ``clip``
   search calibrated on training sequences); KV-cache fake quant hooks when ``quant.kv_bits``;
5. LoRA over the frozen quantized base (``lora.mode``), ``DistillTrainer`` with ``distill.loss``;
6. merge (exact for lora-in-quantizer, re-rounded for qlora), export with ``qft.export.save``
   (the report holds every number, including the merge's perplexity change), a few generations;
7. a table of perplexity and KL(teacher || model) for fp / rtn / init / before_merge / after_merge
   (``rtn`` = plain round-to-nearest at the same spec, the baseline QAT has to beat);
8. a report in the run directory: ``results.json``, ``report.png`` (train / eval loss, per-layer
   weight quantization error before and after training, ``qft.train.report``) and tensorboard
   curves in ``tb/`` when tensorboard is installed.

Under several processes (``accelerate launch``) only training is distributed: evaluation, merge
and export run on the main process, on a pristine copy of the initial student with the trained
adapter loaded from the run directory (``trainer.save_model`` gathers ZeRO-3 shards).
"""

from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path

import torch

from qft.eval import EvalProtocol, evaluate, generate, heldout_selfgen, read_text, windows_from_text
from qft.nn.kvquant import install_kv_quant, remove_kv_quant
from qft.train.args import STAGES, Recipe
from qft.train.report import layer_errors, write_png



def _log(msg: str) -> None:
    print(f"[qft train] {msg}", flush=True)


def _selfgen_into(recipe: Recipe, teacher, tok, path) -> None:
    """The teacher writes ``recipe.selfgen`` sequences into ``path`` (resuming a partial file of the same settings)."""
    from qft.train.selfgen import SelfGenConfig, selfgen
    sg = recipe.selfgen
    _log(f"self-generating {sg.n} x {sg.seq_len} tokens -> {path}")
    selfgen(teacher, tok, path, SelfGenConfig(n=sg.n, seq_len=sg.seq_len, batch_size=sg.batch_size, seed=sg.seed),
            model_id=recipe.model)


def write_missing_selfgen(recipe: Recipe, teacher, tok) -> float:
    """Write every ``type: selfgen`` data source whose file does not exist yet with the teacher (LLM-QAT
    data, settings from the recipe's ``selfgen`` block); an existing file is used as it is (several recipes can share one)."""
    t0 = time.time()
    for src in recipe.data.get("sources") or []:
        if isinstance(src, dict) and src.get("type") == "selfgen" and not Path(src.get("path", "")).exists():
            _selfgen_into(recipe, teacher, tok, src["path"])
    return round(time.time() - t0, 1)


def training_data(recipe: Recipe, teacher, tok, out: Path):
    """(dataset, collator, description) from the data block or self-generated sequences."""
    from qft.train.data import DataConfig, build_dataset
    cfg = dict(recipe.data)
    if not cfg.get("sources"):
        path = out / "selfgen.jsonl"
        _selfgen_into(recipe, teacher, tok, path)
        cfg = {"sources": [{"type": "selfgen", "path": str(path)}], "seq_len": recipe.selfgen.seq_len,
               "seed": recipe.seed}
    else:
        write_missing_selfgen(recipe, teacher, tok)
    dcfg = DataConfig.from_dict(cfg)
    ds, coll = build_dataset(dcfg, tok)
    desc = ", ".join(f"{s.type}:{Path(s.path).name}" for s in dcfg.sources)
    return ds, coll, f"{len(ds)} sequences of <= {dcfg.seq_len} tokens ({desc})"


def eval_sets(recipe: Recipe, teacher, tok) -> dict[str, torch.Tensor]:
    e = recipe.eval
    sets = {}
    for t in e.texts:
        p = Path(t)
        sets[f"{p.parent.name}/{p.name}"] = windows_from_text(tok, read_text(p), EvalProtocol(e.seq_len, e.n_windows),
                                                              source=str(p))
    if e.heldout:
        sets["heldout-selfgen"] = heldout_selfgen(teacher, tok, e.heldout, e.heldout_len, seed=e.heldout_seed)
    return sets


def calibration(recipe: Recipe, ds, tok) -> torch.Tensor | None:
    p = recipe.ptq
    if p.method == "rtn":
        return None
    if p.calib_text:
        from qft.ptq.calibrate import calib_windows
        return calib_windows(tok, p.calib_text, n=p.calib_samples, seq_len=recipe.selfgen.seq_len)
    seqs = [ds[i]["input_ids"] for i in range(min(p.calib_samples, len(ds)))]
    L = min(len(s) for s in seqs)
    return torch.stack([s[:L] for s in seqs])


def quantized_student(recipe: Recipe, teacher, calib, method: str | None = None):
    from qft.ptq import run as run_ptq
    if method is None and recipe.lora.mode == "bnb-nf4":  # the baseline's base: bitsandbytes NF4, no PTQ
        from qft.train.bnb import nf4_student
        return nf4_student(teacher, recipe.quant)
    method = method or recipe.ptq.method
    student = copy.deepcopy(teacher)
    return run_ptq(method, student, recipe.quant, calib=calib, **(recipe.ptq.options if method == recipe.ptq.method else {}))


def split_eval(ds, n: int):
    """Hold out the last ``n`` training sequences as the Trainer's eval set (same on every rank)."""
    from torch.utils.data import Subset
    n = min(n, len(ds) // 5)
    if n < 1:
        return ds, None
    return Subset(ds, range(len(ds) - n)), Subset(ds, range(len(ds) - n, len(ds)))


def measure(model, sets, teacher, stage: str) -> dict:
    out = {}
    for name, w in sets.items():
        r = evaluate(model, w, teacher=None if stage == "fp" else teacher, desc=f"eval {stage} {name}")
        out[name] = {"ppl": r["ppl"], "kl": r.get("kl", 0.0)}
        _log(f"{stage:>12} {name}: ppl {r['ppl']:.3f}  KL {out[name]['kl']:.4f}")
    return out


def format_table(results: dict, protocol: str) -> str:
    sets = list(next(iter(results.values())).keys()) if results else []
    head = "| stage | " + " | ".join(f"{s} ppl | {s} KL" for s in sets) + " |"
    sep = "|---|" + "---|---|" * len(sets)
    rows = [f"| {st} | " + " | ".join(f"{results[st][s]['ppl']:.3f} | {results[st][s]['kl']:.4f}" for s in sets) + " |"
            for st in STAGES if st in results]
    return "\n".join([head, sep, *rows, f"\nprotocol: {protocol}"])


def _adapter_into(init_student, recipe: Recipe, adapter_dir: Path):
    """Rebuild the trained PeftModel from a pristine initial student and a saved adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from qft.train.lora import apply_lora
    L = recipe.lora
    pm = apply_lora(init_student, L.mode, L.r, L.alpha, L.dropout, L.target_modules, L.qparams)
    set_peft_model_state_dict(pm, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return pm


def run_pipeline(recipe: Recipe, resume: str | bool | None = None) -> dict:
    """Run the whole job; returns the report dict (also written to <output_dir>/results.json)."""
    from transformers import set_seed
    from qft.models import load_model
    from qft.train.lora import apply_lora, lora_summary, merge_lora
    from qft.train.trainer import DistillTrainer

    t_start = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)
    spec, L = recipe.quant, recipe.lora
    targs = recipe.training_arguments()
    auto = {}
    if targs.device.type == "cuda" and not {"bf16", "fp16"} & set(recipe.train) and torch.cuda.is_bf16_supported():
        auto["bf16"] = True  # same recipe on CPU (fp32) and GPU (bf16 autocast); targs is rebuilt with it below
    main = targs.process_index == 0
    distributed = targs.world_size > 1
    if distributed and recipe.time_budget_s:
        from qft.train.args import RecipeError
        raise RecipeError(f"time_budget_s={recipe.time_budget_s} runs on one process (the timing probe is not "
                          f"distributed); under accelerate launch set max_steps instead")
    if distributed and L.mode in ("full", "bnb-nf4"):
        from qft.train.args import RecipeError
        raise RecipeError(f"lora.mode={L.mode!r} runs on one process; allowed under accelerate launch: "
                          f"lora-in-quantizer | qlora")
    if L.mode == "bnb-nf4":
        from qft.train.args import RecipeError
        from qft.train.bnb import check_spec, require_bnb
        try:
            require_bnb()
            check_spec(spec)
        except (RuntimeError, ValueError) as e:
            raise RecipeError(str(e)) from None
        _log("lora.mode=bnb-nf4: the base is bitsandbytes NF4 (block size quant.group_size); the ptq block is not "
             "used and the merged model is evaluated, not exported (NF4 is not a qft format)")

    if "tensorboard" in (targs.report_to or []):
        import os
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    # Eval, generation and training all run on the Trainer's device (cuda:<local rank> on a GPU).
    teacher, tok = load_model(recipe.model, device=str(targs.device))
    with targs.main_process_first(desc="training data"):  # rank 0 generates, the others read the file
        ds, coll, data_desc = training_data(recipe, teacher, tok, out)
    _log(f"training data: {data_desc}")
    eval_ds = None
    if targs.eval_strategy != "no":
        ds, eval_ds = split_eval(ds, recipe.eval.train_eval)
        if eval_ds is None:
            from qft.train.args import RecipeError
            raise RecipeError(f"eval_strategy={targs.eval_strategy!r} needs held-out training sequences, but there "
                              f"are only {len(ds)}; raise selfgen.n or set eval_strategy: 'no'")
        _log(f"eval loss during training on {len(eval_ds)} held-out training sequences")
    auto.update(recipe.loader_defaults(len(ds), targs.world_size, len(eval_ds) if eval_ds is not None else 0))
    targs = recipe.training_arguments(**auto)  # bf16 and the loader defaults
    sets = eval_sets(recipe, teacher, tok) if main else {}
    stages = set(recipe.eval.stages)
    results: dict = {}
    timings: dict = {"setup_s": time.time() - t_start}  # teacher, training data, evaluation sets

    t0 = time.time()
    calib = None if L.mode == "bnb-nf4" else calibration(recipe, ds, tok)
    student = quantized_student(recipe, teacher, calib)
    timings["init_s"] = time.time() - t0
    _log(f"student: {spec.name} by {recipe.ptq.method} in {timings['init_s']:.1f}s")
    if spec.kv_bits:
        install_kv_quant(student, spec)
    t0 = time.time()
    if main and "fp" in stages:
        results["fp"] = measure(teacher, sets, None, "fp")
    if main and "rtn" in stages:
        if recipe.ptq.method == "rtn":
            results["rtn"] = measure(student, sets, teacher, "rtn")
        else:
            rtn = quantized_student(recipe, teacher, None, method="rtn")
            if spec.kv_bits:
                install_kv_quant(rtn, spec)
            results["rtn"] = measure(rtn, sets, teacher, "rtn")
            del rtn
    if main and "init" in stages:
        if recipe.ptq.method == "rtn" and "rtn" in results:
            results["init"] = results["rtn"]
        else:
            results["init"] = measure(student, sets, teacher, "init")
    err_before = layer_errors(teacher, student) if main else {}
    timings["eval_before_s"] = time.time() - t0
    pristine = copy.deepcopy(student) if distributed else None
    eval_teacher = copy.deepcopy(teacher) if distributed else teacher

    if spec.kv_bits:
        remove_kv_quant(student)  # re-installed on the outermost (LoRA) modules below
    peft_model = apply_lora(student, L.mode, L.r, L.alpha, L.dropout, L.target_modules, L.qparams)
    if spec.kv_bits:
        install_kv_quant(peft_model, spec)
    summary = lora_summary(peft_model)
    _log(f"LoRA {L.mode} r={L.r}: {summary['trainable']:,} trainable, frozen base {summary['frozen_bytes'] / 2**20:.1f} MiB")
    if recipe.time_budget_s:
        from qft.train.budget import probe_seconds_per_step, steps_for_budget
        t0 = time.time()
        pargs = recipe.training_arguments(max_steps=recipe.probe_steps, logging_steps=10 ** 6, disable_tqdm=True,
                                          report_to="none", eval_strategy="no", save_strategy="no", **auto)
        sps = probe_seconds_per_step(peft_model, lambda m, timer: DistillTrainer(
            model=m, args=pargs, train_dataset=ds, data_collator=coll, teacher=teacher, distill=recipe.distill,
            callbacks=[timer]), recipe.probe_steps)
        steps = steps_for_budget(recipe.time_budget_s, sps)
        timings["probe_seconds_per_step"] = sps
        timings["probe_s"] = time.time() - t0  # includes torch.compile's first compilation
        _log(f"time budget {recipe.time_budget_s:.0f}s: probe {sps:.3f} s/step -> max_steps={steps}")
        targs = recipe.training_arguments(max_steps=steps, **auto)
    from qft.train.budget import time_limit_callbacks
    limit = time_limit_callbacks(recipe.time_limit_s)
    trainer = DistillTrainer(model=peft_model, args=targs, train_dataset=ds, eval_dataset=eval_ds, data_collator=coll,
                             teacher=teacher, distill=recipe.distill, callbacks=limit)
    if getattr(trainer, "confidence", None) is not None:
        _log(f"CAKLD teacher confidence g = {trainer.confidence:.4f} ({recipe.distill.confidence_def})")
    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=resume or None)
    timings["train_s"] = time.time() - t0
    timings["train_steps"] = int(trainer.state.global_step)
    for cb in limit:
        timings.update(cb.report(trainer.state))
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    if not main:
        return {}
    t0 = time.time()
    if distributed:
        peft_model = _adapter_into(pristine, recipe, adapter_dir)
    peft_model = getattr(peft_model, "module", peft_model)
    from accelerate.utils import extract_model_from_parallel
    # drop the mixed-precision forward wrapper accelerate put on the model: every stage evaluates in fp32
    peft_model = extract_model_from_parallel(peft_model, keep_fp32_wrapper=False)
    peft_model.eval()
    if spec.kv_bits:
        install_kv_quant(peft_model, spec)
    if "before_merge" in stages:
        results["before_merge"] = measure(peft_model, sets, eval_teacher, "before_merge")
    merged = merge_lora(peft_model)
    merged.qft_spec = spec
    if spec.kv_bits:
        install_kv_quant(merged, spec)
    if "after_merge" in stages:
        results["after_merge"] = measure(merged, sets, eval_teacher, "after_merge")
    err_after = layer_errors(eval_teacher, merged)
    png = write_png(out / "report.png", trainer.state.log_history, err_before, err_after,
                    title=f"{recipe.model} {spec.name} {L.mode} {recipe.distill.loss}")
    _log(f"report: {png}" if png else "report.png skipped (pip install matplotlib)")
    timings["eval_after_s"] = time.time() - t0  # before / after merge, the merge, layer errors, the PNG
    merge_delta = {}
    if "before_merge" in results and "after_merge" in results:
        for s in sets:
            b, a = results["before_merge"][s]["ppl"], results["after_merge"][s]["ppl"]
            merge_delta[s] = {"ppl_before_merge": b, "ppl_after_merge": a, "ppl_change": a - b,
                              "ppl_change_pct": 100.0 * (a - b) / b}
            _log(f"merge ppl change on {s}: {b:.3f} -> {a:.3f} ({100 * (a - b) / b:+.3f}%)")
    protocol = (f"text sets: {recipe.eval.n_windows} x {recipe.eval.seq_len}-token windows, no BOS; held-out "
                f"self-generated: {recipe.eval.heldout} x {recipe.eval.heldout_len} tokens (seed "
                f"{recipe.eval.heldout_seed})")
    report = {"recipe": recipe.model, "spec": spec.to_dict(), "lora": vars(L), "ptq": vars(recipe.ptq),
              "distill": vars(recipe.distill), "confidence": getattr(trainer, "confidence", None),
              "data": data_desc, "results": results, "merge": merge_delta, "protocol": protocol,
              "train_loss": train_out.training_loss, "timings": timings, "lora_summary": summary,
              "log_history": trainer.state.log_history,
              "layer_error": {"before": err_before, "after": err_after},
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    t0 = time.time()
    gens = {}
    for p in recipe.eval.generate:
        gens[p] = generate(merged, tok, p, max_new_tokens=32)
        _log(f"generate: {p!r} -> {gens[p]!r}")
    report["generations"] = gens
    if recipe.export.enabled and L.mode != "bnb-nf4":
        from qft.export import save
        path = save(merged, out / "model", tokenizer=tok, format=recipe.export.format, overwrite=True,
                    report={k: report[k] for k in ("results", "merge", "protocol", "spec", "timings")})
        report["export"] = str(path)
        _log(f"exported -> {path}")
    timings["generate_export_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    _log("time by stage: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items()
                                       if k.endswith("_s") and k != "total_s"))
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    table = format_table(results, protocol)
    print("\n" + table + f"\n(steps {timings['train_steps']}, train {timings['train_s']:.0f}s, "
          f"total {timings['total_s']:.0f}s)", flush=True)
    report["table"] = table
    return report

