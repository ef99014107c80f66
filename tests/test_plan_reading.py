"""Issue 23.4, the plan's speed: sources read by a pool of threads in slices, pixels converted and
normalised per chunk, λ drawn by one inversion over many sources, seeds from a hashed prefix, the
summary from the columns. None of it may change a plan: each check compares with an independent
computation (the model's own transform image by image, hashlib over the pixels, the per-source
``sample_scales`` and ``derive_seed`` calls the plan made before, ``summarize`` over the variants)
or a plan written with one thread, byte for byte."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import dalda_aug.plan as plan_module
from dalda_aug.ags import AGSConfig, Scaling, sample_scales
from dalda_aug.clipscore import CLIPScorer
from dalda_aug.data import ImageSource
from dalda_aug.errors import ImageError, InputError
from dalda_aug.plan import AugmentationPlan, Variant, build_plan, derive_seed, summarize

CLASSES = ["ant", "bee", "cow"]


def _write_folder(root, count=41):
    """``count`` images of several sizes and modes (RGB, RGBA, grey, palette, 16-bit grey), some
    of them with the same pixels (one content hash, two sources)."""
    rng = np.random.default_rng(3)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(count):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = i % 6
        if kind == 1:
            img = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)]), "RGBA")
        elif kind == 2:
            img = Image.fromarray(rgb[..., 0], "L")
        elif kind == 3:
            img = Image.fromarray(rgb).convert("P")
        elif kind == 4:
            img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        elif kind == 5 and i > 5:
            img = Image.open(root / CLASSES[(i - 5) % 3] / f"{i - 5:03d}.png")  # a copy of an earlier one
        else:
            img = Image.fromarray(rgb)
        img.save(root / CLASSES[i % 3] / f"{i:03d}.png")
    return root


@pytest.fixture()
def folder(tmp_path):
    return _write_folder(tmp_path / "data")


def _pixel_sha256(path) -> str:
    """The content hash written out: SHA-256 of "RGB:<w>x<h>:" and the RGB bytes (alpha over white)."""
    with Image.open(path) as img:
        img.load()
        if img.mode == "I;16":
            grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=2)
        elif img.mode in ("RGBA", "P") and (img.mode == "RGBA" or "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
            alpha = rgba[..., 3:] / 255.0
            rgb = np.asarray(Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)),
                                                   img.convert("RGBA")).convert("RGB"))
            assert np.abs(rgb - (rgba[..., :3] * alpha + 255 * (1 - alpha))).max() <= 1  # alpha over white
        else:
            rgb = np.asarray(img.convert("RGB"))
    h, w = rgb.shape[:2]
    return hashlib.sha256(f"RGB:{w}x{h}:".encode() + np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


def _per_source_lambdas(hashes, scores, shots, variants, seed, scaling):
    """What build_plan drew before: one sample_scales call per source, on its own generator."""
    return np.stack([sample_scales(np.full(variants, s), n,
                                   np.random.default_rng(derive_seed(seed, sha, 0, "lambda")), scaling)
                     for sha, s, n in zip(hashes, scores, shots)])


@pytest.mark.parametrize("scaling", [
    Scaling(), Scaling(ags=AGSConfig(sigma_per_shot=0.9, low=(0.5, 0.95), alpha=0.5)),
    Scaling(ags=AGSConfig(mode="clip")), Scaling(strategy="rs"), Scaling(strategy="fixed", value=0.3)])
def test_lambdas_drawn_together_equal_the_per_source_draws(scaling, monkeypatch):
    rng = np.random.default_rng(11)
    n = 3000
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    scores = rng.uniform(0, 1, n)
    scores[:40] = scaling.ags.alpha  # on the threshold, at the ends, and a hair either side
    scores[40:60], scores[60:80] = 0.0, 1.0
    scores[80:100] = np.nextafter(scaling.ags.alpha, 1.0)
    shots = rng.integers(1, 40, n)
    monkeypatch.setattr(plan_module, "_LAMBDA_BLOCK", 997)  # blocks that cut through sources
    got = plan_module._draw_lambdas(hashes, scores, list(shots), 7, 5, scaling)
    expected = _per_source_lambdas(hashes, scores, shots, 7, 5, scaling)
    assert got.shape == (n, 7) and np.array_equal(got, expected)


def test_variant_seeds_equal_derive_seed():
    for sha in ("0" * 64, hashlib.sha256(b"x").hexdigest()):
        for seed in (0, 7, 2**40):
            assert plan_module._variant_seeds(seed, sha, 12) == [derive_seed(seed, sha, k) for k in range(12)]


def _variant(source, label, name, score, k, lam):
    return Variant(source, label, name, score, k, f"a photo of a {name}", lam, k, "ab" * 32)


@pytest.mark.parametrize("variants", [
    [],
    [_variant("b/1.png", 1, "bee", 0.25, 0, 0.7), _variant("a/0.png", 0, "ant", 0.3, 0, 0.8),
     _variant("b/1.png", 1, "bee", 0.25, 1, 0.6), _variant("a/0.png", 0, "ant", 0.3, 1, 0.1)],
    # int and str sources alike in text, a source whose rows disagree (the first row counts),
    # classes first seen out of sorted order, scores at 0, 1 and the histogram edges
    [_variant(3, 2, "cow", 1.0, 0, 0.2), _variant("3", 0, "ant", 0.0, 0, 0.9), _variant(3, 1, "bee", 0.5, 1, 0.3),
     _variant(7, 1, "bee", 0.1, 0, 0.75), _variant(8, 1, "bee", 0.3, 0, 0.15), _variant(9, 2, "cow", 0.7, 0, 0.35)],
])
def test_summary_from_columns_equals_summarize_over_the_variants(variants):
    config = {"scaling": Scaling().to_dict()}
    plan = AugmentationPlan(variants, config)
    assert plan.summary == summarize(variants, config)
    assert repr(plan.summary) == repr(summarize(variants, config))  # float for float


def test_summary_of_a_built_plan_equals_summarize(folder, tiny_models):
    plan = build_plan(folder, variants=4, seed=1, models=tiny_models,
                      scores=np.random.default_rng(0).uniform(0, 1, 41))
    assert repr(plan.summary) == repr(summarize(list(plan), plan.config))
