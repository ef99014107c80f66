"""The demo runs offline on tiny models and writes a contact sheet of the expected size."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from dalda_aug import demo, viz



def test_demo_main_with_tiny_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DALDA_MODELS", "tiny")
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--variants", "2", "--no-progress"]) == 0
    sheet = out / "contact_sheet.png"
    assert sheet.is_file() and sheet.stat().st_size > 10_000
    with Image.open(sheet) as img:
        assert img.size == viz.contact_sheet_size(rows=len(demo.DEMO_IMAGES), columns=1 + 2, tile=128)
        assert len(img.getcolors(1 << 20) or []) > 1000  # photos and images, not a blank page
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(demo.DEMO_IMAGES)
    assert (out / "prompts.json").is_file() and (out / "plan" / "plan.jsonl").is_file()
    assert "contact_sheet.png" in capsys.readouterr().out
    # A second run reuses the tiny models and the warm cache.
    assert demo.main(["--out", str(out), "--variants", "2", "--no-progress"]) == 0
    assert "10 already cached, 0 generated" in capsys.readouterr().out


def test_contact_sheet_layout():
    rows = [(Image.new("RGB", (60, 40), "red"), "original: a long caption " * 6,
             [(Image.new("RGB", (32, 32), "blue"), "λ=0.50 · a photo of a thing")] * k) for k in (3, 1)]
    sheet = viz.contact_sheet(rows, tile=96, title="test")
    assert sheet.size == viz.contact_sheet_size(2, 4, 96)
    # The missing cells of the short row stay blank.
    x, y = viz.contact_sheet_size(2, 4, 96)[0] - 50, viz.contact_sheet_size(2, 4, 96)[1] - 120
    assert sheet.getpixel((x, y)) == (255, 255, 255)


def test_make_demo_target_is_offline_capable():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-C", str(root), "demo", "DALDA_MODELS=tiny", "VENV=/nonexistent-venv"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "-m dalda_aug.demo" in dry.stdout and "pip install" in dry.stdout


def test_inspect_writes_plots_and_a_selected_contact_sheet(tmp_path, monkeypatch):
    from dalda_aug.cli import main

    monkeypatch.setenv("DALDA_MODELS", "tiny")
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--variants", "2", "--no-progress"]) == 0
    models = out / "tiny-models" / "models.json"
    argv = ["inspect", "--plan", f"demo={out / 'plan'}", "--also", f"again={out / 'plan'}", "--cache",
            str(out / "cache"), "--models", str(models), "--steps", "2", "--size", "64", "--classes", "cat,rocket",
            "--tile", "64", "--out", str(tmp_path / "inspect")]
    assert main(argv) == 0
    for name in ("clipscore_histogram.png", "lambda_distribution_demo.png", "lambda_distribution_again.png",
                 "contact_sheet.png"):
        path = tmp_path / "inspect" / name
        assert path.is_file() and path.stat().st_size > 5_000, name
        with Image.open(path) as img:
            assert len(img.getcolors(1 << 20) or []) > 50, name  # drawn, not blank
    with Image.open(tmp_path / "inspect" / "contact_sheet.png") as img:
        assert img.size == viz.contact_sheet_size(rows=2, columns=3, tile=64)
    bad = argv[:-2] + ["--classes", "unicorn", "--out", str(tmp_path / "x")]
    assert main(bad) == 2


def test_metrics_command_reports_diversity(tmp_path, monkeypatch, capsys):
    import json

    from dalda_aug.cli import main

    monkeypatch.setenv("DALDA_MODELS", "tiny")
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--variants", "3", "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["metrics", "--plan", str(out / "plan"), "--cache", str(out / "cache"), "--models",
            str(out / "tiny-models" / "models.json"), "--steps", "2", "--size", "64", "--lpips-random",
            "--out", str(tmp_path / "metrics.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["overall"]["n_images"] == 15 and report["missing_images"] == 0
    assert set(report["per_class"]) == {"cat", "coffee cup", "rocket", "astronaut", "motorcycle"}
    assert 0 < report["overall"]["lpips_within_source"] and report["overall"]["clip_i_within_source"] <= 1
    assert "CLIP-I within source" in capsys.readouterr().out
    # keys depend on the generation settings: other settings find nothing cached
    assert main(argv[:-2] + ["--steps", "3"]) == 2
