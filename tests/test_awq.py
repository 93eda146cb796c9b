"""AWQ: scale search, folding keeps the float model, clip search, composition with GPTQ."""

import pytest
import torch

from qft.nn import QuantLinear
from qft.nn import quant as Q
from qft.ptq import run
from qft.ptq.awq import _fold, _gqa_layout, _scale_groups, search_clip, search_scale
from qft.ptq.calibrate import calib_windows
from qft.spec import QuantSpec
from qft.testing import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "c.txt"
    p.write_text(SAMPLE_TEXT)
    return calib_windows(tiny_tokenizer(), p, n=8, seq_len=64)


def outlier_inputs(seed=0, t=1024, k=128, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :6] *= 20  # salient input channels
    return x, torch.randn(n, k, generator=g)


def test_search_scale_protects_salient_channels():
    x, W = outlier_inputs()
    s, alpha, loss = search_scale(x, x.abs().mean(0), W, 3, 32, False, grid=20)
    rtn = (x @ (W - Q.qdq_weight(W, 3, 32)).t()).pow(2).mean().item()
    assert alpha > 0 and loss < 0.9 * rtn
    assert s[:6].min() > s[6:].max()  # the outlier channels get the largest scales


def test_search_clip_never_worse_than_minmax():
    x, W = outlier_inputs(seed=1)
    s, z = search_clip(x, W, 3, 32, False, grid=20, max_shrink=0.5)
    s0, z0 = Q.minmax_qparams(W, 3, 32, False)

    def err(s, z):
        D = (W - Q.dequantize(Q.quantize(W, s, z, 3, 32), s, z, 32)).reshape(64, 4, 32)
        return torch.einsum("tgk,ngk->tng", x.reshape(-1, 4, 32), D).pow(2).sum(0)
    e, e0 = err(s, z), err(s0, z0)
    assert (e <= e0 * (1 + 1e-5)).all() and e.sum() < 0.95 * e0.sum()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_fold_keeps_float_block_output(heads, kv_heads):
    model = tiny_llama(heads=heads, kv_heads=kv_heads)
    block = model.model.layers[0]
    for p in block.parameters():  # non-trivial norms
        p.data += 0.01 * torch.randn_like(p)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    g = torch.Generator().manual_seed(0)
    groups = _scale_groups(block)
    assert [k for _, _, k in groups] == ["norm", "v_o", "norm", "up_down"]
    for prev, lins, kind in groups:
        k = block.get_submodule(lins[0]).in_features
        s = torch.rand(k, generator=g) + 0.5
        layout = None
        if kind == "v_o":
            layout = _gqa_layout(block, prev, lins[0])
            n_kv, rep, hd = layout
            assert (n_kv, rep) == (kv_heads, heads // kv_heads)
            s = s.view(n_kv, rep, hd)[:, :1].expand(n_kv, rep, hd).reshape(-1)  # tied across the group
        _fold(block, prev, kind, s, lins, layout)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_awq_model(calib):
    ref = tiny_llama(heads=4, kv_heads=2)
    with torch.no_grad():
        fp = ref(input_ids=calib).logits
    errs = {}
    for method in ("rtn", "awq", "awq_gptq"):
        m = tiny_llama(heads=4, kv_heads=2)
        run(method, m, QuantSpec(bits=3, group_size=32), calib=calib)
        with torch.no_grad():
            errs[method] = (m(input_ids=calib).logits - fp).pow(2).mean().item()
        for q in (x for x in m.modules() if isinstance(x, QuantLinear)):
            w, s, z, u = q.weight.data.clone(), q.scale.clone(), q.zero.clone(), q.codes()
            q.requantize(w, scale=s, zero=z)
            assert torch.equal(q.codes(), u)
            if method != "rtn":  # the stored weight is the method's grid point
                assert torch.equal(q.dequantize(torch.float32), w)
        if method != "rtn":  # scales were folded into the norms
            assert not torch.equal(m.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)
    assert errs["awq"] < errs["rtn"] and errs["awq_gptq"] < errs["awq"]


def test_gqa_misaligned_heads_skip_o_proj_with_warning(calib, monkeypatch):
    m = tiny_llama(heads=4, kv_heads=2)
    attn = m.model.layers[0].self_attn
    attn.head_dim = 24  # does not divide the v/o widths: no head-wise alignment
    assert _gqa_layout(m.model.layers[0], "self_attn.v_proj", "self_attn.o_proj") is None
    attn.head_dim = 16
    import qft.ptq.awq as awq_mod
    monkeypatch.setattr(awq_mod, "_gqa_layout", lambda *a: None)
    ref = tiny_llama(heads=4, kv_heads=2)
    with pytest.warns(UserWarning, match="o_proj not scaled"):
        run("awq", m, QuantSpec(bits=4, group_size=32), calib=calib, clip=False)
    # o_proj was not scaled, so with clip off it is plain round-to-nearest of the float weight
    for layer, layer0 in zip(m.model.layers, ref.model.layers):
        o, o0 = layer.self_attn.o_proj, layer0.self_attn.o_proj
        assert torch.equal(o.dequantize(torch.float32), Q.qdq_weight(o0.weight.data, 4, 32))
        assert not torch.equal(layer.self_attn.q_proj.dequantize(torch.float32),
                               Q.qdq_weight(layer0.self_attn.q_proj.weight.data, 4, 32))


def test_awq_bad_options(calib):
    m = tiny_llama()
    with pytest.raises(ValueError, match="awq needs calibration data"):
        run("awq", m, QuantSpec())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\]"):
        run("awq", m, QuantSpec(), calib=calib, alpha=0.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['percdamp'\]"):
        run("awq", m, QuantSpec(), calib=calib, percdamp=0.1)  # a GPTQ option: only for awq_gptq
    with pytest.raises(ValueError, match="max_shrink=1.5 is not valid"):
        run("awq_gptq", m, QuantSpec(), calib=calib, max_shrink=1.5)


def test_duo_scales_are_extra_candidates_never_worse():
    from qft.ptq.awq import weight_mean
    x, W = outlier_inputs(seed=3)
    W[:, 40:48] *= 0.05  # columns small relative to their group: duo scales can lift them
    _, _, plain = search_scale(x, x.abs().mean(0), W, 3, 32, False, grid=10)
    _, a, duo = search_scale(x, x.abs().mean(0), W, 3, 32, False, grid=10, duo=True)
    assert duo <= plain
    wm = weight_mean(W, 32)
    assert wm.shape == (128,) and 0 < wm.min() and wm.max() <= 1 and wm[40:48].max() < wm[48:].min()


def test_gptq_in_the_scale_search_never_worse_than_gptq():
    from qft.ptq.awq_search import hessian_error, scaled_hessian
    from qft.ptq.gptq import gptq_quantize
    x, W = outlier_inputs(seed=4)
    H = 2 * x.t() @ x / len(x)
    plain = gptq_quantize(W, H, 3, 32, False, 0.01, clip_grid=10).w_q

    def quant(Ws, s):
        Hs, damp = scaled_hessian(H, s, 0.01, damp_unscaled=True)
        return gptq_quantize(Ws, Hs, 3, 32, False, damp, clip_grid=10).w_q
    e_plain = hessian_error(W, plain, H)
    e_one = hessian_error(W, quant(W, torch.ones(128)), H)  # alpha = 0: plain GPTQ up to float rounding
    assert abs(e_one - e_plain) < 0.01 * e_plain
    s, alpha, loss = search_scale(None, x.abs().mean(0), W, 3, 32, False, grid=10, quantize=quant,
                                  error=lambda Wq: hessian_error(W, Wq, H))
    assert loss <= e_one * (1 + 1e-6) and loss < e_plain
    rtn_s, _, _ = search_scale(x, x.abs().mean(0), W, 3, 32, False, grid=10)
    assert hessian_error(W, quant(W * rtn_s, rtn_s) / rtn_s, H) >= loss * (1 - 1e-6)


def test_asym_clip_never_worse_than_joint_clip():
    from qft.ptq.awq_search import asym_clip_qparams
    x, W = outlier_inputs(seed=5)
    W[:, :32] += 0.8 * W[:, :32].abs()  # skewed groups: max and min want different shrinks
    spec = QuantSpec(bits=3, group_size=32)
    H = x.t() @ x

    def out_err(s, z):
        D = W - Q.dequantize(Q.quantize(W, s, z, 3, 32), s, z, 32)
        return ((D @ H) * D).sum().item()
    joint = out_err(*search_clip(x, W, 3, 32, False, grid=20, max_shrink=0.5))
    asym = out_err(*asym_clip_qparams(W, H, spec, grid=20, max_shrink=0.5, rounds=1))
    assert asym <= joint * (1 + 1e-5) and asym < 0.99 * joint


@pytest.mark.parametrize("method,opts", [
    ("awq", dict(objective="hessian", search_quant="final", clip_method="asym", grid=5)),
    ("awq", dict(objective="block", block_windows=4, batch_size=4, grid=5)),
    ("awq_gptq", dict(objective="hessian", search_quant="final", clip=False, grid=5))])
def test_awq_search_options_model(calib, method, opts):
    ref = tiny_llama(heads=4, kv_heads=2)
    with torch.no_grad():
        fp = ref(input_ids=calib).logits
    errs = {}
    for name, o in (("rtn", {}), (method, opts)):
        m = tiny_llama(heads=4, kv_heads=2)
        run(name, m, QuantSpec(bits=3, group_size=32), calib=calib, **o)
        with torch.no_grad():
            errs[name] = (m(input_ids=calib).logits - fp).pow(2).mean().item()
    assert errs[method] < 0.8 * errs["rtn"]


@pytest.mark.parametrize("key,value", [("objective", "mse"), ("search_quant", "gptq"), ("clip_method", "minmax"),
                                       ("clip_rounds", -1), ("block_windows", 0)])
def test_awq_search_options_rejected(calib, key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r} is not valid"):
        run("awq", tiny_llama(), QuantSpec(), calib=calib, **{key: value})


def test_attn_error_measures_the_attention_output_and_restores_weights(calib):
    from qft.ptq.awq_search import attn_error
    from qft.ptq.calibrate import BlockContext, capture_block_inputs
    m = tiny_llama(heads=4, kv_heads=2)
    inputs, kwargs = capture_block_inputs(m, calib, "cpu", batch_size=4)
    block = m.model.layers[0]
    ctx = BlockContext(0, "model.layers.0", block, QuantSpec(), inputs, kwargs, {}, "cpu")
    lins = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    W = torch.cat([block.get_submodule(n).weight.data for n in lins])
    err = attn_error(ctx, lins, n_windows=4)
    assert err(W) == 0
    Wv = W.clone()
    Wv[-block.self_attn.v_proj.out_features:] *= 1.1  # v errors reach the output linearly
    assert err(Wv) > 0 and err(Q.qdq_weight(W, 2, 32)) > 0
    assert torch.equal(torch.cat([block.get_submodule(n).weight.data for n in lins]), W)


def test_method_defaults():
    from qft.ptq.awq import _split_options
    a, g = _split_options("awq", {}, with_gptq=False)
    assert (a.objective, a.search_quant, a.clip_method, a.grid, g) == ("block", "final", "asym", 20, None)
    a, g = _split_options("awq_gptq", {}, with_gptq=True)
    assert (a.objective, a.search_quant, a.clip_method, a.grid) == ("hessian", "final", "asym", 10)
    a, _ = _split_options("awq_gptq", {"objective": "tokens", "grid": 20, "search_quant": "rtn"}, with_gptq=True)
    assert (a.objective, a.grid, a.search_quant) == ("tokens", 20, "rtn")  # the earlier behaviour, on request
