"""Read-only and full disks (issue 11, points 5, 6 and 14), on real mounts.

Root ignores file permissions, so a read-only cache is made with a read-only bind mount and a
full disk with a small tmpfs. Both need root; the tests skip with the reason otherwise.
Every mount is undone in a ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import CacheReadOnlyError, GenerationSpec, SyntheticCache
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import build_plan
from dalda_aug.cache.warm import plan_keys, warm

from helpers import cli_env, run_dalda

STEPS, SIZE = 2, 32


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount (a read-only bind mount or a tmpfs; root ignores chmod)")


def _umount(path: Path) -> None:
    gc.collect()  # close SQLite connections of dropped cache objects
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))  # still open in this process: detach it anyway


@contextlib.contextmanager
def _read_only_view(src: Path, dst: Path) -> Iterator[Path]:
    """``dst``: ``src`` mounted read-only (changes made in ``src`` show through)."""
    _need_root()
    dst.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "--bind", str(src), str(dst))
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        done = _run("mount", "-o", "remount,bind,ro", str(dst))
        assert done.returncode == 0, done.stderr
        with pytest.raises(OSError) as info:  # really read-only, even for root
            (dst / "probe").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        yield dst
    finally:
        _umount(dst)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    _need_root()
    path.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        _umount(path)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def warmed(tmp_path_factory, tiny_models):
    """A plan of 12 images (2 classes x 3 images x 2 variants), warmed into ``base/cache``."""
    base = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(3)
    for c, name in enumerate(("cat", "dog")):
        (base / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (20 + i, 24 + c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "data" / name / f"{i}.png")
    plan = build_plan(base / "data", variants=2, seed=4, scores=[0.2, 0.4, 0.6, 0.8, 0.3, 0.5], models=tiny_models)
    plan.save(base / "plan")
    tiny_models.save(base / "models.json")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE))
    generator = spec.make_generator("cpu").load()
    report = warm(plan, SyntheticCache(base / "cache", spec), generator=generator, progress=False)
    assert report.generated == len(plan) == 12
    return base, plan, spec, generator


def _warm_args(base: Path, cache: Path, *extra: str) -> list[str]:
    return ["warm", "--plan", str(base / "plan"), "--cache", str(cache), "--models", str(base / "models.json"),
            "--steps", str(STEPS), "--size", str(SIZE), "--no-progress", *extra]


# -- 5. a read-only cache ------------------------------------------------------------------------
def test_every_read_path_works_on_a_read_only_cache(warmed, tmp_path, capsys):
    from dalda_aug.cli import main

    base, plan, spec, _ = warmed
    src = tmp_path / "cache"
    shutil.copytree(base / "cache", src)
    expected = {e.key: np.asarray(e.image) for e in SyntheticCache(src, spec).iter_entries()}
    before = _files(src)
    with _read_only_view(src, tmp_path / "ro") as ro:
        assert main(["cache", "stats", "--cache", str(ro), "--plan", str(base / "plan")]) == 0
        assert "12/12 images cached (100.0%)" in capsys.readouterr().out
        assert main(["cache", "verify", "--cache", str(ro), "--no-progress"]) == 0
        assert "verified 12 entries: 12 ok, 0 bad" in capsys.readouterr().out
        assert main(["cache", "export", "--cache", str(ro), "--out", str(tmp_path / "out"), "--plan",
                     str(base / "plan"), "--no-progress"]) == 0
        assert len(list((tmp_path / "out").rglob("*.png"))) == 12
        capsys.readouterr()
        # warm with everything cached: nothing to write, so it works (and says who it is)
        assert main(_warm_args(base, ro)) == 0
        out = capsys.readouterr().out
        assert "process rank 0 of world size 1" in out and "12 already cached, 0 generated" in out

        # The library reads the same pixels through the read-only mount, with or without a spec.
        cache = SyntheticCache(ro)
        assert cache.keys() == set(expected) and len(cache) == 12
        for variant in plan:
            assert np.array_equal(np.asarray(cache.get(variant).image), expected[cache.key(variant)])
        assert cache.stats(plan)["plan"]["cached"] == 12

        # Writing says, in one line, that the folder is read-only.
        with pytest.raises(CacheReadOnlyError, match=f"the cache folder {ro} is read-only"):
            SyntheticCache(ro, spec, shard="new").put(plan[0], Image.new("RGB", (8, 8)))
        other = run_dalda(*_warm_args(base, ro), "--steps", "3")  # other settings: 12 images to write
        assert other.returncode == 2
        _one_error_line(other.stderr, str(ro), "read-only")

        # A damaged entry (changed in the source folder, visible through the mount) is found;
        # removing it is a write, refused in one line.
        # (In another process: SQLite shares one file descriptor per file within a process, and
        # this one has the file open read-only through the mount.)
        key = sorted(expected)[0]
        flip = ("import sys, diskcache; c = diskcache.Cache(sys.argv[1]); b = bytearray(c[sys.argv[2]]); "
                "b[-1] ^= 0xFF; c[sys.argv[2]] = bytes(b); c.close()")
        shard = next(src.glob("shard-*"))
        subprocess.run([sys.executable, "-c", flip, str(shard), key], check=True, timeout=60)
        before = _files(src)
        assert main(["cache", "stats", "--cache", str(ro)]) == 0
        assert "11 images" in capsys.readouterr().out
        assert main(["cache", "verify", "--cache", str(ro), "--no-progress"]) == 1
        assert "11 ok, 1 bad" in capsys.readouterr().out
        assert main(["cache", "verify", "--cache", str(ro), "--remove", "--no-progress"]) == 2
        _one_error_line(capsys.readouterr().err, str(ro), "read-only")
        del cache
    assert _files(src) == before  # reading wrote nothing


def _pixels(image):
    return np.asarray(image).copy()


def test_dataset_reads_a_read_only_cache_in_dataloader_workers(warmed, tmp_path):
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from dalda_aug.dataset import SyntheticAugmentedDataset

    base, plan, spec, _ = warmed
    src = tmp_path / "cache"
    shutil.copytree(base / "cache", src)
    cached = {e.image.tobytes() for e in SyntheticCache(src, spec).iter_entries()}
    with _read_only_view(src, tmp_path / "ro") as ro:
        ds = SyntheticAugmentedDataset(ImageFolder(str(base / "data")), plan, SyntheticCache(ro), p=1.0,
                                       transform=_pixels, on_miss="error")
        served = []
        for epoch in range(2):
            for images, labels in DataLoader(ds, batch_size=4, num_workers=2):
                served += [bytes(img.numpy().tobytes()) for img in images]
        assert len(served) == 12
        assert set(served) <= cached  # every item was a cached synthetic image
        assert isinstance(images, torch.Tensor)
        del ds


# -- 6. a full disk during warm -------------------------------------------------------------------
def test_full_disk_stops_warm_in_one_line_and_a_rerun_completes(warmed, tmp_path, capsys):
    from dalda_aug.cli import main

    base, plan, spec, _ = warmed
    # 400 KiB: room for the empty shard (its WAL grows to ~150 KiB while diskcache sets it up)
    # and a few 64x64 entries, not for the 12.
    with _tmpfs(tmp_path / "small", "400k") as small:
        cache_dir = small / "cache"
        full = run_dalda(*_warm_args(base, cache_dir, "--batch-size", "2", "--size", "64"))
        assert full.returncode == 2, full.stdout + full.stderr
        line = _one_error_line(full.stderr, str(cache_dir), "is full", "free")
        assert "what was written is kept" in line
        # While the disk is full, the reading commands work and what was written is valid.
        assert main(["cache", "stats", "--cache", str(cache_dir)]) == 0
        capsys.readouterr()
        assert main(["cache", "verify", "--cache", str(cache_dir), "--no-progress"]) == 0
        out = capsys.readouterr().out
        written = int(out.split("verified ")[1].split(" ")[0])
        assert f"{written} ok, 0 bad" in out and 0 < written < 12

        assert _run("mount", "-o", "remount,size=64m", str(small)).returncode == 0
        done = run_dalda(*_warm_args(base, cache_dir, "--batch-size", "2", "--size", "64"))
        assert done.returncode == 0, done.stderr
        assert f"{written} already cached, {12 - written} generated" in done.stdout
        big = GenerationSpec(spec.models, IPAdapterConfig(num_inference_steps=STEPS, height=64, width=64))
        cache = SyntheticCache(cache_dir, big)
        assert cache.keys() == set(plan_keys(plan, cache))
        report = cache.verify()
        assert report["ok"] == 12 and report["bad"] == []
        cache.close()
        del cache


# -- 14. rank and world size ----------------------------------------------------------------------
def test_warm_names_rank_and_world_size_and_the_one_process_cpu_launch(warmed, tmp_path, capsys, monkeypatch):
    from dalda_aug.cli import main

    base, _, _, _ = warmed
    cache = tmp_path / "cache"
    shutil.copytree(base / "cache", cache)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets
    monkeypatch.delenv("RANK", raising=False)
    assert main(_warm_args(base, cache)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "process rank 0 of world size 1" in first and "starts one process" in first


def test_a_generator_pool_writing_to_a_read_only_cache_fails_in_one_line(warmed, tmp_path):
    import dataclasses

    from dalda_aug.dataset.pool import GeneratorPool, PoolError

    base, plan, spec, _ = warmed
    src = tmp_path / "cache"
    shutil.copytree(base / "cache", src)
    other = dataclasses.replace(spec, config=dataclasses.replace(spec.config, num_inference_steps=3))  # not cached
    with _read_only_view(src, tmp_path / "ro") as ro:
        source = Image.open(base / "data" / plan[0].source).convert("RGB")
        with GeneratorPool(SyntheticCache(ro, other), devices=["cpu"], torch_threads=1) as pool:
            pool.submit(plan[0], source)
            with pytest.raises(PoolError, match=f"the cache folder {ro} is read-only") as info:
                pool.wait(plan[0], timeout=300)
            assert "Traceback" not in str(info.value) and len(str(info.value).splitlines()) == 1


_LIVE_WRITER = """
import sys
from PIL import Image
from dalda_aug.cache import SyntheticCache, encode_entry
cache = SyntheticCache(sys.argv[1], shard="live")
for i, line in enumerate(sys.stdin):
    key = f"{i + 1:064x}"
    cache.put_encoded(key, encode_entry(Image.new("RGB", (4, 3), (i, 2 * i, 3 * i)), {"key": key}))
    print(key, flush=True)
"""


def test_a_read_only_view_of_a_cache_being_written_sees_new_entries(tmp_path):
    """Through a read-only mount, a cache another process is writing (its WAL live) is read
    with its latest entries: SQLite's read-only mode, not a frozen snapshot."""
    src = tmp_path / "cache"
    src.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, str(src)], env=cli_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        writer.stdin.write("go\n")
        writer.stdin.flush()
        first = writer.stdout.readline().strip()
        assert list(src.glob("shard-live/cache.db-wal")), "the writer's WAL should be live"
        with _read_only_view(src, tmp_path / "ro") as ro:
            reader = SyntheticCache(ro)
            assert reader.keys() == {first}
            assert reader.get(first).image.getpixel((0, 0)) == (0, 0, 0)
            writer.stdin.write("go\n")
            writer.stdin.flush()
            second = writer.stdout.readline().strip()
            assert reader.get(second).image.getpixel((0, 0)) == (1, 2, 3)  # the same reader sees it
            assert reader.keys() == {first, second}
            del reader
    finally:
        writer.stdin.close()
        writer.wait(60)
