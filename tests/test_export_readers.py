"""The exports as their readers take them (issue 28 part 2, issue 27 points 9 and 10).

Every reader is pointed at the export folder exactly as README.md and docs/scaling.md print it:
each snippet is looked up verbatim in the docs, then run against a real export. Expected values
come from the test's own variants and from the cache read by a fresh :class:`SyntheticCache`.

An export owns only what its manifest lists: a folder holding the user's files and no manifest
is refused with its files byte-identical; a manifest that is too deep, a FIFO or a link is one
line, never a ``RecursionError`` or a hang.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.cache.export import decode_parquet_batch, export
from dalda_aug.cli import main
from dalda_aug.config import ModelConfig
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import Variant

from helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCALING = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
CLASSES = ["red_fox", "tabby_cat", "猫"]
N = 7


def _variant(i: int) -> Variant:
    label = i % len(CLASSES)
    return Variant(source=f"{CLASSES[label]}/img{i}.png", label=label, class_name=CLASSES[label], score=0.5,
                   variant=i % 3, prompt=f"a photo of a {CLASSES[label]}, take {i}", lam=round(0.15 + i / 100, 6),
                   seed=500 + i, source_sha256=f"{i + 1:064x}")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))


def _spec() -> GenerationSpec:
    # The paper's models by name: nothing is loaded, the spec only makes keys.
    return GenerationSpec(ModelConfig(), IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A cache of N variants over three classes, and its three exports (shards of 3 samples)."""
    base = tmp_path_factory.mktemp("readers")
    cache = SyntheticCache(base / "cache", _spec(), shard="t")
    variants = {cache.put(v, _image(v.seed)): v for v in map(_variant, range(N))}
    for fmt in ("parquet", "webdataset", "imagefolder"):
        assert main(["cache", "export", "--cache", str(base / "cache"), "--out", str(base / fmt), "--as", fmt,
                     "--no-progress", *(["--shard-size", "3"] if fmt != "imagefolder" else [])]) == 0
    pixels = {key: np.asarray(SyntheticCache(base / "cache").get_image(key).convert("RGB")) for key in variants}
    return base, variants, pixels


def _doc_line(doc: str, start: str) -> str:
    """The one line of ``doc`` that starts with ``start`` (after indentation), without its comment."""
    lines = [line.strip() for line in doc.splitlines() if line.strip().startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0].split("  # ")[0]


def _run(code: str, **names):
    """Run a documented statement with warnings as errors, in a namespace holding ``names``."""
    namespace = dict(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(code, namespace)  # noqa: S102 (the docs' own line)
    return namespace


# -- issue 28: Parquet pointed at the folder ----------------------------------------------------------
def test_parquet_folder_reads_in_pyarrow_pandas_duckdb_and_hf(exported, tmp_path):
    base, variants, pixels = exported
    folder = str(base / "parquet")
    keys = sorted(variants)
    assert (base / "parquet" / ".dalda-export" / "manifest-parquet.json").is_file()  # present, and hidden
    imports = _doc_line(README, "import datasets, duckdb")
    ns = _run(imports)

    table = _run(_doc_line(README, "table = pyarrow.parquet.read_table(DIR)"), DIR=folder, **ns)["table"]
    via_dataset = _run("table = pyarrow.dataset.dataset(DIR).to_table()", DIR=folder, **ns)["table"]
    assert "pyarrow.dataset.dataset(DIR).to_table()" in README
    frame = _run(_doc_line(README, "frame = pandas.read_parquet(DIR)"), DIR=folder, **ns)["frame"]
    rows = _run(_doc_line(README, "rows = duckdb.sql("), DIR=folder, **ns)["rows"]
    for got in (sorted(table.column("key").to_pylist()), sorted(via_dataset.column("key").to_pylist()),
                sorted(frame["key"]), sorted(r[0] for r in rows)):
        assert got == keys
    assert sorted(rows) == sorted((k, variants[k].label, variants[k].lam) for k in keys)
    by_key = frame.set_index("key")
    for key, v in variants.items():
        got = (by_key.loc[key, "label"], by_key.loc[key, "class"], by_key.loc[key, "lam"])
        assert got == (v.label, v.class_name, v.lam)

    hf = _run(_doc_line(README, 'hf = datasets.load_dataset("parquet"').replace(
        'split="train")', f'split="train", cache_dir={str(tmp_path / "hf")!r})'), DIR=folder, **ns)["hf"]
    assert hf.features["label"].names == CLASSES and type(hf.features["image"]).__name__ == "Image"
    assert sorted(hf["key"]) == keys
    for row in hf:
        v = variants[row["key"]]
        assert (hf.features["label"].int2str(row["label"]), row["lam"], row["seed"]) == (v.class_name, v.lam, v.seed)
        np.testing.assert_array_equal(np.asarray(row["image"]), pixels[row["key"]])


# -- issue 28: the image folder in HF's imagefolder loader and torchvision ---------------------------
def test_image_folder_labels_are_the_folders_in_hf_and_torchvision(exported, tmp_path):
    base, variants, pixels = exported
    folder = str(base / "imagefolder")
    ns = _run(_doc_line(README, "import datasets, duckdb"))
    hf = _run(_doc_line(README, 'hf_folder = datasets.load_dataset("imagefolder"').replace(
        'split="train")', f'split="train", cache_dir={str(tmp_path / "hf")!r})'), E=folder, **ns)["hf_folder"]
    tv = _run(_doc_line(README, "folder = torchvision.datasets.ImageFolder(E)"), E=folder, **ns)["folder"]
    # The class folders, sorted: what torchvision's ImageFolder finds, independently of the export.
    folders = sorted(p.name for p in (base / "imagefolder").iterdir() if p.is_dir())
    assert folders == sorted(CLASSES) and tv.classes == folders
    assert set(hf.column_names) == {"image", "label"}
    assert type(hf.features["label"]).__name__ == "ClassLabel" and hf.features["label"].names == folders
    by_key16 = {key[:16]: v for key, v in variants.items()}
    paths = hf.cast_column("image", type(hf.features["image"])(decode=False))
    assert len(hf) == len(tv) == N
    for row, raw in zip(hf, paths):
        key16 = Path(raw["image"]["path"]).stem
        assert hf.features["label"].int2str(row["label"]) == by_key16[key16].class_name
        np.testing.assert_array_equal(np.asarray(row["image"]), pixels[next(k for k in variants if k[:16] == key16)])
    for path, label in tv.samples:
        assert tv.classes[label] == by_key16[Path(path).stem].class_name
    # The metadata keeps λ under the name every format uses.
    with (base / "imagefolder" / "samples.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert not (base / "imagefolder" / "metadata.csv").exists()
    assert {row["key"]: float(row["lam"]) for row in rows} == {k: v.lam for k, v in variants.items()}


def test_the_docs_table_gives_one_name_per_field(exported):
    base, variants, _ = exported
    key = sorted(variants)[0]
    row = re.search(r"^\| λ \(IP-Adapter scale\) \|(.*)\|$", README, re.M)
    assert row is not None and [c.strip() for c in row.group(1).split("|")] == ["`lam`"] * 3
    with (base / "imagefolder" / "samples.csv").open(encoding="utf-8") as fh:
        assert "lam" in next(csv.reader(fh))
    import pyarrow.parquet as pq
    assert "lam" in pq.read_schema(base / "parquet" / "shard-000000.parquet").names
    import tarfile
    with tarfile.open(base / "webdataset" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    assert meta["lam"] == variants[key].lam and "lambda" not in meta


# -- issue 28: webdataset's documented forms raise no warning -----------------------------------------
def test_webdataset_documented_forms_are_warning_free(exported, tmp_path):
    base, variants, pixels = exported
    folder = str(base / "webdataset")
    readme = _doc_line(README, "samples = webdataset.WebDataset(")
    scaling = _doc_line(SCALING, 'synthetic = wds.WebDataset("EXPORT/shard-{000000..012799}.tar"')
    scaling += " " + _doc_line(SCALING, '.shuffle(5000).decode("pil")')
    scaling = scaling.replace(" \\", "").replace('"EXPORT/shard-{000000..012799}.tar"',
                                                  repr(folder + "/shard-{000000..000002}.tar"))
    import webdataset

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # webdataset's tar readers leave their files to the garbage collector: not the docs' form.
        warnings.simplefilter("ignore", ResourceWarning)
        read = list(_run(readme, DIR=folder, glob=glob, webdataset=webdataset)["samples"])
        mixed = list(_run(scaling, wds=webdataset, train_transform=np.asarray)["synthetic"])
    expected = sorted((v.label, pixels[k].tobytes()) for k, v in variants.items())
    assert sorted((cls, np.asarray(img).tobytes()) for img, cls in read) == expected
    assert sorted((cls, img.tobytes()) for img, cls in mixed) == expected

    ns = _run(_doc_line(README, "import datasets, duckdb"))
    hf = _run(_doc_line(README, 'hf_tars = datasets.load_dataset("webdataset"').replace(
        'split="train")', f'split="train", cache_dir={str(tmp_path / "hf")!r})'), DIR=folder, **ns)["hf_tars"]
    assert sorted(hf["__key__"]) == sorted(variants)
    assert {row["__key__"]: row["cls"] for row in hf} == {k: v.label for k, v in variants.items()}


# -- issue 28: Ray Data's numpy batches ---------------------------------------------------------------
def _ray_batches(folder: Path, batch_size: int):
    """Batches as Ray Data's ``map_batches(..., batch_format="numpy")`` hands them over: each
    pyarrow column turned into numpy with ``to_numpy(zero_copy_only=False)`` (structs become
    object arrays of dicts)."""
    import pyarrow.parquet as pq

    for path in sorted(folder.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}


def test_decode_parquet_batch_gives_tensors_ray_can_batch(exported):
    import torch

    base, variants, pixels = exported
    assert "map_batches(decode_parquet_batch" in SCALING and "decode_parquet_batch" in README
    seen = {}
    for batch in _ray_batches(base / "parquet", batch_size=2):
        assert batch["image"].dtype == object  # what iter_torch_batches fails on
        decoded = decode_parquet_batch(batch)
        assert set(decoded) == {"image", "label"}
        images = torch.as_tensor(decoded["image"])  # what iter_torch_batches does with each column
        labels = torch.as_tensor(decoded["label"])
        assert images.dtype == torch.uint8 and images.shape[1:] == (32, 40, 3) and labels.dtype == torch.int64
        for key, image, label in zip(batch["key"], images.numpy(), labels.tolist()):
            seen[key] = (image, label)
    assert sorted(seen) == sorted(variants)
    for key, (image, label) in seen.items():
        np.testing.assert_array_equal(image, pixels[key])
        assert label == variants[key].label


def test_decode_parquet_batch_ragged_and_broken_rows():
    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (w, h, 7)).save(buf, "PNG")
        return buf.getvalue()

    import pyarrow as pa

    table = pa.table({"image": [{"bytes": png(4, 3), "path": "a.png"}, {"bytes": png(5, 2), "path": "b.png"}],
                      "label": [1, 0]})
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    decoded = decode_parquet_batch(batch)
    assert decoded["image"].dtype == object and [a.shape for a in decoded["image"]] == [(3, 4, 3), (2, 5, 3)]
    assert decoded["image"][1][0, 0].tolist() == [5, 2, 7] and decoded["label"].tolist() == [1, 0]
    broken = {"image": np.array([{"bytes": None, "path": "gone.png"}], dtype=object), "label": np.array([0])}
    with pytest.raises(InputError, match="gone.png"):
        decode_parquet_batch(broken)


# -- issue 27.9: an export deletes only what it wrote ------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_a_folder_of_the_users_files_is_refused_and_left_as_is(exported, tmp_path, fmt, capsys):
    base, _, _ = exported
    out = tmp_path / "mine"
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):  # the user's own shards, no manifest
        (out / f"shard-{i:06d}.tar").write_bytes(rng.bytes(700 + i))
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["cache", "export", "--cache", str(base / "cache"), "--out", str(out), "--as", fmt,
                 "--no-progress"]) == 2
    line = _one_line(capsys)
    assert str(out) in line and "not empty" in line
    assert _snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)


def test_only_files_the_manifest_lists_are_replaced_or_removed(exported, tmp_path, capsys):
    base, variants, _ = exported
    out = tmp_path / "tars"
    cache = SyntheticCache(base / "cache")
    assert export(cache, out, "webdataset", shard_size=3)["shards"] == 3
    # The user drops files of their own beside the export: one at a name a larger export would use.
    (out / "shard-000005.tar").write_bytes(b"mine, not a shard")
    (out / "notes.txt").write_text("keep me")
    again = export(cache, out, "webdataset", shard_size=2)  # 4 shards: 000003 is new, 000005 is not ours
    assert again["shards"] == 4
    assert (out / "shard-000005.tar").read_bytes() == b"mine, not a shard"
    assert (out / "notes.txt").read_text() == "keep me"
    fewer = export(cache, out, "webdataset", shard_size=7)  # 1 shard: 000001..000003 (ours) are removed
    assert fewer["shards"] == 1
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000005.tar"]
    assert (out / "notes.txt").read_text() == "keep me"
    # A shard name this export would write, held by a file it did not write: refused, untouched.
    (out / "shard-000002.tar").write_bytes(b"also mine")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["cache", "export", "--cache", str(base / "cache"), "--out", str(out), "--as", "webdataset",
                 "--shard-size", "2", "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "shard-000002.tar" in line and "does not list it" in line
    assert _snapshot(out) == before


def test_image_folder_reexport_replaces_its_own_files_only(exported, tmp_path):
    base, variants, _ = exported
    out = tmp_path / "folder"
    cache = SyntheticCache(base / "cache")
    assert export(cache, out)["exported"] == N
    (out / "README.txt").write_text("the user's")
    (out / "red_fox" / "notes.txt").write_text("the user's too")
    (out / "red_fox" / ".notes.txt.tmp-1").write_text("the user's, hidden")
    first = _snapshot(out)
    killed = out / "red_fox" / ".0123456789abcdef.png.tmp-host-99-x1y2"  # what a killed export leaves
    killed.write_bytes(b"half a PNG")
    assert export(cache, out)["exported"] == N  # a rerun over its own export
    assert _snapshot(out) == first and not killed.exists()
    # A smaller export over it: the earlier images it does not write go, the user's files stay.
    from dalda_aug.plan import AugmentationPlan

    two = AugmentationPlan([_variant(0), _variant(3)], {"classes": CLASSES})  # both red_fox
    assert SyntheticCache(base / "cache", _spec()).export(out, two)["exported"] == 2
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    pngs = {f"red_fox/{SyntheticCache(base / 'cache', _spec()).key(v)[:16]}.png" for v in two}
    assert left == pngs | {"samples.csv", ".manifest-imagefolder.json", "README.txt", "red_fox/notes.txt",
                           "red_fox/.notes.txt.tmp-1"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["red_fox"]  # emptied class folders removed
    (out / "elsewhere").mkdir()  # a class folder it would need, made by the user: refused
    before = _snapshot(out)
    with pytest.raises(InputError, match="does not list it"):
        SyntheticCache(base / "cache", _spec()).export(out, _plan_with_class("elsewhere"))
    assert _snapshot(out) == before


def _plan_with_class(name: str):
    from dalda_aug.plan import AugmentationPlan

    variants = [_variant(i) for i in range(N)]
    return AugmentationPlan(variants, {"classes": [name, *CLASSES[1:]]})


def test_an_old_manifest_is_read_and_migrated(exported, tmp_path):
    base, variants, _ = exported
    out = tmp_path / "old"
    cache = SyntheticCache(base / "cache")
    export(cache, out, "parquet", shard_size=3)
    # As an earlier version left it: manifest-parquet.json among the shards, without "files".
    body = json.loads((out / ".dalda-export" / "manifest-parquet.json").read_text(encoding="utf-8"))
    del body["files"]
    (out / "manifest-parquet.json").write_text(json.dumps(body), encoding="utf-8")
    for p in (out / ".dalda-export").iterdir():
        p.unlink()
    (out / ".dalda-export").rmdir()
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    again = export(cache, out, "parquet", shard_size=3)
    assert (again["written"], again["skipped"]) == (0, 3)  # its shards recognised, none rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == shards
    assert not (out / "manifest-parquet.json").exists()
    assert json.loads((out / ".dalda-export" / "manifest-parquet.json").read_text(encoding="utf-8"))["complete"]


# -- issue 27.10: manifests are read bounded -----------------------------------------------------------
def test_a_deep_manifest_is_one_line(exported, tmp_path, capsys):
    base, _, _ = exported
    out = tmp_path / "deep"
    (out / ".dalda-export").mkdir(parents=True)
    (out / ".dalda-export" / "manifest-webdataset.json").write_text("[" * 200_000 + "]" * 200_000)
    (out / "shard-000000.tar").write_bytes(b"left as is")
    capsys.readouterr()
    assert main(["cache", "export", "--cache", str(base / "cache"), "--out", str(out), "--as", "webdataset",
                 "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "manifest" in line and "deep" in line
    assert (out / "shard-000000.tar").read_bytes() == b"left as is"


@pytest.mark.parametrize("plant", ["fifo", "old-name-fifo", "symlink", "linked-folder"])
def test_a_fifo_or_linked_manifest_is_refused_without_hanging(exported, tmp_path, plant):
    import subprocess
    import sys

    base, _, _ = exported
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest-parquet.json").write_text(json.dumps({"format": "dalda_aug.export/1", "as": "parquet",
                                                              "files": [], "shards": []}))
    out.mkdir()
    if plant == "fifo":
        (out / ".dalda-export").mkdir()
        os.mkfifo(out / ".dalda-export" / "manifest-parquet.json")
    elif plant == "old-name-fifo":
        os.mkfifo(out / "manifest-parquet.json")
    elif plant == "symlink":
        (out / ".dalda-export").mkdir()
        (out / ".dalda-export" / "manifest-parquet.json").symlink_to(victim / "manifest-parquet.json")
    else:
        (out / ".dalda-export").symlink_to(victim, target_is_directory=True)
    before = _snapshot(victim)
    done = subprocess.run([sys.executable, "-m", "dalda_aug", "cache", "export", "--cache", str(base / "cache"),
                           "--out", str(out), "--as", "parquet", "--no-progress"], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    expected = {"fifo": "FIFO", "old-name-fifo": "FIFO", "symlink": "symbolic link",
                "linked-folder": "not a plain folder"}
    assert expected[plant] in lines[0]
    assert _snapshot(victim) == before and not list(out.glob("shard-*"))
