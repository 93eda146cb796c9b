"""qft: quantization-aware fine-tuning through PEFT, post-training quantization, low-bit kernels.

``import qft`` is light: it does not initialize CUDA and does not import deepspeed, datasets or
bitsandbytes.
"""

from qft.spec import PRESETS, QuantSpec, QuantSpecError, preset

__version__ = "0.1.0"


def _install_compat():
    import os
    if os.environ.get("QFT_NO_COMPAT") != "1":
        from qft.compat import install
        install()


_install_compat()

__all__ = ["QuantSpec", "QuantSpecError", "PRESETS", "preset", "quantize_model", "QuantLinear", "load",
           "save", "load_model", "__version__"]


def __getattr__(name):  # lazy: keep `import qft` cheap
    if name in ("quantize_model", "QuantLinear", "pack_model"):
        from qft import nn as _nn
        return getattr(_nn, name)
    if name in ("load", "save"):
        from qft import export as _export
        return getattr(_export, name)
    if name == "load_model":
        from qft.models import load_model
        return load_model
    raise AttributeError(f"module 'qft' has no attribute {name!r}")
