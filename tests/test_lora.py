"""LoRA over a frozen quantized base: both modes through peft, training, exact merge, errors."""

import pytest
import torch

from qft.nn import QuantLinear, quant_linears, quantize_model
from qft.testing import tiny_llama
from qft.train.lora import QLoraLinear, QuantizerLoraLinear, apply_lora, merge_lora

MODES = [("qlora", "dynamic"), ("lora-in-quantizer", "dynamic"), ("lora-in-quantizer", "fixed"),
         ("lora-in-quantizer", "lwc")]


def _base_state(model):
    out = {}
    for n, m in quant_linears(model):
        for k, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            out[f"{n}.{k}"] = t.detach().clone()
    return out


def _train(pm, x, steps=4, lr=2e-2):
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr)
    losses = []
    pm.train()
    for _ in range(steps):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


@pytest.mark.parametrize("mode,qparams", MODES)
def test_training_changes_adapters_only(mode, qparams):
    model = quantize_model(tiny_llama(), "w4g64")
    x = torch.randint(0, 256, (2, 24))
    pm = apply_lora(model, mode, r=4, qparams=qparams)
    wrapped = [m for m in pm.modules() if isinstance(m, (QLoraLinear, QuantizerLoraLinear))]
    assert len(wrapped) == 14  # 7 linears x 2 layers
    base0 = _base_state(pm)
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if qparams == "lwc":
        assert any("lora_clip" in n and "gamma" in n for n in trainable)
    losses = _train(pm, x, steps=8, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]
    after = dict(pm.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in trainable.items() if "lora_B" in n)
    base1 = _base_state(pm)
    assert base0.keys() == base1.keys()
    assert all(torch.equal(base0[k], base1[k]) for k in base0)  # frozen base bit-identical
    if mode == "qlora":
        assert all(m.state == "packed" for _, m in quant_linears(pm))


@pytest.mark.parametrize("qparams", ["dynamic", "fixed", "lwc"])
def test_lora_in_quantizer_merge_is_exact(qparams):
    model = quantize_model(tiny_llama(), "w3g32")
    x = torch.randint(0, 256, (2, 20))
    pm = apply_lora(model, "lora-in-quantizer", r=4, qparams=qparams)
    _train(pm, x, steps=3, lr=5e-2)
    with torch.no_grad():
        trained = pm(input_ids=x).logits
    merged = merge_lora(pm)
    assert not any(isinstance(m, QuantizerLoraLinear) for m in merged.modules())
    with torch.no_grad():
        after = merged(input_ids=x).logits
        for _, m in quant_linears(merged):
            m.pack()
        packed = merged(input_ids=x).logits
    assert torch.equal(trained, after)
    assert torch.allclose(after, packed, atol=1e-4)


def test_qlora_merge_requantizes_and_stays_close():
    model = quantize_model(tiny_llama(), "w4g64")
    x = torch.randint(0, 256, (2, 20))
    pm = apply_lora(model, "qlora", r=4)
    _train(pm, x, steps=3)
    with torch.no_grad():
        trained = pm(input_ids=x).logits
    merged = merge_lora(pm)
    layers = dict(quant_linears(merged))
    assert all(m.state == "packed" for m in layers.values())
    with torch.no_grad():
        after = merged(input_ids=x).logits
    diff = (trained - after).abs().max().item()
    assert 0 < diff < 0.5 * trained.abs().max().item()  # merging re-rounds: close, not equal


def test_adapter_state_dict_holds_no_base_weights():
    from peft import get_peft_model_state_dict
    pm = apply_lora(quantize_model(tiny_llama(), "w4g64"), "lora-in-quantizer", r=2, qparams="lwc")
    sd = get_peft_model_state_dict(pm)
    assert sd and all("lora_" in k for k in sd)
    assert any("lora_clip" in k and "beta" in k for k in sd)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="mode='bogus'"):
        apply_lora(quantize_model(tiny_llama(), "w4g64"), "bogus")
    with pytest.raises(ValueError, match="QuantLinear"):
        apply_lora(tiny_llama(), "qlora")
    with pytest.raises(ValueError, match="qparams='nope'"):
        apply_lora(quantize_model(tiny_llama(), "w4g64"), "lora-in-quantizer", qparams="nope")
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(quantize_model(tiny_llama(), "w4g64"), "qlora", target_modules=["nothing"])
    packed = quantize_model(tiny_llama(), "w4g64", pack=True)
    with pytest.raises(ValueError, match="fake"):
        apply_lora(packed, "lora-in-quantizer")


def test_bnb_mode_without_bitsandbytes_says_what_to_install(monkeypatch):
    import importlib.util
    from qft.train.bnb import require_bnb
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(RuntimeError, match="bnb-nf4.*pip install bitsandbytes"):
        require_bnb()


def test_targets_subset():
    pm = apply_lora(quantize_model(tiny_llama(), "w4g64"), "qlora", r=2, target_modules=["q_proj", "v_proj"])
    wrapped = [m for m in pm.modules() if isinstance(m, QLoraLinear)]
    assert len(wrapped) == 4
    assert sum(isinstance(m, QuantLinear) for m in pm.modules()) == 14


def test_w4a8kv4_trains_and_kv_hooks_quantize():
    from qft.nn.kvquant import install_kv_quant, kv_fake_quant, remove_kv_quant
    from qft.spec import preset
    spec = preset("w4a8kv4")
    t = torch.randn(2, 5, 32)
    q = kv_fake_quant(t, 4, head_dim=16)
    assert q.shape == t.shape and not torch.equal(q, t)
    # per token and head: at most 16 distinct levels in each 16-wide head vector
    assert all(len(torch.unique(q[0, 0, h * 16:(h + 1) * 16])) <= 16 for h in range(2))
    assert (q - t).abs().max() <= (t.amax() - t.amin()) / 15
    model = quantize_model(tiny_llama(), spec)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        plain = model(input_ids=x).logits
    pm = apply_lora(model, "lora-in-quantizer", r=4)
    assert install_kv_quant(pm, spec) == 4  # k_proj, v_proj x 2 layers, outermost (LoRA) modules only
    with torch.no_grad():
        kvq = pm(input_ids=x).logits
    assert not torch.equal(plain, kvq)
    losses = _train(pm, x, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    merged = merge_lora(pm)
    install_kv_quant(merged, spec)
    with torch.no_grad():
        a = merged(input_ids=x).logits
    remove_kv_quant(merged)
    with torch.no_grad():
        b = merged(input_ids=x).logits
    assert not torch.equal(a, b)


@pytest.mark.parametrize("qparams", ["dynamic", "fixed"])
def test_fused_lora_in_quantizer_matches_autograd(qparams):
    """The memory-lean autograd.Function gives the outputs and gradients of plain autograd."""
    from qft.train.lora import QuantizerLoraLinear
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 12))
    grads, outs = [], []
    for fused in (True, False):
        pm = apply_lora(quantize_model(tiny_llama(), "w3g32"), "lora-in-quantizer", r=4, qparams=qparams)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
        for m in pm.modules():
            if isinstance(m, QuantizerLoraLinear):
                m.use_fused = fused
        out = pm(input_ids=x, labels=x)
        out.loss.backward()
        outs.append(out.logits.detach())
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-3), k


@pytest.mark.parametrize("qparams", ["dynamic", "fixed", "lwc"])
def test_lora_in_quantizer_under_autocast_uses_the_merged_integers(qparams):
    """bf16 mixed precision (autocast) must not round the adapter delta s B A to bf16 before the
    quantizer: the codes the forward trains on are the codes the fp32 merge exports."""
    model = quantize_model(tiny_llama(), "w3g32")
    x = torch.randint(0, 256, (2, 20))
    pm = apply_lora(model, "lora-in-quantizer", r=4, qparams=qparams)
    _train(pm, x, steps=3, lr=5e-2)
    for _, m in pm.named_modules():  # large adapters: a bf16-rounded delta would move many codes
        if isinstance(m, QuantizerLoraLinear):
            m.lora_B["default"].weight.data.normal_(0, 0.05)
            m.lora_A["default"].weight.data.normal_(0, 0.5)
    layers = [m for m in pm.modules() if isinstance(m, QuantizerLoraLinear)]
    xs = [torch.randn(3, m.in_features) for m in layers]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = [m(xi) for m, xi in zip(layers, xs)]
    merged = merge_lora(pm)
    bases = [m for _, m in quant_linears(merged)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        exported = [m(xi) for m, xi in zip(bases, xs)]
    assert all(torch.equal(a, b) for a, b in zip(trained, exported))


def test_qlora_merge_qparams_pick_the_lower_error_grid_per_group():
    from qft.nn import quant as Q
    from qft.train.lora import merge_qparams
    torch.manual_seed(0)
    w0 = torch.randn(8, 128)
    s0, z0 = Q.minmax_qparams(w0, 3, 64, False)
    wq = Q.fake_quant(w0, s0, z0, 3, 64)
    delta = 0.02 * s0.repeat_interleave(64, -1) * torch.randn(8, 128)  # small: stays on the old grid
    delta[0, :64] += 5.0  # one group pushed far past its range: needs a fresh grid
    s, z = merge_qparams(wq + delta, s0, z0, 3, 64, False)
    assert (s == s0).float().mean() >= 0.5 and not torch.equal(s[0, 0], s0[0, 0])  # most groups keep their grid
    err = lambda s_, z_: ((Q.fake_quant(wq + delta, s_, z_, 3, 64) - wq - delta) ** 2).sum()  # noqa: E731
    s1, z1 = Q.minmax_qparams(wq + delta, 3, 64, False)
    assert err(s, z) <= min(err(s0, z0), err(s1, z1))
