"""Untrusted inputs of the prompt, plan and textual-inversion commands (issue 18, points 4-9).

Every hostile input is built with public means (a real HTTP server on 127.0.0.1, image files,
JSON files, folders) and every command runs as a real subprocess: the tests check its exit
status, its one error line, and the time and memory it took (measured on the process itself).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    from dalda_aug.testing import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def models_json(tiny_models, tmp_path_factory):
    return str(tiny_models.save(tmp_path_factory.mktemp("models") / "models.json"))


def _noise(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


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
        _noise(i).save(root / name / "0.png")
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
