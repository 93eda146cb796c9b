"""DistillTrainer: trains LoRA over a quantized base against a frozen teacher; accumulation
equivalence; checkpoints without the teacher; CAKLD confidence; recipe validation."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from qft.nn import quantize_model
from qft.testing import tiny_llama
from qft.train.args import DistillArgs, RecipeError, Recipe, apply_overrides
from qft.train.confidence import confidence_terms, estimate_confidence
from qft.train.data import Collator, TokenDataset
from qft.train.lora import apply_lora
from qft.train.trainer import DistillTrainer


def _data(n=8, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 256, (L - (i % 3),), generator=g).tolist() for i in range(n)]  # ragged: padding
    return TokenDataset(seqs), Collator(pad_token_id=258)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                report_to="none", save_strategy="no", logging_steps=1, remove_unused_columns=False,
                dataloader_drop_last=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _student(teacher, mode="lora-in-quantizer", qparams="dynamic"):
    return apply_lora(quantize_model(copy.deepcopy(teacher), "w4g64"), mode, r=4, qparams=qparams)


def test_confidence_terms_hand_computed():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]]))
    labels = torch.tensor([[1, -100]])
    s, n = confidence_terms(logits, labels, "top1")
    assert n.item() == 1 and s.item() == pytest.approx(0.7, rel=1e-5)
    s, n = confidence_terms(logits, labels, "target")
    assert s.item() == pytest.approx(0.2, rel=1e-5)
    with pytest.raises(ValueError, match="definition='bad'"):
        confidence_terms(logits, labels, "bad")


@pytest.mark.parametrize("mode", ["qlora", "lora-in-quantizer"])
def test_distill_trainer_trains_adapters(tmp_path, mode):
    teacher = tiny_llama()
    student = _student(teacher, mode)
    ds, coll = _data()
    before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    tr = DistillTrainer(model=student, args=_args(tmp_path, max_steps=3), train_dataset=ds, data_collator=coll,
                        teacher=teacher, distill=DistillArgs(loss="cakld", confidence_batches=2))
    assert 0 < tr.confidence < 1
    out = tr.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    after = dict(student.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in before.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_confidence_matches_direct_estimate(tmp_path):
    teacher = tiny_llama()
    ds, coll = _data()
    tr = DistillTrainer(model=_student(teacher), args=_args(tmp_path), train_dataset=ds, data_collator=coll,
                        teacher=teacher, distill=DistillArgs(loss="cakld", confidence_def="target",
                                                             confidence_batches=1))
    batch = next(iter(tr.get_train_dataloader()))
    assert tr.confidence == pytest.approx(estimate_confidence(teacher, [batch], "target", 1), rel=1e-5)


def _one_step_weights(tmp_path, bs, ga, loss="forward_kl"):
    teacher = tiny_llama()
    torch.manual_seed(0)
    student = _student(teacher)
    for n, p in student.named_parameters():  # non-zero B so every parameter gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(hash(n) % 1000))
    ds, coll = _data(n=4)
    args = _args(tmp_path / f"{bs}_{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                 max_steps=1, optim="sgd", lr_scheduler_type="constant", learning_rate=1.0, max_grad_norm=0.0)
    tr = DistillTrainer(model=student, args=args, train_dataset=ds, data_collator=coll, teacher=teacher,
                        distill=DistillArgs(loss=loss))
    tr.train()
    return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equivalence(tmp_path):
    """One step of batch 4 == one step of 2 micro-batches of 2 (ragged padding: token-weighted)."""
    a = _one_step_weights(tmp_path, 4, 1)
    b = _one_step_weights(tmp_path, 2, 2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_checkpoint_holds_student_adapters_only(tmp_path):
    teacher = tiny_llama()
    student = _student(teacher)
    ds, coll = _data()
    tr = DistillTrainer(model=student, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                        train_dataset=ds, data_collator=coll, teacher=teacher, distill=DistillArgs(loss="forward_kl"))
    tr.train()
    ckpt = tmp_path / "checkpoint-2"
    assert ckpt.is_dir()
    sd = load_file(str(ckpt / "adapter_model.safetensors"))
    assert sd and all("lora_" in k for k in sd)
    files = [f for f in ckpt.rglob("*") if f.is_file()]
    assert all("teacher" not in f.name for f in files)
    tensors = list(sd.values())
    for f in files:
        if f.suffix == ".pt":
            obj = torch.load(f, weights_only=False)
            stack = [obj]
            while stack:
                o = stack.pop()
                if isinstance(o, torch.Tensor):
                    tensors.append(o)
                elif isinstance(o, dict):
                    stack.extend(o.values())
                elif isinstance(o, (list, tuple)):
                    stack.extend(o)
    big = {tuple(p.shape) for p in teacher.parameters() if p.dim() == 2}  # embeddings, projections
    assert not [t.shape for t in tensors if tuple(t.shape) in big]
    assert sum(t.numel() for t in tensors) < sum(p.numel() for p in teacher.parameters()) / 2


def test_ce_needs_no_teacher_and_kl_does(tmp_path):
    teacher = tiny_llama()
    ds, coll = _data()
    tr = DistillTrainer(model=_student(teacher), args=_args(tmp_path, max_steps=1), train_dataset=ds,
                        data_collator=coll, distill=DistillArgs(loss="ce"))
    assert tr.teacher is None
    tr.train()
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillTrainer(model=_student(teacher), args=_args(tmp_path), train_dataset=ds, data_collator=coll,
                       distill=DistillArgs(loss="forward_kl"))


def test_recipe_validation_names_key_and_value():
    with pytest.raises(RecipeError, match="did you mean 'learning_rate'"):
        Recipe.from_dict({"learning_rat": 1e-3})
    with pytest.raises(RecipeError, match="lora: unknown key 'rank'"):
        Recipe.from_dict({"lora": {"rank": 8}})
    with pytest.raises(RecipeError, match=r"lora.mode='dense'.*qlora"):
        Recipe.from_dict({"lora": {"mode": "dense"}})
    with pytest.raises(RecipeError, match="distill.loss='kl'"):
        Recipe.from_dict({"distill": {"loss": "kl"}})
    with pytest.raises(RecipeError, match="quant"):
        Recipe.from_dict({"quant": {"bits": 9}})
    r = Recipe.from_dict(apply_overrides({"quant": "w3g64", "max_steps": 5}, ["lora.r=8", "quant.group_size=32",
                                                                               "distill.loss=jsd"]))
    assert r.lora.r == 8 and r.quant.bits == 3 and r.quant.group_size == 32 and r.train["max_steps"] == 5
    assert r.distill.loss_options() == {"temperature": 1.0, "beta": 0.5}


def test_training_drops_the_short_last_batch_unless_told():
    """A short last batch is a new shape (a dynamic-shape recompile under torch_compile): dropped by
    default once the set holds a full batch on every rank; the recipe's own value wins."""
    r = Recipe.from_dict({"per_device_train_batch_size": 16})
    assert r.loader_defaults(5165) == {"dataloader_drop_last": True}
    assert r.loader_defaults(20) == {"dataloader_drop_last": True}
    assert r.loader_defaults(20, world_size=2) == {}  # 10 per rank < 16: keep the one short batch
    assert r.loader_defaults(15) == {}
    assert Recipe.from_dict({"dataloader_drop_last": False}).loader_defaults(10 ** 6) == {}
    assert r.training_arguments(**r.loader_defaults(5165)).dataloader_drop_last is True
    # the eval loader drops too: its batch divides the held-out set of a rank (32 -> 8, 6 -> 6, 2 x 7 -> 7)
    assert r.loader_defaults(5165, n_eval=32)["per_device_eval_batch_size"] == 8
    assert r.loader_defaults(5165, n_eval=6)["per_device_eval_batch_size"] == 6
    assert r.loader_defaults(5165, world_size=2, n_eval=14)["per_device_eval_batch_size"] == 7
    assert r.loader_defaults(5165, n_eval=11)["per_device_eval_batch_size"] == 1
    assert "per_device_eval_batch_size" not in Recipe.from_dict(
        {"per_device_train_batch_size": 16, "per_device_eval_batch_size": 4}).loader_defaults(5165, n_eval=11)


@pytest.mark.parametrize("mode,bf16", [("lora-in-quantizer", False), ("lora-in-quantizer", True), ("full", False)])
def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, capsys, mode, bf16):
    """bf16=True: mixed-precision training (CPU autocast here, as on a GPU) must still merge exactly:
    the quantizer and the adapter delta run in fp32, and every stage is evaluated in fp32."""
    import json

    from qft.testing import tiny_tokenizer
    from qft.train.args import Recipe
    from qft.train.pipeline import run_pipeline
    mdir = tmp_path / "tiny"
    tiny_llama().save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    recipe = Recipe.from_dict({
        "model": str(mdir), "output_dir": str(tmp_path / "run"), "quant": "w4g64",
        "ptq": {"method": "clip", "options": {"n_grid": 4}, "calib_samples": 2},
        "lora": {"mode": mode, "r": 2}, "distill": {"loss": "cakld"},
        "selfgen": {"n": 10, "seq_len": 16, "batch_size": 5}, "export": {"format": "qft"},
        "eval": {"heldout": 2, "heldout_len": 16, "generate": ["ab"], "train_eval": 2},
        "max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 2, **({"bf16": True, "use_cpu": True} if bf16 else {})})
    rep = run_pipeline(recipe)
    assert set(rep["results"]) == {"fp", "rtn", "init", "before_merge", "after_merge"}
    # the clip-searched init differs from plain RTN, and training moved the model
    assert rep["results"]["rtn"]["heldout-selfgen"]["ppl"] != rep["results"]["init"]["heldout-selfgen"]["ppl"]
    assert rep["results"]["before_merge"]["heldout-selfgen"]["kl"] != rep["results"]["init"]["heldout-selfgen"]["kl"]
    assert rep["merge"]["heldout-selfgen"]["ppl_change"] == 0.0  # lora-in-quantizer and full: exact merge
    run = tmp_path / "run"
    assert (run / "model" / "config.json").is_file()
    res = json.loads((run / "results.json").read_text())
    assert res["timings"]["train_steps"] == 4
    t = res["timings"]  # every stage timed; together they account for the whole run
    stages = ("setup_s", "init_s", "eval_before_s", "train_s", "eval_after_s", "generate_export_s")
    assert all(t[k] >= 0 for k in stages) and sum(t[k] for k in stages) <= t["total_s"] * 1.001
    assert sum(t[k] for k in stages) > 0.5 * t["total_s"]
    assert [h["step"] for h in res["log_history"] if "eval_loss" in h] == [2, 4]  # eval loss on held-out sequences
    before, after = res["layer_error"]["before"], res["layer_error"]["after"]
    assert len(before) == len(after) == 7 * tiny_llama().config.num_hidden_layers
    assert all(0 < v < 1 for v in before.values()) and before != after
    png = run / "report.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| after_merge |" in capsys.readouterr().out


def test_full_mode_refused_under_several_processes_and_bad_eval_keys():
    from qft.train.args import Recipe, RecipeError
    with pytest.raises(RecipeError, match="eval.stages"):
        Recipe.from_dict({"eval": {"stages": ["fp", "qat"]}})
    with pytest.raises(RecipeError, match="eval.train_eval=0"):
        Recipe.from_dict({"eval": {"train_eval": 0}})
    with pytest.raises(RecipeError, match="lora.mode='lora'"):
        Recipe.from_dict({"lora": {"mode": "lora"}})


def test_nonfinite_loss_stops_with_saved_state_and_resumes_at_that_step(tmp_path):
    """A NaN loss at step 3 stops the run with checkpoint-2 saved; resuming from it reproduces steps 3..4
    of an uninterrupted run exactly (same data order, same optimizer state)."""
    from transformers import TrainerCallback
    teacher = tiny_llama()
    ds, coll = _data(n=16)
    init = _student(teacher)
    kw = dict(max_steps=4, learning_rate=5e-3, save_strategy="steps", save_steps=100)

    def run(out, poison_at=None, resume=None):
        student = copy.deepcopy(init)
        state = {"on": False}

        class Poison(TrainerCallback):
            def on_step_begin(self, args, st, control, **k):
                state["on"] = poison_at is not None and st.global_step + 1 == poison_at

        h = teacher.register_forward_hook(lambda m, i, o: (o.logits.mul_(float("nan")), o)[1] if state["on"] else o)
        try:
            tr = DistillTrainer(model=student, args=_args(out, **kw), train_dataset=ds, data_collator=coll,
                                teacher=teacher, distill=DistillArgs(loss="forward_kl"), callbacks=[Poison()])
            tr.train(resume_from_checkpoint=resume)
        finally:
            h.remove()
        return [h["loss"] for h in tr.state.log_history if "loss" in h]

    ref = run(tmp_path / "ref")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 2 .*checkpoint-2"):
        run(tmp_path / "bad", poison_at=3)
    ckpt = tmp_path / "bad" / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    resumed = run(tmp_path / "bad", resume=str(ckpt))
    assert len(ref) == len(resumed) == 4  # the resumed history starts with the checkpoint's steps 1..2
    assert resumed[2:] == pytest.approx(ref[2:], rel=1e-5, abs=1e-7)


def test_time_budget_sets_max_steps_from_a_probe(tmp_path):
    from qft.testing import tiny_tokenizer
    from qft.train.args import Recipe, RecipeError
    from qft.train.budget import steps_for_budget
    from qft.train.pipeline import run_pipeline
    mdir = tmp_path / "tiny"
    tiny_llama().save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    recipe = Recipe.from_dict({
        "model": str(mdir), "output_dir": str(tmp_path / "run"), "quant": "w4g64", "time_budget_s": 1.5,
        "probe_steps": 4, "lora": {"r": 2}, "distill": {"loss": "forward_kl"},
        "selfgen": {"n": 8, "seq_len": 16, "batch_size": 8}, "export": {"enabled": False},
        "eval": {"heldout": 2, "heldout_len": 16, "generate": [], "stages": ["init", "after_merge"]},
        "max_steps": 10 ** 6, "per_device_train_batch_size": 2, "logging_steps": 1})
    rep = run_pipeline(recipe)
    sps = rep["timings"]["probe_seconds_per_step"]
    assert 0 < sps < 60 and rep["timings"]["train_steps"] == steps_for_budget(1.5, sps) < 10 ** 6
    assert steps_for_budget(10, 3.0) == 3 and steps_for_budget(1, 5.0) == 1
    with pytest.raises(RecipeError, match="time_budget_s=-1"):
        Recipe.from_dict({"time_budget_s": -1})
    with pytest.raises(RecipeError, match="probe_steps=2"):
        Recipe.from_dict({"probe_steps": 2})


def test_time_limit_stops_training_and_the_job_still_exports(tmp_path):
    from qft.testing import tiny_tokenizer
    from qft.train.args import Recipe, RecipeError
    from qft.train.pipeline import run_pipeline
    mdir = tmp_path / "tiny"
    tiny_llama().save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    recipe = Recipe.from_dict({
        "model": str(mdir), "output_dir": str(tmp_path / "run"), "quant": "w4g64", "time_limit_s": 1e-3,
        "lora": {"r": 2}, "distill": {"loss": "forward_kl"},
        "selfgen": {"n": 8, "seq_len": 16, "batch_size": 8}, "export": {"enabled": True},
        "eval": {"heldout": 2, "heldout_len": 16, "generate": [], "stages": ["before_merge", "after_merge"]},
        "max_steps": 500, "per_device_train_batch_size": 2, "logging_steps": 1})
    rep = run_pipeline(recipe)
    t = rep["timings"]
    # the first optimizer step crosses a 1 ms cap: training stops there, merge + export + eval still run
    assert t["train_steps"] == 1 and t["stopped_by_time_limit_at_step"] == 1 and t["planned_steps"] == 500
    assert (tmp_path / "run" / "model" / "config.json").exists() and "after_merge" in rep["results"]
    for bad in (-1, True, "10"):
        with pytest.raises(RecipeError, match="time_limit_s"):
            Recipe.from_dict({"time_limit_s": bad})


def test_override_reads_exponent_numbers():
    d = apply_overrides({}, ["learning_rate=2e-5", "a.b=1E3", "c=x.e5", "d=none", "e=3"])
    assert d == {"learning_rate": 2e-5, "a": {"b": 1000.0}, "c": "x.e5", "d": "none", "e": 3}


def test_time_limit_runs_the_lr_schedule_on_the_clock(tmp_path):
    """Under time_limit_s a cosine schedule is evaluated at max(step, elapsed / limit * max_steps): a run
    slower than planned still decays to ~0 when the cap stops it; a checkpointed scheduler stays weights-only."""
    import io
    import time
    from types import SimpleNamespace

    from transformers import get_cosine_schedule_with_warmup

    from qft.train.budget import WallClockLimit, clock_step
    assert clock_step(10, 50.0, 100.0, 400) == 200 and clock_step(300, 50.0, 100.0, 400) == 300
    assert clock_step(10, 500.0, 100.0, 400) == 400
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, 0, 100)
    cb = WallClockLimit(100.0)
    cb.on_train_begin(None, SimpleNamespace(max_steps=100), None, lr_scheduler=sched)
    assert cb.followed
    cb._t0 = time.perf_counter() - 50.0  # half the time gone after one step: the schedule is at step 50
    opt.step()
    sched.step()
    assert abs(sched.get_last_lr()[0] - 0.5) < 0.02
    cb._t0 = time.perf_counter() - 100.0  # the cap: the schedule is at its end
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] < 1e-3
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    off = WallClockLimit(100.0, follow_schedule=False)
    sched2 = get_cosine_schedule_with_warmup(torch.optim.SGD([p], lr=1.0), 0, 100)
    off.on_train_begin(None, SimpleNamespace(max_steps=100), None, lr_scheduler=sched2)
    assert not off.followed


@pytest.mark.parametrize("qparams", ["dynamic", "lwc"])
def test_torch_compile_trains_like_eager(tmp_path, qparams):
    """TrainingArguments torch_compile=True (the GPU recipes set it): the compiled student's losses match
    eager training of the same lora-in-quantizer model (fused kernel path and the learned-clip path),
    and the merge stays exact."""
    from qft.train.lora import merge_lora
    teacher = tiny_llama()
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        student = _student(teacher, qparams=qparams)
        ds, coll = _data()
        tr = DistillTrainer(model=student, args=_args(tmp_path / str(compiled), max_steps=3, torch_compile=compiled),
                            train_dataset=ds, data_collator=coll, teacher=teacher,
                            distill=DistillArgs(loss="forward_kl"))
        tr.train()
        losses[compiled] = [h["loss"] for h in tr.state.log_history if "loss" in h]
        x = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            before = student(input_ids=x).logits
            after = merge_lora(student)(input_ids=x).logits
        assert torch.equal(before, after)
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
