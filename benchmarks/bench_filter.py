#!/usr/bin/env python
"""What ``dalda-aug filter`` catches, on a planted set of real photos (issue 31).

The diffusion and CLIP weights are out of reach offline, so the generated images are planted:
real folders of crops of scikit-image's photos (``--classes`` of astronaut, cat, coffee, rocket,
motorcycle; ``--shots`` training crops and ``--test`` test crops per class), a plan of ``--variants``
per source (tiny models; λ and prompts do not matter here), and a real cache holding, under the
plan's keys, an **on-class** variant (a new crop of the source class's photo) or an **off-class**
one (a crop of another class's photo) for exactly ``round(rate x variants)`` seeded variants of
each source, for every ``--rates``.

Per rate and filter (``classifier:`` trained on the real crops with ``train-filter``'s recipe,
shortened by ``--epochs``/``--iterations``/``--lr``; ``clip-class`` on the tiny random CLIP, for
its mechanics only: its figures say nothing about CLIP) it reports:

* precision and recall of *rejecting off-class* (positive: an off-class variant; predicted: rejected);
* the share of off-class images among the synthetic images training would draw
  (``SyntheticAugmentedDataset``: uniform over a source's variants), without a filter (the plan)
  and with it (the derived plan, ``--keep`` per source);
* top-1 on the test crops of an EfficientNet-Lite0 linear probe trained with p = 0.5 on the
  unfiltered plan and on the classifier-filtered one (``--no-fewshot`` skips it);
* the rate of ``clip-class`` scoring (``filter_plan``, everything included) against a plain batched
  open_clip loop over the same cached images (decode, preprocess, encode, softmax), model loading
  outside both.

    python benchmarks/bench_filter.py --json filter.json                 # CPU, a few minutes
    python benchmarks/bench_filter.py --rates 0.5 --no-fewshot --epochs 1 --iterations 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
NAMES = {"chelsea": "cat", "stereo_motorcycle": "motorcycle"}


def photos(classes: int) -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in PHOTOS[:classes]:
        array = getattr(data, name)()
        out[NAMES.get(name, name)] = np.asarray(array[0] if isinstance(array, tuple) else array)
    return out


def crop(array: np.ndarray, seed: int, size: int = 64) -> Image.Image:
    """A seeded crop of 60 % of the photo's sides, resized to ``size`` pixels."""
    img = Image.fromarray(array).convert("RGB")
    w, h = img.size
    rng = np.random.default_rng(seed)
    cw, ch = int(w * 0.6), int(h * 0.6)
    x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
    return img.crop((x, y, x + cw, y + ch)).resize((size, size))


def write_split(root: Path, arrays: dict[str, np.ndarray], per_class: int, offset: int) -> Path:
    for name, array in arrays.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            crop(array, offset + i).save(root / name / f"{i}.png")
    return root


def plant(plan: Any, cache: Any, arrays: dict[str, np.ndarray], rate: float, seed: int) -> dict[str, bool]:
    """Put an image under every variant's key; ``{key: off-class}``."""
    names = list(arrays)
    rng = np.random.default_rng(seed)
    off_of: dict[str, bool] = {}
    cols = plan.columns
    for s in range(cols.n_sources):
        rows = [int(r) for r in cols.rows_of(s)]
        off_rows = set(rng.choice(rows, size=int(round(rate * len(rows))), replace=False).tolist())
        for r in rows:
            v = plan[r]
            off = r in off_rows
            other = names[(v.label + 1 + int(rng.integers(0, len(names) - 1))) % len(names)]
            cache.put(v, crop(arrays[other if off else v.class_name], 10_000 + 37 * r + int(1000 * rate)))
            off_of[cache.key(v)] = off
    cache.record_spec(plan)
    return off_of


def off_share(plan: Any, cache: Any, off_of: dict[str, bool]) -> float:
    """The expected share of off-class images among synthetic draws (uniform per source)."""
    shares = [np.mean([off_of[cache.key(v)] for v in vs]) for vs in plan.by_source().values() if vs]
    return float(np.mean(shares)) if shares else 0.0


def few_shot_top1(train: Path, test: Path, plan: Any, cache: Any, args: argparse.Namespace) -> float:
    from torchvision.datasets import ImageFolder

    from dalda_aug.classify import TrainConfig, build_classifier, eval_transform, evaluate, train_classifier, \
        train_transform
    from dalda_aug.dataset import SyntheticAugmentedDataset

    base = ImageFolder(str(train))
    model = build_classifier("efficientnet_lite0", len(base.classes), class_names=base.classes, seed=args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a filtered source served real is expected here
            ds = SyntheticAugmentedDataset(base, plan, cache, p=0.5, on_miss="error", seed=args.seed,
                                           transform=train_transform(model, args.image_size))
    config = TrainConfig(epochs=args.epochs, iterations_per_epoch=args.iterations, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed)
    train_classifier(model, ds, config, progress=False)
    result = evaluate(model, ImageFolder(str(test), eval_transform(model, args.image_size)), progress=False)
    return float(result["top1"])


def plain_clip_loop(models: Any, keys: list[str], cache: Any, class_names: list[str], labels: np.ndarray) -> Any:
    """Decode, preprocess, encode and softmax over the cached images, batches of 16: nothing else."""
    from dalda_aug.plan.clipscore import load_open_clip

    model, preprocess, tokenizer = load_open_clip(models.clip_model, models.clip_pretrained)
    with torch.inference_mode():
        text = model.encode_text(tokenizer([f"a photo of a {c}" for c in class_names])).float()
    text = text / text.norm(dim=-1, keepdim=True)

    def run() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(keys), 16):
                x = torch.stack([preprocess(cache.get_image(k)) for k in keys[start : start + 16]])
                f = model.encode_image(x).float()
                f = f / f.norm(dim=-1, keepdim=True)
                out.append((100 * f @ text.T).softmax(dim=-1).numpy())
        probs = np.concatenate(out)
        return probs[np.arange(len(keys)), labels]

    return run


def clip_rate(root: Path, arrays: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """``clip-class`` through :func:`filter_plan` against :func:`plain_clip_loop` on the same cached
    images (``--rate-images``: sources x 8 variants), model loading outside both timings."""
    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.config import ModelConfig
    from dalda_aug.filters import FilterContext, filter_plan, make_filter, read_filter_record
    from dalda_aug.generators import IPAdapterConfig
    from dalda_aug.plan import AugmentationPlan, build_plan
    from dalda_aug.tiny_models import make_tiny_models

    per_class = max(1, args.rate_images // (8 * len(arrays)))
    data = write_split(root / "data", arrays, per_class, 2000)
    models = make_tiny_models(root / "models") if args.models == "tiny" else ModelConfig.load(args.models)
    build_plan(data, variants=8, scores=[0.5] * (per_class * len(arrays)), models=models).save(root / "P")
    plan = AugmentationPlan.load(root / "P")
    spec = GenerationSpec(models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(root / "C", spec)
    for r, v in enumerate(plan):
        cache.put(v, crop(arrays[v.class_name], 50_000 + r, size=args.rate_size))
    cache.record_spec(plan)
    keys = [cache.key(v) for v in plan]
    labels = np.asarray(plan.columns.arrays["label"], dtype=np.int64)
    plain = plain_clip_loop(models, keys, cache, plan.class_names, labels)
    flt = make_filter("clip-class")
    flt.load(FilterContext(tuple(plan.class_names), tuple(plan.config["classes"]), models))
    plain_s, filter_s = [], []
    plain_scores = plain()  # warm-up of both (first forward passes, page cache)
    filter_plan(plan, cache, [flt], root / "warm-up", keep=args.keep)
    for k in range(args.repeats):  # alternating; the fastest of each is reported
        t0 = time.perf_counter()
        plain_scores = plain()
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        filter_plan(plan, cache, [flt], root / f"P-{k}", keep=args.keep)
        filter_s.append(time.perf_counter() - t0)
    record = read_filter_record(root / "P-0")
    assert record is not None
    return {"clip_model": models.clip_model if args.models != "tiny" else "tiny random CLIP", "images": len(keys),
            "image_size": args.rate_size, "plain_s": round(min(plain_s), 3), "filter_s": round(min(filter_s), 3),
            "ratio": round(min(filter_s) / min(plain_s), 3),
            "max_score_diff": float(np.abs(record.scores[:, 0] - plain_scores).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0,0.25,0.5", help="off-class shares planted (default 0,0.25,0.5)")
    parser.add_argument("--classes", type=int, default=4, help=f"classes, at most {len(PHOTOS)} (default 4)")
    parser.add_argument("--shots", type=int, default=2, help="real training crops per class (default 2)")
    parser.add_argument("--test", type=int, default=10, help="test crops per class (default 10)")
    parser.add_argument("--variants", type=int, default=4, help="variants planned per source (default 4)")
    parser.add_argument("--keep", type=int, default=2, help="variants kept per source (default 2)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=8, help="batches per epoch (default 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="linear-probe learning rate (default 3e-3)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-fewshot", action="store_true", help="skip the few-shot trainings")
    parser.add_argument("--rate-images", type=int, default=1024, help="cached images of the rate measurement")
    parser.add_argument("--rate-size", type=int, default=256, help="their side in pixels (default 256)")
    parser.add_argument("--models", default="tiny", help="models JSON for the rate measurement (default: tiny)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the rate measurement (default 2)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.filters import filter_plan, read_filter_record, save_filter_classifier, train_filter_classifier
    from dalda_aug.generators import IPAdapterConfig
    from dalda_aug.plan import AugmentationPlan, build_plan
    from dalda_aug.tiny_models import make_tiny_models

    rates = [float(r) for r in args.rates.split(",")]
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "torch_threads": torch.get_num_threads(), "rates": []}
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        root = Path(tmp)
        arrays = photos(args.classes)
        train = write_split(root / "train", arrays, args.shots, 0)
        test = write_split(root / "test", arrays, args.test, 500)
        models = make_tiny_models(root / "models")
        n_sources = args.classes * args.shots
        build_plan(train, variants=args.variants, scores=[0.5] * n_sources, models=models).save(root / "P")
        plan = AugmentationPlan.load(root / "P")
        spec = GenerationSpec(models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
        t0 = time.perf_counter()
        clf, info = train_filter_classifier(train, epochs=args.epochs, iterations_per_epoch=args.iterations,
                                            batch_size=args.batch_size, image_size=args.image_size, lr=args.lr,
                                            seed=args.seed)
        save_filter_classifier(clf, root / "clf.pt", info)
        results["train_filter_s"] = round(time.perf_counter() - t0, 2)
        for rate in rates:
            cache = SyntheticCache(root / f"C-{rate}", spec)
            off_of = plant(plan, cache, arrays, rate, args.seed)
            off = np.array([off_of[cache.key(v)] for v in plan])
            row: dict[str, Any] = {"rate": rate, "variants": len(plan), "off_class": int(off.sum()),
                                   "off_share_without": round(off_share(plan, cache, off_of), 4)}
            for name, by in (("classifier", f"classifier:{root / 'clf.pt'}"), ("clip-class", "clip-class")):
                out = root / f"P-{rate}-{name}"
                t0 = time.perf_counter()
                filter_plan(root / "P", cache, [by], out, keep=args.keep)
                seconds = time.perf_counter() - t0
                record = read_filter_record(out)
                assert record is not None
                rejected = ~record.passed.all(axis=1)
                hits = int((rejected & off).sum())
                derived = AugmentationPlan.load(out)
                row[name] = {
                    "pass_rate": round(float((~rejected).mean()), 4),
                    "precision": round(hits / int(rejected.sum()), 4) if rejected.any() else None,
                    "recall": round(hits / int(off.sum()), 4) if off.any() else None,
                    "off_share_with": round(off_share(derived, cache, off_of), 4),
                    "sources_without_variants": len(derived.sources_without_variants()),
                    "seconds": round(seconds, 2),
                }
            if not args.no_fewshot:
                row["top1_without"] = round(few_shot_top1(train, test, plan, cache, args), 4)
                row["top1_with_classifier"] = round(
                    few_shot_top1(train, test, AugmentationPlan.load(root / f"P-{rate}-classifier"), cache, args), 4)
            results["rates"].append(row)
            c, k = row["classifier"], row["clip-class"]
            print(f"off-class {rate:.0%}: classifier precision {c['precision']} recall {c['recall']} pass "
                  f"{c['pass_rate']:.0%}, off-class seen {row['off_share_without']:.0%} -> {c['off_share_with']:.0%}; "
                  f"clip-class (tiny) pass {k['pass_rate']:.0%}"
                  + ("" if args.no_fewshot else f"; top-1 {row['top1_without']:.3f} -> {row['top1_with_classifier']:.3f}"),
                  flush=True)

        results["clip_rate"] = clip_rate(root / "rate", arrays, args)
        r = results["clip_rate"]
        print(f"clip-class scoring ({r['clip_model']}): filter {r['filter_s']:.2f} s against a plain open_clip loop "
              f"{r['plain_s']:.2f} s over {r['images']} cached images: ratio {r['ratio']:.2f} (goal <= 1.5)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
