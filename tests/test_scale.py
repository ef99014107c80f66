"""Cost at scale (issue 23): construction re-decodes only changed sources (a stat record, as git's
index); the plan is columnar and memory-mapped."""

from __future__ import annotations

import os
from pathlib import Path
import time

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.dataset import SyntheticAugmentedDataset
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import build_plan
from dalda_aug.plan.records import StatRecord

CLASSES = ["ant", "bee"]
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def _write_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"img_{i}.png"
            Image.fromarray(rng.integers(0, 256, (12, 14 + c, 3), dtype=np.uint8)).save(path)
            os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))  # settled: not "racily clean"
    return root


@pytest.fixture()
def setup(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("DALDA_AUG_CACHE", str(tmp_path / "user-cache"))
    root = _write_folder(tmp_path / "folder")
    plan = build_plan(root, variants=2, seed=0, scores=np.linspace(0.1, 0.9, 6), models=tiny_models)
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)
    return root, plan, cache


def _build(setup, **kwargs):
    root, plan, cache = setup
    return SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=0.5, on_miss="error", **kwargs)


def _flip_pixel_keep_stat(path):
    """Change one pixel, keep the file's size, restore its mtime: only a hash, or the ctime the
    kernel set, can tell."""
    before = os.stat(path)
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] ^= 0x80
    Image.fromarray(pixels).save(path)
    if os.path.getsize(path) != before.st_size:  # PNG compression moved: pad to the same size is not
        pytest.skip("the edited PNG compressed to another size")  # possible; never seen with noise
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_stat_mode_skips_unchanged_files_and_full_mode_does_not(setup):
    root, plan, _ = setup
    _build(setup)  # verifies in full and records the stats
    records = list((root.parent / "user-cache" / "stat").glob("stat-*.npy"))
    assert len(records) == 1
    rows = np.load(records[0], allow_pickle=False)
    files = sorted((root).glob("*/*.png"))
    assert sorted(map(tuple, rows.tolist())) == sorted(
        (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) for st in map(os.stat, files))
    _build(setup)  # every stat as recorded: nothing decoded, nothing to find
    victim = root / "bee" / "img_2.png"
    _flip_pixel_keep_stat(victim)  # size and mtime as recorded; the ctime moved (as git's index, it is compared)
    for mode in ("stat", "full"):
        with pytest.raises(InputError, match=f"{victim}.*changed since the plan was made"):
            _build(setup, verify_sources=mode)
    _build(setup, verify_sources="off")


def test_stat_mode_detects_a_normally_changed_file(setup):
    root, _, _ = setup
    _build(setup)
    victim = root / "ant" / "img_1.png"
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[1, 1] ^= 1
    Image.fromarray(pixels).save(victim)  # a new mtime_ns
    with pytest.raises(InputError, match=f"{victim}.*changed since the plan was made"):
        _build(setup)
    _build(setup, verify_sources="off")  # checks nothing


def test_an_untrusted_or_unwritable_record_means_full_verification(setup, monkeypatch, tmp_path):
    root, _, _ = setup
    _build(setup)
    (record,) = (root.parent / "user-cache" / "stat").glob("stat-*.npy")
    victim = root / "bee" / "img_0.png"
    _flip_pixel_keep_stat(victim)
    for garbage in (b"not numpy", np.lib.format.MAGIC_PREFIX + b"\x01\x00" + b"{'descr': '|O'}" + b" " * 64):
        record.write_bytes(garbage)
        with pytest.raises(InputError, match=str(victim)):
            _build(setup)  # the record is ignored: every file is hashed
    np.save(record, np.zeros((3, 2), dtype=np.int64))  # wrong shape
    with pytest.raises(InputError, match=str(victim)):
        _build(setup)
    # a cache folder that cannot be written: nothing fails, verification stays full
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("DALDA_AUG_CACHE", str(blocker))
    with pytest.raises(InputError, match=str(victim)):
        _build(setup)


def test_stat_record_refuses_pickles_and_oversized_files(tmp_path):
    record = StatRecord(["/a", "/b"], ["0" * 64, "1" * 64], tmp_path)
    assert record.load() is None
    assert record.save(np.array([[1, 2], [3, 4]], dtype=np.int64)) and record.load() is None  # (size, mtime) only
    assert record.save(np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64))
    assert record.load().tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    np.save(record.path, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    assert record.load() is None
    record.path.write_bytes(b"\x93NUMPY" + b"\0" * 10_000)
    assert record.load() is None
    assert StatRecord(["/a", "/b"], ["0" * 64, "2" * 64], tmp_path).path != record.path  # hashes bind the name


def test_verify_sources_is_checked(setup):
    with pytest.raises(InputError, match="verify_sources must be one of"):
        _build(setup, verify_sources="fast")


# -- the plan as columns ---------------------------------------------------------------------------------
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402

from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dalda_aug.dataset import CacheMissError  # noqa: E402
from dalda_aug.dataset.draws import draw_name, pick  # noqa: E402
from dalda_aug.plan import AugmentationPlan, Variant  # noqa: E402

M = 10


def _synthetic_plan(n_sources, models, int_sources=True):
    """A plan of ``n_sources`` x M rows written without images (sources are item indices)."""
    rows = [Variant(source=s if int_sources else f"c{s % 3}/img_{s}.png", label=s % 3, class_name=f"class {s % 3}",
                    score=round((s % 97) / 97, 8), variant=k, prompt=f"a photo of a class {s % 3}, take {k}",
                    lam=round(0.1 + k / 20, 8), seed=(s * M + k) * 7919, source_sha256=f"{s:064x}",
                    strength=(0.5 if s % 5 == 0 else None))
            for s in range(n_sources) for k in range(M)]
    config = {"format": "dalda_aug.plan/1", "seed": 0, "n_shot": None, "variants_per_image": M,
              "scaling": {"strategy": "ags"}, "models": models.to_dict(), "data_root": None,
              "classes": ["a", "b", "c"], "class_names": ["class 0", "class 1", "class 2"]}
    return AugmentationPlan(rows, config)


class _Indexed(Dataset):
    """``n`` items of (a tiny PIL image, label s % 3): a base whose plan sources are its indices."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return Image.new("RGB", (4, 4), (i % 256, 0, 0)), i % 3


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_mapped_plan_yields_the_jsonl_rows(tmp_path, tiny_models):
    folder = _synthetic_plan(50, tiny_models, int_sources=False).save(tmp_path / "plan")
    plan = AugmentationPlan.load(folder)
    assert plan.columns.directory == folder
    assert all(not a.flags.writeable and not a.flags.owndata for a in plan.columns.arrays.values())  # mapped
    rows = _read_jsonl(folder / "plan.jsonl")
    assert [v.to_row() for v in plan] == rows
    assert len(plan) == len(rows) == 500 and plan[-1].to_row() == rows[-1] and plan[123].to_row() == rows[123]
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert plan.sources() == list(by_source)
    assert [v.to_row() for v in plan.variants_for("c1/img_7.png")] == by_source["c1/img_7.png"]
    # a plan folder without columns (older plans) is parsed and gives the same rows
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    shutil.rmtree(old / "columns")
    meta = json.loads((old / "plan.json").read_text(encoding="utf-8"))
    del meta["column_digests"]
    (old / "plan.json").write_text(json.dumps(meta), encoding="utf-8")
    parsed = AugmentationPlan.load(old)
    assert parsed.columns.directory is None and [v.to_row() for v in parsed] == rows
    # a column changed after planning is refused, naming it
    seeds = folder / "columns" / "seed.npy"
    np.save(seeds, np.load(seeds) + 1)
    with pytest.raises(InputError, match="columns/seed.npy differs from what plan.json records"):
        AugmentationPlan.load(folder)


def test_a_plan_whose_jsonl_was_rewritten_is_read_from_the_jsonl(tmp_path, tiny_models):
    folder = _synthetic_plan(5, tiny_models).save(tmp_path / "plan")
    rows = (folder / "plan.jsonl").read_text(encoding="utf-8")
    (folder / "plan.jsonl").write_text(rows.replace("\"label\": 1", "\"label\":  1"), encoding="utf-8")
    with pytest.raises(InputError, match="plan.jsonl differs from what plan.json records"):
        AugmentationPlan.load(folder)  # columns derived from another plan.jsonl size: the JSONL path checks it


def _age(folder, seconds=3600):
    """Date every file of a plan folder back, as a plan written a while ago."""
    when = time.time_ns() - seconds * 10**9
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(when, when))


def test_a_same_size_edit_of_the_jsonl_is_noticed(tmp_path, tiny_models):
    folder = _synthetic_plan(5, tiny_models).save(tmp_path / "plan")
    _age(folder)
    assert AugmentationPlan.load(folder).columns.directory == folder  # settles the record
    rows = (folder / "plan.jsonl").read_text(encoding="utf-8")
    edited = rows.replace('"lambda": 0.1,', '"lambda": 0.2,', 1)
    assert edited != rows and len(edited) == len(rows)
    (folder / "plan.jsonl").write_text(edited, encoding="utf-8")  # same size, a new mtime
    with pytest.raises(InputError, match="plan.jsonl differs from what plan.json records"):
        AugmentationPlan.load(folder)


def test_a_copied_plan_folder_is_still_read_from_its_columns(tmp_path, tiny_models):
    folder = _synthetic_plan(5, tiny_models).save(tmp_path / "plan")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)  # new mtimes, as `cp -r` gives
    _age(copy, 1800)
    records = Path(os.environ["DALDA_AUG_CACHE"]) / "stat"
    before = set(records.glob("stat-*.npy"))
    plan = AugmentationPlan.load(copy)
    assert len(set(records.glob("stat-*.npy")) - before) == 1  # the copy's files remembered by their stat
    assert plan.columns.directory == copy  # plan.jsonl hashed, matched plan.json: columns used
    assert (copy / "columns" / "meta.json").read_bytes() == (folder / "columns" / "meta.json").read_bytes()
    assert [v.to_row() for v in plan] == [v.to_row() for v in AugmentationPlan.load(folder)]


def test_column_files_whose_stat_matches_the_record_are_not_hashed_again(tmp_path, tiny_models):
    folder = _synthetic_plan(5, tiny_models).save(tmp_path / "plan")
    _age(folder)
    AugmentationPlan.load(folder)  # hashes every column (its record was racy: just written), records them
    seeds = folder / "columns" / "seed.npy"
    before = os.stat(seeds)
    data = bytearray(seeds.read_bytes())
    data[-1] ^= 1  # the last seed's low byte: same size
    seeds.write_bytes(bytes(data))
    os.utime(seeds, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as recorded, not the ctime
    with pytest.raises(InputError, match="columns/seed.npy differs from what plan.json records"):
        AugmentationPlan.load(folder)  # hashed (its ctime moved), and refused
    os.utime(seeds)  # now its mtime moved too: hashed, and refused
    with pytest.raises(InputError, match="columns/seed.npy differs from what plan.json records"):
        AugmentationPlan.load(folder)


def _pickled_growth(tmp_path, tiny_models, n):
    folder = _synthetic_plan(n, tiny_models).save(tmp_path / f"plan-{n}")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    base = _Indexed(n)
    ds = SyntheticAugmentedDataset(base, folder, SyntheticCache(tmp_path / f"cache-{n}", spec), p=0.5,
                                   on_miss="error", seed=0, verify_sources="off")  # the hashes are made up
    return len(pickle.dumps(ds)) - len(pickle.dumps(base)), ds


def test_pickled_dataset_grows_at_most_4_bytes_per_variant(tmp_path, tiny_models):
    small, _ = _pickled_growth(tmp_path, tiny_models, 2_000)
    large, ds = _pickled_growth(tmp_path, tiny_models, 20_000)
    per_variant = (large - small) / ((20_000 - 2_000) * M)
    print(f"pickled dataset: {small} B at 2,000 sources, {large} B at 20,000 x {M}: {per_variant:.3f} B/variant")
    assert per_variant <= 4.0
    again = pickle.loads(pickle.dumps(ds))
    assert again._plan.columns.directory == ds._plan.columns.directory  # maps the same files
    assert [again.choose(i) for i in range(0, 20_000, 997)] == [ds.choose(i) for i in range(0, 20_000, 997)]


def test_spawned_worker_reads_variants_from_the_mapped_columns(tmp_path, tiny_models):
    n = 40
    folder = _synthetic_plan(n, tiny_models).save(tmp_path / "plan")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    ds = SyntheticAugmentedDataset(_Indexed(n), folder, SyntheticCache(tmp_path / "cache", spec), p=1.0,
                                   on_miss="error", seed=3, verify_sources="off")
    # Independently: the first access of item i is draw "3:0:i"; its position among the item's JSONL rows
    # sorted by variant; the key of that row.
    rows = [r for r in _read_jsonl(folder / "plan.jsonl") if r["source"] == 7]
    rows.sort(key=lambda r: r["variant"])
    expected = spec.key(Variant.from_row(rows[pick(draw_name(3, 0, 7, 0, 0), 1.0, len(rows))]))
    loader = DataLoader(torch_subset(ds, [7]), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(CacheMissError, match=f"key {expected}"):
        next(iter(loader))


def torch_subset(ds, indices):
    from torch.utils.data import Subset

    return Subset(ds, indices)


def _private_bytes():
    """This process's private memory (USS: Private_Clean + Private_Dirty of smaps_rollup)."""
    total = 0
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean", "Private_Dirty")):
                total += int(line.split()[1]) * 1024
    return total


class _Probe(Dataset):
    """One item: the private memory of the worker serving it, after it served two items of ``inner``."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return 1

    def __getitem__(self, i):
        import gc

        self.inner[0], self.inner[len(self.inner) - 1]
        gc.collect()
        return _private_bytes()


def _worker_private_bytes(dataset, tries=3):
    """The least of ``tries`` spawned workers' private memory (a worker's allocator noise is ~1 MB)."""
    loader = DataLoader(_Probe(dataset), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    return min(int(next(iter(loader))) for _ in range(tries))


# A memory target, measured against a baseline worker: the project measures such targets with
# benchmarks/bench_scale.py, not in the default suite. Under load the difference of two ~390 MB
# processes scatters by about +-1 MB (a CI run measured 17.0 B/variant against the 16 B target).
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="a memory measurement; set RUN_SLOW=1 "
                    "(benchmarks/bench_scale.py measures it with its baseline)")
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/self/smaps_rollup")
def test_spawned_worker_private_memory_per_variant_beyond_imagefolder(tmp_path, tiny_models):
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    pixel = Image.new("RGB", (2, 2))
    grown = {}
    for n in (1_000, 10_000):
        root = tmp_path / f"data{n}"
        for i in range(n):
            (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            pixel.save(root / f"c{i % 3}" / f"{i:06d}.png")
        base = ImageFolder(root)
        rows = [Variant(source=os.path.relpath(path, root), label=t, class_name=f"class {t}", score=0.5, variant=k,
                        prompt=f"a photo of a class {t}", lam=0.5 + k / 100, seed=i * M + k, source_sha256=f"{i:064x}")
                for i, (path, t) in enumerate(base.samples) for k in range(M)]
        config = {"format": "dalda_aug.plan/1", "seed": 0, "variants_per_image": M, "data_root": str(root),
                  "classes": base.classes, "class_names": [f"class {t}" for t in range(3)],
                  "scaling": {"strategy": "ags"}, "models": tiny_models.to_dict()}
        folder = AugmentationPlan(rows, config).save(tmp_path / f"plan{n}")
        ds = SyntheticAugmentedDataset(ImageFolder(root), folder, SyntheticCache(tmp_path / f"cache{n}", spec),
                                       p=1.0, on_miss="real", seed=0, verify_sources="off")  # made-up hashes
        grown[n] = (_worker_private_bytes(base), _worker_private_bytes(ds))
    variants = (10_000 - 1_000) * M
    beyond = ((grown[10_000][1] - grown[1_000][1]) - (grown[10_000][0] - grown[1_000][0])) / variants
    print(f"spawned worker private memory: {beyond:.2f} B per variant beyond ImageFolder's ({grown})")
    assert beyond <= 16.0


@pytest.mark.parametrize("path", [
    "/data/train/cat/1.png", "/data/train//cat/1.png", "/data/train/./cat/1.png", "/data/train/../x/1.png",
    "/data/train/cat/", "/data/train/cat/.", "/data/train/cat/..", "/data/train/.hidden/1.png",
    "/data/train/cat/..png", "/data/trainx/cat/1.png", "relative/cat/1.png", "/data/train/c at/ü.png",
])
def test_paths_taken_as_they_are_only_when_abspath_would_return_them(path):
    from types import SimpleNamespace

    from dalda_aug.dataset.bases import FolderAdapter, _absolute_paths

    assert _absolute_paths([path], "/data/train") == [os.path.abspath(path)]
    adapter = FolderAdapter(SimpleNamespace(root="/data/train", samples=[(path, 0), ("/data/train/a/b.png", 1)]))
    ids, _ = adapter.source_ids()
    assert ids == [Path(os.path.relpath(os.path.abspath(p), "/data/train")).as_posix()
                   for p in (path, "/data/train/a/b.png")]
    assert adapter.source_ids()[0] == ids  # from the kept list
    adapter.release()
    assert "_absolute_memo" not in adapter.__dict__


def test_sources_and_hashes_decoded_in_bulk_equal_one_at_a_time(tmp_path, tiny_models):
    plan = _synthetic_plan(50, tiny_models, int_sources=False)
    columns = plan.columns
    assert columns.sources() == [columns.source(s) for s in range(columns.n_sources)]
    picks = np.array([3, 0, 49, 3])
    assert columns.source_hashes(picks) == [plan.source_variants(int(s))[0].source_sha256 for s in picks]
    int_plan = _synthetic_plan(20, tiny_models, int_sources=True)
    assert int_plan.columns.sources() == [int_plan.columns.source(s) for s in range(20)]
    assert all(isinstance(s, int) for s in int_plan.columns.sources())


def test_an_unsaved_plan_pickles_as_a_temporary_folder(tmp_path, tiny_models, monkeypatch):
    import gc

    import dalda_aug.plan.columns as plan_columns

    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")

    def dataset(n):
        return SyntheticAugmentedDataset(_Indexed(n), _synthetic_plan(n, tiny_models),
                                         SyntheticCache(tmp_path / f"cache-{n}", spec), p=0.5, on_miss="error",
                                         seed=0, verify_sources="off")

    kept = dataset(500)
    kept_bytes = len(pickle.dumps(kept))  # under SPILL_ROWS: the arrays themselves
    assert kept._plan.columns.directory is None and kept_bytes > 500 * M * 40
    monkeypatch.setattr(plan_columns, "SPILL_ROWS", 1_000)
    small, large = dataset(200), dataset(2_000)
    small_bytes, large_bytes = len(pickle.dumps(small)), len(pickle.dumps(large))
    assert (large_bytes - small_bytes) / ((2_000 - 200) * M) <= 4.0
    folder = large._plan.columns.directory
    assert folder is not None and (folder / "columns" / "lambda.npy").is_file()
    again = pickle.loads(pickle.dumps(large))
    assert again._plan.columns.directory == folder
    assert list(again._plan) == list(_synthetic_plan(2_000, tiny_models))  # the same rows, read from the folder
    del again, large
    gc.collect()
    assert not folder.exists()  # removed with the columns that wrote it


def test_a_spilled_plan_unpickled_where_its_folder_is_missing_says_so(tmp_path, tiny_models, monkeypatch):
    import dalda_aug.plan.columns as plan_columns

    monkeypatch.setattr(plan_columns, "SPILL_ROWS", 10)
    plan = _synthetic_plan(5, tiny_models)
    blob = pickle.dumps(plan)
    folder = plan.columns.directory
    import shutil

    shutil.rmtree(folder)
    with pytest.raises(InputError, match=r"temporary folder .*dalda-aug-plan-.* on host .*plan.save\(DIR\)"):
        pickle.loads(blob)


def test_spawned_worker_reads_a_spilled_plan(tmp_path, tiny_models, monkeypatch):
    import dalda_aug.plan.columns as plan_columns

    monkeypatch.setattr(plan_columns, "SPILL_ROWS", 10)  # in this process, which pickles
    n = 40
    plan = _synthetic_plan(n, tiny_models)
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    ds = SyntheticAugmentedDataset(_Indexed(n), plan, SyntheticCache(tmp_path / "cache", spec), p=1.0,
                                   on_miss="error", seed=3, verify_sources="off")
    rows = sorted((v for v in _synthetic_plan(n, tiny_models) if v.source == 7), key=lambda v: v.variant)
    expected = spec.key(rows[pick(draw_name(3, 0, 7, 0, 0), 1.0, len(rows))])
    loader = DataLoader(torch_subset(ds, [7]), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(CacheMissError, match=f"key {expected}"):
        next(iter(loader))
    assert ds._plan.columns.directory is not None  # the worker was sent the folder


def test_variants_for_one_source_makes_only_that_sources_variants(tmp_path, tiny_models):
    plan = AugmentationPlan.load(_synthetic_plan(30, tiny_models, int_sources=False).save(tmp_path / "plan"))
    rows = _read_jsonl(tmp_path / "plan" / "plan.jsonl")
    source = "c1/img_7.png"
    want = sorted((r for r in rows if r["source"] == source), key=lambda r: r["variant"])
    assert [v.to_row() for v in plan.variants_for(source)] == want
    assert plan.variants_for("c1/missing.png") == [] and plan.variants_for(7) == []
    assert plan._by_source is None  # no Variant per variant of the plan was made
    assert plan.variants_for(source) == plan.by_source()[source]


def test_file_stats_in_bulk_equal_one_at_a_time(tmp_path):
    from dalda_aug.plan.records import file_stat, file_stats

    paths = []
    for i in range(5):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(b"x" * i)
        paths.append(str(path))
    expected = [[st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] for st in map(os.stat, paths)]
    assert file_stats(paths).tolist() == expected
    missing = [*paths[:2], str(tmp_path / "gone.bin"), *paths[2:]]
    assert file_stats(missing).tolist() == [*expected[:2], [-1, -1, -1, -1], *expected[2:]]
    assert file_stats(missing).tolist() == [list(file_stat(p)) for p in missing]
    assert file_stats([]).shape == (0, 4)
