"""Names a package resolves on first use: the one mechanism behind ``vs.train``,
``vesper_sdk.export.OnnxModel``, ``vesper_sdk.training.train`` and the like, so that importing
a package never imports the optional extras (or the modules) its names come from."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, table: dict[str, tuple[str, str | None]],
               ) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: ``table`` maps a name to (module,
    attribute, or None for the module itself); the value is imported on first use and then
    kept on the package."""
    def getattr_(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attr = table[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        setattr(sys.modules[package], name, value)
        return value
    return getattr_
