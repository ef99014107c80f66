"""Smoke test of benchmarks/bench_generation.py on the tiny models (CPU, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generation.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generation_tiny_prints_ratio_and_writes_json(tiny_models, tmp_path, capsys):
    # Reuses the session's tiny models (DIR/models.json); without --models-dir the script builds them.
    bench = _load_script()
    out = tmp_path / "gen.json"
    argv = ["--arch", "tiny", "--device", "cpu", "--num-images", "2", "--steps", "2", "--size", "64",
            "--batch-sizes", "1,2", "--threads", "1", "--img2img-steps", "4", "--models-dir", str(Path(tiny_models.base).parent), "--json", str(out)]
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # --threads changed it for this process
    captured = capsys.readouterr()
    printed = captured.out
    assert "ratio ours/baseline: x" in printed
    # progress: a line per measurement on stderr (the defaults run for minutes on a CPU)
    progress = captured.err.splitlines()
    assert any("baseline: one pipeline call per image" in line for line in progress), captured.err
    assert sum("ours: batch" in line for line in progress) == 2 and any("da_fusion: ours, batch 2" in line
                                                                      for line in progress), captured.err
    assert "baseline" in printed and "ours, batch   2" in printed

    result = json.loads(out.read_text())
    assert result["arch"] == "tiny" and result["num_images"] == 2 and result["steps"] == 2
    assert [run["batch_size"] for run in result["ours"]] == [1, 2]
    assert result["baseline"]["images_per_s"] > 0 and result["ratio"] > 0
    # Batched output equals the stock pipeline's images within 2/255 (fp32 CPU).
    assert all(run["max_pixel_diff_vs_baseline"] <= 2 for run in result["ours"])
    assert result["tflop_per_image"] is None  # the SD1.5 model does not describe the tiny models
    # The img2img baselines against their stock one-call-per-image loops (DA-Fusion's recipe).
    assert set(result["img2img"]) == {"real_guidance", "da_fusion"}
    for kind, res in result["img2img"].items():
        assert res["baseline"]["images_per_s"] > 0 and res["ratio"] > 0 and res["steps"] == 4
        assert [run["batch_size"] for run in res["ours"]] == [1, 2]
        assert all(run["max_pixel_diff_vs_baseline"] <= 2 for run in res["ours"]), kind
    assert "Real Guidance ratio ours/stock: x" in printed and "DA-Fusion ratio ours/stock: x" in printed


def test_performance_model_matches_design():
    bench = _load_script()
    assert bench.tflop_per_image(512, 30) == pytest.approx(51, abs=0.5)  # benchmarks/README.md, Performance model: ≈ 51 TFLOP
    assert bench.tflop_per_image(256, 30) < bench.tflop_per_image(512, 30) / 3
    assert bench.tflop_per_image(512, 15) < bench.tflop_per_image(512, 30) / 1.8
