#!/usr/bin/env python
"""The paper's few-shot table in one command: real-only, Real Guidance and the DALDA variants.

For every seed and n-shot setting, each method gets the same seeded few-shot subset of the
training images and its own augmentation plan; all plans share one synthetic-image cache. Per
(seed, shots, method) the pipeline is:

1. **score** — CLIPScore of every few-shot image, computed once and reused by every method;
2. **plan** — ``build_plan`` with the method's prompts and λ scaling (saved under ``OUT/plans``);
3. **warm** — generate what the cache lacks (``dalda_aug.warm.warm``);
4. **train** — a fresh classifier on ``SyntheticAugmentedDataset(few-shot images, plan, cache, p)``
   (real-only: the few-shot images alone), the paper's recipe unless overridden;
5. **evaluate** — ``--protocol honest`` (default): the model after the last epoch on the
   *whole* test split: top-1 and mean per-class accuracy (no epoch is picked on test data).
   ``--protocol reference``: every component as the reference code (kkyuhun94/dalda) has it:
   the few-shot images drawn by one seeded permutation per dataset
   (:func:`reference_few_shot_indices`); its classifier transforms (``--recipe reference``:
   Resize((224, 224)) + flip + RandomRotation(15), mean/std 0.5); BatchNorm of a frozen
   ResNet50/EfficientNet in train mode (``--bn-mode train``); its CLIP head (``--clip-head
   reference``); evaluation after every epoch on 6,400 seeded draws with replacement
   (``--eval-draws``) from the seed's validation half (``--eval-split reference``:
   :func:`reference_halves`); the epoch with the best seed-averaged mean per-class accuracy is
   reported. Each flag overrides its component. Every row of ``results.json`` records
   ``protocol``, ``best_epoch``, ``recipe``, ``bn_mode`` (BatchNorm backbones), ``clip_head``
   (CLIP), ``eval_draws`` (0 = every item once) and ``eval_split``; ``table.md`` calls a result
   the paper's metric only when every component is the reference's, and otherwise names the
   components that differ. The draw and the halves are the reference's own only on the pools the
   reference permutes, in its file order (``examples/prepare_datasets.py --split reference``).

``table.md`` and ``results.json`` (``significance``) also compare DALDA with each baseline: the
mean difference and the p-value of a paired t-test over seeds, one test per (dataset, shots)
(the shot settings of a seed share their nested few-shot images, so they are not independent
pairs). To test across datasets and shot settings, run once per dataset, then ``fewshot.py
--combine OUT_PETS OUT_FLOWERS ... --out DIR``: it pairs (dataset, shots) cells, each the mean over
its seeds, and writes ``DIR/significance.{json,md}``.

Methods (``--methods``, default all but ``llm_fixed``):

==============  ==============================================================================
real            the few-shot real images only
real_guidance   Real Guidance (He et al. 2023): SD img2img at strength 0.5, "a photo of a {class}"
da_fusion       DA-Fusion (Trabucco et al. 2024): a textual-inversion token per class (``--ti-steps``),
                SD img2img at a strength drawn from {0.25, 0.5, 0.75, 1}, "a photo of a <class token>"
fixed           base prompt "a photo of a {class}" + IP-Adapter, fixed λ (``--fixed-lambda``)
llm_fixed       LLM prompts + fixed λ (not in the default set)
base_rs         base prompt + random scaling, λ ~ U(0, 1)
llm_rs          LLM prompts + random scaling
base_ags        base prompt + adaptive guidance scaling
dalda           DALDA: LLM prompts + adaptive guidance scaling
==============  ==============================================================================

LLM methods need ``--prompts FILE`` (``dalda-aug prompts``). Outputs in ``--out``:
``results.json``, ``results.csv`` (one row per seed/shots/method, plus mean ± std over seeds),
``table.md`` (rows = methods, columns = shots × accuracy, like the paper's Table 2),
``config.json`` (the resolved configuration), ``runs.jsonl`` (finished runs: a rerun with the
same settings skips them) and ``plans/``.

    python benchmarks/fewshot.py --train data/pets/train --test data/pets/test \\
        --prompts prompts/pets.json --shots 1 --seeds 0,1,2 --backbone clip --out runs/pets-clip
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FORMAT = "dalda_aug.fewshot/1"


@dataclass(frozen=True)
class Method:
    """One row of the table: which prompts, which λ strategy, which generator."""

    name: str
    label: str
    prompts: str | None  # "base" ("a photo of a {class}"), "llm" (the prompt bank) or None (no synthetic images)
    scaling: str | None  # "ags", "rs", "fixed" (--fixed-lambda), "none" (λ unused) or None
    generator: str | None  # "ip_adapter", "real_guidance", "da_fusion" or None


# Table order: baselines, then the ablations, then DALDA.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("real", "Real images only", None, None, None),
    Method("real_guidance", "Real Guidance (img2img, strength 0.5)", "base", "none", "real_guidance"),
    Method("da_fusion", "DA-Fusion (textual inversion + img2img)", "tokens", "strength", "da_fusion"),
    Method("fixed", "Base prompt + fixed λ", "base", "fixed", "ip_adapter"),
    Method("llm_fixed", "LLM prompts + fixed λ", "llm", "fixed", "ip_adapter"),
    Method("base_rs", "Base prompt + RS", "base", "rs", "ip_adapter"),
    Method("llm_rs", "LLM prompts + RS", "llm", "rs", "ip_adapter"),
    Method("base_ags", "Base prompt + AGS", "base", "ags", "ip_adapter"),
    Method("dalda", "DALDA (LLM prompts + AGS)", "llm", "ags", "ip_adapter"),
)}
DEFAULT_METHODS = tuple(name for name in METHODS if name != "llm_fixed")

# The paper's 1-shot accuracies (mean of 3 seeds) of DALDA, for comparison in table.md. They are
# mean per-class accuracies at the best epoch (the reference code's protocol): shown next to
# ``--protocol reference`` results only.
PAPER_1SHOT = {
    ("pets", "resnet50"): 0.807, ("pets", "clip"): 0.875,
    ("caltech101", "resnet50"): 0.788, ("caltech101", "clip"): 0.920,
    ("flowers102", "resnet50"): 0.521, ("flowers102", "clip"): 0.819,
}
_DATASET_ALIASES = {
    "pets": "pets", "oxfordpets": "pets", "oxfordiiitpet": "pets", "oxfordiiitpets": "pets",
    "caltech101": "caltech101", "flowers102": "flowers102", "oxfordflowers102": "flowers102",
}


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated value in {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is argparse.SUPPRESS \
                or action.default is False:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fewshot.py",
        description="Few-shot classification with real-only, Real Guidance and DALDA-augmented training sets; "
                    "writes the paper's Table 2 layout.",
        formatter_class=_HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--train", type=Path, help="training image folder ROOT/<class>/<image>")
    data.add_argument("--test", type=Path, help="test image folder (same class folders as --train)")
    data.add_argument("--data", type=Path, help="one image folder, split per class into train and test")
    data.add_argument("--test-fraction", type=float, default=0.5, help="share of each class held out with --data")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the --data train/test split")
    data.add_argument("--name", default=None, help="dataset name in the outputs (default: from the folder)")
    data.add_argument("--shots", type=_int_list, default=[1], help="images per class, e.g. 1,2,4,8,16")
    data.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="seeds of few-shot sampling, plans, training")
    data.add_argument("--eval-split", choices=EVAL_SPLITS, default=None,
                      help="whole: every image of the test split (--protocol honest's default); reference: per seed "
                           "the reference's validation half, the second half of a seeded permutation of each class "
                           "of --test (or of the --data pool, whose first half the few-shot draw takes) "
                           "(--protocol reference's default)")

    meth = p.add_argument_group("methods and augmentation")
    meth.add_argument("--methods", type=_name_list, default=None,
                      help=f"comma list from {', '.join(METHODS)} (default: all but llm_fixed)")
    meth.add_argument("--prompts", type=Path, default=None, help="prompt bank JSON (dalda-aug prompts) for LLM methods")
    meth.add_argument("--class-names", choices=("readable", "folder"), default="readable",
                      help="name written into the base prompt \"a photo of a {name}\": readable (\"american bulldog\", "
                           "the paper's text) or folder (\"american_bulldog\", the reference code's)")
    meth.add_argument("--preset", choices=("pets", "caltech101", "flowers102"), default=None,
                      help="one of the paper's datasets: names it for the paper's numbers and, with --llm, gives "
                           "the LLM its Table 5 description (and Caltech-101's reference class names)")
    meth.add_argument("--llm", default=None, metavar="BACKEND",
                      help="write the prompt bank OUT/prompts.json with this backend (openai:MODEL, hf:MODEL, "
                           "as `dalda-aug prompts --llm`) when LLM methods run without --prompts")
    meth.add_argument("--instruction", choices=("default", "reference"), default="default",
                      help="wording of the --llm request (see docs/prompts.md)")
    meth.add_argument("--base-url", default=None,
                      help="API root of an --llm openai:MODEL endpoint (default https://api.openai.com/v1)")
    meth.add_argument("--variants", "-M", type=int, default=10, help="synthetic images per real image")
    meth.add_argument("--p", type=float, default=0.5, help="probability that a training item is synthetic")
    meth.add_argument("--fixed-lambda", type=float, default=0.5, help="λ of the fixed-scaling methods")
    meth.add_argument("--ags-mode", choices=("truncnorm", "clip"), default="truncnorm",
                      help="AGS sampler: the paper's truncated normal or the reference code's clipped normal")
    meth.add_argument("--models", type=Path, default=None,
                      help="models JSON (ModelConfig); default: the paper's hub models")
    meth.add_argument("--cache", type=Path, default=None, help="synthetic image cache folder (default OUT/cache)")
    meth.add_argument("--cache-format", choices=("png", "webp", "raw"), default="png",
                      help="encoding of new cache entries: raw takes ~2x the disk of png but decodes ~5x faster, "
                           "which matters when data loading limits training")

    gen = p.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps")
    gen.add_argument("--size", type=int, default=512, help="generated image height and width")
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance weight")
    gen.add_argument("--img2img-steps", type=int, default=50,
                     help="denoising steps of the img2img baselines (Real Guidance, DA-Fusion); default 50, "
                          "diffusers' default with which DA-Fusion's implementation ran them")
    gen.add_argument("--ti-steps", type=int, default=1000,
                     help="textual-inversion steps per class for da_fusion (DA-Fusion: 1000; fewer for smoke runs)")
    gen.add_argument("--dtype", default=None, help="generation dtype (default float16 on CUDA, else float32)")
    gen.add_argument("--device", default=None, help="torch device for everything (default cuda if available)")
    gen.add_argument("--gen-batch-size", type=int, default=None,
                     help="images per generator call (default: warm()'s automatic choice)")

    clf = p.add_argument_group("classifier and training (defaults: the paper's)")
    clf.add_argument("--backbone", choices=("resnet50", "clip", "efficientnet_lite0"), default="resnet50")
    clf.add_argument("--clip-head", choices=("normalized", "reference"), default=None,
                     help="CLIP head: normalized (unit features, logit-scaled text head; default under --protocol "
                          "honest) or reference (the reference code's raw features and raw text-feature head; "
                          "default under --protocol reference)")
    clf.add_argument("--recipe", choices=("default", "reference"), default=None,
                     help="classifier transforms: default (RandomResizedCrop + flip, the backbone's mean/std; eval "
                          "Resize + CenterCrop; --protocol honest's default) or reference (Resize((s, s)) + flip + "
                          "RandomRotation(15), mean/std 0.5; eval Resize((s, s)); --protocol reference's default)")
    clf.add_argument("--bn-mode", choices=("frozen", "train"), default=None,
                     help="BatchNorm of a linear probe's frozen ResNet50/EfficientNet backbone: frozen (eval mode; "
                          "--protocol honest's default) or train (train mode, running statistics update, as the "
                          "reference's model.train(); --protocol reference's default)")
    clf.add_argument("--mode", choices=("linear", "finetune"), default="linear",
                     help="linear probe on a frozen backbone (the reference) or full fine-tuning")
    clf.add_argument("--pretrained", default=None,
                     help="backbone weights: a local file for resnet50/efficientnet_lite0 (default: ImageNet); "
                          "clip takes clip_model/clip_pretrained from --models")
    clf.add_argument("--epochs", type=int, default=50)
    clf.add_argument("--batch-size", type=int, default=32)
    clf.add_argument("--iterations-per-epoch", type=int, default=200,
                     help="batches per epoch drawn with replacement; 0 = one shuffled pass")
    clf.add_argument("--lr", type=float, default=None, help="default: 2e-4 AdamW (clip), 1e-4 Adam (CNNs)")
    clf.add_argument("--image-size", type=int, default=None,
                     help="classifier input size (default: the backbone's, 224)")
    clf.add_argument("--autocast", choices=("bfloat16",), default=None, help="train and evaluate under autocast")
    clf.add_argument("--num-workers", type=int, default=None,
                     help="DataLoader workers (default: min(8, cores - 1) on CUDA, 0 on CPU)")
    clf.add_argument("--eval-batch-size", type=int, default=64)
    clf.add_argument("--eval-draws", type=int, default=None,
                     help="evaluate on this many items drawn with replacement (seeded per seed and epoch) from the "
                          "evaluation split, as the reference (32 x 200 = 6400; --protocol reference's default); "
                          "0 = every item once (--protocol honest's default)")

    run = p.add_argument_group("run")
    run.add_argument("--protocol", choices=PROTOCOLS, default="honest",
                     help="honest: last epoch, whole test split; reference: the reference code's best-epoch mean "
                          "per-class accuracy, few-shot draw and evaluation (--recipe, --bn-mode, --clip-head, "
                          "--eval-draws and --eval-split default to the reference's; see the module docstring)")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    run.add_argument("--combine", nargs="+", type=Path, default=None, metavar="DIR",
                     help="instead of running: read DIR/results.json of earlier runs (e.g. one per dataset) and "
                          "write OUT/significance.json and OUT/significance.md, DALDA against each baseline "
                          "paired over (dataset, shots) cells, each the mean over its seeds")
    run.add_argument("--stop-after", choices=("plan", "warm"), default=None,
                     help="stop after writing the plans, or after warming the cache")
    run.add_argument("--overwrite", action="store_true", help="rerun runs already in OUT/runs.jsonl")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The training images (``source``: an ImageSource) and where the test images are."""

    name: str
    source: Any  # ImageSource of the training split
    train_root: Path  # ImageFolder root holding the training images
    train_indices: list[int]  # source item i = ImageFolder(train_root)[train_indices[i]]
    test_root: Path
    test_indices: list[int] | None  # None: every image of test_root
    split: dict[str, Any]
    # "reference": per seed, the second halves of the reference's per-class permutations of
    # test_root (test_targets, classes iterated in class_order) are the evaluation split.
    eval_split: str = "whole"
    test_targets: list[int] | None = None
    class_order: list[int] | None = None  # labels in the reference's class order (None: label order)

    def eval_indices(self, seed: int) -> list[int] | None:
        """Items of ImageFolder(test_root) evaluated for ``seed`` (None: every item)."""
        if self.eval_split == "whole":
            return self.test_indices
        assert self.test_targets is not None
        return reference_halves(self.test_targets, seed, self.class_order)[1]


def reference_class_order(folder: Path, classes: Sequence[str]) -> tuple[list[int] | None, str | None]:
    """The reference's class order for the reference draws: the key order of the ``classes.json``
    that ``examples/prepare_datasets.py`` writes beside the split folders (label order of the
    original dataset; for Flowers-102 not alphabetical), else None (folder order)."""
    path = folder.parent / "classes.json"
    if not path.is_file():
        return None, None
    try:
        listed = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None, None
    if not isinstance(listed, dict) or sorted(listed) != sorted(classes):
        return None, None
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in listed], str(path)


def _dataset_name(args) -> str:
    if args.name:
        return args.name
    folder = (args.data or args.train).resolve()
    return folder.parent.name if folder.name.lower() in ("train", "training", "trainval", "all") else folder.name


def split_per_class(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: ``round(fraction · count)`` images of each class go to test (at
    least one, and at least one stays for training)."""
    import numpy as np

    from dalda_aug.errors import InputError

    targets = np.asarray(targets)
    train, test = [], []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        if members.size < 2:
            raise InputError(f"class {int(label)} has {members.size} image: need 2 or more to split train/test")
        n_test = min(max(int(round(members.size * fraction)), 1), members.size - 1)
        perm = np.random.default_rng([int(seed), int(label), 0x7E57]).permutation(members.size)
        test.extend(int(i) for i in members[perm[:n_test]])
        train.extend(int(i) for i in members[perm[n_test:]])
    return sorted(train), sorted(test)


def _check_folder_order(source, root: Path) -> None:
    """ImageSource and torchvision's ImageFolder must list the same files in the same order."""
    from torchvision.datasets import ImageFolder

    from dalda_aug.dataset import source_ids
    from dalda_aug.errors import InputError

    folder = ImageFolder(str(root))
    if folder.classes != source.classes or source_ids(folder) != [it.source for it in source.items]:
        raise InputError(f"torchvision's ImageFolder lists {root} differently from dalda_aug "
                         "(hidden class folders or unusual file names?)")


def load_data(args, eval_split: str = "whole") -> Data:
    from dalda_aug.data import ImageSource, find_classes
    from dalda_aug.errors import InputError

    if args.data is not None:
        if args.train is not None or args.test is not None:
            raise InputError("give either --data (one folder, split here) or --train and --test, not both")
        if eval_split == "reference":  # the pool itself; halves per seed (Data.eval_indices)
            pool = ImageSource.from_folder(args.data)
            _check_folder_order(pool, args.data)
            root = Path(pool.root)
            order, order_file = reference_class_order(args.data.resolve(), pool.classes)
            split = {"kind": "reference halves of one pool", "folder": str(root), "images": len(pool),
                     "train_images": len(pool), "test_images": None, "class_order": order_file}
            return Data(_dataset_name(args), pool, root, list(range(len(pool))), root, None, split,
                        eval_split, list(pool.targets), order)
        if not 0.0 < args.test_fraction < 1.0:
            raise InputError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
        full = ImageSource.from_folder(args.data)
        _check_folder_order(full, args.data)
        train_idx, test_idx = split_per_class(full.targets, args.test_fraction, args.split_seed)
        root = Path(full.root)
        split = {"kind": "per-class split", "folder": str(root), "test_fraction": args.test_fraction,
                 "split_seed": args.split_seed, "train_images": len(train_idx), "test_images": len(test_idx)}
        return Data(_dataset_name(args), full.subset(train_idx), root, train_idx, root, test_idx, split)
    if args.train is None or args.test is None:
        raise InputError("give --train DIR and --test DIR, or --data DIR (with --test-fraction)")
    source = ImageSource.from_folder(args.train)
    _check_folder_order(source, args.train)
    test_classes, _ = find_classes(args.test)
    if test_classes != source.classes:
        missing = sorted(set(source.classes) ^ set(test_classes))
        raise InputError(f"the class folders of --test {args.test} differ from --train's (e.g. {missing[:3]})")
    from torchvision.datasets import ImageFolder

    test_folder = ImageFolder(str(args.test))
    n_test = len(test_folder)
    split = {"kind": "folders", "train": str(Path(source.root)), "test": str(args.test.resolve()),
             "train_images": len(source), "test_images": n_test}
    order = None
    if eval_split == "reference":
        order, split["class_order"] = reference_class_order(args.train.resolve(), source.classes)
        split["test_images"] = None  # per seed
    return Data(_dataset_name(args), source, Path(source.root), list(range(len(source))), args.test.resolve(), None,
                split, eval_split, list(test_folder.targets), order)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
class _Lazy:
    """A zero-argument factory that builds its object once (``warm`` calls it on the first miss)."""

    def __init__(self, build):
        self._build = build
        self.instance = None

    def __call__(self):
        if self.instance is None:
            self.instance = self._build()
        return self.instance


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[fewshot] {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
CSV_COLUMNS = ["dataset", "backbone", "mode", "method", "shots", "seed", "protocol", "best_epoch", "recipe", "bn_mode",
               "clip_head", "eval_draws", "eval_split", "top1", "top1_std",
               "mean_per_class", "mean_per_class_std", "n_test", "seeds", "n_train_real", "n_synthetic", "p",
               "train_seconds"]

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


def resolve_components(args) -> dict[str, Any]:
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


def _reference_permutations(targets: Sequence[int], seed: int,
                            class_order: Sequence[int] | None = None) -> list[tuple[Any, Any]]:
    """(members, permutation) per class, drawn as the reference's dataset classes draw them: one
    ``np.random.default_rng(seed)``, ``rng.permutation(n_class)`` per class in the reference's
    class order (``class_order``, default label order)."""
    import numpy as np

    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    labels = list(np.unique(targets)) if class_order is None else list(class_order)
    out = []
    for label in labels:
        members = np.flatnonzero(targets == label)
        out.append((members, rng.permutation(members.size)))
    return out


def reference_halves(targets: Sequence[int], seed: int,
                     class_order: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """The reference's (training, validation) halves of one folder for ``seed``: per class
    ``np.array_split(permutation, 2)`` (kkyuhun94/dalda ``semantic_aug/datasets/*.py``, split
    "train" takes part 0, "val" part 1). Sorted indices."""
    import numpy as np

    first: list[int] = []
    second: list[int] = []
    for members, perm in _reference_permutations(targets, seed, class_order):
        a, b = np.array_split(perm, 2)
        first.extend(int(i) for i in members[a])
        second.extend(int(i) for i in members[b])
    return sorted(first), sorted(second)


def evaluation_draws(n_items: int, draws: int, seed: int, epoch: int) -> list[int]:
    """``draws`` item indices drawn uniformly with replacement from ``n_items``, seeded by (seed, epoch)."""
    import numpy as np

    rng = np.random.default_rng([int(seed), int(epoch), 0x6400])
    return [int(i) for i in rng.integers(0, n_items, size=draws)]
# What each protocol reports, as table.md names it.
PROTOCOL_TEXT = {
    "honest": "the model after the last epoch, evaluated once on the whole test split",
    "reference": "the reference code's protocol: the model is evaluated after every epoch and the epoch with the "
                 "highest seed-averaged mean per-class accuracy is reported (as its plot.py selects it); few-shot "
                 "images drawn by one seeded permutation per dataset",
}
# Paired test used for DALDA against each baseline. Pairs are seeds within one (dataset, shots)
# cell: cells of one dataset are not independent (the few-shot sets are nested, so a 2-shot set
# holds the 1-shot images and their synthetic variants), so they are never pooled into one test.
PAIRED_TEST = "paired two-sided t-test (scipy.stats.ttest_rel)"
PAIRING = {
    "seeds": "paired over seeds, one test per (dataset, shots)",
    "cells": "paired over (dataset, shots) cells, each the mean over its seeds",
}
SIGNIFICANCE_BASELINE_ORDER = ("real", "real_guidance", "da_fusion", "fixed", "llm_fixed", "base_rs", "llm_rs",
                               "base_ags")


def reference_few_shot_indices(targets: Sequence[int], shots: int, seed: int,
                               class_order: Sequence[int] | None = None) -> list[int]:
    """Few-shot indices drawn as the reference code draws them (kkyuhun94/dalda
    ``semantic_aug/datasets/*.py``): one ``np.random.default_rng(seed)`` for the dataset; for
    each class in the reference's class order ``rng.permutation(n_class)``, its first half
    (``np.array_split(perm, 2)[0]``) is the training pool, whose first ``shots`` are used.
    The same draw as the reference's only when the folder holds the pool the reference permutes,
    in its file order (``prepare_datasets.py --split reference``). Returned in ascending index
    order; nested in ``shots`` for a seed."""
    import numpy as np

    from dalda_aug.errors import InputError

    chosen: list[int] = []
    for members, perm in _reference_permutations(targets, seed, class_order):
        pool = np.array_split(perm, 2)[0]
        if pool.size < shots:
            raise InputError(f"a class has {members.size} training image(s); the reference draw keeps "
                             f"the first half ({pool.size}), fewer than {shots} shots")
        chosen.extend(int(i) for i in members[pool[:shots]])
    return sorted(chosen)


def best_epoch(curve: Sequence[float]) -> int:
    """The first epoch with the highest value (pandas ``idxmax``, as the reference's plot.py)."""
    return max(range(len(curve)), key=lambda e: (curve[e], -e))


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (backbone, mode, method, shots), in table order.

    ``reference`` rows: the epoch whose seed-averaged mean per-class accuracy is highest is
    picked (``best_epoch``) and every metric is read at that epoch, as the reference's plot.py.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backbone"], row["mode"], row["method"], row["shots"]), []).append(row)
    order = list(METHODS)
    summary = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.index(k[2]), k[3])):
        group = sorted(groups[key], key=lambda r: r["seed"])
        protocol = group[0].get("protocol", "honest")
        extra: dict[str, Any] = {}
        if protocol == "reference":
            n_epochs = min(len(r["epoch_mean_per_class"]) for r in group)
            mean_curve = [sum(r["epoch_mean_per_class"][e] for r in group) / len(group) for e in range(n_epochs)]
            epoch = best_epoch(mean_curve)
            top1_values = [r["epoch_top1"][epoch] for r in group]
            mpc_values = [r["epoch_mean_per_class"][epoch] for r in group]
            extra = {"best_epoch": epoch, "run_best_epochs": [r["best_epoch"] for r in group]}
        else:
            top1_values = [r["top1"] for r in group]
            mpc_values = [r["mean_per_class"] for r in group]
        top1, top1_std = _mean_std(top1_values)
        mpc, mpc_std = _mean_std(mpc_values)
        summary.append({
            "dataset": group[0]["dataset"], "backbone": key[0], "mode": key[1], "method": key[2],
            "label": METHODS[key[2]].label, "shots": key[3], "seeds": [r["seed"] for r in group],
            "protocol": protocol, **extra,
            **{name: group[0].get(name, COMPONENTS[name][0]) for name in COMPONENTS},
            "top1": top1, "top1_std": top1_std, "mean_per_class": mpc, "mean_per_class_std": mpc_std,
            "per_seed": {"top1": top1_values, "mean_per_class": mpc_values},
            "n_test": group[0]["n_test"],
        })
    return summary


def paired_tests(summary: list[dict], metrics: Sequence[str], pairing: str = "seeds") -> list[dict]:
    """DALDA against each baseline: mean difference and the p-value of a paired t-test.

    ``pairing="seeds"`` (a results folder): one test per (backbone, mode, dataset, shots),
    pairing the seeds both methods ran there. Shot settings are not pooled: the few-shot sets of
    one seed are nested, so the 1-shot and 2-shot results share images and are not independent.
    ``pairing="cells"`` (``--combine``): one test per (backbone, mode), pairing the (dataset,
    shots) cells both methods ran, each cell's value the mean over its seeds. Values are those
    the table reports (for ``reference``, at the selected epoch). The p-value is None when there
    are fewer than 2 pairs or all differences are equal.
    """
    import math as _math

    from scipy import stats

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    out = []
    for backbone, mode in sorted({(s["backbone"], s["mode"]) for s in summary}):
        cells = [s for s in summary if s["backbone"] == backbone and s["mode"] == mode]
        dalda = {(s["dataset"], s["shots"]): s for s in cells if s["method"] == "dalda"}
        if not dalda:
            continue
        for base in [m for m in SIGNIFICANCE_BASELINE_ORDER if any(s["method"] == m for s in cells)]:
            other = {(s["dataset"], s["shots"]): s for s in cells if s["method"] == base}
            keys = sorted(set(dalda) & set(other), key=str)
            groups = [[key] for key in keys] if pairing == "seeds" else ([keys] if keys else [])
            for group in groups:
                for metric in metrics:
                    a, b, where = [], [], []
                    for key in group:
                        seeds_a = dict(zip(dalda[key]["seeds"], dalda[key]["per_seed"][metric]))
                        seeds_b = dict(zip(other[key]["seeds"], other[key]["per_seed"][metric]))
                        common = sorted(set(seeds_a) & set(seeds_b))
                        if not common:
                            continue
                        if pairing == "seeds":
                            a += [seeds_a[seed] for seed in common]
                            b += [seeds_b[seed] for seed in common]
                            where += [{"dataset": key[0], "shots": key[1], "seed": seed} for seed in common]
                        else:
                            a.append(mean([seeds_a[seed] for seed in common]))
                            b.append(mean([seeds_b[seed] for seed in common]))
                            where.append({"dataset": key[0], "shots": key[1], "seeds": common})
                    if not a:
                        continue
                    diffs = [x - y for x, y in zip(a, b)]
                    p = None
                    if len(diffs) >= 2 and max(diffs) != min(diffs):
                        p = float(stats.ttest_rel(a, b).pvalue)
                        p = None if _math.isnan(p) else p
                    cell = {"dataset": group[0][0], "shots": group[0][1]} if pairing == "seeds" else {}
                    out.append({
                        "backbone": backbone, "mode": mode, **cell, "method": "dalda", "baseline": base,
                        "metric": metric, "test": PAIRED_TEST, "pairing": PAIRING[pairing], "n_pairs": len(diffs),
                        "mean_difference": sum(diffs) / len(diffs), "p_value": p, "pairs": where,
                    })
    return out


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


_METRIC_NAMES = {"top1": "top-1 accuracy", "mean_per_class": "mean per-class accuracy"}


def render_table(summary: list[dict], dataset: str, backbone: str, mode: str, shots: list[int],
                 significance: list[dict] | None = None, paper_key: str | None = None) -> str:
    """The paper's Table 2 layout: rows = methods, columns = shots × the protocol's metrics."""
    rows = [s for s in summary if s["backbone"] == backbone and s["mode"] == mode]
    methods = [m for m in METHODS if any(s["method"] == m for s in rows)]
    by_key = {(s["method"], s["shots"]): s for s in rows}
    seeds = sorted({seed for s in rows for seed in s["seeds"]})
    n_test = rows[0]["n_test"] if rows else 0
    protocol = rows[0]["protocol"] if rows else "honest"
    fields = ("top1", "mean_per_class") if protocol == "honest" else ("mean_per_class",)
    what = "linear probe" if mode == "linear" else "fine-tuned"
    metric_text = " and ".join(_METRIC_NAMES[f] for f in fields)
    first = rows[0] if rows else {"protocol": protocol, "backbone": backbone, "mode": mode}
    values = {name: first.get(name, COMPONENTS[name][0]) for name in COMPONENTS}
    shown = ", ".join(f"{name} {values[name]}" for name in COMPONENTS
                      if not (name == "bn_mode" and values[name] is None) and not (name == "clip_head" and
                                                                                  values[name] is None))
    differ = differing_components(first)
    evaluated = f"{n_test} draws with replacement from" if values.get("eval_draws") else f"n = {n_test},"
    lines = [
        f"# Few-shot accuracy: {dataset}, {backbone} ({what})",
        "",
        f"Protocol: **{protocol}** — {PROTOCOL_TEXT[protocol]}. Metric: {metric_text} on the test split "
        f"({evaluated} {values['eval_split']} split); mean ± sample std over seeds {', '.join(map(str, seeds))}. "
        "Best per column in bold.",
        "",
        f"Components: {shown}. " + (
            "Every component is the reference code's: its metric." if not differ else
            "Not the reference code's metric (not the same metric as the paper's); it differs in " + "; ".join(
                f"{COMPONENT_TEXT[c]}: {protocol if c == 'protocol' else first.get(c, COMPONENTS[c][0])}"
                for c in differ) + "."),
        "",
    ]
    header = ["Method"]
    for n in shots:
        header += [f"{n}-shot top-1", f"{n}-shot mean/class"] if protocol == "honest" else \
            [f"{n}-shot mean/class", f"{n}-shot best epoch"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" + "|---:" * (len(header) - 1) + "|")
    best = {}
    for n in shots:
        for field in fields:
            values = [by_key[(m, n)][field] for m in methods if (m, n) in by_key]
            best[(n, field)] = max(values) if values else None
    for m in methods:
        cells = [METHODS[m].label]
        for n in shots:
            s = by_key.get((m, n))
            for field in fields:
                if s is None:
                    cells.append("–")
                    continue
                text = _cell(s[field], s[f"{field}_std"])
                cells.append(f"**{text}**" if round(s[field], 3) == round(best[(n, field)], 3) else text)
            if protocol == "reference":
                cells.append("–" if s is None else str(s["best_epoch"]))
        lines.append("| " + " | ".join(cells) + " |")
    key = paper_key or _DATASET_ALIASES.get("".join(ch for ch in dataset.lower() if ch.isalnum()))
    paper = PAPER_1SHOT.get((key, backbone)) if key else None
    if paper is not None and 1 in shots:
        if not differ:
            lines += ["", f"Paper (DALDA, {key}, 1-shot, {backbone}, mean of 3 seeds, mean per-class accuracy at "
                          f"the best epoch, the same metric: every component is the reference code's): {paper:.3f}."]
        else:
            names = "; ".join(f"{COMPONENT_TEXT[c]}: {first.get(c, 'honest') if c != 'protocol' else protocol}"
                              for c in differ)
            lines += ["", f"The paper's numbers (DALDA, {key}, 1-shot, {backbone}) are the reference code's "
                          f"metric; these results differ from it in {names}, so they are not the same metric and "
                          "the paper's number is not shown. Run `--protocol reference` without overrides (on the "
                          "reference's pools) to compare."]
    tests = [t for t in (significance or []) if t["backbone"] == backbone and t["mode"] == mode]
    if tests:
        lines += ["", f"DALDA against each baseline: mean difference (DALDA − baseline) and p-value of a "
                      f"{PAIRED_TEST}, {PAIRING['seeds']} (shot settings share their nested few-shot images, "
                      "so they are not pooled).", "",
                  "| Shots | Baseline | Metric | Pairs | Mean difference | p-value |", "|---:|---|---|---:|---:|---:|"]
        for t in tests:
            p = "–" if t["p_value"] is None else f"{t['p_value']:.3g}"
            lines.append(f"| {t.get('shots', '–')} | {METHODS[t['baseline']].label} | {_METRIC_NAMES[t['metric']]} "
                         f"| {t['n_pairs']} | {t['mean_difference']:+.3f} | {p} |")
    return "\n".join(lines) + "\n"


def combine(folders: Sequence[Path], out: Path) -> int:
    """``--combine``: one paired test per baseline over the results of several runs (datasets)."""
    from dalda_aug.errors import InputError, MissingFileError

    summary: list[dict] = []
    protocols: dict[str, list[str]] = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise MissingFileError(f"no results.json in {folder}")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a results file: {exc}") from None
        rows = result.get("summary") if isinstance(result, dict) else None
        if not isinstance(rows, list) or any("per_seed" not in r for r in rows):
            raise InputError(f"{path} has no per-seed summary (written by an older fewshot.py?); rerun it")
        protocols.setdefault(result.get("protocol", "honest"), []).append(str(folder))
        summary += rows
    if len(protocols) > 1:
        raise InputError(f"the results mix protocols ({protocols}); combine runs of one protocol")
    protocol = next(iter(protocols))
    metrics = ("top1", "mean_per_class") if protocol == "honest" else ("mean_per_class",)
    tests = paired_tests(summary, metrics, pairing="cells")
    if not tests:
        raise InputError("no DALDA result with a baseline to compare in " + ", ".join(map(str, folders)))
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted({s["dataset"] for s in summary})
    (out / "significance.json").write_text(json.dumps(
        {"format": FORMAT, "protocol": protocol, "test": PAIRED_TEST, "pairing": PAIRING["cells"],
         "sources": [str(f) for f in folders],
         "datasets": datasets, "significance": tests}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [f"# DALDA against each baseline: {', '.join(datasets)}", "",
             f"Protocol: **{protocol}** — {PROTOCOL_TEXT[protocol]}. Mean difference (DALDA − baseline) and "
             f"p-value of a {PAIRED_TEST}, {PAIRING['cells']} (seeds averaged first: the shot settings of "
             "one dataset share nested few-shot images, so seeds are not pooled across them).", "",
             "| Backbone | Baseline | Metric | Pairs | Mean difference | p-value |", "|---|---|---|---:|---:|---:|"]
    for t in tests:
        p = "–" if t["p_value"] is None else f"{t['p_value']:.3g}"
        lines.append(f"| {t['backbone']} ({t['mode']}) | {METHODS[t['baseline']].label} | {_METRIC_NAMES[t['metric']]} "
                     f"| {t['n_pairs']} | {t['mean_difference']:+.3f} | {p} |")
    (out / "significance.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def write_outputs(out: Path, rows: list[dict], meta: dict[str, Any], shots: list[int]) -> dict[str, Path]:
    summary = summarize(rows)
    protocol = summary[0]["protocol"] if summary else "honest"
    metrics = ("top1", "mean_per_class") if protocol == "honest" else ("mean_per_class",)
    significance = paired_tests(summary, metrics)
    result = {"format": FORMAT, **meta, "protocol": protocol,
              "metrics": [_METRIC_NAMES[m] for m in metrics], "runs": rows, "summary": summary,
              "significance": significance}
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "table.md"}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        order = list(METHODS)
        for row in sorted(rows, key=lambda r: (r["backbone"], order.index(r["method"]), r["shots"], r["seed"])):
            writer.writerow({"protocol": "honest", **row, "seeds": 1})
        for s in summary:
            writer.writerow({**s, "seed": "mean", "seeds": len(s["seeds"]),
                             "top1_std": "" if s["top1_std"] is None else s["top1_std"],
                             "mean_per_class_std": "" if s["mean_per_class_std"] is None else s["mean_per_class_std"]})
    tables = [render_table(summary, meta["dataset"], b, m, shots, significance, meta.get("paper_key"))
              for b, m in sorted({(s["backbone"], s["mode"]) for s in summary})]
    paths["table"].write_text("\n".join(tables), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def write_prompts(args, class_names: list[str], models: Any, path: Path) -> Path:
    """Write the prompt bank for the LLM methods with ``--llm`` (resumed if ``path`` exists),
    with ``--preset``'s Table 5 description and LLM class names, as ``dalda-aug prompts`` does."""
    from dalda_aug.prompts import PromptBank, generate_prompt_bank, load_clip_tokenizer, parse_backend

    description, llm_names = "", None
    if args.preset is not None:
        from dalda_aug.presets import get_preset

        preset = get_preset(args.preset)
        description, llm_names = preset.description, preset.llm_names(class_names)
    backend = parse_backend(args.llm, base_url=args.base_url,
                            **({} if args.llm.startswith("openai") else {"device": args.device or "cpu"}))
    resume = PromptBank.load(path) if path.is_file() and not args.overwrite else None
    generate_prompt_bank(class_names, backend, m=args.variants, description=description,
                         tokenizer=load_clip_tokenizer(models.base, revision=models.base_revision), out=path,
                         resume_from=resume, progress=not args.no_progress, instruction=args.instruction,
                         llm_names=llm_names)
    _log(f"wrote the prompt bank {path} ({args.llm}{', preset ' + args.preset if args.preset else ''})")
    return path


def resolve_methods(args) -> tuple[list[str], dict[str, str]]:
    """The methods to run (table order) and those skipped, with the reason."""
    from dalda_aug.errors import InputError

    requested = args.methods if args.methods is not None else list(DEFAULT_METHODS)
    skipped: dict[str, str] = {}
    if args.prompts is None and getattr(args, "llm", None) is None:
        llm = [m for m in requested if METHODS[m].prompts == "llm"]
        if llm and args.methods is not None:
            raise InputError(f"method(s) {', '.join(llm)} need LLM prompts: pass --prompts FILE "
                             "(write one with `dalda-aug prompts`) or --llm BACKEND")
        for m in llm:
            skipped[m] = "needs LLM prompts (--prompts FILE, written by `dalda-aug prompts`)"
    methods = [m for m in METHODS if m in requested and m not in skipped]
    return methods, skipped


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from dalda_aug.errors import DaldaError

    try:
        if args.combine:
            return combine(args.combine, args.out)
        return run(args, list(sys.argv[1:] if argv is None else argv))
    except DaldaError as exc:
        print(f"fewshot.py: error: {exc}", file=sys.stderr)
        return 2


def run(args, argv: list[str]) -> int:  # noqa: C901 - one linear pipeline, kept in one place
    import torch
    from tqdm.auto import tqdm

    import dalda_aug
    from dalda_aug.ags import AGSConfig, Scaling
    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.classify import (TrainConfig, build_classifier, eval_transform, evaluate, train_classifier,
                                    train_transform)
    from dalda_aug.clipscore import CLIPScorer
    from dalda_aug.config import ModelConfig
    from dalda_aug.data import few_shot_indices
    from dalda_aug.dataset import SyntheticAugmentedDataset
    from dalda_aug.errors import InputError
    from dalda_aug.generation import GenerationConfig
    from dalda_aug.plan import build_plan
    from dalda_aug.prompts import PromptBank
    from dalda_aug.generators.da_fusion import DAFusionConfig, build_da_fusion_plan
    from dalda_aug.generators.textual_inversion import TextualInversionConfig, train_textual_inversion
    from dalda_aug.real_guidance import RealGuidanceConfig
    from dalda_aug.warm import warm

    started = time.perf_counter()
    progress = not args.no_progress
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("variants", "steps", "img2img_steps", "ti_steps", "size", "epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.shots) < 1:
        raise InputError(f"--shots must be >= 1, got {args.shots}")
    if min(args.seeds) < 0:
        raise InputError(f"--seeds must be >= 0, got {args.seeds}")
    if not 0.0 <= args.p <= 1.0:
        raise InputError(f"--p must lie in [0, 1], got {args.p}")
    if args.iterations_per_epoch < 0:
        raise InputError(f"--iterations-per-epoch must be >= 0, got {args.iterations_per_epoch}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if device.startswith("cuda") else 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache if args.cache is not None else out / "cache"

    methods, skipped = resolve_methods(args)
    for m, why in skipped.items():
        _log(f"skipping method {m!r}: it {why}")
    if not methods:
        raise InputError("no method left to run")
    models = ModelConfig.load(args.models) if args.models is not None else ModelConfig()
    if args.clip_head is not None and args.backbone != "clip":
        raise InputError(f"--clip-head {args.clip_head} applies to --backbone clip only")
    if args.bn_mode is not None and (args.backbone not in BN_BACKBONES or args.mode != "linear"):
        raise InputError(f"--bn-mode {args.bn_mode} applies to a linear probe on {' or '.join(BN_BACKBONES)} only")
    if args.eval_draws is not None and args.eval_draws < 0:
        raise InputError(f"--eval-draws must be >= 0, got {args.eval_draws}")
    components = resolve_components(args)
    if args.data is not None and components["eval_split"] == "reference" and args.protocol != "reference":
        raise InputError("--eval-split reference with --data evaluates on the pool's second halves, which only the "
                         "reference few-shot draw (--protocol reference) keeps out of training")
    data = load_data(args, components["eval_split"])
    source = data.source
    source.few_shot(max(args.shots), 0)  # fails early, naming a class with too few images
    if args.prompts is not None and args.llm is not None:
        raise InputError("give --prompts FILE or --llm BACKEND (to write OUT/prompts.json), not both")
    if args.prompts is None and args.llm is not None and any(METHODS[m].prompts == "llm" for m in methods):
        args.prompts = write_prompts(args, source.class_names, models, out / "prompts.json")
    bank = None
    if args.prompts is not None and any(METHODS[m].prompts == "llm" for m in methods):
        bank = PromptBank.load(args.prompts)
        missing = [c for c in source.class_names if c not in bank]
        if missing:
            raise InputError(f"the prompt bank {args.prompts} has no prompts for class(es) {missing[:5]}")
        short = bank.short_classes(args.variants)
        if short:
            _log(f"{len(short)} class(es) have fewer than M={args.variants} prompts; their prompts repeat "
                 f"(e.g. {next(iter(short))!r}: {next(iter(short.values()))})")

    gen_config = GenerationConfig(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                  height=args.size, width=args.size)
    rg_config = RealGuidanceConfig(num_inference_steps=args.img2img_steps, guidance_scale=args.guidance_scale,
                                   height=args.size, width=args.size)
    # DA-Fusion: one spec (and cache binding) per token set, i.e. per (seed, shots); see the plans step.
    da_config = DAFusionConfig(num_inference_steps=args.img2img_steps, guidance_scale=args.guidance_scale,
                               height=args.size, width=args.size)
    ti_config = TextualInversionConfig(steps=args.ti_steps, resolution=args.size)  # DA-Fusion: 512, as --size
    specs = {"ip_adapter": GenerationSpec(models, gen_config, dtype),
             "real_guidance": GenerationSpec(models, rg_config, dtype)}
    caches = {kind: SyntheticCache(cache_dir, spec, image_format=args.cache_format) for kind, spec in specs.items()}
    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        iterations_per_epoch=args.iterations_per_epoch or None, num_workers=num_workers,
        device=device, autocast_dtype=args.autocast,
    )
    pretrained: bool | str = True
    if args.backbone == "clip":
        pretrained = models.clip_pretrained
        if args.pretrained is not None:
            raise InputError("--pretrained is for resnet50/efficientnet_lite0; CLIP weights come from --models")
    elif args.pretrained is not None:
        pretrained = args.pretrained

    # Everything a result row depends on: a finished run with the same identity is reused.
    identity = {
        "format": FORMAT,
        "data": {k: v for k, v in data.split.items()},
        "classes": source.classes,
        "models": models.to_dict(),
        "generation": {kind: spec.fingerprint for kind, spec in specs.items()},
        **({"da_fusion": {"generation": da_config.pixel_dict(), "textual_inversion": ti_config.to_dict(),
                          "dtype": dtype}} if "da_fusion" in methods else {}),
        "variants": args.variants, "p": args.p, "fixed_lambda": args.fixed_lambda, "ags_mode": args.ags_mode,
        "prompts": _digest(bank.to_dict()) if bank is not None else None,
        "classifier": {"backbone": args.backbone, "mode": args.mode, "pretrained": str(pretrained),
                       "image_size": args.image_size},
        "train": {k: v for k, v in train_config.to_dict().items() if k not in ("num_workers", "device", "seed")},
    }
    # Non-default choices only, so the run keys of earlier honest runs stay valid.
    if args.protocol != "honest":
        identity["protocol"] = args.protocol
    for name, value in components.items():
        if value is not None and value != COMPONENTS[name][0]:
            identity.setdefault("components", {})[name] = value
    if data.class_order is not None:
        identity["class_order"] = data.class_order
    if args.class_names != "readable":
        identity["class_names"] = args.class_names
    config = {
        "format": FORMAT,
        "argv": argv,
        "dataset": data.name,
        "data": data.split,
        "classes": source.classes,
        "class_names": source.class_names,
        "methods": methods,
        "skipped_methods": skipped,
        "method_definitions": {m: vars(METHODS[m]) for m in methods},
        "shots": args.shots,
        "seeds": args.seeds,
        "variants": args.variants,
        "p": args.p,
        "fixed_lambda": args.fixed_lambda,
        "ags": AGSConfig(mode=args.ags_mode).to_dict(),
        "prompts": {"path": str(args.prompts.resolve()), "provenance": bank.provenance} if bank is not None else None,
        "models": models.to_dict(),
        "generation": {
            "ip_adapter": {**gen_config.pixel_dict(), "fingerprint": specs["ip_adapter"].fingerprint},
            "real_guidance": {**rg_config.pixel_dict(), "fingerprint": specs["real_guidance"].fingerprint},
            "da_fusion": {**da_config.pixel_dict(), "textual_inversion": ti_config.to_dict()},
            "dtype": dtype, "batch_size": args.gen_batch_size,
        },
        "cache": {"folder": str(Path(cache_dir).resolve()), "format": args.cache_format},
        "classifier": {"backbone": args.backbone, "mode": args.mode, "pretrained": pretrained,
                       "clip_model": models.clip_model if args.backbone == "clip" else None,
                       "clip_head": components["clip_head"], "bn_mode": components["bn_mode"],
                       "recipe": components["recipe"], "image_size": args.image_size},
        "components": components,
        "differs_from_reference": differing_components({"protocol": args.protocol, "backbone": args.backbone,
                                                        "mode": args.mode, **components}),
        "base_prompt_class_names": args.class_names,
        "train": {**train_config.to_dict(), "seed": "= run seed"},
        "eval": {"split": "whole test split" if components["eval_split"] == "whole"
                 else "per seed, the reference's second halves (reference_halves)",
                 "draws": components["eval_draws"] or "every item once", "protocol": args.protocol,
                 "epoch": "last" if args.protocol == "honest" else "best seed-averaged mean per-class accuracy",
                 "few_shot_draw": "per-class seeded permutation (dalda_aug.data.few_shot_indices)"
                 if args.protocol == "honest" else "one seeded permutation per dataset (the reference's)",
                 "class_order": data.split.get("class_order"),
                 "batch_size": args.eval_batch_size},
        "device": device,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "dalda_aug": dalda_aug.__version__, "platform": platform.platform(),
                        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
        "identity": _digest(identity),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n",
                                     encoding="utf-8")

    # Finished runs of an earlier invocation with the same settings.
    runs_path = out / "runs.jsonl"
    done: dict[str, dict] = {}
    if runs_path.is_file() and not args.overwrite:
        for line in runs_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["run_key"]] = row
    elif runs_path.is_file():
        runs_path.unlink()

    def run_key(seed: int, shots: int, method: str) -> str:
        return _digest({"identity": identity, "seed": seed, "shots": shots, "method": method})

    grid = [(seed, shots, m) for seed in args.seeds for shots in args.shots for m in methods]
    todo = [g for g in grid if run_key(*g) not in done]
    if len(todo) < len(grid):
        _log(f"{len(grid) - len(todo)} of {len(grid)} runs already in {runs_path}; running {len(todo)}")
    timing = {"scores": 0.0, "plan": 0.0, "warm": 0.0, "train": 0.0, "evaluate": 0.0}
    meta = {"dataset": data.name, "config": "config.json", "skipped_methods": skipped, "timing_seconds": timing,
            "paper_key": args.preset}

    # -- 1. CLIPScores, once per few-shot image ----------------------------------------------
    t0 = time.perf_counter()
    fewshot: dict[tuple[int, int], list[int]] = {}
    for seed, shots, m in todo:
        if (seed, shots) not in fewshot:
            fewshot[(seed, shots)] = few_shot_indices(source.targets, shots, seed) if args.protocol == "honest" \
                else reference_few_shot_indices(source.targets, shots, seed, data.class_order)
    needs_plan = [(seed, shots, m) for seed, shots, m in todo if METHODS[m].generator is not None]
    wanted = sorted({i for seed, shots, _ in needs_plan for i in fewshot[(seed, shots)]})
    scores: dict[Any, float] = {}
    if wanted:
        scorer = CLIPScorer.from_models(models, device=device)
        values = scorer.score([source.items[i].load() for i in wanted], [source.items[i].label for i in wanted],
                              source.class_names, progress=progress)
        scores = {source.items[i].source: float(v) for i, v in zip(wanted, values)}
        del scorer
        _log(f"CLIPScore of {len(wanted)} few-shot images: mean {sum(scores.values()) / len(scores):.3f}")
    timing["scores"] = time.perf_counter() - t0

    # -- 2. plans ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    plans: dict[tuple[int, int, str], Any] = {}
    for seed, shots, m in tqdm(needs_plan, desc="plans", unit="plan", disable=not progress or not needs_plan):
        method = METHODS[m]
        if method.scaling == "ags":
            scaling = Scaling("ags", ags=AGSConfig(mode=args.ags_mode))
        elif method.scaling == "rs":
            scaling = Scaling("rs")
        elif method.scaling == "fixed":
            scaling = Scaling("fixed", value=args.fixed_lambda)
        else:  # Real Guidance ignores λ; a constant keeps its cache keys independent of n-shot
            scaling = Scaling("fixed", value=0.0)
        idx = fewshot[(seed, shots)]
        # honest: build_plan draws the same few-shot subset itself; reference: it is given the subset
        # (σ still uses n = shots, each class holding `shots` images)
        plan_source, plan_shots = (source, shots) if args.protocol == "honest" else (source.subset(idx), None)
        if method.generator == "da_fusion":  # tokens learned on this seed's few-shot images, cached by content
            tokens = train_textual_inversion(plan_source, out / "tokens" / f"seed{seed}-{shots}shot", models=models,
                                             shots=plan_shots, seed=seed, config=ti_config, device=device, dtype=dtype,
                                             cache_dir=out / "textual-inversion-cache", progress=progress)
            plan = build_da_fusion_plan(plan_source, tokens.folder, variants=args.variants, seed=seed,
                                        n_shot=plan_shots, models=models, config=da_config,
                                        scores=[scores[source.items[i].source] for i in idx], progress=False)
            plan.save(out / "plans" / f"seed{seed}-{shots}shot-{m}")
            plans[(seed, shots, m)] = plan
            spec = GenerationSpec(models, DAFusionConfig.from_dict(plan.config["generator"]["config"]), dtype)
            caches[(seed, shots, m)] = SyntheticCache(cache_dir, spec, image_format=args.cache_format)
            continue
        plan = build_plan(plan_source, variants=args.variants, seed=seed, n_shot=plan_shots, scaling=scaling,
                          prompts=bank if method.prompts == "llm" else None, models=models,
                          base_prompt_names=args.class_names,
                          scores=[scores[source.items[i].source] for i in idx], progress=False)
        plan.save(out / "plans" / f"seed{seed}-{shots}shot-{m}")
        plans[(seed, shots, m)] = plan
    timing["plan"] = time.perf_counter() - t0
    if args.stop_after == "plan":
        _log(f"wrote {len(plans)} plans to {out / 'plans'}; stopping (--stop-after plan)")
        return 0

    # -- 3. warm the cache: every IP-Adapter plan, then every Real Guidance plan ---------------
    t0 = time.perf_counter()
    warm_reports = []
    for kind in ("ip_adapter", "real_guidance", "da_fusion"):
        keys = [k for k in plans if METHODS[k[2]].generator == kind]
        if not keys:
            continue
        # One generator per kind for all plans, built on the first miss (loading it costs more
        # than warming a small plan).
        holder = _Lazy(lambda spec=specs.get(kind): spec.make_generator(device))
        for key in keys:
            if key in caches:  # da_fusion: a token set, so a spec and generator, per plan
                holder.instance = None
                holder = _Lazy(lambda spec=caches[key].spec: spec.make_generator(device))
            report = warm(plans[key], caches[key] if key in caches else caches[kind], generator=holder,
                          batch_size=args.gen_batch_size, progress=progress)
            warm_reports.append({"seed": key[0], "shots": key[1], "method": key[2], **report.to_dict()})
            if report.generated:
                _log(f"seed {key[0]}, {key[1]}-shot, {key[2]}: {report.summary()}")
        holder.instance = None  # free the pipeline before the next one (or training) needs the memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    timing["warm"] = time.perf_counter() - t0
    meta["warm"] = warm_reports
    if args.stop_after == "warm":
        _log(f"cache warm for {len(plans)} plans in {cache_dir}; stopping (--stop-after warm)")
        return 0

    # -- 4./5. train and evaluate ------------------------------------------------------------
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    train_folder = ImageFolder(str(data.train_root))  # no transform: the wrapper applies it
    test_sets: dict[tuple, Any] = {}
    rows = [done[run_key(*g)] for g in grid if run_key(*g) in done]
    bar = tqdm(todo, desc="runs", unit="run", disable=not progress)
    for seed, shots, m in bar:
        bar.set_postfix(seed=seed, shots=shots, method=m, refresh=True)
        model = build_classifier(args.backbone, len(source.classes), class_names=source.class_names,
                                 mode=args.mode, pretrained=pretrained, clip_model=models.clip_model,
                                 seed=seed, device=device,
                                 **({"clip_head": components["clip_head"]} if components["clip_head"] else {}),
                                 **({"bn_mode": components["bn_mode"]} if components["bn_mode"] else {}))
        spec = model.spec
        train_tf = train_transform(model, args.image_size, recipe=components["recipe"])
        folder_idx = [data.train_indices[i] for i in fewshot[(seed, shots)]]
        plan = plans.get((seed, shots, m))
        if plan is None:  # real images only
            train_set = Subset(ImageFolder(str(data.train_root), transform=train_tf), folder_idx)
        else:
            train_set = SyntheticAugmentedDataset(Subset(train_folder, folder_idx), plan,
                                                  caches.get((seed, shots, m), caches.get(METHODS[m].generator)),
                                                  p=args.p, transform=train_tf,
                                                  on_miss="error", seed=seed)
        tf_key = (spec.mean, spec.std, spec.input_size, spec.interpolation, spec.crop_pct, args.image_size, seed)
        if tf_key not in test_sets:
            folder = ImageFolder(str(data.test_root),
                                 transform=eval_transform(model, args.image_size, recipe=components["recipe"]))
            eval_idx = data.eval_indices(seed)
            test_sets[tf_key] = folder if eval_idx is None else Subset(folder, eval_idx)
        eval_set = test_sets[tf_key]
        draws = components["eval_draws"]
        eval_seconds = 0.0

        def test_metrics(epoch: int) -> dict:
            nonlocal eval_seconds
            t_eval = time.perf_counter()
            items = eval_set if not draws else Subset(eval_set, evaluation_draws(len(eval_set), draws, seed, epoch))
            with torch.random.fork_rng(devices=[]):  # evaluating must not change the training draws
                result = evaluate(model, items, batch_size=args.eval_batch_size,
                                  num_workers=num_workers, device=device, autocast_dtype=args.autocast,
                                  progress=False)
            eval_seconds += time.perf_counter() - t_eval
            if result["n"] != len(items):
                raise InputError(f"evaluated {result['n']} test images, expected {len(items)}")
            if draws:  # the reference's mean: over every class, a class never drawn counting 0
                result["mean_per_class"] = sum(a or 0.0 for a in result["per_class"]) / len(result["per_class"])
            return result

        epoch_metrics: list[dict] = []
        on_epoch_end = ((lambda record: epoch_metrics.append(test_metrics(record["epoch"])))
                        if args.protocol == "reference" else None)
        t0 = time.perf_counter()
        history = train_classifier(model, train_set, TrainConfig(**{**train_config.to_dict(), "seed": seed}),
                                   progress=progress, on_epoch_end=on_epoch_end)
        train_seconds = time.perf_counter() - t0 - eval_seconds
        timing["train"] += train_seconds

        protocol_fields: dict[str, Any] = {"protocol": args.protocol}
        if args.protocol == "honest":
            metrics = test_metrics(args.epochs - 1)
        else:  # the run's own best epoch; summarize() picks the epoch of the seed-averaged curve
            curve = [e["mean_per_class"] for e in epoch_metrics]
            run_best = best_epoch(curve)
            metrics = epoch_metrics[run_best]
            protocol_fields.update(best_epoch=run_best, epoch_mean_per_class=curve,
                                   epoch_top1=[e["top1"] for e in epoch_metrics])
        timing["evaluate"] += eval_seconds
        row = {
            "run_key": run_key(seed, shots, m), "dataset": data.name, "backbone": args.backbone, "mode": args.mode,
            "method": m, "label": METHODS[m].label, "shots": shots, "seed": seed, **protocol_fields,
            **components, "eval_pool": len(eval_set),
            "top1": metrics["top1"], "mean_per_class": metrics["mean_per_class"], "n_test": metrics["n"],
            "per_class": metrics["per_class"], "per_class_n": metrics["per_class_n"],
            "n_train_real": len(folder_idx), "n_synthetic": len(plan) if plan is not None else 0,
            "p": args.p if plan is not None else 0.0,
            "plan": None if plan is None else {
                "folder": f"plans/seed{seed}-{shots}shot-{m}", "mean_score": plan.summary["mean_score"],
                "low_share": plan.summary["low_share"], "lambda": plan.summary["lambda"],
            },
            "classifier": {"weights": spec.weights, "optimizer": train_config.optimizer or spec.optimizer,
                           "lr": train_config.lr or spec.lr, "image_size": args.image_size or spec.input_size},
            "final_epoch": history[-1], "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        }
        with runs_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        rows.append(row)
        _log(f"seed {seed}, {shots}-shot, {m}: top-1 {row['top1']:.4f}, mean per-class "
             f"{row['mean_per_class']:.4f} (n = {row['n_test']}, {train_seconds:.0f} s training)")
        timing["total"] = time.perf_counter() - started
        write_outputs(out, rows, meta, args.shots)
        del model, train_set
    bar.close()

    timing["total"] = time.perf_counter() - started
    paths = write_outputs(out, rows, meta, args.shots)
    print(paths["table"].read_text(encoding="utf-8"))
    print(f"results: {paths['json']}, {paths['csv']}, {paths['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
