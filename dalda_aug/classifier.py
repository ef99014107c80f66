"""Compatibility path: the classifier ``nn.Module`` lives in :mod:`dalda_aug.classify.model`.

``from dalda_aug.classifier import Classifier`` keeps working; it imports torch, as it always did.
"""

from __future__ import annotations

from .classify.model import Classifier

__all__ = ["Classifier"]
