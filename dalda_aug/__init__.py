"""dalda_aug — DALDA generative data augmentation for few-shot image classification.

``import dalda_aug`` is light: the public names below are imported on first use, so torch,
diffusers, transformers, open_clip and timm load only when a feature needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "AGSConfig": "plan.ags",
    "Scaling": "plan.ags",
    "sample_lambda": "plan.ags",
    "sample_scales": "plan.ags",
    "CLIPScorer": "plan.clipscore",
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
    "GenerationConfig": "generators.ip_adapter",
    "GenerationRequest": "generators.base",
    "IPAdapterGenerator": "generators.ip_adapter",
    "SyntheticCache": "cache",
    "GenerationSpec": "cache",
    "GeneratorFactory": "cache",
    "CachedImage": "cache",
    "SyntheticAugmentedDataset": "dataset",
    "CacheMissError": "dataset",
    "plan_indices": "dataset.bases",
    "ITEMS": "dataset",
    "GeneratorPool": "dataset.pool",
    "PoolError": "dataset.pool",
    "WarmReport": "cache.warm",
    "run_demo": "demo",
    "RealGuidanceConfig": "generators.real_guidance",
    "RealGuidanceGenerator": "generators.real_guidance",
    "DAFusionConfig": "generators.da_fusion",
    "DAFusionGenerator": "generators.da_fusion",
    "train_textual_inversion": "generators.textual_inversion",
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    # Static imports for type checkers. `X as X` marks an explicit re-export: without it a user's
    # `mypy --strict` reports "does not explicitly export" (tests/test_package.py checks the form).
    from .plan.ags import (
        AGSConfig as AGSConfig, sample_lambda as sample_lambda, sample_scales as sample_scales,
        Scaling as Scaling,
    )
    from .cache import (
        CachedImage as CachedImage, GenerationSpec as GenerationSpec, GeneratorFactory as GeneratorFactory,
        SyntheticCache as SyntheticCache,
    )
    from .classify import (
        build_classifier as build_classifier, ClassifierSpec as ClassifierSpec,
        eval_transform as eval_transform, evaluate as evaluate, train_classifier as train_classifier,
        train_transform as train_transform, TrainConfig as TrainConfig,
    )
    from .plan.clipscore import CLIPScorer as CLIPScorer
    from .config import ModelConfig as ModelConfig
    from .data import (
        few_shot_indices as few_shot_indices, image_sha256 as image_sha256, ImageSource as ImageSource,
        load_image as load_image, readable_class_name as readable_class_name,
    )
    from .dataset.bases import plan_indices as plan_indices
    from .dataset import (
        CacheMissError as CacheMissError, ITEMS as ITEMS, SyntheticAugmentedDataset as SyntheticAugmentedDataset,
    )
    from .demo import run_demo as run_demo
    from .errors import (
        DaldaError as DaldaError, ImageError as ImageError, InputError as InputError,
        MissingFileError as MissingFileError, ModelLoadError as ModelLoadError,
    )
    from .generators.base import GenerationRequest as GenerationRequest
    from .generators.ip_adapter import GenerationConfig as GenerationConfig, IPAdapterGenerator as IPAdapterGenerator
    from .generators.da_fusion import DAFusionConfig as DAFusionConfig, DAFusionGenerator as DAFusionGenerator
    from .generators.textual_inversion import train_textual_inversion as train_textual_inversion
    from .metrics import diversity_metrics as diversity_metrics, EmbeddingStore as EmbeddingStore
    from .plan import (
        AugmentationPlan as AugmentationPlan, build_plan as build_plan, derive_seed as derive_seed,
        Variant as Variant,
    )
    from .dataset.pool import GeneratorPool as GeneratorPool, PoolError as PoolError
    from .prompts import generate_prompt_bank as generate_prompt_bank, PromptBank as PromptBank
    from .generators.real_guidance import (
        RealGuidanceConfig as RealGuidanceConfig, RealGuidanceGenerator as RealGuidanceGenerator,
    )
    from .cache.warm import WarmReport as WarmReport
