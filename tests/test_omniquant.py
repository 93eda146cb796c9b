"""OmniQuant: LWC + LET trained block by block; frozen QuantLinears reproduce the trained forward."""

import copy

import pytest
import torch

from qft.nn.qlinear import QuantLinear
from qft.ptq import run
from qft.ptq.calibrate import calib_windows
from qft.spec import QuantSpec
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def setup():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=4)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[[1, 30]] *= 20  # activation outliers for LET to move
    return m, torch.randint(0, 256, (8, 64))


@pytest.mark.parametrize("spec,let", [(QuantSpec(bits=3, group_size=32), False),
                                      (QuantSpec(bits=4, group_size=32, act_bits=6), True)])
def test_training_lowers_error_and_freezing_is_exact(setup, spec, let):
    m, calib = setup
    q = run("omniquant", copy.deepcopy(m), spec, calib, steps=40, train_batch=4, init="minmax", check=True)
    for before, trained, frozen in q.qft_omniquant_log.values():
        assert trained < before
        assert abs(frozen - trained) <= 1e-3 * trained + 1e-9  # folded norms / rows + integers = the view
    c = run("omniquant", copy.deepcopy(m), spec, calib, steps=15, train_batch=4)  # clip-search init
    for (b0, _, _), (b1, trained, frozen) in zip(q.qft_omniquant_log.values(), c.qft_omniquant_log.values()):
        assert trained <= b1  # never worse than the init: training that does not help is undone
    lin = q.model.layers[0].self_attn.o_proj
    assert isinstance(lin, QuantLinear) and lin.spec.act_bits == spec.act_bits
    changed = not torch.equal(q.model.layers[0].input_layernorm.weight, m.model.layers[0].input_layernorm.weight)
    assert changed == let  # LET folds into the RMSNorm only when activations are quantized (default)
    assert not any(m.weight.requires_grad for m in q.modules() if isinstance(m, QuantLinear))


def test_bad_input(setup):
    m, calib = setup
    with pytest.raises(ValueError, match="scheme='nf'"):
        run("omniquant", copy.deepcopy(m), "nf4g64", calib)
    with pytest.raises(ValueError, match="needs calibration windows"):
        run("omniquant", copy.deepcopy(m), "w4g64", None)
    with pytest.raises(ValueError, match="no decoder layers"):
        run("omniquant", torch.nn.Sequential(torch.nn.Linear(64, 64)), "w4g64", calib)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        run("omniquant", copy.deepcopy(m), QuantSpec(bits=4, group_size=48), calib, steps=1)


def test_calibration_file_too_short(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(SAMPLE_TEXT[:500])
    with pytest.raises(ValueError, match="too short"):
        calib_windows(tiny_tokenizer(), p, n=8, seq_len=128)


def test_fp_target_follows_the_fp_model_and_lowers_the_final_error(setup):
    """target='fp' (the paper's): each block learns the FP model's own outputs, so the quantized
    model's last hidden state ends closer to the FP one than with the per-block target."""
    m, calib = setup
    with torch.no_grad():
        ref = m(input_ids=calib, output_hidden_states=True).hidden_states[-1]
    errs = {}
    for target in ("quant", "fp"):
        q = run("omniquant", copy.deepcopy(m), QuantSpec(bits=3, group_size=32), calib, steps=30, train_batch=4,
                init="minmax", target=target)
        with torch.no_grad():
            errs[target] = (q(input_ids=calib, output_hidden_states=True).hidden_states[-1] - ref).pow(2).mean().item()
    assert errs["fp"] < errs["quant"], errs
    with pytest.raises(ValueError, match="target='teacher' is not valid"):
        run("omniquant", copy.deepcopy(m), "w4g64", calib, target="teacher")


def test_epochs_time_cap_and_minibatch_epochs(setup):
    from qft.ptq.zeroquant import minibatches
    m, calib = setup
    q = run("omniquant", copy.deepcopy(m), QuantSpec(bits=3, group_size=32), calib, epochs=2, train_batch=3)
    assert q.qft_omniquant_steps == [6, 6]  # ceil(2 * 8 / 3) per block
    q = run("omniquant", copy.deepcopy(m), QuantSpec(bits=3, group_size=32), calib, epochs=1000, max_seconds=0.2)
    assert 0 < sum(q.qft_omniquant_steps) < 2 * 4000  # stopped by the time cap, not by the epochs
    gen = torch.Generator().manual_seed(0)
    it = minibatches([5, 3], 2, gen)
    seen = [next(it) for _ in range(5)]  # one epoch: chunks 2+2+1 of batch 0, 2+1 of batch 1
    for b, n in ((0, 5), (1, 3)):
        rows = torch.cat([idx for bb, idx in seen if bb == b])
        assert sorted(rows.tolist()) == list(range(n))
    with pytest.raises(ValueError, match="max_seconds=-1"):
        run("omniquant", copy.deepcopy(m), "w4g64", calib, max_seconds=-1)
