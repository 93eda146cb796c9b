"""Small helpers shared by the Triton kernel files (no triton import here).

* ``interpreting()``: True under ``TRITON_INTERPRET=1`` (CPU interpreter). The interpreter
  miscomputes ``tl.dot`` on bf16/fp16 operands that were produced by a cast (seen with triton
  3.9), so kernels take an ``UPCAST`` constexpr and feed fp32 operands to ``tl.dot`` there.
* ``triton_available()``: whether ``import triton`` works, without importing it eagerly at
  package import time.
"""

from __future__ import annotations

import importlib.util
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON: list = []


def triton_available() -> bool:
    if not _TRITON:
        _TRITON.append(importlib.util.find_spec("triton") is not None)
    return _TRITON[0]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def largest_pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n (n > 0)."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


# Test hook: when True, kernel outputs are allocated filled with NaN (floats) or a sentinel
# (ints) instead of uninitialised memory, so an element a kernel fails to write shows up.
POISON = False


def alloc(shape, dtype, device):
    import torch

    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 0x5A5A5A5A if dtype == torch.int32 else 0x5A, dtype=dtype, device=device)
