import pytest
import torch

from qft.nn import quant as Q


def test_minmax_asym_grid_covers_range_and_zero_is_exact():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    for bits in (2, 3, 4, 8):
        s, z = Q.minmax_qparams(w, bits, 32, symmetric=False)
        u = Q.quantize(w, s, z, bits, 32)
        assert int(u.max()) <= 2 ** bits - 1
        wq = Q.dequantize(u, s, z, 32)
        # error bounded by half a step
        step = s.repeat_interleave(32, dim=1)
        assert ((wq - w).abs() <= step / 2 + 1e-6).all()
        # zero maps exactly to zero
        zero_codes = Q.quantize(torch.zeros_like(w), s, z, bits, 32)
        assert Q.dequantize(zero_codes, s, z, 32).abs().max() == 0


def test_symmetric_zero_point_is_midpoint():
    w = torch.randn(4, 32)
    s, z = Q.minmax_qparams(w, 4, 32, symmetric=True)
    assert (z == 8).all()


def test_fake_quant_matches_quantize_dequantize_and_ste_grad():
    torch.manual_seed(1)
    w = torch.randn(6, 64, requires_grad=True)
    s, z = Q.minmax_qparams(w.detach(), 4, 16, symmetric=False)
    y = Q.fake_quant(w, s, z, 4, 16)
    ref = Q.dequantize(Q.quantize(w.detach(), s, z, 4, 16), s, z, 16)
    assert torch.equal(y.detach(), ref)
    y.sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))  # inside the grid: identity gradient


def test_learnable_scale_zero_and_clip_get_gradients():
    torch.manual_seed(2)
    w = torch.randn(4, 32)
    s, z = Q.minmax_qparams(w, 3, 16, symmetric=False)
    s, z = s.clone().requires_grad_(), z.clone().requires_grad_()
    (Q.fake_quant(w, s, z, 3, 16) - w).pow(2).sum().backward()
    assert s.grad.abs().sum() > 0 and z.grad is not None
    gamma = torch.full((4, 2), 3.0, requires_grad=True)
    beta = torch.full((4, 2), 3.0, requires_grad=True)
    s2, z2 = Q.lwc_qparams(w, gamma, beta, 3, 16)
    (Q.fake_quant(w, s2, z2, 3, 16) - w).pow(2).sum().backward()
    assert gamma.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0


def test_clipping_shrinks_range():
    w = torch.randn(4, 64)
    s1, _ = Q.minmax_qparams(w, 4, 64, False, 1.0)
    s2, _ = Q.minmax_qparams(w, 4, 64, False, 0.8)
    assert torch.allclose(s2, s1 * 0.8, rtol=1e-5)


@pytest.mark.parametrize("scheme,bits", [("nf", 4), ("fp", 4), ("fp", 8), ("sign", 1)])
def test_codebook_nearest_level(scheme, bits):
    torch.manual_seed(3)
    w = torch.randn(8, 64)
    s, _ = Q.codebook_qparams(w, scheme, bits, 32)
    u = Q.codebook_quantize(w, s, scheme, bits, 32)
    wq = Q.codebook_dequantize(u, s, scheme, bits, 32)
    lv = Q.codebook(scheme, bits)
    lv = lv[torch.isfinite(lv)]
    x = (w.view(8, 2, 32) / s.unsqueeze(-1)).reshape(8, 64)
    if scheme == "fp" and bits == 8:
        assert ((wq - w).abs() / w.abs().clamp_min(1e-3)).median() < 0.05
    else:
        best = (x.unsqueeze(-1) - lv).abs().min(-1).values
        got = (wq.view(8, 2, 32) / s.unsqueeze(-1)).reshape(8, 64)
        assert torch.allclose((x - got).abs(), best, atol=1e-5)


def test_per_token_activation_quant():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 16) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    y = Q.fake_quant_act(x, 8, "token")
    rel = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel < 1 / 127
    xg = x.clone().requires_grad_()
    Q.fake_quant_act(xg, 4).sum().backward()
    assert torch.allclose(xg.grad, torch.ones_like(x))


def test_group_view_error():
    with pytest.raises(ValueError, match="does not divide"):
        Q.group_view(torch.zeros(2, 10), 4)
