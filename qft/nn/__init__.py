"""Quantized modules: fake-quant primitives, QuantLinear, module swapping."""

from qft.nn import quant
from qft.nn.qlinear import QuantLinear
from qft.nn.swap import pack_model, quant_linears, quantize_model, set_module, target_linears

__all__ = ["quant", "QuantLinear", "quantize_model", "pack_model", "quant_linears", "set_module", "target_linears"]
