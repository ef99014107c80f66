"""What an evaluation is made of: the protocol (``honest`` or ``reference``) and its components.

Each component of an evaluation (:data:`COMPONENTS`: classifier transforms, BatchNorm mode, CLIP
head, evaluation draws, evaluation split) has a value under ``--protocol honest`` and the
reference code's (kkyuhun94/dalda) value; ``--protocol`` sets them all and each flag overrides
one (:func:`resolve_components`). A result is the reference's metric only when every component
is the reference's (:func:`differing_components`).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = [
    "PROTOCOLS",
    "EVAL_SPLITS",
    "REFERENCE_EVAL_DRAWS",
    "BN_BACKBONES",
    "COMPONENTS",
    "COMPONENT_TEXT",
    "PROTOCOL_TEXT",
    "resolve_components",
    "differing_components",
    "evaluation_draws",
    "best_epoch",
]

PROTOCOLS = ("honest", "reference")
EVAL_SPLITS = ("whole", "reference")
# The reference evaluates on batch_size x iterations_per_epoch = 32 x 200 draws with replacement.
REFERENCE_EVAL_DRAWS = 6400
BN_BACKBONES = ("resnet50", "efficientnet_lite0")
# Each component of an evaluation: (its value under --protocol honest, the reference code's value).
# --protocol sets them all; --recipe, --bn-mode, --clip-head, --eval-draws, --eval-split override one.
COMPONENTS: dict[str, tuple[Any, Any]] = {
    "recipe": ("default", "reference"),
    "bn_mode": ("frozen", "train"),
    "clip_head": ("normalized", "reference"),
    "eval_draws": (0, REFERENCE_EVAL_DRAWS),
    "eval_split": ("whole", "reference"),
}
COMPONENT_TEXT = {
    "protocol": "epoch selection (--protocol)",
    "recipe": "classifier transforms (--recipe)",
    "bn_mode": "BatchNorm mode (--bn-mode)",
    "clip_head": "CLIP head (--clip-head)",
    "eval_draws": "evaluation draws (--eval-draws)",
    "eval_split": "evaluation split (--eval-split)",
}
# What each protocol reports, as table.md names it.
PROTOCOL_TEXT = {
    "honest": "the model after the last epoch, evaluated once on the whole test split",
    "reference": "the reference code's protocol: the model is evaluated after every epoch and the epoch with the "
                 "highest seed-averaged mean per-class accuracy is reported (as its plot.py selects it); few-shot "
                 "images drawn by one seeded permutation per dataset",
}


def resolve_components(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation components of this run: the protocol's values, overridden by their flags.
    ``bn_mode`` is None unless a linear probe on a BatchNorm backbone, ``clip_head`` unless CLIP."""
    ref = args.protocol == "reference"
    out = {name: (getattr(args, name) if getattr(args, name) is not None else values[int(ref)])
           for name, values in COMPONENTS.items()}
    if args.backbone not in BN_BACKBONES or args.mode != "linear":
        out["bn_mode"] = None
    if args.backbone != "clip":
        out["clip_head"] = None
    return out


def differing_components(row: dict[str, Any]) -> list[str]:
    """The components of a result row (or summary row) that are not the reference code's."""
    differ = [] if row.get("protocol", "honest") == "reference" else ["protocol"]
    for name, (_, reference) in COMPONENTS.items():
        applies = {"bn_mode": row.get("backbone") in BN_BACKBONES and row.get("mode", "linear") == "linear",
                   "clip_head": row.get("backbone") == "clip"}.get(name, True)
        if applies and row.get(name, COMPONENTS[name][0]) != reference:
            differ.append(name)
    return differ


def evaluation_draws(n_items: int, draws: int, seed: int, epoch: int) -> list[int]:
    """``draws`` item indices drawn uniformly with replacement from ``n_items``, seeded by (seed, epoch)."""
    import numpy as np

    rng = np.random.default_rng([int(seed), int(epoch), 0x6400])
    return [int(i) for i in rng.integers(0, n_items, size=draws)]


def best_epoch(curve: Sequence[float]) -> int:
    """The first epoch with the highest value (pandas ``idxmax``, as the reference's plot.py)."""
    return max(range(len(curve)), key=lambda e: (curve[e], -e))
