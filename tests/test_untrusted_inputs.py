"""Untrusted inputs of the prompt, plan and textual-inversion commands (issue 18, points 4-9).

Every hostile input is built with public means (a real HTTP server on 127.0.0.1, image files,
JSON files, folders) and every command runs as a real subprocess: the tests check its exit
status, its one error line, and the time and memory it took (measured on the process itself).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from helpers import assert_workers_name_the_file, bomb_png, noise, noise_folder
from llm_server import ChatServer, huge, per_class, trickle

VIEWS = ["from above", "in profile", "up close", "from far away"]


def good(name: str, call: int) -> str:
    return f"A photo of a {name} seen {VIEWS[call % len(VIEWS)]} on a sunny meadow."


# -- running the CLI ---------------------------------------------------------------------------------
@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_mib: float  # peak resident memory of the command's own process


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for key in ("OPENAI_API_KEY", "RANK", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240.0) -> Run:
    """``python -m dalda_aug ARGS`` in a subprocess; its peak RSS comes from ``wait4`` on it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "dalda_aug", *args], stdout=out, stderr=err,
                                env=env if env is not None else _env())
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                   seconds, usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux


def one_error_line(run: Run, *needles: str) -> str:
    """The command failed with exit status 2 and said why in one line, no traceback."""
    assert run.rc == 2, (run.rc, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from dalda_aug.tiny_models import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def models_json(tiny_models, tmp_path_factory):
    return str(tiny_models.save(tmp_path_factory.mktemp("models") / "models.json"))


def _classes_file(tmp_path: Path) -> str:
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\n", encoding="utf-8")
    return str(path)


def _prompts_args(tmp_path: Path, server: ChatServer, tokenizer_dir, *extra: str) -> list[str]:
    return ["prompts", "--classes", _classes_file(tmp_path), "--out", str(tmp_path / "prompts.json"), "-M", "1",
            "--llm", "openai:test-model", "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir),
            "--no-progress", *extra]


# -- 4: --timeout is a deadline for the whole request ------------------------------------------------------
@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_trickling_server_is_cut_off_at_the_timeout(tmp_path, tokenizer_dir, phase):
    # One byte every 0.5 s: every socket read gets a byte well within any per-read timeout.
    with ChatServer([], default=trickle(0.5, per_class(good), body_only=phase == "body")) as server:
        run = run_cli(*_prompts_args(tmp_path, server, tokenizer_dir, "--timeout", "3", "--max-retries", "0"))
        for _ in range(100):  # the server notices the closed connection at its next write or two
            if server.trickled:
                break
            time.sleep(0.05)
    line = one_error_line(run, server.endpoint, "within 3 s")
    assert "1 attempt(s) failed" in line
    assert len(server.requests) == 1 and len(server.trickled) == 1
    # The client stayed about 3 s (the server sees it gone within its next write or two, 0.5 s apart).
    assert 2.0 <= server.trickled[0] <= 3.0 + 2.5, server.trickled
    # The whole command: the deadline plus the start-up of a Python process importing transformers.
    assert run.seconds < 3.0 + 60.0


# -- 5: answers are read up to a cap ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory, tokenizer_dir):
    """Peak memory of the same command given a normal, small answer."""
    tmp_path = tmp_path_factory.mktemp("baseline")
    with ChatServer([], default=per_class(good)) as server:
        run = run_cli(*_prompts_args(tmp_path, server, tokenizer_dir, "--max-retries", "0"))
    assert run.rc == 0, run.stderr
    return run.max_rss_mib


@pytest.mark.parametrize("code", [200, 500])
def test_a_huge_answer_is_refused_in_bounded_memory(tmp_path, tokenizer_dir, baseline_rss, code):
    megabytes = 200
    with ChatServer([], default=huge(code, megabytes)) as server:
        run = run_cli(*_prompts_args(tmp_path, server, tokenizer_dir, "--max-retries", "0", "--timeout", "60"))
        for _ in range(100):
            if server.streamed:
                break
            time.sleep(0.05)
    if code == 200:
        one_error_line(run, server.endpoint, "more than 4 MiB", "refusing")
    else:
        line = one_error_line(run, server.endpoint, "HTTP 500")
        assert len(line) < 1000, line  # the start of the body, not all of it
    # The client left long before the 200 MiB were sent, and its memory stayed near the baseline's.
    assert server.streamed and server.streamed[0] < megabytes << 20
    assert run.max_rss_mib < baseline_rss + 64, (run.max_rss_mib, baseline_rss)


# -- 7: classes that differ only by case or Unicode normalisation -----------------------------------
def _twin_folders(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        noise(i).save(root / name / "0.png")
    if len({e.name for e in os.scandir(root)}) != len(names):
        pytest.skip("this filesystem folds these names into one folder")
    return root


TWINS = {"case": ["Cat", "cat"], "unicode": [unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")]}


@pytest.mark.parametrize("kind", sorted(TWINS))
def test_twin_classes_get_their_prompts(tmp_path, tokenizer_dir, kind):
    from dalda_aug.cli import main
    from dalda_aug.prompts import PromptBank

    names = TWINS[kind]
    root = _twin_folders(tmp_path / "data", names)
    out = tmp_path / "template.json"
    assert main(["prompts", "--data", str(root), "--out", str(out), "--llm", "template", "--tokenizer",
                 str(tokenizer_dir), "--no-progress"]) == 0
    bank = PromptBank.load(out)
    assert sorted(bank.prompts) == sorted(names)
    assert {name: bank.prompts[name] for name in names} == {name: [f"a photo of a {name}"] for name in names}

    # An LLM naming each class exactly: M sentences per class, the other class named in none.
    out = tmp_path / "llm.json"
    with ChatServer([], default=per_class(good)) as server:
        assert main(["prompts", "--data", str(root), "--out", str(out), "-M", "3", "--llm", "openai:test-model",
                     "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir), "--no-progress"]) == 0
    bank = PromptBank.load(out)
    assert {name: bank.prompts[name] for name in names} == {name: [good(name, k) for k in (1, 2, 3)] for name in names}


def test_a_prompt_naming_the_twin_exactly_is_refused():
    from dalda_aug.prompts import validate_prompt

    assert validate_prompt("a photo of a Cat on a sofa", "Cat", ["Cat", "cat"]) is None
    assert "names another class: 'cat'" in validate_prompt("a photo of a cat on a sofa", "Cat", ["Cat", "cat"])
    nfc, nfd = TWINS["unicode"]
    assert validate_prompt(f"a {nfd} with chairs outside", nfd, [nfc, nfd]) is None
    assert "names another class" in validate_prompt(f"a {nfc} with chairs outside", nfd, [nfc, nfd])


# -- 6: decompression bombs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory):
    """``data/{ant,bee}`` with two small images each, plus bee/2.png claiming 30000x30000 pixels."""
    root = noise_folder(tmp_path_factory.mktemp("bomb") / "data", ["ant", "bee"], per_class=2)
    bomb = bomb_png(root / "bee" / "2.png")
    assert bomb.stat().st_size < 1 << 20
    with Image.open(bomb.with_name("0.png")):
        pass
    with pytest.raises(Image.DecompressionBombError):  # what Pillow itself says, naming no file
        Image.open(bomb)
    return root, bomb


def test_plan_refuses_a_decompression_bomb_in_one_line(bomb_folder, models_json, tmp_path):
    root, bomb = bomb_folder
    run = run_cli("plan", "--data", str(root), "--out", str(tmp_path / "plan"), "--variants", "1",
                  "--models", models_json, "--device", "cpu")
    line = one_error_line(run, str(bomb), "MAX_IMAGE_PIXELS")
    assert "exceeds limit" in line
    assert not (tmp_path / "plan" / "plan.json").exists()
    assert run.max_rss_mib < 2048  # 900 million pixels were never decoded


def test_a_decompression_bomb_in_dataloader_workers_names_the_file(bomb_folder, tiny_models, tmp_path):
    import dataclasses

    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.dataset import SyntheticAugmentedDataset
    from dalda_aug.generators.ip_adapter import IPAdapterConfig
    from dalda_aug.plan import build_plan

    root, bomb = bomb_folder
    good = tmp_path / "good"  # the plan comes from a copy without the bomb
    shutil.copytree(root, good)
    (good / "bee" / "2.png").unlink()
    plan = build_plan(good, variants=1, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    spec = GenerationSpec(tiny_models, dataclasses.replace(IPAdapterConfig(), num_inference_steps=2, height=32,
                                                           width=32), "float32")
    ds = SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(tmp_path / "cache", spec), p=0.0)
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda batch: batch)
    assert_workers_name_the_file(loader, ds, bomb, "MAX_IMAGE_PIXELS", len(ds) - 1)


# -- 8: one line, not a traceback ------------------------------------------------------------------------
DEEP = 200_000


def _deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def two_plans(tmp_path_factory, tiny_models):
    """Two plan folders of two runs: 2 classes x 2 images and 3 classes x 2 images, 2 variants each."""
    from dalda_aug.plan import build_plan

    base = tmp_path_factory.mktemp("plans")
    plans = []
    for run, classes in enumerate([["ant", "bee"], ["ant", "bee", "cow"]]):
        root = base / f"data{run}"
        for c, name in enumerate(classes):
            (root / name).mkdir(parents=True)
            for i in range(2):
                noise(100 * run + 10 * c + i).save(root / name / f"{i}.png")
        n = 2 * len(classes)
        plan = build_plan(root, variants=2, scores=[(k + 1) / (n + 1) for k in range(n)], models=tiny_models)
        plans.append(plan.save(base / f"plan{run}"))
    return plans


def _warm_args(plan: Path, models_json: str, tmp_path: Path) -> list[str]:
    return ["warm", "--plan", str(plan), "--cache", str(tmp_path / "cache"), "--models", models_json,
            "--steps", "2", "--size", "32", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("where", ["row", "plan.json", "summary.json"])
def test_a_deeply_nested_plan_is_one_line(two_plans, models_json, tmp_path, where):
    plan = tmp_path / "plan"
    shutil.copytree(two_plans[0], plan)
    if where == "row":
        rows = (plan / "plan.jsonl").read_text(encoding="utf-8").splitlines()
        rows[1] = '{"source": ' + _deep() + "}"
        (plan / "plan.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        needle = f"{plan / 'plan.jsonl'}:2"
    else:
        (plan / where).write_text('{"format": "dalda_aug.plan/1", "x": ' + _deep() + "}", encoding="utf-8")
        needle = str(plan / where)
    run = run_cli(*_warm_args(plan, models_json, tmp_path))
    one_error_line(run, needle, "deeper than")
    assert not (tmp_path / "cache").exists()


def test_a_deeply_nested_spec_record_is_one_line(two_plans, tmp_path):
    specs = tmp_path / "cache" / "specs"
    specs.mkdir(parents=True)
    (specs / "0123456789abcdef.json").write_text('{"format": ' + _deep() + "}", encoding="utf-8")
    # With a plan and no generation options, the spec is looked up in the cache's records.
    run = run_cli("cache", "stats", "--cache", str(tmp_path / "cache"), "--plan", str(two_plans[0]))
    one_error_line(run, str(specs / "0123456789abcdef.json"), "deeper than")


def test_prompts_with_an_unwritable_cache_home_is_one_line(tmp_path):
    classes = _classes_file(tmp_path)
    # No --tokenizer: the CLIP tokenizer is built into ~/.cache/dalda_aug, and ~ is /proc/1.
    env = _env(HOME="/proc/1", DALDA_AUG_CACHE=None, XDG_CACHE_HOME=None)
    run = run_cli("prompts", "--classes", classes, "--out", str(tmp_path / "p.json"), "--llm", "template",
                  "--no-progress", env=env)
    one_error_line(run, "/proc/1/.cache/dalda_aug", "DALDA_AUG_CACHE")
    assert not (tmp_path / "p.json").exists()


TI_ARGS = ["--steps", "1", "--resolution", "32", "--batch-size", "1", "--device", "cpu", "--no-progress"]


def test_textual_inversion_with_an_unwritable_cache_home_is_one_line(bomb_folder, models_json, tmp_path):
    root = tmp_path / "data"
    (root / "ant").mkdir(parents=True)
    noise(1).save(root / "ant" / "0.png")
    env = _env(HOME="/proc/1", DALDA_AUG_CACHE=None, XDG_CACHE_HOME=None)
    run = run_cli("textual-inversion", "--data", str(root), "--out", str(tmp_path / "tok"), "--models", models_json,
                  *TI_ARGS, env=env)
    one_error_line(run, "/proc/1/.cache/dalda_aug/textual-inversion", "DALDA_AUG_CACHE")


def test_textual_inversion_on_a_250_character_class_name(models_json, tmp_path):
    from dalda_aug.generators.textual_inversion import TokenSet

    long_name = "a" * 125 + "_" + "b" * 124  # one folder name of 250 bytes (most filesystems allow 255)
    root = tmp_path / "data"
    (root / long_name).mkdir(parents=True)
    (root / "ant").mkdir()
    noise(1).save(root / long_name / "0.png")
    noise(2).save(root / "ant" / "0.png")
    run = run_cli("textual-inversion", "--data", str(root), "--out", str(tmp_path / "tok"), "--models", models_json,
                  *TI_ARGS, env=_env(DALDA_AUG_CACHE=str(tmp_path / "ti-cache")))
    assert run.rc == 0, run.stderr[-3000:]
    tokens = TokenSet.load(tmp_path / "tok")
    readable = "a" * 125 + " " + "b" * 124
    assert sorted(tokens.class_names) == sorted(["ant", readable])
    assert tokens.token_of(readable) == f"<{long_name}>"
    assert all(len(p.name.encode()) <= 255 for p in (tmp_path / "tok").iterdir())
    assert tokens.file_of(readable).is_file() and tokens.file_of("ant").name == "ant.safetensors"
    tokens.verify()


# -- 9: a plan folder mixed from two runs -----------------------------------------------------------------
def test_a_plan_folder_mixed_from_two_runs_is_refused(two_plans, models_json, tmp_path):
    from dalda_aug.errors import InputError
    from dalda_aug.plan import AugmentationPlan

    small, big = two_plans
    assert len(AugmentationPlan.load(small)) == 8 and len(AugmentationPlan.load(big)) == 12
    mixed = tmp_path / "mixed"
    shutil.copytree(small, mixed)
    shutil.copy(big / "plan.jsonl", mixed / "plan.jsonl")  # 12 rows, labels up to 2, with 2 classes
    with pytest.raises(InputError, match=f"plan folder {mixed}: plan.jsonl differs") as info:
        AugmentationPlan.load(mixed)
    assert "two runs" in str(info.value)
    run = run_cli(*_warm_args(mixed, models_json, tmp_path))
    one_error_line(run, f"plan folder {mixed}", "plan.jsonl")
    assert not (tmp_path / "cache").exists()

    shutil.copy(small / "plan.jsonl", mixed / "plan.jsonl")
    shutil.copy(big / "summary.json", mixed / "summary.json")
    with pytest.raises(InputError, match=f"plan folder {mixed}: summary.json differs"):
        AugmentationPlan.load(mixed)


def test_a_plan_written_before_digests_still_loads(two_plans, tmp_path):
    from dalda_aug.errors import InputError
    from dalda_aug.plan import AugmentationPlan

    small, big = two_plans
    meta = json.loads((small / "plan.json").read_text(encoding="utf-8"))
    assert set(meta["digests"]) == {"plan.jsonl", "summary.json"}
    old = tmp_path / "old"
    shutil.copytree(small, old)
    del meta["digests"]
    (old / "plan.json").write_text(json.dumps(meta), encoding="utf-8")
    loaded = AugmentationPlan.load(old)
    assert [v.to_row() for v in loaded] == [v.to_row() for v in AugmentationPlan.load(small)]
    assert "digests" not in loaded.config
    # Without digests, rows whose labels the plan's classes cannot hold still give one clear error.
    shutil.copy(big / "plan.jsonl", old / "plan.jsonl")
    with pytest.raises(InputError, match=r"plan.jsonl:\d+: label 2 is outside the 2 classes"):
        AugmentationPlan.load(old)
