"""The README's training snippet works as printed after `dalda-aug plan --shots` and
`dalda-aug warm` with non-default options, and trains on the plan's few-shot subset."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dalda_aug.cli import main
from dalda_aug.plan import build_plan

README = Path(__file__).resolve().parent.parent / "README.md"
PER_CLASS = 4
SHOTS = 2


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Training with synthetic images"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def prepared(tmp_path, tiny_models, monkeypatch):
    """data/train (4 images per class), a 2-shot plan of it in plan/, its variants in cache/."""
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    # What `dalda-aug plan --data data/train --shots 2 --out plan/` writes (scores given: no CLIP).
    plan = build_plan(Path("data/train").resolve(), variants=2, seed=0, n_shot=SHOTS, scores=[0.2, 0.4, 0.6, 0.8],
                      models=tiny_models)
    plan.save("plan")
    # warm with options other than the defaults: the snippet restates none of them.
    assert main(["warm", "--plan", "plan", "--cache", "cache", "--steps", "2", "--size", "32", "--device", "cpu",
                 "--no-progress"]) == 0
    return plan


def test_readme_training_snippet_runs_as_printed(prepared):
    code = _snippet()
    assert 'SyntheticCache("cache/")' in code and "set_epoch" not in code and 'items="plan"' in code
    body = "        ...                               # forward, loss, backward, step"
    assert body in code
    code = code.replace(body, "        seen.append((images, labels))")
    scope = {"seen": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, str(README), "exec"), scope)  # train_transform is the snippet's own
    # A covering cache and items="plan": nothing about the cache or the plan to warn about.
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "cache" in m or "plan" in m], said
    train = scope["train"]
    assert train.cached_variants == train.planned_variants == 8
    # The plan's 2 images per class of the 4 in the folder, not the whole folder.
    planned = {v.source for v in prepared}
    assert len(train) == len(planned) == 2 * SHOTS and len(train.base.dataset) == 2 * PER_CLASS
    images = torch.cat([x for x, _ in scope["seen"]])
    assert images.shape == (3 * len(train), 3, 224, 224)

    # Which versions came out, read back from the tensors under a deterministic transform
    # (the snippet's crops are random): real files of the plan, or their cached variants.
    tf = T.Compose([T.Resize((16, 16)), T.PILToTensor()])
    real = {}
    for path in sorted(Path("data/train").rglob("*.png")):
        real[tf(Image.open(path).convert("RGB")).numpy().tobytes()] = path.relative_to("data/train").as_posix()
    variants = {tf(train.cache.get(v).image).numpy().tobytes(): v.source for v in prepared}
    train.transform = tf
    served = []
    for _ in range(10):
        for x, _ in scope["loader"]:  # workers start afresh each epoch: they get the new transform
            served += [real.get(xi.numpy().tobytes()) or ("synthetic", variants[xi.numpy().tobytes()]) for xi in x]
    sources = [s[1] if isinstance(s, tuple) else s for s in served]
    assert set(sources) == planned
    synthetic = sum(isinstance(s, tuple) for s in served)
    assert abs(synthetic / len(served) - 0.5) < 4 * np.sqrt(0.25 / len(served)), (synthetic, len(served))


def test_readme_snippet_without_items_plan_warns(prepared):
    """Without items="plan" the whole folder is served; the dataset says so."""
    code = _snippet()
    code = code.replace(', items="plan"', "").replace("range(3)", "range(0)")
    with pytest.warns(UserWarning, match=rf"4 of the 8 items .*not in the plan \(the plan was made with "
                                         rf"--shots {SHOTS}; it has 4 of them\).*items='plan'"):
        exec(compile(code, str(README), "exec"), {})
