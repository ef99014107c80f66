"""``dalda-aug metrics`` and ``dalda-aug inspect``: measure and look at what a plan produced.

Both read a plan and a cache. The generation options (``--models``, ``--steps``, ``--size``,
...) decide the cache keys; without them the spec ``warm`` recorded in the cache folder is used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ._common import add_command
from .cache import add_data_root_argument, add_spec_arguments, cache_for_plan, check_device, check_output_file
from .._io import write_atomic
from ..errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from ..cache import SyntheticCache
    from ..plan import AugmentationPlan

__all__ = ["register"]


def _open(args: argparse.Namespace) -> tuple[AugmentationPlan, SyntheticCache]:
    from ..plan import AugmentationPlan

    plan = AugmentationPlan.load(args.plan)
    if args.data_root is not None:
        from ..cache.warm import rebase_plan

        plan = rebase_plan(plan, args.data_root)
    return plan, cache_for_plan(args, plan)


def _source_loader(plan: AugmentationPlan) -> Callable[[str], Image.Image]:
    from ..plan.sources import SourceImages

    if not plan.data_root:
        raise InputError("the plan has no data_root (it was built from an in-memory dataset); "
                         "use dalda_aug.metrics.diversity_metrics from Python instead")
    root = Path(plan.data_root)
    if not root.is_dir():
        from ..errors import MissingFileError

        raise MissingFileError(f"the plan's image folder {root} is missing; if the images moved, give their new "
                               "folder with --data-root DIR (each source is checked there by its content hash)")
    return SourceImages(plan, verify=False).load


# -- metrics ---------------------------------------------------------------------------------
def _run_metrics(args: argparse.Namespace) -> int:
    from ..plan.clipscore import CLIPScorer
    from ..metrics import EmbeddingStore, diversity_metrics, load_lpips

    if args.out:
        check_output_file(args.out)  # before any metric is computed
    check_device(args.device)
    if not args.no_lpips and not args.lpips_random:  # before anything is read: one line with the ways out
        from ..errors import ModelLoadError
        from ..metrics import ALEXNET_WEIGHTS, alexnet_weights_path

        if not alexnet_weights_path().is_file():
            raise ModelLoadError(
                f"LPIPS needs torchvision's AlexNet ImageNet weights at {alexnet_weights_path()} (set TORCH_HOME to "
                f"move it; download {ALEXNET_WEIGHTS} from download.pytorch.org on a machine with internet access); "
                "or pass --no-lpips to skip LPIPS, or --lpips-random for uncalibrated random-network figures")
    plan, cache = _open(args)
    load_source = _source_loader(plan)
    variants: dict[str, list[Image.Image]] = {}
    sources: dict[str, Image.Image] = {}
    labels: dict[str, int] = {}
    missing = 0
    for source, vs in plan.by_source().items():
        images: list[Image.Image] = []
        for v in vs:
            entry = cache.get(v)
            if entry is None:
                missing += 1
            else:
                images.append(entry.image)
        if images:
            variants[source], sources[source], labels[source] = images, load_source(source), vs[0].label
    if not variants:
        raise InputError(f"none of the plan's images are in the cache {args.cache}; run `dalda-aug warm` first")
    assert cache.spec is not None  # cache_for_plan binds one
    from ..hub import require_hub_models

    require_hub_models(cache.spec.models, ("clip_model", "clip_pretrained"))  # one line in seconds without the hub
    scorer = CLIPScorer.from_models(cache.spec.models, device=args.device)
    store = EmbeddingStore(scorer, Path(args.cache) / "embeddings")
    lpips_net = None if args.no_lpips else load_lpips(args.device, random_backbone=args.lpips_random)
    report = diversity_metrics(variants, sources, labels, plan.class_names, scorer, lpips_net=lpips_net,
                               embeddings=store, progress=True)
    report["missing_images"] = missing
    # Which network the LPIPS figures come from: "alexnet" (calibrated), "random" (an uncalibrated
    # random trunk: not comparable with published LPIPS), or None (--no-lpips).
    report["lpips_backbone"] = None if args.no_lpips else ("random" if args.lpips_random else "alexnet")
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        try:
            write_atomic(args.out, text + "\n")
        except OSError as exc:
            raise InputError(f"cannot write the report {args.out}: {exc.strerror or exc}") from None
    o = report["overall"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    print(f"{o['n_images']} images of {o['n_sources']} sources ({missing} not cached): "
          f"CLIP-I within source {fmt(o['clip_i_within_source'])}, within class {fmt(o['clip_i_within_class'])}; "
          f"LPIPS{' (random network: uncalibrated)' if args.lpips_random and not args.no_lpips else ''} within "
          f"source {fmt(o['lpips_within_source'])}, within class {fmt(o['lpips_within_class'])}; "
          f"fidelity CLIP-I {fmt(o['fidelity_clip_i'])}, zero-shot accuracy {fmt(o['zero_shot_acc'])}")
    if args.out:
        print(f"per-class and per-source figures: {args.out}")
    return 0


# -- inspect ---------------------------------------------------------------------------------
def _run_inspect(args: argparse.Namespace) -> int:
    from ..plan import AugmentationPlan
    from ..viz import plan_contact_sheet, plot_lambda_distribution, plot_score_histogram

    out = Path(args.out)
    plans: dict[str, AugmentationPlan] = {}
    for item in [args.plan, *args.also]:
        name, _, path = item.rpartition("=")
        plans[name or Path(path).name] = AugmentationPlan.load(path)
    classes = _resolve_classes(next(iter(plans.values())), args.classes)  # before anything is written
    if args.cache:
        args.plan = args.plan.rpartition("=")[2]
        sheet_plan, cache = _open(args)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_score_histogram(plans, out / "clipscore_histogram.png")]
    for name, plan in plans.items():
        suffix = "" if len(plans) == 1 else f"_{name}"
        written.append(plot_lambda_distribution(plan, out / f"lambda_distribution{suffix}.png"))
    if args.cache:
        plan = sheet_plan
        sheet = plan_contact_sheet(plan, cache, classes=classes, per_class=args.per_class, tile=args.tile)
        path = out / "contact_sheet.png"
        sheet.save(path)
        written.append(path)
        from ..filters.derive import read_filter_record

        record = read_filter_record(args.plan)  # a derived plan (dalda-aug filter): kept and rejected, side by side
        if record is not None:
            from ..viz import filter_contact_sheet

            path = out / "filter_sheet.png"
            filter_contact_sheet(record.parent_plan(), cache, record.kept, record.scores, record.passed,
                                 specs=record.specs, classes=classes, per_class=args.per_class or 2,
                                 tile=min(args.tile, 160)).save(path)
            written.append(path)
    for path in written:
        print(f"wrote {path}")
    return 0


def _resolve_classes(plan: AugmentationPlan, text: str | None) -> list[str] | None:
    """``--classes``: each name in the plan's readable form ("coffee cup") or its folder's
    ("coffee_cup"), as the plan's class names; an unknown one stops with one line."""
    from ..data import readable_class_name

    if not text:
        return None
    known = plan.class_names
    resolved: list[str] = []
    unknown: list[str] = []
    for name in (c.strip() for c in text.split(",") if c.strip()):
        match = name if name in known else readable_class_name(name)
        (resolved if match in known else unknown).append(match if match in known else name)
    if unknown or not resolved:
        raise InputError(f"--classes: unknown class name(s) {unknown}; the plan's classes are {sorted(known)} "
                         "(folder names such as coffee_cup work too)")
    return resolved


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = add_command(subparsers, "metrics", _run_metrics,
                    help="diversity (CLIP-I, LPIPS) and fidelity of the cached images of a plan",
                    description="CLIP-I (mean pairwise cosine of CLIP image embeddings; lower = more diverse) and "
                                "LPIPS (mean pairwise; higher = more diverse) within each source image's variants and "
                                "within each class, plus fidelity: CLIP-I to the source image and CLIP's zero-shot "
                                "accuracy. LPIPS needs torchvision's AlexNet weights in "
                                "$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth.")
    add_spec_arguments(p, plan_required=True, reading=True)
    add_data_root_argument(p)
    p.add_argument("--cache", required=True, help="cache folder")
    p.add_argument("--out", default=None, help="write the full report (per class, per source) as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--lpips-random", action="store_true",
                   help="random AlexNet trunk for LPIPS (testing only: uncalibrated distances)")

    p = add_command(subparsers, "inspect", _run_inspect,
                    help="plots: CLIPScore histogram, λ distribution, contact sheet of real images and their variants",
                    description="Write clipscore_histogram.png (α marked, as the paper's Figure 4), "
                                "lambda_distribution.png (Low and High sources) and, with --cache, contact_sheet.png "
                                "(each real image and its variants, labelled with λ and prompt); for a plan `dalda-aug "
                                "filter` derived, also filter_sheet.png (per source, the kept and the rejected variants "
                                "side by side, with their scores).")
    add_spec_arguments(p, plan_required=True, reading=True)
    add_data_root_argument(p)
    p.add_argument("--also", action="append", default=[], metavar="NAME=PLAN",
                   help="another dataset's plan for the histogram (repeatable); --plan may be NAME=DIR too")
    p.add_argument("--cache", default=None, help="cache folder (for the contact sheet)")
    p.add_argument("--classes", default=None, help="comma-separated class names for the contact sheet (default all)")
    p.add_argument("--per-class", type=int, default=1, help="source images per class on the contact sheet")
    p.add_argument("--tile", type=int, default=192, help="contact-sheet tile size in pixels")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
