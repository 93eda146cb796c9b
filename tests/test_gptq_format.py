"""GPTQ v1 layout: bit-exact round trips with the canonical buffers; the classic 3-bit word layout."""

import numpy as np
import pytest
import torch

from qft.formats.gptq import from_gptq_v1, to_gptq_v1
from qft.kernels import pack_int32


def classic_pack_along_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """The classic GPTQ packing loop (values along axis 0 into uint32 words), written from the format
    description: 32/bits values per word for 2/4/8 bits, 32 values in 3 words for 3 bits."""
    K, N = u.shape
    u = u.astype(np.uint64)
    out = np.zeros((K * bits // 32, N), dtype=np.uint64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(32 // bits):
                out[row] |= u[i + j] << np.uint64(bits * j)
            i += 32 // bits
            row += 1
        else:
            for j in range(10):
                out[row] |= u[i + j] << np.uint64(3 * j)
            i += 10
            out[row] |= (u[i] << np.uint64(30)) & np.uint64(0xFFFFFFFF)
            row += 1
            out[row] |= (u[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(10):
                out[row] |= u[i + j] << np.uint64(3 * j + 1)
            i += 10
            out[row] |= (u[i] << np.uint64(31)) & np.uint64(0xFFFFFFFF)
            row += 1
            out[row] |= (u[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(10):
                out[row] |= u[i + j] << np.uint64(3 * j + 2)
            i += 10
            row += 1
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def _random_layer(n, k, bits, gs, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.rand(n, k // gs, generator=g).half() + 0.01
    zeros = torch.randint(1, 2 ** bits, (n, k // gs), generator=g).to(torch.uint8)
    return pack_int32(u, bits), scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,gs", [(7, 96, 32), (13, 160, 32), (5, 64, None), (33, 192, 64), (3, 40, 8)])
def test_round_trip_bit_exact(bits, n, k, gs):
    qw, s, z = _random_layer(n, k, bits, gs or k, seed=bits * 100 + n)
    t = to_gptq_v1(qw, s, z, bits, gs, k)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (-(-k * bits // 32), n)
    assert t["scales"].shape == (k // (gs or k), n) and t["g_idx"].tolist() == [i // (gs or k) for i in range(k)]
    qw2, s2, z2, g_idx = from_gptq_v1(t, bits, gs, k, n)
    assert torch.equal(qw2, qw) and torch.equal(s2, s) and torch.equal(z2, z)
    assert torch.equal(g_idx, t["g_idx"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_classic_layout(bits):
    n, k = 6, 128
    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    zeros = torch.randint(1, 2 ** bits, (n, 2), generator=g).to(torch.uint8)
    t = to_gptq_v1(pack_int32(u, bits), torch.ones(n, 2), zeros, bits, 64, k)
    want_qw = classic_pack_along_rows(u.t().numpy(), bits)
    assert np.array_equal(t["qweight"].numpy(), want_qw)
    # qzeros: zero - 1 packed along N (classic code packs columns the same way: transpose trick)
    zz = torch.randint(1, 2 ** bits, (96, 2), generator=g).to(torch.uint8)  # N = 96 (multiple of 32)
    t2 = to_gptq_v1(pack_int32(torch.zeros(96, k, dtype=torch.uint8), bits), torch.ones(96, 2), zz, bits, 64, k)
    want_qz = classic_pack_along_rows(zz.numpy().astype(np.int64) - 1, bits).T  # [N, G] packed along N
    assert np.array_equal(t2["qzeros"].numpy(), want_qz)


def test_zero_point_zero_round_trips_with_warning():
    qw, s, z = _random_layer(4, 64, 4, 32, seed=1)
    z[0, 0] = 0
    with pytest.warns(UserWarning, match="zero point 0"):
        t = to_gptq_v1(qw, s, z, 4, 32, 64)
    assert torch.equal(from_gptq_v1(t, 4, 32, 64, 4)[2], z)


def test_bad_inputs():
    qw, s, z = _random_layer(4, 64, 4, 32, seed=2)
    with pytest.raises(ValueError, match="bits=5"):
        to_gptq_v1(qw, s, z, 5, 32, 64)
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        to_gptq_v1(qw, s, z, 4, 48, 64)
    with pytest.raises(ValueError, match="qweight must be int32"):
        to_gptq_v1(qw[:, :3], s, z, 4, 32, 64)
    t = to_gptq_v1(qw, s, z, 4, 32, 64)
    with pytest.raises(ValueError, match="missing tensor"):
        from_gptq_v1({"qweight": t["qweight"]}, 4, 32, 64, 4)
