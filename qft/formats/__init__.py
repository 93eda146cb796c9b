"""Packed formats: how quantized modules become tensors on disk and back.

* ``pack-quantized``: compressed-tensors' layout (what vLLM and transformers load). Integer
  weights in qft's canonical int32 words (``weight_packed``), ``weight_scale`` [N, G],
  ``weight_zero_point`` packed along N (asymmetric only), ``weight_shape``.
* ``gptq``: the GPTQ v1 layout (qweight packed along K, qzeros stored as zero-1, scales, g_idx);
  conversion lives in :mod:`qft.formats.gptq`.
* ``qft``: the native format; holds anything, including custom module types (OneBit, ...)
  registered with :func:`register_module_type`.
"""

from __future__ import annotations

from qft.formats.compressed import from_pack_quantized, pack_quantized_config, to_pack_quantized

MODULE_TYPES: dict[str, type] = {}


def register_module_type(cls):
    """Register a custom quantized module for the native format.

    The class provides ``qft_type`` (str), ``export_tensors()``, ``export_config()``,
    ``from_export(config, tensors, dtype)`` (classmethod) and ``bits_per_weight()``.
    """
    for attr in ("qft_type", "export_tensors", "export_config", "from_export", "bits_per_weight"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} cannot be registered: it lacks {attr!r}")
    MODULE_TYPES[cls.qft_type] = cls
    return cls


__all__ = ["MODULE_TYPES", "register_module_type", "to_pack_quantized", "from_pack_quantized",
           "pack_quantized_config"]
