"""The commands that read a cache (cache stats|export, metrics, inspect) need none of warm's
generation options: they use the spec warm recorded in the cache folder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.cli import main
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import build_plan


def test_readers_use_the_recorded_spec(tmp_path, tiny_models, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name in ("red_fox", "tabby_cat"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    plan = build_plan(root, variants=2, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    plan.save(tmp_path / "plan")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=3, height=24, width=24), "float32")
    cache = SyntheticCache(tmp_path / "cache", spec)
    for v in plan:  # stand-in pixels: these commands read images, whatever made them
        cache.put(v, Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
    cache.record_spec(plan)  # what warm does
    # A second spec in the same folder, recorded for another plan, does not confuse them.
    other_plan = build_plan(root, variants=1, seed=9, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models)
    other = dataclasses.replace(spec, dtype="bfloat16")
    SyntheticCache(tmp_path / "cache", other).record_spec(other_plan)

    common = ["--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache")]
    assert main(["cache", "stats", *common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["coverage"] == 1.0
    assert main(["cache", "export", *common, "--out", str(tmp_path / "export"), "--no-progress"]) == 0
    assert len(list((tmp_path / "export").rglob("*.png"))) == len(plan)
    assert main(["metrics", *common, "--no-lpips", "--out", str(tmp_path / "metrics.json")]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["missing_images"] == 0 and report["overall"]["n_images"] == len(plan)
    assert main(["inspect", *common, "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "contact_sheet.png").is_file()
    # Options given explicitly win: other settings, other keys, nothing cached.
    capsys.readouterr()
    assert main(["cache", "stats", *common, "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["cached"] == 0
    # A plan recorded for neither spec: the error lists both.
    (tmp_path / "plan3").mkdir()
    build_plan(root, variants=1, seed=11, scores=[0.2, 0.4, 0.6, 0.8], models=tiny_models).save(tmp_path / "plan3")
    assert main(["cache", "stats", "--plan", str(tmp_path / "plan3"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "2 generation specs" in err and spec.fingerprint in err and other.fingerprint in err
