"""Deferred imports, so that a command-line tool answers `--help` without loading JAX, Flax or Orbax.

`jax = lazy_import("jax")` at module level stands for `import jax`: the real module is imported the
first time an attribute is read (`jax.jit`, `jax.sharding.NamedSharding`), i.e. after absl has
parsed the flags. Until then nothing is imported and `sys.modules` is untouched.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_TARGET = "_lazy_target"  # the real module, once imported (kept in the stand-in's own __dict__)


class _LazyModule(types.ModuleType):
    """A module stand-in that imports its name on first attribute access and then delegates to it.

    Every access is delegated (nothing is copied), so a monkeypatch of the real module is seen.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__[_TARGET] = None

    def __getattr__(self, attr: str) -> Any:  # only called for names the stand-in itself lacks
        return getattr(_resolve(self), attr)

    def __dir__(self) -> list[str]:
        return dir(_resolve(self))

    def __repr__(self) -> str:
        state = "imported" if self.__dict__[_TARGET] is not None else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def _resolve(stand_in: _LazyModule) -> types.ModuleType:
    module = stand_in.__dict__[_TARGET]
    if module is None:
        module = importlib.import_module(stand_in.__name__)
        stand_in.__dict__[_TARGET] = module
    return module


def lazy_import(name: str) -> types.ModuleType:
    """`import name` deferred to first use (the module itself when it is already imported)."""
    return sys.modules.get(name) or _LazyModule(name)
