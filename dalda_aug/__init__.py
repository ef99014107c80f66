"""dalda_aug — DALDA generative data augmentation for few-shot image classification.

``import dalda_aug`` is light: the public names below are imported on first use, so torch,
diffusers, transformers, open_clip and timm load only when a feature needs them.

The top level holds the names a training script needs (the dataset, the plan, the cache and its
spec, the configs, :func:`warm`, :func:`build_plan`, the errors); everything else is imported from
its room (``dalda_aug.plan``, ``dalda_aug.dataset``, ``dalda_aug.cache``, ``dalda_aug.generators``,
...). A path that moved still resolves, with a :class:`DeprecationWarning` naming the new one
(:data:`dalda_aug._lazy.MOVED`, the one map of moved paths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import install_finder, lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SyntheticAugmentedDataset": "dataset",
    "CacheMissError": "dataset",
    "AugmentationPlan": "plan",
    "Variant": "plan",
    "build_plan": "plan.build",
    "SyntheticCache": "cache",
    "GenerationSpec": "cache",
    "warm": "cache.warm",
    "WarmReport": "cache.warm",
    "ModelConfig": "config",
    "AGSConfig": "plan.ags",
    "Scaling": "plan.ags",
    "IPAdapterConfig": "generators.ip_adapter",
    "RealGuidanceConfig": "generators.real_guidance",
    "DAFusionConfig": "generators.da_fusion",
    "DaldaError": "errors",
    "InputError": "errors",
    "MissingFileError": "errors",
    "ImageError": "errors",
    "ModelLoadError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
install_finder()


if TYPE_CHECKING:  # pragma: no cover
    # Static imports for type checkers. `X as X` marks an explicit re-export: without it a user's
    # `mypy --strict` reports "does not explicitly export" (tests/test_package.py checks the form).
    from .cache import GenerationSpec as GenerationSpec, SyntheticCache as SyntheticCache
    from .cache.warm import warm as warm, WarmReport as WarmReport
    from .config import ModelConfig as ModelConfig
    from .dataset import CacheMissError as CacheMissError, SyntheticAugmentedDataset as SyntheticAugmentedDataset
    from .errors import (
        DaldaError as DaldaError, ImageError as ImageError, InputError as InputError,
        MissingFileError as MissingFileError, ModelLoadError as ModelLoadError,
    )
    from .generators.da_fusion import DAFusionConfig as DAFusionConfig
    from .generators.ip_adapter import IPAdapterConfig as IPAdapterConfig
    from .generators.real_guidance import RealGuidanceConfig as RealGuidanceConfig
    from .plan import AugmentationPlan as AugmentationPlan, Variant as Variant
    from .plan.build import build_plan as build_plan
    from .plan.ags import AGSConfig as AGSConfig, Scaling as Scaling
