#!/usr/bin/env python
"""Cost of synthetic augmentation at training time, and of cache writes while warming.

1. **Epoch ratio.** An epoch of :class:`~dalda_aug.dataset.SyntheticAugmentedDataset`
   (p = 0.5, cache fully warm) through a DataLoader with ``--workers`` workers and the usual
   train transforms (RandomResizedCrop 224, horizontal flip, ToTensor, Normalize), against an
   epoch of the plain torchvision ``ImageFolder`` with the same transforms. The real images are
   JPEGs of typical few-shot dataset size (about 500x375, quality 90, cut from the photos that
   ship with scikit-image); the cached "generated" images are 512x512 photos stored by
   :class:`~dalda_aug.cache.SyntheticCache` in each ``--formats`` encoding. Epochs of the two
   loaders alternate (persistent workers, one warm-up epoch each) and the median is reported.
   Target: ratio <= 1.10.

2. **Warm throughput.** Images/s of the generator alone (``generate`` on the same requests,
   nothing written) against :func:`~dalda_aug.cache.warm.warm` into an empty cache (generation plus
   encoding (lz4 by default) and cache writes on the writer threads) and against generating then writing in
   the same thread. Target: warm keeps the generator's throughput. Tiny random models by
   default (``--models`` takes a models JSON, e.g. real weights on a GPU). Also reported: the
   time the single writer thread needs per 512x512 image and format (encode + store), i.e.
   the generation rate it can keep up with.

    python benchmarks/bench_dataset.py                      # both parts, CPU, a few minutes
    python benchmarks/bench_dataset.py --skip-warm --formats png --json dataset.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dalda_aug.cache import IMAGE_FORMATS, GenerationSpec, SyntheticCache  # noqa: E402
from dalda_aug.cache.codecs import DEFAULT_QUALITY  # noqa: E402
from dalda_aug.config import ModelConfig  # noqa: E402
from dalda_aug.dataset import SyntheticAugmentedDataset  # noqa: E402
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.generators.base import GenerationRequest  # noqa: E402
from dalda_aug.plan import build_plan  # noqa: E402
from dalda_aug.cache.warm import warm  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        array = getattr(data, name)()
        out.append(array[0] if isinstance(array, tuple) else array)
    return out


def _crop(rng, photo: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A random crop of ``photo`` resized to ``size`` (width, height)."""
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BICUBIC)


def make_dataset(root: Path, classes: int, shots: int, seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: JPEG photos of few-shot dataset size."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(shots):
            size = (int(rng.integers(400, 501)), int(rng.integers(300, 376)))
            _crop(rng, photos[(c + i) % len(photos)], size).save(folder / f"{i}.jpg", quality=90)
    return root


def train_transform():
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(224),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


def _epoch_seconds(loader) -> float:
    # No set_epoch: every access is a fresh draw anyway (the shared draw counter is part of
    # what is measured).
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def bench_epochs(args, work: Path) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    root = make_dataset(work / "data", args.classes, args.shots)
    n = args.classes * args.shots
    rng = np.random.default_rng(1)
    plan = build_plan(root, variants=args.variants, seed=0, scores=rng.uniform(0, 1, n), models=ModelConfig())
    spec = GenerationSpec(ModelConfig(), IPAdapterConfig())  # 512x512: the paper's settings
    photos = _photos()
    results: dict = {"items_per_epoch": n, "variants": len(plan), "workers": args.workers,
                     "batch_size": args.batch_size, "formats": {}}
    for label in args.formats:
        fmt, quality = _format_and_quality(label)
        cache = SyntheticCache(work / f"cache-{label.replace(':', '-q')}", spec, image_format=fmt, quality=quality)
        started = time.perf_counter()
        for i, variant in enumerate(plan):  # stand-ins for generated images: 512x512 photos
            cache.put(variant, _crop(rng, photos[i % len(photos)], (512, 512)))
        fill = time.perf_counter() - started
        real = ImageFolder(root, transform=train_transform())
        mixed = SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=args.p, transform=train_transform(),
                                          on_miss="error", seed=0)
        loaders = {
            name: DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                             persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
            for name, ds in (("imagefolder", real), ("synthetic", mixed))
        }
        times: dict[str, list[float]] = {"imagefolder": [], "synthetic": []}
        for epoch in range(args.epochs + 1):  # epoch 0 warms workers and the page cache
            for name in ("imagefolder", "synthetic"):
                seconds = _epoch_seconds(loaders[name])
                if epoch > 0:
                    times[name].append(seconds)
        med = {name: statistics.median(v) for name, v in times.items()}
        entry_bytes = cache.stats()["bytes"] / len(plan)
        results["formats"][label] = {
            "format": fmt,
            "quality": cache.quality if fmt != "jpeg" else (cache.quality or DEFAULT_QUALITY),
            "imagefolder_epoch_s": round(med["imagefolder"], 4),
            "synthetic_epoch_s": round(med["synthetic"], 4),
            "ratio": round(med["synthetic"] / med["imagefolder"], 4),
            "imagefolder_items_per_s": round(n / med["imagefolder"], 1),
            "synthetic_items_per_s": round(n / med["synthetic"], 1),
            "bytes_per_entry": int(entry_bytes),
            "encode_ms_per_entry": round(1000 * fill / len(plan), 2),
            "epochs": args.epochs,
        }
        print(f"[epoch] {label}: ImageFolder {med['imagefolder']:.3f} s, SyntheticAugmentedDataset(p={args.p}) "
              f"{med['synthetic']:.3f} s per epoch of {n} items -> ratio {med['synthetic'] / med['imagefolder']:.3f} "
              f"(target <= 1.10; {entry_bytes / 1024:.0f} KiB = {entry_bytes:.0f} bytes per cached image)", flush=True)
    results["decode_ms"] = _decode_costs(photos[0])
    print(f"[decode] ms per image: {results['decode_ms']}", flush=True)
    return results


def _format_and_quality(label: str) -> tuple[str, int | None]:
    """``"jpeg"`` -> ("jpeg", None: the default quality); ``"webp:90"`` -> ("webp", 90): lossy."""
    fmt, _, quality = label.partition(":")
    return fmt, int(quality) if quality else None


def _decode_costs(photo: np.ndarray, repeats: int = 30) -> dict:
    """Milliseconds to decode one image: the real JPEG vs 512x512 PNG, lossless WebP and LZ4 raw."""
    import lz4.block

    out = {}
    jpeg = Image.fromarray(photo).resize((500, 375))
    square = Image.fromarray(photo).resize((512, 512))
    blobs = {}
    for name, image, kwargs in (("jpeg_500x375_q90", jpeg, dict(format="JPEG", quality=90)),
                                ("png_512_level1", square, dict(format="PNG", compress_level=1)),
                                ("webp_lossless_512", square, dict(format="WEBP", lossless=True, quality=0, method=0))):
        buf = io.BytesIO()
        image.save(buf, **kwargs)
        blobs[name] = buf.getvalue()
    pixels = square.tobytes()
    packed = lz4.block.compress(pixels, mode="high_compression", compression=3, store_size=False)  # as the cache
    started = time.perf_counter()
    for _ in range(repeats):
        Image.frombytes("RGB", square.size, lz4.block.decompress(packed, uncompressed_size=len(pixels)))
    out["lz4_raw_512"] = round(1000 * (time.perf_counter() - started) / repeats, 2)
    out["lz4_raw_512_size_vs_raw"] = round(len(packed) / len(pixels), 3)
    for name, blob in blobs.items():
        started = time.perf_counter()
        for _ in range(repeats):
            with Image.open(io.BytesIO(blob)) as img:
                img.convert("RGB")
        out[name] = round(1000 * (time.perf_counter() - started) / repeats, 2)
    return out


def bench_warm(args, work: Path) -> dict:
    if args.models:
        models = ModelConfig.load(args.models)
    else:
        from dalda_aug.tiny_models import make_tiny_models

        models = make_tiny_models(work / "tiny-models")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    root = make_dataset(work / "warm-data", classes=4, shots=2, seed=3)
    plan = build_plan(root, variants=args.warm_images // 8, seed=0, scores=np.linspace(0.1, 0.9, 8), models=models)
    config = dataclasses.replace(IPAdapterConfig(), num_inference_steps=args.warm_steps, height=args.warm_size,
                                 width=args.warm_size)
    spec = GenerationSpec(models, config, dtype)
    generator = spec.make_generator(device).load()
    images = {src: Image.open(Path(plan.data_root) / src).convert("RGB") for src in plan.sources()}
    requests = [GenerationRequest(images[v.source], v.prompt, v.lam, v.seed) for v in plan]
    b = args.warm_batch_size
    generator.generate(requests[:b], batch_size=b)  # warm-up (allocations, embeddings cache)

    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    results = {"images": len(plan), "batch_size": b, "size": args.warm_size, "steps": args.warm_steps,
               "device": device, "dtype": dtype, "models": "tiny" if not args.models else args.models}
    gen_s = timed(lambda: generator.generate(requests, batch_size=b))
    warm_s = timed(lambda: warm(plan, SyntheticCache(work / "warm-cache-a", spec), generator=generator, batch_size=b,
                                progress=False))

    def sequential():
        cache = SyntheticCache(work / "warm-cache-b", spec)
        for start in range(0, len(plan), b):
            chunk = plan.variants[start:start + b]
            for v, image in zip(chunk, generator.generate(requests[start:start + b], batch_size=b)):
                cache.put(v, image)

    seq_s = timed(sequential)
    n = len(plan)
    # What the single writer thread sustains on full-size images (encode + store), per format.
    photo = Image.fromarray(_photos()[0]).resize((512, 512))
    writer_ms = {}
    for fmt in IMAGE_FORMATS:
        cache = SyntheticCache(work / f"writer-{fmt}", spec, image_format=fmt)
        started = time.perf_counter()
        for v in plan.variants[:16]:
            cache.put(v, photo)
        writer_ms[fmt] = round(1000 * (time.perf_counter() - started) / 16, 2)
    results["writer_ms_per_512px_image"] = writer_ms
    results.update(generate_images_per_s=round(n / gen_s, 3), warm_images_per_s=round(n / warm_s, 3),
                   sequential_images_per_s=round(n / seq_s, 3), warm_vs_generate=round(gen_s / warm_s, 4),
                   sequential_vs_generate=round(gen_s / seq_s, 4))
    print(f"[warm] {n} images {args.warm_size}px, {args.warm_steps} steps, batch {b} on {device}: generate only "
          f"{n / gen_s:.2f} img/s; warm (writer thread) {n / warm_s:.2f} img/s = {gen_s / warm_s:.1%} of it; "
          f"generate-then-write in one thread {n / seq_s:.2f} img/s = {gen_s / seq_s:.1%}", flush=True)
    print(f"[warm] the writer thread encodes and stores a 512x512 image in {writer_ms} ms "
          f"(max {', '.join(f'{k} {1000 / v:.0f}' for k, v in writer_ms.items())} images/s)", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--shots", type=int, default=16, help="real images per class (default 16)")
    p.add_argument("--variants", type=int, default=2, help="cached variants per real image")
    p.add_argument("--p", type=float, default=0.5, help="substitution probability (default 0.5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per loader (median reported)")
    p.add_argument("--formats", type=lambda s: s.split(","), default=list(IMAGE_FORMATS),
                   help=f"comma-separated image formats of the cache, NAME or NAME:QUALITY for a lossy one "
                        f"(jpeg:90, webp:95; jpeg alone: quality {DEFAULT_QUALITY}) (default "
                        f"{','.join(IMAGE_FORMATS)})")
    p.add_argument("--skip-epochs", action="store_true")
    p.add_argument("--skip-warm", action="store_true")
    p.add_argument("--models", default=None, help="models JSON for the warm part (default: tiny random models)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--warm-images", type=int, default=48)
    p.add_argument("--warm-size", type=int, default=64)
    p.add_argument("--warm-steps", type=int, default=2)
    p.add_argument("--warm-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the main process")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
              "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        work = Path(tmp)
        if not args.skip_epochs:
            report["epochs"] = bench_epochs(args, work)
        if not args.skip_warm:
            report["warm"] = bench_warm(args, work)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
