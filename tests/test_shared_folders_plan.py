"""Shared folders, round 3 (issue 27), the plan side: plan columns checked at load (5) and bound to
``plan.jsonl``'s SHA-256 (6), stat records comparing inode and ctime (7), the spill folder of an
unsaved plan (11), images whose resize for CLIP would be too large (12), file names that are not
UTF-8 (13), CLI arguments checked before any work (14), and records read as regular files (15).

Everything is planted for real in a temporary folder: column files rewritten with their digest
stamped again, symlinks to /dev/zero and /proc/self/mem, FIFOs, a process killed with SIGKILL, a
file-size limit or a tiny tmpfs, an address-space cap. Anything that could hang runs under a deadline.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from helpers import cli_env, noise, run_dalda

HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


class Hung(BaseException):
    """Raised by :func:`deadline`; not an OSError (TimeoutError is one, and a reader that ignores an
    unreadable record would swallow it)."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise :class:`Hung` in this (main) thread after ``seconds``: a blocking open() of a FIFO or an
    endless read of /dev/zero is interrupted, and the test fails instead of hanging."""
    def expired(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _age(folder: Path) -> None:
    """Date every file under ``folder`` an hour back (settled: stat records are written for it)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))


def _folder(root: Path, suffix: str = ".png", names=("0", "1")) -> Path:
    for c, cls in enumerate(["ant", "bee"]):
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            noise(10 * c + i).save(root / cls / f"{name}{suffix}")
    return root


@pytest.fixture()
def plan_folder(tmp_path, tiny_models):
    """A saved plan of 2 classes x 2 images x 2 variants (AGS, given scores), files aged, its stat
    record written by a first load."""
    from dalda_aug.plan import AugmentationPlan, build_plan

    root = _folder(tmp_path / "data")
    plan = build_plan(root, variants=2, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    folder = plan.save(tmp_path / "plan")
    _age(folder)
    assert AugmentationPlan.load(folder).columns.directory == folder  # read from its columns
    return folder


def _restamp(folder: Path, name: str, data: bytes) -> Path:
    """Write ``columns/<name>.npy`` and stamp its SHA-256 into plan.json, as someone who can write
    the folder would: the digests then agree, and only the content check is left."""
    path = folder / "columns" / f"{name}.npy"
    path.unlink()
    path.write_bytes(data)
    config = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
    config["column_digests"][f"columns/{name}.npy"] = hashlib.sha256(data).hexdigest()
    (folder / "plan.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# -- 5: plan columns are checked, not only shaped -------------------------------------------------------
def _edits(folder: Path) -> dict[str, tuple[str, bytes]]:
    col = {name: np.load(folder / "columns" / f"{name}.npy") for name in
           ("order", "group_start", "label", "source_is_int", "prompt.blob", "lambda")}
    order_far, order_negative = col["order"].copy(), col["order"].copy()
    order_far[0], order_negative[0] = 10**6, -1
    return {
        "order out of bounds": ("order", _npy(order_far)),
        "negative order": ("order", _npy(order_negative)),
        "group_start descending": ("group_start", _npy(col["group_start"][::-1].copy())),
        "float label": ("label", _npy(col["label"].astype(np.float64) + 0.5)),
        "bytes label": ("label", _npy(np.array([b"x"] * col["label"].size))),
        "non-UTF-8 blob": ("prompt.blob", _npy(np.concatenate([[0xFF], col["prompt.blob"][1:]]).astype(np.uint8))),
        "source_is_int lies": ("source_is_int", _npy(np.ones_like(col["source_is_int"]))),
        "lambda above 1 under AGS": ("lambda", _npy(col["lambda"] + 1.0)),
    }


@pytest.mark.parametrize("edit", ["order out of bounds", "negative order", "group_start descending", "float label",
                                  "bytes label", "non-UTF-8 blob", "source_is_int lies", "lambda above 1 under AGS"])
def test_a_column_with_bad_content_is_one_line_naming_it(plan_folder, edit):
    from dalda_aug.errors import InputError
    from dalda_aug.plan import AugmentationPlan

    name, data = _edits(plan_folder)[edit]
    path = _restamp(plan_folder, name, data)
    with pytest.raises(InputError) as info:
        AugmentationPlan.load(plan_folder)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_score_and_lambda_swapped_are_refused(plan_folder):
    """Each source has one CLIPScore over its variants, λ varies: swapped files (digests swapped in
    plan.json too) give a score that varies within a source."""
    from dalda_aug.errors import InputError
    from dalda_aug.plan import AugmentationPlan

    score, lam = (np.load(plan_folder / "columns" / f"{n}.npy") for n in ("score", "lambda"))
    assert len(set(lam.tolist())) > len(set(score.tolist()))  # the plan's λ differ within sources
    _restamp(plan_folder, "score", _npy(lam))
    path = _restamp(plan_folder, "lambda", _npy(score))
    with pytest.raises(InputError, match="different scores.*swapped") as info:
        AugmentationPlan.load(plan_folder)
    assert str(path.with_name("score.npy")) in str(info.value)


@pytest.mark.parametrize("kind", ["/dev/zero", "/proc/self/mem", "fifo", "directory"])
def test_a_column_that_is_not_a_regular_file_is_refused_before_it_is_hashed(plan_folder, kind):
    from dalda_aug.errors import UnsafeFileError
    from dalda_aug.plan import AugmentationPlan

    path = plan_folder / "columns" / "seed.npy"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(kind)
    with deadline(20), pytest.raises(UnsafeFileError) as info:
        AugmentationPlan.load(plan_folder)
    assert str(path) in str(info.value)


# -- 6: the columns are bound to plan.jsonl's SHA-256 -----------------------------------------------------
def test_a_same_size_edit_with_the_digest_stamped_again_reads_the_new_rows(plan_folder):
    from dalda_aug.plan import AugmentationPlan

    rows = (plan_folder / "plan.jsonl").read_text(encoding="utf-8")
    edited = rows.replace("a photo of a ant", "a photo of a cat")
    assert edited != rows and len(edited.encode()) == len(rows.encode())
    (plan_folder / "plan.jsonl").write_text(edited, encoding="utf-8")
    config = json.loads((plan_folder / "plan.json").read_text(encoding="utf-8"))
    config["digests"]["plan.jsonl"] = hashlib.sha256(edited.encode()).hexdigest()
    (plan_folder / "plan.json").write_text(json.dumps(config), encoding="utf-8")
    plan = AugmentationPlan.load(plan_folder)
    assert plan[0].prompt == "a photo of a cat"  # not the columns' stale "a photo of a ant"
    assert [json.loads(line)["prompt"] for line in edited.splitlines()] == [v.prompt for v in plan]


# -- 7: stat records compare inode and ctime ------------------------------------------------------------
def _replace_keep_size_and_mtime(path: Path, data: bytes) -> None:
    """Replace ``path`` by another file of the same size (a rename: a new inode, a new ctime) and
    give it the old mtime back."""
    before = os.stat(path)
    assert len(data) == before.st_size
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(fresh, path)
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_same_size_column_replaced_with_its_mtime_restored_is_hashed(plan_folder):
    from dalda_aug.errors import InputError
    from dalda_aug.plan import AugmentationPlan

    seeds = plan_folder / "columns" / "seed.npy"
    data = bytearray(seeds.read_bytes())
    data[-1] ^= 1
    _replace_keep_size_and_mtime(seeds, bytes(data))
    with pytest.raises(InputError, match="columns/seed.npy differs from what plan.json records"):
        AugmentationPlan.load(plan_folder)


def test_a_same_size_source_replaced_with_its_mtime_restored_is_noticed(tmp_path, tiny_models):
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.dataset import SyntheticAugmentedDataset
    from dalda_aug.errors import InputError
    from dalda_aug.generators.ip_adapter import IPAdapterConfig
    from dalda_aug.plan import build_plan

    root = _folder(tmp_path / "data", suffix=".bmp")  # a BMP's size is set by its pixel count: same size
    _age(root)
    plan = build_plan(root, variants=1, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)

    def build():
        return SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=0.5, on_miss="error", verify_sources="stat")

    build()  # verified in full, recorded
    victim = root / "bee" / "1.bmp"
    import io

    other = io.BytesIO()
    noise(99).save(other, format="BMP")
    _replace_keep_size_and_mtime(victim, other.getvalue())
    with pytest.raises(InputError, match=f"{victim}.*changed since the plan was made"):
        build()


# -- 11: the spill folder of an unsaved plan ---------------------------------------------------------------
_SPILL_SCRIPT = textwrap.dedent("""
    import os, pickle, resource, signal, sys
    import dalda_aug.plan.columns as plan_columns
    from dalda_aug.dataset.draws import DrawCounter
    from dalda_aug.plan import AugmentationPlan, Variant

    plan_columns.SPILL_ROWS = 10  # pickling spills from 10 rows on (100,000 by default)
    rows = [Variant(f"c/{i}.png", 0, "c", 0.5, 0, "a photo of a c", 0.5, i, "%064x" % i) for i in range(4000)]
    plan = AugmentationPlan(rows, {"format": "dalda_aug.plan/1"})
    if sys.argv[1] == "limit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        pickle.dumps(plan)
    except Exception as exc:
        print(type(exc).__name__, exc, flush=True)
        sys.exit(3)
    print(plan.columns.directory, DrawCounter(3).lock_path, flush=True)
    if sys.argv[1] == "sleep":
        import time
        time.sleep(120)
""")


def _spill(tmpdir: Path, mode: str, **kwargs) -> subprocess.Popen:
    env = dict(cli_env(), TMPDIR=str(tmpdir))
    return subprocess.Popen([sys.executable, "-c", _SPILL_SCRIPT, mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@contextlib.contextmanager
def _small_tmpdir(tmp_path: Path, kind: str):
    """A TMPDIR that cannot hold the columns: a 64 KiB tmpfs (root only), or any folder under a
    file-size limit set in the child."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    if kind == "limit":
        yield folder
        return
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                             timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], timeout=30)


@pytest.mark.parametrize("kind", ["tmpfs", "limit"])
def test_a_full_tmpdir_is_one_line_naming_it_and_plan_save(tmp_path, kind):
    with _small_tmpdir(tmp_path, kind) as tmpdir:
        proc = _spill(tmpdir, "limit" if kind == "limit" else "plain")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, (out, err[-2000:])
        assert out.startswith("TemporaryFolderError "), out
        assert str(tmpdir) in out and "TMPDIR" in out and "plan.save(DIR)" in out and out.count("\n") == 1
        assert not list(tmpdir.glob("dalda-aug-plan-*")), list(tmpdir.iterdir())  # nothing half-written left


def test_a_deep_copy_owns_its_rows_after_the_original_is_gone(monkeypatch, tmp_path):
    import dalda_aug.plan.columns as plan_columns
    from dalda_aug.plan import AugmentationPlan, Variant

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(plan_columns, "SPILL_ROWS", 10)
    rows = [Variant(f"c/{i}.png", 0, "c", 0.5, 0, "a photo of a c", 0.5, i, "%064x" % i) for i in range(50)]
    plan = AugmentationPlan(rows, {"format": "dalda_aug.plan/1"})
    pickle.dumps(plan)
    spilled = plan.columns.directory
    assert spilled is not None and spilled.is_dir()
    deep, shallow = copy.deepcopy(plan), copy.copy(plan.columns)
    del plan
    gc.collect()
    assert not spilled.exists()  # the original removed its folder
    assert [v.to_row() for v in deep] == [v.to_row() for v in rows]
    again = pickle.loads(pickle.dumps(deep))  # the copy spills a folder of its own
    assert deep.columns.directory not in (None, spilled) and deep.columns.directory.is_dir()
    assert [v.to_row() for v in again] == [v.to_row() for v in rows]
    assert pickle.loads(pickle.dumps(shallow)).fields(7) == tuple(rows[7].to_row()[k] for k in
                                                                    ("source", "label", "class_name", "score",
                                                                     "variant", "prompt", "lambda", "seed",
                                                                     "source_sha256")) + (None,)


def test_what_a_killed_process_left_is_swept_and_a_live_ones_is_not(tmp_path, monkeypatch):
    import dalda_aug.plan.columns as plan_columns
    from dalda_aug.dataset.draws import DrawCounter
    from dalda_aug.plan import AugmentationPlan, Variant

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    killed, alive = _spill(tmpdir, "sleep"), _spill(tmpdir, "sleep")
    try:
        left = {}
        for name, proc in (("killed", killed), ("alive", alive)):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:] if proc.poll() is not None else "no output"
            folder, lock = line.split()
            left[name] = (Path(folder), Path(lock))
            assert Path(folder).parent == tmpdir and Path(lock).parent == tmpdir
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert all(path.exists() for path in left["killed"])  # a killed process cleans nothing up

        monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
        DrawCounter(2)  # a new counter sweeps the lock files of processes that are gone
        assert not left["killed"][1].exists() and left["killed"][0].is_dir()
        monkeypatch.setattr(plan_columns, "SPILL_ROWS", 10)
        rows = [Variant(f"c/{i}.png", 0, "c", 0.5, 0, "p", 0.5, i, "%064x" % i) for i in range(20)]
        plan = AugmentationPlan(rows, {"format": "dalda_aug.plan/1"})
        pickle.dumps(plan)  # a new spill sweeps the folders of processes that are gone
        assert not left["killed"][0].exists()
        assert all(path.exists() for path in left["alive"])  # the live process keeps its own
        assert plan.columns.directory.is_dir()
    finally:
        for proc in (killed, alive):
            proc.kill()
            proc.wait(timeout=30)


# -- 12: an image whose resize for CLIP would exhaust memory ---------------------------------------------
def _wide_png(path: Path, width: int, height: int = 2) -> Path:
    """A valid 1-bit grey PNG of width x height black pixels: a few KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (width + 7) // 8)
    idat = zlib.compress(row * height, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_the_issues_png_is_refused_for_a_224_pixel_resize(tmp_path):
    from dalda_aug.data import check_scaled_size, load_image
    from dalda_aug.errors import ImageError

    path = _wide_png(tmp_path / "wide.png", 100_000)
    assert path.stat().st_size < 1000 and load_image(path).size == (100_000, 2)  # far below Pillow's limit
    with pytest.raises(ImageError, match="wide.png.*11200000x224|wide.png.*2508800000 pixels"):
        check_scaled_size((100_000, 2), 224, str(path))  # 11,200,000 x 224 = 2,508,800,000 pixels
    check_scaled_size((4000, 3000), 224, "a photo")  # an ordinary photo passes
    check_scaled_size((2, 100_000), 2, "tiny edge")  # 2 x 100,000 pixels: fine


def _run_capped(args: list[str], cap_bytes: int, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    return subprocess.run([sys.executable, "-m", "dalda_aug", *args], env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


AS_CAP = 6 << 30  # the command's own imports and tiny models fit; a 3 GB resize does not


def _one_line(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_plan_refuses_an_image_whose_clip_resize_is_too_large(tmp_path, tiny_models):
    root = _folder(tmp_path / "data")
    # tiny CLIP resizes the shorter side to 32 pixels: 2,000,000 x 2 becomes 32,000,000 x 32 (3 GB)
    wide = _wide_png(root / "bee" / "2.png", 2_000_000)
    models = str(tiny_models.save(tmp_path / "models.json"))
    run = _run_capped(["plan", "--data", str(root), "--out", str(tmp_path / "plan"), "-M", "1", "--models", models],
                      AS_CAP)
    _one_line(run, str(wide), "MAX_IMAGE_PIXELS")


def test_warm_refuses_a_source_whose_feature_extractor_resize_is_too_large(tmp_path, tiny_models):
    from dalda_aug.plan import build_plan

    root = _folder(tmp_path / "data")
    # the tiny image encoder takes 32 pixels (the real ViT-H/14 224): 2,000,000 x 2 becomes 32,000,000 x 32
    wide = _wide_png(root / "bee" / "2.png", 2_000_000)
    plan = build_plan(root, variants=1, scores=[0.2, 0.4, 0.6, 0.8, 0.9], models=tiny_models).save(tmp_path / "plan")
    models = str(tiny_models.save(tmp_path / "models.json"))
    run = _run_capped(["warm", "--plan", str(plan), "--cache", str(tmp_path / "cache"), "--models", models,
                       "--steps", "1", "--size", "32", "--device", "cpu", "--no-progress"], AS_CAP)
    _one_line(run, str(wide), "MAX_IMAGE_PIXELS")


# -- 13: file names that are not UTF-8 ----------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_round_trips_through_plan_columns_and_dataset(tmp_path, tiny_models):
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.dataset import SyntheticAugmentedDataset
    from dalda_aug.generators.ip_adapter import IPAdapterConfig
    from dalda_aug.plan import AugmentationPlan, build_plan

    root = _folder(tmp_path / "data")
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1, as an old archive gives it
    noise(77).save(os.path.join(root, "bee", odd))
    plan = build_plan(root, variants=2, scores=[0.2, 0.4, 0.6, 0.8, 0.9], models=tiny_models)
    assert f"bee/{odd}" in plan.sources()
    folder = plan.save(tmp_path / "plan")
    assert b"caf\\udce9.png" in (folder / "plan.jsonl").read_bytes()  # JSON's escape: the file stays UTF-8
    assert b"caf\xe9.png" in (folder / "columns" / "source.blob.npy").read_bytes()  # the file name's bytes
    _age(folder)
    for _ in range(2):  # from the columns (records them), then as recorded
        loaded = AugmentationPlan.load(folder)
        assert loaded.columns.directory == folder and loaded.sources() == plan.sources()
    shutil.rmtree(folder / "columns")
    assert AugmentationPlan.load(folder).sources() == plan.sources()  # the JSONL reader too
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    base = ImageFolder(root)
    ds = SyntheticAugmentedDataset(base, AugmentationPlan.load(folder), SyntheticCache(tmp_path / "cache", spec),
                                   p=0.0, verify_sources="full")
    index = [i for i, (path, _) in enumerate(base.samples) if path.endswith(odd)][0]
    assert np.array_equal(np.asarray(ds[index][0]), np.asarray(base[index][0]))


def test_a_class_folder_name_that_is_not_utf8_is_one_line_before_scoring(tmp_path, tiny_models):
    root = _folder(tmp_path / "data")
    odd = root / os.fsdecode(b"\xe9t\xe9")
    odd.mkdir()
    noise(5).save(odd / "0.png")
    models = str(tiny_models.save(tmp_path / "models.json"))
    run = run_dalda("plan", "--data", str(root), "--out", str(tmp_path / "plan"), "--models", models, timeout=300)
    line = _one_line(run, "is not UTF-8", "rename the folder")
    assert repr(os.fsencode(odd)) in line
    assert "CLIPScore" not in run.stderr and not (tmp_path / "plan").exists()


# -- 14: CLI arguments checked before any work ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["variants", "out is a file", "device", "seed"])
def test_plan_arguments_are_one_line_before_any_work(tmp_path, case):
    root = _folder(tmp_path / "data")
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    out, extra, needle = str(tmp_path / "plan"), [], ""
    if case == "variants":
        extra, needle = ["-M", "1000000000"], "--variants 1000000000"
    elif case == "out is a file":
        out, needle = str(afile), f"--out {afile} is a file"
    elif case == "device":
        extra, needle = ["--device", "bogus"], "--device 'bogus'"
    else:
        extra, needle = ["--seed", "-1"], "--seed -1"
    # the hub models are named and unreachable: only the argument check can answer this fast
    start = time.monotonic()
    run = run_dalda("plan", "--data", str(root), "--out", out, *extra, timeout=120)
    _one_line(run, needle)
    assert time.monotonic() - start < 60
    assert afile.read_text() == "mine\n" and not (tmp_path / "plan").exists()


def test_metrics_out_naming_a_folder_is_one_line_before_anything_is_read(tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    run = run_dalda("metrics", "--plan", str(tmp_path / "no-plan"), "--cache", str(tmp_path / "no-cache"),
                    "--out", str(folder), "--no-lpips", timeout=120)
    _one_line(run, f"--out {folder} is a folder")


# -- 15: records read as regular files; --forget acts on what it names ------------------------------------------
def test_cache_specs_forget_is_not_blocked_by_a_corrupt_record(tmp_path, tiny_models):
    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.generators.ip_adapter import IPAdapterConfig

    specs = [GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=s, height=32, width=32), "float32")
             for s in (1, 2)]
    for spec in specs:
        SyntheticCache(tmp_path / "cache", spec).record_spec()
    folder = tmp_path / "cache" / "specs"
    kept = sorted(folder.glob(f"{specs[1].fingerprint}-*.json"))
    for path in kept:
        path.write_text("{not json", encoding="utf-8")  # a corrupt record of the spec not named
    run = run_dalda("cache", "specs", "--cache", str(tmp_path / "cache"), "--forget", specs[0].fingerprint, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"forgot spec {specs[0].fingerprint}: removed 1 record(s)" in run.stdout
    assert not list(folder.glob(f"{specs[0].fingerprint}-*.json"))
    assert [p.read_text(encoding="utf-8") for p in kept] == ["{not json"]  # untouched


def test_a_fifo_at_a_stat_or_coverage_record_does_not_hang(tmp_path, tiny_models):
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.dataset import SyntheticAugmentedDataset
    from dalda_aug.generators.ip_adapter import IPAdapterConfig
    from dalda_aug.plan import build_plan
    from dalda_aug.plan.records import CoverageRecord, record_dir

    root = _folder(tmp_path / "data")
    _age(root)
    plan = build_plan(root, variants=1, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)

    def build():
        return SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=0.5, on_miss="error", verify_sources="stat")

    before = set(record_dir().glob("stat-*.npy"))
    build()
    (record,) = set(record_dir().glob("stat-*.npy")) - before
    record.unlink()
    os.mkfifo(record)
    with deadline(60):
        assert len(build()) == 4  # the FIFO is no record: every source verified in full
    coverage = CoverageRecord(tmp_path / "cache", spec.fingerprint, "0" * 64, directory=tmp_path)
    os.mkfifo(coverage.path)
    with deadline(20):
        assert coverage.load([["shard", "cache.db", 1, 1]]) is None
