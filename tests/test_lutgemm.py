"""LUT-GEMM: BCQ fitting, the lookup-table Triton kernel (interpreter on CPU) against the reference."""

import copy

import pytest
import torch

from qft.export import load, save
from qft.kernels import lut_gemm as L
from qft.kernels import reference as R
from qft.nn.lut import BCQLinear
from qft.ptq import run
from qft.ptq.lutgemm import bcq_quantize, bcq_reconstruct
from qft.testing import tiny_llama


@pytest.mark.parametrize("q,gs,m", [(3, 64, 1), (2, 32, 3), (1, 128, 2)])
@pytest.mark.parametrize("offset", [True, False])
def test_kernel_matches_reference(q, gs, m, offset):
    pytest.importorskip("triton")
    torch.manual_seed(q * 10 + m)
    n, k = 40, 256
    signs = torch.randint(0, 2, (q * n, k)).float() * 2 - 1
    planes = R.pack_signs(signs).reshape(q, n, -1)
    alpha = torch.rand(q, n, k // gs)
    off = torch.randn(n, k // gs) if offset else None
    bias = torch.randn(n)
    x = torch.randn(m, k)
    ref = L.bcq_linear_ref(x, planes, alpha, off, gs, k, bias)
    out = L.bcq_linear_triton(x, planes, alpha, off, gs, k, bias)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    # the reference is the plain matmul with the dense BCQ weight
    w = (signs.reshape(q, n, k) * alpha.repeat_interleave(gs, -1)).sum(0)
    if offset:
        w = w + off.repeat_interleave(gs, -1)
    assert torch.allclose(ref, x @ w.t() + bias, atol=1e-4)


def test_bcq_fit():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    errs = []
    for q in (1, 2, 3):
        s, a, z = bcq_quantize(w, q, 64, offset=True, iters=15)
        assert s.shape == (q, 32, 128) and set(s.unique().tolist()) <= {-1.0, 1.0}
        errs.append(float((w - bcq_reconstruct(s, a, z, 64)).pow(2).sum()))
    assert errs[0] > errs[1] > errs[2]
    s0, a0, z0 = bcq_quantize(w, 3, 64, iters=0)
    assert errs[2] < float((w - bcq_reconstruct(s0, a0, z0, 64)).pow(2).sum())  # alternating refinement helps
    # weighted fit: heavily weighted columns are reconstructed better
    cw = torch.ones(128)
    cw[:8] = 1000
    s, a, z = bcq_quantize(w, 2, 64, iters=15, col_weight=cw)
    e = (w - bcq_reconstruct(s, a, z, 64)).pow(2)
    s1, a1, z1 = bcq_quantize(w, 2, 64, iters=15)
    assert float(e[:, :8].sum()) < float((w - bcq_reconstruct(s1, a1, z1, 64)).pow(2)[:, :8].sum())


@pytest.mark.parametrize("with_calib", [True, False])
def test_end_to_end_export_reload(tmp_path, with_calib):
    m = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=7)
    calib = torch.randint(0, 256, (4, 64)) if with_calib else None
    q = run("lutgemm", copy.deepcopy(m), {"bits": 3, "group_size": 32}, calib)
    mod = q.model.layers[0].mlp.up_proj
    assert isinstance(mod, BCQLinear)
    assert abs(mod.bits_per_weight() - (3 + (3 * 16 + 16) / 32)) < 1e-9
    x = torch.randint(0, 256, (2, 24))
    y = q(x).logits
    save(q, tmp_path / "ck", format="qft")
    assert torch.equal(load(tmp_path / "ck")(x).logits, y)
    if with_calib:
        import qft  # noqa: F401
        from transformers import AutoModelForCausalLM
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")(x).logits, y)


def test_bad_input():
    m = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="bits=5"):
        run("lutgemm", m, {"bits": 5, "group_size": 32})
    with pytest.raises(ValueError, match="iters"):
        run("lutgemm", m, "w3g32", None, iters=-1)
    with pytest.raises(ValueError, match="group_size=48"):
        run("lutgemm", m, {"bits": 3, "group_size": 48})
    with pytest.raises(ValueError, match="group_size % 32"):
        L.bcq_linear_triton(torch.randn(1, 48), torch.zeros(1, 2, 2, dtype=torch.int32), torch.ones(1, 2, 3), None,
                            16, 48)
