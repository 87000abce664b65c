"""Hugging Face transformers integration (optional: transformers is not a dependency).

- :func:`register` adds VesperLM to ``AutoConfig`` (model_type ``vesper``) and
  ``AutoModelForCausalLM`` (:class:`~vesper_sdk.hf.modeling.VesperForCausalLM`).
- :func:`install_import_hook` (called by ``import vesper_sdk``) registers at the moment
  transformers' Auto classes are first imported, or at once if they already are: importing
  ``transformers.modeling_utils`` takes seconds, which ``import vesper_sdk`` must not pay
  when nobody uses transformers.
- ``files`` writes what transformers reads in a model folder (tokenizer_config.json,
  special_tokens_map.json, the ``auto_map`` shim); ``card`` writes and updates its README.md.

Nothing here imports transformers at import time.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from typing import Any

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"
_done: set[str] = set()
_lock = threading.RLock()


def register_config() -> None:
    """Register ``VesperHFConfig`` with ``AutoConfig`` (imports transformers' config code)."""
    with _lock:
        if "config" in _done:
            return
        from transformers.models.auto.configuration_auto import AutoConfig

        from .config import MODEL_TYPE, VesperHFConfig

        AutoConfig.register(MODEL_TYPE, VesperHFConfig, exist_ok=True)
        _done.add("config")


def register_model() -> None:
    """Register ``VesperForCausalLM`` with ``AutoModelForCausalLM`` (and the config)."""
    with _lock:
        register_config()
        if "model" in _done:
            return
        from transformers.models.auto.modeling_auto import AutoModelForCausalLM

        from .config import VesperHFConfig
        from .modeling import VesperForCausalLM

        AutoModelForCausalLM.register(VesperHFConfig, VesperForCausalLM, exist_ok=True)
        _done.add("model")


def register() -> None:
    """Register VesperLM with transformers' Auto classes now (raises ImportError without
    transformers)."""
    register_model()


_HOOKS = {_CONFIG_MODULE: register_config, _MODEL_MODULE: register_model}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration right after one of transformers' auto modules is imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            try:
                _HOOKS[name]()
            except Exception as exc:  # never break the user's import of transformers
                import warnings

                warnings.warn(f"vesper_sdk could not register with transformers: {exc}",
                              stacklevel=2)

        spec.loader = _Loader(loader, exec_then_register)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, exec_module: Any) -> None:
        self._inner, self._exec = inner, exec_module

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._exec(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_hook = _AfterImport()


def install_import_hook() -> None:
    """Register with transformers now if its Auto modules are loaded, else when they are.

    Cheap: no transformers import here (``import vesper_sdk`` calls it)."""
    if "transformers" in sys.modules:
        if sys.modules["transformers"] is None:  # marked absent
            return
    elif importlib.util.find_spec("transformers") is None:
        return
    for name, fn in _HOOKS.items():
        if sys.modules.get(name) is not None:
            try:
                fn()
            except Exception:  # pragma: no cover - a broken transformers install
                return
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
