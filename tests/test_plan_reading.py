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

import dalda_aug.plan.build as plan_module
from dalda_aug.plan.ags import AGSConfig, Scaling, sample_scales
from dalda_aug.plan.clipscore import CLIPScorer
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


def test_pixels_equal_the_transform_image_by_image(tiny_models, folder):
    """A chunk converted as one batch is, row for row, the model's own transform of each image."""
    scorer = CLIPScorer.from_models(tiny_models).load()
    images = [item.load() for item in ImageSource.from_folder(folder).items]
    batch = scorer.pixels([scorer.prepare(img) for img in images])
    expected = torch.stack([scorer._preprocess(img) for img in images])  # open_clip's Compose, per image
    assert batch.dtype == expected.dtype and torch.equal(batch, expected)
    assert scorer._batch_ok  # the batch path ran (and its one comparison found no difference)
    # scoring the batch and the PIL images gives the same scores, bit for bit
    labels = [i % 3 for i in range(len(images))]
    assert np.array_equal(scorer.score(batch, labels, CLASSES), scorer.score(images, labels, CLASSES))


def test_pixels_falls_back_to_the_transform_when_a_batch_would_differ(tiny_models, folder, monkeypatch):
    """Were the batch ever to differ from the transform, the chunk is converted image by image
    (with a warning), never scored from different pixels."""
    scorer = CLIPScorer.from_models(tiny_models).load()
    images = [item.load() for item in ImageSource.from_folder(folder).items[:5]]
    expected = torch.stack([scorer._preprocess(img) for img in images])
    real_div = torch.Tensor.div

    def off_by_a_bit(self, other, *args, **kwargs):
        out = real_div(self, other, *args, **kwargs)
        return out.nextafter(torch.full_like(out, 2.0)) if self.ndim == 4 else out  # only the batch path

    monkeypatch.setattr(torch.Tensor, "div", off_by_a_bit)
    with pytest.warns(RuntimeWarning, match="one by one"):
        batch = scorer.pixels([scorer.prepare(img) for img in images])
    monkeypatch.undo()
    assert torch.equal(batch, expected) and not scorer._batch_ok


@pytest.mark.parametrize("workers,chunk,slice_", [(2, 16, 16), (5, 7, 3), (8, 128, 16)])
def test_parallel_reading_writes_the_serial_plan_byte_for_byte(tiny_models, folder, tmp_path, monkeypatch,
                                                               workers, chunk, slice_):
    source = ImageSource.from_folder(folder)
    monkeypatch.setattr(plan_module, "_READ_WORKERS", 1)
    monkeypatch.setattr(plan_module, "_CHUNK", 1)
    monkeypatch.setattr(plan_module, "_READ_SLICE", 1)
    build_plan(source, variants=3, seed=7, models=tiny_models).save(tmp_path / "serial")
    monkeypatch.setattr(plan_module, "_READ_WORKERS", workers)
    monkeypatch.setattr(plan_module, "_CHUNK", chunk)
    monkeypatch.setattr(plan_module, "_READ_SLICE", slice_)
    parallel = build_plan(source, variants=3, seed=7, models=tiny_models)
    parallel.save(tmp_path / "parallel")
    for name in ("plan.jsonl", "plan.json", "summary.json"):
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name
    for path in sorted((tmp_path / "serial" / "columns").iterdir()):
        assert (tmp_path / "parallel" / "columns" / path.name).read_bytes() == path.read_bytes(), path.name
    # and each row holds the independent pixel hash and the image's score when scored alone
    scorer = CLIPScorer.from_models(tiny_models)
    rows = {v.source: v for v in parallel}
    for item in source.items:
        expected_sha = _pixel_sha256(folder / item.source)
        alone = scorer.score([item.load()], [item.label], source.class_names)[0]
        assert rows[item.source].source_sha256 == expected_sha
        assert rows[item.source].score == round(float(alone), 8)


def test_read_and_score_keeps_order_and_raises_the_first_unreadable_source(folder):
    source = ImageSource.from_folder(folder)
    hashes, _ = plan_module._read_and_score(source.items, source.class_names, None, workers=3)
    assert hashes == [_pixel_sha256(folder / item.source) for item in source.items]
    (folder / source.items[9].source).write_bytes(b"not a png")
    (folder / source.items[30].source).write_bytes(b"not a png either")
    with pytest.raises(ImageError, match=source.items[9].source.split("/")[-1]):
        plan_module._read_and_score(source.items, source.class_names, None, workers=4)
    with pytest.raises(InputError, match="workers must be >= 1"):
        plan_module._read_and_score(source.items, source.class_names, None, workers=0)


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
