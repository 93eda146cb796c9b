"""Distillation losses: hand-computed values, masking, temperature, accumulation equivalence."""

import math

import pytest
import torch

from qft.registry import LOSSES
from qft.train import losses as L


def _two_token_case():
    # one sequence, 2 positions, vocab 2; position 1 is padding
    t = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    s = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    labels = torch.tensor([[1, -100]])
    return s, t, labels


def test_registry_lists_all_losses():
    assert {"ce", "forward_kl", "reverse_kl", "jsd", "cakld", "hidden_mse"} <= set(LOSSES.names())


def test_forward_and_reverse_kl_hand_computed():
    s, t, labels = _two_token_case()
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert L.forward_kl(s, t, labels).item() == pytest.approx(fkl, rel=1e-5)
    assert L.reverse_kl(s, t, labels).item() == pytest.approx(rkl, rel=1e-5)
    # the padded position (large divergence) is excluded
    unmasked = torch.tensor([[1, 1]])
    assert L.forward_kl(s, t, unmasked).item() > fkl + 0.5


def test_ce_hand_computed():
    s, t, labels = _two_token_case()
    assert L.ce(s, None, labels).item() == pytest.approx(-math.log(0.75), rel=1e-5)


def test_cakld_reduces_to_kls_and_mixes():
    s, t, labels = _two_token_case()
    f, r = L.forward_kl(s, t, labels), L.reverse_kl(s, t, labels)
    assert torch.allclose(L.cakld(s, t, labels, confidence=0.0), f)
    assert torch.allclose(L.cakld(s, t, labels, confidence=1.0), r)
    assert torch.allclose(L.cakld(s, t, labels, confidence=0.3), 0.3 * r + 0.7 * f)
    with pytest.raises(ValueError, match="confidence"):
        L.cakld(s, t, labels)
    with pytest.raises(ValueError, match="confidence=1.5"):
        L.cakld(s, t, labels, confidence=1.5)


def test_jsd_hand_computed_and_limits():
    s, t, labels = _two_token_case()
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    m = 0.5 * p + 0.5 * q
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    want = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert L.jsd(s, t, labels, beta=0.5).item() == pytest.approx(want, rel=1e-5)
    b = 0.2
    m = b * p + (1 - b) * q
    assert L.jsd(s, t, labels, beta=b).item() == pytest.approx(b * kl(p, m) + (1 - b) * kl(q, m), rel=1e-5)
    assert torch.allclose(L.jsd(s, t, labels, beta=0.0), L.forward_kl(s, t, labels))
    assert torch.allclose(L.jsd(s, t, labels, beta=1.0), L.reverse_kl(s, t, labels))
    with pytest.raises(ValueError, match="beta"):
        L.jsd(s, t, labels, beta=2.0)


def test_temperature_scales_and_softens():
    s, t, labels = _two_token_case()
    tau = 2.0
    p = torch.softmax(t[0, 0] / tau, -1)
    q = torch.softmax(s[0, 0] / tau, -1)
    want = float((p * (p / q).log()).sum()) * tau ** 2
    assert L.forward_kl(s, t, labels, temperature=tau).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        L.forward_kl(s, t, labels, temperature=0.0)


def test_identical_distributions_give_zero():
    x = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    for name in ("forward_kl", "reverse_kl", "jsd"):
        assert LOSSES.get(name)(x, x.clone(), labels).abs().item() < 1e-6
    assert L.cakld(x, x.clone(), labels, confidence=0.4).abs().item() < 1e-6
    assert L.hidden_mse(x, 3 * x, labels).abs().item() < 1e-6  # scale-invariant


@pytest.mark.parametrize("name", ["ce", "forward_kl", "reverse_kl", "jsd", "cakld"])
def test_accumulation_equivalence(name):
    """Summing micro-batch losses normalized by the global item count == loss of the whole batch."""
    torch.manual_seed(0)
    s, t = torch.randn(4, 7, 13), torch.randn(4, 7, 13)
    labels = torch.randint(0, 13, (4, 7))
    labels[0, 4:] = -100
    labels[2, 1:] = -100
    kw = {"confidence": 0.6} if name == "cakld" else {}
    fn = LOSSES.get(name)
    whole = fn(s, t, labels, **kw)
    n = labels.ne(-100).sum()
    parts = sum(fn(s[i:i + 1], t[i:i + 1], labels[i:i + 1], num_items_in_batch=n, **kw) for i in range(4))
    assert torch.allclose(whole, parts, atol=1e-6)
    # a per-micro-batch mean would give a different (wrong) answer here
    means = sum(fn(s[i:i + 1], t[i:i + 1], labels[i:i + 1], **kw) for i in range(4)) / 4
    assert not torch.allclose(whole, means, atol=1e-4)


def test_hidden_mse_hand_computed_and_layers():
    hs = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    ht = torch.tensor([[[0.0, 2.0], [6.0, 8.0]]])
    labels = torch.tensor([[5, 5]])
    # position 0: |(1,0) - (0,1)|^2 = 2 ; position 1: identical directions -> 0 ; mean over 2 positions
    assert L.hidden_mse(hs, ht, labels).item() == pytest.approx(1.0, rel=1e-5)
    assert L.hidden_mse([hs, hs], [ht, hs], labels).item() == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="as many"):
        L.hidden_mse([hs], [ht, ht], labels)


def test_gradients_flow_to_student_only():
    s = torch.randn(1, 3, 5, requires_grad=True)
    t = torch.randn(1, 3, 5, requires_grad=True)
    L.forward_kl(s, t.detach(), torch.tensor([[1, 2, -100]])).backward()
    assert s.grad is not None and s.grad[0, 2].abs().sum() == 0 and s.grad[0, :2].abs().sum() > 0


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="labels shape"):
        L.forward_kl(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))
