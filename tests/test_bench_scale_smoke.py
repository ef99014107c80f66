"""benchmarks/bench_scale.py runs at a tiny size and reports every measure (issue 23 point 7).

Runs the script as a process (its DataLoader workers are spawned, and spawn re-imports the main
module), skipping only the once-per-run disk measure, which encodes eight 512x512 photos per format.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def test_bench_scale_reports_sane_figures(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(SCRIPT), "--sources", "40", "--variants", "3", "--classes", "4",
                    "--epochs", "1", "--mem-batches", "2", "--noop-entries", "8", "--skip", "disk",
                    "--json", str(out)], check=True, timeout=240, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["machine"]["cpus"] >= 1 and report["machine"]["loadavg"]
    (size,) = report["sizes"]
    assert size["sources"] == 40 and size["variants_per_source"] == 3
    plan = size["plan"]
    assert plan["variants"] == 120 and plan["ratio"] > 0 and plan["plan_images_per_s"] > 0
    construction = size["construction"]
    assert construction["variants"] == 120 and construction["ratio"] > 0
    assert construction["unchanged_s"] > 0 and construction["imagefolder_s"] > 0
    assert construction["coverage_recounted_s"] > 0
    assert size["pickle"]["dataset_bytes"] > size["pickle"]["imagefolder_bytes"] > 0
    assert math.isfinite(size["pickle"]["bytes_per_variant"])
    memory = size["memory"]
    assert memory["imagefolder_worker_bytes"] > 0 and memory["dataset_worker_bytes"] > 0
    assert math.isfinite(memory["bytes_per_variant"])
    assert size["epoch"]["ratio"] > 0 and size["epoch"]["items"] == 40
    noop = size["noop"]
    assert noop["cache_entries"] == 8 and noop["cache_bytes"] > 0
    assert 0 <= noop["stats_read_fraction"] and math.isfinite(noop["stats_read_fraction"])


def test_bench_scale_refuses_an_unknown_measure(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--skip", "plan,nonsense"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "nonsense" in done.stderr
