"""Triton building blocks shared by the tensor-core weight-only kernels (``wq_gemm_tc``, ``wq_gemm_tc2``).

* ``grouped_tile``: the program id -> (m tile, n tile) map with GROUP_M activation tiles sweeping
  the weight tiles together, so both stay in L2 while they are reused.
* ``store_tile``: the epilogue: bias (added once, by the first K split), then a plain store in the
  output dtype or an fp32 atomic add when K is split across programs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % gsz, (pid % width) // gsz


@triton.jit
def store_tile(acc, y_ptr, b_ptr, rm, rn, mmask, nmask, stride_ym, pid_k,
               HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=omask)
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)
