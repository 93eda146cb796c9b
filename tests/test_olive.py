"""OliVe: outlier-victim pair encode/decode as specified, packing, the method, export."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.export import load, save
from qft.nn.olive_codec import (OliVeLinear, outlier_levels, ovp_decode, ovp_encode, ovp_qdq, pack_pairs,
                                unpack_pairs)
from qft.ptq import run
from qft.ptq.olive import search_weight_scale
from qft.spec import QuantSpec
from qft.testing import tiny_llama


def test_pairs_round_trip_as_specified():
    x = torch.tensor([[3.2, -6.6,    # both normal: rounded integers
                       42.0, 2.0,    # outlier + victim: 42 -> nearest abfloat level 48, 2 -> 0
                       -1.0, -90.0,  # victim first, negative outlier second: -90 saturates at -64
                       20.0, -57.0,  # both outliers: the larger (-57 -> -64) stays, 20 is the victim
                       7.4, -7.6]])  # 7.4 is normal (7); -7.6 rounds beyond 7: outlier -8, 7.4 is its victim
    c = ovp_encode(x, 4)
    assert c.tolist() == [[3, (-7) & 15, 0b0110, 8, 8, 0b1111, 8, 0b1111, 8, 0b1001]]
    assert ovp_decode(c, 4).tolist() == [[3.0, -7.0, 48.0, 0.0, 0.0, -64.0, 0.0, -64.0, 0.0, -8.0]]
    assert outlier_levels(4)[1:].tolist() == [8, 12, 16, 24, 32, 48, 64]
    assert (outlier_levels(8)[1:] >= 128).all()  # 8-bit outliers start above the int8 range
    assert not ((c[:, 0::2] == 8) & (c[:, 1::2] == 8)).any()  # never two identifiers in a pair


def test_random_round_trip_properties():
    torch.manual_seed(0)
    for bits in (4, 8):
        nmax = 2 ** (bits - 1) - 1
        x = torch.randn(64, 128) * nmax / 2
        x[torch.rand_like(x) < 0.01] *= 30  # sparse outliers
        d = ovp_decode(ovp_encode(x, bits), bits)
        pair_out = ((x.abs() > nmax + 0.5).reshape(64, 64, 2).any(-1))
        normal = ~pair_out.repeat_interleave(2, 1)
        assert torch.equal(d[normal], torch.round(x[normal]))  # normal pairs: exact integer rounding
        dp, xp = d.reshape(64, 64, 2)[pair_out], x.reshape(64, 64, 2)[pair_out]
        assert ((dp == 0).sum(-1) == 1).all()  # exactly one victim per outlier pair
        kept = dp.abs().argmax(-1)
        assert torch.equal(kept, xp.abs().argmax(-1))  # the larger one is kept
        big = xp.abs().amax(-1)
        inside = big <= outlier_levels(bits)[-1]  # beyond the top level the code saturates
        rel = (dp.abs().amax(-1) - big).abs()[inside] / big[inside]
        assert rel.max() < (0.21 if bits == 4 else 0.06)  # nearest level of a float with 1 / 3 mantissa bits
        assert (dp.abs().amax(-1)[~inside] == outlier_levels(bits)[-1]).all()
        codes = ovp_encode(x, bits)
        assert torch.equal(unpack_pairs(pack_pairs(codes, bits), bits), codes)


def test_weight_scale_search_beats_plain_int4():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 128))
    s = search_weight_scale(w, 4)
    e_ovp = (ovp_qdq(w, s.unsqueeze(1), 4) - w).pow(2).sum()
    s_int = w.abs().amax(1, keepdim=True) / 7
    e_int = (torch.round(w / s_int).clamp(-7, 7) * s_int - w).pow(2).sum()
    assert e_ovp < 0.5 * e_int, (e_ovp, e_int)


def test_olive_beats_rtn_on_weight_outliers():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sparse large weights, the case OVP is built for
        for name, p in m.model.layers.named_parameters():
            if p.dim() == 2:
                p[torch.rand(p.shape, generator=g) < 0.005] *= 25
    w = torch.randint(0, 256, (4, 64))
    spec = QuantSpec(bits=4, group_size=None)
    q = run("olive", copy.deepcopy(m), spec, None)  # weights only: no calibration needed
    kq = evaluate(q, w, teacher=m, progress=False)["kl"]
    for sym in (True, False):
        kr = evaluate(run("rtn", copy.deepcopy(m), spec.replace(symmetric=sym)), w, teacher=m, progress=False)["kl"]
        assert kq < 0.5 * kr, (kq, kr, sym)


def test_olive_w4a8_and_export(tmp_path):
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=4)
    calib = torch.randint(0, 256, (8, 64))
    w = torch.randint(0, 256, (4, 64))
    q = run("olive", copy.deepcopy(m), QuantSpec(bits=4, group_size=None, act_bits=8), calib)
    assert isinstance(q.model.layers[0].mlp.up_proj, OliVeLinear)
    assert evaluate(q, w, teacher=m, progress=False)["kl"] < 0.01
    lin = q.model.layers[0].self_attn.v_proj
    assert lin.qweight.shape == (lin.out_features, lin.in_features // 2)  # one byte per pair
    assert 0 < float(lin.act_scale) < float(lin.wscale.max()) * 1e6
    y = q(w).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(w).logits, y)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(w).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="bits=3"):
        run("olive", m, QuantSpec(bits=3, group_size=None), None)
    with pytest.raises(ValueError, match="group_size=64"):
        run("olive", m, "w4a8", torch.randint(0, 256, (2, 16)))
    with pytest.raises(ValueError, match="calibration windows"):
        run("olive", m, QuantSpec(bits=4, group_size=None, act_bits=8), None)
    with pytest.raises(ValueError, match="must be even"):
        ovp_encode(torch.zeros(3, 5))
