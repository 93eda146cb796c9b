"""OS+: shift+scale folding is exact before quantization, it beats plain W-A quantization, export."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.export import load, save
from qft.nn.qlinear import QuantLinear
from qft.nn.reorder import FoldedRMSNorm
from qft.ptq import run
from qft.ptq.osplus import _with_bias, apply_shift, shift_scale, tie_heads
from qft.ptq.smoothquant import apply_smoothing, smoothing_groups
from qft.spec import QuantSpec
from qft.testing import tiny_llama


def _asym_model(seed=2):
    """Tiny Llama whose norms have a bias on a few channels: asymmetric, concentrated outliers."""
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=seed)
    with torch.no_grad():
        for layer in m.model.layers:
            for name in ("input_layernorm", "post_attention_layernorm"):
                b = torch.zeros(64)
                b[[5, 22]] = torch.tensor([12.0, -8.0])
                norm = FoldedRMSNorm.from_norm(getattr(layer, name), bias=b)
                norm.weight[[9, 30]] *= 15
                setattr(layer, name, norm)
    return m


def test_shift_scale_formula():
    z, s = shift_scale(torch.tensor([-1.0, 2.0, -10.0]), torch.tensor([3.0, 4.0, 10.0]), t=2.0)
    assert torch.allclose(z, torch.tensor([1.0, 3.0, 0.0])) and torch.allclose(s, torch.tensor([1.0, 1.0, 5.0]))
    assert torch.equal(shift_scale(torch.tensor([-1.0]), torch.tensor([3.0]), 1.0, shift=False)[0], torch.zeros(1))
    v = torch.arange(8.0)  # 2 kv heads x 2 query heads x head_dim 2
    assert tie_heads(v, 2, 2, lambda t, d: t.amax(d)).tolist() == [2, 3, 2, 3, 6, 7, 6, 7]


def test_shift_and_scale_folding_is_exact():
    m = _asym_model()
    x = torch.randint(0, 256, (2, 24))
    ref = m(x).logits
    g = torch.Generator().manual_seed(0)
    for layer in m.model.layers:  # biased producers and consumers, as osplus_block makes them
        for mod in (layer.self_attn, layer.mlp):
            for n, lin in list(mod.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    setattr(mod, n, _with_bias(lin))
    for grp in smoothing_groups(m):
        k = grp.linears[0][1].in_features
        z = tie_heads(torch.randn(k, generator=g), grp.rep, grp.head_dim, lambda t, d: t.amax(d))
        s = tie_heads(torch.rand(k, generator=g) * 4 + 0.5, grp.rep, grp.head_dim, lambda t, d: t.amax(d))
        if not grp.linears[0][0].endswith("down_proj"):
            apply_shift(grp, z)
        apply_smoothing(grp, s)
        if grp.kind == "norm":
            grp.prev.bias.div_(s)
    assert torch.allclose(m(x).logits, ref, atol=1e-4)


def test_osplus_beats_plain_quantization_and_exports(tmp_path):
    m = _asym_model()
    calib = torch.randint(0, 256, (8, 64))
    w = torch.randint(0, 256, (4, 64))
    spec = QuantSpec(bits=8, group_size=None, act_bits=4)  # activation error dominates
    plain = run("rtn", copy.deepcopy(m), spec)
    q = run("osplus", copy.deepcopy(m), spec, calib)
    shift_only = run("osplus", copy.deepcopy(m), spec, calib, scale=False)
    kl = {k: evaluate(v, w, teacher=m, progress=False)["kl"] for k, v in
          (("plain", plain), ("osplus", q), ("shift", shift_only))}
    assert kl["osplus"] < 0.5 * kl["plain"] and kl["shift"] < kl["plain"], kl
    lay = q.model.layers[0]
    assert isinstance(lay.self_attn.q_proj, QuantLinear) and lay.self_attn.q_proj.bias is not None
    assert set(q.qft_osplus_thresholds.values()) <= set(q.qft_osplus_thresholds.values()) | {1.0}
    y = q(w).logits
    save(q, tmp_path / "ck", format="qft")
    r = load(tmp_path / "ck")
    assert isinstance(r.model.layers[1].post_attention_layernorm, FoldedRMSNorm)
    assert torch.equal(r(w).logits, y)
    import qft  # noqa: F401  (registers the transformers quantizer)
    from transformers import AutoModelForCausalLM
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(w).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match="act_bits=None"):
        run("osplus", m, "w4g64", calib)
    with pytest.raises(ValueError, match="calibration windows"):
        run("osplus", m, "w6a6", None)
    with pytest.raises(ValueError, match="grid="):
        run("osplus", m, "w6a6", calib, grid=(0.0,))
