"""SyntheticCache: keys, lossless round trips, no eviction, corruption, shards, processes, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing as mp
import pickle
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import (CorruptEntryError, GenerationSpec, SyntheticCache, decode_entry, encode_entry,
                             is_network_filesystem)
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import Variant

from helpers import noise_folder


def _variant(i: int = 0, **changes) -> Variant:
    values = dict(source=f"cls/img{i}.png", label=0, class_name="cls", score=0.5, variant=i,
                  prompt=f"a photo of a cls, take {i}", lam=0.25 + i / 100, seed=1000 + i, source_sha256="ab" * 32)
    values.update(changes)
    return Variant(**values)


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def spec(tiny_models) -> GenerationSpec:
    return GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")


@pytest.fixture()
def cache(tmp_path, spec) -> SyntheticCache:
    return SyntheticCache(tmp_path / "cache", spec, shard="test")


def _shard_db(cache: SyntheticCache) -> Path:
    return cache.directory / f"shard-{cache.shard}" / "cache.db"


# -- keys ----------------------------------------------------------------------------------------
def test_key_changes_with_everything_that_changes_pixels(spec):
    base_key = spec.key(_variant())
    models = spec.models
    other_specs = [
        dataclasses.replace(spec, models=dataclasses.replace(models, base=models.base + "-other")),
        dataclasses.replace(spec, models=dataclasses.replace(models, base_revision="v2")),
        dataclasses.replace(spec, models=dataclasses.replace(models, ip_adapter_revision="v2")),
        dataclasses.replace(spec, models=dataclasses.replace(models, vae=None)),
        dataclasses.replace(spec, models=dataclasses.replace(models, ip_adapter_weight="other.bin")),
        dataclasses.replace(spec, dtype="float16"),
        dataclasses.replace(spec, dtype="bfloat16"),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, scheduler="dpmsolver++")),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, num_inference_steps=3)),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, guidance_scale=5.0)),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, height=64)),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, width=64)),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, prompt_prefix="")),
        dataclasses.replace(spec, config=dataclasses.replace(spec.config, negative_prompt="blurry")),
    ]
    keys = [s.key(_variant()) for s in other_specs]
    keys += [spec.key(_variant(prompt="another prompt")), spec.key(_variant(lam=0.2500001)),
             spec.key(_variant(seed=1001)), spec.key(_variant(source_sha256="cd" * 32))]
    assert base_key not in keys
    assert len(set(keys)) == len(keys)
    assert len(base_key) == 64 and int(base_key, 16) >= 0


def test_key_ignores_index_shots_score_and_clip_model(spec):
    key = spec.key(_variant())
    # Same pixels whatever the dataset position, label index, variant slot or CLIPScore...
    assert spec.key(_variant(source=17, label=3, variant=9, score=0.99, class_name="x")) == key
    # ...and the CLIP model used for scoring does not change the generated pixels.
    clip = dataclasses.replace(spec.models, clip_model="ViT-L-14", clip_pretrained="other")
    assert dataclasses.replace(spec, models=clip).key(_variant()) == key
    # Speed-ups that compute the same function do not change keys either.
    fast = dataclasses.replace(spec.config, channels_last=True, attention="math")
    assert dataclasses.replace(spec, config=fast).key(_variant()) == key


def test_real_guidance_spec_builds_its_generator_and_has_its_own_keys(spec):
    from dalda_aug.generators.real_guidance import RealGuidanceConfig, RealGuidanceGenerator

    rg = GenerationSpec(spec.models, RealGuidanceConfig(num_inference_steps=2, height=32, width=32))
    assert isinstance(rg.make_generator(), RealGuidanceGenerator)
    assert type(spec.make_generator()).__name__ == "IPAdapterGenerator"
    assert rg.key(_variant()) != spec.key(_variant())


def test_spec_validates_inputs(tiny_models):
    with pytest.raises(InputError):
        GenerationSpec("not a ModelConfig")
    with pytest.raises(InputError):
        GenerationSpec(tiny_models, dtype="int8")
    assert GenerationSpec(tiny_models).config == IPAdapterConfig()
    assert GenerationSpec(tiny_models, dtype="fp16").dtype == "float16"


# -- entries -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["lz4", "png", "webp", "raw"])
def test_round_trip_is_lossless_with_metadata(tmp_path, spec, fmt):
    cache = SyntheticCache(tmp_path / "c", spec, image_format=fmt)
    variant, image = _variant(3), _image(3)
    key = cache.put(variant, image)
    assert key == spec.key(variant) and variant in cache and key in cache
    entry = cache.get(variant)
    assert entry.key == key
    assert np.array_equal(np.asarray(entry.image), np.asarray(image))
    meta = entry.metadata
    assert meta["format"] == fmt
    assert meta["lambda"] == variant.lam and meta["prompt"] == variant.prompt and meta["seed"] == variant.seed
    assert meta["score"] == variant.score
    assert meta["model_fingerprint"] == spec.models.fingerprint()
    assert meta["generation_fingerprint"] == spec.fingerprint
    assert (meta["width"], meta["height"]) == image.size
    assert cache.get(_variant(4)) is None
    assert len(cache) == 1 and cache.keys() == {key}


def test_default_format_is_lz4_and_older_formats_stay_readable(tmp_path, spec):
    import lz4.block

    cache = SyntheticCache(tmp_path / "c", spec)
    assert cache.image_format == "lz4"
    # Entries written in every format (as older caches did) are read by a default cache.
    for i, fmt in enumerate(["png", "webp", "raw"]):
        SyntheticCache(tmp_path / "c", spec, image_format=fmt, shard=fmt).put(_variant(i), _image(i))
    cache.put(_variant(3), _image(3))
    for i, fmt in enumerate(["png", "webp", "raw", "lz4"]):
        entry = cache.get(_variant(i))
        assert entry.metadata["format"] == fmt
        assert np.array_equal(np.asarray(entry.image), np.asarray(_image(i)))
    # The lz4 payload is LZ4's block format of the raw RGB bytes, as an independent decoder reads it.
    blob = cache.get_raw(_variant(3))
    meta_len = int.from_bytes(blob[9:13], "big")
    payload = blob[13 + meta_len:]
    assert lz4.block.decompress(payload, uncompressed_size=48 * 40 * 3) == _image(3).tobytes()
    # Content with repeated runs compresses (photos: ~0.88 of raw, see benchmarks/README.md).
    y, x = np.mgrid[0:64, 0:64]
    smooth = Image.fromarray(np.stack([x // 8 * 32, y // 8 * 32, (x + y) // 16 * 32], -1).astype(np.uint8))
    assert len(encode_entry(smooth, {}, "lz4")) < 0.9 * 64 * 64 * 3


def test_spec_records_make_the_cache_self_describing(tmp_path, spec):
    from dalda_aug.plan import AugmentationPlan

    plan_a = AugmentationPlan([_variant(0), _variant(1)], {})
    plan_b = AugmentationPlan([_variant(2)], {})
    other = dataclasses.replace(spec, config=dataclasses.replace(spec.config, num_inference_steps=3))
    assert GenerationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert GenerationSpec.from_dict(spec.to_dict()).fingerprint == spec.fingerprint

    directory = tmp_path / "c"
    bare = SyntheticCache(directory)
    with pytest.raises(InputError, match="does not exist"):
        bare.resolve_spec(plan_a)
    SyntheticCache(directory, spec).record_spec(plan_a)
    assert [p.name for p in (directory / "specs").iterdir()] == [f"{spec.fingerprint}-{_plan_fp(plan_a)}.json"]
    bare = SyntheticCache(directory)
    assert bare.resolve_spec() == spec and bare.resolve_spec(plan_b) == spec  # the only one
    SyntheticCache(directory, spec).put(_variant(0), _image(0))
    assert bare.key(_variant(0)) == spec.key(_variant(0)) and bare.get(_variant(0)) is not None
    assert bare.stats(plan_a)["plan"]["cached"] == 1

    # Two specs: the one holding images (of the plan in use, if any), else the one recorded for
    # the plan, else an error listing both.
    SyntheticCache(directory, other).record_spec(plan_b)
    bare = SyntheticCache(directory)
    assert bare.resolve_spec(plan_a) == spec and bare.resolve_spec(plan_b) == other
    assert {s.fingerprint for s in bare.recorded_specs()} == {spec.fingerprint, other.fingerprint}
    assert bare.key(_variant(0)) == spec.key(_variant(0))  # `other` holds no image: passed over
    SyntheticCache(directory, other).put(_variant(2), _image(2))
    bare = SyntheticCache(directory)
    with pytest.raises(InputError, match=f"2 generation specs.*{spec.fingerprint}.*2 of them hold images and "
                                         "no plan says"):
        bare.key(_variant(0))
    assert bare.resolve_spec(plan_a) == spec and bare.resolve_spec(plan_b) == other
    plan_c = AugmentationPlan([_variant(9)], {})
    with pytest.raises(InputError, match="none holds images of this plan and none of them are recorded for it"):
        bare.resolve_spec(plan_c)
    # An explicit spec wins.
    assert SyntheticCache(directory, other).resolve_spec(plan_a) == other
    # A damaged record is named.
    (directory / "specs" / "junk.json").write_text("{")
    with pytest.raises(InputError, match="junk.json"):
        SyntheticCache(directory).resolve_spec(plan_a)


def _plan_fp(plan):
    from dalda_aug.cache import plan_fingerprint

    return plan_fingerprint(plan)


def test_own_writes_are_visible_at_once(cache):
    variant = _variant(5)
    assert cache.get(variant) is None  # first scan: no shard yet
    cache.put(variant, _image(5))
    assert cache.get(variant) is not None  # no waiting for the periodic rescan


@pytest.mark.parametrize("fmt", ["lz4", "png", "webp", "raw"])
def test_encode_decode_detects_damage(fmt):
    blob = encode_entry(_image(1), {"key": "k" * 64}, fmt)
    image, meta = decode_entry(blob, "k" * 64)
    assert image.size == (48, 40) and meta["nbytes"] > 0
    from dalda_aug.cache import CorruptEntryError

    flipped = bytearray(blob)
    flipped[-20] ^= 0xFF
    for bad in (blob[: len(blob) // 2], bytes(flipped), b"junk", b"", blob.replace(b"DALDAIMG", b"XXXXXXXX")):
        with pytest.raises(CorruptEntryError):
            decode_entry(bad)
    with pytest.raises(CorruptEntryError):
        decode_entry(blob, "z" * 64)  # stored under another key


def test_no_eviction(cache):
    cache.put(_variant(), _image(0))
    with sqlite3.connect(_shard_db(cache)) as db:
        settings = dict(db.execute("SELECT key, value FROM Settings").fetchall())
    assert settings["eviction_policy"] == "none"
    assert settings["size_limit"] >= 2**60  # diskcache's 1 GB default does not apply


# -- corruption ----------------------------------------------------------------------------------
def test_corrupt_inline_entry_is_removed_and_counted(cache):
    import diskcache

    variant = _variant(1)
    key = cache.put(variant, _image(1))
    blob = cache.get_raw(key)
    with diskcache.Cache(str(_shard_db(cache).parent)) as raw:
        raw.set(key, blob[: len(blob) - 7])  # truncated image bytes
    assert cache.get(variant) is None
    assert cache.corrupt_removed == 1
    assert variant not in cache
    assert cache.stats()["corrupt_removed"] == 1


def test_corrupt_file_entry_is_removed(cache):
    variant = _variant(2)
    cache.put(variant, _image(2, size=(256, 256)))  # noise: > 32 KB, stored as a file by diskcache
    files = [p for p in _shard_db(cache).parent.rglob("*.val")]
    assert len(files) == 1
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    assert cache.get(variant) is None
    assert cache.corrupt_removed == 1 and variant not in cache


def test_verify_reports_and_removes_bad_entries(cache):
    import diskcache

    good = [cache.put(_variant(i), _image(i)) for i in range(3)]
    big = cache.put(_variant(9), _image(9, size=(256, 256)))
    with diskcache.Cache(str(_shard_db(cache).parent)) as raw:
        raw.set(good[0], b"not an entry")
    next(_shard_db(cache).parent.rglob("*.val")).unlink()  # the big entry's value file is gone
    report = cache.verify()
    assert report["checked"] == 4 and report["ok"] == 2
    assert {b["key"] for b in report["bad"]} == {good[0], big}
    assert len(cache) == 4  # only reported
    report = cache.verify(remove=True)
    assert report["removed"] == 2
    assert cache.keys() == set(good[1:])
    assert cache.verify()["bad"] == []


def test_stats_counts_only_entries_whose_headers_and_sizes_check_out(cache):
    import diskcache

    variants = [_variant(i) for i in range(5)]
    keys = [cache.put(v, _image(i)) for i, v in enumerate(variants[:4])]  # small: inline in the row
    keys.append(cache.put(variants[4], _image(4, size=(256, 256))))  # noise, > 32 KB: a value file
    blob = bytearray(cache.get_raw(keys[0]))
    blob[-1] ^= 0x01  # one flipped bit in the image bytes of an inline entry (read whole with its row)
    cache.put_encoded(keys[0], bytes(blob))
    cache.put_encoded(keys[1], cache.get_raw(keys[1])[:-7])  # truncated image bytes
    with diskcache.Cache(str(_shard_db(cache).parent)) as raw:
        raw.set(keys[2], b"DALDAIMG garbage header")
    value_file = next(_shard_db(cache).parent.rglob("*.val"))
    data = bytearray(value_file.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in a value file's image bytes: header and sizes still agree
    value_file.write_bytes(bytes(data))
    stats = cache.stats(variants)
    # stats reads no image bytes of a value file: the flipped bit there is left to the readers
    # that decode and to verify.
    assert stats["entries"] == 2 and stats["bad"] == 3 and stats["shards"][0]["entries"] == 2
    assert stats["plan"]["cached"] == 2 and stats["plan"]["missing"] == 3
    good, bad = cache.check_entries()  # the image bytes' CRC-32 of every entry
    assert good == {keys[3]} and {b["key"] for b in bad} == set(keys) - {keys[3]}
    assert {b["key"] for b in cache.verify()["bad"]} == set(keys) - {keys[3]}
    assert len(cache) == 5  # stats and checks remove nothing
    assert cache.get(variants[4]) is None  # a decoding reader refuses (and removes) it
    assert len(cache) == 4


def test_a_flipped_metadata_byte_fails_the_checksum(tmp_path, cache):
    from dalda_aug.cache import CorruptEntryError, check_entry

    variant = _variant(4, label=1, class_name="dog")
    key = cache.put(variant, _image(4))
    blob = cache.get_raw(key)
    assert blob.count(b'"label": 1') == 1
    flipped = blob.replace(b'"label": 1', b'"label": 0')  # dog -> cat, same length
    cache.put_encoded(key, flipped)
    for check in (check_entry, decode_entry):
        with pytest.raises(CorruptEntryError, match="metadata fails its checksum"):
            check(flipped, key)
    report = cache.verify()
    assert [b["key"] for b in report["bad"]] == [key] and report["ok"] == 0
    assert cache.export(tmp_path / "out")["exported"] == 0  # not filed under any class
    assert not list((tmp_path / "out").glob("*/*.png"))
    assert cache.get(variant) is None  # removed, reported as a miss


def _legacy_entry(key: str, meta: dict, image: Image.Image) -> bytes:
    """An entry as written before the metadata checksum: header (magic, layout 1, metadata
    length), JSON metadata with a CRC-32 of the raw RGB bytes only, the bytes."""
    import struct
    import zlib

    payload = image.tobytes()
    meta = dict(meta, key=key, format="raw", width=image.width, height=image.height, nbytes=len(payload),
                crc32=zlib.crc32(payload))
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    return struct.pack(">8sBI", b"DALDAIMG", 1, len(meta_bytes)) + meta_bytes + payload


def test_older_entries_without_metadata_checksum_stay_readable_where_safe(cache, spec):
    variant, image = _variant(6), _image(6)
    key = spec.key(variant)
    meta = {"generation_fingerprint": spec.fingerprint, "prompt": variant.prompt, "lambda": variant.lam,
            "seed": variant.seed, "source_sha256": variant.source_sha256, "label": 0, "class_name": "cls"}
    cache.put_encoded(key, _legacy_entry(key, meta, image))
    assert np.array_equal(np.asarray(cache.get(variant).image), np.asarray(image))
    report = cache.verify()
    assert report["ok"] == 1 and report["unchecked_metadata"] == 1
    # The fields the key is made of are still checked: they must hash to the key.
    changed = _legacy_entry(key, dict(meta, prompt="another prompt"), image)
    with pytest.raises(CorruptEntryError, match="does not match its key"):
        decode_entry(changed, key)
    cache.put_encoded(key, changed)
    assert cache.get(variant) is None


def test_leases_keep_processes_off_each_others_keys(tmp_path, spec):
    import time

    a = SyntheticCache(tmp_path / "c", spec, shard="s")
    b = SyntheticCache(tmp_path / "c", spec, shard="s")  # another process, as far as leases go
    k1, k2, k3, k4 = (c * 64 for c in "1234")
    assert a.claim([k1, k2], 30) == [k1, k2]
    assert b.claim([k1, k3], 30) == [k3]
    assert a.claim([k1], 30) == [k1]  # renewing one's own
    b.release([k2])  # not b's: stays a's
    assert b.claim([k2], 30) == []
    a.release([k1])
    assert b.claim([k1], 30) == [k1]
    a.claim([k4], 0.3)
    time.sleep(0.6)
    assert b.claim([k4], 30) == [k4]  # expired: taken over
    assert a.keys() == set() and a.stats()["entries"] == 0  # leases are not entries


# -- shards, processes ---------------------------------------------------------------------------
def test_shards_read_as_one_and_merge_by_copying(tmp_path, spec):
    import shutil

    a = SyntheticCache(tmp_path / "c", spec, shard="node1-0")
    b = SyntheticCache(tmp_path / "c", spec, shard="node2-1")
    ka = a.put(_variant(1), _image(1))
    kb = b.put(_variant(2), _image(2))
    reader = SyntheticCache(tmp_path / "c", spec, shard="reader")
    assert reader.keys() == {ka, kb}
    assert reader.get(_variant(1)) is not None and reader.get(_variant(2)) is not None
    assert {s["name"] for s in reader.stats()["shards"]} == {"node1-0", "node2-1"}
    assert not (tmp_path / "c" / "shard-reader").exists()  # readers create nothing
    # A shard created after the reader's first scan is found too.
    c = SyntheticCache(tmp_path / "c", spec, shard="late")
    kc = c.put(_variant(3), _image(3))
    assert _variant(3) in reader and reader.get(kc) is not None
    # Merging caches = copying shard folders.
    for name in ("node1-0", "node2-1", "late"):
        shutil.copytree(tmp_path / "c" / f"shard-{name}", tmp_path / "merged" / f"shard-{name}")
    assert SyntheticCache(tmp_path / "merged", spec).keys() == {ka, kb, kc}


def test_default_shard_is_host_and_rank(tmp_path, spec, monkeypatch):
    import socket

    monkeypatch.setenv("RANK", "3")
    cache = SyntheticCache(tmp_path / "c", spec)
    assert cache.shard.endswith("-3") and cache.shard.startswith(socket.gethostname()[:3].replace(".", "_"))


def test_pickles_without_handles(cache):
    key = cache.put(_variant(), _image(0))
    data = pickle.dumps(cache)
    assert len(data) < 4096
    clone = pickle.loads(data)
    assert clone.get(key) is not None


def test_a_pickled_cache_reads_the_spec_records_again(tmp_path, spec):
    directory = tmp_path / "c"
    SyntheticCache(directory, spec).record_spec()
    bare = SyntheticCache(directory)
    assert bare.resolve_spec() == spec  # the records, read once and kept by this object
    other = dataclasses.replace(spec, config=dataclasses.replace(spec.config, num_inference_steps=3))
    SyntheticCache(directory, spec).forget_spec(spec.fingerprint)
    SyntheticCache(directory, other).record_spec()
    blob = pickle.dumps(bare)
    assert spec.fingerprint.encode() not in blob  # what it read stays behind
    assert pickle.loads(blob).resolve_spec() == other  # the copy reads the folder as it is now


def _child_writes(cache, start, count, queue):
    try:
        for i in range(start, start + count):
            cache.put(_variant(i), _image(i))
        queue.put(("ok", sorted(cache.keys())))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(exc)))


def test_fork_and_concurrent_writers(cache):
    # The parent opens its handles first: children must not reuse them after fork.
    first = cache.put(_variant(100), _image(100))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_child_writes, args=(cache, 20 * n, 20, queue)) for n in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert all(status == "ok" for status, _ in results), results
    assert len(cache) == 61 and first in cache
    assert cache.verify()["ok"] == 61


def _reader_loop(directory, spec, keys, expected, seconds, queue):
    import time

    reader = SyntheticCache(directory, spec, shard="reader")
    seen = 0
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        for key in keys:
            entry = reader.get(key)
            if entry is not None:
                assert np.asarray(entry.image).tobytes() == expected[key]
                seen += 1
                deadline = deadline or time.monotonic() + seconds
    queue.put((seen, reader.corrupt_removed))


def test_readers_never_see_half_written_entries(tmp_path, spec):
    """A reader polling while a writer stores large (file-backed) entries sees whole entries only."""
    import queue as queue_module

    writer = SyntheticCache(tmp_path / "c", spec, shard="writer")
    variants = [_variant(i) for i in range(12)]
    images = [_image(i, size=(320, 320)) for i in range(12)]
    keys = [spec.key(v) for v in variants]
    expected = {k: np.asarray(im).tobytes() for k, im in zip(keys, images)}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    reader = ctx.Process(target=_reader_loop, args=(tmp_path / "c", spec, keys, expected, 3.0, queue))
    reader.start()
    result, writes = None, 0
    while result is None:  # write and overwrite until the reader has polled for 3 s
        for v, im in zip(variants, images):
            writer.put(v, im)
            writes += 1
        try:
            result = queue.get(timeout=0.01)
        except queue_module.Empty:
            assert reader.is_alive() or reader.exitcode == 0, "the reader failed"
    reader.join(60)
    seen, corrupt = result
    assert reader.exitcode == 0
    assert corrupt == 0
    assert seen > 0 and writes > len(keys)


def test_journal_mode(tmp_path, spec):
    assert not is_network_filesystem(tmp_path)
    local = SyntheticCache(tmp_path / "wal", spec)
    local.put(_variant(), _image(0))
    assert local._open(local.shard)._sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    rollback = SyntheticCache(tmp_path / "nfs-like", spec, journal_mode="delete")
    rollback.put(_variant(), _image(0))
    assert rollback._open(rollback.shard)._sql("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_bad_arguments(tmp_path, spec):
    with pytest.raises(InputError):
        SyntheticCache(tmp_path, spec, image_format="gif")
    for quality in (0, 101, 95.0, True, "95"):
        with pytest.raises(InputError, match="quality must be an integer in 1..100"):
            SyntheticCache(tmp_path, spec, image_format="jpeg", quality=quality)
    with pytest.raises(InputError, match="not to lz4"):
        SyntheticCache(tmp_path, spec, quality=90)
    with pytest.raises(InputError):
        SyntheticCache(tmp_path, "spec")
    with pytest.raises(InputError, match="records no generation spec"):
        SyntheticCache(tmp_path).key(_variant())


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_stats_verify_export(tmp_path, tiny_models, capsys):
    import diskcache

    from dalda_aug.cli import main
    from dalda_aug.plan import build_plan

    root = noise_folder(tmp_path / "data", ["red_fox", "tabby_cat"], per_class=2)
    plan = build_plan(root, variants=2, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    plan.save(tmp_path / "plan")
    spec = GenerationSpec(tiny_models, dataclasses.replace(IPAdapterConfig(), num_inference_steps=2, height=32,
                                                           width=32))
    cache = SyntheticCache(tmp_path / "cache", spec)
    for v in plan.variants[:4]:  # half of the plan, with stand-in pixels
        cache.put(v, _image(v.seed % 1000))
    args = ["--cache", str(tmp_path / "cache"), "--plan", str(tmp_path / "plan"), "--steps", "2", "--size", "32"]
    # Without warm's record, the reading commands need the options, and say so.
    assert main(["cache", "stats", *args[:4]]) == 2
    assert "records no generation spec" in capsys.readouterr().err
    cache.record_spec(plan)  # what warm does; from now on no options are needed
    assert main(["cache", "stats", *args[:4], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["cached"] == 4

    assert main(["cache", "stats", *args, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 4 and stats["bytes"] > 0
    assert stats["plan"] == {"images": 8, "cached": 4, "missing": 4, "coverage": 0.5, "fingerprint": spec.fingerprint}
    assert main(["cache", "stats", *args]) == 0
    assert "4/8 images cached (50.0%)" in capsys.readouterr().out

    # Other settings -> other keys -> nothing of the plan cached.
    assert main(["cache", "stats", *args[:4], "--steps", "3", "--size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["cached"] == 0

    assert main(["cache", "export", *args, "--out", str(tmp_path / "export"), "--no-progress"]) == 0
    pngs = sorted((tmp_path / "export").rglob("*.png"))
    assert len(pngs) == 4 and {p.parent.name for p in pngs} <= {"red_fox", "tabby_cat"}
    with (tmp_path / "export" / "samples.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert {"path", "prompt", "lam", "seed", "score", "model_fingerprint"} <= set(rows[0])
    for row in rows:
        assert (tmp_path / "export" / row["path"]).is_file()
        v = next(v for v in plan if cache.key(v) == row["key"])
        assert float(row["lam"]) == v.lam and row["prompt"] == v.prompt and int(row["seed"]) == v.seed

    key = cache.key(plan.variants[0])
    with diskcache.Cache(str(cache.directory / f"shard-{cache.shard}")) as raw:
        raw.set(key, b"garbage")
    capsys.readouterr()
    assert main(["cache", "verify", "--cache", str(tmp_path / "cache"), "--no-progress"]) == 1
    assert key in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", str(tmp_path / "cache"), "--remove", "--no-progress"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert main(["cache", "stats", "--cache", str(tmp_path / "missing")]) == 2


def test_human_bytes_one_wording():
    from dalda_aug.cache.disks import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 10 * 2**20 + 2**19, 3 * 2**30, 2**40, 5 * 2**50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "10.5 MiB", "3.0 GiB", "1.0 TiB", "5120.0 TiB"]
