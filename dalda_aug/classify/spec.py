"""What a classifier is and how it trains: :class:`ClassifierSpec`, :class:`TrainConfig` and the
named choices of :mod:`dalda_aug.classify` (backbones, modes, CLIP heads, BatchNorm modes, recipes,
optimizers). Imports neither torch, timm nor open_clip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InputError

__all__ = [
    "BACKBONES",
    "BN_MODES",
    "CLIP_HEADS",
    "DEFAULT_TEMPLATE",
    "EFFICIENTNET_LITE0_TIMM_NAME",
    "MODES",
    "OPTIMIZERS",
    "OPTIM_DEFAULTS",
    "RECIPES",
    "RESNET50_TIMM_NAME",
    "ClassifierSpec",
    "TrainConfig",
]

BACKBONES = ("resnet50", "clip", "efficientnet_lite0")
MODES = ("linear", "finetune")
CLIP_HEADS = ("normalized", "reference")
BN_MODES = ("frozen", "train")
RECIPES = ("default", "reference")
OPTIMIZERS = ("adam", "adamw")

RESNET50_TIMM_NAME = "resnet50.tv2_in1k"  # = torchvision ResNet50_Weights.IMAGENET1K_V2 (DEFAULT)
EFFICIENTNET_LITE0_TIMM_NAME = "tf_efficientnet_lite0"
DEFAULT_TEMPLATE = "a photo of a {}"

# backbone -> (optimizer, lr, weight decay): the paper's / reference code's values. The paper
# has no EfficientNet; it gets the ResNet50 (CNN) values.
OPTIM_DEFAULTS = {
    "resnet50": ("adam", 1e-4, 0.0),
    "clip": ("adamw", 2e-4, 0.1),
    "efficientnet_lite0": ("adam", 1e-4, 0.0),
}



@dataclass(frozen=True)
class ClassifierSpec:
    """What a built classifier is and how its inputs must look (``model.spec``)."""

    backbone: str
    mode: str
    num_classes: int
    # Readable class names (required for CLIP, whose head is built from them).
    class_names: tuple[str, ...] | None
    # Where the backbone weights came from ("timm:resnet50.tv2_in1k", a file path, "random"...).
    weights: str
    # Size of the feature vector the head reads.
    feature_dim: int
    # Native input side in pixels, and whether the backbone only accepts that size (ViTs).
    input_size: int
    fixed_input_size: bool
    # Normalisation and resampling the backbone was trained with.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    # Eval crop: resize the short side to input_size / crop_pct, then center-crop input_size.
    crop_pct: float
    # Default optimisation (TrainConfig fields left at None take these).
    optimizer: str
    lr: float
    weight_decay: float
    # CLIP only: "normalized" (L2-normalised features, head = logit scale · unit text features)
    # or "reference" (the reference code's raw features and raw text-feature head); None otherwise.
    clip_head: str | None = None
    # Linear mode, backbones with BatchNorm: "frozen" (eval mode while training) or "train"
    # (train mode while training, running statistics update: the reference); None otherwise.
    bn_mode: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_classifier` trains (the paper's values by default)."""

    # Passes of ``iterations_per_epoch`` batches (the paper: 50).
    epochs: int = 50
    # Images per batch (the paper: 32).
    batch_size: int = 32
    # Batches per epoch, drawn with replacement (the reference: 200). None = one shuffled pass
    # over the dataset per epoch.
    iterations_per_epoch: int | None = 200
    # None = the backbone's default (model.spec.lr / .optimizer / .weight_decay).
    lr: float | None = None
    optimizer: Literal["adam", "adamw"] | None = None
    weight_decay: float | None = None
    # DataLoader workers (0 = load in the main process).
    num_workers: int = 0
    # Seeds the batch sampler, the transforms' randomness and dropout.
    seed: int = 0
    # Device the model is moved to and trained on.
    device: str = "cpu"
    # None = float32; "bfloat16" runs forward passes under torch.autocast.
    autocast_dtype: Literal["bfloat16"] | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        ipe = self.iterations_per_epoch
        if ipe is not None and (not isinstance(ipe, int) or isinstance(ipe, bool) or ipe < 1):
            raise InputError(f"TrainConfig.iterations_per_epoch must be None or an integer >= 1, got {ipe!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"TrainConfig.lr must be None or a positive number, got {self.lr!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise InputError(f"TrainConfig.optimizer must be None or one of {OPTIMIZERS}, got {self.optimizer!r}")
        wd = self.weight_decay
        if wd is not None and not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise InputError(f"TrainConfig.weight_decay must be None or a number >= 0, got {wd!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise InputError(f"TrainConfig.num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if self.autocast_dtype not in (None, "bfloat16"):
            raise InputError(f"TrainConfig.autocast_dtype must be None or 'bfloat16', got {self.autocast_dtype!r}")
        object.__setattr__(self, "device", str(self.device))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
