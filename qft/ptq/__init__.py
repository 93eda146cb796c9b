"""Post-training quantization methods, one file each, registered in ``qft.registry.METHODS``.

A method is ``fn(model, spec, calib=None, **options) -> model``: it replaces the targeted
nn.Linear modules with QuantLinear (fake state, integers fixed) and may change other weights
(scaling folded into norms, ...). ``calib`` is a LongTensor [n, seq_len] of calibration windows.
"""

import importlib

from qft.registry import METHODS

_MODULES = ["rtn", "svid", "clip", "gptq", "awq", "smoothquant", "llm_int8", "zeroquant", "omniquant", "rptq", "osplus", "llm_fp4", "olive", "wkvquant", "owq", "spqr", "squeezellm", "quip", "lutgemm"]
for _m in _MODULES:
    importlib.import_module(f"qft.ptq.{_m}")


def run(method: str, model, spec, calib=None, **options):
    """Look up ``method`` in the registry and apply it."""
    return METHODS.get(method)(model, spec, calib=calib, **options)


__all__ = ["METHODS", "run"]
