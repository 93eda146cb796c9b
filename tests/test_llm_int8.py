"""LLM.int8(): outlier decomposition in float, vector-wise int8 for the rest."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.nn.int8 import Int8MixedLinear, mixed_int8_linear
from qft.ptq import run
from qft.ptq.llm_int8 import outlier_counts
from qft.testing import tiny_llama


def test_outlier_columns_in_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(8, 64) * 0.5
    x[:, [5, 40]] *= 60  # two outlier feature dimensions
    plain = Int8MixedLinear.from_linear(lin, threshold=0.0)
    mixed = Int8MixedLinear.from_linear(lin, threshold=6.0)
    wdq = mixed.dequantize()
    exact = x @ wdq.t()  # the int8 weight, activations unquantized
    e_plain = (plain(x) - exact).abs().max()
    e_mixed = (mixed(x) - exact).abs().max()
    assert mixed.last_outliers == 2
    assert e_mixed < e_plain / 10
    # every column an outlier: the whole product is the float one
    assert torch.allclose(mixed_int8_linear(x, mixed.qweight, mixed.wscale, 1e-9), exact, atol=1e-4)


def test_model_close_to_fp_and_export_hooks():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=3)
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[[2, 9]] *= 50
    w = torch.randint(0, 256, (4, 64))
    q = run("llm_int8", copy.deepcopy(m), "w8a8", None)
    q0 = run("llm_int8", copy.deepcopy(m), "w8a8", None, threshold=0.0)
    kl, kl0 = (evaluate(v, w, teacher=m, progress=False)["kl"] for v in (q, q0))
    assert kl < kl0 / 2
    assert outlier_counts(q)["model.layers.0.mlp.gate_proj"] >= 2
    mod = q.model.layers[0].mlp.gate_proj
    back = Int8MixedLinear.from_export(mod.export_config(), mod.export_tensors())
    x = torch.randn(3, 64) * 10
    assert torch.equal(back(x), mod(x)) and back.threshold == 6.0
    assert 8 < mod.bits_per_weight() < 9


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="bits=4"):
        run("llm_int8", m, "w4g64")
    with pytest.raises(ValueError, match="threshold"):
        run("llm_int8", m, "w8a8", None, threshold=-1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        run("llm_int8", torch.nn.Sequential(torch.nn.ReLU()), "w8a8")
