"""Lazy package exports: ``import pedetect.cli`` must not pull in numpy, pydicom or torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def by_name(modules: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{module: (name, ...)}`` as ``{name: module}``, the table :func:`lazy_getattr` looks names up in."""
    return {name: module for module, names in modules.items() for name in names}


def lazy_getattr(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``exports[name]`` (a module path) on first access."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    return __getattr__
