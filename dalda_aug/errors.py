"""Every exception class the library raises on purpose, in one place.

Each is also importable from the module that raises it (``dalda_aug.cache.CorruptEntryError``...).

Every error the library raises on purpose derives from :class:`DaldaError` *and* from the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``...), so
``except ValueError`` keeps working while the CLI can print the message without a traceback.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


class DaldaError(Exception):
    """Base class of the errors raised for bad input or bad state."""


class InputError(DaldaError, ValueError):
    """A value given by the user is invalid (the message names it)."""


class MissingFileError(DaldaError, FileNotFoundError):
    """A file or folder the user pointed at does not exist or holds nothing usable."""


class UnsafeFileError(InputError):
    """A file in a folder someone else may write is not what its name promises: a symbolic link,
    a FIFO, a device or a folder where a regular file belongs, a file larger than its format allows,
    or a folder whose symlink leads outside its root. Nothing is followed, read or written."""


class ImageError(DaldaError, OSError):
    """An image file cannot be read or converted to RGB (the message names the file)."""


class ModelLoadError(DaldaError, OSError):
    """Model weights could not be loaded (the message says what was expected where)."""


class MissingDependencyError(DaldaError, ImportError):
    """An optional dependency is not installed (the message names the extra to install)."""


# The cache (dalda_aug.cache).
class CorruptEntryError(DaldaError, ValueError):
    """A cache entry that fails to decode (bad header, checksum or image data)."""


class CacheStorageError(DaldaError, OSError):
    """The cache folder cannot be read or written (the message names the folder)."""


class CacheReadOnlyError(CacheStorageError, PermissionError):
    """A write to a cache folder that is read-only (read-only mount, no write permission)."""


class CacheFullError(CacheStorageError):
    """A write to a cache folder whose filesystem is full (the message gives the free space)."""


# The training dataset (dalda_aug.dataset).
class CacheMissError(DaldaError, LookupError):
    """A chosen synthetic variant is not in the cache and ``on_miss="error"``."""


class TemporaryFolderError(DaldaError, OSError):
    """An unsaved plan's columns could not be written to the temporary folder (``TMPDIR``) for
    DataLoader workers to map (the message says what to do: free space, or ``plan.save(DIR)``)."""


# Generator worker pools (dalda_aug.dataset.pool).
class PoolError(DaldaError, RuntimeError):
    """A generator worker crashed; the message holds its traceback or exit code."""


class PoolClosedError(DaldaError, RuntimeError):
    """A request was made to, or waited on, a pool that has been closed."""


class WaitTimeoutError(DaldaError, TimeoutError):
    """An image did not reach the cache within the waiting time."""


# Prompt generation (dalda_aug.prompts).
class BackendError(DaldaError, RuntimeError):
    """A chat backend failed (the message names the endpoint or model and the last error)."""


class IncompletePromptBankError(DaldaError, RuntimeError):
    """Some classes are still short of prompts after the last round.

    ``bank`` (a :class:`dalda_aug.prompts.PromptBank`; typed ``Any`` here so that this bottom module
    imports nothing) holds every prompt accepted so far, ``short`` maps each short class to its prompt
    count and ``reasons`` to the last reasons its candidates were rejected.
    """

    def __init__(self, message: str, bank: Any, short: dict[str, int], reasons: dict[str, list[str]]):
        super().__init__(message)
        self.bank = bank
        self.short = short
        self.reasons = reasons


# Model loading (dalda_aug.generators.loading, dalda_aug.hub).
class HubUnreachableError(ModelLoadError):
    """Models are needed from the Hugging Face hub, which cannot be reached (offline mode or no
    answer), and they are not in the local cache."""


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
