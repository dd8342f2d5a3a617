"""Modules that load on first use: a start-up cost paid only by whoever uses them."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


class Deferred(types.ModuleType):
    """Stands in `sys.modules` for a module until an attribute is read that it does not hold;
    then it imports the real module, takes on its contents (so every reference to the stand-in
    works as the real module) and leaves the real one in `sys.modules`."""

    def __getattr__(self, name: str):
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            real = self._load()
        return getattr(real, name)

    def _load(self) -> types.ModuleType:
        name = self.__name__
        del sys.modules[name]
        real = importlib.import_module(name)
        own = {k: v for k, v in self.__dict__.items() if not k.startswith("__")}
        for key, value in own.items():  # what was set on the stand-in meanwhile, unless the real one has it
            if not hasattr(real, key):
                setattr(real, key, value)
        self.__dict__.update(real.__dict__)
        return real


def defer(name: str, **attributes) -> Deferred | None:
    """Put a stand-in for module `name` (a submodule of an installed package) in `sys.modules`,
    holding `attributes`; None if `name` is imported already or its package is not installed."""
    package, _, child = name.rpartition(".")
    if name in sys.modules or importlib.util.find_spec(package) is None:
        return None
    stand_in = Deferred(name)
    # Its file, as the real module's: `inspect` reads every module's `__file__` (torch does, at import).
    stand_in.__dict__.update(attributes, __file__=importlib.util.find_spec(name).origin)
    sys.modules[name] = stand_in
    setattr(importlib.import_module(package), child, stand_in)
    return stand_in


def _hamming(*args, **kwargs):
    from scipy.signal.windows import hamming

    return hamming(*args, **kwargs)


def defer_scipy_signal() -> None:
    """Defer `scipy.signal`, which torchmetrics imports when Lightning loads (about a second) and
    echo never uses. torchmetrics only checks for `scipy.signal.hamming` (and, if missing, sets it
    to `scipy.signal.windows.hamming`): the stand-in holds that function, so the check does not
    load the module."""
    defer("scipy.signal", hamming=_hamming)
