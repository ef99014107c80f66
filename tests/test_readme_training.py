"""The README's training snippet works as printed after `dalda-aug warm` with non-default options."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from dalda_aug.cli import main
from dalda_aug.plan import build_plan

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Training with synthetic images"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_training_snippet_runs_as_printed(tmp_path, tiny_models, monkeypatch):
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    build_plan(Path("data/train").resolve(), variants=2, seed=0, scores=[0.2, 0.4, 0.6, 0.8],
               models=tiny_models).save("plan")
    # warm with options other than the defaults: the snippet restates none of them.
    assert main(["warm", "--plan", "plan", "--cache", "cache", "--steps", "2", "--size", "32", "--device", "cpu",
                 "--no-progress"]) == 0

    code = _snippet()
    assert 'SyntheticCache("cache/")' in code and "set_epoch" not in code
    code = code.replace("range(50)", "range(3)").replace("        ...", "        seen.append(images)")
    scope = {"train_transform": T.Compose([T.Resize((16, 16)), T.PILToTensor()]), "seen": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, str(README), "exec"), scope)
    # The cache covers the plan: nothing about the cache to warn about.
    assert not [w for w in caught if "cache" in str(w.message)], [str(w.message) for w in caught]
    train = scope["train"]
    assert train.cached_variants == train.planned_variants == 8
    images = torch.cat(scope["seen"])
    real = {T.Compose([T.Resize((16, 16)), T.PILToTensor()])(train.base[i][0]).numpy().tobytes()
            for i in range(len(train))}
    synthetic = sum(x.numpy().tobytes() not in real for x in images)
    assert len(images) == 12 and 0 < synthetic < 12
