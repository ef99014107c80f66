"""``dalda-aug filter`` and ``dalda-aug train-filter`` (:mod:`dalda_aug.filters`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_command, add_data_argument, launched_processes, refuse_taken_plan_folder

__all__ = ["register"]


def _run_filter(args: argparse.Namespace) -> int:
    from ..cache import SyntheticCache, open_cache_dir
    from ..config import load_models_arg
    from ..errors import InputError
    from ..filters import filter_plan, make_filter
    from ..plan import AugmentationPlan

    filters = [make_filter(spec) for spec in args.by]  # a bad --by is said before anything loads
    out = Path(args.out)
    refuse_taken_plan_folder(out, args.overwrite)
    plan = AugmentationPlan.load(args.plan)
    open_cache_dir(args.cache)
    cache = SyntheticCache(args.cache)
    cache = cache.with_spec(cache.resolve_spec(plan))
    models = load_models_arg(args.models) if args.models is not None else None
    processes = launched_processes(args.device)  # accelerate launch / torchrun: the chunks are shared
    report = filter_plan(plan, cache, filters, out, keep=args.keep, min_pass=args.min_pass, fill=args.fill,
                         device=args.device, models=models, overwrite=args.overwrite, progress=not args.quiet,
                         chunk=args.chunk, processes=processes)
    if processes is not None and not processes.is_main_process:
        return 0  # the main process prints what they made together
    print(report.format_table())
    t = report.totals
    resumed = f", {report.resumed} scores resumed from an interrupted run" if report.resumed else ""
    print(f"kept {t['kept']} of {t['candidates']} variants ({t['passed']} passed {' + '.join(args.by)}{resumed}); "
          f"{t['sources_short']} of {t['sources']} sources kept fewer than {args.keep} (shortfall {t['shortfall']}), "
          f"{t['sources_without_variants']} kept none (served real)"
          + (f"; {t['kept_failing']} failing variants kept to reach --min-pass" if t["kept_failing"] else "")
          + f" -> {out} (table in {out / 'filter.json'})")
    return 0


def _run_train_filter(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..filters.classifier import save_filter_classifier, train_filter_classifier

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out} already exists; pass --overwrite to replace it")
    from ..data import ImageSource

    ImageSource.from_folder(args.data)  # a missing or empty folder is said before a model loads
    model, info = train_filter_classifier(args.data, shots=args.shots, seed=args.seed, backbone=args.backbone,
                                          image_size=args.image_size, epochs=args.epochs,
                                          iterations_per_epoch=args.iterations or None, batch_size=args.batch_size, lr=args.lr,
                                          device=args.device, progress=not args.quiet)
    save_filter_classifier(model, out, info)
    print(f"trained a {args.backbone} classifier on {info['images']} real images of {len(info['classes'])} classes "
          f"(train top-1 {info['final_train_top1']:.3f}) -> {out} (safetensors); use it with --by classifier:{out}")
    if args.verbose:
        print(json.dumps(info, indent=2))
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from ..filters.base import filter_names

    p = add_command(subparsers, "filter", _run_filter,
                    help="judge a warmed plan's images and write a derived plan of the best variants per source",
                    description="Score every variant of a warmed plan from the cache with one or more filters (all "
                                "must pass, the first ranks), keep at most --keep per source, and write OUT as a plan "
                                "folder (same variants, same cache entries) plus OUT/filter.json. Not part of DALDA's "
                                f"method. Filters: {', '.join(filter_names())}.")
    p.add_argument("--plan", required=True, help="plan folder (dalda-aug plan), warmed")
    p.add_argument("--cache", required=True, help="cache folder holding the plan's images (dalda-aug warm)")
    p.add_argument("--by", action="append", required=True, metavar="SPEC",
                   help="clip-class[:THRESHOLD] | clip-source:LOW,HIGH | classifier:PATH[:THRESHOLD]; repeat to "
                        "compose (all must pass; the first ranks)")
    p.add_argument("--keep", type=int, required=True, help="variants kept per source, at most")
    p.add_argument("--min-pass", type=int, default=0,
                   help="variants kept per source, at least: topped up with the best failing ones (default 0: a "
                        "source whose variants all fail is served real)")
    p.add_argument("--fill", choices=("none", "best"), default="none",
                   help="best: top every source up to --keep with its best failing variants (= --min-pass KEEP); "
                        "none (default): keep passing variants only")
    p.add_argument("--out", required=True, help="derived plan folder")
    p.add_argument("--models", default=None, help="models JSON naming the CLIP model of the clip filters "
                   "(default: the plan's)")
    p.add_argument("--device", default="cpu", help="torch device for the filters' models (default cpu)")
    p.add_argument("--chunk", type=int, default=64,
                   help="variants scored and recorded at a time (a killed run resumes after its last chunk)")
    p.add_argument("--overwrite", action="store_true", help="replace a plan already in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add_command(subparsers, "train-filter", _run_train_filter,
                    help="train the classifier of --by classifier:PATH on the real images only",
                    description="Train a classifier on the real images of --data (its --shots subset with --seed, the "
                                "one `plan --shots N --seed S` plans for) with the few-shot benchmark's honest recipe "
                                "(linear probe, last epoch) and save it as one safetensors file.")
    add_data_argument(p)
    p.add_argument("--shots", type=int, default=None, help="images per class (seeded split); default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", choices=("efficientnet_lite0", "resnet50"), default="efficientnet_lite0")
    p.add_argument("--out", required=True, help="classifier file (safetensors, whatever its extension)")
    p.add_argument("--epochs", type=int, default=50, help="epochs (default 50, the paper's)")
    p.add_argument("--iterations", type=int, default=200,
                   help="batches per epoch, drawn with replacement (default 200; 0: one pass over the images)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the backbone's, 1e-4 for Adam)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the backbone's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
