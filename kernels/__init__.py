"""qft.kernels: low-bit compute kernels (Triton) with torch references.

A leaf package: imports torch (and triton, lazily) only. The backend is chosen by the
environment variable ``QFT_KERNELS=auto|triton|torch`` (default ``auto``: Triton when a CUDA
device and triton are available, the torch reference otherwise).
"""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import pack_int32, packed_cols, unpack_int32, pack_signs, unpack_signs

__all__ = ["backend", "dequant", "qlinear", "onebit_linear", "pack_int32", "unpack_int32",
           "packed_cols", "pack_signs", "unpack_signs", "reference"]

_BACKENDS = ("auto", "triton", "torch")


def backend(device: torch.device | None = None) -> str:
    """The backend that runs for tensors on ``device``: 'triton' or 'torch'."""
    want = os.environ.get("QFT_KERNELS", "auto").lower()
    if want not in _BACKENDS:
        raise ValueError(f"QFT_KERNELS={want!r} is not valid; allowed: {', '.join(_BACKENDS)}")
    if want == "torch":
        return "torch"
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if want == "triton":
        return "triton"
    return "triton" if on_gpu else "torch"


def dequant(qweight, scales, zeros, bits, group_size, in_features, dtype=None):
    return reference.dequant(qweight, scales, zeros, bits, group_size, in_features, dtype)


def qlinear(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
    return reference.qlinear(x, qweight, scales, zeros, bits, group_size, in_features, bias)


def onebit_linear(x, packed_signs, g, h, in_features, bias=None):
    return reference.onebit_linear(x, packed_signs, g, h, in_features, bias)
