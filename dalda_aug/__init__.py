"""dalda_aug — DALDA generative data augmentation for few-shot image classification.

``import dalda_aug`` is light: the public names below are imported on first use, so torch,
diffusers, transformers, open_clip and timm load only when a feature needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "AGSConfig": "ags",
    "Scaling": "ags",
    "sample_lambda": "ags",
    "sample_scales": "ags",
    "CLIPScorer": "clipscore",
    "ImageSource": "data",
    "load_image": "data",
    "image_sha256": "data",
    "readable_class_name": "data",
    "few_shot_indices": "data",
    "AugmentationPlan": "plan",
    "Variant": "plan",
    "build_plan": "plan",
    "derive_seed": "plan",
    "PromptBank": "prompts",
    "generate_prompt_bank": "prompts",
    "GenerationConfig": "generation",
    "GenerationRequest": "generation",
    "IPAdapterGenerator": "generation",
    "SyntheticCache": "cache",
    "GenerationSpec": "cache",
    "GeneratorFactory": "cache",
    "CachedImage": "cache",
    "SyntheticAugmentedDataset": "dataset",
    "CacheMissError": "dataset",
    "GeneratorPool": "pool",
    "PoolError": "pool",
    "WarmReport": "warm",
    "run_demo": "demo",
    "RealGuidanceConfig": "real_guidance",
    "RealGuidanceGenerator": "real_guidance",
    "DAFusionConfig": "generators",
    "DAFusionGenerator": "generators",
    "train_textual_inversion": "generators",
    "build_classifier": "classify",
    "ClassifierSpec": "classify",
    "TrainConfig": "classify",
    "train_classifier": "classify",
    "evaluate": "classify",
    "train_transform": "classify",
    "eval_transform": "classify",
    "EmbeddingStore": "metrics",
    "diversity_metrics": "metrics",
    "DaldaError": "errors",
    "InputError": "errors",
    "MissingFileError": "errors",
    "ImageError": "errors",
    "ModelLoadError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dalda_aug' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .ags import AGSConfig, Scaling, sample_lambda, sample_scales
    from .cache import CachedImage, GenerationSpec, GeneratorFactory, SyntheticCache
    from .dataset import CacheMissError, SyntheticAugmentedDataset
    from .demo import run_demo
    from .pool import GeneratorPool, PoolError
    from .real_guidance import RealGuidanceConfig, RealGuidanceGenerator
    from .generators import DAFusionConfig, DAFusionGenerator, train_textual_inversion
    from .warm import WarmReport
    from .classify import (ClassifierSpec, TrainConfig, build_classifier, eval_transform, evaluate,
                           train_classifier, train_transform)
    from .clipscore import CLIPScorer
    from .config import ModelConfig
    from .data import ImageSource, few_shot_indices, image_sha256, load_image, readable_class_name
    from .errors import DaldaError, ImageError, InputError, MissingFileError, ModelLoadError
    from .metrics import EmbeddingStore, diversity_metrics
    from .generation import GenerationConfig, GenerationRequest, IPAdapterGenerator
    from .plan import AugmentationPlan, Variant, build_plan, derive_seed
    from .prompts import PromptBank, generate_prompt_bank
