"""CLIP filters: ``clip-class`` and ``clip-source``.

Both score with :class:`~dalda_aug.plan.clipscore.CLIPScorer`, the scorer ``plan`` uses for its
CLIPScores: the plan's CLIP model (or ``--models``), the prompt template "a photo of a {class}",
the plan's readable class names, and forward passes of :data:`~dalda_aug.plan.clipscore.SCORE_BLOCK`
images (the last padded), so a variant's score does not depend on the chunk it was scored in.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from ..prompts.presets import PHOTO_TEMPLATE
from .base import Filter, FilterContext, parse_unit_float

__all__ = ["ClipClassFilter", "ClipSourceFilter"]


class _ClipFilter(Filter):
    def __init__(self, argument: str | None) -> None:
        super().__init__(argument)
        self._scorer: Any = None
        self._class_names: tuple[str, ...] = ()
        self._model: dict[str, Any] = {}
        self._loaded_for: Any = None

    def load(self, context: FilterContext) -> None:
        from ..plan.clipscore import CLIPScorer
        from ..config import ModelConfig
        from ..hub import require_hub_models

        models = context.models if context.models is not None else ModelConfig()
        wanted = (models, str(context.device), tuple(context.class_names))
        if self._scorer is not None and self._loaded_for == wanted:
            return  # loaded already (a caller may load a filter before timing or reusing it)
        require_hub_models(models, ("clip_model", "clip_pretrained"))  # one line, at once, without the hub
        self._scorer = CLIPScorer.from_models(models, device=context.device, template=PHOTO_TEMPLATE).load()
        self._class_names = tuple(context.class_names)
        self._loaded_for = wanted
        self._model = {"clip_model": models.clip_model, "clip_pretrained": models.clip_pretrained,
                       "template": PHOTO_TEMPLATE}

    def settings(self) -> dict[str, Any]:
        return {**self._model, **self._thresholds()}

    def _thresholds(self) -> dict[str, Any]:
        raise NotImplementedError

    def _pixels(self, images: Sequence[Any]) -> Any:
        scorer = self._scorer
        return scorer.pixels([scorer.prepare(img) for img in images])


class ClipClassFilter(_ClipFilter):
    """``clip-class[:THRESHOLD]``: CLIP's zero-shot probability of the variant's own class over all
    the plan's classes (DALDA's CLIPScore of the generated image). Passes when the own class is
    CLIP's top-1 (default) or its probability is at least ``THRESHOLD``."""

    NAME = "clip-class"
    HELP = "CLIP zero-shot probability of the own class; passes when top-1 (default) or >= THRESHOLD"

    def __init__(self, argument: str | None) -> None:
        super().__init__(argument)
        self.threshold = None if argument is None else parse_unit_float(argument, "THRESHOLD", self.spec)

    def _thresholds(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "rule": "top-1" if self.threshold is None else "probability >= threshold"}

    def score(self, images: Sequence[Any], labels: npt.NDArray[np.int64],
              sources: Sequence[Any] | None = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        probs = self._scorer.class_probabilities(self._pixels(images), self._class_names, progress=False)
        labels = np.asarray(labels, dtype=np.int64)
        own = probs[np.arange(len(labels)), labels]
        if self.threshold is None:
            passed = own >= probs.max(axis=1)
        else:
            passed = own >= self.threshold
        return own.astype(np.float64), np.asarray(passed, dtype=bool)


class ClipSourceFilter(_ClipFilter):
    """``clip-source:LOW,HIGH``: the cosine of the CLIP image features of the variant and of its
    source. Below ``LOW`` the variant left the source's semantics; above ``HIGH`` it is a near copy
    (it adds nothing the real image does not)."""

    NAME = "clip-source"
    NEEDS_SOURCES = True
    HELP = "CLIP image-image cosine with the source; passes when LOW <= cosine <= HIGH"

    def __init__(self, argument: str | None) -> None:
        super().__init__(argument)
        parts = (argument or "").split(",")
        if argument is None or len(parts) != 2:
            raise InputError(f"--by {self.spec}: clip-source needs LOW,HIGH (e.g. clip-source:0.6,0.95)")
        self.low = parse_unit_float(parts[0], "LOW", self.spec)
        self.high = parse_unit_float(parts[1], "HIGH", self.spec)
        if self.low > self.high:
            raise InputError(f"--by {self.spec}: LOW {self.low} is above HIGH {self.high}")

    def _thresholds(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}

    def score(self, images: Sequence[Any], labels: npt.NDArray[np.int64],
              sources: Sequence[Any] | None = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        if sources is None or len(sources) != len(images):
            raise InputError("clip-source needs the source image of every variant")
        made = self._scorer.embed(self._pixels(images), progress=False).astype(np.float64)
        real = self._scorer.embed(self._pixels(sources), progress=False).astype(np.float64)
        cos = (made * real).sum(axis=1)
        return cos, (cos >= self.low) & (cos <= self.high)
