"""Registries: PTQ methods, distillation losses, packing formats. One decorator adds an entry."""

from __future__ import annotations

from typing import Callable


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists the known ones."""

    def __str__(self):
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(obj):
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str):
        self._load()
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name):
        self._load()
        return name in self._items

    def _load(self):
        # importing the subpackage registers its members
        import importlib
        mod = {"ptq method": "qft.ptq", "distillation loss": "qft.train.losses", "packing format": "qft.formats"}
        if self.kind in mod:
            try:
                importlib.import_module(mod[self.kind])
            except ImportError:
                pass


METHODS = Registry("ptq method")
LOSSES = Registry("distillation loss")
FORMATS = Registry("packing format")
