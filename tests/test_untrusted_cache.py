"""A cache folder is data from anyone (issue 18, points 1, 2, 3, 7; issue 20, point 1).

Rows planted with sqlite3 in real diskcache shards (pickled keys, pickled values inline and in
value files, a value file named outside the shard), spec records naming modules to import,
leases that never expire, class names that differ only by case or Unicode normalisation, and a
spec recorded by a run that wrote nothing. Everything runs through the real library, the real
CLI in subprocesses and real DataLoader workers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache, default_shard_name
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import AugmentationPlan, Variant, build_plan
from dalda_aug.cache.warm import warm

from helpers import cli_env, run_dalda

STEPS, SIZE = 2, 32


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a planted row would do to a reader)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=pickle.HIGHEST_PROTOCOL)


def _image(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """A folder of 2 classes x 2 images, a plan of 8 variants, the tiny models' JSON and spec."""
    base = tmp_path_factory.mktemp("untrusted")
    rng = np.random.default_rng(7)
    for c, name in enumerate(("ant", "bee")):
        (base / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20 + i, 22 + c, 3), dtype=np.uint8)).save(
                base / "data" / name / f"{i}.png")
    plan = build_plan(base / "data", variants=2, seed=3, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    plan.save(base / "plan")
    tiny_models.save(base / "models.json")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE))
    return base, plan, spec


# -- 18.1: pickled rows are corrupt entries, never unpickled ------------------------------------------
_INSERT = ("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, "
           "filename, value) VALUES (?, ?, ?, ?, ?, 0, NULL, ?, ?, ?, ?)")


def _plant(shard: Path, key, raw: int, mode: int, *, value=None, filename=None, expire=None, size=0) -> None:
    now = time.time()
    with sqlite3.connect(shard / "cache.db") as db:
        db.execute(_INSERT, (key, raw, now, expire, now, size, mode, filename, value))


def _plant_everything(shard: Path, markers: Path, keys: list[str]) -> int:
    """Seven refused rows in ``shard`` (each payload touching its own marker); returns 7.

    ``keys``: two entry keys the shard holds no entry for, and one to plant a lease row on.
    """
    tag = shard.name
    # A pickled key (raw = 0) with a plain value.
    _plant(shard, sqlite3.Binary(_payload(markers / f"{tag}-key")), 0, 1, value=sqlite3.Binary(b"x"))
    # An entry key whose value is pickled in the row (mode 4)...
    _plant(shard, keys[0], 1, 4, value=sqlite3.Binary(_payload(markers / f"{tag}-value")))
    # ...and one whose pickled value is in a value file named as diskcache names them.
    name = "ab/cd/" + "0123456789abcdef0123456789ab.val"
    (shard / "ab" / "cd").mkdir(parents=True, exist_ok=True)
    data = _payload(markers / f"{tag}-file")
    (shard / name).write_bytes(data)
    _plant(shard, keys[1], 1, 4, filename=name, size=len(data))
    # A lease row (this library's text key) whose value is pickled, and one under an older
    # version's pickled tuple key, pickled itself.
    _plant(shard, f"dalda_aug:lease:{keys[2]}", 1, 4, value=sqlite3.Binary(_payload(markers / f"{tag}-lease")))
    _plant(shard, sqlite3.Binary(_payload(markers / f"{tag}-oldlease")), 0, 4,
           value=sqlite3.Binary(_payload(markers / f"{tag}-oldlease-value")))
    # The corrupt counter's text key with a pickled value, and an older version's counter key
    # (the exact bytes it wrote) with a pickled value.
    _plant(shard, "dalda_aug:corrupt_removed", 1, 4, value=sqlite3.Binary(_payload(markers / f"{tag}-counter")))
    import pickletools

    old_counter = pickletools.optimize(pickle.dumps(("dalda_aug", "corrupt_removed"), protocol=5))
    _plant(shard, sqlite3.Binary(old_counter), 0, 4, value=sqlite3.Binary(_payload(markers / f"{tag}-oldcounter")))
    return 7


def test_pickled_rows_in_every_shard_never_run(world, tmp_path):
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from dalda_aug.dataset import SyntheticAugmentedDataset

    base, plan, spec = world
    markers = tmp_path / "markers"
    markers.mkdir()
    # The payload is live: loading it creates its marker.
    pickle.loads(_payload(markers / "sanity"))
    assert (markers / "sanity").exists()
    (markers / "sanity").unlink()

    cache_dir = tmp_path / "cache"
    own = default_shard_name(0)  # the shard `warm` (rank 0) writes: planted rows are read while writing
    keys = [spec.key(v) for v in plan]
    writer = SyntheticCache(cache_dir, spec, shard=own)
    for i, v in enumerate(plan.variants[:5]):  # 5 of the 8 images, stand-in pixels
        writer.put(v, _image(i))
    writer.record_spec(plan)
    shipped = SyntheticCache(cache_dir, spec, shard="shipped-1")
    shipped.put(plan.variants[0], _image(0))  # a second, shipped shard with one good entry
    writer.close()
    shipped.close()
    planted = _plant_everything(cache_dir / f"shard-{own}", markers, [keys[5], keys[6], keys[7]])
    planted += _plant_everything(cache_dir / "shard-shipped-1", markers, [keys[1], keys[2], keys[3]])
    # A value file named outside the shard: never read, and never deleted on removal.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    _plant(cache_dir / "shard-shipped-1", keys[4], 1, 2, filename=str(victim), size=7)
    planted += 1

    def nothing_ran() -> None:
        assert sorted(p.name for p in markers.iterdir()) == []
        assert victim.read_text() == "keep me"

    # stats, in the library and the CLI: the planted rows are bad, not entries.
    stats = SyntheticCache(cache_dir).stats(plan)
    assert stats["entries"] == 5 and stats["plan"]["cached"] == 5
    assert stats["bad"] == 2 * 5 + 2  # the non-entry rows, and the entry rows not good in another shard
    done = run_dalda("cache", "stats", "--cache", str(cache_dir), "--plan", str(base / "plan"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plan"]["cached"] == 5
    nothing_ran()

    # verify counts every planted row as corrupt, per shard.
    done = run_dalda("cache", "verify", "--cache", str(cache_dir), "--no-progress")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    bad_lines = [line for line in done.stdout.splitlines() if line.startswith("bad entry")]
    assert len(bad_lines) == planted == 15
    assert f"verified {5 + 1 + planted} entries: 6 ok, {planted} bad" in done.stdout
    assert sum("never unpickled" in line for line in bad_lines) == 2 * 7
    nothing_ran()

    # export: the good images only.
    done = run_dalda("cache", "export", "--cache", str(cache_dir), "--out", str(tmp_path / "export"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "export").rglob("*.png"))) == 5
    nothing_ran()

    # The dataset in two DataLoader workers: every item served, the planted rows never loaded.
    ds = SyntheticAugmentedDataset(ImageFolder(str(base / "data")), plan, SyntheticCache(cache_dir), p=1.0,
                                   transform=lambda im: torch.from_numpy(np.asarray(im).copy()), on_miss="real")
    served = 0
    for _ in range(2):
        for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list):  # real and synthetic sizes
            served += len(batch)
    assert served == 2 * 4
    nothing_ran()

    # warm (the CLI, rank 0: it writes the shard holding the planted rows) generates what is missing.
    done = run_dalda("warm", "--plan", str(base / "plan"), "--cache", str(cache_dir), "--models",
                     str(base / "models.json"), "--steps", str(STEPS), "--size", str(SIZE), "--no-progress",
                     "--device", "cpu", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert SyntheticCache(cache_dir).stats(plan)["plan"]["cached"] == 8
    nothing_ran()

    # verify --remove drops what is left of the planted rows, by row: nothing runs, nothing outside goes.
    done = run_dalda("cache", "verify", "--cache", str(cache_dir), "--remove", "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_dalda("cache", "verify", "--cache", str(cache_dir), "--no-progress")
    assert done.returncode == 0 and " 0 bad" in done.stdout, done.stdout
    nothing_ran()


def test_the_writing_handle_refuses_to_pickle_and_unpickle(world, tmp_path):
    from dalda_aug.cache import CorruptEntryError

    _, plan, spec = world
    cache = SyntheticCache(tmp_path / "c", spec, shard="s")
    cache.put(plan[0], _image(0))
    handle = cache._open("s")
    with pytest.raises(TypeError, match="never pickles"):
        handle.set(("a", "tuple"), b"x")
    with pytest.raises(TypeError, match="never pickles"):
        handle.set("k", {"a": "dict"})
    marker = tmp_path / "ran"
    _plant(tmp_path / "c" / "shard-s", "planted", 1, 4, value=sqlite3.Binary(_payload(marker)))
    with pytest.raises(CorruptEntryError, match="never unpickled"):
        handle.get("planted")
    assert not marker.exists()


# -- 18.2: spec records name classes of the registry only ----------------------------------------------
def _record(cache_dir: Path, spec: GenerationSpec, config_class: str) -> Path:
    data = {"format": "dalda_aug.cache-spec/1", "plan": None, "spec": dict(spec.to_dict(), config_class=config_class)}
    path = cache_dir / "specs" / f"{spec.fingerprint}-any.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


_READ_SPECS = ("import sys; folder, side = sys.argv[1], sys.argv[2]\n"
               "sys.argv = ['dalda-aug', 'make-tiny-models', side]  # what dalda_aug.__main__ would run\n"
               "from dalda_aug.cache import SyntheticCache; from dalda_aug.errors import InputError\n"
               "try:\n    SyntheticCache(folder).recorded_specs()\n"
               "except InputError as exc:\n    print('refused:', exc)\n")


@pytest.mark.parametrize("config_class", ["dalda_aug.__main__:IPAdapterConfig", "dalda_aug_evil:IPAdapterConfig"])
def test_a_spec_record_naming_another_module_imports_nothing(world, tmp_path, config_class):
    _, _, spec = world
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = tmp_path / "evil-ran"
    (workdir / "dalda_aug_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nGenerationConfig = object\n")
    # Importing that module really runs it (python -c puts the working folder on sys.path).
    subprocess.run([sys.executable, "-c", "import dalda_aug_evil"], cwd=workdir, env=cli_env(), check=True)
    assert marker.exists()
    marker.unlink()

    cache_dir = tmp_path / "cache"
    record = _record(cache_dir, spec, config_class)
    side_effect = tmp_path / "tiny-models-made-by-main"  # what importing dalda_aug.__main__ would do
    done = subprocess.run([sys.executable, "-c", _READ_SPECS, str(cache_dir), str(side_effect)], cwd=workdir,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and str(record) in done.stdout
    assert "not a registered generator config" in done.stdout
    assert not marker.exists() and not side_effect.exists()

    # The CLI: one line naming the record, exit 2.
    done = run_dalda("cache", "specs", "--cache", str(cache_dir), cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and record.name in done.stderr
    assert not marker.exists() and not side_effect.exists()


def test_registered_config_classes_still_read(world, tmp_path):
    from dalda_aug.generators.real_guidance import RealGuidanceConfig

    _, _, spec = world
    # records written before the IP-Adapter's config was renamed (GenerationConfig) and under the
    # import paths that moved read as before, through the map of moved paths
    for config, name in [(spec.config, "dalda_aug.generation:GenerationConfig"),
                         (spec.config, "dalda_aug.generators.ip_adapter:GenerationConfig"),
                         (spec.config, "dalda_aug:GenerationConfig"),
                         (spec.config, "dalda_aug.generators.ip_adapter:IPAdapterConfig"),
                         (RealGuidanceConfig(num_inference_steps=2), "dalda_aug.real_guidance:RealGuidanceConfig")]:
        other = GenerationSpec(spec.models, config)
        data = dict(json.loads(json.dumps(other.to_dict())), config_class=name)
        assert GenerationSpec.from_dict(data).fingerprint == other.fingerprint


# -- 18.3: leases have an upper bound -------------------------------------------------------------
def test_a_lease_without_end_holds_warm_up_for_the_cap_only(world, tmp_path, monkeypatch, caplog):
    import dalda_aug.cache.leases as cache_module

    _, plan, spec = world
    cache = SyntheticCache(tmp_path / "cache", spec, shard="s")
    keys = [spec.key(v) for v in plan]
    cache.put(plan[0], _image(0))  # creates the shard
    for v in plan.variants[1:6]:
        cache.put(v, _image(1))
    cache.close()
    shard = tmp_path / "cache" / "shard-s"
    # Another process's lease, one for 30 years, one with no expiry at all.
    _plant(shard, f"dalda_aug:lease:{keys[6]}", 1, 1, value="elsewhere:1:0:0", expire=time.time() + 1e9)
    _plant(shard, f"dalda_aug:lease:{keys[7]}", 1, 1, value="elsewhere:1:0:1", expire=None)
    monkeypatch.setattr(cache_module, "LEASE_CAP_SECONDS", 3.0)
    generator = spec.make_generator("cpu").load()
    caplog.set_level(logging.WARNING, logger="dalda_aug.cache.warm")
    started = time.monotonic()
    report = warm(plan, SyntheticCache(tmp_path / "cache", spec, shard="s"), generator=generator, progress=False,
                  lease_seconds=2.0)
    elapsed = time.monotonic() - started
    assert report.generated == 2 and report.already_cached == 6
    assert 2.5 <= elapsed < 120  # waited for the cap (3 s), not for 30 years
    lines = [r.getMessage() for r in caplog.records if "leased by another process" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "waiting for 2 keys leased by another process" in lines[0] and "at most 3 s" in lines[0]
    assert "\n" not in lines[0]
    # A lease longer than the cap is refused up front.
    with pytest.raises(InputError, match="at most 3"):
        warm(plan, SyntheticCache(tmp_path / "cache", spec, shard="s"), generator=generator, progress=False,
             lease_seconds=10.0)


# -- 18.7: exported class folders stay distinct on case- and normalisation-insensitive disks ------------
def _variant(i: int, label: int, class_name: str) -> Variant:
    return Variant(source=f"src/{i}.png", label=label, class_name=class_name, score=0.5, variant=0,
                   prompt=f"a photo, take {i}", lam=0.3, seed=100 + i, source_sha256=f"{i:02d}" * 32)


@pytest.mark.parametrize("names", [("Cat", "cat", "CAT"), ("caf\u00e9", "cafe\u0301", "Caf\u00e9")])
@pytest.mark.parametrize("with_plan", [False, True])
def test_export_folders_stay_distinct_after_nfc_and_casefold(world, tmp_path, names, with_plan):
    _, _, spec = world
    cache = SyntheticCache(tmp_path / "cache", spec)
    variants = [_variant(3 * c + i, c, name) for c, name in enumerate(names) for i in range(2)]
    for v in variants:
        cache.put(v, _image(v.seed))
    plan = AugmentationPlan(variants, {"classes": list(names)}) if with_plan else None
    assert cache.export(tmp_path / "out", plan)["exported"] == 6
    with (tmp_path / "out" / "samples.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    folders = {row["class_name"]: row["class"] for row in rows}
    assert set(folders) == set(names)
    assert len({_folded(f) for f in folders.values()}) == len(names)  # one folder per class on any disk
    for row in rows:  # each image in its own class's folder
        assert row["path"].split("/")[0] == folders[row["class_name"]]
        assert (tmp_path / "out" / row["path"]).is_file()
    # The first name in sorted order keeps its name; the others get a hash suffix of their own.
    first = sorted(names)[0]
    assert folders[first] == first
    assert all(folders[n].startswith(n + "-") for n in names if n != first)


# -- 20.1: a stray spec does not lock the cache -----------------------------------------------------
def test_a_spec_recorded_without_images_is_passed_over_and_can_be_forgotten(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    stray = GenerationSpec(spec.models, spec.config, "float16")  # the interrupted fp16 run's spec
    SyntheticCache(cache_dir, stray).record_spec(plan)  # as warm used to, at its start
    warmed = SyntheticCache(cache_dir, spec)
    for i, v in enumerate(plan):
        warmed.put(v, _image(i))
    warmed.record_spec(plan)

    bare = SyntheticCache(cache_dir)
    assert {s.fingerprint for s in bare.recorded_specs()} == {spec.fingerprint, stray.fingerprint}
    assert bare.resolve_spec(plan) == spec and bare.resolve_spec() == spec
    assert SyntheticCache(cache_dir).get(plan[0]) is not None  # no plan: the spec that holds images
    done = run_dalda("cache", "stats", "--cache", str(cache_dir), "--plan", str(base / "plan"))
    assert done.returncode == 0 and "8/8 images cached (100.0%)" in done.stdout, done.stderr

    done = run_dalda("cache", "specs", "--cache", str(cache_dir), "--plan", str(base / "plan"), "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["fingerprint"]: r for r in json.loads(done.stdout)}
    assert rows[spec.fingerprint]["entries"] == 8 and rows[spec.fingerprint]["plan_cached"] == 8
    assert rows[stray.fingerprint]["entries"] == 0 and rows[stray.fingerprint]["plan_cached"] == 0
    assert "float16" in rows[stray.fingerprint]["description"]
    done = run_dalda("cache", "specs", "--cache", str(cache_dir))
    assert done.returncode == 0 and f"{stray.fingerprint}:" in done.stdout and "0 entries" in done.stdout

    done = run_dalda("cache", "specs", "--cache", str(cache_dir), "--forget", stray.fingerprint)
    assert done.returncode == 0 and "forgot spec" in done.stdout, done.stderr
    assert [s.fingerprint for s in SyntheticCache(cache_dir).recorded_specs()] == [spec.fingerprint]
    done = run_dalda("cache", "specs", "--cache", str(cache_dir), "--forget", stray.fingerprint)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and stray.fingerprint in done.stderr
    done = run_dalda("cache", "specs", "--cache", str(cache_dir), "--forget", "../../etc")
    assert done.returncode == 2 and "16 hex digits" in done.stderr and "Traceback" not in done.stderr


def test_warm_records_its_spec_only_once_an_image_is_stored(world, tmp_path, tiny_models):
    import dataclasses

    base, plan, spec = world
    # A run that stores nothing (its models cannot load) leaves no record.
    broken = GenerationSpec(dataclasses.replace(tiny_models, base=str(tmp_path / "no-such-model")), spec.config)
    with pytest.raises(Exception):
        warm(plan, SyntheticCache(tmp_path / "cache", broken), device="cpu", progress=False)
    assert not (tmp_path / "cache" / "specs").exists()
    # float16 on the CPU is refused before anything is written: in the library...
    fp16 = GenerationSpec(spec.models, spec.config, "float16")
    with pytest.raises(InputError, match="float16 cannot generate on the CPU"):
        warm(plan, SyntheticCache(tmp_path / "cache", fp16), device="cpu", progress=False)
    # ...and in the CLI: one line naming the value, exit 2.
    for value in ("fp16", "float16"):
        done = run_dalda("warm", "--plan", str(base / "plan"), "--cache", str(tmp_path / "cache"), "--models",
                         str(base / "models.json"), "--steps", str(STEPS), "--size", str(SIZE), "--no-progress",
                         "--device", "cpu", "--dtype", value)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f"--dtype {value}" in done.stderr and "CPU" in done.stderr
    assert not (tmp_path / "cache" / "specs").exists()
    # A run that stores images records its spec.
    report = warm(plan, SyntheticCache(tmp_path / "cache", spec), generator=spec.make_generator("cpu").load(),
                  progress=False)
    assert report.generated == 8
    assert [s.fingerprint for s in SyntheticCache(tmp_path / "cache").recorded_specs(plan)] == [spec.fingerprint]
