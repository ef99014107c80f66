"""Diversity and fidelity of generated images (the paper's CLIP-I and LPIPS).

* **CLIP-I**: mean pairwise cosine similarity of CLIP image embeddings inside a group
  (the variants of one source image, or all variants of one class). Lower = more diverse.
* **LPIPS**: mean pairwise LPIPS distance inside the same groups. Higher = more diverse.
* **Fidelity**: CLIP-I between each variant and its source image, and CLIP's zero-shot
  accuracy on the variants (do they still show their class?).

LPIPS needs torchvision's ImageNet AlexNet weights (``alexnet-owt-7be5be79.pth``). For offline
use place that file in ``$TORCH_HOME/hub/checkpoints/`` (by default
``~/.cache/torch/hub/checkpoints/``); :func:`load_lpips` raises a clear error when it is missing.
"""

from __future__ import annotations

import io
import itertools
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ._io import write_atomic
from .data import image_sha256
from .errors import InputError, ModelLoadError, require

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .plan.clipscore import CLIPScorer, Device

__all__ = [
    "mean_pairwise_cosine",
    "load_lpips",
    "mean_pairwise_lpips",
    "EmbeddingStore",
    "diversity_metrics",
    "ALEXNET_WEIGHTS",
]

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"

# torchvision >= 0.13's deprecation of ``pretrained=`` (torchvision/models/_utils.py), as lpips calls it.
_TORCHVISION_PRETRAINED_WARNINGS = (
    r"The parameter 'pretrained' is deprecated",
    r"Arguments other than a weight enum or `None` for 'weights' are deprecated",
)


def mean_pairwise_cosine(features: npt.ArrayLike) -> float:
    """Mean cosine similarity over all unordered pairs of rows (NaN for fewer than 2 rows)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise InputError(f"features must be 2-D (N, D), got shape {f.shape}")
    n = f.shape[0]
    if n < 2:
        return float("nan")
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def alexnet_weights_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS


def load_lpips(device: Device = "cpu", random_backbone: bool = False) -> torch.nn.Module:
    """The LPIPS (AlexNet, v0.1) network.

    ``random_backbone=True`` uses a randomly initialised AlexNet trunk (tests only: the
    distances keep their properties — 0 for identical images — but not their calibration).
    """
    require("lpips", "metrics")
    import lpips
    import torch

    if not random_backbone:
        path = alexnet_weights_path()
        if not path.is_file():
            raise ModelLoadError(
                f"LPIPS needs torchvision's AlexNet ImageNet weights at {path} "
                f"(set TORCH_HOME to move it); download {ALEXNET_WEIGHTS} from download.pytorch.org "
                "on a machine with internet access and copy it there"
            )
    with warnings.catch_warnings():
        # lpips builds its AlexNet with torchvision's deprecated ``pretrained=``: that warning (two
        # messages, about 'pretrained' and 'weights') is lpips' to fix, not the caller's. Only here.
        for message in _TORCHVISION_PRETRAINED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        net: torch.nn.Module = lpips.LPIPS(net="alex", pnet_rand=random_backbone, verbose=False).to(device).eval()
    return net


def _to_lpips_tensor(images: Sequence[Image.Image], size: int, device: Device) -> torch.Tensor:
    import torch

    arrs = []
    for img in images:
        rgb = img.convert("RGB").resize((size, size))
        arrs.append(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).to(device)


def mean_pairwise_lpips(images: Sequence[Image.Image], net: torch.nn.Module, size: int = 224, device: Device = "cpu",
                        batch_size: int = 32) -> float:
    """Mean LPIPS over all unordered pairs of ``images`` (resized to ``size``²); NaN if < 2."""
    import torch

    if len(images) < 2:
        return float("nan")
    x = _to_lpips_tensor(images, size, device)
    pairs = list(itertools.combinations(range(len(images)), 2))
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            a = x[[i for i, _ in chunk]]
            b = x[[j for _, j in chunk]]
            total += float(net(a, b).sum())
    return total / len(pairs)


class EmbeddingStore:
    """CLIP image embeddings keyed by image content hash, computed in batches, kept on disk.

    ``directory=None`` keeps them in memory only.
    """

    def __init__(self, scorer: CLIPScorer, directory: str | os.PathLike[str] | None = None) -> None:
        self.scorer = scorer
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, npt.NDArray[Any]] = {}
        self.computed = 0  # embeddings actually computed (not read back)

    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        tag = f"{self.scorer.model_name}|{self.scorer.pretrained}"
        import hashlib

        model_tag = hashlib.sha256(tag.encode()).hexdigest()[:8]
        return self.directory / f"{model_tag}-{key}.npy"

    def get(self, images: Sequence[Image.Image], progress: bool | None = None) -> npt.NDArray[Any]:
        """The embeddings of ``images``, one row each (computed once per distinct image)."""
        keys = [image_sha256(img) for img in images]
        missing: list[int] = []
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key in self._memory or key in seen:
                continue
            seen.add(key)
            path = self._path(key)
            if path is not None and path.is_file():
                try:
                    self._memory[key] = np.load(path)
                    continue
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)
            missing.append(i)
        if missing:
            feats = self.scorer.image_features([images[i] for i in missing], progress=progress).cpu().numpy()
            for i, f in zip(missing, feats):
                self._memory[keys[i]] = f
                path = self._path(keys[i])
                if path is not None:
                    buffer = io.BytesIO()
                    np.save(buffer, f, allow_pickle=False)
                    write_atomic(path, buffer.getvalue())
            self.computed += len(missing)
        return np.stack([self._memory[k] for k in keys]) if keys else np.zeros((0, 0))


def _nanmean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(vals)) if vals else None


def diversity_metrics(
    variants: Mapping[Any, Sequence[Image.Image]],
    sources: Mapping[Any, Any],
    labels: Mapping[Any, int],
    class_names: Sequence[str],
    scorer: CLIPScorer,
    lpips_net: torch.nn.Module | None = None,
    embeddings: EmbeddingStore | None = None,
    lpips_size: int = 224,
    progress: bool | None = None,
) -> dict[str, Any]:
    """CLIP-I, LPIPS and fidelity, per class and overall.

    Args:
        variants: ``{source key: [generated PIL images]}``.
        sources: ``{source key: real PIL image}``.
        labels: ``{source key: class index}``.
        class_names: readable class names (for zero-shot accuracy and the report).
        scorer: a :class:`~dalda_aug.plan.clipscore.CLIPScorer` (its model embeds the images).
        lpips_net: from :func:`load_lpips`, or None to skip LPIPS.
        embeddings: an :class:`EmbeddingStore` to reuse embeddings across calls.
    """
    store = embeddings or EmbeddingStore(scorer)
    keys = [k for k in variants if len(variants[k])]
    if not keys:
        raise InputError("no generated images to measure")
    all_imgs = [img for k in keys for img in variants[k]]
    feats = store.get(all_imgs, progress=progress)
    src_feats = store.get([sources[k] for k in keys], progress=progress)
    text = scorer.text_features(list(class_names)).cpu().numpy()

    offsets = np.cumsum([0] + [len(variants[k]) for k in keys])
    per_source: dict[Any, dict[str, Any]] = {}
    by_class: dict[int, list[int]] = {}
    correct: dict[int, list[bool]] = {}
    fidelity: dict[int, list[float]] = {}
    for n, k in enumerate(keys):
        f = feats[offsets[n] : offsets[n + 1]]
        label = int(labels[k])
        preds = np.argmax(f @ text.T, axis=1)
        cos_src = f @ src_feats[n] / (np.linalg.norm(f, axis=1) * np.linalg.norm(src_feats[n]))
        per_source[k] = {
            "class_name": class_names[label],
            "n": int(len(f)),
            "clip_i": mean_pairwise_cosine(f),
            "lpips": mean_pairwise_lpips(variants[k], lpips_net, lpips_size) if lpips_net is not None else None,
            "fidelity_clip_i": float(cos_src.mean()),
            "zero_shot_acc": float((preds == label).mean()),
        }
        by_class.setdefault(label, []).extend(range(offsets[n], offsets[n + 1]))
        correct.setdefault(label, []).extend((preds == label).tolist())
        fidelity.setdefault(label, []).extend(cos_src.tolist())

    per_class: dict[str, dict[str, Any]] = {}
    for label in sorted(by_class):
        idx = by_class[label]
        srcs = [k for k in keys if int(labels[k]) == label]
        per_class[class_names[label]] = {
            "n": len(idx),
            "clip_i_within_source": _nanmean(per_source[k]["clip_i"] for k in srcs),
            "clip_i_within_class": mean_pairwise_cosine(feats[idx]),
            "lpips_within_source": _nanmean(per_source[k]["lpips"] for k in srcs) if lpips_net is not None else None,
            "lpips_within_class": (mean_pairwise_lpips([all_imgs[i] for i in idx], lpips_net, lpips_size)
                                   if lpips_net is not None else None),
            "fidelity_clip_i": float(np.mean(fidelity[label])),
            "zero_shot_acc": float(np.mean(correct[label])),
        }
    overall = {
        "n_images": len(all_imgs),
        "n_sources": len(keys),
        "clip_i_within_source": _nanmean(v["clip_i"] for v in per_source.values()),
        "clip_i_within_class": _nanmean(v["clip_i_within_class"] for v in per_class.values()),
        "lpips_within_source": _nanmean(v["lpips"] for v in per_source.values()) if lpips_net is not None else None,
        "lpips_within_class": (_nanmean(v["lpips_within_class"] for v in per_class.values())
                               if lpips_net is not None else None),
        "fidelity_clip_i": float(np.mean([c for v in fidelity.values() for c in v])),
        "zero_shot_acc": float(np.mean([c for v in correct.values() for c in v])),
    }
    return {"overall": overall, "per_class": per_class, "per_source": {str(k): v for k, v in per_source.items()}}
