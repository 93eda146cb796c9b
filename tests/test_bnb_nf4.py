"""The bitsandbytes NF4 baseline (lora.mode=bnb-nf4) and bitsandbytes' 8-bit / paged optimizers,
run for real on CPU (bitsandbytes' torch backend) on a tiny Llama."""

import copy
import json

import pytest
import torch

import bitsandbytes as bnb
from qft.spec import resolve_spec
from qft.testing import tiny_llama, tiny_tokenizer
from qft.train.args import Recipe, RecipeError
from qft.train.bnb import apply_bnb_lora, nf4_linears, nf4_student, nf4_weight
from qft.train.pipeline import run_pipeline


def test_nf4_student_replaces_linears_and_stays_close():
    teacher = tiny_llama()
    student = nf4_student(teacher, resolve_spec("w4g64"))
    layers = dict(nf4_linears(student))
    assert len(layers) == 7 * teacher.config.num_hidden_layers
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in teacher.modules())  # the teacher is untouched
    w = teacher.model.layers[0].self_attn.q_proj.weight.detach()
    wq = nf4_weight(layers["model.layers.0.self_attn.q_proj"])
    err = float((wq - w).norm() / w.norm())
    assert 0.02 < err < 0.2  # 4-bit NF4: a real but small error
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = teacher(x).logits, student(x).logits
    assert not torch.equal(a, b) and float((a - b).norm() / a.norm()) < 0.3


def test_lora_over_nf4_trains_adapters_only():
    student = nf4_student(tiny_llama(), resolve_spec("w4g64"))
    pm = apply_bnb_lora(student, r=2, alpha=4)
    base = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = bnb.optim.AdamW8bit(trainable, lr=1e-2)
    x = torch.randint(0, 256, (2, 12))
    before = [p.detach().clone() for p in trainable]
    for _ in range(2):
        loss = pm(input_ids=x, labels=x).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))
    assert all(torch.equal(base[n], p) for n, p in pm.named_parameters() if n in base)  # frozen base bit-identical


def test_training_after_an_eval_computes_with_the_same_nf4_weights():
    """bitsandbytes repacks NF4 weights for inference on AVX512-BF16 CPUs in eval mode; the student
    must keep one layout, so a train-mode forward after an eval-mode one gives the same logits."""
    student = nf4_student(tiny_llama(), resolve_spec("w4g64"))
    fresh = copy.deepcopy(student)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        student.eval()(x)  # the pipeline's init evaluation
        ref = fresh.train()(x).logits
        got = student.train()(x).logits
    torch.testing.assert_close(got, ref)
    w = tiny_llama().model.layers[0].mlp.down_proj.weight.detach()
    err = float((nf4_weight(dict(nf4_linears(student))["model.layers.0.mlp.down_proj"]) - w).norm() / w.norm())
    assert err < 0.2  # the weight the report reads is the NF4 one, not a repacked layout


@pytest.mark.parametrize("bits,gs,what", [(3, 64, "quant.bits=3"), (4, 48, "quant.group_size=48")])
def test_bad_quant_block_for_nf4_is_refused(tmp_path, bits, gs, what):
    recipe = Recipe.from_dict({"model": "unused", "output_dir": str(tmp_path), "lora": {"mode": "bnb-nf4"},
                               "quant": {"bits": bits, "group_size": gs}})
    with pytest.raises(RecipeError, match=what):
        run_pipeline(recipe)


def _tiny_recipe(tmp_path, **kw):
    mdir = tmp_path / "tiny"
    tiny_llama().save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    d = {"model": str(mdir), "output_dir": str(tmp_path / "run"), "quant": "w4g64",
         "ptq": {"method": "clip", "options": {"n_grid": 4}, "calib_samples": 2},
         "lora": {"mode": "bnb-nf4", "r": 2}, "distill": {"loss": "cakld"},
         "selfgen": {"n": 10, "seq_len": 16, "batch_size": 5},
         "eval": {"heldout": 2, "heldout_len": 16},
         "max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
         "eval_strategy": "no", "report_to": "none"}
    d.update(kw)
    return Recipe.from_dict(d)


def test_pipeline_runs_the_nf4_baseline_with_an_8bit_optimizer(tmp_path, capsys):
    rep = run_pipeline(_tiny_recipe(tmp_path, optim="adamw_bnb_8bit"))
    r = rep["results"]
    assert set(r) == {"fp", "rtn", "init", "before_merge", "after_merge"}
    h = "heldout-selfgen"
    assert r["init"][h]["kl"] > 0 and r["init"][h]["ppl"] != r["rtn"][h]["ppl"]  # NF4, not qft's RTN
    assert r["before_merge"][h]["kl"] != r["init"][h]["kl"]  # training moved the model
    assert r["before_merge"][h]["kl"] < 2 * r["init"][h]["kl"] + 0.05  # ... and did not wreck it
    assert "ppl_change" in rep["merge"][h]  # peft's merge into NF4 re-rounds: reported, not assumed exact
    assert "export" not in rep and not (tmp_path / "run" / "model").exists()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(res["layer_error"]["before"]) == 14 and res["timings"]["train_steps"] == 4
    out = capsys.readouterr().out
    assert "bnb-nf4" in out and "| after_merge |" in out


def test_paged_8bit_optimizer_in_a_qft_lora_mode(tmp_path):
    rep = run_pipeline(_tiny_recipe(tmp_path, optim="paged_adamw_8bit", lora={"mode": "lora-in-quantizer", "r": 2},
                                    export={"format": "qft"}))
    h = "heldout-selfgen"
    assert rep["results"]["before_merge"][h]["kl"] != rep["results"]["init"][h]["kl"]
    assert rep["merge"][h]["ppl_change"] == 0.0 and (tmp_path / "run" / "model" / "config.json").is_file()
