"""Hostile plan files and unusual image files (issue 11, points 1, 4, 9, 10, 11).

Real files, real tiny models, a real diskcache; crafted plan.json / plan.jsonl written by hand.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import DatasetFolder, ImageFolder

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.cli import main
from dalda_aug.data import class_folder_name, class_folder_names, source_path
from dalda_aug.dataset import SyntheticAugmentedDataset
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import AugmentationPlan, build_plan
from dalda_aug.cache.warm import warm

from helpers import assert_workers_name_the_file, noise, noise_folder


def _files_under(folder) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs}


@pytest.fixture(scope="module")
def spec(tiny_models):
    return GenerationSpec(tiny_models, dataclasses.replace(IPAdapterConfig(), num_inference_steps=2, height=32,
                                                           width=32), "float32")


@pytest.fixture(scope="module")
def generator(spec):
    return spec.make_generator("cpu").load()


def _edit_plan(src, dst, *, rows=None, config=None):
    """Copy plan folder ``src`` to ``dst``, rewriting its rows / plan.json as a hand would. Whoever
    edits rows on purpose can drop the digests plan.json records (as plans written before them had
    none), so the crafted rows reach the checks these tests are about."""
    shutil.copytree(src, dst)
    if rows is not None:
        lines = [json.loads(line) for line in (dst / "plan.jsonl").read_text(encoding="utf-8").splitlines() if line]
        lines = [rows(row) for row in lines]
        (dst / "plan.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines),
                                        encoding="utf-8")
    meta = json.loads((dst / "plan.json").read_text(encoding="utf-8"))
    if rows is not None:
        meta.pop("digests", None)
    if config is not None:
        config(meta)
    (dst / "plan.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return dst


# -- 1 and 9: cache export writes only inside --out, one folder per class -----------------------
@pytest.fixture(scope="module")
def unicode_cache(tmp_path_factory, tiny_models, spec):
    """A plan over classes "猫" and "犬" and a cache holding all of it (stand-in pixels)."""
    base = tmp_path_factory.mktemp("unicode")
    root = noise_folder(base / "data", ["猫", "犬"], per_class=2)
    plan = build_plan(root, variants=2, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    plan.save(base / "plan")
    cache = SyntheticCache(base / "cache", spec)
    for v in plan:
        cache.put(v, noise(v.seed % 1000))
    cache.record_spec(plan)
    return base, plan, cache


def test_export_without_plan_keeps_unicode_classes_apart(unicode_cache, tmp_path, capsys):
    base, plan, cache = unicode_cache
    out = tmp_path / "out"
    assert main(["cache", "export", "--cache", str(cache.directory), "--out", str(out), "--no-progress"]) == 0
    by_folder: dict[str, set[int]] = {}
    for png in out.rglob("*.png"):
        by_folder.setdefault(png.parent.name, set())
    with (out / "samples.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        by_folder[row["path"].split("/")[0]].add(int(row["label"]))
    # Each class its own folder, named as the class, holding only that class's 4 images.
    assert sorted(by_folder) == ["犬", "猫"]
    assert by_folder == {"猫": {plan.class_names.index("猫")}, "犬": {plan.class_names.index("犬")}}
    assert len(list((out / "猫").glob("*.png"))) == 4 and len(list((out / "犬").glob("*.png"))) == 4


def test_export_plan_class_names_cannot_leave_out(unicode_cache, tmp_path, capsys):
    base, plan, cache = unicode_cache
    outside = tmp_path / "escaped"
    absolute = tmp_path / "absolute-target"
    crafted = _edit_plan(base / "plan", tmp_path / "crafted",
                         config=lambda m: m.update(classes=["../escaped", str(absolute)]))
    assert AugmentationPlan.load(crafted).config["classes"] == ["../escaped", str(absolute)]
    out = tmp_path / "out"
    before = _files_under(tmp_path) - _files_under(out)
    assert main(["cache", "export", "--cache", str(cache.directory), "--plan", str(crafted), "--out", str(out),
                 "--no-progress"]) == 0
    # Nothing new outside --out; every PNG is in a direct sub-folder of --out.
    assert _files_under(tmp_path) - _files_under(out) == before
    assert not outside.exists() and not absolute.exists()
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == len(plan)
    assert all(p.parent.parent == out for p in pngs)
    folders = {p.parent.name for p in pngs}
    assert len(folders) == 2 and not any(f.startswith(".") or "/" in f for f in folders)


def test_export_refuses_a_class_folder_that_links_outside(unicode_cache, tmp_path, capsys):
    base, plan, cache = unicode_cache
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    # An earlier export (its manifest lists 猫/), whose class folder was then replaced by a link.
    assert main(["cache", "export", "--cache", str(cache.directory), "--plan", str(base / "plan"),
                 "--out", str(out), "--no-progress"]) == 0
    shutil.rmtree(out / "猫")
    elsewhere.mkdir()
    (out / "猫").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    code = main(["cache", "export", "--cache", str(cache.directory), "--plan", str(base / "plan"),
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "outside" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert not any(elsewhere.iterdir())


def test_class_folder_names_never_merge():
    names = ["猫", "犬", "a/b", "a\\b", "a_b", "../escaped", "..", ".", "", "/etc", "x\ny", "Cat", "cat", " cat"]
    folders = class_folder_names(names)
    assert folders["猫"] == "猫" and folders["犬"] == "犬" and folders["a_b"] == "a_b"
    assert len({f.casefold() for f in folders.values()}) == len(set(names))
    for name, folder in folders.items():
        assert folder and "/" not in folder and "\\" not in folder and not folder.startswith(".")
        assert all(ord(ch) >= 32 for ch in folder)
    # Deterministic whatever the order; one name's folder does not depend on the others.
    assert class_folder_names(list(reversed(names))) == folders
    assert class_folder_name("a/b") == folders["a/b"] == class_folder_names(["a/b"])["a/b"]


# -- 4: plan sources stay inside the data root ------------------------------------------------------
@pytest.fixture
def folder_plan(tmp_path, tiny_models):
    root = tmp_path / "data"
    for c, name in enumerate(["ant", "bee"]):
        (root / name).mkdir(parents=True)
        noise(c).save(root / name / "0.png")
    plan = build_plan(root, variants=1, scores=[0.3, 0.7], models=tiny_models)
    plan.save(tmp_path / "plan")
    # A real image outside the data root whose pixels match the plan's hash of ant/0.png.
    (tmp_path / "outside").mkdir()
    shutil.copy(root / "ant" / "0.png", tmp_path / "outside" / "0.png")
    return tmp_path, plan


@pytest.mark.parametrize("hostile", ["../outside/0.png", "ant/../../outside/0.png", "ABSOLUTE"])
def test_warm_refuses_sources_outside_the_data_root(folder_plan, spec, generator, tmp_path, hostile):
    base, plan = folder_plan
    if hostile == "ABSOLUTE":
        hostile = str(base / "outside" / "0.png")
    crafted = _edit_plan(base / "plan", tmp_path / "crafted",
                         rows=lambda r: {**r, "source": hostile} if r["source"] == "ant/0.png" else r)
    crafted_plan = AugmentationPlan.load(crafted)
    cache = SyntheticCache(tmp_path / "cache", spec)
    with pytest.raises(InputError) as info:
        warm(crafted_plan, cache, generator=generator, progress=False)
    assert repr(hostile) in str(info.value) and "data root" in str(info.value)
    assert len(cache.keys()) == 0


def test_warm_checks_every_source_before_generating(folder_plan, spec, generator, tmp_path):
    """A crafted row late in the plan stops warm before the first batch, not after some were written."""
    base, plan = folder_plan
    crafted = _edit_plan(base / "plan", tmp_path / "crafted",
                         rows=lambda r: {**r, "source": "../outside/0.png"} if r["source"] == "bee/0.png" else r)
    cache = SyntheticCache(tmp_path / "cache", spec)
    with pytest.raises(InputError, match=r"'\.\./outside/0\.png'"):
        warm(AugmentationPlan.load(crafted), cache, generator=generator, batch_size=1, progress=False)
    assert len(cache.keys()) == 0


def test_warm_cli_one_line_for_etc_passwd(folder_plan, tiny_models, tmp_path, capsys):
    base, plan = folder_plan
    crafted = _edit_plan(base / "plan", tmp_path / "crafted",
                         rows=lambda r: {**r, "source": "../../../etc/passwd"})
    models = tmp_path / "models.json"
    models.write_text(json.dumps(tiny_models.to_dict()), encoding="utf-8")
    code = main(["warm", "--plan", str(crafted), "--cache", str(tmp_path / "cache"), "--models", str(models),
                 "--steps", "2", "--size", "32", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'../../../etc/passwd'" in err and "Traceback" not in err


def test_contact_sheet_refuses_sources_outside_the_data_root(folder_plan, spec, tmp_path):
    from dalda_aug.viz import plan_contact_sheet

    base, plan = folder_plan
    crafted = _edit_plan(base / "plan", tmp_path / "crafted",
                         rows=lambda r: {**r, "source": "../outside/0.png"} if r["source"] == "ant/0.png" else r)
    with pytest.raises(InputError, match="'../outside/0.png' is not a path inside"):
        plan_contact_sheet(AugmentationPlan.load(crafted), SyntheticCache(tmp_path / "cache", spec), tile=32)


def test_source_path_rules(tmp_path):
    assert source_path(tmp_path, "cat/0.png") == tmp_path / "cat" / "0.png"
    assert source_path(tmp_path, "cat/..png") == tmp_path / "cat" / "..png"  # a file name, not a parent
    for bad in ["../x.png", "/etc/passwd", "cat/../../x.png", "cat/..", "", "a\\..\\..\\x"]:
        with pytest.raises(InputError, match="not a path inside"):
            source_path(tmp_path, bad)


def test_warm_follows_a_symlinked_class_folder(tmp_path, tiny_models, spec, generator):
    """Links inside the data root (put there by its owner) keep working, as in torchvision."""
    root, real = tmp_path / "data", tmp_path / "elsewhere" / "bee"
    (root / "ant").mkdir(parents=True)
    real.mkdir(parents=True)
    noise(1).save(root / "ant" / "0.png")
    noise(2).save(real / "0.png")
    (root / "bee").symlink_to(real, target_is_directory=True)
    plan = build_plan(root, variants=1, scores=[0.3, 0.7], models=tiny_models)
    assert sorted(plan.sources()) == ["ant/0.png", "bee/0.png"]
    cache = SyntheticCache(tmp_path / "cache", spec)
    report = warm(plan, cache, generator=generator, progress=False)
    assert report.generated == 2 and len(cache.keys()) == 2


# -- 10: RGBA, palette with transparency and 16-bit sources ----------------------------------------
def _odd_images(root):
    """RGBA, P + transparency and I;16 PNGs with their expected RGB pixels, computed here with
    numpy: alpha composited on white, 16-bit values divided by 257."""
    rng = np.random.default_rng(5)
    expected = {}
    (root / "alpha").mkdir(parents=True)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgba[:5, :, 3] = 0  # fully transparent rows whose colour must not show
    Image.fromarray(rgba, "RGBA").save(root / "alpha" / "rgba.png")
    a = rgba[..., 3:].astype(np.float64) / 255.0
    expected["alpha/rgba.png"] = rgba[..., :3] * a + 255.0 * (1.0 - a)

    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (20, 24), dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.flatten().tolist())
    p.info["transparency"] = 3
    p.save(root / "alpha" / "palette.png", transparency=3)
    pal = palette[idx].astype(np.float64)
    pal[idx == 3] = 255.0
    expected["alpha/palette.png"] = pal

    (root / "deep").mkdir()
    deep = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    Image.fromarray(deep).save(root / "deep" / "i16.png")
    assert Image.open(root / "deep" / "i16.png").mode.startswith("I")
    expected["deep/i16.png"] = np.repeat((deep / 257.0)[..., None], 3, axis=2)
    return expected


def test_odd_modes_real_pixels_and_reference_agree(tmp_path, tiny_models, spec, generator):
    root = tmp_path / "data"
    expected = _odd_images(root)
    plan = build_plan(root, variants=1, scores=[0.2, 0.5, 0.8], models=tiny_models)
    # warm makes the variants from the files as the plan reads them ...
    warmed = SyntheticCache(tmp_path / "warmed", spec)
    assert warm(plan, warmed, generator=generator, progress=False).generated == 3
    # ... and the dataset over a stock ImageFolder, generating on a miss, agrees with it.
    fresh = SyntheticCache(tmp_path / "fresh", spec)
    base = ImageFolder(root)
    ds = SyntheticAugmentedDataset(base, plan, fresh, p=1.0, on_miss="generate", generator=generator)
    real = SyntheticAugmentedDataset(ImageFolder(root), plan, fresh, p=0.0)
    for index, (path, label) in enumerate(base.samples):
        source = os.path.relpath(path, root).replace(os.sep, "/")
        image, target = real[index]
        assert target == label and image.mode == "RGB"
        np.testing.assert_allclose(np.asarray(image, dtype=np.float64), expected[source], atol=1.0)
        synthetic, target = ds[index]
        assert target == label
        variant = ds.variants_for(index)[0]
        # The same reference pixels give the same image (batched vs alone: within one grey level).
        diff = np.abs(np.asarray(synthetic, dtype=np.int16) - np.asarray(warmed.get(variant).image, dtype=np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01
    assert len(fresh.keys()) == 3


@pytest.mark.parametrize("kind", ["timm", "hugging_face"])
def test_odd_modes_other_bases_serve_the_plans_pixels(tmp_path, tiny_models, spec, kind):
    from dalda_aug.dataset import source_ids

    root = tmp_path / "data"
    expected = _odd_images(root)
    plan = build_plan(root, variants=1, scores=[0.2, 0.5, 0.8], models=tiny_models)
    if kind == "timm":
        from timm.data import ImageDataset

        base = ImageDataset(str(root))
    else:
        datasets = pytest.importorskip("datasets")
        base = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    # Constructing with p > 0 checks every source against the plan's hash (no false mismatch).
    SyntheticAugmentedDataset(base, plan, SyntheticCache(tmp_path / "c", spec), p=0.5, on_miss="generate")
    real = SyntheticAugmentedDataset(base, plan, SyntheticCache(tmp_path / "c", spec), p=0.0)
    for index, source in enumerate(source_ids(base, root)):
        image, _ = real[index]
        assert image.mode == "RGB"
        np.testing.assert_allclose(np.asarray(image, dtype=np.float64), expected[source], atol=1.0)


class _MirroredFolder(ImageFolder):
    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image.transpose(Image.FLIP_LEFT_RIGHT), label


def test_an_overridden_getitem_is_kept(tmp_path, tiny_models, spec):
    """Only torchvision's own __getitem__ is replaced by a read of the file."""
    root = tmp_path / "data"
    for c, name in enumerate(["ant", "bee"]):
        (root / name).mkdir(parents=True)
        noise(c).save(root / name / "0.png")
    plan = build_plan(root, variants=1, scores=[0.3, 0.7], models=tiny_models)
    ds = SyntheticAugmentedDataset(_MirroredFolder(root), plan, SyntheticCache(tmp_path / "c", spec), p=0.0)
    image, _ = ds[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(noise(0))[:, ::-1])


def _convert_loader(path: str) -> Image.Image:
    with open(path, "rb") as fh:
        return Image.open(fh).convert("RGB")


def test_custom_loader_that_drops_alpha_is_named(tmp_path, tiny_models, spec):
    root = tmp_path / "data"
    _odd_images(root)
    plan = build_plan(root, variants=1, scores=[0.2, 0.5, 0.8], models=tiny_models)
    base = DatasetFolder(str(root), loader=_convert_loader, extensions=(".png",))
    with pytest.raises(InputError, match="loader gives other pixels than the file holds"):
        SyntheticAugmentedDataset(base, plan, SyntheticCache(tmp_path / "c", spec), p=0.5, on_miss="generate")


# -- 11: a truncated image names its file, also from DataLoader workers ---------------------------
def _truncated_folder(root):
    for c, name in enumerate(["ant", "bee"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            noise(10 * c + i, size=(64, 48)).save(root / name / f"{i}.jpg", quality=90)
    data = (root / "bee" / "1.jpg").read_bytes()
    (root / "bee" / "1.jpg").write_bytes(data[: len(data) // 2])
    return root / "bee" / "1.jpg"


@pytest.mark.parametrize("loader", ["stock", "custom", "timm"])
def test_truncated_jpeg_in_dataloader_workers_names_the_file(tmp_path, tiny_models, spec, loader):
    root = tmp_path / "data"
    bad = _truncated_folder(root)
    with pytest.raises(OSError, match="truncated"):  # what PIL itself says, without a file name
        Image.open(bad).load()
    if loader == "timm":  # timm's own retry loop would serve the next file instead, with a log line
        from timm.data import ImageDataset

        base = ImageDataset(str(root))
    else:
        base = ImageFolder(root) if loader == "stock" else DatasetFolder(str(root), loader=_convert_loader,
                                                                          extensions=(".jpg",))
    good = tmp_path / "good"  # the plan comes from a copy without the damaged file
    for name in ["ant", "bee"]:
        shutil.copytree(root / name, good / name)
    (good / "bee" / "1.jpg").unlink()
    plan = build_plan(good, variants=1, scores=[0.3, 0.5, 0.7], models=tiny_models)
    ds = SyntheticAugmentedDataset(base, plan, SyntheticCache(tmp_path / "c", spec), p=0.0)
    loader_ = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda batch: batch)
    assert_workers_name_the_file(loader_, ds, bad, "truncated", 3)


# -- issue 12 point 10: the CLI's generation dtype follows the device -------------------------------
def test_cli_dtype_default_follows_the_device(tiny_models, tmp_path):
    from dalda_aug.cli.cache import default_dtype, spec_from_args

    models = tmp_path / "models.json"
    models.write_text(json.dumps(tiny_models.to_dict()), encoding="utf-8")
    args = dict(models=str(models), steps=None, size=None, guidance_scale=None, scheduler=None, dtype=None)
    assert spec_from_args(argparse.Namespace(**args, device="cuda:1")).dtype == "float16"
    assert spec_from_args(argparse.Namespace(**args, device="cpu")).dtype == "float32"
    assert spec_from_args(argparse.Namespace(**{**args, "dtype": "bfloat16"}, device="cuda")).dtype == "bfloat16"
    import torch

    assert default_dtype() == ("float16" if torch.cuda.is_available() else "float32")
