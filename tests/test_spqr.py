"""SpQR: small groups, 3-bit group statistics, exact sparse outliers."""

import copy

import pytest
import torch

from qft.export import load, save
from qft.nn.mixed import MixedLinear, csr_from_mask, dequantize_stats, quantize_stats, sparse_linear, sparse_to_dense
from qft.ptq import run
from qft.ptq.gptq import gptq_quantize
from qft.ptq.spqr import spqr_quantize
from qft.testing import tiny_llama


def _module(r, bits, gs, w):
    sp = csr_from_mask(r.values, r.outliers)
    return MixedLinear.from_parts(r.codes, r.zeros, bits, gs, scales=r.scales, stats=r.stats, stat_bits=3,
                                  stat_group=16, sparse=sp)


def test_outliers_restore_exact_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[torch.rand_like(w) < 0.01] *= 25  # planted outliers
    h = torch.eye(128)  # no cross-column feedback: the stored outliers are the original weights
    r = spqr_quantize(w, h, 3, 16, outlier_fraction=0.02)
    assert int(r.outliers.sum()) == round(0.02 * 64 * 16) * (128 // 16)
    m = _module(r, 3, 16, w)
    eff = m.dequantize()
    assert torch.equal(eff[r.outliers], w[r.outliers])
    assert torch.allclose(eff, r.w_q, atol=1e-6)
    x = torch.randn(3, 7, 128)
    assert torch.allclose(m(x), x @ eff.t(), atol=1e-4)


def test_beats_plain_group_quantization():
    torch.manual_seed(1)
    x = torch.randn(1024, 128)
    x = x + 0.3 * x[:, :1]
    h = 2 * x.t() @ x / 1024
    w = torch.randn(64, 128) * torch.where(torch.rand(64, 128) < 0.01, 20.0, 1.0)
    err = lambda wq: float(torch.trace((w - wq) @ h @ (w - wq).t()))  # noqa: E731
    g16 = gptq_quantize(w, h, 3, 16, act_order=False)
    s0 = spqr_quantize(w, h, 3, 16, outlier_fraction=0.0, stat_bits=0)
    s = spqr_quantize(w, h, 3, 16, outlier_fraction=0.01)
    assert abs(err(s0.w_q) - err(g16.w_q)) < 1e-3 * err(g16.w_q)  # no outliers, fp stats: GPTQ itself
    assert err(s.w_q) < 0.5 * err(g16.w_q)


def test_stats_and_sparse_helpers():
    torch.manual_seed(2)
    s = torch.rand(40, 5) + 0.1
    c, ss, sm = quantize_stats(s, 3, 16)
    assert c.dtype == torch.uint8 and int(c.max()) <= 7 and ss.shape == (3, 5)
    back = dequantize_stats(c, ss, sm, 16)
    assert torch.all((back - s).abs() <= ss.repeat_interleave(16, 0)[:40] / 2 + 1e-6)
    v = torch.randn(6, 40)
    mask = torch.rand(6, 40) < 0.2
    rp, col, val = csr_from_mask(v, mask)
    assert col.dtype == torch.int16 and rp[-1] == int(mask.sum())
    dense = sparse_to_dense(rp, col, val, 6, 40)
    assert torch.equal(dense, torch.where(mask, v, torch.zeros_like(v)))
    x = torch.randn(2, 3, 40)
    assert torch.allclose(sparse_linear(x, rp, col, val, 6), x @ dense.t(), atol=1e-5)


def test_end_to_end_export_reload(tmp_path):
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=3)
    calib = torch.randint(0, 256, (4, 64))
    q = run("spqr", copy.deepcopy(m), {"bits": 3, "group_size": 16}, calib, outlier_fraction=0.01)
    mod = q.model.layers[1].self_attn.q_proj
    assert isinstance(mod, MixedLinear) and mod.stat_bits == 3 and mod.nnz == round(0.01 * 64 * 16) * 4
    assert 3.5 < mod.bits_per_weight() < 4.5
    x = torch.randint(0, 256, (2, 24))
    y = q(x).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(x).logits, y)
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(x).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="outlier_fraction"):
        run("spqr", m, "w3g32", calib, outlier_fraction=2)
    with pytest.raises(ValueError, match="stat_bits"):
        run("spqr", m, "w3g32", calib, stat_bits=9)
    with pytest.raises(ValueError, match="calibration"):
        run("spqr", m, "w3g32", None)
