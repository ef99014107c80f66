"""The CPU path and the first hour (issue 29): the tiny models' defaults travel with the plan,
``warm`` says what it generates with, misses generated in-process are said, ``--help`` and typos
are honest, Ctrl-C and a moved data folder say what to do. The CLI runs as a user runs it:
``python -m dalda_aug`` in a subprocess (tests/helpers.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from helpers import cli_env, noise_folder, run_dalda

pytest.importorskip("diffusers")

CLASSES = ["cat", "coffee_cup"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``tiny/`` (make-tiny-models), ``data/`` (2 classes x 2 noise images), ``plan/`` made with
    ``--models tiny``, and ``cache/`` warmed by ``warm --plan plan --cache cache`` (no ``--models``)."""
    from dalda_aug.cli import main

    work = tmp_path_factory.mktemp("cpu-path")
    noise_folder(work / "data", CLASSES, per_class=2, size=(40, 32))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["make-tiny-models", "tiny"]) == 0
        assert main(["plan", "--data", "data", "--out", "plan", "--variants", "2", "--models", "tiny"]) == 0
    finally:
        os.chdir(cwd)
    warm = run_dalda("warm", "--plan", "plan", "--cache", "cache", "--no-progress", cwd=work, timeout=300)
    assert warm.returncode == 0, warm.stderr
    return work, warm


# -- point 2: warm without --models takes the plan's models and their recorded defaults -------------
def test_warm_without_models_takes_the_plans_defaults_and_says_where_each_setting_came_from(world):
    from dalda_aug.cache import SyntheticCache
    from dalda_aug.plan import AugmentationPlan

    work, warm = world
    first = warm.stdout.splitlines()[0]
    where = f"defaults of {Path('plan') / 'plan.json'}, the plan's models"
    assert first.startswith(f"dalda-aug warm: size 64 ({where}), steps 2 ({where}), dtype float32 (default on the "
                            "CPU), device cpu ("), first
    assert "process rank 0 of world size 1" in first
    plan = AugmentationPlan.load(work / "plan")
    assert plan.config["model_defaults"]["warm"] == {"size": 64, "steps": 2, "threads": 1}  # make-tiny-models' record
    assert f", 1 CPU thread(s) ({where});" in first, first
    spec = SyntheticCache(work / "cache").resolve_spec(plan)  # the spec warm recorded for the plan
    assert (spec.config.height, spec.config.num_inference_steps, spec.dtype) == (64, 2, "float32")
    assert f"{len(plan)} generated" in warm.stdout


def test_warm_says_an_option_given_wins(world, tmp_path):
    work, _ = world
    proc = run_dalda("warm", "--plan", str(work / "plan"), "--cache", str(work / "cache"), "--size", "64",
                     "--dtype", "float32", "--device", "cpu", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("dalda-aug warm: size 64 (--size), steps 2 (defaults of ") and \
        "dtype float32 (--dtype), device cpu (--device)" in first, first
    assert "0 generated" in proc.stdout  # the same settings as the first warm: every image is there


# -- point 3: one warning when on_miss="generate" starts generating in this process -----------------
def test_on_miss_generate_warns_once_naming_the_process_the_count_and_warm(world, tmp_path):
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.dataset import SyntheticAugmentedDataset
    from dalda_aug.generators.ip_adapter import IPAdapterConfig
    from dalda_aug.plan import AugmentationPlan

    work, _ = world
    plan = AugmentationPlan.load(work / "plan")
    spec = GenerationSpec(plan.models, IPAdapterConfig(num_inference_steps=1, height=32, width=32), "float32")
    cache = SyntheticCache(tmp_path / "empty", spec)  # another spec than warm's: nothing of the plan in it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = SyntheticAugmentedDataset(ImageFolder(work / "data"), plan, cache, p=1.0, seed=0)
        ds[0], ds[1], ds[2]
    said = [str(w.message) for w in caught if "on_miss='generate'" in str(w.message)]
    assert len(said) == 1, said  # once, not per item
    assert f"the main process (pid {os.getpid()})" in said[0]
    assert f"{len(plan)} of the {len(plan)} planned variants are missing" in said[0]
    assert "dalda-aug warm" in said[0]
    assert len(cache.keys()) == 3  # the three items were generated here, and cached


# -- point 4: --help -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command, required", [(("plan",), ("--data DATA", "--out OUT")),
                                               (("warm",), ("--plan PLAN", "--cache CACHE")),
                                               (("cache", "stats"), ("--cache CACHE",))])
def test_help_shows_required_options_outside_brackets(command, required):
    proc = run_dalda(*command, "--help", timeout=60)
    assert proc.returncode == 0
    usage = proc.stdout.split("\n\n")[0]
    for option in required:
        assert option in usage and f"[{option}" not in usage, usage


@pytest.mark.parametrize("command", [("cache", "stats"), ("cache", "export"), ("metrics",), ("inspect",)])
def test_reading_commands_say_their_generation_options_default_to_warms_record(command):
    proc = run_dalda(*command, "--help", timeout=60)
    text = " ".join(proc.stdout.split())
    for option in ("--steps STEPS", "--size SIZE", "--dtype DTYPE"):
        help_text = text.split(option, 2)[-1][:160]  # the option's own line, after the usage
        assert "default: the spec `warm` recorded in the cache" in help_text, (option, help_text)
    assert "default 30" not in text and "default 512" not in text


# -- point 12: typos -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, hint", [(("paln",), "did you mean `dalda-aug plan`?"),
                                        (("export", "--cache", "c"), "did you mean `dalda-aug cache export`?"),
                                        (("cache", "stat"), "did you mean `dalda-aug cache stats`?")])
def test_a_mistyped_command_suggests_the_command_meant(argv, hint):
    proc = run_dalda(*argv, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert hint in proc.stderr.splitlines()[-1], proc.stderr


def test_an_abbreviated_option_is_not_taken_for_the_whole_one(world, tmp_path):
    work, _ = world
    proc = run_dalda("cache", "stats", "--cach", str(work / "cache"), timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --cach" in proc.stderr
    assert "did you mean --cache?" in proc.stderr


# -- point 11: Ctrl-C in warm ------------------------------------------------------------------------
def test_ctrl_c_in_warm_says_how_many_images_are_kept_and_how_to_continue(world, tmp_path):
    from dalda_aug.cache import SyntheticCache
    from dalda_aug.plan import AugmentationPlan

    work, _ = world
    cache = tmp_path / "cache"
    # 400 steps an image: the signal lands while the 8 images are being made, even on a loaded machine
    argv = [sys.executable, "-m", "dalda_aug", "warm", "--plan", str(work / "plan"), "--cache", str(cache),
            "--batch-size", "1", "--steps", "400", "--no-progress"]
    # SIGINT at its default in the child, so Python turns it into KeyboardInterrupt: a test run started
    # in the background of a non-interactive shell (`cmd &`) inherits SIGINT ignored, and so would warm
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (cache / "specs").is_dir() or not any((cache / "specs").iterdir()):  # the first image is stored
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    said = re.search(r"interrupted: (\d+) images kept \((\d+) written by this run, (\d+) still missing\); rerun "
                     r"the same command to continue", err)
    assert said is not None and "Traceback" not in err, err
    plan = AugmentationPlan.load(work / "plan")
    held = SyntheticCache(cache).with_spec(SyntheticCache(cache).resolve_spec(plan)).stats(plan)["plan"]["cached"]
    assert int(said.group(1)) == held >= 1 and int(said.group(3)) == len(plan) - held


# -- point 10: a moved data folder ---------------------------------------------------------------------
def test_a_moved_data_folder_is_named_and_taken_with_data_root(world, tmp_path):
    from dalda_aug.cli import main

    work, _ = world
    data = shutil.copytree(work / "data", tmp_path / "data")
    assert main(["plan", "--data", str(data), "--out", str(tmp_path / "plan"), "--variants", "1",
                 "--models", str(work / "tiny")]) == 0
    moved = data.rename(tmp_path / "moved")
    proc = run_dalda("warm", "--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"), timeout=300)
    assert proc.returncode == 2 and "--data-root" in proc.stderr and str(data) in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.sqlite*"))

    proc = run_dalda("warm", "--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"),
                     "--data-root", str(moved), "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 generated" in proc.stdout


def test_data_root_checks_the_images_by_their_hashes(world, tmp_path):
    from dalda_aug.errors import InputError, MissingFileError
    from dalda_aug.plan import AugmentationPlan
    from dalda_aug.cache.warm import rebase_plan

    from helpers import noise

    work, _ = world
    other = shutil.copytree(work / "data", tmp_path / "other")
    noise(99, size=(40, 32)).save(other / "cat" / "1.png")  # same name, other pixels
    plan = AugmentationPlan.load(work / "plan")
    with pytest.raises(InputError, match=r"--data-root .*cat/1\.png is not the image"):
        rebase_plan(plan, other)
    (other / "cat" / "1.png").unlink()
    with pytest.raises(MissingFileError, match=r"source 'cat/1\.png' is not there"):
        rebase_plan(plan, other)
    same = shutil.copytree(work / "data", tmp_path / "same")
    assert rebase_plan(plan, same).data_root == str(same.resolve())


# -- point 6: class names in both forms, checked before writing ---------------------------------------
def test_inspect_takes_the_folder_form_of_a_class_name_and_checks_before_writing(world, tmp_path):
    pytest.importorskip("matplotlib")
    work, _ = world
    proc = run_dalda("inspect", "--plan", str(work / "plan"), "--cache", str(work / "cache"),
                     "--classes", "tea", "--out", str(tmp_path / "bad"), timeout=120)
    assert proc.returncode == 2 and "--classes: unknown class name(s) ['tea']" in proc.stderr, proc.stderr
    assert not (tmp_path / "bad").exists()  # nothing written
    for form in ("coffee_cup", "coffee cup"):
        out = tmp_path / form.replace(" ", "-")
        proc = run_dalda("inspect", "--plan", str(work / "plan"), "--cache", str(work / "cache"),
                         "--classes", form, "--out", str(out), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert (out / "contact_sheet.png").is_file()


# -- point 9: the hub check of plan runs before the heavy imports and names the model as written --------
def test_plan_without_the_hub_fails_at_once_naming_the_clip_model_as_written(tmp_path):
    noise_folder(tmp_path / "data", CLASSES, per_class=1)
    env = dict(cli_env(), HF_HOME=str(tmp_path / "hf-home"))
    code = ("import runpy, sys; sys.argv = ['dalda-aug', 'plan', '--data', 'data', '--out', 'p']\n"
            "try:\n    runpy.run_module('dalda_aug', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, 'open_clip' in sys.modules, e.code)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["False", "False", "2"], (proc.stdout, proc.stderr)  # no torch, no open_clip
    line = proc.stderr.strip()
    assert "\n" not in line and "open_clip ViT-B-16/openai, hub repository timm/vit_base_patch16_clip_224.openai" \
        in line, line
    assert "HF_HUB_OFFLINE is set" in line and "HF_HUB_OFFLINE=1" not in line  # not suggested: it is set
    assert "--models models.json" in line


def test_the_known_open_clip_hub_location_is_open_clips():
    open_clip = pytest.importorskip("open_clip")
    from dalda_aug.hub import KNOWN_OPEN_CLIP_HUB

    for (model, pretrained), hub in KNOWN_OPEN_CLIP_HUB.items():
        assert open_clip.get_pretrained_cfg(model, pretrained)["hf_hub"] == hub


# -- point 5: metrics offline names the ways out, and random LPIPS figures say so ----------------------
def test_metrics_without_alexnet_weights_names_no_lpips_and_lpips_random(world, tmp_path):
    pytest.importorskip("lpips")
    work, _ = world
    env = dict(cli_env(), TORCH_HOME=str(tmp_path / "torch-home"))  # no AlexNet weights there
    argv = [sys.executable, "-m", "dalda_aug", "metrics", "--plan", str(work / "plan"), "--cache", str(work / "cache")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--no-lpips" in proc.stderr and "--lpips-random" in proc.stderr and "alexnet-owt" in proc.stderr

    out = tmp_path / "metrics.json"
    proc = subprocess.run([*argv, "--lpips-random", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LPIPS (random network: uncalibrated) within source" in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    assert report["lpips_backbone"] == "random" and report["overall"]["lpips_within_source"] is not None


# -- point 7: examples/train_loop.py takes --models, and says one line offline ------------------------
def test_train_loop_example_takes_the_plans_models_and_says_one_line_offline(world, tmp_path):
    from dalda_aug.config import ModelConfig

    work, _ = world
    script = Path(__file__).resolve().parents[1] / "examples" / "train_loop.py"
    hub = ModelConfig().save(tmp_path / "hub-models.json")  # the paper's hub ids: not cached here
    argv = [sys.executable, str(script), "--plan", str(work / "plan"), "--cache", str(work / "cache"),
            "--test", str(work / "data"), "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2",
            "--p", "1.0", "--on-miss", "error"]
    env = dict(cli_env(), HF_HOME=str(tmp_path / "hf-home"))
    proc = subprocess.run([*argv, "--models", str(hub)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("train_loop.py: error: ") and "ViT-B-16/openai" in line, line
    assert "--models models.json" in line

    # without --models: the plan's (tiny) models, CLIP included; every synthetic image from warm's cache
    proc = subprocess.run([*argv, "--out", str(tmp_path / "r.json")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["test"]["n"] == 4


# -- point 13: small ones ------------------------------------------------------------------------------
def test_prompts_refuses_an_empty_class_folder_as_plan_does(tmp_path):
    noise_folder(tmp_path / "data", ["cat"], per_class=1)
    (tmp_path / "data" / "dog").mkdir()
    for argv in (("prompts", "--data", "data", "--out", "bank.json", "--llm", "template", "-M", "1"),
                 ("plan", "--data", "data", "--out", "p")):
        proc = run_dalda(*argv, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and "class folder data/dog holds no image file" in proc.stderr, proc.stderr
    assert not (tmp_path / "bank.json").exists()


def test_a_template_bank_is_labelled_template_prompts_in_the_table(world, tmp_path):
    from dalda_aug.fewshot import render_table, summarize
    from dalda_aug.fewshot.methods import method_label
    from dalda_aug.prompts import PromptBank

    work, _ = world
    proc = run_dalda("prompts", "--data", str(work / "data"), "--out", str(tmp_path / "bank.json"), "--llm",
                     "template", "-M", "1", "--models", str(work / "tiny"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 prompts for 2 classes" in proc.stdout
    bank = PromptBank.load(tmp_path / "bank.json")  # written by the template backend: no LLM answered
    assert method_label("dalda", bank) == "DALDA (template prompts + AGS)"
    assert method_label("llm_rs", bank) == "template prompts + RS"
    assert method_label("base_rs", bank) == "Base prompt + RS"  # not an LLM-prompt method
    llm = PromptBank(bank.prompts, {"backend": "openai", "model": "m"})
    assert method_label("dalda", llm) == "DALDA (LLM prompts + AGS)"
    row = {"dataset": "toy", "backbone": "clip", "mode": "linear", "method": "dalda", "shots": 1, "seed": 0,
           "label": method_label("dalda", bank), "top1": 0.5, "mean_per_class": 0.5, "n_test": 2}
    table = render_table(summarize([row]), "toy", "clip", "linear", [1])
    assert "| DALDA (template prompts + AGS) |" in table and "LLM prompts" not in table


def test_one_class_is_said_in_the_singular_and_shots_name_the_flag(world, tmp_path):
    work, _ = world
    noise_folder(tmp_path / "one", ["cat"], per_class=2)
    proc = run_dalda("plan", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "p"), "--variants", "1",
                     "--models", str(work / "tiny"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "planned 2 images for 2 source images in 1 class (" in proc.stdout, proc.stdout
    proc = run_dalda("plan", "--data", str(work / "data"), "--out", str(tmp_path / "q"), "--shots", "100",
                     "--models", str(work / "tiny"), timeout=120)
    assert proc.returncode == 2 and "fewer than the 100 shots asked for (--shots 100)" in proc.stderr, proc.stderr
    assert "n_shot" not in proc.stderr


def test_the_readme_synopsis_of_cache_verify_is_accepted():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    synopsis = [line for line in readme.splitlines() if line.startswith("dalda-aug cache ")]
    verify = [line for line in synopsis if "verify" in line.split()[2]]
    assert verify, synopsis
    help_text = run_dalda("cache", "verify", "--help", timeout=60).stdout
    for option in re.findall(r"--[a-z][a-z-]*", " ".join(verify)):
        assert option in help_text, (option, verify)


# -- point 14: `make demo` reuses a torch already installed -------------------------------------------
# A recording stand-in for the environment's interpreter: it logs each call and answers the
# Makefile's "is torch there?" question with $HAS_TORCH; as PYTHON, `-m venv ... DIR` writes DIR/bin/python
# (itself). Downloading torch (gigabytes) cannot run in a test; what is checked is what make asks for.
_STUB = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  for last in "$@"; do :; done
  mkdir -p "$last/bin" && cp "$0" "$last/bin/python"
  exit 0
fi
case "$*" in *"import torch, torchvision"*) exit "$HAS_TORCH";; esac
exit 0
"""


def _make_demo(tmp_path: Path, has_torch: bool, *make_args: str) -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    stub = tmp_path / "stub-python"
    stub.write_text(_STUB)
    stub.chmod(0o755)
    log = tmp_path / f"calls-{has_torch}.log"
    env = dict(os.environ, STUB_LOG=str(log), HAS_TORCH="0" if has_torch else "1")
    env.pop("MAKEFLAGS", None)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([make, "-C", str(root), "demo", f"PYTHON={stub}", f"DEMO_OUT={tmp_path / 'demo'}",
                           *make_args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines()


def test_make_demo_with_an_existing_environment_keeps_its_torch(tmp_path):
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text(_STUB)  # an environment that exists, with torch (HAS_TORCH=0)
    (env / "bin" / "python").chmod(0o755)
    calls = _make_demo(tmp_path, True, f"VENV={env}")
    assert not any("venv" in c for c in calls), calls  # the environment is used, not created
    assert not any("install torch" in c for c in calls), calls  # torch is there: not downloaded
    assert any(c.startswith("-m pip install -e .[test]") for c in calls), calls
    assert calls[-1].startswith("-m dalda_aug.cli.demo --out"), calls
    assert (env / ".dalda-aug-installed").is_file()


def test_make_demo_installs_torch_only_where_there_is_none_and_passes_venv_args(tmp_path):
    env = tmp_path / "fresh"
    calls = _make_demo(tmp_path, False, f"VENV={env}", "VENV_ARGS=--system-site-packages")
    assert calls[0] == f"-m venv --system-site-packages {env}", calls
    assert "-m pip install torch==2.14.1 torchvision==0.29.1" in calls, calls


# -- point 8: textual inversion with the tiny models takes seconds, on one thread ------------------------
def test_tiny_textual_inversion_takes_its_cpu_defaults_one_thread_included(world, tmp_path):
    work, _ = world
    started = time.monotonic()
    proc = run_dalda("textual-inversion", "--data", "data", "--shots", "1", "--out", str(tmp_path / "tokens"),
                     "--models", "tiny", "--steps", "4", "--seed", "7", "--no-progress", cwd=work, timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    # --steps given wins; the tiny models' resolution and single thread come from tiny/models.json
    assert "learned 2 class tokens (4 steps each; --resolution 64 --threads 1 from tiny)" in proc.stdout, proc.stdout
    assert seconds < 90, f"2 classes x 4 tiny steps took {seconds:.0f} s"
