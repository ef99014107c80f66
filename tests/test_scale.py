"""Cost at scale (issue 23): construction re-decodes only changed sources (a stat record, as git's
index); the plan is columnar and memory-mapped."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.dataset import SyntheticAugmentedDataset
from dalda_aug.errors import InputError
from dalda_aug.generation import GenerationConfig
from dalda_aug.plan import build_plan
from dalda_aug.stat_record import StatRecord

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
    spec = GenerationSpec(tiny_models, GenerationConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)
    return root, plan, cache


def _build(setup, **kwargs):
    root, plan, cache = setup
    return SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=0.5, on_miss="error", **kwargs)


def _flip_pixel_keep_stat(path):
    """Change one pixel, keep the file's size, restore its mtime: only a hash can tell."""
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
    assert sorted(map(tuple, rows.tolist())) == sorted((os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files)
    victim = root / "bee" / "img_2.png"
    _flip_pixel_keep_stat(victim)
    _build(setup)  # same stat: not decoded, so not detected (this is what "stat" trades)
    with pytest.raises(InputError, match=f"{victim}.*changed since the plan was made"):
        _build(setup, verify_sources="full")
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
    assert record.save(np.array([[1, 2], [3, 4]], dtype=np.int64))
    assert record.load().tolist() == [[1, 2], [3, 4]]
    np.save(record.path, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    assert record.load() is None
    record.path.write_bytes(b"\x93NUMPY" + b"\0" * 10_000)
    assert record.load() is None
    assert StatRecord(["/a", "/b"], ["0" * 64, "2" * 64], tmp_path).path != record.path  # hashes bind the name


def test_verify_sources_is_checked(setup):
    with pytest.raises(InputError, match="verify_sources must be one of"):
        _build(setup, verify_sources="fast")
