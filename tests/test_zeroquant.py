"""ZeroQuant: group-wise weights + per-token activations, layer-by-layer distillation."""

import copy

import pytest
import torch

from qft.nn.qlinear import QuantLinear
from qft.ptq import run
from qft.spec import QuantSpec, QuantSpecError
from qft.testing import tiny_llama

SPEC = QuantSpec(bits=3, group_size=32, act_bits=8)


def test_rtn_path_uses_groups_and_token_activations():
    m = run("zeroquant", tiny_llama(hidden=64, heads=4, kv_heads=2), SPEC)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.group_size == 32 and q.scale.shape == (64, 2)
    assert q.spec.act_bits == 8 and q.spec.act_granularity == "token"


def test_lkd_lowers_block_error():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=2)
    calib = torch.randint(0, 256, (8, 64))
    q = run("zeroquant", copy.deepcopy(m), SPEC, calib, lkd=True, steps=25, lr=1e-3, train_batch=4)
    log = q.qft_zeroquant_log
    assert len(log) == 2
    for before, after in log.values():
        assert after < before
    assert isinstance(q.model.layers[1].mlp.down_proj, QuantLinear)
    assert not any(m.weight.requires_grad for m in q.modules() if isinstance(m, QuantLinear))
    assert q.model.layers[0].input_layernorm.weight.requires_grad  # the model's own flags are restored


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with pytest.raises(QuantSpecError, match="group_size=48 does not divide in_features=64"):
        run("zeroquant", m, QuantSpec(bits=4, group_size=48, act_bits=8))
    with pytest.raises(ValueError, match="needs calibration windows"):
        run("zeroquant", m, SPEC, None, lkd=True)
    with pytest.raises(ValueError, match="steps=-1"):
        run("zeroquant", m, SPEC, None, lkd=True, steps=-1)
    with pytest.raises(ValueError, match="no decoder layers"):
        run("zeroquant", torch.nn.Sequential(torch.nn.Linear(64, 64)), SPEC, torch.zeros(2, 8, dtype=torch.long),
            lkd=True)


def test_lkd_epochs_and_time_cap():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=2)
    calib = torch.randint(0, 256, (8, 64))
    q = run("zeroquant", copy.deepcopy(m), SPEC, calib, lkd=True, epochs=1.5, train_batch=4)
    assert q.qft_zeroquant_steps == [3, 3]  # ceil(1.5 * 8 / 4) per block
    q = run("zeroquant", copy.deepcopy(m), SPEC, calib, lkd=True, epochs=10000, max_seconds=0.2)
    assert 0 < sum(q.qft_zeroquant_steps) < 2 * 20000
    with pytest.raises(ValueError, match="epochs=-2"):
        run("zeroquant", m, SPEC, calib, lkd=True, epochs=-2)
