"""GPTQ: error feedback beats RTN, act-order static groups, integers kept exactly by QuantLinear."""

import pytest
import torch

from qft.formats.gptq import to_gptq_v1
from qft.nn import QuantLinear
from qft.nn import quant as Q
from qft.ptq import run
from qft.ptq.calibrate import calib_windows
from qft.ptq.gptq import gptq_quantize
from qft.spec import QuantSpec
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


def correlated(seed=0, n=96, k=128, t=2048):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    X = torch.randn(t, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5) \
        + 0.05 * torch.randn(t, k, generator=g)
    X[:, :4] *= 8  # a few outlier channels, as in LLM activations
    return W, X, 2 * X.t() @ X / t


def out_err(X, W, Wq):
    return ((X @ (W - Wq).t()) ** 2).mean().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_layer_output(act_order, symmetric, bits):
    W, X, H = correlated(seed=bits)
    r = gptq_quantize(W, H, bits, 32, symmetric, act_order=act_order)
    rtn = Q.qdq_weight(W, bits, 32, symmetric)
    assert out_err(X, W, r.w_q) < 0.8 * out_err(X, W, rtn)
    # the result lies on the grid it reports
    u = Q.quantize(r.w_q, r.scale, r.zero, bits, 32)
    assert torch.equal(Q.dequantize(u, r.scale, r.zero, 32), r.w_q)


def test_act_order_static_groups():
    W, X, H = correlated(seed=7)
    r = gptq_quantize(W, H, 4, 32, act_order=True)
    assert r.perm is not None and not torch.equal(r.perm, torch.arange(128))
    s, z = Q.minmax_qparams(W, 4, 32, False)  # static: computed on the original weights and column order
    assert torch.equal(r.scale, s) and torch.equal(r.zero, z)
    lin = torch.nn.Linear(128, 96, bias=False)
    lin.weight.data = W
    q = QuantLinear.from_linear(lin, QuantSpec(bits=4, group_size=32))
    q.requantize(r.w_q, scale=r.scale, zero=r.zero).pack()
    t = to_gptq_v1(q.qweight, q.scales, q.zeros, 4, 32, 128)
    assert t["g_idx"].tolist() == [k // 32 for k in range(128)]  # plain g_idx
    assert torch.equal(q.dequantize(torch.float32), r.w_q)


def test_dampening_and_dead_inputs():
    W, X, H = correlated(seed=3)
    H[5, :] = 0
    H[:, 5] = 0  # an input that never fires
    r = gptq_quantize(W, H, 4, 32, percdamp=0.1)
    assert torch.isfinite(r.w_q).all() and r.loss >= 0
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=128"):
        gptq_quantize(W, H, 4, 48)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "c.txt"
    p.write_text(SAMPLE_TEXT)
    return calib_windows(tiny_tokenizer(), p, n=8, seq_len=64)


def test_gptq_model_integers_reproduced_by_requantize(calib):
    torch.manual_seed(0)
    model = tiny_llama()
    spec = QuantSpec(bits=3, group_size=32)
    run("gptq", model, spec, calib=calib)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and model.qft_spec == spec
    for m in qls:
        w, s, z, u = m.weight.data.clone(), m.scale.clone(), m.zero.clone(), m.codes()
        assert torch.equal(m.dequantize(torch.float32), w)  # the stored weight is GPTQ's grid point
        m.requantize(w, scale=s, zero=z)
        assert torch.equal(m.codes(), u)
        assert torch.equal(m.pack().dequantize(torch.float32), w)


def test_gptq_model_beats_rtn(calib):
    ref = tiny_llama()
    with torch.no_grad():
        fp = ref(input_ids=calib).logits
    errs = {}
    for method in ("rtn", "gptq"):
        m = tiny_llama()
        run(method, m, QuantSpec(bits=3, group_size=32), calib=calib)
        with torch.no_grad():
            errs[method] = (m(input_ids=calib).logits - fp).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_gptq_bad_options(calib):
    m = tiny_llama()
    with pytest.raises(ValueError, match="gptq needs calibration data"):
        run("gptq", m, QuantSpec())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['blocksize'\]"):
        run("gptq", m, QuantSpec(), calib=calib, blocksize=64)
    with pytest.raises(ValueError, match="percdamp=2 is not valid"):
        run("gptq", m, QuantSpec(), calib=calib, percdamp=2)
    with pytest.raises(ValueError, match="scheme='nf' is not supported"):
        run("gptq", m, QuantSpec(bits=4, scheme="nf"), calib=calib)


def test_group_grid_search_weighted_error_never_worse():
    from qft.ptq.gptq import group_qparams
    W, X, H = correlated(seed=11)
    d = torch.diag(H)
    s0, z0 = Q.minmax_qparams(W, 3, 32, False)
    s1, z1 = group_qparams(W, d, 3, 32, False, clip_grid=20, max_shrink=0.5)

    def werr(s, z):
        D = W - Q.dequantize(Q.quantize(W, s, z, 3, 32), s, z, 32)
        return (D.pow(2) * d).reshape(96, 4, 32).sum(-1)
    e0, e1 = werr(s0, z0), werr(s1, z1)
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < 0.95 * e0.sum()
    assert torch.equal(group_qparams(W, d, 3, 32, False, clip_grid=0)[0], s0)
    r0 = gptq_quantize(W, H, 2, 32, act_order=True)
    r1 = gptq_quantize(W, H, 2, 32, act_order=True, clip_grid=20)
    assert out_err(X, W, r1.w_q) < out_err(X, W, r0.w_q)
