"""`dalda-aug cache export --as webdataset|parquet`: shards read back by the real `webdataset`
and `datasets` packages, pixel-equal to the cache; resumable after kill -9; corrupt entries
skipped; bad input refused in one line.

Expected values come from the test's own variants and from the cache read independently
(a fresh :class:`SyntheticCache`, ``get_image``), never from the code under test.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.cli import main
from dalda_aug.config import ModelConfig
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import Variant

from helpers import noise_folder

CLASSES = ["red_fox", "tabby_cat", "猫"]


def _variant(i: int, label: int | None = None, classes: list[str] = CLASSES) -> Variant:
    label = i % len(classes) if label is None else label
    return Variant(source=f"{classes[label]}/img{i}.png", label=label, class_name=classes[label], score=0.5,
                   variant=i % 4, prompt=f"a photo of a {classes[label]}, take {i}", lam=round(0.2 + i / 1000, 6),
                   seed=10_000 + i, source_sha256=f"{i:064x}")


def _image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def spec() -> GenerationSpec:
    # The paper's models by name: nothing is loaded, the spec only makes keys.
    return GenerationSpec(ModelConfig(), IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")


def _fill(directory: Path, spec: GenerationSpec, variants: list[Variant], size=(40, 32), **kwargs) -> dict[str, Variant]:
    cache = SyntheticCache(directory, spec, shard="test", **kwargs)
    return {cache.put(v, _image(v.seed, size)): v for v in variants}


def _pixels(directory: Path, key: str) -> np.ndarray:
    """The cache's decoded pixels of ``key``, read by a fresh cache object."""
    image = SyntheticCache(directory).get_image(key)
    assert image is not None, key
    return np.asarray(image.convert("RGB"))


def _export(tmp_path: Path, fmt: str, *extra: str) -> int:
    return main(["cache", "export", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / fmt), "--as", fmt,
                 "--no-progress", *extra])


def _read_webdataset(out: Path) -> list[tuple[str, np.ndarray, int, dict]]:
    import webdataset as wds

    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls", "json")
    return [(key, np.asarray(image), cls, meta) for key, image, cls, meta in dataset]


def _load_parquet(out: Path, tmp_path: Path):
    import datasets

    files = [str(p) for p in sorted(out.glob("shard-*.parquet"))]
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))


def _leftovers(out: Path, suffix: str) -> list[str]:
    return sorted([p.name for p in out.iterdir() if not (p.name.startswith("shard-") and p.name.endswith(suffix))
                   and p.name != ".dalda-export"]
                  + [p.name for p in (out / ".dalda-export").iterdir() if p.name != f"manifest-{out.name}.json"])


# -- webdataset ----------------------------------------------------------------------------------
def test_webdataset_shards_read_back_pixel_equal(tmp_path, spec, capsys):
    entries = _fill(tmp_path / "cache", spec, [_variant(i) for i in range(11)])
    assert _export(tmp_path, "webdataset", "--shard-size", "4") == 0
    assert "exported 11 images" in capsys.readouterr().out
    out = tmp_path / "webdataset"
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert _leftovers(out, ".tar") == []

    samples = _read_webdataset(out)
    assert [key for key, *_ in samples] == sorted(entries)  # every entry once, in key order
    for key, pixels, cls, meta in samples:
        v = entries[key]
        assert "." not in key
        np.testing.assert_array_equal(pixels, _pixels(tmp_path / "cache", key))
        assert cls == v.label
        assert meta == {"key": key, "source": v.source, "class": v.class_name, "label": v.label, "prompt": v.prompt,
                        "lam": v.lam, "seed": v.seed, "variant": v.variant}

    # Each shard holds --shard-size samples (the last the rest): <key>.png, .cls (decimal text), .json.
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        first = sorted(entries)[0]
        assert tar.extractfile(f"{first}.cls").read() == str(entries[first].label).encode()
    assert len(names) == 3 * 4 and {n.rsplit(".", 1)[1] for n in names} == {"png", "cls", "json"}
    with tarfile.open(out / "shard-000002.tar") as tar:
        assert len(tar.getnames()) == 3 * 3
    manifest = json.loads((out / ".dalda-export" / "manifest-webdataset.json").read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["samples"] == 11 and manifest["classes"] == CLASSES


def test_webdataset_pngs_are_lossless_for_every_cache_format(tmp_path, spec):
    # Entries stored as png / webp / raw: the export holds the cache's decoded pixels exactly.
    entries = {}
    for n, fmt in enumerate(("png", "webp", "raw")):
        entries.update(_fill(tmp_path / "cache", spec, [_variant(20 + n)], size=(33, 17), image_format=fmt))
    assert _export(tmp_path, "webdataset") == 0
    samples = _read_webdataset(tmp_path / "webdataset")
    assert len(samples) == 3 and len(list((tmp_path / "webdataset").glob("*.tar"))) == 1  # default shard size
    for key, pixels, _, _ in samples:
        assert pixels.shape == (17, 33, 3)
        np.testing.assert_array_equal(pixels, _pixels(tmp_path / "cache", key))


# -- parquet -------------------------------------------------------------------------------------
def test_parquet_loads_with_datasets_image_and_classlabel(tmp_path, spec, capsys):
    import datasets
    import pyarrow.parquet as pq

    entries = _fill(tmp_path / "cache", spec, [_variant(i) for i in range(7)])
    assert _export(tmp_path, "parquet", "--shard-size", "3") == 0
    out = tmp_path / "parquet"
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"shard-00000{i}.parquet" for i in range(3)]
    assert _leftovers(out, ".parquet") == []

    ds = _load_parquet(out, tmp_path)
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel) and ds.features["label"].names == CLASSES
    assert set(ds.column_names) == {"image", "label", "key", "source", "class", "prompt", "lam", "seed", "variant"}
    assert ds["key"] == sorted(entries)
    for row in ds:
        v = entries[row["key"]]
        np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), _pixels(tmp_path / "cache", row["key"]))
        assert row["image"].mode == "RGB"
        assert (row["label"], row["class"], row["source"], row["prompt"], row["lam"], row["seed"], row["variant"]) == (
            v.label, v.class_name, v.source, v.prompt, v.lam, v.seed, v.variant)
        assert ds.features["label"].int2str(row["label"]) == v.class_name

    # Plain Parquet for other readers: files of --shard-size rows, image = {bytes: PNG, path}.
    table = pq.read_table(out / "shard-000000.parquet")
    assert table.num_rows == 3 and pq.ParquetFile(out / "shard-000002.parquet").metadata.num_rows == 1
    image = table.column("image")[0].as_py()
    assert image["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and image["path"] == f"{table.column('key')[0].as_py()}.png"
    with Image.open(io.BytesIO(image["bytes"])) as img:
        np.testing.assert_array_equal(np.asarray(img), _pixels(tmp_path / "cache", table.column("key")[0].as_py()))


def test_export_with_a_plan_takes_its_variants_and_classes(tmp_path, spec, capsys):
    from dalda_aug.plan import build_plan

    root = noise_folder(tmp_path / "data", ["red_fox", "tabby_cat"], per_class=3)
    plan = build_plan(root, variants=2, scores=[0.1, 0.2, 0.3, 0.6, 0.7, 0.8], models=spec.models)
    plan.save(tmp_path / "plan")
    cache = SyntheticCache(tmp_path / "cache", spec, shard="test")
    cached = {cache.put(v, _image(v.seed % 997)): v for v in plan.variants[3:]}  # 9 of the plan's 12
    stray = cache.put(_variant(99, label=0), _image(99))  # not in the plan: not exported
    cache.record_spec(plan)  # what warm does

    for fmt in ("parquet", "webdataset"):
        assert _export(tmp_path, fmt, "--plan", str(tmp_path / "plan"), "--shard-size", "4") == 0
        assert "3 images of the plan are not cached" in capsys.readouterr().out
    ds = _load_parquet(tmp_path / "parquet", tmp_path)
    assert ds.features["label"].names == plan.config["classes"] == ["red_fox", "tabby_cat"]
    assert ds["key"] == sorted(cached) and stray not in ds["key"]
    for row in ds:
        v = cached[row["key"]]
        assert (row["label"], row["class"], row["source"], row["lam"], row["seed"]) == (
            v.label, plan.config["classes"][v.label], v.source, v.lam, v.seed)
        np.testing.assert_array_equal(np.asarray(row["image"]), _pixels(tmp_path / "cache", row["key"]))
    samples = _read_webdataset(tmp_path / "webdataset")
    assert [key for key, *_ in samples] == sorted(cached)
    assert all(cls == cached[key].label for key, _, cls, _ in samples)


# -- corrupt entries, resuming ------------------------------------------------------------------
def test_corrupt_entries_are_skipped_and_counted(tmp_path, spec, capsys):
    import diskcache

    entries = _fill(tmp_path / "cache", spec, [_variant(i) for i in range(6)])
    bad = sorted(entries)[2]
    with diskcache.Cache(str(tmp_path / "cache" / "shard-test")) as raw:
        blob = raw.get(bad)
        raw.set(bad, blob[: len(blob) - 5])  # truncated image bytes
    good = {k: np.asarray(_image(v.seed)) for k, v in entries.items() if k != bad}  # what was put

    assert _export(tmp_path, "webdataset", "--shard-size", "2") == 0
    out = capsys.readouterr().out
    assert "exported 5 images" in out and "1 corrupt entries skipped" in out
    assert _export(tmp_path, "parquet", "--shard-size", "2") == 0  # the bad entry was removed (writable cache)
    assert "exported 5 images" in capsys.readouterr().out
    samples = _read_webdataset(tmp_path / "webdataset")
    assert [k for k, *_ in samples] == sorted(good)
    for key, pixels, _, _ in samples:
        np.testing.assert_array_equal(pixels, good[key])
    ds = _load_parquet(tmp_path / "parquet", tmp_path)
    assert ds["key"] == sorted(good)


def _shard_ids(out: Path, pattern: str) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob(pattern))}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_rerun_skips_complete_shards_and_rewrites_the_rest(tmp_path, spec, fmt):
    from dalda_aug.cache.export import export

    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    entries = _fill(tmp_path / "cache", spec, [_variant(i) for i in range(9)])
    out = tmp_path / fmt
    first = export(SyntheticCache(tmp_path / "cache"), out, fmt, shard_size=3)
    assert (first["exported"], first["shards"], first["written"], first["skipped"]) == (9, 3, 3, 0)
    before = _shard_ids(out, f"shard-*{suffix}")

    again = export(SyntheticCache(tmp_path / "cache"), out, fmt, shard_size=3)
    assert (again["written"], again["skipped"]) == (0, 3)
    assert _shard_ids(out, f"shard-*{suffix}") == before  # not rewritten

    # A damaged shard (same size, one byte changed) is rewritten; the others stay.
    damaged = out / f"shard-000001{suffix}"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    third = export(SyntheticCache(tmp_path / "cache"), out, fmt, shard_size=3)
    assert (third["written"], third["skipped"]) == (1, 2)
    after = _shard_ids(out, f"shard-*{suffix}")
    assert {n: after[n] for n in after if n != damaged.name} == {n: before[n] for n in before if n != damaged.name}

    # Fewer entries: fewer shards; shards left over from the larger export are removed.
    cache = SyntheticCache(tmp_path / "cache")
    for key in sorted(entries)[5:]:
        cache.delete(key)
    fourth = export(SyntheticCache(tmp_path / "cache"), out, fmt, shard_size=3)
    assert (fourth["exported"], fourth["shards"], fourth["written"], fourth["skipped"]) == (5, 2, 1, 1)
    assert sorted(p.name for p in out.glob(f"shard-*{suffix}")) == [f"shard-000000{suffix}", f"shard-000001{suffix}"]
    if fmt == "webdataset":
        assert [k for k, *_ in _read_webdataset(out)] == sorted(entries)[:5]
    else:
        assert _load_parquet(out, tmp_path)["key"] == sorted(entries)[:5]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_kill_9_then_rerun_completes_the_export(tmp_path, spec, fmt):
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    entries = _fill(tmp_path / "cache", spec, [_variant(i) for i in range(240)], size=(160, 160), image_format="raw")
    out = tmp_path / fmt
    cmd = [sys.executable, "-m", "dalda_aug", "cache", "export", "--cache", str(tmp_path / "cache"), "--out", str(out),
           "--as", fmt, "--shard-size", "4", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / f"shard-000000{suffix}").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    shards_at_kill = sorted(out.glob(f"shard-*{suffix}"))
    assert 1 <= len(shards_at_kill) < 60  # killed mid-way
    # The manifest is written before the first shard, listing every shard the run may write.
    manifest = json.loads((out / ".dalda-export" / f"manifest-{fmt}.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == {f"shard-{i:06d}{suffix}" for i in range(60)}
    assert not manifest.get("complete")
    recorded = len(manifest["shards"])  # complete and recorded: the rerun keeps exactly these

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "exported 240 images" in rerun.stdout and "60 shard(s)" in rerun.stdout
    assert f"{60 - recorded} written, {recorded} already complete" in rerun.stdout
    assert _leftovers(out, suffix) == []  # no temporaries
    assert len(list(out.glob(f"shard-*{suffix}"))) == 60
    assert json.loads((out / ".dalda-export" / f"manifest-{fmt}.json").read_text(encoding="utf-8"))["complete"]
    if fmt == "webdataset":
        read = [(key, pixels) for key, pixels, _, _ in _read_webdataset(out)]
    else:
        read = [(row["key"], np.asarray(row["image"])) for row in _load_parquet(out, tmp_path)]
    assert [key for key, _ in read] == sorted(entries)
    for key, pixels in read:
        np.testing.assert_array_equal(pixels, np.asarray(_image(entries[key].seed, (160, 160))))


# -- bad input -----------------------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, spec, capsys):
    _fill(tmp_path / "cache", spec, [_variant(i) for i in range(3)])
    def listing() -> list[str]:  # SQLite's -wal/-shm files come and go with the connections
        return sorted(str(p) for p in (tmp_path / "cache").rglob("*") if not p.name.endswith(("-wal", "-shm")))

    before = listing()

    assert _export(tmp_path, "tfrecord") == 2
    line = _one_line_error(capsys)
    assert "tfrecord" in line and "imagefolder, webdataset, parquet" in line

    for fmt in ("webdataset", "parquet", "imagefolder"):
        for inside in (tmp_path / "cache", tmp_path / "cache" / "export", tmp_path / "cache" / "shard-test"):
            assert main(["cache", "export", "--cache", str(tmp_path / "cache"), "--out", str(inside), "--as", fmt,
                         "--no-progress"]) == 2
            assert "inside the cache folder" in _one_line_error(capsys)
    assert listing() == before  # nothing written there

    for size in ("0", "-3", "many"):
        assert _export(tmp_path, "webdataset", "--shard-size", size) == 2
        assert "shard" in _one_line_error(capsys)
    assert _export(tmp_path, "imagefolder", "--shard-size", "5") == 2
    assert "imagefolder" in _one_line_error(capsys)
    (tmp_path / "afile").write_text("x")
    assert main(["cache", "export", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "afile"),
                 "--as", "parquet", "--no-progress"]) == 2
    assert "not a folder" in _one_line_error(capsys)
    assert not (tmp_path / "webdataset").exists() and not (tmp_path / "imagefolder").exists()

    # The default stays the image folder.
    assert main(["cache", "export", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "folder"),
                 "--no-progress"]) == 0
    assert (tmp_path / "folder" / "samples.csv").is_file() and len(list((tmp_path / "folder").rglob("*.png"))) == 3


def test_entries_of_plans_that_disagree_on_labels_need_a_plan(tmp_path, spec, capsys):
    _fill(tmp_path / "cache", spec, [_variant(0, label=0), _variant(1, label=0, classes=["dog"])])
    assert _export(tmp_path, "parquet") == 2
    line = _one_line_error(capsys)
    assert "label 0" in line and "--plan" in line
    assert not (tmp_path / "parquet").exists()  # refused before anything is written
