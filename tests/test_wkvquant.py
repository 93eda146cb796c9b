"""WKVQuant: past-only cache (current token in full precision), 2-D quantization, calibration, export."""

import copy

import pytest
import torch

from qft.eval import evaluate
from qft.export import load, save
from qft.nn.wkv_cache import WKVCache, WKVProj, dequantize_2d, fake_quant_2d, quantize_2d, wkv_cache
from qft.ptq import run
from qft.ptq.kivi import evaluate_kv, kivi_cache
from qft.ptq.wkvquant import evaluate_wkv, past_only_attend, past_only_eval
from qft.testing import tiny_llama


def _model(seed=5):
    """Tiny Llama with sharp attention and K/V outlier channels with an offset, as in real LLMs."""
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2, seed=seed)  # head_dim 16
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            a.q_proj.weight *= 4
            a.k_proj.weight *= 2
            a.v_proj.weight *= 3
            a.k_proj.weight[[2, 19]] *= 6
            a.k_proj.weight[[2, 19], :8] += 0.5
            a.v_proj.weight[[5]] *= 6
            a.v_proj.weight[[5], :8] += 0.5
    return m


def test_two_dimensional_quantization():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 10, 16)
    x[..., 3] = x[..., 3] * 30 + 50  # one wide channel far from zero
    shift = torch.zeros(2, 16)
    shift[:, 3] = 50
    scale = torch.ones(2, 16)
    scale[:, 3] = 30
    plain = (dequantize_2d(quantize_2d(x, None, None, 4, 16), None, None, 4, 16) - x)
    smooth = (dequantize_2d(quantize_2d(x, shift, scale, 4, 16), shift, scale, 4, 16) - x)
    mask = torch.ones(16, dtype=torch.bool)
    mask[3] = False
    assert smooth[..., mask].abs().mean() < 0.2 * plain[..., mask].abs().mean()  # channel smoothing helps
    fq = fake_quant_2d(x, shift, scale, 4, 16)
    ref = dequantize_2d(quantize_2d(x, shift, scale, 4, 16), shift, scale, 4, 16)
    assert torch.allclose(fq, ref, atol=1e-4 * 30)  # the same grid as the cache
    s = scale.clone().requires_grad_(True)
    fake_quant_2d(x, shift, s, 4, 16).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0  # learnable through the rounding residue


def test_past_only_cache_keeps_current_tokens_exact():
    c = WKVCache(None, bits=2, group_size=8)
    k1, v1 = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    ok, ov = c.update(k1, v1, 0)
    assert torch.equal(ok, k1) and torch.equal(ov, v1)  # the tokens of this step: full precision
    k2, v2 = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    ok, ov = c.update(k2, v2, 0)
    assert torch.equal(ok[:, :, -1:], k2) and torch.equal(ov[:, :, -1:], v2)
    assert not torch.allclose(ok[:, :, :5], k1) and (ok[:, :, :5] - k1).abs().max() < 2  # past: 2-bit
    assert c.get_seq_length() == 6
    rep = c.memory_report()
    assert rep["tokens"] == 6 and rep["saved"] == pytest.approx(1 - (2 + 32 / 8) / 16)  # codes + fp16 step/min per 8


def test_past_only_attend_matches_definition():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    kq, vq = k + 0.3 * torch.randn_like(k), v + 0.3 * torch.randn_like(v)
    out = past_only_attend(q, k, v, kq, vq, None, 0.5, 2)
    for t in range(6):  # token t: quantized keys/values before it, its own in full precision
        kk = torch.cat([kq[:, :, :t], k[:, :, t:t + 1]], 2).repeat_interleave(2, 1)
        vv = torch.cat([vq[:, :, :t], v[:, :, t:t + 1]], 2).repeat_interleave(2, 1)
        p = torch.softmax((q[:, :, t:t + 1] @ kk.transpose(2, 3)) * 0.5, -1)
        assert torch.allclose(out[:, t], (p @ vv)[:, :, 0], atol=1e-5)


def test_wkvquant_calibration_cache_and_export(tmp_path):
    m = _model()
    calib = torch.randint(0, 256, (8, 64))
    w = torch.randint(0, 256, (3, 64))
    q = run("wkvquant", copy.deepcopy(m), None, calib, kv_bits=2, group_size=16, steps=10)
    k = q.model.layers[0].self_attn.k_proj
    assert isinstance(k, WKVProj) and torch.equal(k.weight, m.model.layers[0].self_attn.k_proj.weight)
    assert evaluate(q, w, progress=False)["ppl"] == pytest.approx(evaluate(m, w, progress=False)["ppl"])  # weights FP
    # token by token through the cache == one forward with past-only attention (same quantized past)
    r1 = evaluate_wkv(q, w, chunk_size=1, progress=False)
    with past_only_eval(q):
        rf = evaluate(q, w, progress=False)
    assert abs(r1["nll"] - rf["nll"]) < 1e-4
    plain = run("wkvquant", copy.deepcopy(m), None, calib, kv_bits=2, group_size=16, smooth=False)
    kl = {}
    for name, mod in (("plain", plain), ("wkv", q)):
        with past_only_eval(mod):
            kl[name] = evaluate(mod, w, teacher=m, progress=False)["kl"]
    assert kl["wkv"] < 0.7 * kl["plain"], kl  # the learned channel smoothing helps per-token quantization
    rs = evaluate_wkv(q, w, chunk_size=8, progress=False)
    kv2 = evaluate_kv(m, w, kivi_cache(m, bits=2, group_size=16, residual_length=0), 8, progress=False)
    ref = evaluate(m, w, progress=False)["nll"]
    assert rs["nll"] != ref and kv2["nll"] != ref
    save(q, tmp_path / "ck", format="qft")
    r = load(tmp_path / "ck")
    assert isinstance(r.model.layers[1].self_attn.v_proj, WKVProj)
    assert evaluate_wkv(r, w, chunk_size=8, progress=False)["nll"] == pytest.approx(rs["nll"], abs=1e-6)
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    h = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for a, b in zip(h.model.layers, q.model.layers):
        assert torch.equal(a.self_attn.k_proj.kv_scale, b.self_attn.k_proj.kv_scale)
        assert torch.equal(a.self_attn.v_proj.kv_shift, b.self_attn.v_proj.kv_shift)
    assert torch.equal(h(w).logits, q(w).logits)


def test_generate_with_wkv_cache():
    m = _model()
    q = run("wkvquant", copy.deepcopy(m), None, torch.randint(0, 256, (2, 32)), kv_bits=8, group_size=16, steps=2)
    x = torch.randint(0, 256, (2, 12))
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = m.generate(x, **kw)
    cache = wkv_cache(q)()
    out = q.generate(x, cache=cache, **kw)
    assert out.shape == ref.shape and cache.get_seq_length() == 12 + 7
    assert (out == ref).float().mean() > 0.8  # 8-bit past: nearly the same greedy tokens


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="bits=3"):
        run("wkvquant", m, None, torch.randint(0, 256, (2, 16)), kv_bits=3)
    with pytest.raises(ValueError, match="group_size=32 does not divide head_dim=16"):
        run("wkvquant", m, None, torch.randint(0, 256, (2, 16)), kv_bits=4)
    with pytest.raises(ValueError, match="calibration windows"):
        run("wkvquant", m, None, None, kv_bits=4, group_size=16)
    with pytest.raises(ValueError, match="no WKVProj"):
        wkv_cache(m)
