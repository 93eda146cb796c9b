"""BitDistiller clipping search: the error formula, monotonicity, the PTQ method end to end."""

import pytest
import torch

from qft.nn import QuantLinear, quant_linears
from qft.ptq import METHODS
from qft.ptq.clip import ClipConfig, clip_error, group_grams, search_clip
from qft.nn import quant as Q
from qft.spec import QuantSpec
from qft.testing import tiny_llama


def test_gram_error_equals_direct_output_error():
    torch.manual_seed(0)
    w, x = torch.randn(8, 32), torch.randn(50, 32)
    wq = Q.qdq_weight(w, 2, 16)
    grams = group_grams(x.t() @ x, 16)
    err = clip_error(w, wq, grams)  # [8, 2]
    d = (w - wq)
    direct = torch.stack([((x[:, g * 16:(g + 1) * 16] @ d[:, g * 16:(g + 1) * 16].t()) ** 2).sum(0)
                          for g in range(2)], 1)
    assert torch.allclose(err, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, group_size=16), QuantSpec(bits=2, group_size=16),
                                  QuantSpec(bits=4, group_size=16, symmetric=True)])
def test_search_never_worse_than_minmax_and_usually_better(spec):
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    w[0, 3] = 8.0  # an outlier makes clipping worthwhile
    x = torch.randn(200, 64)
    grams = group_grams(x.t() @ x, 16)
    a, b = search_clip(w, grams, spec, ClipConfig(n_grid=10, rounds=2))
    assert a.shape == (16, 4) and a.min() >= 0.5 - 1e-6 and a.max() <= 1.0
    s0, z0 = Q.minmax_qparams(w, spec.bits, 16, spec.symmetric)
    s1, z1 = Q.minmax_qparams(w, spec.bits, 16, spec.symmetric, a, b)
    e0 = clip_error(w, Q.dequantize(Q.quantize(w, s0, z0, spec.bits, 16), s0, z0, 16), grams)
    e1 = clip_error(w, Q.dequantize(Q.quantize(w, s1, z1, spec.bits, 16), s1, z1, 16), grams)
    assert (e1 <= e0 + 1e-5).all()
    assert e1.sum() < 0.95 * e0.sum()
    if not spec.symmetric:
        assert not torch.equal(a, b)  # asymmetric search picks max and min ratios separately


def test_clip_method_end_to_end_beats_rtn():
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (8, 32))
    spec = QuantSpec(bits=2, group_size=32)
    ref = tiny_llama()
    with torch.no_grad():
        t = torch.log_softmax(ref(calib).logits, -1)

    def kl(m):
        with torch.no_grad():
            s = torch.log_softmax(m(calib).logits, -1)
        return (t.exp() * (t - s)).sum(-1).mean().item()

    rtn = METHODS.get("rtn")(tiny_llama(), spec)
    clipped = METHODS.get("clip")(tiny_llama(), spec, calib=calib, n_grid=10)
    layers = dict(quant_linears(clipped))
    assert len(layers) == 14 and all(isinstance(m, QuantLinear) for m in layers.values())
    assert all(getattr(m, "qft_clip", None) is not None for m in layers.values())
    assert kl(clipped) < kl(rtn)


def test_clip_rejects_bad_options():
    with pytest.raises(ValueError, match="calib"):
        METHODS.get("clip")(tiny_llama(), "w4g64")
    with pytest.raises(ValueError, match="unknown option"):
        METHODS.get("clip")(tiny_llama(), "w4g64", calib=torch.zeros(1, 8, dtype=torch.long), grid=3)
    with pytest.raises(ValueError, match="max_shrink=1.5"):
        ClipConfig(max_shrink=1.5)
