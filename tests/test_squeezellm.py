"""SqueezeLLM: Fisher-weighted k-means lookup tables plus sparse outliers."""

import copy

import pytest
import torch

from qft.export import load, save
from qft.nn import quant as Q
from qft.nn.lut import LUTLinear
from qft.ptq import run
from qft.ptq.squeezellm import fisher_diagonal, lut_quantize, weighted_kmeans
from qft.testing import tiny_llama


def test_weighted_kmeans_beats_uniform_on_weighted_error():
    torch.manual_seed(0)
    w = torch.randn(16, 256) ** 3  # heavy tails: a uniform grid wastes levels
    f = torch.distributions.Exponential(1.0).sample((16, 256))
    c, a = weighted_kmeans(w, f, 8, iters=25)
    wk = torch.gather(c, 1, a)
    wu = Q.qdq_weight(w, 3, 256, symmetric=False)
    e_k, e_u = float((f * (w - wk) ** 2).sum()), float((f * (w - wu) ** 2).sum())
    assert e_k < 0.7 * e_u
    # the sensitivity matters: k-means with the weights beats k-means without them on the weighted error
    c0, a0 = weighted_kmeans(w, torch.ones_like(f), 8, iters=25)
    assert e_k < float((f * (w - torch.gather(c0, 1, a0)) ** 2).sum())
    assert torch.all(c[:, 1:] >= c[:, :-1])


def test_outliers_exact_and_module_forward():
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    w[3, 7], w[10, 50] = 30.0, -25.0
    codes, lut, mask, resid = lut_quantize(w, torch.ones_like(w), 3, outlier_fraction=2 / w.numel())
    assert bool(mask[3, 7]) and bool(mask[10, 50]) and int(mask.sum()) == 2
    from qft.nn.mixed import csr_from_mask
    m = LUTLinear.from_parts(codes, lut, 3, csr_from_mask(resid, mask))
    eff = m.dequantize()
    assert torch.allclose(eff[mask], w[mask], atol=1e-5)
    assert float(lut.abs().max()) < 10  # the table did not stretch to the outliers
    x = torch.randn(2, 5, 64)
    assert torch.allclose(m(x), x @ eff.t(), atol=1e-4)
    assert abs(m.bits_per_weight() - (3 + 16 * 8 / 64 + (2 * 32 + 32 * 25) / (24 * 64))) < 1e-9


def test_fisher_diagonal():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=4)
    calib = torch.randint(0, 256, (2, 32))
    f = fisher_diagonal(m, calib, ["model.layers.0.mlp.up_proj"])
    g = f["model.layers.0.mlp.up_proj"]
    assert g.shape == (128, 64) and bool((g >= 0).all()) and float(g.sum()) > 0
    assert not any(p.requires_grad is False for p in m.parameters())  # flags restored (all trainable)


@pytest.mark.parametrize("sens", ["fisher", "hessian"])
def test_end_to_end_export_reload(tmp_path, sens):
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=5, tie=True)
    calib = torch.randint(0, 256, (4, 64))
    q = run("squeezellm", copy.deepcopy(m), {"bits": 3, "group_size": None}, calib, sensitivity=sens)
    assert isinstance(q.model.layers[0].self_attn.o_proj, LUTLinear)
    x = torch.randint(0, 256, (2, 24))
    y = q(x).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(x).logits, y)
    if sens == "fisher":
        import qft  # noqa: F401
        from transformers import AutoModelForCausalLM
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(x).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="sensitivity"):
        run("squeezellm", m, "w3g32", calib, sensitivity="grad")
    with pytest.raises(ValueError, match="calibration"):
        run("squeezellm", m, "w3g32", None)
