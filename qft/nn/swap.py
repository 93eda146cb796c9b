"""quantize_model: swap nn.Linear modules for QuantLinear by name pattern (no forked modeling files)."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from qft.nn.qlinear import QuantLinear
from qft.spec import QuantSpec, resolve_spec


def target_linears(model: nn.Module, spec: QuantSpec) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear the spec targets, in model order."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear) and spec.matches(name):
            yield name, mod


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, spec: "QuantSpec | str | dict", pack: bool = False,
                   qparams: dict | None = None) -> nn.Module:
    """Replace every targeted nn.Linear with a QuantLinear (fake state; packed if ``pack``).

    Every layer is checked before any is swapped, so a bad group size leaves the model untouched.
    ``qparams`` maps layer names to (scale, zero) to use instead of min-max.
    """
    spec = resolve_spec(spec)
    layers = list(target_linears(model, spec))
    if not layers:
        raise ValueError(f"no nn.Linear in the model matches targets={list(spec.targets)} "
                         f"with ignore={list(spec.ignore)}")
    for name, lin in layers:
        spec.check_layer(name, lin.in_features)
    for name, lin in layers:
        s, z = (qparams or {}).get(name, (None, None))
        q = QuantLinear.from_linear(lin, spec, name=name, scale=s, zero=z)
        if pack:
            q.pack()
        set_module(model, name, q)
    model.qft_spec = spec
    return model


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


def pack_model(model: nn.Module) -> nn.Module:
    for _, m in quant_linears(model):
        m.pack()
    return model
