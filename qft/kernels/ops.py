"""torch custom ops (``torch.ops.qft.*``) wrapping the Triton kernels, with fake impls.

Registered at ``import qft.kernels`` without importing triton: the real implementations import
the ``*_triton`` modules on first call, so the schemas and fake (meta) implementations exist
for ``torch.compile`` / ``torch.export`` even where triton is missing. Each op takes the
canonical tensors; kernel-ready versions are built once and cached (see ``prepared``).

Ops: ``wq_linear`` (autograd: grad_x through ``wq_grad_input``, the fused dequant+matmul
backward; no gradient to the frozen weight, scales or zeros; bias gets grad_y summed),
``wq_grad_input``, ``wq_dequant``, ``onebit_linear``, ``int8_linear``, ``kv_decode_attention``,
``kv_quantize_into`` (mutates the cache buffers).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from ._util import interpreting

# ------------------------------------------------------------------------------------------------
# load-time preparation cache
# ------------------------------------------------------------------------------------------------
_PREPARED: dict = {}


def _version(t: Tensor) -> int:
    try:
        return t._version
    except Exception:  # inference tensors have no version counter
        return 0


def prepared(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
             in_features: int, dtype: torch.dtype):
    """Kernel-ready struct for canonical tensors, cached by (data_ptr, version) of the inputs.

    Already kernel-ready tensors (scales and zeros in ``dtype``, bits in {1,2,4,8}) are wrapped
    without a copy or a cache entry. An entry is used only while the very tensors it was built
    from are alive (weakrefs) and unmodified (version counters); it dies with any of them.
    """
    from . import wq_triton

    if bits in (1, 2, 4, 8) and scales.dtype == dtype and zeros.dtype == dtype \
            and scales.is_contiguous() and zeros.is_contiguous() and qweight.is_contiguous() \
            and not wq_triton.wq_sliced.block_words(bits, group_size, in_features):
        return wq_triton.PreparedQWeight(qweight, scales, zeros, bits, bits, group_size, in_features,
                                         qweight.shape[0])
    key = (qweight.data_ptr(), _version(qweight), scales.data_ptr(), _version(scales),
           zeros.data_ptr(), _version(zeros), bits, group_size, in_features, dtype, qweight.device)
    hit = _PREPARED.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], (qweight, scales, zeros))):
        p = hit[1]
        return p if p.qweight is not None else wq_triton.PreparedQWeight(qweight, *_fields(p)[1:])
    # the K-sliced copy is built lazily (wq_triton.sliced_copy), only if a small-M call needs it
    p = wq_triton.prepare(qweight, scales, zeros, bits, group_size, in_features, dtype, sliced=False)
    # never keep a strong reference to the canonical tensors (the entry dies with any of them,
    # so a temporary such as ``scales.to(x.dtype)`` never leaves a stale entry behind)
    stored = p if p.qweight is not qweight else wq_triton.PreparedQWeight(None, *_fields(p)[1:])
    _PREPARED[key] = ((weakref.ref(qweight), weakref.ref(scales), weakref.ref(zeros)), stored)
    for t in (qweight, scales, zeros):
        weakref.finalize(t, _PREPARED.pop, key, None)
    return p


def _fields(p):
    return (p.qweight, p.scales, p.zeros, p.bits, p.orig_bits, p.group_size, p.in_features, p.out_features,
            p.sliced, p.bkw)


def clear_cache() -> None:
    from . import wq_triton

    _PREPARED.clear()
    wq_triton._SLICED_COPIES.clear()


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                           "set QFT_KERNELS=torch for the reference path")


def _flat(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ------------------------------------------------------------------------------------------------
# weight-only
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("qft::wq_linear", mutates_args=())
def wq_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
              in_features: int, bias: Optional[Tensor] = None) -> Tensor:
    from . import wq_triton

    _check_device(x)
    p = prepared(qweight, scales, zeros, bits, group_size, in_features, x.dtype)
    b = None if bias is None else bias.to(x.dtype).contiguous()
    y = wq_triton.linear(_flat(x), p, b)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@wq_linear.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("qft::wq_grad_input", mutates_args=())
def wq_grad_input(grad_y: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                  group_size: int, in_features: int) -> Tensor:
    from . import wq_triton

    _check_device(grad_y)
    p = prepared(qweight, scales, zeros, bits, group_size, in_features, grad_y.dtype)
    dx = wq_triton.grad_input(_flat(grad_y), p)
    return dx.reshape(*grad_y.shape[:-1], in_features)


@wq_grad_input.register_fake
def _(grad_y, qweight, scales, zeros, bits, group_size, in_features):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


def _wq_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bits, group_size, in_features, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (bits, group_size, in_features, bias is not None, x.dtype)


def _wq_backward(ctx, gy):
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, in_features, has_bias, xdt = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = wq_grad_input(gy.to(xdt).contiguous(), qweight, scales, zeros, bits, group_size, in_features)
    if has_bias and ctx.needs_input_grad[7]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, None, None, None, None, None, None, gb


wq_linear.register_autograd(_wq_backward, setup_context=_wq_setup)


class _WQLinearEager(torch.autograd.Function):
    """Eager twin of ``wq_linear``: the same kernels and backward, without the custom-op dispatch.

    Measured on this repo's CPU with the kernels stubbed out: the custom-op route (Python
    dispatcher, autograd wrapper, ``backend_impl``) costs ~260 us of Python per forward + backward
    of one layer, which a qlora training step pays for every linear of every layer (the H100 runs
    of ``benchmarks/qat_lora_speed.py`` were CPU-bound). ``kernels.qlinear`` takes this route in
    eager mode and the custom op under ``torch.compile`` (which needs its fake implementation). The
    kernel-ready struct from the forward is kept on ``ctx`` (references to the frozen tensors, no
    copy), so the backward neither looks it up again nor saves a dense weight.
    """

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, bits, group_size, in_features, bias):
        from . import wq_triton

        _check_device(x)
        p = prepared(qweight, scales, zeros, bits, group_size, in_features, x.dtype)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        y = wq_triton.linear(_flat(x), p, b)
        ctx.p, ctx.xdt, ctx.has_bias = p, x.dtype, bias is not None
        return y.reshape(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        from . import wq_triton

        gx = gb = None
        if ctx.needs_input_grad[0]:
            p = ctx.p
            gx = wq_triton.grad_input(_flat(gy.to(ctx.xdt)), p).reshape(*gy.shape[:-1], p.in_features)
        if ctx.has_bias and ctx.needs_input_grad[7]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, None, None, None, None, None, gb


EAGER_AUTOGRAD = True  # kernels.qlinear in eager mode: _WQLinearEager (False: always the custom op)


def wq_linear_eager(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
    return _WQLinearEager.apply(x, qweight, scales, zeros, bits, group_size, in_features, bias)


@torch.library.custom_op("qft::wq_dequant", mutates_args=())
def wq_dequant(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype) -> Tensor:
    from . import wq_triton

    _check_device(qweight)
    return wq_triton.dequant(prepared(qweight, scales, zeros, bits, group_size, in_features, dtype), dtype)


@wq_dequant.register_fake
def _(qweight, scales, zeros, bits, group_size, in_features, dtype):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# OneBit, W8A8
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("qft::onebit_linear", mutates_args=())
def onebit_linear(x: Tensor, packed_signs: Tensor, g: Tensor, h: Tensor, in_features: int,
                  bias: Optional[Tensor] = None) -> Tensor:
    from . import onebit_triton

    _check_device(x)
    y = onebit_triton.linear(_flat(x), packed_signs.contiguous(), g.contiguous(), h.contiguous(),
                             None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], packed_signs.shape[0])


@onebit_linear.register_fake
def _(x, packed_signs, g, h, in_features, bias=None):
    return x.new_empty((*x.shape[:-1], packed_signs.shape[0]))


@torch.library.custom_op("qft::int8_linear", mutates_args=())
def int8_linear(x: Tensor, w_int8: Tensor, w_scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    from . import int8_triton

    _check_device(x)
    y = int8_triton.linear(_flat(x), w_int8.contiguous(), w_scales.contiguous(),
                           None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], w_int8.shape[0])


@int8_linear.register_fake
def _(x, w_int8, w_scales, bias=None):
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


# ------------------------------------------------------------------------------------------------
# KIVI KV cache
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("qft::kv_decode_attention", mutates_args=())
def kv_decode_attention(q: Tensor, kq: Tensor, k_scale: Tensor, k_min: Tensor, vq: Tensor, v_scale: Tensor,
                        v_min: Tensor, k_res: Tensor, v_res: Tensor, bits: int, group: int,
                        sm_scale: float) -> Tensor:
    from . import kivi_triton

    _check_device(q)
    return kivi_triton.decode_attention(q.contiguous(), kq, k_scale, k_min, vq, v_scale, v_min, k_res, v_res,
                                        bits, group, sm_scale)


@kv_decode_attention.register_fake
def _(q, kq, k_scale, k_min, vq, v_scale, v_min, k_res, v_res, bits, group, sm_scale):
    return torch.empty_like(q)


@torch.library.custom_op("qft::kv_quantize_into", mutates_args=("kq", "k_scale", "k_min", "vq", "v_scale", "v_min"))
def kv_quantize_into(k: Tensor, v: Tensor, kq: Tensor, k_scale: Tensor, k_min: Tensor, vq: Tensor,
                     v_scale: Tensor, v_min: Tensor, t_out: int, bits: int, group: int) -> None:
    from . import kivi_triton

    _check_device(k)
    kivi_triton.quantize_into(k, v, kq, k_scale, k_min, vq, v_scale, v_min, t_out, bits, group)


@kv_quantize_into.register_fake
def _(k, v, kq, k_scale, k_min, vq, v_scale, v_min, t_out, bits, group):
    return None
