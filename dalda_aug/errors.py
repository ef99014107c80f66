"""Exceptions raised for bad input.

Every error the library raises on purpose derives from :class:`DaldaError` *and* from the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``...), so
``except ValueError`` keeps working while the CLI can print the message without a traceback.
"""

from __future__ import annotations

from types import ModuleType


class DaldaError(Exception):
    """Base class of the errors raised for bad input or bad state."""


class InputError(DaldaError, ValueError):
    """A value given by the user is invalid (the message names it)."""


class MissingFileError(DaldaError, FileNotFoundError):
    """A file or folder the user pointed at does not exist or holds nothing usable."""


class ImageError(DaldaError, OSError):
    """An image file cannot be read or converted to RGB (the message names the file)."""


class ModelLoadError(DaldaError, OSError):
    """Model weights could not be loaded (the message says what was expected where)."""


class MissingDependencyError(DaldaError, ImportError):
    """An optional dependency is not installed (the message names the extra to install)."""


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pkg = package or module
        raise MissingDependencyError(
            f"{pkg!r} is required for this feature; install it with "
            f"`pip install 'dalda-aug[{extra}]'` (import error: {exc})"
        ) from exc
