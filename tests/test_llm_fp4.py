"""LLM-FP4: searched maxima beat the default bias, pre-shifted exponent bias, FP acts, export."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.export import load, save
from qft.nn import quant as Q
from qft.nn.reorder import ClusterQuantLinear, fp_round
from qft.ptq import run
from qft.ptq.llm_fp4 import act_error, preshift_factors, search_act_scale, search_weight_scale
from qft.spec import QuantSpec
from qft.testing import tiny_llama

SPEC = QuantSpec(bits=4, group_size=None, scheme="fp", act_bits=8)


def _outlier_model():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=3)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 60
    return m


def test_fp_round_levels():
    x = torch.tensor([0.2, 0.3, 1.2, 2.6, 5.2, 7.0, -100.0])
    assert fp_round(x, 4).tolist() == [0.0, 0.5, 1.0, 3.0, 6.0, 6.0, -6.0]  # e2m1, saturating
    assert fp_round(torch.tensor([1000.0, 1.07, 1.05]), 8).tolist() == [448.0, 1.125, 1.0]  # e4m3fn


def test_searched_weight_max_beats_default_bias():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 128))  # heavy tails, like LLM weights
    s0, _ = Q.codebook_qparams(w, "fp", 4, 128)  # default bias: absmax maps to the format's max
    s = search_weight_scale(w, 4, 128, grid=20)

    def err(sc):
        return (Q.codebook_dequantize(Q.codebook_quantize(w, sc, "fp", 4, 128), sc, "fp", 4, 128) - w).pow(2).sum(1)
    assert (err(s) <= err(s0) + 1e-6).all()  # never worse, per output channel
    assert err(s).sum() < 0.95 * err(s0).sum()  # measured: 0.91
    assert (s <= s0 + 1e-9).all()


def test_searched_act_max_and_preshift():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.5).sample((256, 64))
    w = [torch.randn(32, 64)]
    s, e = search_act_scale(x, 4, w, grid=(1.0, 0.8, 0.6, 0.4, 0.3, 0.2))
    assert e < 0.8 * act_error(x, float(x.abs().max()) / 6.0, 4, w)
    f = preshift_factors(torch.tensor([1.0, 3.0, 9.0, 0.1]), ref=2.0)
    assert f.tolist() == [1.0, 2.0, 8.0, 1.0]  # powers of two that bring every channel under the ref


def test_llm_fp4_end_to_end_and_export(tmp_path):
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    m = _outlier_model()
    calib = torch.randint(0, 256, (8, 64))
    w = torch.randint(0, 256, (4, 64))
    a4 = SPEC.replace(act_bits=4)
    default = run("llm_fp4", copy.deepcopy(m), a4, calib, search=False, preshift=False)
    searched = run("llm_fp4", copy.deepcopy(m), a4, calib)
    kd = evaluate(default, w, teacher=m, progress=False)["kl"]
    ks = evaluate(searched, w, teacher=m, progress=False)["kl"]
    assert ks < 0.7 * kd, (ks, kd)
    assert max(searched.qft_llm_fp4_max_shift.values()) >= 1  # the outlier channels got shifted
    q = run("llm_fp4", copy.deepcopy(m), SPEC, calib)
    lin = q.model.layers[0].self_attn.k_proj
    assert isinstance(lin, ClusterQuantLinear) and lin.act_scheme == "fp" and lin.inner.scheme == "fp"
    y = q(w).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(w).logits, y)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(w).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match="scheme='int'"):
        run("llm_fp4", m, "w4a8", calib)
    with pytest.raises(ValueError, match="act_bits=6"):
        run("llm_fp4", m, SPEC.replace(act_bits=6), calib)
    with pytest.raises(ValueError, match="calibration windows"):
        run("llm_fp4", m, SPEC, None)
