"""transformers integration of the native ``qft`` format.

After ``import qft``, ``AutoModelForCausalLM.from_pretrained(path)`` loads a checkpoint exported
with ``format="qft"``: the quantizer swaps the listed modules for empty packed qft modules
(QuantLinear, or a registered custom type such as OneBit's sign-value linear) before the weights
load, so the checkpoint's tensors land in them by name. Registration happens lazily, when
``transformers.quantizers.auto`` is first imported (see qft/compat.py), so ``import qft`` stays
cheap.
"""

from __future__ import annotations


def register() -> None:
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if "qft" in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config("qft")
    class QftConfig(QuantizationConfigMixin):
        def __init__(self, modules: dict | None = None, format: str = "qft", version: int = 1, **kwargs):
            self.quant_method = "qft"
            self.modules = modules or {}
            self.format = format
            self.version = version

        def to_dict(self):
            return {"quant_method": "qft", "format": self.format, "version": self.version, "modules": self.modules}

    @register_quantizer("qft")
    class QftHfQuantizer(HfQuantizer):
        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if not self.quantization_config.modules:
                raise ValueError("quantization_config of this qft checkpoint lists no modules")

        def _process_model_before_weight_loading(self, model, **kwargs):
            import torch

            from qft.export import build_empty_module
            from qft.nn.swap import set_module
            dtype = kwargs.get("dtype") or getattr(model, "dtype", torch.float32)
            for name, entry in self.quantization_config.modules.items():
                set_module(model, name, build_empty_module(name, entry, dtype))

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    del AUTO_QUANTIZATION_CONFIG_MAPPING  # silence linters about unused names
