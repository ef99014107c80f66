"""Issue 23.4: CLIPScores in fixed-shape blocks. An image's score is bit-identical (on one machine)
whichever block, position, neighbours, order, subset, reading chunk or process it is scored in,
and a plan made by two processes (a real ``torchrun`` launch) is the one-process plan, byte for byte.

Expected values come from independent computations: the same image scored alone (exact), and a
plain open_clip forward pass of the image (within float32 tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalda_aug.plan.clipscore import SCORE_BLOCK, CLIPScorer
from dalda_aug.data import ImageSource
from dalda_aug.plan import build_plan

CLASSES = ["cat", "coffee", "rocket", "astronaut"]


def _pictures(count: int) -> list[Image.Image]:
    """``count`` distinct RGB images: skimage photos, then seeded noise and gradients of several sizes."""
    from skimage import data

    out = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("chelsea", "coffee", "rocket", "astronaut")]
    rng = np.random.default_rng(0)
    while len(out) < count:
        h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None] * rng.random(3)
        out.append(Image.fromarray(((noise.astype(np.float64) + ramp) / 2).astype(np.uint8)))
    return out[:count]


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return _pictures(2 * SCORE_BLOCK + 5)  # two full blocks and a padded one


def test_an_image_scores_bit_identically_in_any_block_position_order_or_subset(tiny_models, pictures):
    scorer = CLIPScorer.from_models(tiny_models)
    labels = [i % len(CLASSES) for i in range(len(pictures))]
    whole = scorer.score(pictures, labels, CLASSES)
    alone = np.array([scorer.score([p], [y], CLASSES)[0] for p, y in zip(pictures, labels)])
    assert np.array_equal(whole, alone)  # exact: alone, each image sits in a block of padding
    assert np.array_equal(scorer.score(pictures[::-1], labels[::-1], CLASSES)[::-1], whole)
    perm = np.random.default_rng(1).permutation(len(pictures))
    assert np.array_equal(scorer.score([pictures[i] for i in perm], [labels[i] for i in perm], CLASSES), whole[perm])
    for subset in (slice(None, None, 3), slice(5, 12), slice(SCORE_BLOCK - 1, SCORE_BLOCK + 2)):
        assert np.array_equal(scorer.score(pictures[subset], labels[subset], CLASSES), whole[subset]), subset
    # The scorer's batch size does not enter: every pass has SCORE_BLOCK rows.
    other = CLIPScorer.from_models(tiny_models, batch_size=3)
    assert np.array_equal(other.score(pictures, labels, CLASSES), whole)


def test_image_features_are_bit_identical_at_every_position_of_a_block(tiny_models, pictures):
    """The contract under the scores: in a forward pass of the one shape, a row's features depend
    neither on its position nor on the other rows (images or zero padding)."""
    scorer = CLIPScorer.from_models(tiny_models)
    pixels = torch.stack([scorer.preprocess(p) for p in pictures])
    target = pixels[0]
    reference = scorer._forward(torch.cat([target[None], torch.zeros(SCORE_BLOCK - 1, *target.shape)]))[0]
    for position in range(SCORE_BLOCK):
        others = pixels[1 + position : 1 + position + SCORE_BLOCK]  # different neighbours each time
        block = others.clone()
        block[position] = target
        assert torch.equal(scorer._forward(block)[position], reference), position


def test_scores_match_an_independent_open_clip_pass(tiny_models, pictures):
    """Within float32 tolerance of a plain open_clip forward pass of each image alone (another
    batch shape, so not bit-exact there)."""
    import open_clip

    open_clip.add_model_config(tiny_models.clip_model)
    name = Path(tiny_models.clip_model).stem
    model, _, pre = open_clip.create_model_and_transforms(name, pretrained=tiny_models.clip_pretrained)
    model.eval()
    tok = open_clip.get_tokenizer(name)
    labels = [i % len(CLASSES) for i in range(len(pictures))]
    with torch.no_grad():
        text = model.encode_text(tok([f"a photo of a {c}" for c in CLASSES])).double()
        text = text / text.norm(dim=-1, keepdim=True)
        expected = []
        for img, label in zip(pictures, labels):
            feats = model.encode_image(pre(img)[None]).double()
            cos = (feats / feats.norm(dim=-1, keepdim=True)) @ text.T
            expected.append(float((100.0 * cos).softmax(dim=-1)[0, label]))
    got = CLIPScorer.from_models(tiny_models).score(pictures, labels, CLASSES)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _write_folder(root: Path, pictures: list[Image.Image], classes: int) -> Path:
    for i, img in enumerate(pictures):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img_{i:03d}.png")
    return root


def test_plan_scores_do_not_depend_on_chunk_order_or_subset(tiny_models, pictures, tmp_path, monkeypatch):
    import dalda_aug.plan.build as plan_module

    src = ImageSource.from_folder(_write_folder(tmp_path / "data", pictures, 3))
    whole = build_plan(src, variants=3, seed=2, models=tiny_models)
    rows = {v.source: [w.to_row() for w in whole.variants_for(v.source)] for v in whole}
    for chunk in (1, 5, SCORE_BLOCK + 1):
        monkeypatch.setattr(plan_module, "_CHUNK", chunk)
        assert [v.to_row() for v in build_plan(src, variants=3, seed=2, models=tiny_models)] == \
            [v.to_row() for v in whole], chunk
    monkeypatch.setattr(plan_module, "_CHUNK", 7)
    backwards = build_plan(src.subset(list(range(len(src)))[::-1]), variants=3, seed=2, models=tiny_models)
    assert {s: [w.to_row() for w in backwards.variants_for(s)] for s in backwards.sources()} == rows
    # few-shot subsets: the same image keeps its exact score (λ differs: AGS's σ reads n)
    for shots in (1, 4):
        few = build_plan(src, variants=3, seed=2, n_shot=shots, models=tiny_models)
        assert all(v.score == rows[v.source][0]["score"] for v in few), shots


DRIVER = textwrap.dedent("""
    import sys
    from accelerate import PartialState
    from dalda_aug.config import ModelConfig
    from dalda_aug.plan import build_plan

    data, models, out = sys.argv[1:4]
    state = PartialState(cpu=True)
    plan = build_plan(data, variants=3, seed=7, models=ModelConfig.load(models), processes=state, progress=False)
    print(f"rank {state.process_index} of {state.num_processes}: {len(plan)} variants", flush=True)
    if state.is_main_process:
        plan.save(out)
""")


def test_two_processes_write_the_one_process_plan(tiny_models, pictures, tmp_path):
    """A real ``torchrun --nproc_per_node 2`` launch on the CPU: each process reads and scores a
    share of the sources (here 18 and 19: other blocks, other padding than one process's), the
    scores are gathered and the main process writes the plan: byte for byte one process's plan."""
    data = _write_folder(tmp_path / "data", pictures, 3)
    models = tiny_models.save(tmp_path / "models.json")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    run = dict(env=env, capture_output=True, text=True, timeout=600)
    one = subprocess.run([sys.executable, str(driver), str(data), str(models), str(tmp_path / "one")], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(driver), str(data), str(models), str(tmp_path / "two")], **run)
    assert two.returncode == 0, two.stderr[-3000:]
    n = len(pictures) * 3
    assert "rank 0 of 2" in two.stdout and "rank 1 of 2" in two.stdout and f"{n} variants" in two.stdout, two.stdout
    assert "rank 0 of 1" in one.stdout
    for name in ("plan.jsonl", "summary.json", "plan.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_plan_command_under_torchrun_writes_the_one_process_plan(tiny_models, pictures, tmp_path):
    """``dalda-aug plan`` itself, launched by ``torchrun --nproc_per_node 2`` (WORLD_SIZE=2): the two
    processes split the scoring and write one plan, byte for byte the plan of a plain run."""
    data = _write_folder(tmp_path / "data", pictures[:21], 2)
    models = tiny_models.save(tmp_path / "models.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    run = dict(env=env, capture_output=True, text=True, timeout=600)
    args = ["plan", "--data", str(data), "--models", str(models), "--variants", "2", "--seed", "5", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "dalda_aug", *args, "--out", str(tmp_path / "one")], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dalda_aug", *args, "--out", str(tmp_path / "two")], **run)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("planned ") == 1, two.stdout  # the main process alone writes and says so
    for name in ("plan.jsonl", "summary.json", "plan.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
