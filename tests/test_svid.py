"""SVID (qft.ptq.svid): rank-1 decomposition quality, solvers, the onebit_svid PTQ method."""

import copy

import pytest
import torch

from qft.nn.onebit import OneBitLinear, onebit_layers
from qft.nn.quant import qdq_weight
from qft.ptq import METHODS, run
from qft.ptq.svid import balance, rank1_nmf, rank1_power, rel_error, sign_rowmean, svid
from qft.spec import QuantSpec
from qft.testing import tiny_llama


def _structured(seed, n=96, k=64):
    """A weight whose magnitudes have row and column structure (as trained LLM weights do)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(n, 1, generator=g) * 2 + 0.1
    cols = torch.rand(1, k, generator=g) * 3 + 0.1
    return torch.randn(n, k, generator=g) * rows * cols


@pytest.mark.parametrize("seed", range(5))
def test_svid_fits_better_than_sign_times_row_mean(seed):
    w = _structured(seed)
    e_svid = rel_error(w, *svid(w))
    e_row = rel_error(w, *sign_rowmean(w))
    assert e_svid < e_row - 0.02, (e_svid, e_row)


def test_svid_on_unstructured_weight_is_never_worse():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    assert rel_error(w, *svid(w)) <= rel_error(w, *sign_rowmean(w)) + 1e-6


def test_power_and_nmf_reach_the_svd_optimum():
    w = _structured(7)
    a = w.abs()
    u, s, vh = torch.linalg.svd(a)
    best = float((a - s[0] * torch.outer(u[:, 0], vh[0])).norm() / w.norm())
    for method in ("power", "nmf"):
        e = rel_error(w, *svid(w, method, iters=500))
        assert abs(e - best) < 1e-4, (method, e, best)


def test_exact_recovery_of_a_sign_value_matrix():
    g = torch.rand(48) + 0.5
    h = torch.rand(80) + 0.5
    s = torch.where(torch.rand(80, 48) > 0.5, 1.0, -1.0)
    w = s * torch.outer(h, g)
    signs, g2, h2 = svid(w)
    assert torch.equal(signs.float(), s)
    assert rel_error(w, signs, g2, h2) < 1e-5
    assert (g2 >= 0).all() and (h2 >= 0).all()


def test_solvers_return_nonnegative_vectors():
    a = torch.rand(30, 20)
    for h, g in (rank1_power(a), rank1_nmf(a)):
        assert h.shape == (30,) and g.shape == (20,)
        assert (h >= 0).all() and (g >= 0).all()


def test_balance_keeps_product_and_equalizes_rms():
    h, g = torch.rand(50) * 10, torch.rand(70) * 0.01
    h2, g2 = balance(h, g)
    assert torch.allclose(torch.outer(h, g), torch.outer(h2, g2), rtol=1e-5)
    assert torch.isclose(h2.pow(2).mean().sqrt(), g2.pow(2).mean().sqrt(), rtol=1e-5)


def test_activation_aware_svid_minimizes_the_weighted_error():
    w = _structured(11)
    d = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) * 5 + 0.05

    def weighted(signs, g, h):
        return float(((w - signs.float() * torch.outer(h, g)) * d).norm())
    aware, plain = weighted(*svid(w, col_weight=d, iters=300)), weighted(*svid(w, iters=300))
    u, s, vh = torch.linalg.svd(w.abs() * d)
    best = float((w.abs() * d - s[0] * torch.outer(u[:, 0], vh[0])).norm())
    assert abs(aware - best) < 1e-4 * best  # the optimum of the weighted objective
    assert aware < plain * 0.999


def test_sign_rowmean_equals_rtn_one_bit_per_channel():
    w = _structured(2)
    s, g, h = sign_rowmean(w)
    ref = qdq_weight(w, 1, w.shape[1], scheme="sign")
    assert torch.allclose(s.float() * torch.outer(h, g), ref, atol=1e-7)


def test_svid_rejects_bad_decomposition():
    with pytest.raises(ValueError, match="decomposition='qr'"):
        svid(torch.randn(4, 4), "qr")


# --- the PTQ method ----------------------------------------------------------------------------

def test_method_is_registered_and_swaps_targeted_linears():
    torch.manual_seed(0)
    assert "onebit_svid" in METHODS
    model = tiny_llama()
    x = torch.randint(0, 256, (2, 16))
    q = run("onebit_svid", copy.deepcopy(model), QuantSpec(bits=1, scheme="sign", group_size=None))
    names = [n for n, _ in onebit_layers(q)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, OneBitLinear)
    w = model.model.layers[1].mlp.down_proj.weight.data
    signs, g, h = svid(w)
    assert torch.allclose(q.model.layers[1].mlp.down_proj.dequantize(), signs.float() * torch.outer(h, g), atol=1e-7)
    assert torch.isfinite(q(x).logits).all()


def test_svid_model_is_closer_to_fp_than_sign_rowmean_model():
    torch.manual_seed(0)
    model = tiny_llama(seed=1)
    x = torch.randint(0, 256, (4, 32))
    ref = model(x).logits
    a = run("onebit_svid", copy.deepcopy(model), "w1")
    b = run("onebit_svid", copy.deepcopy(model), "w1", init="sign_rowmean")
    wa = sum(float((l.dequantize() - model.get_submodule(n).weight.data).norm()) for n, l in onebit_layers(a))
    wb = sum(float((l.dequantize() - model.get_submodule(n).weight.data).norm()) for n, l in onebit_layers(b))
    assert wa < wb
    assert torch.isfinite(a(x).logits).all() and not torch.equal(a(x).logits, ref)


def test_method_validates_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match="bits=1"):
        run("onebit_svid", model, QuantSpec(bits=2, group_size=64))
    with pytest.raises(ValueError, match="act_aware=True needs calibration"):
        run("onebit_svid", model, "w1", act_aware=True)
    with pytest.raises(ValueError, match="mode='full'"):
        run("onebit_svid", model, "w1", mode="full")
    with pytest.raises(ValueError, match="no nn.Linear"):
        run("onebit_svid", model, QuantSpec(bits=1, scheme="sign", group_size=None, targets=("nothing",)))


def test_act_aware_and_layernorm_calibration_run():
    torch.manual_seed(0)
    model = tiny_llama(seed=2)
    calib = torch.randint(0, 256, (4, 32))
    x = torch.randint(0, 256, (2, 32))
    plain = run("onebit_svid", copy.deepcopy(model), "w1")
    ln_fit = run("onebit_svid", copy.deepcopy(model), "w1", calib=calib, layernorm=True)
    ln_raw = copy.deepcopy(ln_fit)
    for _, m in onebit_layers(ln_raw):
        torch.nn.init.ones_(m.ln.weight)
        torch.nn.init.zeros_(m.ln.bias)
    ref = plain(x).logits
    # the fitted LayerNorm affine keeps the model closer to the LayerNorm-free SVID model
    assert (ln_fit(x).logits - ref).norm() < (ln_raw(x).logits - ref).norm()
    aware = run("onebit_svid", copy.deepcopy(model), "w1", calib=calib, act_aware=True)
    assert torch.isfinite(aware(x).logits).all()


@pytest.mark.real
def test_svid_beats_row_mean_on_smollm2_layers():
    from qft.models import load_model
    model, _ = load_model("smollm2-135m")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj"):
        w = model.get_submodule(name).weight.data
        assert rel_error(w, *svid(w)) < rel_error(w, *sign_rowmean(w))
