"""QuIP: orthogonal incoherence transforms, GPTQ on the transformed weight, transforms in the forward."""

import copy

import pytest
import torch

from qft.export import load, save
from qft.nn.hadamard import HadamardLinear, apply_transform, apply_transform_t, factor_sizes, make_transform, \
    transform_matrix
from qft.ptq import run
from qft.ptq.quip import incoherent, layer_transforms, quip_quantize
from qft.testing import tiny_llama


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
@pytest.mark.parametrize("n", [64, 192, 576, 1536])
def test_transform_is_orthogonal(kind, n):
    t = make_transform(n, kind, torch.Generator().manual_seed(n))
    T = transform_matrix(*t).double()
    assert torch.allclose(T @ T.t(), torch.eye(n, dtype=torch.float64), atol=1e-5)
    x = torch.randn(3, n)
    assert torch.allclose(apply_transform(x, *t), x @ T.float().t(), atol=1e-4)
    assert torch.allclose(apply_transform_t(apply_transform(x, *t), *t), x, atol=1e-4)
    p, q = factor_sizes(n, kind)
    assert p * q == n and (kind != "hadamard" or q & (q - 1) == 0)


def test_incoherence_spreads_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    w[5, 9] = 3.0
    t_in, t_out = layer_transforms("l", 64, 128, "hadamard")
    wt, _ = incoherent(w, torch.eye(128), t_in, t_out)
    assert torch.allclose(wt.norm(), w.norm(), rtol=1e-4)  # orthogonal: the norm is kept
    assert float(wt.abs().max()) < float(w.abs().max()) / 10  # the outlier is spread out


def test_forward_equals_plain_forward_on_dequantized_weight():
    torch.manual_seed(1)
    x = torch.randn(256, 128)
    h = 2 * x.t() @ x / 256
    w = torch.randn(64, 128)
    b = torch.randn(64)
    for kind in ("hadamard", "kron"):
        t_in, t_out = layer_transforms("layer", 64, 128, kind, seed=3)
        codes, scale, zero = quip_quantize(w, h, t_in, t_out, 3, 32)
        m = HadamardLinear.from_parts(codes, scale, zero, 3, 32, t_in, t_out, kind, bias=b)
        U, V = transform_matrix(*t_out), transform_matrix(*t_in)
        w_eff = U.t() @ m.quantized_transformed() @ V  # U^T Q(W') V
        assert torch.allclose(m.dequantize(), w_eff, atol=1e-4)
        xs = torch.randn(2, 5, 128)
        assert torch.allclose(m(xs), xs @ w_eff.t() + b, atol=1e-3)
        rel = float((w_eff - w).norm() / w.norm())
        assert rel < 0.3  # a 3-bit approximation of w itself, not of something else


def test_end_to_end_export_reload(tmp_path):
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=6, tie=True)
    calib = torch.randint(0, 256, (4, 64))
    q = run("quip", copy.deepcopy(m), "w3g32", calib)
    mod = q.model.layers[0].mlp.gate_proj
    assert isinstance(mod, HadamardLinear)
    assert 3 + 19 / 32 < mod.bits_per_weight() < 4.5
    x = torch.randint(0, 256, (2, 24))
    y = q(x).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(x).logits, y)
    import qft  # noqa: F401
    from transformers import AutoModelForCausalLM
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(x).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    calib = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="transform"):
        run("quip", m, "w3g32", calib, transform="dct")
    with pytest.raises(ValueError, match="seed"):
        run("quip", m, "w3g32", calib, seed=-1)
    with pytest.raises(ValueError, match="calibration"):
        run("quip", m, "w3g32", None)
