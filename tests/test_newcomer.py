"""What a newcomer on a CPU without the hub meets first (issue 20, points 2, 4, 6 and 7).

Every command that loads hub models stops within seconds, with one line naming ``--models`` and
``HF_HUB_OFFLINE=1``, when the hub refuses connections or never answers; tiny-model runs print no
library noise; the small things (one-class folders, unknown options, empty folders, model
folders, the fixed λ's range, plans that would be overwritten, moved model folders).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dalda_aug.cache import SyntheticCache
from dalda_aug.cli import main
from dalda_aug.config import ModelConfig
from dalda_aug.plan import AugmentationPlan

# The hub failures used to take 28-54 s (retries); the probe waits 5 s. Generous for a loaded
# 2-core machine (python, torch and the package imported in a fresh process), well under the old times.
HUB_FAILURE_SECONDS = 25.0
NOISE = (
    "No pretrained weights loaded",
    "should be kept in float32",
    "mean_resizing",
    "Loading pipeline components",
    "Loading weights",
    "Writing model shards",
    "WARNING:root",
)


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), colour).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A two-class folder, a one-class folder, tiny models written by the CLI, and a plan."""
    root = tmp_path_factory.mktemp("newcomer")
    _image(root / "data" / "cat" / "a.png", (200, 30, 30))
    _image(root / "data" / "dog" / "b.png", (30, 30, 200))
    _image(root / "one" / "cat" / "a.png", (200, 30, 30))
    (root / "empty").mkdir()
    proc = _cli(root, "make-tiny-models", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr
    assert main(["plan", "--data", str(root / "data"), "--out", str(root / "plan"), "--variants", "1",
                 "--models", str(root / "tiny")]) == 0
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE")}
    env.update(extra)
    return env


def _cli(cwd: Path, *argv: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dalda_aug", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else _env(HF_HUB_OFFLINE="1"))


# -- point 2: one hub check for every command ------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:  # nothing listens there once this socket is closed
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _commands(root: Path) -> dict[str, list[str]]:
    hub_models = ModelConfig().save(root / "hub-models.json")  # the paper's hub ids
    (root / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    return {
        "plan": ["plan", "--data", "data", "--out", "hub-plan", "--variants", "1"],
        "warm": ["warm", "--plan", "plan", "--cache", "hub-cache", "--models", str(hub_models), "--size", "64",
                 "--steps", "2", "--no-progress"],
        "prompts": ["prompts", "--classes", "classes.txt", "--out", "bank.json", "-M", "1", "--llm",
                    "hf:HuggingFaceTB/SmolLM2-135M-Instruct", "--no-progress"],
    }


def _assert_fails_fast(proc: subprocess.CompletedProcess[str], seconds: float, command: str, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line: no retries, no traceback, no ERROR:root
    line = lines[0]
    assert line.startswith(f"dalda-aug {command}: error: "), line
    assert all(w in line for w in words), line
    assert ".." not in line.replace("../", ""), line
    assert seconds < HUB_FAILURE_SECONDS, (command, seconds)


@pytest.mark.parametrize("command", ["plan", "warm", "prompts"])
def test_without_the_hub_a_command_stops_at_once_when_connections_are_refused(world, tmp_path, command):
    port = _closed_port()
    env = _env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf-home"))
    started = time.monotonic()
    proc = _cli(world, *_commands(world)[command], env=env, timeout=300)
    seconds = time.monotonic() - started
    hint = "--llm hf:PATH" if command == "prompts" else "--models models.json"
    _assert_fails_fast(proc, seconds, command, f"http://127.0.0.1:{port} cannot be reached", hint, "HF_HUB_OFFLINE=1")


@pytest.mark.parametrize("command", ["plan", "warm", "prompts"])
def test_without_the_hub_a_command_stops_within_seconds_when_the_hub_never_answers(world, tmp_path, command):
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        env = _env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf-home"))
        started = time.monotonic()
        proc = _cli(world, *_commands(world)[command], env=env, timeout=300)
        seconds = time.monotonic() - started
    _assert_fails_fast(proc, seconds, command, "cannot be reached", "HF_HUB_OFFLINE=1")


def test_offline_mode_names_the_missing_models(world, tmp_path):
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    started = time.monotonic()
    proc = _cli(world, *_commands(world)["plan"], env=env)
    _assert_fails_fast(proc, time.monotonic() - started, "plan", "HF_HUB_OFFLINE is set",
                       "open_clip ViT-B-16/openai", "timm/vit_base_patch16_clip_224.openai", "--models models.json")
    assert "HF_HUB_OFFLINE=1" not in proc.stderr  # set already: not suggested (issue 29, point 9)


# -- points 4 and 6: CPU-sized defaults from models.json, and no library noise ----------------------
def test_tiny_warm_takes_cpu_sized_defaults_from_models_json_and_prints_no_noise(world):
    proc = _cli(world, "warm", "--plan", "plan", "--cache", "cache", "--models", "tiny", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("dalda-aug warm: size 64 (defaults of tiny), steps 2 (defaults of tiny), dtype float32 "
                            "(default on the CPU), device cpu (") and "process rank 0" in first, first
    assert "2 generated" in proc.stdout, proc.stdout
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr
    plan = AugmentationPlan.load(world / "plan")
    spec = SyntheticCache(world / "cache").resolve_spec(plan)
    assert (spec.config.height, spec.config.width, spec.config.num_inference_steps) == (64, 64, 2)
    cache = SyntheticCache(world / "cache").with_spec(spec)
    entry = cache.get(plan[0])
    assert entry is not None and entry.image.size == (64, 64)


def test_explicit_flags_win_over_the_models_json_defaults(world, capsys):
    # `cache stats --models tiny` reads warm's defaults (the same keys); explicit flags make others.
    base = ["cache", "stats", "--cache", str(world / "cache"), "--plan", str(world / "plan"), "--json",
            "--models", str(world / "tiny")]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["cached"] == 2
    assert main([*base, "--size", "48", "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["cached"] == 0


def test_textual_inversion_reads_its_defaults_from_models_json(world):
    from dalda_aug.config import model_defaults

    # The values make-tiny-models records, as the README states them for a CPU.
    assert model_defaults(world / "tiny", "textual-inversion") == {"resolution": 64, "steps": 20, "threads": 1}
    assert model_defaults(world / "tiny" / "models.json", "warm") == {"size": 64, "steps": 2, "threads": 1}


# -- point 7: the small things ------------------------------------------------------------------
def test_a_one_class_folder_warns_in_one_line(world, capsys):
    assert main(["plan", "--data", str(world / "one"), "--out", str(world / "one-plan"), "--variants", "2",
                 "--models", str(world / "tiny")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("dalda-aug plan: warning: ") and "one class" in err[0] and "always 1" in err[0]
    # two classes: no warning
    assert main(["plan", "--data", str(world / "data"), "--out", str(world / "two-plan"), "--variants", "1",
                 "--models", str(world / "tiny")]) == 0
    assert capsys.readouterr().err == ""


def test_an_unknown_option_prints_the_subcommands_usage(world):
    proc = _cli(world, "plan", "--data", "data", "--out", "x", "--shtos", "2")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: dalda-aug plan "), proc.stderr
    assert "dalda-aug plan: error: unrecognized arguments: --shtos 2" in proc.stderr
    proc = _cli(world, "cache", "stats", "--cache", "c", "--bogus")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: dalda-aug cache stats "), proc.stderr


def test_an_empty_folder_names_the_expected_layout(world, capsys):
    assert main(["plan", "--data", str(world / "empty"), "--out", str(world / "e"), "--models", str(world / "tiny")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ROOT/<class>/<image>" in err[0] and str(world / "empty") in err[0], err


def test_models_accepts_a_folder_holding_models_json(world, capsys):
    assert main(["plan", "--data", str(world / "data"), "--out", str(world / "f"), "--variants", "1",
                 "--models", str(world / "tiny")]) == 0
    assert main(["plan", "--data", str(world / "data"), "--out", str(world / "g"), "--models", str(world)]) == 2
    err = capsys.readouterr().err
    assert f"models folder {world} holds no models.json" in err and "make-tiny-models" in err


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_a_fixed_lambda_outside_0_1_is_refused_in_one_line(world, capsys, value):
    assert main(["plan", "--data", str(world / "data"), "--out", str(world / "h"), "--models", str(world / "tiny"),
                 "--scaling", f"fixed:{value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "λ" in err[0] and value in err[0], err
    assert not (world / "h").exists()


def test_plan_refuses_to_overwrite_a_plan_without_overwrite(world, capsys):
    out = world / "twice"
    argv = ["plan", "--data", str(world / "data"), "--out", str(out), "--variants", "1", "--models", str(world / "tiny")]
    assert main(argv) == 0
    before = (out / "plan.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*argv[:-4], "--variants", "2", *argv[-2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0], err
    assert (out / "plan.jsonl").read_bytes() == before
    assert main([*argv[:-4], "--variants", "2", *argv[-2:], "--overwrite"]) == 0
    assert len(AugmentationPlan.load(out)) == 4


def test_tiny_models_keep_working_after_the_folder_is_moved(world, tmp_path, capsys):
    data = json.loads((world / "tiny" / "models.json").read_text())
    locations = [data[k] for k in ("base", "vae", "ip_adapter", "clip_model", "clip_pretrained")]
    assert all(not os.path.isabs(v) and v.startswith("./") for v in locations), locations
    moved = tmp_path / "elsewhere" / "models"
    shutil.copytree(world / "tiny", moved)
    hidden = world.parent / (world.name + "-tiny-away")
    os.rename(world / "tiny", hidden)  # the original is gone while the copy is used
    try:
        config = ModelConfig.load(moved / "models.json")
        assert config.base == str((moved / "sd").resolve()) and Path(config.clip_pretrained).is_file()
        assert main(["plan", "--data", str(world / "data"), "--out", str(tmp_path / "p"), "--variants", "1",
                     "--models", str(moved)]) == 0
    finally:
        os.rename(hidden, world / "tiny")
