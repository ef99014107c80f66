#!/usr/bin/env python
"""The paper's few-shot table in one command: real-only, Real Guidance and the DALDA variants.

For every seed and n-shot setting, each method gets the same seeded few-shot subset of the
training images and its own augmentation plan; all plans share one synthetic-image cache. Per
(seed, shots, method) the pipeline is:

1. **score** — CLIPScore of every few-shot image, computed once and reused by every method;
2. **plan** — ``build_plan`` with the method's prompts and λ scaling (saved under ``OUT/plans``);
3. **warm** — generate what the cache lacks (``dalda_aug.cache.warm.warm``);
4. **train** — a fresh classifier on ``SyntheticAugmentedDataset(few-shot images, plan, cache, p)``
   (real-only: the few-shot images alone), the reference code's recipe unless overridden;
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
   (CLIP), ``eval_draws`` (0 = every item once) and ``eval_split``, and the settings ``ags_mode``,
   ``class_names`` and ``pool``; ``table.md`` calls a result the reference code's metric only
   when every component and setting is the reference's, and otherwise names those that differ.
   The draw and the halves are the reference's own only on the pools the reference permutes, in
   its file order (``examples/prepare_datasets.py --split reference``).

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

Filtering (``--filter SPEC [--filter SPEC] --oversample K``; not part of the paper's method): every
generating method gets a filtered twin, ``METHOD+filter``, at the same synthetic budget: its plan
has K x ``--variants`` candidates per source (``plans/...-METHOD+filter-candidates``), all are
generated, and ``dalda-aug filter --by SPEC --keep M`` keeps the best M per source
(``plans/...-METHOD+filter``, a derived plan). The twin's rows record the filters' fingerprints,
the pass rate and the images generated (``filter``); ``results.json`` (``filter_significance``) and
``table.md`` compare each method with its twin (paired t-test over seeds, per shots).

The benchmark itself is the library package :mod:`dalda_aug.fewshot` (methods, data, protocol,
settings, run, report); this script is its command line, and re-exports the package's names
(``METHODS``, ``render_table``, ``reference_few_shot_indices``...) for the scripts and tests that
import them from here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import dalda_aug.cache
from dalda_aug.classify import BACKBONES, BN_MODES, CLIP_HEADS, MODES, RECIPES
from dalda_aug.fewshot import (BN_BACKBONES, COMPONENT_TEXT, COMPONENTS, CSV_COLUMNS, DEFAULT_METHODS,  # noqa: F401
                               EVAL_SPLITS, FORMAT, METHODS, PAIRED_TEST, PAIRING, PAPER_1SHOT, PROTOCOL_TEXT,
                               PROTOCOLS, REFERENCE_EVAL_DRAWS, SIGNIFICANCE_BASELINE_ORDER, Data, Method, best_epoch,
                               combine, differing_components, evaluation_draws, load_data, paired_tests,
                               reference_class_order, reference_few_shot_indices, reference_halves, render_table,
                               resolve_components, resolve_methods, run, split_per_class, summarize, write_outputs,
                               write_prompts)
from dalda_aug.prompts.presets import PRESETS
from dalda_aug.prompts import INSTRUCTIONS


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
        prog="fewshot.py", allow_abbrev=False,
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
    meth.add_argument("--preset", choices=tuple(PRESETS), default=None,
                      help="one of the paper's datasets: names it for the paper's numbers and, with --llm, gives "
                           "the LLM its Table 5 description (and Caltech-101's reference class names)")
    meth.add_argument("--llm", default=None, metavar="BACKEND",
                      help="write the prompt bank OUT/prompts.json with this backend (openai:MODEL, hf:MODEL, "
                           "as `dalda-aug prompts --llm`) when LLM methods run without --prompts")
    meth.add_argument("--instruction", choices=INSTRUCTIONS, default="default",
                      help="wording of the --llm request (see docs/prompts.md)")
    meth.add_argument("--base-url", default=None,
                      help="API root of an --llm openai:MODEL endpoint (default https://api.openai.com/v1)")
    meth.add_argument("--variants", "-M", type=int, default=10, help="synthetic images per real image")
    meth.add_argument("--p", type=float, default=0.5, help="probability that a training item is synthetic")
    meth.add_argument("--fixed-lambda", type=float, default=0.5, help="λ of the fixed-scaling methods")
    meth.add_argument("--ags-mode", choices=("truncnorm", "clip"), default="truncnorm",
                      help="AGS sampler: the paper's truncated normal or the reference code's clipped normal")
    meth.add_argument("--models", type=Path, default=None,
                      help="models JSON (ModelConfig) or a folder holding models.json (`dalda-aug make-tiny-models "
                           "tiny`, then --models tiny); its recorded defaults (\"defaults\": \"fewshot\") fill "
                           "--size, --steps, --img2img-steps, --ti-steps and --backbone when not given; default: "
                           "the paper's hub models")
    meth.add_argument("--cache", type=Path, default=None, help="synthetic image cache folder (default OUT/cache)")
    meth.add_argument("--cache-format", choices=dalda_aug.cache.image_formats(),
                      default=dalda_aug.cache.DEFAULT_IMAGE_FORMAT,
                      help="encoding of new cache entries, one of the cache's image formats, with its option as "
                           "NAME:OPTION (jpeg:90, webp:95; `dalda-aug warm "
                           "--help` describes them); lz4 and raw decode faster than png, which matters when data "
                           "loading limits training")

    gen = p.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=None,
                     help="denoising steps (default 30, or the --models file's: 2 for the tiny models)")
    gen.add_argument("--size", type=int, default=None,
                     help="generated image height and width (default 512, or the --models file's: 64 for the "
                          "tiny models)")
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance weight")
    gen.add_argument("--img2img-steps", type=int, default=None,
                     help="denoising steps of the img2img baselines (Real Guidance, DA-Fusion); default 50, "
                          "diffusers' default with which DA-Fusion's implementation ran them (or the --models "
                          "file's: 2 for the tiny models)")
    gen.add_argument("--ti-steps", type=int, default=None,
                     help="textual-inversion steps per class for da_fusion (default 1000, DA-Fusion's, or the "
                          "--models file's: 10 for the tiny models)")
    gen.add_argument("--dtype", default=None, help="generation dtype (default float16 on CUDA, else float32)")
    gen.add_argument("--device", default=None, help="torch device for everything (default cuda if available)")
    gen.add_argument("--gen-batch-size", type=int, default=None,
                     help="images per generator call (default: warm()'s automatic choice)")

    clf = p.add_argument_group("classifier and training (defaults: the reference code's)")
    clf.add_argument("--backbone", choices=BACKBONES, default=None,
                     help="default resnet50 (ImageNet weights from the hub), or the --models file's: "
                          "efficientnet_lite0 for the tiny models (its weights ship with a package: offline)")
    clf.add_argument("--clip-head", choices=CLIP_HEADS, default=None,
                     help="CLIP head: normalized (unit features, logit-scaled text head; default under --protocol "
                          "honest) or reference (the reference code's raw features and raw text-feature head; "
                          "default under --protocol reference)")
    clf.add_argument("--recipe", choices=RECIPES, default=None,
                     help="classifier transforms: default (RandomResizedCrop + flip, the backbone's mean/std; eval "
                          "Resize + CenterCrop; --protocol honest's default) or reference (Resize((s, s)) + flip + "
                          "RandomRotation(15), mean/std 0.5; eval Resize((s, s)); --protocol reference's default)")
    clf.add_argument("--bn-mode", choices=BN_MODES, default=None,
                     help="BatchNorm of a linear probe's frozen ResNet50/EfficientNet backbone: frozen (eval mode; "
                          "--protocol honest's default) or train (train mode, running statistics update, as the "
                          "reference's model.train(); --protocol reference's default)")
    clf.add_argument("--mode", choices=MODES, default="linear",
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
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's, or the --models file's: 1 for the tiny models)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    # Filtering (issue 31): not part of the paper's method; off unless --filter is given.
    flt = p.add_argument_group("filtering (optional; not the paper's method)")
    flt.add_argument("--filter", action="append", default=None, metavar="SPEC",
                     help="add a filtered twin of every generating method (row METHOD+filter): its plan has "
                          "--oversample x --variants candidates per source, `dalda-aug filter --by SPEC` keeps the best "
                          "--variants (same synthetic budget); repeat to compose (all must pass, the first ranks); "
                          "e.g. clip-class, clip-source:0.6,0.95, classifier:clf.pt")
    flt.add_argument("--oversample", type=int, default=2,
                     help="candidates generated per kept variant for the filtered twins (K; generation costs K x)")
    return p


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


if __name__ == "__main__":
    sys.exit(main())
