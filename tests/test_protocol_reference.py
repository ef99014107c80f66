"""`fewshot.py --protocol reference` means every component of the reference code (issue 22):
its transforms, BatchNorm in train mode, its CLIP head, 6,400 seeded evaluation draws from its
per-seed validation half; each component recorded per row and named in table.md when it differs.
Also the reference's data halves, `prepare_datasets.py --split reference` and `prompts --validate
off`. Expected values are written out from the reference code (kkyuhun94/dalda), not read from
the code under test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import load_script, run_benchmark, write_toy  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "benchmarks" / "fewshot.py", "fewshot_ref")


@pytest.fixture()
def toy(tmp_path):
    return write_toy(tmp_path)


# -- the reference's halves ---------------------------------------------------------------------------
def test_reference_halves_are_the_references(bench):
    # kkyuhun94/dalda semantic_aug/datasets/{pets,flowers102,caltech101}.py, written out:
    #   rng = np.random.default_rng(seed)
    #   class_to_ids = {key: rng.permutation(len(class_to_images[key])) for key in self.class_names}
    #   class_to_ids = {key: np.array_split(class_to_ids[key], 2)[0 if split == "train" else 1] ...}
    targets = [1] * 5 + [0] * 4 + [2] * 3  # labels not in file order
    members = {0: [5, 6, 7, 8], 1: [0, 1, 2, 3, 4], 2: [9, 10, 11]}
    for order in ([0, 1, 2], [2, 0, 1]):  # the reference's class order (Flowers: label order)
        rng = np.random.default_rng(7)
        perms = {c: rng.permutation(len(members[c])) for c in order}
        train = sorted(members[c][i] for c in order for i in np.array_split(perms[c], 2)[0])
        val = sorted(members[c][i] for c in order for i in np.array_split(perms[c], 2)[1])
        assert bench.reference_halves(targets, 7, order) == (train, val)
        first = sorted(members[c][i] for c in order for i in np.array_split(perms[c], 2)[0][:1])
        assert bench.reference_few_shot_indices(targets, 1, 7, order) == first
    train, val = bench.reference_halves(targets, 7)
    assert sorted(train + val) == list(range(12)) and not set(train) & set(val)


def test_evaluation_draws_are_seeded_with_replacement(bench):
    a = bench.evaluation_draws(5, 6400, seed=0, epoch=3)
    assert len(a) == 6400 and set(a) == set(range(5))  # with replacement: every item, many times
    assert a == bench.evaluation_draws(5, 6400, seed=0, epoch=3)
    assert a != bench.evaluation_draws(5, 6400, seed=0, epoch=4) != bench.evaluation_draws(5, 6400, seed=1, epoch=3)


def test_reference_class_order_is_read_from_classes_json(bench, tmp_path):
    (tmp_path / "ds" / "all").mkdir(parents=True)
    (tmp_path / "ds" / "classes.json").write_text(json.dumps({"classes": {"pink_primrose": "pink primrose",
                                                                          "canterbury_bells": "canterbury bells"}}))
    order, path = bench.reference_class_order(tmp_path / "ds" / "all", ["canterbury_bells", "pink_primrose"])
    assert order == [1, 0] and path.endswith("classes.json")
    assert bench.reference_class_order(tmp_path / "ds" / "all", ["a", "b"]) == (None, None)


# -- components, rows, table ---------------------------------------------------------------------------
def test_components_follow_the_protocol_and_flags(bench):
    parse = bench.build_parser().parse_args
    ref = bench.resolve_components(parse(["--out", "o", "--protocol", "reference", "--backbone", "resnet50"]))
    assert ref == {"recipe": "reference", "bn_mode": "train", "clip_head": None, "eval_draws": 6400,
                   "eval_split": "reference"}
    clip = bench.resolve_components(parse(["--out", "o", "--protocol", "reference", "--backbone", "clip",
                                           "--eval-draws", "0"]))
    assert clip == {"recipe": "reference", "bn_mode": None, "clip_head": "reference", "eval_draws": 0,
                    "eval_split": "reference"}
    honest = bench.resolve_components(parse(["--out", "o", "--backbone", "efficientnet_lite0"]))
    assert honest == {"recipe": "default", "bn_mode": "frozen", "clip_head": None, "eval_draws": 0,
                      "eval_split": "whole"}
    settings = {"ags_mode": "clip", "class_names": "folder", "pool": "reference"}
    assert bench.differing_components({"protocol": "reference", "backbone": "clip", **clip, **settings}) == \
        ["eval_draws"]
    # a setting a row does not record, or records otherwise, is named; None (not applicable) is not
    assert bench.differing_components({"protocol": "reference", "backbone": "clip", **clip}) == \
        ["eval_draws", "ags_mode", "class_names", "pool"]
    assert bench.differing_components({"protocol": "reference", "backbone": "clip", **clip, **settings,
                                       "ags_mode": None, "class_names": "readable",
                                       "pool": "no classes.json"}) == ["eval_draws", "class_names", "pool"]


def test_help_prints_each_default_once(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: from the folder) (default: None)" not in text
    assert "(default: None)" not in text


class _Recorder:
    """Wraps torch's DataLoader and classify.train_classifier to read the training loop's state."""

    def __init__(self, monkeypatch):
        import torch.utils.data as tud

        import dalda_aug.classify as C

        self.loaders: list = []
        self.bn_calls: list[tuple[bool, bool]] = []  # (classifier.training, bn.training) per BN forward
        self.stats_changed: list[bool] = []
        original_loader, original_train = tud.DataLoader, C.train_classifier
        recorder = self

        class Loader(original_loader):
            def __init__(self, dataset, *args, **kwargs):
                super().__init__(dataset, *args, **kwargs)
                recorder.loaders.append(self)

        def train(model, dataset, config, **kwargs):
            import torch

            bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            recorder.n_bn = len(bns)
            hooks = [bn.register_forward_pre_hook(lambda mod, inp: recorder.bn_calls.append((model.training,
                                                                                              mod.training)))
                     for bn in bns]
            before = [bn.running_mean.clone() for bn in bns]
            try:
                return original_train(model, dataset, config, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
                recorder.stats_changed.append(any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns)))

        monkeypatch.setattr(tud, "DataLoader", Loader)
        monkeypatch.setattr(C, "train_classifier", train)

    def train_loader(self):
        from torch.utils.data import RandomSampler

        return next(ld for ld in self.loaders if isinstance(ld.sampler, RandomSampler))


def _dataset_transform(dataset):
    while not hasattr(dataset, "transform") or dataset.transform is None:
        dataset = dataset.dataset
    return dataset.transform


def _reference_transform(size):
    # kkyuhun94/dalda semantic_aug/datasets/pets.py train_transform, written out (the
    # ConvertImageDtype and expand steps are no-ops on RGB images)
    import torchvision.transforms as T

    return T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(p=0.5), T.RandomRotation(degrees=15.0),
                      T.ToTensor(), T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])


def _assert_reference_transform(transform, size):
    import torch
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((90, 70))
    reference = _reference_transform(size)
    for seed in range(6):  # both consume torch's RNG the same way: flip, then the angle
        torch.manual_seed(seed)
        got = transform(img)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, reference(img), rtol=0, atol=1e-6)


def test_reference_protocol_with_a_batchnorm_backbone(bench, toy, tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    out = tmp_path / "out"
    argv = ["--train", str(toy / "train"), "--test", str(toy / "test"), "--methods", "real", "--shots", "1",
            "--seeds", "0", "--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "2",
            "--iterations-per-epoch", "2", "--batch-size", "2", "--protocol", "reference",
            "--device", "cpu", "--out", str(out), "--no-progress", "--threads", "1"]
    assert run_benchmark(bench, argv) == 0
    # the transform the training DataLoader's dataset applies is the reference's
    _assert_reference_transform(_dataset_transform(rec.train_loader().dataset), 64)
    # BatchNorm: train mode in every training step, eval mode in evaluation; running stats moved
    train_calls = [bn for model_training, bn in rec.bn_calls if model_training]
    eval_calls = [bn for model_training, bn in rec.bn_calls if not model_training]
    assert train_calls and all(train_calls) and eval_calls and not any(eval_calls)
    assert rec.stats_changed == [True]

    row = json.loads((out / "results.json").read_text())["runs"][0]
    assert (row["protocol"], row["recipe"], row["bn_mode"], row["clip_head"], row["eval_draws"],
            row["eval_split"]) == ("reference", "reference", "train", None, 6400, "reference")
    assert isinstance(row["best_epoch"], int) and row["n_test"] == 6400
    assert row["eval_pool"] == 2  # np.array_split of 3 test images per class: the second half holds 1
    # the reference's 6,400 draws per epoch, the model run once per distinct image drawn (issue 32)
    distinct = sum(len(set(bench.evaluation_draws(2, 6400, seed=0, epoch=e))) for e in range(2))
    assert row["eval_forwards"] == distinct == 4
    eval_batches = [bn for model_training, bn in rec.bn_calls if not model_training]
    assert len(eval_batches) == 2 * rec.n_bn  # one batch of 2 images per epoch, not 100 batches of 64
    # settings: real images only have no AGS and no prompt; the toy folder has no classes.json
    assert (row["ags_mode"], row["class_names"], row["pool"]) == (None, None, "no classes.json")
    table = (out / "table.md").read_text()
    assert "with its classes.json): no classes.json" in table and "not the same metric" in table


def test_reference_protocol_with_clip_records_every_component(bench, toy, tmp_path, monkeypatch, tiny_models):
    rec = _Recorder(monkeypatch)
    models = tiny_models.save(tmp_path / "models.json")
    common = ["--train", str(toy / "train"), "--test", str(toy / "test"), "--models", str(models),
              "--methods", "real", "--shots", "1", "--seeds", "0", "--backbone", "clip", "--epochs", "1",
              "--iterations-per-epoch", "1", "--batch-size", "2", "--protocol", "reference", "--device", "cpu",
              "--no-progress", "--threads", "1", "--eval-batch-size", "640"]
    assert run_benchmark(bench, [*common, "--out", str(tmp_path / "ref")]) == 0
    _assert_reference_transform(_dataset_transform(rec.train_loader().dataset), 32)
    result = json.loads((tmp_path / "ref" / "results.json").read_text())
    row = result["runs"][0]
    assert (row["recipe"], row["bn_mode"], row["clip_head"], row["eval_draws"], row["eval_split"]) == \
        ("reference", None, "reference", 6400, "reference")
    assert row["n_test"] == 6400 and sum(row["per_class_n"]) == 6400
    table = (tmp_path / "ref" / "table.md").read_text()
    assert "Components: recipe reference, clip_head reference, eval_draws 6400, eval_split reference." in table

    # one component overridden: table.md names it
    assert run_benchmark(bench, [*common, "--recipe", "default", "--name", "pets", "--out", str(tmp_path / "rrc")]) == 0
    table = (tmp_path / "rrc" / "table.md").read_text()
    assert "classifier transforms (--recipe): default" in table and "not the same metric" in table
    assert "this is the same metric" not in table
    assert json.loads((tmp_path / "rrc" / "results.json").read_text())["runs"][0]["recipe"] == "default"


def test_paper_number_is_called_the_same_metric_only_with_every_component(bench):
    base = {"dataset": "pets", "backbone": "clip", "mode": "linear", "method": "dalda", "label": "DALDA",
            "shots": 1, "seeds": [0], "protocol": "reference", "best_epoch": 3, "top1": 0.9, "top1_std": None,
            "mean_per_class": 0.88, "mean_per_class_std": None, "n_test": 6400,
            "recipe": "reference", "bn_mode": None, "clip_head": "reference", "eval_draws": 6400,
            "eval_split": "reference", "ags_mode": "clip", "class_names": "folder", "pool": "reference"}
    assert "this is the same metric" in bench.render_table([base], "pets", "clip", "linear", [1])
    for name, value in (("clip_head", "normalized"), ("eval_split", "whole"), ("eval_draws", 0),
                        ("ags_mode", "truncnorm"), ("class_names", "readable")):
        table = bench.render_table([{**base, name: value}], "pets", "clip", "linear", [1])
        assert "not the same metric" in table and f"(--{name.replace('_', '-')}): {value}" in table
    for pool in ("official", "no classes.json"):  # the official folders, or a pool without classes.json
        table = bench.render_table([{**base, "pool": pool}], "pets", "clip", "linear", [1])
        assert "not the same metric" in table and f"with its classes.json): {pool}" in table and "0.875" not in table
    # the table names what differs in any row: here DALDA's AGS mode, not the real-only row's (None)
    real = {**base, "method": "real", "label": "Real images only", "ags_mode": None, "class_names": None}
    table = bench.render_table([real, {**base, "ags_mode": "truncnorm"}], "pets", "clip", "linear", [1])
    assert "AGS mode (--ags-mode): truncnorm" in table and "0.875" not in table
    assert "Settings: ags_mode truncnorm, class_names folder, pool reference." in table


# -- paired tests ------------------------------------------------------------------------------------
def _cell(method, shots, values, dataset="pets"):
    return {"dataset": dataset, "backbone": "clip", "mode": "linear", "method": method, "shots": shots,
            "seeds": [0, 1, 2], "protocol": "honest", "per_seed": {"top1": values, "mean_per_class": values}}


def test_paired_tests_are_per_dataset_and_shots_and_combine_pairs_seed_means(bench):
    from scipy import stats

    summary = [_cell("real", 1, [0.5, 0.6, 0.7]), _cell("dalda", 1, [0.6, 0.8, 1.0]),
               _cell("real", 2, [0.6, 0.7, 0.8]), _cell("dalda", 2, [0.7, 0.7, 0.9])]
    tests = bench.paired_tests(summary, ["top1"])
    assert [(t["shots"], t["n_pairs"]) for t in tests] == [(1, 3), (2, 3)]  # never pooled over shots
    assert tests[0]["p_value"] == pytest.approx(stats.ttest_rel([0.6, 0.8, 1.0], [0.5, 0.6, 0.7]).pvalue)
    cells = bench.paired_tests(summary + [_cell("real", 1, [0.1, 0.2, 0.3], "flowers"),
                                          _cell("dalda", 1, [0.3, 0.3, 0.3], "flowers")], ["top1"], pairing="cells")
    (t,) = cells
    a, b = [0.3, 0.8, 0.7666666666666666], [0.2, 0.6, 0.7]  # seed means per (dataset, shots), sorted keys
    assert t["n_pairs"] == 3 and t["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert "mean over its seeds" in t["pairing"]


# -- prepare_datasets --split reference --------------------------------------------------------------
def test_prepare_flowers_reference_pools_every_image_in_file_name_order(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from PIL import Image

    prep = load_script(ROOT / "examples" / "prepare_datasets.py", "prepare_ref")
    jpg = tmp_path / "dl" / "jpg"
    jpg.mkdir(parents=True)
    # image id -> label (0-based), split as the official setid would
    labels = {1: 76, 2: 0, 3: 76, 4: 0, 5: 0}
    splits = {"train": [3, 2], "val": [5], "test": [4, 1]}
    for i in labels:
        Image.new("RGB", (6, 4), (i * 40, 0, 0)).save(jpg / f"image_{i:05d}.jpg")

    class FakeFlowers:
        def __init__(self, root, split, download):
            self._image_files = [jpg / f"image_{i:05d}.jpg" for i in splits[split]]
            self._labels = [labels[i] for i in splits[split]]

    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    assert prep.main(["--out", str(tmp_path / "out"), "--datasets", "flowers102", "--split", "reference"]) == 0
    files = sorted(p.relative_to(tmp_path / "out" / "flowers102").as_posix()
                   for p in (tmp_path / "out" / "flowers102").rglob("*.jpg"))
    assert files == ["all/passion_flower/00001.jpg", "all/passion_flower/00003.jpg", "all/pink_primrose/00002.jpg",
                     "all/pink_primrose/00004.jpg", "all/pink_primrose/00005.jpg"]
    info = json.loads((tmp_path / "out" / "flowers102" / "classes.json").read_text())
    assert info["split"] == "reference" and list(info["classes"])[:2] == ["pink_primrose", "hard-leaved_pocket_orchid"]


def test_caltech_reference_files_follow_glob_order(tmp_path, monkeypatch):
    import glob

    prep = load_script(ROOT / "examples" / "prepare_datasets.py", "prepare_ref2")
    listed = [str(tmp_path / "Faces_easy" / "image_0002.jpg"), str(tmp_path / "BACKGROUND_Google" / "x.jpg"),
              str(tmp_path / "Faces_easy" / "image_0001.jpg"), str(tmp_path / "ant" / "image_0001.jpg")]
    monkeypatch.setattr(glob, "glob", lambda pattern: list(listed))
    got = prep.caltech101_reference_files(tmp_path)
    assert {k: [p.name for p in v] for k, v in got.items()} == {
        "faces easy": ["image_0002.jpg", "image_0001.jpg"], "ant": ["image_0001.jpg"]}


# -- prompts --validate off --------------------------------------------------------------------------
def test_validate_off_maps_answers_by_position_unchecked(monkeypatch):
    from llm_server import ChatServer, reply_json

    from dalda_aug.prompts import OpenAIChatBackend, generate_prompt_bank

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    names = ["cat", "dog"]
    # keys that match no class, a sentence naming the other class, one over-long sentence: the
    # reference takes them all, by position
    long = "A dog " + "and more " * 60 + "here."
    answers = [reply_json({"x": "A photo of a dog.", "y": long}), reply_json({"only": "one"})]
    with ChatServer(answers) as server:
        backend = OpenAIChatBackend("test-model", base_url=server.base_url, base_delay=0.001, max_retries=1)
        bank = generate_prompt_bank(names, backend, m=1, tokenizer=None, validate=False)
    assert bank.prompts == {"cat": ["A photo of a dog."], "dog": [long]}
    assert bank.provenance["validate"] is False and len(server.requests) == 1
    with ChatServer([reply_json({"only": "one"}), reply_json({"a": "s1", "b": "s2"})]) as server:
        backend = OpenAIChatBackend("test-model", base_url=server.base_url, base_delay=0.001, max_retries=1)
        bank = generate_prompt_bank(names, backend, m=1, tokenizer=None, validate=False)
    assert bank.prompts == {"cat": ["s1"], "dog": ["s2"]} and len(server.requests) == 2  # wrong count: asked again
