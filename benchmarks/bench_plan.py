#!/usr/bin/env python
"""Cost of ``plan``'s scoring against a plain batched open_clip loop over the same images.

Writes ``--n`` JPEGs (random crops of the photos that ship with scikit-image, about 500x375,
quality 90) into ``--classes`` class folders, then times, in this one process and on the same
model (``--models``: a models JSON; the paper's ViT-B/16 by default):

* **plain**: an open_clip loop of batches of ``--batch-size``: decode, preprocess, encode,
  cosine with the class texts, softmax; nothing else;
* **plan**: :func:`dalda_aug.plan.build_plan` (decode + SHA-256 + resize in a thread pool, each
  chunk's pixels converted and normalised as one tensor, scoring in fixed blocks of
  ``clipscore.SCORE_BLOCK`` with padding, λ, seeds, prompts).

Model loading is outside both timings; each is run ``--repeats`` times, alternating, and the
fastest run is reported, with the ratio plan / plain (target: at most 2) and the largest score
difference between the two (float32 tolerance: different batch shapes round differently).

    python benchmarks/bench_plan.py --n 2000                               # ViT-B/16, hub weights
    python benchmarks/bench_plan.py --n 200 --models tiny                  # tiny random CLIP, smoke
    python benchmarks/bench_plan.py --n 2000 --models models.json --device cuda --json plan.json
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

from dalda_aug.plan.clipscore import SCORE_BLOCK, CLIPScorer, load_open_clip  # noqa: E402
from dalda_aug.config import ModelConfig  # noqa: E402
from dalda_aug.data import ImageSource  # noqa: E402
from dalda_aug.plan import build_plan  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")


def write_images(root: Path, n: int, classes: int, seed: int = 0) -> Path:
    """``n`` JPEGs cut from scikit-image's photos into ``root/class_<k>/``."""
    from skimage import data

    arrays = [getattr(data, name)() for name in PHOTOS]  # stereo_motorcycle is (left, right, disparity)
    photos = [np.asarray(Image.fromarray(a[0] if isinstance(a, tuple) else a).convert("RGB")) for a in arrays]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = min(375, photo.shape[0]), min(500, photo.shape[1])
        y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + h, x : x + w]).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def plain_loop(model: Any, preprocess: Any, text: torch.Tensor, source: ImageSource, batch_size: int,
               device: str) -> np.ndarray:
    """The baseline: batched open_clip zero-shot probabilities of each image's own class."""
    out = []
    items, root = source.items, str(source.root)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pixels = torch.stack([preprocess(Image.open(Path(root, str(item.source))).convert("RGB")) for item in batch])
        with torch.inference_mode():
            feats = model.encode_image(pixels.to(device)).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        probs = (100.0 * feats @ text.T).softmax(dim=-1)
        labels = torch.as_tensor([item.label for item in batch], device=probs.device)
        out.append(probs.gather(1, labels[:, None])[:, 0].double().cpu().numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--models", default=None,
                        help="models JSON, or 'tiny' for tiny random models (default: the paper's hub models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the plain loop (default 64)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        if args.models == "tiny":
            from dalda_aug.tiny_models import make_tiny_models

            models = make_tiny_models(Path(tmp) / "models")
        else:
            models = ModelConfig.load(args.models) if args.models else ModelConfig()
        root = write_images(Path(tmp) / "data", args.n, args.classes)
        source = ImageSource.from_folder(root)

        model, preprocess, tokenizer = load_open_clip(models.clip_model, models.clip_pretrained, args.device)
        with torch.inference_mode():
            text = model.encode_text(tokenizer([f"a photo of a {c}" for c in source.class_names]).to(args.device))
        text = text.float() / text.float().norm(dim=-1, keepdim=True)
        scorer = CLIPScorer.from_models(models, device=args.device).load()
        scorer.text_features(source.class_names)

        times: dict[str, list[float]] = {"plain": [], "plan": []}
        plain_scores = plan_scores = np.zeros(0)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain_scores = plain_loop(model, preprocess, text, source, args.batch_size, args.device)
            times["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plan = build_plan(source, variants=1, seed=0, models=models, scorer=scorer, progress=False)
            times["plan"].append(time.perf_counter() - t0)
            plan_scores = np.array([v.score for v in plan])

    plain_t, plan_t = min(times["plain"]), min(times["plan"])
    figures = {
        "n": args.n, "device": args.device, "clip_model": models.clip_model, "torch_threads": torch.get_num_threads(),
        "score_block": SCORE_BLOCK, "plain_batch_size": args.batch_size,
        "plain_s": round(plain_t, 3), "plan_s": round(plan_t, 3), "ratio": round(plan_t / plain_t, 3),
        "max_score_diff": float(np.max(np.abs(plan_scores - plain_scores))) if args.n else 0.0,
    }
    print(f"plain open_clip loop (batch {args.batch_size}): {plain_t:.2f} s  ({args.n / plain_t:.1f} img/s)")
    print(f"plan (blocks of {SCORE_BLOCK}, padded):        {plan_t:.2f} s  ({args.n / plan_t:.1f} img/s)")
    print(f"ratio plan / plain: {plan_t / plain_t:.2f}  (target <= 2); largest score difference "
          f"{figures['max_score_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
