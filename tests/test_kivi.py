"""KIVI KV cache: packing, per-channel / per-token quantization, the Cache class in the loop."""

import pytest
import torch
from transformers import DynamicCache

from qft.eval import evaluate
from qft.nn.kv_cache import (KIVICache, dequantize_keys, pack_codes, qdq_keys, qdq_values, quantize_keys,
                             unpack_codes)
from qft.ptq.kivi import evaluate_kv, kivi_cache
from qft.testing import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(hidden=64, heads=4, kv_heads=2, layers=2)  # head_dim 16


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    c = torch.randint(0, 2 ** bits, (3, 5, 16), dtype=torch.uint8)
    p = pack_codes(c, bits)
    assert p.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack_codes(p, bits), c)


def test_keys_per_channel_values_per_token():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 64, 16)
    k[..., 5] *= 100  # an outlier channel: per-channel key scales keep the other channels fine
    err = (qdq_keys(k, 2, 32) - k).abs()
    assert err[..., 5].max() > 10 * err[..., :5].max()
    q = quantize_keys(k, 2, 32)
    assert q["scale"].shape == (2, 3, 16, 2)  # one scale per channel per group of 32 tokens
    scale = q["scale"].float().repeat_interleave(32, -1).transpose(2, 3)
    assert (err <= scale / 2 + 1e-3).all()  # round to nearest on the grid
    v = torch.randn(2, 3, 64, 16)
    v[:, :, 7] *= 100  # an outlier token: per-token value scales keep the other tokens fine
    ev = (qdq_values(v, 4, 8) - v).abs()
    assert ev[:, :, 7].max() > 10 * ev[:, :, :7].max()
    assert torch.allclose(dequantize_keys(quantize_keys(k, 8, 32), 8, 32), k, atol=k.abs().max() / 100)


def test_chunked_fp_cache_matches_full_forward(model):
    w = torch.randint(0, 256, (3, 96))
    ref = evaluate(model, w, progress=False)["ppl"]
    got = evaluate_kv(model, w, lambda: DynamicCache(), chunk_size=16, progress=False)["ppl"]
    assert abs(got - ref) / ref < 1e-5


def test_kivi_in_the_loop(model):
    w = torch.randint(0, 256, (2, 96))
    ref = evaluate(model, w, progress=False)["nll"]
    r8 = evaluate_kv(model, w, kivi_cache(model, bits=8, group_size=8, residual_length=16), 8, progress=False)
    r2 = evaluate_kv(model, w, kivi_cache(model, bits=2, group_size=8, residual_length=16), 8, progress=False)
    assert abs(r8["nll"] - ref) < 1e-3 < abs(r2["nll"] - ref) + 1e-3
    # token by token equals chunks of G when the window is a multiple of G (same quantized past)
    r1 = evaluate_kv(model, w, kivi_cache(model, bits=2, group_size=8, residual_length=16), 1, progress=False)
    assert abs(r1["nll"] - r2["nll"]) < 1e-5
    kv = r2["kv"]
    assert kv["tokens"] == 96 and kv["quantized_tokens"] == 80  # 96 - 16 recent = 80 = 10 groups of 8
    assert 0.5 < kv["saved"] < 0.9


def test_window_and_memory_accounting(model):
    c = KIVICache(model.config, bits=2, group_size=8, residual_length=16)
    k = torch.randn(1, 2, 50, 16)
    layer_out = c.update(k, k.clone(), 0)
    assert torch.equal(layer_out[0], k)  # the step that adds tokens sees them in full precision
    lay = c.layers[0]
    assert lay.n_quantized == 32 and lay.keys.shape[-2] == 18 and lay.get_seq_length() == 50
    for _ in range(7):
        c.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
        assert 16 <= lay.keys.shape[-2] < 24 and lay.n_quantized % 8 == 0
    m = lay.memory()
    # codes: 2 bits of keys + values; stats: fp16 scale and min per group; window: fp16
    nq, nf = lay.n_quantized, lay.keys.shape[-2]
    codes = 2 * (2 * nq * 16 * 2 // 8)                 # keys and values, 2 heads x nq tokens x 16 ch
    key_stats = 2 * 16 * (nq // 8) * 2 * 2             # per head, channel, group of 8 tokens; scale+min
    value_stats = 2 * nq * (16 // 8) * 2 * 2           # per head, token, group of 8 channels; scale+min
    window = 2 * (2 * nf * 16) * 2
    expect = codes + key_stats + value_stats + window
    assert m["bytes"] == expect and m["fp16_bytes"] == 2 * 2 * 57 * 16 * 2


def test_generate_with_kivi(model):
    x = torch.randint(0, 256, (2, 20))
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(x, **kw)
    same = model.generate(x, past_key_values=KIVICache(model.config, 2, 8, residual_length=64), **kw)
    assert torch.equal(ref, same)  # everything inside the full-precision window: identical
    opts = KIVICache(model.config, 2, 8, residual_length=64, sink_tokens=2, pre_rope=True)
    assert torch.equal(ref, model.generate(x, past_key_values=opts, **kw))
    cache = KIVICache(model.config, 2, 8, residual_length=8)
    out = model.generate(x, past_key_values=cache, **kw)
    assert out.shape == ref.shape and cache.layers[0].n_quantized > 0


def test_bad_settings(model):
    with pytest.raises(ValueError, match="group_size=32 does not divide head_dim=16"):
        KIVICache(model.config, bits=2, group_size=32)
    with pytest.raises(ValueError, match="bits=3"):
        KIVICache(model.config, bits=3)
    with pytest.raises(ValueError, match="residual_length"):
        KIVICache(model.config, residual_length=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_kv(model, torch.zeros(1, 8, dtype=torch.long), lambda: DynamicCache(), chunk_size=0)


def test_sink_tokens_stay_exact(model):
    c = KIVICache(model.config, bits=2, group_size=8, residual_length=8, sink_tokens=3)
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    k[:, :, 0] *= 50  # a sink-like outlier token: kept out of the quantized groups
    c.update(k[:, :, :2], v[:, :, :2], 0)  # the sink fills across updates
    out_k, out_v = c.update(k[:, :, 2:], v[:, :, 2:], 0)
    lay = c.layers[0]
    assert lay.n_sink() == 3 and lay.n_quantized == 24 and lay.keys.shape[-2] == 13
    assert lay.get_seq_length() == 40
    out_k, _ = c.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert torch.equal(out_k[:, :, :3], k[:, :, :3])  # exact, although quantized tokens follow
    err = (out_k[:, :, 3:27] - k[:, :, 3:27]).abs().max()
    plain = KIVICache(model.config, bits=2, group_size=8, residual_length=8)
    pk, _ = plain.update(k, v, 0)
    pk, _ = plain.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert err < (pk[:, :, :24] - k[:, :, :24]).abs().max() / 5  # the outlier no longer stretches a group
    m = lay.memory()
    assert m["fp16_bytes"] == 2 * 2 * 41 * 16 * 2


@pytest.mark.parametrize("sink", [0, 3])
def test_sink_and_pre_rope_chunks_match_token_by_token(model, sink):
    w = torch.randint(0, 256, (2, 96))
    make = kivi_cache(model, bits=2, group_size=8, residual_length=16, sink_tokens=sink, pre_rope=True)
    r8 = evaluate_kv(model, w, make, 8, progress=False)  # first chunk 8 + sink tokens: groups line up
    r1 = evaluate_kv(model, w, make, 1, progress=False)
    assert abs(r8["nll"] - r1["nll"]) < 1e-5
    assert r8["kv"]["quantized_tokens"] == (96 - sink - 16) // 8 * 8


def test_pre_rope_is_exact_at_8_bits_and_helps_rotated_outlier_channels(model):
    from qft.nn.kv_cache import rope_inv_freq, rotate
    inv = rope_inv_freq(model.config)
    assert inv.shape == (8,)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 16)
    pos = torch.arange(64)
    assert torch.allclose(rotate(rotate(x, pos, inv, -1.0), pos, inv), x, atol=1e-5)
    # keys with a fixed large channel before RoPE: after RoPE it oscillates along the tokens
    pre = torch.randn(1, 2, 64, 16) * 0.1
    pre[..., 0] += 5.0
    k = rotate(pre, pos, inv)
    errs = {}
    for flag in (False, True):
        c = KIVICache(model.config, bits=2, group_size=8, residual_length=0, pre_rope=flag)
        c.update(k, k.clone(), 0)
        out_k, _ = c.update(k[:, :, :1], k[:, :, :1], 0)
        errs[flag] = (out_k[:, :, :64] - k).pow(2).mean().item()
    assert errs[True] < errs[False] / 4
    c = KIVICache(model.config, bits=8, group_size=8, residual_length=0, pre_rope=True)
    c.update(k, k.clone(), 0)
    out_k, _ = c.update(k[:, :, :1], k[:, :, :1], 0)
    assert torch.allclose(out_k[:, :, :64], k, atol=0.05)


def test_sink_and_pre_rope_bad_values(model):
    with pytest.raises(ValueError, match="sink_tokens=-1"):
        KIVICache(model.config, sink_tokens=-1, group_size=8)
    with pytest.raises(ValueError, match="pre_rope=True needs the model config"):
        KIVICache(None, pre_rope=True, group_size=8)
    with pytest.raises(ValueError, match="offset"):
        evaluate_kv(model, torch.zeros(1, 8, dtype=torch.long), lambda: DynamicCache(), offset=-2)
