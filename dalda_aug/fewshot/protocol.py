"""What an evaluation is made of: the protocol (``honest`` or ``reference``) and its components.

Each component of an evaluation (:data:`COMPONENTS`: classifier transforms, BatchNorm mode, CLIP
head, evaluation draws, evaluation split) has a value under ``--protocol honest`` and the
reference code's (kkyuhun94/dalda) value; ``--protocol`` sets them all and each flag overrides
one (:func:`resolve_components`). A result is the reference's metric only when every component
is the reference's (:func:`differing_components`) and so is every setting of
:data:`REFERENCE_SETTINGS` that applies to the row's method (:func:`row_settings`): the AGS mode,
the class-name form of the IP-Adapter prompts and the pool the images come from.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .methods import Method

__all__ = [
    "PROTOCOLS",
    "EVAL_SPLITS",
    "REFERENCE_EVAL_DRAWS",
    "BN_BACKBONES",
    "COMPONENTS",
    "COMPONENT_TEXT",
    "REFERENCE_SETTINGS",
    "NOT_RECORDED",
    "row_settings",
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
# The run's settings besides the components, with the reference code's value. They are not set by
# --protocol: `--protocol reference` keeps the paper's AGS (truncated normal) unless --ags-mode
# clip, and readable class names unless --class-names folder. A row holds None where the setting
# does not apply to its method (row_settings), NOT_RECORDED where it was written without it.
REFERENCE_SETTINGS: dict[str, str] = {
    "ags_mode": "clip",  # the reference clips N(μ, σ) to its bounds (ags.AGSConfig mode "clip")
    "class_names": "folder",  # its IP-Adapter prompts name the class by its folder name ("american_bulldog")
    "pool": "reference",  # the pools its dataset classes permute (prepare_datasets.py --split reference)
}
NOT_RECORDED = "not recorded"
COMPONENT_TEXT = {
    "protocol": "epoch selection (--protocol)",
    "recipe": "classifier transforms (--recipe)",
    "bn_mode": "BatchNorm mode (--bn-mode)",
    "clip_head": "CLIP head (--clip-head)",
    "eval_draws": "evaluation draws (--eval-draws)",
    "eval_split": "evaluation split (--eval-split)",
    "ags_mode": "AGS mode (--ags-mode)",
    "class_names": "class names in the IP-Adapter prompts (--class-names)",
    "pool": "image pool (the reference's: prepare_datasets.py --split reference, with its classes.json)",
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


def row_settings(method: Method, ags_mode: str, class_names: str, pool: str) -> dict[str, Any]:
    """The :data:`REFERENCE_SETTINGS` of one run of ``method``: ``ags_mode`` for the AGS methods,
    ``class_names`` for the IP-Adapter methods (Real Guidance and DA-Fusion always use the readable
    name, as DA-Fusion's code), None where the setting does not apply; ``pool`` for every run."""
    return {"ags_mode": ags_mode if method.scaling == "ags" else None,
            "class_names": class_names if method.class_names else None,
            "pool": pool}


def differing_components(row: dict[str, Any]) -> list[str]:
    """The components and settings of a result row (or summary row) that are not the reference
    code's; a setting the row does not record counts as differing."""
    differ = [] if row.get("protocol", "honest") == "reference" else ["protocol"]
    for name, (_, reference) in COMPONENTS.items():
        applies = {"bn_mode": row.get("backbone") in BN_BACKBONES and row.get("mode", "linear") == "linear",
                   "clip_head": row.get("backbone") == "clip"}.get(name, True)
        if applies and row.get(name, COMPONENTS[name][0]) != reference:
            differ.append(name)
    for name, reference in REFERENCE_SETTINGS.items():
        value = row.get(name, NOT_RECORDED)
        if value is not None and value != reference:
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
