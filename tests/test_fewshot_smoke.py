"""Smoke test of benchmarks/fewshot.py: the whole few-shot benchmark end to end on the CPU.

Tiny random models, a 2-class dataset cut from real photos (skimage's chelsea and coffee),
1 seed, 1-shot, 2 variants per image, 32 px / 2-step generation, one short epoch of the CLIP
linear probe on the tiny open_clip model.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from helpers import load_script, run_benchmark, write_toy

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("torchvision")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot.py"
METHODS = ["real", "base_ags", "base_rs", "fixed", "real_guidance", "dalda"]


def _load_script():
    return load_script(SCRIPT, "fewshot")


@pytest.fixture()
def tiny_dataset(tmp_path):
    return write_toy(tmp_path)


def test_fewshot_end_to_end(tiny_models, tiny_dataset, tmp_path, capsys):
    from dalda_aug.prompts import PromptBank

    models = tiny_models.save(tmp_path / "models.json")
    prompts = PromptBank({"cat": ["a cat sleeping on a sofa", "a cat in the garden"],
                          "coffee": ["a cup of coffee on a wooden table", "a coffee cup at a cafe"]},
                         {"backend": "test"}).save(tmp_path / "prompts.json")
    out = tmp_path / "out"
    argv = ["--train", str(tiny_dataset / "train"), "--test", str(tiny_dataset / "test"),
            "--models", str(models), "--prompts", str(prompts), "--methods", ",".join(METHODS),
            "--shots", "1", "--seeds", "0", "--variants", "2", "--steps", "2", "--size", "32",
            "--device", "cpu", "--dtype", "float32", "--gen-batch-size", "4",
            "--backbone", "clip", "--epochs", "1", "--iterations-per-epoch", "2", "--batch-size", "4",
            "--out", str(out), "--no-progress", "--threads", "1"]
    bench = _load_script()
    assert run_benchmark(bench, argv) == 0
    assert "results:" in capsys.readouterr().out

    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    assert sorted(r["method"] for r in runs) == sorted(METHODS)  # one row per method
    for r in runs:
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["mean_per_class"] <= 1.0
        assert r["n_test"] == 6  # the whole real test split: 3 images x 2 classes
        assert r["shots"] == 1 and r["seed"] == 0 and r["backbone"] == "clip" and r["n_train_real"] == 2
        assert r["n_synthetic"] == (0 if r["method"] == "real" else 2 * 2)
    assert [s["method"] for s in result["summary"]] == [m for m in bench.METHODS if m in METHODS]

    with (out / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_seed = [r for r in rows if r["seed"] != "mean"]
    assert sorted(r["method"] for r in per_seed) == sorted(METHODS)
    assert len([r for r in rows if r["seed"] == "mean"]) == len(METHODS)
    assert all(0.0 <= float(r["top1"]) <= 1.0 and r["n_test"] == "6" for r in rows)

    table = (out / "table.md").read_text()
    assert "| Method | 1-shot top-1 | 1-shot mean/class |" in table
    assert "DALDA (LLM prompts + AGS)" in table and "Real Guidance" in table
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == [m for m in bench.METHODS if m in METHODS]
    assert config["train"]["epochs"] == 1 and config["generation"]["ip_adapter"]["height"] == 32
    assert len(list((out / "plans").iterdir())) == len(METHODS) - 1

    # A rerun with the same settings reuses the finished runs and generates nothing.
    assert run_benchmark(bench, argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in runs]


def test_one_folder_split_evaluates_on_the_held_out_half(tiny_models, tiny_dataset, tmp_path):
    models = tiny_models.save(tmp_path / "models.json")
    out = tmp_path / "out"
    argv = ["--data", str(tiny_dataset / "train"), "--test-fraction", "0.5", "--models", str(models),
            "--methods", "real,fixed", "--shots", "1", "--seeds", "3", "--variants", "2", "--steps", "2",
            "--size", "32", "--device", "cpu", "--backbone", "clip", "--epochs", "1",
            "--iterations-per-epoch", "1", "--batch-size", "2", "--out", str(out), "--no-progress", "--threads", "1"]
    bench = _load_script()
    assert run_benchmark(bench, argv) == 0
    result = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["test_images"] == 4 and config["data"]["train_images"] == 2  # round(3 * 0.5) = 2 per class
    assert [(r["method"], r["n_test"], r["n_train_real"]) for r in result["runs"]] == [("real", 4, 2), ("fixed", 4, 2)]
    assert result["dataset"] == "toy"


def test_llm_methods_need_prompts(tiny_dataset, tmp_path, capsys):
    bench = _load_script()
    base = ["--train", str(tiny_dataset / "train"), "--test", str(tiny_dataset / "test"), "--out", str(tmp_path / "o")]
    assert bench.main(base + ["--methods", "real,dalda"]) == 2
    assert "need LLM prompts" in capsys.readouterr().err
    args = bench.build_parser().parse_args(base)
    methods, skipped = bench.resolve_methods(args)
    assert "dalda" in skipped and "llm_rs" in skipped and "dalda" not in methods and "real" in methods


def test_per_class_split_is_seeded_and_disjoint():
    bench = _load_script()
    targets = [0] * 5 + [1] * 4
    train, test = bench.split_per_class(targets, 0.5, seed=0)
    assert sorted(train + test) == list(range(9)) and not set(train) & set(test)
    assert sum(targets[i] == 0 for i in test) == 2 and sum(targets[i] == 1 for i in test) == 2
    assert (train, test) == bench.split_per_class(targets, 0.5, seed=0)


# -- protocols and significance (issue 12, points 8 and 9) -----------------------------------------
def test_reference_few_shot_draw_is_the_references():
    import numpy as np

    bench = _load_script()
    targets = [0] * 7 + [1] * 4 + [2] * 5
    for seed in (0, 1, 2):
        # kkyuhun94/dalda semantic_aug/datasets/pets.py (and caltech101.py, flowers102.py), written out:
        #   rng = np.random.default_rng(seed)
        #   class_to_ids = {key: rng.permutation(len(class_to_images[key])) for key in self.class_names}
        #   class_to_ids = {key: np.array_split(class_to_ids[key], 2)[0] ...}   # split == "train"
        #   class_to_ids = {key: ids[:examples_per_class] ...}
        rng = np.random.default_rng(seed)
        members = {0: list(range(0, 7)), 1: list(range(7, 11)), 2: list(range(11, 16))}
        perms = {c: rng.permutation(len(members[c])) for c in (0, 1, 2)}
        for shots in (1, 2):
            expected = sorted(members[c][i] for c in (0, 1, 2) for i in np.array_split(perms[c], 2)[0][:shots])
            assert bench.reference_few_shot_indices(targets, shots, seed) == expected
    assert set(bench.reference_few_shot_indices(targets, 1, 0)) <= set(bench.reference_few_shot_indices(targets, 2, 0))
    from dalda_aug.errors import InputError

    with pytest.raises(InputError, match="first half"):
        bench.reference_few_shot_indices(targets, 3, 0)  # class 1: 4 images, a half of 2


def _summary_row(method, seeds, values, dataset="pets", shots=1, protocol="honest"):
    return {"dataset": dataset, "backbone": "clip", "mode": "linear", "method": method, "shots": shots,
            "seeds": seeds, "protocol": protocol, "per_seed": {"top1": values, "mean_per_class": values}}


def test_paired_t_test_against_each_baseline_by_hand():
    import math

    bench = _load_script()
    summary = [_summary_row("real", [0, 1, 2], [0.5, 0.6, 0.7]),
               _summary_row("dalda", [0, 1, 2], [0.6, 0.8, 1.0]),
               _summary_row("base_ags", [0, 1, 2], [0.6, 0.8, 1.0])]
    tests = bench.paired_tests(summary, ["mean_per_class"])
    vs_real = next(t for t in tests if t["baseline"] == "real")
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / √3) = 2√3, df 2. The t
    # distribution with 2 degrees of freedom has the closed form p = 1 − t / √(t² + 2) (two-sided).
    t = 0.2 / (0.1 / math.sqrt(3))
    assert vs_real["mean_difference"] == pytest.approx(0.2)
    assert vs_real["p_value"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert vs_real["n_pairs"] == 3 and "paired" in vs_real["test"] and "t-test" in vs_real["test"]
    same = next(t for t in tests if t["baseline"] == "base_ags")
    assert same["mean_difference"] == 0.0 and same["p_value"] is None  # no spread: no test

    # several datasets (or shot settings) in one summary: one test per (dataset, shots), never pooled
    summary += [_summary_row("real", [0, 1, 2], [0.1, 0.2, 0.3], dataset="flowers"),
                _summary_row("dalda", [0, 1, 2], [0.2, 0.3, 0.5], dataset="flowers")]
    per_cell = [t for t in bench.paired_tests(summary, ["top1"]) if t["baseline"] == "real"]
    assert [(t["dataset"], t["n_pairs"]) for t in per_cell] == [("flowers", 3), ("pets", 3)]
    assert per_cell[0]["mean_difference"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert {p["dataset"] for p in per_cell[0]["pairs"]} == {"flowers"}


def test_table_names_protocol_metric_and_shows_paper_numbers_only_for_the_same_metric():
    bench = _load_script()
    honest = [{**_summary_row("dalda", [0], [0.9]), "label": "DALDA", "top1": 0.9, "top1_std": None,
               "mean_per_class": 0.88, "mean_per_class_std": None, "n_test": 10}]
    table = bench.render_table(honest, "pets", "clip", "linear", [1])
    assert "Protocol: **honest**" in table and "top-1 accuracy and mean per-class accuracy" in table
    assert "0.875" not in table and "not the same metric" in table
    reference = [{**honest[0], "protocol": "reference", "best_epoch": 7, "recipe": "reference",
                  "clip_head": "reference", "eval_draws": 6400, "eval_split": "reference",
                  "ags_mode": "clip", "class_names": "folder", "pool": "reference"}]
    table = bench.render_table(reference, "pets", "clip", "linear", [1])
    assert "Protocol: **reference**" in table and "Metric: mean per-class accuracy" in table
    assert "0.875" in table and "| 1-shot mean/class | 1-shot best epoch |" in table and "| 7 |" in table
    assert "top-1" not in table


def test_reference_protocol_end_to_end(tiny_models, tiny_dataset, tmp_path, capsys, monkeypatch):
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llm_server import ChatServer, per_class

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    models = tiny_models.save(tmp_path / "models.json")
    out = tmp_path / "out"
    sentence = lambda name, call: f"A photo of a {name} seen from angle {call} on a sunny day."  # noqa: E731
    with ChatServer([], default=per_class(sentence)) as server:
        argv = ["--train", str(tiny_dataset / "train"), "--test", str(tiny_dataset / "test"),
                "--models", str(models), "--llm", "openai:test-model", "--base-url", server.base_url,
                "--preset", "pets", "--instruction", "reference", "--methods", "real,dalda",
                "--shots", "1", "--seeds", "0,1", "--variants", "2", "--steps", "2", "--size", "32",
                "--device", "cpu", "--dtype", "float32", "--backbone", "clip", "--clip-head", "reference",
                "--epochs", "3", "--iterations-per-epoch", "1", "--batch-size", "2", "--protocol", "reference",
                "--eval-draws", "64",
                "--out", str(out), "--no-progress", "--threads", "1"]
        bench = _load_script()
        assert run_benchmark(bench, argv) == 0
    assert "We have created a 37 category pet dataset" in server.requests[0].user_message
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"] == "reference" and result["metrics"] == ["mean per-class accuracy"]
    for r in result["runs"]:
        assert r["protocol"] == "reference" and isinstance(r["best_epoch"], int) and 0 <= r["best_epoch"] < 3
        assert len(r["epoch_mean_per_class"]) == 3
        assert r["mean_per_class"] == max(r["epoch_mean_per_class"])
        assert r["mean_per_class"] == r["epoch_mean_per_class"][r["best_epoch"]]
    # few-shot images: the reference's draw (n_train_real 2 = 1 per class)
    assert all(r["n_train_real"] == 2 for r in result["runs"])
    for s in result["summary"]:
        runs = [r for r in result["runs"] if r["method"] == s["method"]]
        curve = np.mean([r["epoch_mean_per_class"] for r in runs], axis=0)
        assert s["best_epoch"] == int(np.argmax(curve))
        assert s["mean_per_class"] == pytest.approx(float(curve.max()))
    sig = result["significance"]
    assert [(t["baseline"], t["metric"], t["n_pairs"]) for t in sig] == [("real", "mean_per_class", 2)]
    table = (out / "table.md").read_text()
    assert "Protocol: **reference**" in table and "mean per-class accuracy" in table and "paired" in table
    # --preset pets names the dataset; --eval-draws 64 is not the reference's 6,400, so the paper's
    # number is not shown as the same metric and the differing component is named
    assert "0.875" not in table and "evaluation draws (--eval-draws): 64" in table
    config = json.loads((out / "config.json").read_text())
    assert config["classifier"]["clip_head"] == "reference" and config["eval"]["protocol"] == "reference"
    assert json.loads((out / "prompts.json").read_text())["provenance"]["instruction"] == "reference"


def test_combine_pairs_over_datasets(tmp_path, capsys):
    import math

    from scipy import stats

    bench = _load_script()
    for dataset, real, dalda in (("pets", [0.5, 0.6, 0.7], [0.6, 0.8, 1.0]),
                                 ("flowers", [0.2, 0.3, 0.4], [0.3, 0.5, 0.8])):
        folder = tmp_path / dataset
        folder.mkdir()
        summary = [_summary_row("real", [0, 1, 2], real, dataset=dataset),
                   _summary_row("dalda", [0, 1, 2], dalda, dataset=dataset)]
        (folder / "results.json").write_text(json.dumps({"protocol": "honest", "summary": summary}))
    assert bench.main(["--combine", str(tmp_path / "pets"), str(tmp_path / "flowers"), "--out", str(tmp_path / "all")]) == 0
    result = json.loads((tmp_path / "all" / "significance.json").read_text())
    assert result["datasets"] == ["flowers", "pets"] and "paired" in result["test"]
    top1 = next(t for t in result["significance"] if t["metric"] == "top1")
    # pairs are the (dataset, shots) cells, each the mean over seeds: flowers 0.5333 - 0.3,
    # pets 0.8 - 0.6; t = mean / (sd / √2), df 1
    d = [(0.3 + 0.5 + 0.8) / 3 - 0.3, 0.8 - 0.6]
    mean = sum(d) / 2
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 1)
    t = mean / (sd / math.sqrt(2))
    assert top1["n_pairs"] == 2 and top1["mean_difference"] == pytest.approx(mean)
    assert top1["p_value"] == pytest.approx(2 * stats.t.sf(t, 1), rel=1e-6)
    assert "paired over (dataset, shots) cells" in (tmp_path / "all" / "significance.md").read_text()
    (tmp_path / "flowers" / "results.json").write_text(json.dumps({"protocol": "reference", "summary": []}))
    assert bench.main(["--combine", str(tmp_path / "pets"), str(tmp_path / "flowers"), "--out", str(tmp_path / "x")]) == 2
    assert "mix protocols" in capsys.readouterr().err


# -- the CPU smoke command of benchmarks/README.md (issue 29, point 1) ----------------------------------
def _readme_smoke_commands() -> list[list[str]]:
    """The commands of the bash block under "A smoke run on a CPU, offline" in benchmarks/README.md,
    as a shell would split them (line continuations joined, comments dropped)."""
    import re
    import shlex

    text = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("### A smoke run on a CPU, offline", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "benchmarks/README.md: no bash block under the CPU smoke heading"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def test_the_readme_cpu_smoke_command_runs_with_the_tiny_models_defaults(tmp_path, monkeypatch, capsys):
    import time

    from dalda_aug.cli import main as dalda_aug

    commands = _readme_smoke_commands()
    assert [c[:2] for c in commands] == [["export", "HF_HUB_OFFLINE=1"], ["dalda-aug", "make-tiny-models"],
                                         ["python", "examples/prepare_datasets.py"], ["python", "benchmarks/fewshot.py"]]
    root = SCRIPT.parents[1]
    monkeypatch.chdir(tmp_path)  # the relative paths of the block, as a reader runs it from a folder of their own
    started = time.perf_counter()
    for command in commands:
        if command[0] == "export":
            monkeypatch.setenv(*command[1].split("=", 1))
        elif command[0] == "dalda-aug":
            assert dalda_aug(command[1:]) == 0, command
        elif command[1] == "examples/prepare_datasets.py":
            assert load_script(root / command[1], "prepare_datasets").main(command[2:]) == 0
        else:
            assert run_benchmark(_load_script(), command[2:]) == 0
    seconds = time.perf_counter() - started
    assert seconds < 180, f"the documented CPU smoke run took {seconds:.0f} s (the README says under 3 minutes)"
    err = capsys.readouterr().err
    assert ("--size 64 --steps 2 --img2img-steps 2 --ti-steps 10 --backbone efficientnet_lite0 --threads 1 (recorded "
            "defaults" in err), err[-2000:]

    out = tmp_path / "runs" / "smoke"
    config = json.loads((out / "config.json").read_text())
    assert config["generation"]["ip_adapter"]["height"] == 64
    assert config["generation"]["ip_adapter"]["num_inference_steps"] == 2
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    # every default method that needs no LLM prompts ran, on the offline backbone, on the whole test split
    assert sorted(r["method"] for r in runs) == sorted(["real", "real_guidance", "da_fusion", "fixed", "base_rs",
                                                         "base_ags"])
    assert {r["backbone"] for r in runs} == {"efficientnet_lite0"} and {r["n_test"] for r in runs} == {6}
    da_fusion = config["generation"]["da_fusion"]
    assert da_fusion["num_inference_steps"] == 2 and da_fusion["textual_inversion"]["steps"] == 10
    assert da_fusion["textual_inversion"]["resolution"] == 64
