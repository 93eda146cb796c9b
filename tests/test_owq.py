"""OWQ: weak columns kept in fp16, the rest by GPTQ against the Schur complement."""

import copy

import pytest
import torch

from qft.export import load, save
from qft.nn.mixed import MixedLinear
from qft.ptq import run
from qft.ptq.gptq import gptq_quantize
from qft.ptq.owq import column_sensitivity, owq_quantize, select_columns
from qft.testing import tiny_llama


def _err(w, wq, h):
    e = (w - wq).double()
    return float(torch.trace(e @ h.double() @ e.t()))


def test_keeps_most_sensitive_columns_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    d = torch.rand(64) + 0.1
    d[[3, 17, 40]] = 100.0  # three input channels with huge activations
    h = torch.diag(d)  # uncorrelated inputs: no compensation, kept columns stay exactly w
    idx = select_columns(w, h, 3, 32, 3)
    assert idx.tolist() == [3, 17, 40]
    w_q, scale, zero, col_w = owq_quantize(w, h, idx, 3, 32)
    assert torch.equal(col_w, w[:, idx])
    assert torch.all(w_q[:, idx] == 0)
    from qft.nn import quant as Q
    codes = Q.quantize(w_q, scale, zero, 3, 32)
    m = MixedLinear.from_parts(codes, zero, 3, 32, scales=scale, col_idx=idx, col_weight=col_w)
    eff = m.dequantize()
    assert torch.equal(eff[:, idx], w[:, idx])
    x = torch.randn(5, 64)
    assert torch.allclose(m(x), x @ eff.t(), atol=1e-5)


def test_compensation_beats_gptq_at_same_grid():
    torch.manual_seed(1)
    x = torch.randn(512, 64)
    x[:, [5, 9]] *= 20
    x = x + 0.5 * x[:, :1]  # correlated inputs
    h = 2 * x.t() @ x / 512
    w = torch.randn(48, 64)
    g = gptq_quantize(w, h, 3, 32, act_order=True)
    idx = select_columns(w, h, 3, 32, 2)
    assert set(idx.tolist()) == {5, 9}
    assert float(column_sensitivity(w, h, 3, 32)[5]) > float(column_sensitivity(w, h, 3, 32)[0])
    w_q, _, _, col_w = owq_quantize(w, h, idx, 3, 32)
    eff = w_q.clone()
    eff[:, idx] = col_w
    plain = w_q.clone()
    plain[:, idx] = w[:, idx]  # the kept columns without the feedback
    e_owq, e_plain, e_gptq = _err(w, eff, h), _err(w, plain, h), _err(w, g.w_q, h)
    assert e_owq < e_plain and e_owq < 0.7 * e_gptq


def test_end_to_end_export_reload(tmp_path):
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=2, tie=True)
    calib = torch.randint(0, 256, (4, 64))
    q = run("owq", copy.deepcopy(m), "w3g32", calib, col_fraction=0.05)
    mod = q.model.layers[0].mlp.down_proj
    assert isinstance(mod, MixedLinear) and mod.n_cols == round(0.05 * 128)
    assert 3.0 + 19 / 32 < mod.bits_per_weight() < 3.0 + 19 / 32 + 16 * 0.05 + 0.05
    x = torch.randint(0, 256, (2, 24))
    y = q(x).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(x).logits, y)
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    h = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert isinstance(h.model.layers[0].mlp.down_proj, MixedLinear)
    assert torch.equal(h(x).logits, y)
    # a fresh process that never imported the PTQ methods finds the module type too
    import subprocess
    import sys
    code = (f"import torch, qft; m = qft.load({str(tmp_path / 'ck')!r}); "
            f"print(type(m.model.layers[0].mlp.down_proj).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "MixedLinear", out.stderr[-2000:]


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="col_fraction"):
        run("owq", m, "w3g32", calib, col_fraction=0.9)
    with pytest.raises(ValueError, match="calibration"):
        run("owq", m, "w3g32", None)
    with pytest.raises(ValueError, match="unknown option"):
        run("owq", m, "w3g32", calib, colfraction=0.1)
