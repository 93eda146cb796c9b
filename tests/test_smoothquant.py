"""SmoothQuant: exact folding (incl. GQA v->o), the scale formula, W8A8 modules, error handling."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.nn.int8 import Int8Linear, int8_matmul, int8_linear_ref, quantize_rows_int8
from qft.ptq import run
from qft.ptq.smoothquant import apply_smoothing, group_scales, smooth_scales, smoothing_groups
from qft.testing import tiny_llama


def _outlier_model():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=1)
    with torch.no_grad():  # LLM-like activation outliers: a few huge input channels after the norms
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 40
    return m


def test_scale_formula():
    s = smooth_scales(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5]))
    assert torch.allclose(smooth_scales(torch.tensor([8.0]), torch.tensor([2.0]), 1.0), torch.tensor([8.0]))


def test_folding_is_exact_in_float():
    m = _outlier_model()  # GQA: 4 query heads share 2 kv heads
    x = torch.randint(0, 256, (2, 32))
    ref = m(x).logits
    groups = smoothing_groups(m)
    assert len(groups) == 4 * len(m.model.layers)
    torch.manual_seed(0)
    for g in groups:
        k = g.linears[0][1].in_features
        s = group_scales(g, torch.rand(k) * 10 + 0.1, 0.5)
        if g.rep > 1:  # o_proj scales tied over the query heads of one kv head
            t = s.reshape(-1, g.rep, g.head_dim)
            assert torch.equal(t, t[:, :1].expand_as(t))
        apply_smoothing(g, s)
    assert torch.allclose(m(x).logits, ref, atol=1e-4)


def test_int8_paths_exact():
    a = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 64), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), (a.long() @ b.long().t()).int())
    lin = torch.nn.Linear(64, 7)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 64)
    xq, sx = quantize_rows_int8(x.reshape(-1, 64))
    manual = (xq.double() @ q.qweight.double().t()).float() * sx[:, None] * q.wscale[None] + lin.bias
    assert torch.allclose(q(x).reshape(-1, 7), manual.detach(), atol=1e-5)
    assert torch.equal(q(x), int8_linear_ref(x, q.qweight, q.wscale, q.bias))
    assert (q(x) - lin(x)).abs().max() < 0.05


def test_smoothing_beats_naive_w8a8_on_outliers():
    m = _outlier_model()
    calib = torch.randint(0, 256, (8, 64))
    w = torch.randint(0, 256, (4, 64))
    naive = run("smoothquant", copy.deepcopy(m), "w8a8", None, smooth=False)
    smooth = run("smoothquant", copy.deepcopy(m), "w8a8", calib, alpha=0.5)
    searched = run("smoothquant", copy.deepcopy(m), "w8a8", calib, search=True, samples_per_layer=128)
    assert isinstance(smooth.model.layers[0].mlp.down_proj, Int8Linear)
    kl = {k: evaluate(v, w, teacher=m, progress=False)["kl"] for k, v in
          (("naive", naive), ("smooth", smooth), ("search", searched))}
    assert kl["smooth"] < 0.7 * kl["naive"], kl
    assert kl["search"] < 0.7 * kl["naive"], kl
    assert set(searched.qft_smoothquant_alphas.values()) <= {0.3, 0.4, 0.5, 0.6, 0.7, 0.8}


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match="act_bits"):
        run("smoothquant", m, "w4g64", calib)
    with pytest.raises(ValueError, match="calibration windows"):
        run("smoothquant", m, "w8a8", None)
    with pytest.raises(ValueError, match="unknown option"):
        run("smoothquant", m, "w8a8", calib, alhpa=0.5)
    with pytest.raises(ValueError, match="alpha=1.5"):
        run("smoothquant", m, "w8a8", calib, alpha=1.5)
    with pytest.raises(ValueError, match="no decoder layers"):
        run("smoothquant", torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8", calib)


def test_matches_kernel_reference():
    from qft import kernels
    lin = torch.nn.Linear(64, 24)
    q = Int8Linear.from_linear(lin)
    wq, sw = kernels.reference.quantize_weight_int8(lin.weight.detach())
    assert torch.equal(wq, q.qweight) and torch.allclose(sw, q.wscale)
    x = torch.randn(5, 64) * 3
    assert torch.allclose(q(x), kernels.int8_linear(x, q.qweight, q.wscale, q.bias), atol=1e-5, rtol=1e-5)


def test_export_roundtrip_native_format(tmp_path):
    export = pytest.importorskip("qft.export")
    m = _outlier_model()
    x = torch.randint(0, 256, (2, 16))
    for method, calib in (("smoothquant", x), ("llm_int8", None)):
        q = run(method, copy.deepcopy(m), "w8a8", calib)
        back = export.load(export.save(q, tmp_path / method, format="qft"))
        assert type(back.model.layers[0].mlp.down_proj) is type(q.model.layers[0].mlp.down_proj)
        assert torch.equal(back(x).logits, q(x).logits)
