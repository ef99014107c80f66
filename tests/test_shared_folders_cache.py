"""A shared cache folder, round 3 (issue 27, points 1, 2, 3, 4 and 8 on the cache's side).

Real diskcache shards, with what an attacker with write access to the folder would plant in them:
rows keyed ``../../x...``, ``/abs/...``, dotted and upper-case keys; value files replaced by a
symlink to ``/dev/zero``, a FIFO or a folder; a FIFO at a spec record; a ``cache.db`` whose
``Cache`` is a recursive VIEW, one with a trigger of its own, one with a Settings row diskcache
would turn into a PRAGMA or an attribute; shard, ``specs`` and value folders that are symlinks
leading outside the cache; symlinks at the temporary names writers used; and half a cache's value
files deleted (a partial copy). Anything that could hang runs in a subprocess with a time limit,
anything that could exhaust memory under an address-space cap; victim files are asserted unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache, default_shard_name, encode_entry
from dalda_aug.errors import InputError, UnsafeFileError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import build_plan

from helpers import cli_env, run_dalda

STEPS, SIZE = 2, 32
BIG = 128  # 128 x 128 "raw" entries hold 49,152 bytes: above diskcache's 32 KB, so each lives in a value file
HEX64 = re.compile(r"[0-9a-f]{64}")


def _image(seed: int, size: int = BIG) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """2 classes x 2 images, a plan of 8 variants (saved), and a spec of the tiny models."""
    base = tmp_path_factory.mktemp("shared3")
    rng = np.random.default_rng(5)
    for c, name in enumerate(("ant", "bee")):
        (base / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20 + i, 22 + c, 3), dtype=np.uint8)).save(
                base / "data" / name / f"{i}.png")
    plan = build_plan(base / "data", variants=2, seed=3, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    plan.save(base / "plan")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE))
    return base, plan, spec


def _fill(cache_dir: Path, plan, spec, variants, shard: str = "a") -> SyntheticCache:
    """``variants`` stored in shard ``shard`` as value files, the spec recorded; closed."""
    cache = SyntheticCache(cache_dir, spec, image_format="raw", shard=shard)
    for i, v in enumerate(variants):
        cache.put(v, _image(i))
    cache.record_spec(plan)
    cache.close()
    return cache


def _value_file(cache_dir: Path, shard: str, key: str) -> Path:
    with sqlite3.connect(cache_dir / f"shard-{shard}" / "cache.db") as db:
        (filename,) = db.execute("SELECT filename FROM Cache WHERE key = ?", (key,)).fetchone()
    return cache_dir / f"shard-{shard}" / filename


def _python(code: str, *, timeout: float = 120, address_space: int | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (its last line prints JSON) under a time limit and,
    with ``address_space``, an address-space cap (bytes); returns the JSON. A hang fails the test."""
    prelude = ""
    if address_space is not None:
        prelude = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))\n")
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- point 1: only [0-9a-f]{64} keys are entries ------------------------------------------------------
HOSTILE_KEYS = [
    ("../../" + "x" * 58),  # a tar member that extracts two folders up
    ("/" + "tmp/" + "y" * 59),  # an absolute member name
    ("aaaa.bbbb.png." + "c" * 50),  # a dot: webdataset splits the sample there
    ("ABCDEF" + "0" * 58),  # upper-case hex: not what the library writes
]


def test_keys_that_are_not_hex_digests_are_corrupt_never_entries(world, tmp_path):
    base, plan, spec = world
    assert all(len(k) == 64 for k in HOSTILE_KEYS)
    cache_dir = tmp_path / "cache"
    _fill(cache_dir, plan, spec, plan.variants[:3])
    # Each hostile row holds a well-formed entry made for its own key (a header naming it, its
    # checksums right): only the key is wrong.
    writer = SyntheticCache(cache_dir, spec, shard="planted")._open("planted")
    for i, key in enumerate(HOSTILE_KEYS):
        meta = {"key": key, "label": 0, "class_name": "ant", "lambda": 0.5, "prompt": "p", "seed": i, "variant": 0,
                "source": "ant/0.png"}
        writer.set(key, encode_entry(_image(10 + i), meta, "raw"))
    writer.close()

    cache = SyntheticCache(cache_dir)
    assert cache.keys() == {spec.key(v) for v in plan.variants[:3]}
    stats = cache.stats(plan)
    assert stats["entries"] == 3 and stats["plan"]["cached"] == 3
    assert stats["bad"] == len(HOSTILE_KEYS)
    report = cache.verify()
    assert report["ok"] == 3 and len(report["bad"]) == len(HOSTILE_KEYS)
    assert all("not an entry key" in b["error"] for b in report["bad"])
    done = run_dalda("cache", "verify", "--cache", str(cache_dir), "--no-progress", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"verified 7 entries: 3 ok, {len(HOSTILE_KEYS)} bad" in done.stdout

    # webdataset: members are hex keys only; extracting them writes inside the folder only.
    out = tmp_path / "deep" / "er" / "wds"
    done = run_dalda("cache", "export", "--cache", str(cache_dir), "--out", str(out), "--as", "webdataset",
                     "--no-progress", timeout=120)
    assert done.returncode == 0, done.stderr
    members = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getnames()
            tar.extractall(tmp_path / "deep" / "er" / "extracted")
    assert len(members) == 3 * 3
    assert all(HEX64.fullmatch(m.split(".")[0]) and m.count(".") == 1 for m in members), members
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["er"]  # nothing two folders up
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["extracted", "wds"]
    assert not Path(HOSTILE_KEYS[1]).exists()

    # put refuses such a key, in one line, and writes nothing.
    for key in HOSTILE_KEYS:
        with pytest.raises(InputError, match="64 lowercase hex digits"):
            cache.put_encoded(key, encode_entry(_image(0), {"key": key}, "raw"))
    assert cache.verify()["ok"] == 3 and len(cache.verify()["bad"]) == len(HOSTILE_KEYS)
    assert cache.get(HOSTILE_KEYS[0]) is None


# -- point 2: special files behind value-file names ------------------------------------------------
def test_links_fifos_and_folders_for_value_files_are_corrupt_never_a_hang(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    _fill(cache_dir, plan, spec, plan.variants)  # all 8 planned variants, as value files
    keys = [spec.key(v) for v in plan.variants]
    zero, fifo, folder = (_value_file(cache_dir, "a", k) for k in keys[:3])
    zero.unlink()
    zero.symlink_to("/dev/zero")
    fifo.unlink()
    os.mkfifo(fifo)
    folder.unlink()
    folder.mkdir()
    # stats, verify, export and construction: under 60 s and a 3 GiB address space each, and the
    # three counted as corrupt (old code read /dev/zero until MemoryError, and blocked on the FIFO).
    result = _python(f"""
        import json, logging
        from dalda_aug.cache import SyntheticCache
        from dalda_aug.cache.export import export
        from dalda_aug.plan import AugmentationPlan
        plan = AugmentationPlan.load({str(base / 'plan')!r})
        cache = SyntheticCache({str(cache_dir)!r})
        stats = cache.stats(plan)
        good, bad = cache.check_entries()
        wds = export(cache, {str(tmp_path / 'wds')!r}, "webdataset", progress=False)
        report = cache.verify()
        print(json.dumps({{"stats": stats, "good": len(good), "bad": [b["error"] for b in bad],
                           "exported": wds.get("exported"), "verify_ok": report["ok"],
                           "verify_bad": [b["error"] for b in report["bad"]]}}))
    """, timeout=60, address_space=3 << 30)
    assert result["stats"]["plan"]["cached"] == 5 and result["stats"]["bad"] == 3
    assert result["good"] == 5 and len(result["bad"]) == 3
    assert any("symbolic link" in e for e in result["bad"]) and any("FIFO" in e for e in result["bad"])
    assert any("directory" in e for e in result["bad"])
    assert result["exported"] == 5

    # Training with the FIFO and the folder in place (the link was removed above, as corrupt):
    # every item is served, the bad entries are misses handled by on_miss, never an abort.
    cache_dir2 = tmp_path / "cache2"
    _fill(cache_dir2, plan, spec, plan.variants)
    assert plan.variants[0].source == plan.variants[1].source  # both variants of item 0 go bad: it is served real
    fifo2, folder2 = _value_file(cache_dir2, "a", keys[0]), _value_file(cache_dir2, "a", keys[1])
    fifo2.unlink()
    os.mkfifo(fifo2)
    folder2.unlink()
    folder2.mkdir()
    result = _python(f"""
        import json, warnings
        import numpy as np
        from torchvision.datasets import ImageFolder
        from dalda_aug.cache import SyntheticCache
        from dalda_aug.dataset import SyntheticAugmentedDataset
        from dalda_aug.plan import AugmentationPlan
        plan = AugmentationPlan.load({str(base / 'plan')!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = SyntheticAugmentedDataset(ImageFolder({str(base / 'data')!r}), plan, SyntheticCache({str(cache_dir2)!r}),
                                           p=1.0, on_miss="real", seed=0)
        sizes = []
        for epoch in range(4):
            ds.set_epoch(epoch)
            sizes += [ds[i][0].size for i in range(len(ds))]
        print(json.dumps({{"cached": ds.cached_variants, "planned": ds.planned_variants,
                           "warned": [str(w.message) for w in caught], "served": len(sizes),
                           "synthetic": sum(s == ({BIG}, {BIG}) for s in sizes)}}))
    """, timeout=120)
    assert result["cached"] == 6 and result["planned"] == 8  # construction counts what stats counts
    assert any("6/8 synthetic variants" in w for w in result["warned"])
    assert result["served"] == 16 and 0 < result["synthetic"] < 16
    assert SyntheticCache(cache_dir2).stats(plan)["plan"]["cached"] == 6


def test_a_fifo_at_a_spec_record_hangs_nothing(world, tmp_path, caplog):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    _fill(cache_dir, plan, spec, plan.variants[:2])
    record = next((cache_dir / "specs").glob("*.json"))
    record.unlink()
    os.mkfifo(record)  # where warm writes (and first reads) this very record
    other = cache_dir / "specs" / ("0" * 16 + "-any.json")
    os.mkfifo(other)  # and another record that is a FIFO
    result = _python(f"""
        import json
        from dalda_aug.cache import SyntheticCache
        from dalda_aug.plan import AugmentationPlan
        plan = AugmentationPlan.load({str(base / 'plan')!r})
        cache = SyntheticCache({str(cache_dir)!r})
        specs = cache.recorded_specs()
        print(json.dumps({{"before": len(specs)}}))
    """, timeout=60)
    assert result == {"before": 0}  # both FIFOs skipped, nothing read from them
    # warm's record_spec replaces the FIFO at its record (never opening it) and reads back
    result = _python(f"""
        import json
        from dalda_aug.cache import GenerationSpec, SyntheticCache
        from dalda_aug.plan import AugmentationPlan
        from dalda_aug.config import ModelConfig
        plan = AugmentationPlan.load({str(base / 'plan')!r})
        spec = GenerationSpec.from_dict(json.loads({json.dumps(json.dumps(spec.to_dict()))}))
        cache = SyntheticCache({str(cache_dir)!r}, spec)
        cache.record_spec(plan)
        print(json.dumps({{"specs": [s.fingerprint for s in SyntheticCache({str(cache_dir)!r}).recorded_specs()]}}))
    """, timeout=60)
    assert result == {"specs": [spec.fingerprint]}
    assert record.is_file() and not record.is_symlink() and other.is_fifo()
    with caplog.at_level(logging.WARNING, logger="dalda_aug"):
        assert [s.fingerprint for s in SyntheticCache(cache_dir).recorded_specs()] == [spec.fingerprint]
    assert any(str(other) in r.getMessage() and "FIFO" in r.getMessage() for r in caplog.records)


# -- point 3: a shard's schema is code ---------------------------------------------------------------
_RECURSIVE_VIEW = """
CREATE VIEW Cache AS WITH RECURSIVE forever(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM forever)
SELECT n AS rowid, printf('%064x', n) AS key, 1 AS raw, 0.0 AS store_time, NULL AS expire_time,
       0.0 AS access_time, 0 AS access_count, NULL AS tag, 0 AS size, 1 AS mode, NULL AS filename,
       x'00' AS value FROM forever
"""


def _hostile_shards(cache_dir: Path, marker_table: str = "Planted") -> dict[str, Path]:
    """Five shards: three whose cache.db is code (a recursive VIEW named Cache, diskcache's tables
    with a trigger of their own, diskcache's tables with a Settings row it would act on), one
    whose cache.db is not a database, and a WAL database whose -wal journal is a FIFO."""
    out = {}
    garbage = cache_dir / "shard-garbage"
    garbage.mkdir(parents=True)
    (garbage / "cache.db").write_bytes(np.random.default_rng(0).bytes(12 * 1024))
    out["garbage"] = garbage / "cache.db"
    fifowal = cache_dir / "shard-fifowal"
    c = SyntheticCache(cache_dir, shard="fifowal")
    c._open("fifowal")  # a real diskcache shard in WAL mode ...
    c.close()
    with open(fifowal / "cache.db", "rb") as fh:
        assert fh.read(20)[18:20] == b"\x02\x02"  # WAL mode in its header: SQLite opens the -wal
    if (fifowal / "cache.db-wal").exists():
        (fifowal / "cache.db-wal").unlink()
    os.mkfifo(fifowal / "cache.db-wal")  # ... whose journal would block a reader
    out["fifowal"] = fifowal / "cache.db"
    view = cache_dir / "shard-view"
    view.mkdir(parents=True)
    with sqlite3.connect(view / "cache.db") as db:
        db.execute("CREATE TABLE Settings ( key TEXT NOT NULL UNIQUE, value)")
        db.execute(_RECURSIVE_VIEW)
    out["view"] = view / "cache.db"
    for name, evil in (("trigger", f"CREATE TABLE {marker_table} (n); CREATE TRIGGER planted AFTER INSERT ON Cache "
                                   f"BEGIN INSERT INTO {marker_table} VALUES (1); END;"),
                       ("settings", "INSERT INTO Settings VALUES ('disk__directory', '/tmp');")):
        shard = cache_dir / f"shard-{name}"
        c = SyntheticCache(cache_dir, shard=name)
        c._open(name)  # a real diskcache shard ...
        c.close()
        with sqlite3.connect(shard / "cache.db") as db:  # ... with something planted in it
            db.executescript(evil)
        out[name] = shard / "cache.db"
    return out


def test_a_shard_whose_schema_is_not_diskcaches_is_refused_by_name(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    _fill(cache_dir, plan, spec, plan.variants[:5], shard="good")
    planted = _hostile_shards(cache_dir)
    assert (planted["view"].stat().st_size) < 64 * 1024
    result = _python(f"""
        import json, logging, warnings
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        from torchvision.datasets import ImageFolder
        from dalda_aug.cache import SyntheticCache
        from dalda_aug.dataset import SyntheticAugmentedDataset
        from dalda_aug.plan import AugmentationPlan
        plan = AugmentationPlan.load({str(base / 'plan')!r})
        cache = SyntheticCache({str(cache_dir)!r})
        stats = cache.stats(plan)
        report = cache.verify()
        with warnings.catch_warnings(record=True):
            ds = SyntheticAugmentedDataset(ImageFolder({str(base / 'data')!r}), plan, SyntheticCache({str(cache_dir)!r}),
                                           p=1.0, on_miss="real", seed=0)
        served = [ds[i] for i in range(len(ds))]
        print(json.dumps({{"stats": stats, "ok": report["ok"], "bad": report["bad"], "cached": ds.cached_variants,
                           "refused": SyntheticCache({str(cache_dir)!r}).refused_shards()}}))
    """, timeout=90)
    assert result["stats"]["entries"] == 5 and result["stats"]["plan"]["cached"] == 5  # the good shard serves
    refused = {s["name"]: s.get("refused") for s in result["stats"]["shards"]}
    assert refused["good"] is None and all(refused[n] for n in ("view", "trigger", "settings", "garbage", "fifowal"))
    assert "not a readable SQLite database" in refused["garbage"] and "cache.db-wal" in refused["fifowal"]
    assert "view" in refused["view"] or "'Cache'" in refused["view"]
    assert "planted" in refused["trigger"].lower() and "disk__directory" in refused["settings"]
    assert result["ok"] == 5
    assert sorted(b["shard"] for b in result["bad"]) == ["fifowal", "garbage", "settings", "trigger", "view"]
    assert result["cached"] == 5 and set(result["refused"]) == {"view", "trigger", "settings", "garbage", "fifowal"}

    # the CLI: one warning line naming each refused database, no traceback, no hang
    done = run_dalda("cache", "stats", "--cache", str(cache_dir), "--plan", str(base / "plan"), timeout=90)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "5/8 images cached" in done.stdout
    for path in planted.values():
        assert sum(str(path) in line and "refused" in line for line in done.stderr.splitlines()) == 1, done.stderr


def test_writing_a_shard_with_a_planted_trigger_is_refused_before_diskcache_runs(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    own = default_shard_name(0)
    c = SyntheticCache(cache_dir, spec, shard=own)
    c.put(plan.variants[0], _image(0, 16))
    c.close()
    db_path = cache_dir / f"shard-{own}" / "cache.db"
    with sqlite3.connect(db_path) as db:
        db.executescript("CREATE TABLE Planted (n); CREATE TRIGGER planted AFTER INSERT ON Cache "
                         "BEGIN INSERT INTO Planted VALUES (1); END;")
    writer = SyntheticCache(cache_dir, spec, shard=own)
    with pytest.raises(UnsafeFileError, match="(?i)" + re.escape(str(db_path)) + " refused: .*'planted'"):
        writer.put(plan.variants[1], _image(1, 16))
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM Planted").fetchone() == (0,)  # the trigger never ran
        assert db.execute("SELECT count(*) FROM Cache").fetchone() == (1,)


def test_settings_rows_diskcache_would_apply_refuse_the_shard(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    c = SyntheticCache(cache_dir, spec, shard="a")
    c.put(plan.variants[0], _image(0, 16))
    c.close()
    victim = tmp_path / "victim"
    victim.mkdir()
    with sqlite3.connect(cache_dir / "shard-a" / "cache.db") as db:
        # diskcache would set its Disk's folder from this row: value files written to the victim
        db.execute("INSERT INTO Settings VALUES ('disk__directory', ?)", (str(victim),))
    writer = SyntheticCache(cache_dir, spec, image_format="raw", shard="a")
    with pytest.raises(UnsafeFileError, match="disk__directory"):
        writer.put(plan.variants[1], _image(1))
    assert list(victim.iterdir()) == []
    assert SyntheticCache(cache_dir, spec).refused_shards().keys() == {"a"}


# -- point 4: writers never follow a planted link ----------------------------------------------------
def test_a_shard_folder_linking_outside_the_cache_is_never_written(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    own = default_shard_name(0)
    _fill(cache_dir, plan, spec, plan.variants[:1], shard="shipped")  # a spec record, one image of 8
    (cache_dir / f"shard-{own}").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeFileError, match=re.escape(f"shard-{own}") + ".* refused: .*outside"):
        SyntheticCache(cache_dir, spec, shard=own).put(plan.variants[0], _image(0, 16))
    assert list(outside.iterdir()) == []  # no cache.db written outside the cache

    # warm (the CLI, rank 0: this very shard) stops before loading a model: exit 2, no traceback
    tiny = base / "models.json"
    spec.models.save(tiny)
    done = run_dalda("warm", "--plan", str(base / "plan"), "--cache", str(cache_dir), "--models", str(tiny),
                     "--steps", str(STEPS), "--size", str(SIZE), "--no-progress", "--device", "cpu", timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"shard-{own}" in errors[0] and "outside" in errors[0], done.stderr
    assert list(outside.iterdir()) == []


def test_value_folders_linking_outside_the_shard_are_never_written_through(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    c = SyntheticCache(cache_dir, spec, image_format="raw", shard="a")
    c.put(plan.variants[0], _image(0, 16))  # inline: creates the shard only
    c.close()
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(256):  # every first-level value folder diskcache could pick
        (cache_dir / "shard-a" / f"{i:02x}").symlink_to(outside, target_is_directory=True)
    writer = SyntheticCache(cache_dir, spec, image_format="raw", shard="a")
    with pytest.raises(UnsafeFileError, match="cache value folder .* leads outside"):
        writer.put(plan.variants[1], _image(1))
    assert list(outside.iterdir()) == []


def test_spec_records_never_follow_planted_links(world, tmp_path):
    base, plan, spec = world
    cache_dir = tmp_path / "cache"
    _fill(cache_dir, plan, spec, plan.variants[:1])
    record = next((cache_dir / "specs").glob("*.json"))
    record.unlink()
    victim = tmp_path / "bashrc"
    victim.write_text("export KEEP=me\n")
    # links at the temporary names older writers used (host and pid), for this pid and the next ones
    host = socket.gethostname()
    for pid in range(os.getpid(), os.getpid() + 64):
        (cache_dir / "specs" / f".{record.name}.tmp-{host}-{pid}").symlink_to(victim)
    # and the record itself a link to the victim
    record.symlink_to(victim)
    SyntheticCache(cache_dir, spec).record_spec(plan)
    assert victim.read_text() == "export KEEP=me\n"
    assert record.is_file() and not record.is_symlink()
    assert [s.fingerprint for s in SyntheticCache(cache_dir).recorded_specs()] == [spec.fingerprint]

    # a specs folder linking outside the cache: refused in one line, nothing written there
    cache2 = tmp_path / "cache2"
    cache2.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache2 / "specs").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeFileError, match="spec record folder .* leads outside"):
        SyntheticCache(cache2, spec).record_spec(plan)
    with pytest.raises(UnsafeFileError, match="spec record folder"):
        SyntheticCache(cache2).recorded_specs()
    assert list(elsewhere.iterdir()) == []


def test_no_other_temporary_file_writer_in_the_cache_package():
    """Every file the cache package writes goes through _io's one atomic write (or diskcache)."""
    root = Path(__file__).resolve().parents[1] / "dalda_aug" / "cache"
    for path in root.glob("*.py"):
        text = path.read_text()
        # (export_manifest names the atomic write's temporaries, ".<name>.tmp-...", to sweep those of killed runs)
        for call in ("os.replace(", "os.rename(", "write_text(", "write_bytes(", "mkstemp(", '.tmp-{'):
            assert call not in text, (path, call)


# -- point 8: coverage counts entries, not rows -------------------------------------------------------
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def _construct(base, plan, cache_dir):
    from torchvision.datasets import ImageFolder

    from dalda_aug.dataset import SyntheticAugmentedDataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = SyntheticAugmentedDataset(ImageFolder(str(base / "data")), plan, SyntheticCache(cache_dir), p=1.0,
                                       on_miss="real", seed=0)
    return ds, [str(w.message) for w in caught]


def test_construction_counts_what_cache_stats_counts_after_a_partial_copy(world, tmp_path, monkeypatch):
    base, plan, spec = world
    monkeypatch.setenv("DALDA_AUG_CACHE", str(tmp_path / "user-cache"))
    cache_dir = tmp_path / "cache"
    _fill(cache_dir, plan, spec, plan.variants)
    for name in ("cache.db", "cache.db-wal"):  # a cache warmed an hour ago: its coverage may be recorded
        if (cache_dir / "shard-a" / name).exists():
            os.utime(cache_dir / "shard-a" / name, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    ds, warned = _construct(base, plan, cache_dir)
    assert ds.cached_variants == 8 and not warned
    assert list((tmp_path / "user-cache" / "stat").glob("coverage-*.json"))  # remembered

    # A partial copy: half the value files gone (the rows stay), then a fresh count ...
    keys = [spec.key(v) for v in plan.variants]
    gone = [_value_file(cache_dir, "a", k) for k in keys[::2]]
    for path in gone:
        path.unlink()
    for record in (tmp_path / "user-cache" / "stat").glob("coverage-*.json"):
        record.unlink()
    stats = SyntheticCache(cache_dir).stats(plan)
    assert stats["plan"]["cached"] == 4
    ds, warned = _construct(base, plan, cache_dir)
    assert ds.cached_variants == stats["plan"]["cached"] == 4
    assert any("4/8 synthetic variants" in w for w in warned)

    # ... and with the count read back from the record made before the files went: the first
    # miss that count did not foresee is warned about in the epoch, not served real silently.
    cache_dir3 = tmp_path / "cache3"
    _fill(cache_dir3, plan, spec, plan.variants)
    for name in ("cache.db", "cache.db-wal"):
        if (cache_dir3 / "shard-a" / name).exists():
            os.utime(cache_dir3 / "shard-a" / name, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    _construct(base, plan, cache_dir3)
    for key in keys[::2]:
        _value_file(cache_dir3, "a", key).unlink()
    ds, warned = _construct(base, plan, cache_dir3)
    assert ds.cached_variants == 8 and not warned  # the record: the index files did not change
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = [ds[i][0].size for _ in range(4) for i in range(len(ds))]
    assert (BIG, BIG) in sizes and any(s != (BIG, BIG) for s in sizes)
    late = [str(w.message) for w in caught if "construction counted every planned variant cached" in str(w.message)]
    assert len(late) == 1
