#!/usr/bin/env python
"""What the library costs as the number of source images grows (issue 23 point 7).

For each count in ``--sources`` (default 2000,20000) this writes that many tiny images
(32x32 PNGs, each unique, in ``--classes`` class folders), then measures the library as it is
at run time against a baseline run in the same process, so each figure is a ratio or a
difference that a noisy machine does not move much:

* **plan**: :func:`dalda_aug.plan.build_plan` (M = ``--variants``) against the plain batched
  open_clip loop of ``bench_plan.py`` on the same images and model; images/s and the ratio
  (target: plan <= 2x the plain loop). ``--models tiny`` (default) builds tiny random models.
* **construction**: ``SyntheticAugmentedDataset(ImageFolder(root), plan folder, cache)`` over
  sources unchanged since the previous construction, against ``ImageFolder(root)`` (targets:
  <= 3x ImageFolder + 0.5 s; <= 2 s at 200,000 variants). The first construction is reported
  apart ("first").
* **pickle**: ``len(pickle.dumps(dataset)) - len(pickle.dumps(ImageFolder))`` per variant
  (target: <= 4 B per variant).
* **worker memory**: the private memory (``Private_Clean + Private_Dirty`` of
  ``/proc/<pid>/smaps_rollup``) of a spawned DataLoader worker after it served
  ``--mem-batches`` batches, minus the same for a worker serving the plain ImageFolder (which
  imports the same modules first, so that import costs cancel), per variant (target: <= 16 B).
* **epoch**: one epoch at p = 0.5 over ``--epoch-sources`` items whose variants are in a warm
  cache (32x32 stand-ins put with :meth:`SyntheticCache.put`, the size of the sources, so the
  ratio is the dataset's bookkeeping at this plan size, not a decoding cost), against
  ImageFolder on the same items; median of ``--epochs``.
* **no-op read**: bytes read through ``read()`` (``/proc/self/io`` rchar) by ``cache.stats()``
  and by a ``warm`` that finds everything cached, against the cache's bytes (target: < 1 %), on
  a cache of ``--noop-entries`` 512x512 photos. Pages SQLite maps (``mmap``) are not counted.

Once per run, **disk per format**: bytes per 512x512 image of the photos bundled with
scikit-image, encoded by :func:`dalda_aug.cache.encode_entry` in each format (lossless ones,
``jpeg``/``webp`` at quality 95).

Each measure is one function; ``--skip plan,construction,pickle,memory,epoch,noop,disk`` leaves
some out. ``--json OUT`` writes every figure.

    python benchmarks/bench_scale.py --sources 2000,20000 --variants 10 --json scale.json
    python benchmarks/bench_scale.py --sources 50 --skip plan --json smoke.json    # seconds
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dalda_aug.cache import IMAGE_FORMATS, GenerationSpec, SyntheticCache, encode_entry  # noqa: E402
from dalda_aug.config import ModelConfig  # noqa: E402
from dalda_aug.generators.ip_adapter import IPAdapterConfig  # noqa: E402
from dalda_aug.plan import AugmentationPlan, build_plan  # noqa: E402

MEASURES = ("plan", "construction", "pickle", "memory", "epoch", "noop", "disk")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
SIZE = 32  # pixels of a source image (and of a cached stand-in)


# -- data ---------------------------------------------------------------------------------------
def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        array = getattr(data, name)()
        array = array[0] if isinstance(array, tuple) else array
        out.append(np.asarray(Image.fromarray(array).convert("RGB")))
    return out


def write_sources(root: Path, n: int, classes: int, seed: int = 0) -> Path:
    """``n`` unique 32x32 PNGs under ``root/class_<k>/``: thumbnails of crops of the bundled photos,
    the index written into the first pixels so that no two have the same content hash."""
    rng = np.random.default_rng(seed)
    thumbs = []
    for photo in _photos():
        for _ in range(8):
            h, w = photo.shape[:2]
            s = int(min(h, w) * rng.uniform(0.3, 1.0))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = Image.fromarray(photo[y:y + s, x:x + s]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            thumbs.append(np.asarray(crop))
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = thumbs[i % len(thumbs)].copy()
        pixels[0, :3] = np.frombuffer(int(i).to_bytes(9, "big"), dtype=np.uint8).reshape(3, 3)
        Image.fromarray(pixels).save(root / f"class_{i % classes:03d}" / f"{i:07d}.png", compress_level=1)
    return root


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("inf")


# -- measures -----------------------------------------------------------------------------------
def measure_plan(root: Path, variants: int, models: ModelConfig, batch_size: int = 64) -> dict:
    """build_plan against bench_plan's plain batched open_clip loop, same model, same images."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_plan import plain_loop  # the baseline of bench_plan.py, not a copy

    from dalda_aug.plan.clipscore import CLIPScorer, load_open_clip
    from dalda_aug.data import ImageSource

    source = ImageSource.from_folder(root)
    model, preprocess, tokenizer = load_open_clip(models.clip_model, models.clip_pretrained, "cpu")
    with torch.inference_mode():
        text = model.encode_text(tokenizer([f"a photo of a {c}" for c in source.class_names])).float()
    text = text / text.norm(dim=-1, keepdim=True)
    scorer = CLIPScorer.from_models(models, device="cpu").load()
    scorer.text_features(source.class_names)
    started = time.perf_counter()
    plain_loop(model, preprocess, text, source, batch_size, "cpu")
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    plan = build_plan(source, variants=variants, seed=0, models=models, scorer=scorer, progress=False)
    plan_s = time.perf_counter() - started
    n = len(source)
    return {"sources": n, "variants": len(plan), "plain_s": round(plain_s, 3), "plan_s": round(plan_s, 3),
            "plain_images_per_s": round(n / plain_s, 1), "plan_images_per_s": round(n / plan_s, 1),
            "ratio": _ratio(plan_s, plain_s), "clip_model": models.clip_model}


def make_plan(root: Path, variants: int, out: Path) -> Path:
    """A plan with seeded scores (no CLIP), written by the library's own writer."""
    n = sum(1 for _ in root.glob("*/*.png"))
    scores = np.random.default_rng(1).uniform(0.0, 1.0, n)
    build_plan(root, variants=variants, seed=0, scores=scores, models=ModelConfig(), progress=False).save(out)
    return out


def _dataset(root: Path, plan: Any, cache: SyntheticCache, **kwargs: Any) -> Any:
    from torchvision.datasets import ImageFolder

    from dalda_aug.dataset import SyntheticAugmentedDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning: only a subset is cached
        return SyntheticAugmentedDataset(ImageFolder(root), plan, cache, seed=0, **kwargs)


def _forget_coverage() -> None:
    """Delete the coverage records (not the stat records) of this user's cache folder."""
    from dalda_aug.plan.records import record_dir

    for path in record_dir().glob("coverage-*.json"):
        path.unlink(missing_ok=True)


def measure_construction(root: Path, plan_dir: Path, cache: SyntheticCache, repeats: int = 3) -> dict:
    """Construction from the plan folder over unchanged sources against ImageFolder(root): with the
    cache unchanged since the previous construction (its coverage record read back), and with the
    coverage recounted (records deleted before each run: as after a `warm` changed the cache)."""
    from torchvision.datasets import ImageFolder

    from dalda_aug.plan.records import RACY_SECONDS

    newest = max(p.stat().st_mtime for p in cache.directory.rglob("cache.db*"))
    time.sleep(max(0.0, newest + RACY_SECONDS + 0.5 - time.time()))  # fill_cache just wrote it: settle
    started = time.perf_counter()
    ds = _dataset(root, plan_dir, cache, on_miss="real")
    first_s = time.perf_counter() - started
    folder_s = _median_seconds(lambda: ImageFolder(root), repeats)
    ours_s = _median_seconds(lambda: _dataset(root, plan_dir, cache, on_miss="real"), repeats)
    recount_s = _median_seconds(lambda: (_forget_coverage(), _dataset(root, plan_dir, cache, on_miss="real")),
                                repeats)
    variants = ds.planned_variants
    return {"variants": variants, "imagefolder_s": round(folder_s, 4), "first_s": round(first_s, 4),
            "unchanged_s": round(ours_s, 4), "ratio": _ratio(ours_s, folder_s),
            "target_3x_plus_0_5_s": bool(ours_s <= 3 * folder_s + 0.5),
            "coverage_recounted_s": round(recount_s, 4), "target_2_s": bool(max(ours_s, recount_s) <= 2.0)}


def measure_pickle(root: Path, plan_dir: Path, cache: SyntheticCache) -> dict:
    """Pickled bytes of the dataset minus those of the ImageFolder it wraps, per variant."""
    from torchvision.datasets import ImageFolder

    ds = _dataset(root, plan_dir, cache, on_miss="real")
    ours, base = len(pickle.dumps(ds)), len(pickle.dumps(ImageFolder(root)))
    return {"variants": ds.planned_variants, "dataset_bytes": ours, "imagefolder_bytes": base,
            "bytes_per_variant": round((ours - base) / ds.planned_variants, 2)}


def collate_with_pid(batch: list) -> tuple[Any, int]:
    """default_collate, plus the pid of the process that collated (the worker)."""
    from torch.utils.data import default_collate

    return default_collate(batch), os.getpid()


def import_library(_worker_id: int) -> None:
    """worker_init_fn of the baseline worker: the modules the dataset's worker imports."""
    import dalda_aug.cache  # noqa: F401
    import dalda_aug.dataset  # noqa: F401


def _private_bytes(pid: int) -> int:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


def _worker_private(dataset: Any, indices: list[int], batches: int, init: Any = None) -> int:
    from torch.utils.data import DataLoader

    order = (indices * (batches * 16 // max(len(indices), 1) + 1))[: batches * 16]
    loader = DataLoader(dataset, batch_size=16, sampler=order, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=collate_with_pid, worker_init_fn=init, persistent_workers=False)
    iterator = iter(loader)
    pid = 0
    for _ in range(batches):
        _, pid = next(iterator)
    private = _private_bytes(pid)
    del iterator
    return private


def _transform():
    from torchvision import transforms as T

    return T.Compose([T.RandomHorizontalFlip(), T.ToTensor()])


def measure_memory(root: Path, plan_dir: Path, cache: SyntheticCache, indices: list[int], batches: int) -> dict:
    """Private memory of a spawned worker serving the dataset minus one serving ImageFolder."""
    from torchvision.datasets import ImageFolder

    ds = _dataset(root, plan_dir, cache, p=0.5, on_miss="real", transform=_transform())
    base = _worker_private(ImageFolder(root, transform=_transform()), indices, batches, init=import_library)
    ours = _worker_private(ds, indices, batches)
    return {"variants": ds.planned_variants, "imagefolder_worker_bytes": base, "dataset_worker_bytes": ours,
            "bytes_per_variant": round((ours - base) / ds.planned_variants, 2)}


def fill_cache(root: Path, plan_dir: Path, cache: SyntheticCache, sources: int) -> tuple[list[int], list[Any]]:
    """Put a 32x32 stand-in for every variant of the first ``sources`` items of ImageFolder(root);
    returns those items' indices and variants."""
    from torchvision.datasets import ImageFolder

    plan = AugmentationPlan.load(plan_dir)
    folder = ImageFolder(root)
    rng = np.random.default_rng(2)
    indices, put = [], []
    for index, (path, _) in enumerate(folder.samples[:sources]):
        variants = plan.variants_for(Path(path).relative_to(root).as_posix())
        for v in variants:
            cache.put(v, Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)))
            put.append(v)
        if variants:
            indices.append(index)
    return indices, put


def measure_epoch(root: Path, plan_dir: Path, cache: SyntheticCache, indices: list[int], epochs: int,
                  workers: int = 1) -> dict:
    """One epoch at p = 0.5 over the cached items against ImageFolder on the same items."""
    from torch.utils.data import DataLoader, SubsetRandomSampler
    from torchvision.datasets import ImageFolder

    datasets = {"imagefolder": ImageFolder(root, transform=_transform()),
                "synthetic": _dataset(root, plan_dir, cache, p=0.5, on_miss="error", transform=_transform())}
    loaders = {name: DataLoader(ds, batch_size=32, num_workers=workers, persistent_workers=workers > 0,
                                sampler=SubsetRandomSampler(indices, generator=torch.Generator().manual_seed(0)))
               for name, ds in datasets.items()}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for epoch in range(epochs + 1):  # epoch 0 starts the workers
        for name, loader in loaders.items():
            started = time.perf_counter()
            for _ in loader:
                pass
            if epoch:
                times[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"items": len(indices), "workers": workers, "imagefolder_epoch_s": round(med["imagefolder"], 4),
            "synthetic_epoch_s": round(med["synthetic"], 4), "ratio": _ratio(med["synthetic"], med["imagefolder"])}


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def measure_noop(plan_dir: Path, cache_dir: Path, entries: int) -> dict:
    """Bytes read by cache.stats() and by a warm that has nothing to do, vs the cache's bytes, on a
    cache of ``entries`` 512x512 photos (generated-image size: the share of a header depends on it)."""
    from dalda_aug.cache.warm import warm

    plan = AugmentationPlan.load(plan_dir)
    put = [plan[i] for i in range(min(entries, len(plan)))]
    spec = GenerationSpec(ModelConfig(), IPAdapterConfig())
    cache = SyntheticCache(cache_dir, spec)
    photos, rng = _photos(), np.random.default_rng(3)
    for i, v in enumerate(put):
        photo = photos[i % len(photos)]
        s = int(min(photo.shape[:2]) * rng.uniform(0.5, 1.0))
        cache.put(v, Image.fromarray(photo[:s, :s]).resize((512, 512), Image.Resampling.BILINEAR))
    before = _rchar()
    stats = cache.stats()
    stats_read = _rchar() - before
    out: dict[str, Any] = {"cache_entries": stats["entries"], "cache_bytes": stats["bytes"],
                           "stats_read_bytes": stats_read,
                           "stats_read_fraction": round(stats_read / max(stats["bytes"], 1), 4)}
    try:  # a plan of exactly the cached variants, through the library's own constructor
        sub = AugmentationPlan(put, plan.config)
        before = _rchar()
        warm(sub, cache, progress=False)
        out["warm_read_bytes"] = _rchar() - before
        out["warm_read_fraction"] = round(out["warm_read_bytes"] / max(stats["bytes"], 1), 4)
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the plan API is changing
        out["warm_error"] = f"{type(error).__name__}: {error}"[:300]
    return out


def measure_disk() -> dict:
    """Bytes per 512x512 image of the bundled photos through the cache's encoder, per format."""
    photos = [Image.fromarray(p).resize((512, 512), Image.Resampling.BICUBIC) for p in _photos()]
    # jpeg without a quality is jpeg at DEFAULT_QUALITY (95): listed once, as jpeg:95
    labels = [(fmt, None) for fmt in IMAGE_FORMATS if fmt != "jpeg"] + [("jpeg", 95), ("webp", 95)]
    out = {}
    for fmt, quality in labels:
        try:
            sizes = [len(encode_entry(p, {}, fmt if quality is None else f"{fmt}:{quality}")) for p in photos]
        except Exception as error:  # noqa: BLE001 - a format this build lacks
            out[fmt if quality is None else f"{fmt}:{quality}"] = {"error": str(error)[:200]}
            continue
        mean = statistics.fmean(sizes)
        out[fmt if quality is None else f"{fmt}:{quality}"] = {
            "bytes_per_image": int(mean), "kib_per_image": round(mean / 1024, 1),
            "vs_raw_rgb": round(mean / (512 * 512 * 3), 3)}
    return out


# -- driver -------------------------------------------------------------------------------------
def run_size(n: int, args: argparse.Namespace, work: Path, models: ModelConfig | None) -> dict:
    root = write_sources(work / f"data-{n}", n, min(args.classes, n))
    result: dict[str, Any] = {"sources": n, "variants_per_source": args.variants}
    say = lambda name, d: print(f"[{n}] {name}: {json.dumps(d)}", flush=True)  # noqa: E731
    if "plan" not in args.skip and models is not None:
        result["plan"] = measure_plan(root, args.variants, models)
        say("plan", result["plan"])
    plan_dir = make_plan(root, args.variants, work / f"plan-{n}")
    spec = GenerationSpec(ModelConfig(), IPAdapterConfig(height=SIZE, width=SIZE))
    cache = SyntheticCache(work / f"cache-{n}", spec)
    indices, _ = fill_cache(root, plan_dir, cache, min(args.epoch_sources, n))
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("construction", lambda: measure_construction(root, plan_dir, cache)),
        ("pickle", lambda: measure_pickle(root, plan_dir, cache)),
        ("memory", lambda: measure_memory(root, plan_dir, cache, indices, args.mem_batches)),
        ("epoch", lambda: measure_epoch(root, plan_dir, cache, indices, args.epochs)),
        ("noop", lambda: measure_noop(plan_dir, work / f"noop-cache-{n}", args.noop_entries)),
    ]
    for name, fn in steps:
        if name not in args.skip:
            result[name] = fn()
            say(name, result[name])
    return result


def _machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3], "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 20000],
                   help="comma-separated source counts (default 2000,20000)")
    p.add_argument("--variants", type=int, default=10, help="M, variants per source (default 10)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--models", default="tiny", help="'tiny' (tiny random models) or a models JSON, for the plan")
    p.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help=f"comma-separated measures to leave out, of {','.join(MEASURES)}")
    p.add_argument("--epoch-sources", type=int, default=256, help="cached items of the epoch (default 256)")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per loader, median reported")
    p.add_argument("--mem-batches", type=int, default=8, help="batches of 16 a worker serves before measuring")
    p.add_argument("--noop-entries", type=int, default=64, help="512x512 entries of the no-op read's cache")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = p.parse_args(argv)
    unknown = set(args.skip) - set(MEASURES)
    if unknown:
        p.error(f"--skip: unknown measures {sorted(unknown)}; choose from {','.join(MEASURES)}")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": _machine(), "sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        # stat and coverage records of this run's throwaway folders go to the run's own folder
        # (measure_construction deletes coverage records), not to this user's cache
        os.environ["DALDA_AUG_CACHE"] = str(work / "user-cache")
        models = None
        if "plan" not in args.skip:
            if args.models == "tiny":
                from dalda_aug.tiny_models import make_tiny_models

                models = make_tiny_models(work / "models")
            else:
                models = ModelConfig.load(args.models)
        if "disk" not in args.skip:
            report["disk"] = measure_disk()
            print(f"[disk] {json.dumps(report['disk'])}", flush=True)
        for n in args.sources:
            report["sizes"].append(run_size(n, args, work, models))
    report["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
