"""The cache at scale: a no-op warm and ``cache stats`` read < 1 % of the cache's bytes (measured
with /proc/<pid>/io in a subprocess); the present-key look-ups; what warm repairs without reading
image bytes and what only the decoding readers catch; lossy storage (jpeg, webp --quality)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache, decode_entry, encode_entry
from dalda_aug.cache.codecs import CODECS, DEFAULT_QUALITY
from dalda_aug.cli import main
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import PLAN_FORMAT, AugmentationPlan, Variant
from dalda_aug.cache.warm import warm

pytestmark = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/<pid>/io")

ENTRIES, SIDE = 120, 256  # 120 entries of 256x256 noise (~197 KB each as lz4): a ~23 MiB cache


def _variant(i: int, source_sha256: str | None = None) -> Variant:
    return Variant(source=i, label=i % 3, class_name=f"class {i % 3}", score=0.5, variant=i,
                   prompt=f"a photo of class {i % 3}, take {i}", lam=0.1 + (i % 7) / 10, seed=5000 + i,
                   source_sha256=source_sha256 or f"{i:064x}")


def _noise(seed: int, side: int = SIDE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _spec(tiny_models) -> GenerationSpec:
    return GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory, tiny_models):
    """A cache of ENTRIES noise images under the keys of a saved plan, its spec recorded."""
    base = tmp_path_factory.mktemp("scale")
    variants = [_variant(i) for i in range(ENTRIES)]
    plan = AugmentationPlan(variants, {"format": PLAN_FORMAT, "classes": ["class 0", "class 1", "class 2"]})
    plan.save(base / "plan")
    cache = SyntheticCache(base / "cache", _spec(tiny_models), shard="big")
    for i, v in enumerate(variants):
        cache.put(v, _noise(i))
    cache.record_spec(plan)
    cache.close()
    return base / "cache", base / "plan"


_MEASURE = r"""
import json, sqlite3, sys
from dalda_aug.cache import SyntheticCache
from dalda_aug.plan import AugmentationPlan
from dalda_aug.cache.warm import warm

def rchar():
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(fields["rchar"])

cache_dir, plan_dir, what = sys.argv[1:]
plan = AugmentationPlan.load(plan_dir)
def run(cache):
    if what == "warm":
        report = warm(plan, cache, progress=False)
        return {"generated": report.generated, "already_cached": report.already_cached, "bad": report.bad_entries}
    stats = cache.stats(plan)
    return {"entries": stats["entries"], "bad": stats["bad"], "cached": stats["plan"]["cached"]}
run(SyntheticCache(cache_dir))  # imports everything the call needs; then measured with a fresh cache object
before = rchar()
result = run(SyntheticCache(cache_dir))
read = rchar() - before
# What the shard readers' connections use (they leave SQLite's default): 0 means no mmap.
mmap = sqlite3.connect(f"file:{cache_dir}/shard-big/cache.db?mode=ro", uri=True).execute(
    "PRAGMA mmap_size").fetchone()[0]
print(json.dumps({"read": read, "result": result, "sqlite_mmap_size": mmap}))
"""


def _bytes_read(what: str, cache_dir: Path, plan_dir: Path) -> dict:
    """Run a no-op warm or stats in a fresh Python process; the bytes its read syscalls returned
    (``rchar`` of /proc/self/io, whether or not from the page cache) during the measured call."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(cache_dir), str(plan_dir), what],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["warm", "stats"])
def test_noop_warm_and_stats_read_under_one_percent_of_the_cache(big_cache, what):
    cache_dir, plan_dir = big_cache
    total = _folder_bytes(cache_dir)
    assert total > ENTRIES * 3 * SIDE * SIDE  # the image bytes are on disk, as value files
    measured = _bytes_read(what, cache_dir, plan_dir)
    # SQLite reads its pages with read syscalls (counted) unless memory-mapped, which the shard
    # readers leave at SQLite's default: 0 (no mmap) in this build, so nothing read is hidden.
    assert measured["sqlite_mmap_size"] == 0
    if what == "warm":
        assert measured["result"] == {"generated": 0, "already_cached": ENTRIES, "bad": 0}
    else:
        assert measured["result"] == {"entries": ENTRIES, "bad": 0, "cached": ENTRIES}
    fraction = measured["read"] / total
    print(f"{what}: {measured['read']} of {total} bytes read ({fraction:.3%})")
    assert 0 < fraction < 0.01, f"{what} read {measured['read']} of the cache's {total} bytes ({fraction:.2%})"


def test_present_asks_sqlite_for_the_keys_of_every_shard(tmp_path, tiny_models):
    spec = _spec(tiny_models)
    variants = [_variant(i) for i in range(40)]
    first = SyntheticCache(tmp_path / "cache", spec, shard="a")
    second = SyntheticCache(tmp_path / "cache", spec, shard="b")
    for i, v in enumerate(variants):
        if i % 3 == 0:
            first.put(v, _noise(i, 8))
        if i % 4 == 0:
            second.put(v, _noise(i, 8))
    keys = [spec.key(v) for v in variants] + ["f" * 64, "not a key"]
    expected = np.array([i % 3 == 0 or i % 4 == 0 for i in range(40)] + [False, False])
    reader = SyntheticCache(tmp_path / "cache", spec)
    got = reader.present(keys)
    assert got.dtype == bool and np.array_equal(got, expected)
    assert reader.count_present(variants) == int(expected.sum()) == 20
    assert reader.missing(variants) == [v for i, v in enumerate(variants) if not expected[i]]
    assert reader.present([]).shape == (0,)
    # More keys than one SQL IN batch holds.
    many = [f"{i:064x}" for i in range(2500)] + keys[:40]
    assert np.array_equal(reader.present(many)[-40:], expected[:40]) and not reader.present(many)[:2500].any()


def test_plain_warm_repairs_what_headers_and_sizes_reveal_and_verify_catches_pixels(tmp_path, tiny_models):
    import diskcache

    from dalda_aug.data import image_sha256

    spec = _spec(tiny_models)
    sources = [_noise(i, 24) for i in range(4)]
    variants = [_variant(i, image_sha256(sources[i])) for i in range(4)]
    plan = AugmentationPlan(variants, {"format": PLAN_FORMAT, "classes": ["class 0", "class 1", "class 2"]})
    cache = SyntheticCache(tmp_path / "cache", spec, shard="s")
    keys = [cache.put(v, _noise(i, 128)) for i, v in enumerate(variants)]  # 48 KB: value files
    shard = tmp_path / "cache" / "shard-s"
    with sqlite3.connect(shard / "cache.db") as con:
        files = dict(con.execute("SELECT key, filename FROM Cache WHERE key IN (?, ?, ?)", keys[:3]).fetchall())
    truncated = shard / files[keys[0]]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage = shard / files[keys[1]]
    data = bytearray(garbage.read_bytes())
    data[:8] = b"NOTANIMG"
    garbage.write_bytes(bytes(data))
    pixel = shard / files[keys[2]]
    data = bytearray(pixel.read_bytes())
    data[-1] ^= 0xFF  # a pixel byte: header and sizes still agree
    pixel.write_bytes(bytes(data))

    generator = spec.make_generator("cpu").load()
    report = warm(plan, cache, generator=generator, images=sources, progress=False)
    assert report.bad_entries == 2 and report.generated == 2 and report.already_cached == 2
    assert all(cache.get(k).image.size == (32, 32) for k in keys[:2])  # made by the generator
    # The changed pixel byte is left to the readers that decode and to verify.
    verified = cache.verify()
    assert [b["key"] for b in verified["bad"]] == [keys[2]] and "checksum" in verified["bad"][0]["error"]
    assert cache.get(keys[2]) is None  # the decoding read refuses it (and removes it)
    report = warm(plan, cache, generator=generator, images=sources, progress=False)
    assert report.generated == 1 and cache.verify()["bad"] == []
    with diskcache.Cache(str(shard)) as raw:
        assert len([k for k in raw.iterkeys() if isinstance(k, str) and len(k) == 64]) == 4


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _photo_like(side: int = 96) -> Image.Image:
    """Smooth gradients plus mild noise: what a lossy codec is made for."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    rgb = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 13), (xx + yy) * 255 / (2 * side)], -1)
    rgb += np.random.default_rng(3).normal(0, 1, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt, quality", [("jpeg", None), ("jpeg", 95), ("webp", 95)])
def test_lossy_round_trip_within_a_psnr_bound_and_the_quality_in_the_header(fmt, quality):
    image = _photo_like()
    meta = decode_entry(encode_entry(image, {"key": "k" * 64}, fmt, quality=quality), "k" * 64)[1]
    decoded = decode_entry(encode_entry(image, {"key": "k" * 64}, fmt, quality=quality), "k" * 64)[0]
    assert decoded.size == image.size and decoded.mode == "RGB"
    assert 38 < _psnr(image, decoded) < float("inf")  # lossy, and close
    assert meta["lossy"] is True and meta["quality"] == (quality or DEFAULT_QUALITY) and meta["format"] == fmt
    low = decode_entry(encode_entry(image, {}, fmt, quality=10))[0]
    assert _psnr(image, low) < _psnr(image, decoded)  # the quality is honoured
    lossless_size = len(encode_entry(image, {}, "png"))
    assert len(encode_entry(image, {}, fmt, quality=quality)) < lossless_size


@pytest.mark.parametrize("fmt", ["lz4", "png", "raw", "webp"])
def test_lossless_formats_stay_exact_and_say_nothing_of_quality(fmt):
    image = _photo_like()
    decoded, meta = decode_entry(encode_entry(image, {}, fmt))
    assert np.array_equal(np.asarray(decoded), np.asarray(image))
    assert "lossy" not in meta and "quality" not in meta


def test_the_cache_writes_lossy_entries_when_told(tmp_path, tiny_models):
    spec = _spec(tiny_models)
    assert set(CODECS) >= {"lz4", "png", "webp", "raw", "jpeg"}
    lossy = SyntheticCache(tmp_path / "cache", spec, image_format="jpeg", quality=80)
    key = lossy.put(_variant(1), _photo_like())
    entry = lossy.get(key)
    assert entry.metadata["quality"] == 80 and entry.metadata["lossy"] is True
    assert 30 < _psnr(_photo_like(), entry.image) < float("inf")
    assert lossy.with_spec(spec).quality == 80
    # A lossless cache reads it as it is (the format is not in the key).
    assert SyntheticCache(tmp_path / "cache", spec).get(key).metadata["format"] == "jpeg"


@pytest.mark.parametrize("extra, says", [
    (["--format", "jpeg", "--quality", "0"], "--quality must be an integer in 1..100, got 0"),
    (["--format", "webp", "--quality", "101"], "--quality must be an integer in 1..100, got 101"),
    (["--format", "jpeg", "--quality", "high"], "--quality must be an integer in 1..100, got 'high'"),
    (["--quality", "90"], "not to lz4"),
    (["--format", "jpeg:90", "--quality", "80"], "'jpeg:90' and quality=80 disagree"),
])
def test_warm_quality_out_of_range_is_one_line_exit_2(tmp_path, capsys, extra, says):
    code = main(["warm", "--plan", str(tmp_path / "no-plan"), "--cache", str(tmp_path / "cache"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err and err.startswith("dalda-aug warm: error:")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("fmt", ["jpeg:0", "jpeg:101", "lz4:3", "png:10", "webp:x"])
def test_warm_format_with_a_bad_option_is_a_usage_error(tmp_path, capsys, fmt):
    with pytest.raises(SystemExit) as exit_info:
        main(["warm", "--plan", str(tmp_path / "no-plan"), "--cache", str(tmp_path / "cache"), "--format", fmt])
    assert exit_info.value.code == 2
    assert f"argument --format: invalid choice: {fmt!r}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "cache").exists()
