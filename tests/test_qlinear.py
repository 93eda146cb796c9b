import pytest
import torch
from torch import nn

from qft.nn import QuantLinear, pack_model, quant_linears, quantize_model
from qft.spec import QuantSpec, QuantSpecError
from qft.testing import tiny_llama

CASES = [("int", b, sym, g) for b in range(2, 9) for sym in (False, True) for g in (16, None)] + [
    ("nf", 4, True, 16), ("fp", 4, True, 32), ("fp", 8, True, None), ("sign", 1, True, None), ("int", 1, False, 16)]


@pytest.mark.parametrize("scheme,bits,sym,gs", CASES)
def test_fake_and_packed_forward_identical_over_seeds(scheme, bits, sym, gs):
    for seed in range(8):
        torch.manual_seed(seed)
        k, n = (48, 17) if gs == 16 else (96, 33)
        lin = nn.Linear(k, n, bias=seed % 2 == 0)
        q = QuantLinear.from_linear(lin, QuantSpec(bits=bits, group_size=gs, symmetric=sym, scheme=scheme), "l")
        x = torch.randn(3, 5, k)
        y_fake, w_fake, codes = q(x), q.dequantize(), q.codes()
        q.pack()
        assert q.state == "packed" and q.weight is None
        assert torch.equal(q.codes(), codes)
        assert torch.equal(q.dequantize(), w_fake)
        assert torch.equal(q(x), y_fake)


def test_requantize_sets_weight_and_repacks():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, QuantSpec(bits=4, group_size=32), "l")
    w2 = torch.randn(8, 64)
    q.requantize(w2)
    before = q.dequantize()
    q.pack()
    q.requantize(w2)
    assert torch.equal(q.dequantize(), before)
    with pytest.raises(ValueError, match="weight shape"):
        q.requantize(torch.randn(8, 32))


def test_latent_weight_training_gets_gradient():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(32, 4), QuantSpec(bits=4, group_size=16), "l")
    q.weight.requires_grad_(True)
    q.dynamic = True
    q(torch.randn(2, 32)).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_quantize_model_swaps_targets_and_keeps_lm_head():
    m = tiny_llama()
    quantize_model(m, "w4g32")
    names = [n for n, _ in quant_linears(m)]
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, QuantLinear)
    out = m(torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(out).all()
    pack_model(m)
    assert all(q.state == "packed" for _, q in quant_linears(m))


def test_quantize_model_bad_group_size_leaves_model_untouched():
    m = tiny_llama(hidden=96, intermediate=160)
    with pytest.raises(QuantSpecError, match="does not divide in_features=96 of layer .model.layers.0.self_attn.q_proj"):
        quantize_model(m, QuantSpec(bits=4, group_size=64))
    assert not list(quant_linears(m))


def test_quantize_model_no_match():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(tiny_llama(), QuantSpec(targets=("nothing*",)))
