"""qlora training path and ``wq_gemm_tc`` on a CUDA GPU at Llama-7B layer sizes (marked ``gpu``).

tests/test_kernels_train.py runs its small-size checks compiled when a GPU is present; this file adds
the real shapes, the bf16 16-bit decode (the CPU interpreter does not emulate bf16 arithmetic),
every forward / backward candidate and the dispatcher's choice inside a qlora step.
"""

from __future__ import annotations

import pytest
import torch

import qft.kernels as K
from qft.testing import rel_error as rel
from qft.kernels import reference as R

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("QFT_KERNELS", "triton")
    from qft.kernels import _util
    _util.POISON = True
    yield
    _util.POISON = False




def _weights(n, k, bits=4, gs=128, seed=0):
    from qft.kernels import wq_triton as W
    torch.manual_seed(seed)
    qw, s, z = R.quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, gs)
    p = W.prepare(qw, s, z, bits, gs, k, torch.bfloat16, sliced=False)
    return qw, s, z, p


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_dequant16_bit_identical_bf16(n, k):
    from qft.kernels import wq_gemm_tc as T, wq_triton as W
    _, _, _, p = _weights(n, k)
    ref = W.dequant(p, torch.bfloat16)
    for bn, bk, nw in [(32, 128, 4), (64, 128, 4), (64, 256, 8)]:
        assert torch.equal(T.dequant(p.qweight, p.scales, p.zeros, 4, 128, k, torch.bfloat16, bn=bn, bk=bk,
                                     num_warps=nw), ref)


@pytest.mark.parametrize("m", [64, 300, 2048])
@pytest.mark.parametrize("n,k", [(11008, 4096), (4096, 11008)])
def test_tc_forward_and_backward_candidates(m, n, k):
    from qft.kernels import wq_gemm_tc as T, wq_triton as W
    qw, s, z, p = _weights(n, k, seed=m)
    wd = R.dequant(qw, s, z, 4, 128, k, torch.float32)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ wd.t()
    from qft.kernels import wq_gemm_tc2 as T2
    for key in [("tc",) + c for c in T.configs_for(m)] + [("tc2",) + c for c in T2.configs_for(m)]:
        assert rel(W.run_path(key, x, p), ref) <= 1e-2, key
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    gref = gy.float() @ wd
    for c in T.BWD_CONFIGS:
        assert rel(W.run_bwd_path(("tc",) + c, gy, p), gref) <= 1e-2, c
    assert rel(W.grad_input(gy, p), gref) <= 1e-2
    assert rel(W.linear(x, p), ref) <= 1e-2


def test_qlora_quantlinear_step_matches_reference():
    """A packed QuantLinear at M = 2048: forward, dX and the frozen words, against the torch reference."""
    from qft.kernels import ops
    ops.clear_cache()
    n, k = 4096, 4096
    qw, s, z, _ = _weights(n, k, seed=7)
    s = s.to(torch.bfloat16)
    x = torch.randn(2, 1024, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(2, 1024, n, device="cuda", dtype=torch.bfloat16)
    before = qw.clone()
    y = K.qlinear(x, qw, s, z, 4, 128, k)
    y.backward(gy)
    xr = x.detach().float().requires_grad_()
    yr = R.qlinear(xr, qw, s.float(), z, 4, 128, k)
    yr.backward(gy.float())
    assert rel(y, yr) <= 1e-2 and rel(x.grad, xr.grad) <= 1e-2
    assert torch.equal(qw, before)
    from qft.kernels import wq_triton as W
    assert not W._SLICED_COPIES
