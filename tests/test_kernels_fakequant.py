"""QAT weight fake quantization (``qft/kernels/fakequant_triton.py``) against the torch reference and
``qft.nn.quant``: under TRITON_INTERPRET=1 on CPU (tests/conftest.py), compiled on a GPU. Outputs are
poisoned (NaN) before every kernel run. The interpreter truncates float32 -> bfloat16 stores (a GPU
rounds to nearest even), so bf16 outputs are compared bit-exactly only on a GPU (within one bf16 ulp
on CPU); float32 outputs, scales, zeros and masks are bit-exact everywhere.
"""

from __future__ import annotations


import pytest
import torch

import qft.kernels as K
from qft.kernels import _util, reference as R
from qft.nn import quant as Q

DEV = "cpu" if _util.interpreting() or not torch.cuda.is_available() else "cuda"
CASES = [  # n, k, group, bits, symmetric, clip
    (24, 128, 64, 3, False, False), (16, 192, 64, 2, False, True), (8, 96, 96, 4, True, False),
    (10, 576, 576, 3, False, True), (12, 64, 32, 4, True, True), (40, 256, 128, 1, False, False),
]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    if DEV == "cpu" and not _util.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)")
    monkeypatch.setenv("QFT_KERNELS", "triton")
    _util.POISON = True
    yield
    _util.POISON = False


def _close_bf16(a: torch.Tensor, ref32: torch.Tensor):
    if DEV == "cuda":
        assert torch.equal(a, ref32.to(torch.bfloat16))
    else:  # truncating interpreter: within one bf16 ulp of the exact value
        ulp = ref32.abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((a.float() - ref32).abs() <= ulp).all()


def _case(n, k, gs, clip, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05)
    w[0, :gs] = torch.linspace(-0.1, 0.1, gs)  # exact ties hit round-half-to-even
    cm = (torch.rand(n, k // gs, generator=g) * 0.5 + 0.5) if clip else 1.0
    cn = (torch.rand(n, k // gs, generator=g) * 0.5 + 0.5) if clip else None
    return w.to(DEV), (cm.to(DEV) if clip else cm), (cn.to(DEV) if clip else cn)


@pytest.mark.parametrize("n,k,gs,bits,sym,clip", CASES)
def test_forward_matches_reference_and_qft_nn_quant(n, k, gs, bits, sym, clip):
    w, cm, cn = _case(n, k, gs, clip)
    wq, s, z = K.fake_quant_weight(w, bits, gs, sym, cm, cn, out_dtype=torch.float32)
    rq, rs, rz = R.fake_quant_weight(w, bits, gs, sym, cm, cn, out_dtype=torch.float32)
    assert torch.equal(s, rs) and torch.equal(z, rz) and torch.equal(wq, rq)
    qs, qz = Q.minmax_qparams(w, bits, gs, sym, cm, cn)  # what the merge / export uses
    assert torch.equal(s, qs) and torch.equal(z, qz)
    assert torch.equal(wq, Q.fake_quant(w, qs, qz, bits, gs))
    codes = torch.round(Q.group_view(wq, gs) / s.unsqueeze(-1)) + z.unsqueeze(-1)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    wb, _, _ = K.fake_quant_weight(w, bits, gs, sym, cm, cn, out_dtype=torch.bfloat16)
    _close_bf16(wb, rq)


@pytest.mark.parametrize("n,k,gs,bits,sym,clip", CASES[:3])
def test_given_qparams(n, k, gs, bits, sym, clip):
    w, cm, cn = _case(n, k, gs, clip, seed=1)
    s, z = Q.minmax_qparams(w * 0.8, bits, gs, sym, cm, cn)  # a grid the weight overflows: clamps happen
    wq, s2, z2 = K.fake_quant_weight(w, bits, gs, sym, scale=s, zero=z, out_dtype=torch.float32)
    assert torch.equal(s2, s) and torch.equal(z2, z)
    assert torch.equal(wq, Q.fake_quant(w, s, z, bits, gs))


@pytest.mark.parametrize("n,k,gs,bits,sym,clip", CASES)
def test_backward_mask_and_weight(n, k, gs, bits, sym, clip):
    w, cm, cn = _case(n, k, gs, clip, seed=2)
    _, s, z = R.fake_quant_weight(w, bits, gs, sym, cm, cn)
    w2 = w * 1.25  # moved weights: some codes leave the grid
    gw = torch.randn(n, k, device=DEV)
    wq, gm = K.fake_quant_weight_grad(w2, s, z, gw, bits, gs, torch.float32)
    rq, rgm = R.fake_quant_weight_grad(w2, s, z, gw, bits, gs, torch.float32)
    assert torch.equal(wq, rq) and torch.equal(gm, rgm)
    # the STE mask is autograd's through qft.nn.quant.fake_quant (whose chain rule multiplies by 1/s, then s)
    wr = w2.clone().requires_grad_()
    Q.fake_quant(wr, s, z, bits, gs).backward(gw)
    assert torch.equal(gm != 0, wr.grad != 0)
    torch.testing.assert_close(gm, wr.grad)
    assert 0 < (gm == 0).float().mean() < 1
    wb, gmb = K.fake_quant_weight_grad(w2, s, z, gw.to(torch.bfloat16), bits, gs, torch.bfloat16)
    _close_bf16(wb, rq)
    assert torch.equal(gmb, torch.where(rgm != 0, gw.to(torch.bfloat16).float(), 0.0))


def test_group_must_divide():
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        K.fake_quant_weight(torch.zeros(4, 64, device=DEV), 4, 48, False)
