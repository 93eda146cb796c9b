"""RPTQ: k-means clustering, exact reordering folded into norms/weights, per-cluster static acts, export."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.export import load, save
from qft.nn.reorder import ClusterQuantLinear, FoldedRMSNorm, static_act_qdq
from qft.ptq import run
from qft.ptq.rptq import SITES, _permute_site, cluster_channels, cluster_qparams, kmeans
from qft.spec import QuantSpec
from qft.testing import tiny_llama


def _outlier_model(seed=1):
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=seed)
    with torch.no_grad():  # channels of very different ranges after the norms, as in real LLMs
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= torch.tensor([30.0, 12.0, 6.0])
    return m


def test_kmeans_separates_ranges():
    lo = torch.cat([torch.full((10,), -1.0), torch.full((5,), -20.0), torch.full((3,), -100.0)])
    hi = -lo
    labels, perm = cluster_channels(lo + 0.01 * torch.randn(18), hi, 3)
    assert labels.tolist() == [0] * 10 + [1] * 5 + [2] * 3  # ranked by range, narrowest first
    assert torch.equal(labels[perm], torch.sort(labels).values)  # contiguous after reordering
    assert kmeans(torch.randn(5, 2), 8).max() < 5  # more clusters than points: one per point at most
    s, z = cluster_qparams(lo, hi, labels, 8)
    assert torch.allclose(s, torch.tensor([2.0, 40.0, 200.0]) / 255)


def test_reordering_is_exact_in_float():
    m = _outlier_model()
    x = torch.randint(0, 256, (2, 24))
    ref = m(x).logits
    g = torch.Generator().manual_seed(0)
    for layer in m.model.layers:
        for site in ("attn_in", "mlp_in", "down_in"):
            k = layer.mlp.down_proj.in_features if site == "down_in" else 64
            _permute_site(layer, site, torch.randperm(k, generator=g))
    assert isinstance(m.model.layers[0].input_layernorm, FoldedRMSNorm)
    assert torch.allclose(m(x).logits, ref, atol=1e-5)


def test_static_cluster_quant_grid():
    x = torch.randn(7, 6) * torch.tensor([1.0, 1.0, 1.0, 50.0, 50.0, 50.0])
    cl = torch.tensor([0, 0, 0, 1, 1, 1])
    s, z = cluster_qparams(x.amin(0), x.amax(0), cl, 4)
    q = static_act_qdq(x, s, z, cl, 4)
    assert ((q - x).abs() <= s[cl] / 2 + 1e-5).all()  # inside the calibrated range: round to nearest
    assert len(torch.unique(q[:, :3])) <= 16
    one = cluster_qparams(x.amin(0), x.amax(0), torch.zeros(6, dtype=torch.long), 4)
    err1 = (static_act_qdq(x, *one, torch.zeros(6, dtype=torch.long), 4) - x)[:, :3].abs().mean()
    assert (q - x)[:, :3].abs().mean() < err1 / 5  # the narrow cluster keeps its own fine grid


def test_rptq_beats_one_cluster_and_exports(tmp_path):
    m = _outlier_model()
    calib = torch.randint(0, 256, (8, 64))
    w = torch.randint(0, 256, (4, 64))
    spec = QuantSpec(bits=8, group_size=None, act_bits=4)  # activation error dominates
    q8 = run("rptq", copy.deepcopy(m), spec, calib, clusters=8)
    q1 = run("rptq", copy.deepcopy(m), spec, calib, clusters=1)
    lay = q8.model.layers[0]
    assert isinstance(lay.input_layernorm, FoldedRMSNorm) and isinstance(lay.mlp.down_proj, ClusterQuantLinear)
    cl = lay.self_attn.q_proj.act_cluster
    assert torch.all(cl[1:] >= cl[:-1]) and int(cl.max()) >= 4  # reordered: clusters are contiguous
    kl8 = evaluate(q8, w, teacher=m, progress=False)["kl"]
    kl1 = evaluate(q1, w, teacher=m, progress=False)["kl"]
    assert kl8 < 0.7 * kl1, (kl8, kl1)
    y = q8(w).logits
    save(q8, tmp_path / "ck", format="qft")
    r = load(tmp_path / "ck")
    assert isinstance(r.model.layers[1].self_attn.o_proj, ClusterQuantLinear)
    assert torch.equal(r(w).logits, y)


def test_rptq_gptq_weights_and_transformers_loading(tmp_path):
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    m = _outlier_model()
    q = run("rptq", m, "w4a8", torch.randint(0, 256, (4, 48)), weights="gptq", clusters=4)
    w = torch.randint(0, 256, (2, 32))
    y = q(w).logits
    save(q, tmp_path / "ck", format="qft")
    h = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert isinstance(h.model.layers[0].mlp.gate_proj, ClusterQuantLinear)
    assert torch.equal(h(w).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match="act_bits=None"):
        run("rptq", m, "w4g64", calib)
    with pytest.raises(ValueError, match="calibration windows"):
        run("rptq", m, "w4a8", None)
    with pytest.raises(ValueError, match="clusters=0"):
        run("rptq", m, "w4a8", calib, clusters=0)
    with pytest.raises(ValueError, match="weights='awq'"):
        run("rptq", m, "w4a8", calib, weights="awq")
    assert set(SITES) == {"attn_in", "o_in", "mlp_in", "down_in"}
