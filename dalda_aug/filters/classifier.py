"""``classifier:PATH``: the confidence of a classifier trained on the real images (SaSPA's filter).

``dalda-aug train-filter`` (:func:`train_filter_classifier`) trains it with
:mod:`dalda_aug.classify` on the real images only, with the few-shot benchmark's honest recipe
(linear probe, the default train transform, the model after the last epoch), and saves it with
:func:`save_filter_classifier`: one safetensors file whatever its name (``clf.pt`` included), its
tensors the model's state dict and its ``__metadata__`` a JSON description (backbone, mode,
classes, image size, how it was trained). A classifier file is read as data
(:func:`load_filter_classifier`): bounded, no symlink followed, no pickle, no import named by it.

The score of a variant is the classifier's softmax probability of its own class; it passes
when that class is the classifier's top-1 (default) or, with ``classifier:PATH:THRESHOLD``, when
the probability is at least ``THRESHOLD``. Images go through the classifier's eval transform in
batches of one fixed size (:data:`BLOCK`, the last padded with zeros).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import numpy.typing as npt

from .._io import loads_bounded, read_regular, write_atomic
from ..errors import InputError, UnsafeFileError, require
from .base import Filter, FilterContext, parse_unit_float

if TYPE_CHECKING:
    import torch

__all__ = ["CLASSIFIER_FORMAT", "BLOCK", "ClassifierFilter", "train_filter_classifier", "save_filter_classifier",
           "load_filter_classifier", "read_classifier_info"]

CLASSIFIER_FORMAT = "dalda_aug.filter-classifier/1"
BLOCK = 16  # images per forward pass (one shape for every batch)
_MAX_FILE_BYTES = 1 << 30  # a classifier file (EfficientNet-Lite0: 19 MB, ResNet50: 95 MB)
_MAX_HEADER_BYTES = 16 << 20


def _split_header(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file's bytes (bounded), else an :class:`InputError`."""
    if len(data) < 8:
        raise InputError(f"classifier file {path} is not a safetensors file (too short)")
    size = int.from_bytes(data[:8], "little")
    if size > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise InputError(f"classifier file {path} is not a safetensors file (header of {size} bytes)")
    try:
        header = loads_bounded(data[8 : 8 + size].decode("utf-8"), f"classifier file {path}")
    except UnicodeDecodeError:
        raise InputError(f"classifier file {path} is not a safetensors file (header is not UTF-8)") from None
    if not isinstance(header, dict):
        raise InputError(f"classifier file {path} is not a safetensors file (header is not a JSON object)")
    return header


def _info_of(data: bytes, path: Path) -> dict[str, Any]:
    meta = _split_header(data, path).get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT or not isinstance(meta.get("info"), str):
        raise InputError(f"classifier file {path} is not a dalda-aug filter classifier (write one with "
                         "`dalda-aug train-filter`)")
    info = loads_bounded(meta["info"], f"classifier file {path}")
    if not isinstance(info, dict):
        raise InputError(f"classifier file {path}: its description is not a JSON object")
    classes = info.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise InputError(f"classifier file {path}: 'classes' must list at least 2 class names")
    for name, kind in (("backbone", str), ("mode", str), ("image_size", int)):
        if not isinstance(info.get(name), kind) or isinstance(info.get(name), bool):
            raise InputError(f"classifier file {path}: field {name!r} is missing or not a {kind.__name__}")
    from ..classify import BACKBONES, MODES

    if info["backbone"] not in BACKBONES or info["mode"] not in MODES or not 16 <= info["image_size"] <= 1024:
        raise InputError(f"classifier file {path}: unsupported backbone/mode/image_size "
                         f"{info['backbone']!r}/{info['mode']!r}/{info['image_size']!r}")
    return info


def _read(path: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"classifier file not found: {path} (write one with `dalda-aug train-filter`)")
    data = read_regular(path, _MAX_FILE_BYTES, "classifier file")
    return data, _info_of(data, path)


def read_classifier_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The description a classifier file records (checked; no tensor is built)."""
    return _read(path)[1]


def save_filter_classifier(model: Any, path: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``model``'s state dict and ``info`` (JSON-ready: ``classes``, ``image_size``...) as one
    safetensors file at ``path`` (atomically)."""
    require("safetensors", "train")
    from safetensors.torch import save

    spec = model.spec
    record = {"backbone": spec.backbone, "mode": spec.mode, "bn_mode": spec.bn_mode,
              "class_names": list(spec.class_names or []), **info}
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    data = save(tensors, metadata={"format": CLASSIFIER_FORMAT, "info": json.dumps(record, sort_keys=True)})
    return write_atomic(path, data)


def load_filter_classifier(path: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, dict[str, Any], str]:
    """``(model in eval mode, its description, the file's SHA-256)`` of a classifier file."""
    require("safetensors", "train")
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..classify import build_classifier

    data, info = _read(path)
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise InputError(f"classifier file {path}: not readable as safetensors: {exc}") from None
    names = info.get("class_names") or None
    model = build_classifier(info["backbone"], len(info["classes"]), class_names=names, mode=info["mode"],
                             pretrained=False, bn_mode=info.get("bn_mode") or "frozen")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"classifier file {path}: its tensors do not fit the {info['backbone']} classifier: "
                         f"{first}") from None
    return model.to(device).eval(), info, hashlib.sha256(data).hexdigest()


class _Images:
    """A torch dataset of ``(transform(image), label)`` over decoded PIL images."""

    def __init__(self, images: Sequence[Any], labels: Sequence[int], transform: Any) -> None:
        self.images, self.labels, self.transform = list(images), list(labels), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def train_filter_classifier(data: str | os.PathLike[str], *, shots: int | None = None, seed: int = 0,
                            backbone: str = "efficientnet_lite0", image_size: int | None = None,
                            epochs: int = 50, iterations_per_epoch: int | None = 200, batch_size: int = 32,
                            lr: float | None = None, device: str = "cpu", pretrained: bool | str = True,
                            progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """Train a classifier on the real images of ``data`` only (its ``shots``-per-class subset with
    ``seed``, the one ``dalda-aug plan --shots N --seed S`` plans for), with the honest recipe:
    a linear probe on the ImageNet backbone, the default train transform, the paper's optimizer,
    the model after the last epoch (``lr`` None: the backbone's default). Returns ``(model, info)`` for :func:`save_filter_classifier`."""
    from ..classify import TrainConfig, build_classifier, train_classifier, train_transform
    from ..data import ImageSource

    source = ImageSource.from_folder(data)
    if shots is not None:
        source = source.few_shot(int(shots), seed)
    if len(source.classes) < 2:
        raise InputError(f"{data}: a classifier needs at least 2 classes, found {len(source.classes)}")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, iterations_per_epoch=iterations_per_epoch,
                         lr=lr, seed=seed, device=device)
    model = build_classifier(backbone, len(source.classes), class_names=source.class_names, mode="linear",
                             pretrained=pretrained, seed=seed, device=device)
    size = int(image_size or model.spec.input_size)
    images = [item.load() for item in source.items]
    labels = [item.label for item in source.items]
    history = train_classifier(model, _Images(images, labels, train_transform(model, size)), config,
                               progress=progress)
    info = {"classes": list(source.classes), "image_size": size, "shots": shots, "seed": seed,
            "images": len(images), "data_root": str(Path(data).resolve()), "train": config.to_dict(),
            "final_train_top1": history[-1]["top1"] if history else None}
    return model, info


class ClassifierFilter(Filter):
    """``classifier:PATH[:THRESHOLD]`` (see the module doc)."""

    NAME = "classifier"
    HELP = "confidence of a classifier trained on the real images (dalda-aug train-filter); top-1 or >= THRESHOLD"

    def __init__(self, argument: str | None) -> None:
        super().__init__(argument)
        if not argument:
            raise InputError("--by classifier needs a file: classifier:PATH (write one with `dalda-aug train-filter`)")
        path, threshold = argument, None
        head, sep, tail = argument.rpartition(":")
        if sep and not Path(argument).exists():
            path, threshold = head, parse_unit_float(tail, "THRESHOLD", self.spec)
        self.path = Path(path)
        self.threshold = threshold
        try:
            self.info = read_classifier_info(self.path)  # cheap: checked before anything loads
        except UnsafeFileError as exc:
            raise InputError(f"--by {self.spec}: {exc}") from None
        self._model: Any = None
        self._sha256 = ""
        self._transform: Any = None

    def settings(self) -> dict[str, Any]:
        return {"model": {"file": str(self.path), "sha256": self._sha256, "backbone": self.info["backbone"],
                          "image_size": self.info["image_size"]},
                "threshold": self.threshold, "rule": "top-1" if self.threshold is None else "probability >= threshold"}

    def load(self, context: FilterContext) -> None:
        from ..classify import eval_transform

        if list(self.info["classes"]) != list(context.classes):
            raise InputError(f"--by {self.spec}: the classifier knows the classes {self.info['classes']}, the plan "
                             f"{list(context.classes)}: train it on the plan's data (dalda-aug train-filter --data)")
        self._model, self.info, self._sha256 = load_filter_classifier(self.path, context.device)
        self._transform = eval_transform(self._model, self.info["image_size"])
        self._device = context.device

    def probabilities(self, images: Sequence[Any]) -> npt.NDArray[np.float64]:
        """``(N, classes)`` softmax probabilities, in forward passes of :data:`BLOCK` images."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), BLOCK):
                x = torch.stack([self._transform(img) for img in images[start : start + BLOCK]])
                real = len(x)
                if real < BLOCK:
                    x = torch.cat([x, x.new_zeros((BLOCK - real, *x.shape[1:]))])
                logits: torch.Tensor = self._model(x.to(self._device))
                out.append(logits.float().softmax(dim=-1).double().cpu().numpy()[:real])
        return np.concatenate(out) if out else np.zeros((0, len(self.info["classes"])), dtype=np.float64)

    def score(self, images: Sequence[Any], labels: npt.NDArray[np.int64],
              sources: Sequence[Any] | None = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        probs = self.probabilities(images)
        labels = np.asarray(labels, dtype=np.int64)
        own = probs[np.arange(len(labels)), labels]
        passed = own >= (probs.max(axis=1) if self.threshold is None else self.threshold)
        return own, np.asarray(passed, dtype=bool)
