import numpy as np
import pytest
import torch
from PIL import Image

from dalda_aug.plan.clipscore import CLIPScorer
from dalda_aug.errors import InputError, ModelLoadError
from dalda_aug.metrics import EmbeddingStore, diversity_metrics, load_lpips, mean_pairwise_cosine, mean_pairwise_lpips


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(getattr(data, n)()).resize((96, 96)) for n in ("chelsea", "coffee", "rocket", "astronaut")]


@pytest.fixture(scope="module")
def lpips_net():
    return load_lpips(random_backbone=True)


def test_mean_pairwise_cosine_against_brute_force():
    f = np.random.default_rng(0).normal(size=(5, 7))
    n = f / np.linalg.norm(f, axis=1, keepdims=True)
    expected = np.mean([n[i] @ n[j] for i in range(5) for j in range(5) if i != j])
    assert mean_pairwise_cosine(f) == pytest.approx(expected)
    assert mean_pairwise_cosine(np.ones((3, 4))) == pytest.approx(1.0)
    assert np.isnan(mean_pairwise_cosine(f[:1]))
    with pytest.raises(InputError):
        mean_pairwise_cosine(np.ones(3))


def test_lpips_identical_zero_different_positive(photos, lpips_net):
    same = mean_pairwise_lpips([photos[0]] * 3, lpips_net, size=64)
    diff = mean_pairwise_lpips(photos, lpips_net, size=64)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert diff > 0.0
    # against the pairwise distances computed one by one
    x = [torch.from_numpy(np.asarray(p.resize((64, 64)), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
         for p in photos]
    with torch.no_grad():
        ref = np.mean([float(lpips_net(x[i], x[j])) for i in range(4) for j in range(i + 1, 4)])
    assert diff == pytest.approx(ref, rel=1e-5)


def test_loading_lpips_says_nothing_of_torchvisions_pretrained_deprecation():
    # lpips builds AlexNet with torchvision's deprecated pretrained=: load_lpips silences exactly
    # that warning around its own load, and nowhere else.
    pytest.importorskip("lpips", reason="lpips is not installed (the metrics extra)")
    import warnings

    import torchvision

    def deprecations(load):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
        return [str(w.message) for w in caught if "pretrained" in str(w.message) or "'weights'" in str(w.message)]

    assert deprecations(lambda: load_lpips(random_backbone=True)) == []
    said = deprecations(lambda: torchvision.models.alexnet(pretrained=False))  # not silenced for others
    assert any(message.startswith("The parameter 'pretrained' is deprecated") for message in said), said


def test_lpips_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="alexnet-owt-7be5be79.pth"):
        load_lpips()


def test_diversity_metrics(tiny_models, photos, lpips_net, tmp_path):
    scorer = CLIPScorer.from_models(tiny_models)
    classes = ["cat", "coffee"]
    variants = {"a": [photos[0]] * 3, "b": [photos[1], photos[2], photos[3]]}
    sources = {"a": photos[0], "b": photos[1]}
    labels = {"a": 0, "b": 1}
    store = EmbeddingStore(scorer, tmp_path / "emb")
    report = diversity_metrics(variants, sources, labels, classes, scorer, lpips_net=lpips_net, embeddings=store,
                               lpips_size=64)
    a, b = report["per_source"]["a"], report["per_source"]["b"]
    assert a["clip_i"] == pytest.approx(1.0, abs=1e-5) and a["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert a["fidelity_clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert b["clip_i"] < 1.0 and b["lpips"] > 0.0
    # independent CLIP-I for source b
    feats = scorer.image_features(variants["b"]).numpy()
    assert b["clip_i"] == pytest.approx(mean_pairwise_cosine(feats), abs=1e-5)
    # zero-shot accuracy computed independently
    text = scorer.text_features(classes).numpy()
    expected_acc = np.mean(np.argmax(feats @ text.T, axis=1) == 1)
    assert b["zero_shot_acc"] == pytest.approx(expected_acc)
    assert set(report["per_class"]) == {"cat", "coffee"}
    assert report["overall"]["n_images"] == 6
    # embeddings were cached on disk: a new store reads them back without computing
    again = EmbeddingStore(scorer, tmp_path / "emb")
    again.get(variants["b"])
    assert store.computed == 4 and again.computed == 0
    with pytest.raises(InputError, match="no generated images"):
        diversity_metrics({"a": []}, sources, labels, classes, scorer)
