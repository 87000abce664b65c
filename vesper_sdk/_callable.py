"""Let ``vesper_sdk.train`` / ``quantize`` / ``serve`` be called whichever was imported first.

Each of these names is both a module and the function the package exports lazily. Once
the submodule is imported (the CLI does it), Python binds the *module* to the package
attribute, so ``vs.quantize(...)`` would fail with "module is not callable". Giving the
module a ``__call__`` that forwards to its function keeps the public API one call.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_module_callable(module_name: str, func: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name](...)`` call ``func(...)``."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

    _CallableModule.__doc__ = func.__doc__
    sys.modules[module_name].__class__ = _CallableModule
