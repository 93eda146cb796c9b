"""qft.kernels: low-bit compute kernels (Triton) with torch references.

A leaf package: imports torch (and triton, lazily) only; importing it neither imports triton
nor initializes CUDA. The backend is chosen by the environment variable
``QFT_KERNELS=auto|triton|torch`` (default ``auto``: Triton for CUDA tensors when triton is
installed, the torch reference otherwise; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``).

API (every op has a torch reference of the same name in :mod:`qft.kernels.reference`):

* ``qlinear(x, qweight, scales, zeros, bits, group_size, in_features, bias=None)``:
  y = x @ dequant(W)^T (+ bias), weight-only W{1..8}A16 on the canonical packed layout
  (group_size None / 0 / -1 / in_features = per output channel). On the Triton path, M <= 64
  first tries the K-sliced kernels (``wq_sliced``: a re-laid-out copy of the words built once at
  load, a conversion-light CUDA-core GEMV for M <= 4 and tensor-core kernels up to M = 64), timed
  against the canonical kernels once per (M, shape); otherwise a GEMV kernel serves M <= 4, a
  tensor-core GEMM (split-K when the grid is small) larger M, and from M = 128 on the faster of
  that GEMM and dequantize-then-cuBLAS (timed once per shape). Make the first call per shape
  (warm-up) outside CUDA-graph capture, so the timing can run.
  Differentiable in x (and bias) with a fused dequant+matmul backward (qlora); the frozen
  weight gets no gradient. Call it with the canonical buffers: the kernel-ready form (scales
  and zeros in the activation dtype, 3/5/6/7-bit repacked into 4/8-bit containers) is built
  once and cached per tensor (data_ptr, version); it holds the sliced copy as well, so a packed
  weight costs twice its packed size on the GPU. ``prepare(...)`` builds it explicitly and
  ``qlinear_prepared(x, p, bias)`` runs on it (through the same per-tensor cache).
* ``dequant(qweight, scales, zeros, bits, group_size, in_features, dtype=None)``.
* ``fake_quant_weight(w, bits, group_size, symmetric, clip_max, clip_min, scale, zero, out_dtype)``
  and ``fake_quant_weight_grad(w, scale, zero, grad_w, bits, group_size, out_dtype)``: QAT's
  group-wise min-max quantize-dequantize of a float32 weight and its straight-through backward,
  one kernel each (:mod:`.fakequant_triton`), bit-exact with the torch reference.
* ``onebit_linear(x, packed_signs, g, h, in_features, bias=None)``: OneBit sign-value layer.
* ``int8_linear(x, w_int8, w_scales, bias=None)``: W8A8, per-token dynamic int8 activations,
  per-channel int8 weights (``reference.quantize_weight_int8``), int32 accumulation.
* KIVI KV cache: ``KiviCache`` (quantize-on-append with a full-precision recent window),
  ``kv_quantize_into(...)`` and ``kv_decode_attention(q, kq, k_scale, k_min, vq, v_scale,
  v_min, k_res, v_res, bits, group, sm_scale=None)``.

The Triton paths are torch custom ops (``torch.ops.qft.*``, see :mod:`.ops`) with fake
implementations, so ``torch.compile`` traces through them without graph breaks.
"""

from __future__ import annotations

import os

import torch

from . import ops, reference
from ._util import triton_available
from .kv import KiviCache
from .reference import pack_int32, packed_cols, unpack_int32, pack_signs, unpack_signs

__all__ = ["backend", "dequant", "qlinear", "qlinear_prepared", "prepare", "onebit_linear", "int8_linear",
           "fake_quant_weight", "fake_quant_weight_grad",
           "kv_quantize_into", "kv_decode_attention", "KiviCache", "pack_int32", "unpack_int32",
           "packed_cols", "pack_signs", "unpack_signs", "reference", "ops"]

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
        if not triton_available():
            raise RuntimeError("QFT_KERNELS=triton but triton is not installed")
        return "triton"
    return "triton" if on_gpu and triton_available() else "torch"


def _group(group_size, in_features: int) -> int:
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return in_features
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}; pad the "
                         f"layer or choose a divisor (e.g. 32, 64 or per-channel for 576)")
    return group_size


def _triton_wq_ok(group_size: int, in_features: int) -> bool:
    return group_size == in_features or group_size % 32 == 0


def dequant(qweight, scales, zeros, bits, group_size, in_features, dtype=None):
    gs = _group(group_size, in_features)
    dtype = dtype or scales.dtype
    if backend(qweight.device) == "torch" or not _triton_wq_ok(gs, in_features):
        return reference.dequant(qweight, scales, zeros, bits, gs, in_features, dtype)
    return ops.wq_dequant(qweight, scales, zeros, bits, gs, in_features, dtype)


def qlinear(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
    gs = _group(group_size, in_features)
    if qweight.shape[-1] != packed_cols(in_features, bits):
        raise ValueError(f"qweight has {qweight.shape[-1]} words per row; {bits}-bit in_features={in_features} "
                         f"needs {packed_cols(in_features, bits)}")
    if backend(x.device) == "torch" or not _triton_wq_ok(gs, in_features):
        return reference.qlinear(x, qweight, scales, zeros, bits, gs, in_features, bias)
    if ops.EAGER_AUTOGRAD and not torch.compiler.is_compiling():  # eager: same kernels, no custom-op dispatch cost
        return ops.wq_linear_eager(x, qweight, scales, zeros, bits, gs, in_features, bias)
    return ops.wq_linear(x, qweight, scales, zeros, bits, gs, in_features, bias)


def prepare(qweight, scales, zeros, bits, group_size, in_features, dtype=torch.bfloat16):
    """Kernel-ready weight struct (build once at load; pass to :func:`qlinear_prepared`)."""
    from .wq_triton import prepare as _prepare

    return _prepare(qweight, scales, zeros, bits, _group(group_size, in_features), in_features, dtype)


def qlinear_prepared(x, p, bias=None):
    """qlinear on a struct from :func:`prepare` (no cache lookup; scales/zeros already in x's dtype)."""
    if backend(x.device) == "torch":
        return reference.qlinear(x, pack_int32(unpack_int32(p.qweight, p.bits, p.in_features), p.orig_bits)
                                 if p.bits != p.orig_bits else p.qweight, p.scales, p.zeros, p.orig_bits,
                                 p.group_size, p.in_features, bias)
    return ops.wq_linear(x, p.qweight, p.scales.to(x.dtype), p.zeros.to(x.dtype), p.bits, p.group_size,
                         p.in_features, bias)


def fake_quant_weight(w, bits, group_size, symmetric, clip_max=1.0, clip_min=None, scale=None, zero=None,
                      out_dtype=torch.bfloat16):
    """QAT fake quantization of W [N, K] (float32): (Q(W) in out_dtype, scale, zero [N, G] float32)."""
    gs = _group(group_size, w.shape[1])
    if backend(w.device) == "torch":
        return reference.fake_quant_weight(w, bits, gs, symmetric, clip_max, clip_min, scale, zero, out_dtype)
    from .fakequant_triton import fake_quant_weight as _fq
    return _fq(w, bits, gs, symmetric, clip_max, clip_min, scale, zero, out_dtype)


def fake_quant_weight_grad(w, scale, zero, grad_w, bits, group_size, out_dtype=torch.bfloat16):
    """Backward of :func:`fake_quant_weight` (STE): (Q(W) in out_dtype, grad_w float32 masked)."""
    gs = _group(group_size, w.shape[1])
    if backend(w.device) == "torch":
        return reference.fake_quant_weight_grad(w, scale, zero, grad_w, bits, gs, out_dtype)
    from .fakequant_triton import fake_quant_weight_grad as _fqg
    return _fqg(w, scale, zero, grad_w, bits, gs, out_dtype)


def onebit_linear(x, packed_signs, g, h, in_features, bias=None):
    if packed_signs.shape[-1] != packed_cols(in_features, 1):
        raise ValueError(f"packed_signs has {packed_signs.shape[-1]} words per row; in_features={in_features} "
                         f"needs {packed_cols(in_features, 1)}")
    if backend(x.device) == "torch":
        return reference.onebit_linear(x, packed_signs, g, h, in_features, bias)
    return ops.onebit_linear(x, packed_signs, g, h, in_features, bias)


def int8_linear(x, w_int8, w_scales, bias=None):
    if backend(x.device) == "torch":
        return reference.int8_linear(x, w_int8, w_scales, bias)
    return ops.int8_linear(x, w_int8, w_scales, bias)


def kv_quantize_into(k, v, kq, k_scale, k_min, vq, v_scale, v_min, t_out, bits, group):
    """Quantize k, v [B, H, T, D] (T % group == 0) into cache buffers at token ``t_out``."""
    if backend(k.device) == "torch":
        t = k.shape[2]
        p, s, m = reference.kivi_quantize_keys(k, bits, group)
        kq[:, :, t_out:t_out + t], k_scale[:, :, t_out // group:(t_out + t) // group] = p, s
        k_min[:, :, t_out // group:(t_out + t) // group] = m
        p, s, m = reference.kivi_quantize_values(v, bits, group)
        vq[:, :, t_out:t_out + t], v_scale[:, :, t_out:t_out + t], v_min[:, :, t_out:t_out + t] = p, s, m
        return
    ops.kv_quantize_into(k, v, kq, k_scale, k_min, vq, v_scale, v_min, t_out, bits, group)


def kv_decode_attention(q, kq, k_scale, k_min, vq, v_scale, v_min, k_res, v_res, bits, group, sm_scale=None):
    if backend(q.device) == "torch":
        return reference.kv_decode_attention(q, kq, k_scale, k_min, vq, v_scale, v_min, k_res, v_res,
                                             bits, group, sm_scale)
    scale = float(sm_scale) if sm_scale is not None else q.shape[-1] ** -0.5
    return ops.kv_decode_attention(q, kq, k_scale, k_min, vq, v_scale, v_min, k_res, v_res, bits, group, scale)
