"""The cache's export formats (kept as an import path).

The code lives in :mod:`dalda_aug.cache.export`; this module re-exports every name of its
``__all__`` so that ``from dalda_aug.export_formats import export, EXPORT_FORMATS, ...`` keeps
working. Nothing inside the package imports it.
"""

from __future__ import annotations

from .cache.export import *  # noqa: F403 (the names of its __all__, re-exported)
from .cache.export import __all__ as __all__
from .cache.export import log as log  # the module's logger, also a top-level name before
