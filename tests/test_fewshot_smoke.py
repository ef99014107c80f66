"""Smoke test of benchmarks/fewshot.py: the whole few-shot benchmark end to end on the CPU.

Tiny random models, a 2-class dataset cut from real photos (skimage's chelsea and coffee),
1 seed, 1-shot, 2 variants per image, 32 px / 2-step generation, one short epoch of the CLIP
linear probe on the tiny open_clip model.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("torchvision")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot.py"
METHODS = ["real", "base_ags", "base_rs", "fixed", "real_guidance", "dalda"]


def _load_script():
    spec = importlib.util.spec_from_file_location("fewshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write_photos(root: Path, per_class: int, offset: int) -> None:
    """``root/<class>/<i>.png``: small crops of two real photos, different crops per split."""
    from PIL import Image
    from skimage import data

    for name, array in (("cat", data.chelsea()), ("coffee", data.coffee())):
        img = Image.fromarray(array)
        (root / name).mkdir(parents=True)
        w, h = img.size
        for i in range(per_class):
            k = offset + i
            box = (k * w // 12, k * h // 16, w // 2 + k * w // 12, h // 2 + k * h // 16)
            img.crop(box).resize((48, 40)).save(root / name / f"{i}.png")


@pytest.fixture()
def tiny_dataset(tmp_path):
    _write_photos(tmp_path / "toy" / "train", per_class=3, offset=0)
    _write_photos(tmp_path / "toy" / "test", per_class=3, offset=3)
    return tmp_path / "toy"


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
    assert _run(bench, argv) == 0
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
    assert _run(bench, argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in runs]


def _run(bench, argv):
    """Run the benchmark; put back the torch thread count its --threads option changes."""
    import torch

    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_one_folder_split_evaluates_on_the_held_out_half(tiny_models, tiny_dataset, tmp_path):
    models = tiny_models.save(tmp_path / "models.json")
    out = tmp_path / "out"
    argv = ["--data", str(tiny_dataset / "train"), "--test-fraction", "0.5", "--models", str(models),
            "--methods", "real,fixed", "--shots", "1", "--seeds", "3", "--variants", "2", "--steps", "2",
            "--size", "32", "--device", "cpu", "--backbone", "clip", "--epochs", "1",
            "--iterations-per-epoch", "1", "--batch-size", "2", "--out", str(out), "--no-progress", "--threads", "1"]
    bench = _load_script()
    assert _run(bench, argv) == 0
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
