"""GPTQ v1 checkpoint layout <-> qft's canonical QuantLinear buffers.

GPTQ v1 (AutoGPTQ / GPTQModel "gptq" format, what vLLM's and transformers' GPTQ loaders read):

* ``qweight`` int32 [ceil(K * bits / 32), N]: the integers packed along K (input features) into
  32-bit words, lowest bits first. 2/4/8 bits hold 32/bits values per word; 3 bits uses the classic
  cross-word layout, 32 values in 3 words with values 10 and 21 straddling two words. Both are the
  same dense little-endian bit stream along K, which is exactly qft's canonical packing (along K,
  per output row), so qweight = canonical.T.
* ``qzeros`` int32 [G, ceil(N * bits / 32)]: zero points minus one ("zero - 1", the v1 quirk),
  packed the same way along N.
* ``scales`` [G, N] (the model dtype, usually float16); ``g_idx`` int32 [K]: the group of each input
  channel (k // group_size for qft, whose act-order uses static groups).

A zero point of 0 cannot be stored as zero - 1 in ``bits`` bits: it is written as 2**bits - 1
(wrapped) and read back as 0 by :func:`from_gptq_v1`; other v1 loaders would read 2**bits, so
:func:`to_gptq_v1` warns when that happens (use the compressed-tensors or qft format then).
"""

from __future__ import annotations

import warnings

import torch

from qft.kernels import pack_int32, packed_cols, unpack_int32

__all__ = ["to_gptq_v1", "from_gptq_v1"]


def _check_bits(bits):
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"gptq v1 format: bits={bits!r} is not supported; allowed: 2, 3, 4, 8")


def _groups(in_features, group_size):
    if group_size is None or group_size == -1:
        group_size = in_features
    if not isinstance(group_size, int) or group_size < 1 or in_features % group_size:
        raise ValueError(f"gptq v1 format: group_size={group_size!r} does not divide in_features={in_features}")
    return group_size, in_features // group_size


def to_gptq_v1(qweight_canonical: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int | None, in_features: int, g_idx: torch.Tensor | None = None) -> dict:
    """Canonical QuantLinear buffers (qweight int32 [N, ceil(K*bits/32)], scales [N, G], zeros [N, G]
    integer) -> {"qweight", "qzeros", "scales", "g_idx"} in the GPTQ v1 layout."""
    _check_bits(bits)
    gs, G = _groups(in_features, group_size)
    N = qweight_canonical.shape[0]
    if qweight_canonical.dtype != torch.int32 or qweight_canonical.shape != (N, packed_cols(in_features, bits)):
        raise ValueError(f"gptq v1 format: qweight must be int32 [{N}, {packed_cols(in_features, bits)}] "
                         f"for in_features={in_features} at {bits} bits; got {qweight_canonical.dtype} "
                         f"{tuple(qweight_canonical.shape)}")
    if tuple(scales.shape) != (N, G) or tuple(zeros.shape) != (N, G):
        raise ValueError(f"gptq v1 format: scales/zeros must be [{N}, {G}]; got {tuple(scales.shape)} / "
                         f"{tuple(zeros.shape)}")
    z = zeros.to(torch.int64)
    if int(z.min()) < 0 or int(z.max()) >= 2 ** bits:
        raise ValueError(f"gptq v1 format: zero points out of range for {bits} bits: [{int(z.min())}, {int(z.max())}]")
    if bool((z == 0).any()):
        warnings.warn(f"gptq v1 format: {int((z == 0).sum())} group(s) have zero point 0, which v1 stores as "
                      f"2**bits - 1 (zero - 1 wrapped); qft reads them back exactly, other v1 loaders do not")
    if g_idx is None:
        g_idx = torch.arange(in_features, device=scales.device) // gs
    if g_idx.shape != (in_features,):
        raise ValueError(f"gptq v1 format: g_idx must have shape [{in_features}]; got {tuple(g_idx.shape)}")
    qzeros = pack_int32(((z - 1) % (2 ** bits)).t().contiguous(), bits)  # [G, ceil(N*bits/32)]
    return {"qweight": qweight_canonical.t().contiguous(), "qzeros": qzeros,
            "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32).contiguous()}


def from_gptq_v1(tensors: dict, bits: int, group_size: int | None, in_features: int, out_features: int):
    """GPTQ v1 tensors -> (qweight_canonical int32 [N, W], scales [N, G], zeros uint8 [N, G], g_idx [K]).

    A g_idx other than k // group_size (dynamic act-order checkpoints) is returned as is: the
    canonical layout assumes contiguous groups, so the caller must handle it.
    """
    _check_bits(bits)
    gs, G = _groups(in_features, group_size)
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise ValueError(f"gptq v1 format: missing tensor(s) {missing}; have {sorted(tensors)}")
    qw, qz, sc = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    W = packed_cols(in_features, bits)
    if qw.dtype != torch.int32 or tuple(qw.shape) != (W, out_features):
        raise ValueError(f"gptq v1 format: qweight must be int32 [{W}, {out_features}]; got {qw.dtype} {tuple(qw.shape)}")
    if tuple(sc.shape) != (G, out_features):
        raise ValueError(f"gptq v1 format: scales must be [{G}, {out_features}]; got {tuple(sc.shape)}")
    if tuple(qz.shape) != (G, packed_cols(out_features, bits)):
        raise ValueError(f"gptq v1 format: qzeros must be [{G}, {packed_cols(out_features, bits)}]; got {tuple(qz.shape)}")
    zeros = ((unpack_int32(qz, bits, out_features).to(torch.int64) + 1) % (2 ** bits)).t().to(torch.uint8)
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_features, device=qw.device, dtype=torch.int32) // gs
    return qw.t().contiguous(), sc.t().contiguous(), zeros.contiguous(), g_idx
