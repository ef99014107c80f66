"""Cache warming: completeness, the no-op rerun, sharding, kill -9 resume, accelerate launch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import AugmentationPlan, Variant, build_plan
from dalda_aug.cache.warm import plan_keys, shard_keys, warm

STEPS, SIZE = 2, 32



def _write_folder(root, classes=("ant", "bee"), per_class=3):
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (18 + i, 22 + c, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("warm")
    root = _write_folder(base / "data")
    plan = build_plan(root, variants=4, seed=2, scores=[0.1, 0.3, 0.5, 0.7, 0.9, 0.2], models=tiny_models)
    plan.save(base / "plan")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE))
    return base, plan, spec


@pytest.fixture(scope="module")
def generator(setup):
    return setup[2].make_generator("cpu").load()


def _no_model():
    raise AssertionError("warm() built a generator although everything was cached")


def test_warm_fills_the_cache_then_reruns_without_models(setup, generator, tmp_path):
    _, plan, spec = setup
    cache = SyntheticCache(tmp_path / "cache", spec)
    batches = []
    report = warm(plan, cache, generator=generator, batch_size=3, progress=False, on_batch=batches.append)
    assert report.planned == report.assigned == report.generated == len(plan) == 24
    assert report.already_cached == 0 and batches[-1] == 24 and len(batches) == 8
    assert cache.keys() == set(plan_keys(plan, cache))
    assert cache.verify()["ok"] == 24
    # warm recorded its spec for this plan: a cache opened without one finds the images.
    bare = SyntheticCache(tmp_path / "cache")
    assert bare.resolve_spec(plan) == spec and bare.stats(plan)["plan"]["coverage"] == 1.0
    entry = cache.get(plan[5])
    assert entry.metadata["prompt"] == plan[5].prompt and entry.metadata["lambda"] == plan[5].lam

    started = time.perf_counter()
    again = warm(plan, cache, generator=_no_model, progress=False)
    assert again.generated == 0 and again.already_cached == 24
    assert time.perf_counter() - started < 5

    # Same pixels as a one-by-one generation: batch companions do not matter.
    from dalda_aug.data import load_image
    from dalda_aug.generators.base import GenerationRequest

    v = plan[7]
    alone = generator.generate([GenerationRequest(load_image(plan.data_root + "/" + v.source), v.prompt, v.lam,
                                                  v.seed)], batch_size=1)[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(cache.get(v).image, dtype=int)).max() <= 2


def test_warm_verify_regenerates_corrupt_entries(setup, generator, tmp_path):
    import diskcache

    _, plan, spec = setup
    cache = SyntheticCache(tmp_path / "cache", spec)
    warm(plan, cache, generator=generator, batch_size=8, progress=False)
    key = cache.key(plan[0])
    with diskcache.Cache(str(cache.directory / f"shard-{cache.shard}")) as raw:
        raw[key] = b"broken"
    # A plain warm checks the checksums of what it counts as cached and regenerates bad entries.
    report = warm(plan, cache, generator=generator, progress=False)
    assert report.bad_entries == 1 and report.generated == 1 and report.already_cached == 23
    assert cache.verify()["bad"] == []
    with diskcache.Cache(str(cache.directory / f"shard-{cache.shard}")) as raw:
        raw[key] = b"broken"
    report = warm(plan, cache, generator=generator, verify=True, progress=False)
    assert report.verified_removed == 1 and report.generated == 1
    assert cache.verify()["bad"] == []


def test_warm_waits_for_leased_keys_and_takes_them_over_when_the_lease_expires(setup, generator, tmp_path):
    _, plan, spec = setup
    cache = SyntheticCache(tmp_path / "cache", spec, shard="one")
    keys = list(plan_keys(plan, cache))
    # A process that takes leases on five keys, then is killed (-9) before writing them.
    holder = ("import sys, time; from dalda_aug.cache import SyntheticCache; "
              "c = SyntheticCache(sys.argv[1], shard='one'); print(len(c.claim(sys.argv[2:], 3.0)), flush=True); "
              "time.sleep(600)")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "cache"), *keys[:5]], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "5"
    finally:
        proc.kill()
        proc.wait(60)
    report = warm(plan, cache, generator=generator, batch_size=4, progress=False, lease_seconds=5)
    assert report.generated == 24 and report.generated_elsewhere == 0
    assert cache.keys() == set(keys) and cache.verify()["bad"] == []
    created = {e.key: e.metadata["created"] for e in cache.iter_entries()}
    assert all(created[k] >= started + 3.0 for k in keys[:5])  # taken over only once the leases expired


_TWO_WARMERS = """
import json, sys, time
from pathlib import Path
from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.config import ModelConfig
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import AugmentationPlan
from dalda_aug.cache.warm import warm

base, cache_dir, me, steps, size = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
spec = GenerationSpec(ModelConfig.load(base / "models.json"),
                      IPAdapterConfig(num_inference_steps=steps, height=size, width=size))
generator = spec.make_generator("cpu").load()
(base / f"ready-{me}").touch()
while not all((base / f"ready-{p}").exists() for p in "ab"):  # start together
    time.sleep(0.05)
cache = SyntheticCache(cache_dir, spec, shard="same")  # both processes write the same shard
report = warm(AugmentationPlan.load(base / "plan"), cache, generator=generator, batch_size=2, progress=False,
              on_batch=lambda n: time.sleep(0.3))  # slow enough for the two to overlap
(base / f"report-{me}.json").write_text(json.dumps(report.to_dict()))
"""


def test_two_warm_processes_on_one_shard_share_the_work(setup, models_json, tmp_path):
    base, plan, spec = setup
    shutil.copytree(base / "plan", tmp_path / "plan")
    shutil.copy(models_json, tmp_path / "models.json")
    script = tmp_path / "warmer.py"
    script.write_text(_TWO_WARMERS)
    cache_dir = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(cache_dir), me, str(STEPS), str(SIZE)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for me in "ab"]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]
    reports = [json.loads((tmp_path / f"report-{me}.json").read_text()) for me in "ab"]
    assert sum(r["generated"] for r in reports) == 24  # nothing generated twice...
    assert all(r["generated"] > 0 for r in reports)  # ...and both worked
    for r in reports:
        assert r["generated"] + r["generated_elsewhere"] + r["already_cached"] == 24
    reader = SyntheticCache(cache_dir, spec)
    assert reader.keys() == set(plan_keys(plan, reader)) and reader.verify()["bad"] == []


def test_sharding_is_disjoint_and_complete(setup, generator, tmp_path):
    _, plan, spec = setup
    n = 3
    reports = []
    for rank in range(n):
        cache = SyntheticCache(tmp_path / "cache", spec, shard=f"host-{rank}")
        reports.append(warm(plan, cache, generator=generator, batch_size=4, process_index=rank, num_processes=n,
                            progress=False))
    reader = SyntheticCache(tmp_path / "cache", spec)
    keys = plan_keys(plan, reader)
    shards = [reader.keys(shard=f"host-{rank}") for rank in range(n)]
    for rank, shard in enumerate(shards):
        assert shard == set(shard_keys(keys, rank, n)) == set(sorted(keys)[rank::n])
        assert len(shard) == reports[rank].generated == reports[rank].assigned == len(keys) // n
    assert sum(len(s) for s in shards) == len(set().union(*shards)) == len(keys)
    assert sum(r.generated for r in reports) == len(keys)


def _cmd(*args):
    return [sys.executable, "-m", "dalda_aug", *args]


def _warm_args(base, cache, models_json, *extra):
    return ["warm", "--plan", str(base / "plan"), "--cache", str(cache), "--models", str(models_json),
            "--steps", str(STEPS), "--size", str(SIZE), "--no-progress", *extra]


@pytest.fixture(scope="module")
def models_json(setup, tiny_models):
    path = setup[0] / "models.json"
    tiny_models.save(path)
    return path


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def test_warm_survives_kill_9_and_resumes(setup, models_json, tmp_path, capsys):
    base, plan, spec = setup
    bigger = build_plan(base / "data", variants=12, seed=5, scores=[0.1, 0.3, 0.5, 0.7, 0.9, 0.2],
                        models=spec.models)
    bigger.save(tmp_path / "plan")
    cache_dir = tmp_path / "cache"
    reader = SyntheticCache(cache_dir, spec)
    args = _warm_args(tmp_path, cache_dir, models_json, "--batch-size", "2")
    proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(reader.keys()) < 4:  # kill -9 once a few batches are in the cache
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "warm wrote nothing in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = {e.key: e.metadata["created"] for e in reader.iter_entries()}
    assert 4 <= len(before) < len(bigger), "the kill came after the end; nothing to resume"

    done = subprocess.run(_cmd(*args, "--report", str(tmp_path / "report.json")), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["already_cached"] == len(before)
    assert report["generated"] == len(bigger) - len(before)
    after = {e.key: e.metadata["created"] for e in reader.iter_entries()}
    assert set(after) == set(plan_keys(bigger, reader))  # complete, every entry decodes
    assert all(after[k] == t for k, t in before.items())  # nothing written before the kill was lost or redone
    assert "0 already cached" not in done.stdout

    # Everything present: the rerun does nothing.
    again = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"{len(bigger)} already cached, 0 generated" in again.stdout

    # The reading commands need none of warm's generation options.
    from dalda_aug.cli import main

    assert main(["cache", "stats", "--cache", str(cache_dir), "--plan", str(tmp_path / "plan")]) == 0
    assert f"{len(bigger)}/{len(bigger)} images cached (100.0%)" in capsys.readouterr().out


def test_accelerate_launch_two_processes_split_the_work(setup, models_json, tmp_path):
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed next to this Python")
    base, plan, spec = setup
    cache_dir = tmp_path / "cache"
    # `accelerate launch --cpu` starts one process unless MPI is set up; --multi_gpu starts N
    # processes through torchrun, which warm runs on the CPU (gloo) when given --device cpu.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "dalda_aug",
           *_warm_args(base, cache_dir, models_json, "--batch-size", "3", "--device", "cpu", "--report",
                       str(tmp_path / "report-{rank}.json"))]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(2)]
    assert sorted(r["process_index"] for r in reports) == [0, 1]
    assert all(r["num_processes"] == 2 for r in reports)
    for rank in (0, 1):  # each process says which share it takes, before working
        assert f"process rank {rank} of world size 2" in done.stdout
    reader = SyntheticCache(cache_dir, spec)
    keys = set(plan_keys(plan, reader))
    assert reader.keys() == keys
    assert SyntheticCache(cache_dir).resolve_spec(plan).fingerprint == spec.fingerprint  # both ranks recorded it
    # Each process wrote its own shard, only keys of its share, and no key was generated twice.
    per_shard = {}
    for r in reports:
        per_shard[r["process_index"]] = reader.keys(shard=r["shard"])
        assert len(per_shard[r["process_index"]]) == r["generated"]
    assert all(shard == set(shard_keys(keys, rank, 2)) for rank, shard in per_shard.items())
    assert per_shard[0].isdisjoint(per_shard[1])
    assert sum(r["generated"] for r in reports) == len(keys)
    assert "all 2 processes done" in done.stdout


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_plan_share_is_the_share_of_plan_keys_without_a_variant_per_variant(tmp_path, tiny_models, n):
    from dalda_aug.cache.warm import plan_share

    rows = [Variant(source=f"c{s % 2}/img_{s}.png", label=s % 2, class_name=f"class {s % 2}", score=0.5,
                    variant=k, prompt=f"a photo of class {s % 2}", lam=0.5, seed=k % 2,
                    source_sha256=f"{s % 3:064x}")  # 6 x 2 distinct keys over 60 rows, each shared by several
            for s in range(12) for k in range(5)]
    plan = AugmentationPlan(rows, {"format": "dalda_aug.plan/1", "seed": 0, "variants_per_image": 5})
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)
    keys = plan_keys(plan, cache)  # the old path: one Variant and one key per variant
    assert len(keys) == 12
    shares = [plan_share(plan, cache, rank, n) for rank in range(n)]
    for rank, (mine, planned) in enumerate(shares):
        assert planned == len(keys)
        assert list(mine) == shard_keys(keys, rank, n)  # the same keys in the same (sorted) order
        assert all(mine[k] == keys[k] for k in mine)  # each key's first variant in plan order
        assert all(spec.key(v) == k for k, v in mine.items())
