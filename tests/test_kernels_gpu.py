"""qft.kernels on a CUDA GPU at Llama / SmolLM2 sizes (marked ``gpu``; run on the device machine).

tests/test_kernels.py also runs its small-size checks on CUDA when a GPU is present; this file
adds the real layer sizes, every dispatch path, CUDA-graph capture and torch.compile (inductor).
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




@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("bits,gs", [(4, 128), (4, None), (2, 64), (3, 128), (8, 32)])
def test_qlinear_gpu(n, k, m, bits, gs):
    if gs and k % gs:
        pytest.skip("group does not divide K")
    torch.manual_seed(m + n)
    w = torch.randn(n, k, device="cuda")
    qw, s, z = R.quantize_rtn(w, bits, gs)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = K.qlinear(x, qw, s, z, bits, gs, k)
    ref = R.qlinear(x.float(), qw, s, z, bits, gs or k, k)
    assert rel(out, ref) <= 1e-2


def test_qlinear_backward_gpu():
    w = torch.randn(4096, 1536, device="cuda")
    qw, s, z = R.quantize_rtn(w, 4, 128)
    x = torch.randn(300, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    K.qlinear(x, qw, s, z, 4, 128, 1536).backward(gy)
    ref = gy.float() @ R.dequant(qw, s, z, 4, 128, 1536, torch.float32)
    assert rel(x.grad, ref) <= 1e-2


@pytest.mark.parametrize("m", [1, 2, 64, 300])
def test_onebit_gpu(m):
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda")
    ps = R.pack_signs(w)
    g, h = torch.rand(k, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert rel(K.onebit_linear(x, ps, g, h, k), R.onebit_linear(x.float(), ps, g, h, k)) <= 1e-2


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (1024, 11008, 4096), (333, 4096, 11008)])
def test_int8_gpu(m, n, k):
    wq, ws = R.quantize_weight_int8(torch.randn(n, k, device="cuda"))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert rel(K.int8_linear(x, wq, ws), R.int8_linear(x.float(), wq, ws)) <= 1e-2


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_gpu(bits):
    b, h, d, t = 2, 8, 128, 4000
    cache = K.KiviCache(b, h, d, 4096, bits=bits, group=32, residual=128, device="cuda")
    cache.append(torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16),
                 torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16))
    q = torch.randn(b, 32, d, device="cuda", dtype=torch.bfloat16)
    assert rel(cache.attention(q), R.kv_decode_attention(q.float(), *cache.tensors(), bits, 32)) <= 1e-2


def test_cuda_graph_and_inductor():
    w = torch.randn(4096, 4096, device="cuda")
    qw, s, z = R.quantize_rtn(w, 4, 128)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref = R.qlinear(x.float(), qw, s, z, 4, 128, 4096)
    K.qlinear(x, qw, s, z, 4, 128, 4096)  # warm-up: compile + prepare outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = K.qlinear(x, qw, s, z, 4, 128, 4096)
    g.replay()
    torch.cuda.synchronize()
    assert rel(y, ref) <= 1e-2
    f = torch.compile(lambda t: K.qlinear(t, qw, s, z, 4, 128, 4096) * 2, fullgraph=True)
    assert rel(f(x), ref * 2) <= 1e-2
