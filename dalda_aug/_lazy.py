"""Lazy re-exports for a package ``__init__``: public names load their module on first use, so
``import dalda_aug`` stays light (no torch, diffusers, transformers, open_clip or timm)."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``, whose public names map to the
    submodule (relative to ``package``) that defines them. A loaded name is kept in the package's
    namespace, so the next access does not come back here."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(namespace.get("__all__", exports)))

    return __getattr__, __dir__
