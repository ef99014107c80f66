"""The classifier ``nn.Module`` of :mod:`dalda_aug.classify`, defined at module level.

Kept in its own module because it imports torch at import time; build one with
:func:`dalda_aug.classify.build_classifier`. ``dalda_aug.classify.Classifier`` and
``dalda_aug.classify.model.Classifier`` are this class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .spec import ClassifierSpec

__all__ = ["Classifier"]


class Classifier(torch.nn.Module):
    """``head(features(x))``: a backbone giving one feature vector per image, a linear head.

    In ``"linear"`` mode the backbone is frozen: it runs without gradients and, with
    ``spec.bn_mode`` ``"frozen"`` (or None), stays in eval mode (batch-norm statistics and
    dropout untouched) even after ``model.train()``. With ``"train"`` (the reference code's
    behaviour) ``model.train()`` puts the backbone in train mode too, so batch norm normalises
    with batch statistics and updates its running statistics; ``model.eval()`` undoes it.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear, spec: ClassifierSpec,
                 normalize_features: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.normalize_features = normalize_features
        if spec.mode == "linear":
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @property
    def _backbone_follows_train(self) -> bool:
        return self.spec.mode != "linear" or getattr(self.spec, "bn_mode", None) == "train"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats: torch.Tensor
        if self.spec.mode == "linear":
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        if self.normalize_features:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.forward_features(x))
        return logits

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if not self._backbone_follows_train:
            self.backbone.eval()
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return f"backbone={s.backbone!r}, mode={s.mode!r}, num_classes={s.num_classes}, weights={s.weights!r}"
