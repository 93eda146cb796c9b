"""RTN: round-to-nearest with min-max (or clipped) ranges per group. No calibration data.

The baseline every other method is measured against: each targeted nn.Linear becomes a
QuantLinear whose integers are round(w / s) + z with s, z from the group's min and max.
"""

from __future__ import annotations

from torch import nn

from qft.nn import quantize_model
from qft.registry import METHODS
from qft.spec import QuantSpec


@METHODS.register("rtn")
def rtn(model: nn.Module, spec: QuantSpec, calib=None, **options) -> nn.Module:
    """Quantize ``model`` in place with round-to-nearest; ``calib`` is ignored."""
    if options:
        raise ValueError(f"rtn takes no options; got {sorted(options)}")
    return quantize_model(model, spec)
