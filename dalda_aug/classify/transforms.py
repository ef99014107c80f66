"""The classifier's image transforms: training and evaluation, the default recipe (the backbone's
own normalisation and crops) and the reference code's (kkyuhun94/dalda). torchvision is imported on use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Literal

from ..errors import InputError, require
from .spec import ClassifierSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["train_transform", "eval_transform"]


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    from ..data import to_rgb

    return to_rgb(img) if isinstance(img, Image.Image) else img


def _resolve(spec_or_model: Any, image_size: int | None) -> tuple[ClassifierSpec, int]:
    spec = getattr(spec_or_model, "spec", spec_or_model)
    if not isinstance(spec, ClassifierSpec):
        raise InputError(f"expected a ClassifierSpec or a model built by build_classifier, got {type(spec).__name__}")
    size = spec.input_size if image_size is None else image_size
    if not isinstance(size, int) or size < 1:
        raise InputError(f"image_size must be a positive integer, got {image_size!r}")
    if spec.fixed_input_size and size != spec.input_size:
        raise InputError(f"the {spec.backbone} backbone only accepts {spec.input_size} px inputs, got image_size={size}")
    return spec, size


def _mode(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def train_transform(spec: ClassifierSpec | torch.nn.Module, image_size: int | None = None, *,
                    recipe: Literal["default", "reference"] = "default") -> Callable[[Any], torch.Tensor]:
    """The training transform for a backbone (``spec``: a :class:`ClassifierSpec` or the model).

    ``"default"``: RandomResizedCrop(image_size) + RandomHorizontalFlip + ToTensor + Normalize
    with the backbone's mean/std. ``"reference"``: what the reference code applies to every
    backbone: Resize((s, s)) + RandomHorizontalFlip + RandomRotation(15) + ToTensor +
    Normalize(0.5, 0.5), bilinear resizing (kkyuhun94/dalda ``semantic_aug/datasets/*.py``).
    ``image_size`` defaults to the backbone's native size (224).
    """
    require("torchvision", "train")
    from torchvision import transforms as T

    spec, size = _resolve(spec, image_size)
    interp = _mode(spec.interpolation)
    if recipe == "default":
        steps = [T.Lambda(_to_rgb), T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip(),
                 T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    elif recipe == "reference":
        # transforms.Resize's default (bilinear), as the reference writes it, whatever the backbone
        steps = [T.Lambda(_to_rgb), T.Resize((size, size), interpolation=_mode("bilinear")), T.RandomHorizontalFlip(),
                 T.RandomRotation(15.0), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    else:
        raise InputError(f"recipe must be 'default' or 'reference', got {recipe!r}")
    transform: Callable[[Any], torch.Tensor] = T.Compose(steps)
    return transform


def eval_transform(spec: ClassifierSpec | torch.nn.Module, image_size: int | None = None, *,
                   recipe: Literal["default", "reference"] = "default") -> Callable[[Any], torch.Tensor]:
    """The evaluation transform: Resize(image_size / crop_pct) + CenterCrop + ToTensor + Normalize.

    ``"reference"``: Resize((s, s)) + ToTensor + Normalize(0.5, 0.5), as the reference code.
    """
    require("torchvision", "train")
    from torchvision import transforms as T

    spec, size = _resolve(spec, image_size)
    interp = _mode(spec.interpolation)
    if recipe == "default":
        steps = [T.Lambda(_to_rgb), T.Resize(int(math.floor(size / spec.crop_pct)), interpolation=interp),
                 T.CenterCrop(size), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    elif recipe == "reference":
        steps = [T.Lambda(_to_rgb), T.Resize((size, size), interpolation=_mode("bilinear")), T.ToTensor(),
                 T.Normalize((0.5,) * 3, (0.5,) * 3)]
    else:
        raise InputError(f"recipe must be 'default' or 'reference', got {recipe!r}")
    transform: Callable[[Any], torch.Tensor] = T.Compose(steps)
    return transform
