"""Coverage at construction without a key per variant (issue 23 point 3): cache keys in bulk,
the plan's key digest, the shards' state token and the coverage record that remembers a count
under it, as stat records remember verified sources."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import dalda_aug.dataset.checks as dataset_module  # the coverage count lives in its checks
from dalda_aug.cache import GenerationSpec, SyntheticCache, variant_key, variant_keys
from dalda_aug.dataset import SyntheticAugmentedDataset
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import build_plan
from dalda_aug.plan.records import CoverageRecord

CLASSES = ["ant", "bee"]
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def test_bulk_keys_equal_one_key_at_a_time():
    prompts = ["a photo of a cat", 'quotes " and \\ backslash', "ünïcödé 写真 🐱", "", "tab\tnew\nline"]
    shas = ["0" * 64, "f" * 64, "abc"]
    rng = np.random.default_rng(0)
    n = 200
    prompt_codes = rng.integers(0, len(prompts), n).tolist()
    sha_codes = rng.integers(0, len(shas), n).tolist()
    lams = [*rng.uniform(0, 1, n - 6).tolist(), 0.0, 1.0, 1e-300, math.nan, math.inf, -0.5]
    seeds = [*rng.integers(-(2**40), 2**62, n - 2).tolist(), 0, -1]
    got = variant_keys("fp123", prompts, prompt_codes, lams, seeds, shas, sha_codes)
    want = [variant_key("fp123", prompts[p], lam, seed, shas[h])
            for p, lam, seed, h in zip(prompt_codes, lams, seeds, sha_codes)]
    assert got == want


def _write_folder(root, per_class=4):
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"img_{i}.png"
            Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(path)
            os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    return root


def _settle(cache):
    """Date the shards' index files an hour back, as a cache warmed earlier (not racily recent)."""
    for shard in cache.directory.iterdir():
        for name in ("cache.db", "cache.db-wal"):
            if (shard / name).exists():
                os.utime(shard / name, ns=(HOUR_AGO_NS, HOUR_AGO_NS))


@pytest.fixture()
def setup(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("DALDA_AUG_CACHE", str(tmp_path / "user-cache"))
    root = _write_folder(tmp_path / "folder")
    plan = build_plan(root, variants=3, seed=0, scores=np.linspace(0.1, 0.9, 8), models=tiny_models)
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=16, width=16), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)
    return root, plan, cache


def _put(cache, variants):
    for v in variants:
        cache.put(v, Image.new("RGB", (16, 16), (v.variant * 40, 0, 0)))


def _build(root, plan, cache, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=0.5, seed=0, on_miss="real", **kwargs)
    return ds, [str(w.message) for w in caught if "synthetic variants of the plan" in str(w.message)]


class _CountingKeys:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = dataset_module.variant_digests

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(dataset_module, "variant_digests", counting)


def test_an_unchanged_cache_is_not_recounted_and_a_changed_one_is(setup, monkeypatch):
    root, plan, cache = setup
    variants = list(plan)
    distinct = len({cache.spec.key(v) for v in variants})
    _put(cache, variants[:5])
    _settle(cache)
    counting = _CountingKeys(monkeypatch)

    first, warned = _build(root, plan, cache)
    assert first.cached_variants == 5 and counting.calls == 1
    assert warned and f"5/{distinct} synthetic variants" in warned[0]
    again, warned_again = _build(root, plan, cache)
    assert again.cached_variants == 5 and counting.calls == 1  # read from the record
    assert warned_again == warned  # the same warning, the same figures

    _put(cache, variants[5:9])  # the cache changes: the record no longer applies
    third, warned = _build(root, plan, cache)
    assert third.cached_variants == 9 and counting.calls == 2
    assert f"9/{distinct} synthetic variants" in warned[0]

    _put(cache, variants[9:])
    _settle(cache)
    full, warned = _build(root, plan, cache)
    assert full.cached_variants == distinct and not warned
    assert counting.calls == 3
    full_again, warned = _build(root, plan, cache)
    assert full_again.cached_variants == distinct and not warned and counting.calls == 3

    removed = cache.spec.key(variants[0])
    assert cache.delete(removed)
    after_delete, warned = _build(root, plan, cache)
    assert after_delete.cached_variants == distinct - 1 and warned and counting.calls == 4


def test_reading_the_cache_leaves_the_state_token_alone(setup):
    root, plan, cache = setup
    variants = list(plan)
    _put(cache, variants[:4])
    before = cache.state_token()
    assert before and all(row[0].startswith(cache.shard) for row in before)
    reader = SyntheticCache(cache.directory, cache.spec)  # another handle, as a DataLoader worker has
    assert reader.get(variants[0]) is not None
    assert reader.present(variants).sum() == 4
    assert cache.state_token() == before
    _put(cache, variants[4:5])
    assert cache.state_token() != before


def test_a_racy_token_is_not_recorded(setup, tmp_path):
    root, plan, cache = setup
    _put(cache, list(plan)[:2])
    token = cache.state_token()  # files written just now
    record = CoverageRecord(cache.directory, "fp", "digest", directory=tmp_path / "records")
    assert not record.save(token, {"held": 2, "planned": 24})
    assert record.load(token) is None
    later = max(row[3] for row in token) + 3 * 10**9
    assert record.save(token, {"held": 2, "planned": 24}, now_ns=later)
    assert record.load(token) == {"held": 2, "planned": 24}
    assert record.load([[*token[0][:2], token[0][2] + 1, token[0][3]]]) is None  # another size


@pytest.mark.parametrize("body", [
    b"\x80\x04\x95 not json, a pickle",
    b"[1, 2]",
    b'{"format": "dalda_aug.coverage/1", "token": TOKEN, "counts": {"held": 9, "planned": 3}}',
    b'{"format": "dalda_aug.coverage/1", "token": TOKEN, "counts": {"held": -1, "planned": 3}}',
    b'{"format": "dalda_aug.coverage/1", "token": TOKEN, "counts": {"held": 1.5, "planned": 3}}',
    b'{"format": "dalda_aug.coverage/1", "token": TOKEN, "counts": {"planned": 3}}',
    b'{"format": "other", "token": TOKEN, "counts": {"held": 1, "planned": 3}}',
    b"[" * 100_000,
    b'{"pad": "' + b"x" * (2 << 20) + b'"}',
])
def test_a_record_not_to_be_trusted_is_ignored(setup, tmp_path, body):
    root, plan, cache = setup
    _put(cache, list(plan)[:2])
    _settle(cache)
    token = cache.state_token()
    record = CoverageRecord(cache.directory, "fp", "digest", directory=tmp_path / "records")
    record.path.parent.mkdir(parents=True)
    record.path.write_bytes(body.replace(b"TOKEN", json.dumps(token).encode()))
    assert record.load(token) is None


def test_a_planted_record_cannot_hide_missing_variants(setup, monkeypatch):
    """A record names its folder, spec and plan by digest: one made for a fully cached plan does
    not vouch for a partly cached one."""
    root, plan, cache = setup
    variants = list(plan)
    _put(cache, variants[:3])
    _settle(cache)
    ds, warned = _build(root, plan, cache)
    assert ds.cached_variants == 3 and warned
    other_plan = build_plan(root, variants=2, seed=1, scores=np.linspace(0.1, 0.9, 8), models=cache.spec.models)
    _, _ = _build(root, other_plan, cache)  # writes its own record; ours is unchanged
    folder = os.path.join(os.environ["DALDA_AUG_CACHE"], "stat")
    records = [name for name in os.listdir(folder) if name.startswith("coverage-")]
    assert len(records) == 2
    ds_again, warned_again = _build(root, plan, cache)
    assert ds_again.cached_variants == 3 and warned_again == warned


def test_the_key_digest_follows_what_keys_are_made_of(setup):
    root, plan, cache = setup
    columns = plan.columns
    sources = np.arange(columns.n_sources)
    digest = columns.key_digest(sources)
    assert columns.key_digest(sources) == digest
    assert columns.key_digest(sources[:-1]) != digest
    fields = columns.key_fields(sources)
    keys = variant_keys(cache.spec.fingerprint, *columns.key_inputs(sources))
    assert keys == [cache.spec.key(v) for v in fields]
    assert sorted(keys) == sorted(cache.spec.key(v) for v in plan)
    columns.arrays["lambda"] = np.array(columns.arrays["lambda"], copy=True)
    columns.arrays["lambda"][0] += 1e-9
    assert columns.key_digest(sources) != digest


def test_stats_counts_keys_in_arrays_as_a_set_would(setup):
    root, plan, cache = setup
    variants = list(plan)
    _put(cache, variants[:7])
    good_key = cache.spec.key(variants[0])
    writer = cache._open(cache.shard)
    # a copy under another 64-character key (its header names the lowercase key: a bad entry, and
    # one that must not be mistaken for the good one when keys are packed as bytes)
    writer.set(good_key.upper(), cache.get_raw(variants[0]))
    writer.set("z" * 64, b"not an entry")  # not hex at all, and not an entry
    other = SyntheticCache(cache.directory, cache.spec, shard="other")
    _put(other, variants[5:9])  # two of these are also in the first shard
    stats = cache.stats(plan)
    listed = cache.keys()
    assert stats["entries"] == len(listed - {"z" * 64, good_key.upper()}) == 7 + 2
    assert stats["bad"] == 2
    plan_keys = {cache.spec.key(v) for v in variants}
    assert stats["plan"]["images"] == len(plan_keys)
    assert stats["plan"]["cached"] == len(plan_keys & listed) == 9
    assert stats["plan"]["missing"] == len(plan_keys) - 9


def test_a_cache_on_a_network_filesystem_is_always_recounted(setup, monkeypatch):
    """An NFS client may see another node's write late in the stat, so no record is trusted there."""
    root, plan, cache = setup
    _put(cache, list(plan)[:5])
    _settle(cache)
    counting = _CountingKeys(monkeypatch)
    monkeypatch.setattr(type(cache), "is_network", lambda self: True)  # as is_network_filesystem says on NFS
    for calls in (1, 2):
        ds, _ = _build(root, plan, cache)
        assert ds.cached_variants == 5 and counting.calls == calls
    assert not list((Path(os.environ["DALDA_AUG_CACHE"]) / "stat").glob("coverage-*.json"))


def test_a_cache_much_larger_than_the_plan_is_counted_by_look_ups_alike(setup, tiny_models):
    root, plan, cache = setup
    variants = list(plan)
    other = build_plan(root, variants=20, seed=7, scores=np.linspace(0.1, 0.9, 8), models=tiny_models)
    _put(cache, variants[:5])
    _put(cache, list(other))  # 160 more rows: more than 4 per planned key, so each key is looked up
    assert cache.count_rows() > 4 * len({cache.spec.key(v) for v in variants})
    want = len({cache.spec.key(v) for v in variants} & cache.keys())
    ds, warned = _build(root, plan, cache)
    assert ds.cached_variants == want == 5 and warned
    assert f"holds {len(cache.keys())} images" in warned[0]
