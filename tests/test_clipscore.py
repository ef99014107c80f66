import numpy as np
import pytest
import torch
from PIL import Image

from dalda_aug.plan.clipscore import CLIPScorer
from dalda_aug.errors import InputError, ModelLoadError


@pytest.fixture(scope="module")
def images():
    from skimage import data

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()), Image.fromarray(data.rocket()),
            Image.fromarray(data.astronaut())]


def _independent(models, images, labels, classes):
    import open_clip

    open_clip.add_model_config(models.clip_model)
    name = models.clip_model.rsplit("/", 1)[-1][: -len(".json")]
    model, _, pre = open_clip.create_model_and_transforms(name, pretrained=models.clip_pretrained)
    tok = open_clip.get_tokenizer(name)
    model.eval()
    with torch.no_grad():
        t = model.encode_text(tok([f"a photo of a {c}" for c in classes]))
        i = model.encode_image(torch.stack([pre(im) for im in images]))
    t = t / t.norm(dim=-1, keepdim=True)
    i = i / i.norm(dim=-1, keepdim=True)
    cos = (i @ t.T).numpy().astype(np.float64)
    logits = 100.0 * cos
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return probs[np.arange(len(labels)), labels], cos[np.arange(len(labels)), labels]


def test_softmax_score_matches_open_clip(tiny_models, images):
    classes = ["cat", "coffee", "rocket", "astronaut", "dog"]
    labels = [0, 1, 2, 3]
    scorer = CLIPScorer.from_models(tiny_models, batch_size=3)  # two batches
    got = scorer.score(images, labels, classes)
    expected, cos = _independent(tiny_models, images, labels, classes)
    assert got.shape == (4,) and np.all((got >= 0) & (got <= 1))
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # "cosine": the paper's wording, the raw cosine clipped at 0 (in [0, 1], the scale AGS reads)
    cosine = CLIPScorer.from_models(tiny_models, kind="cosine").score(images, labels, classes)
    np.testing.assert_allclose(cosine, np.maximum(cos, 0), atol=1e-5)
    hessel = CLIPScorer.from_models(tiny_models, kind="hessel").score(images, labels, classes)
    np.testing.assert_allclose(hessel, 2.5 * np.maximum(cos, 0), atol=1e-5)


def test_cosine_scores_feed_ags_even_above_hessels_range(tiny_models, tmp_path):
    """An image whose cosine with its class text is above 0.4 (Hessel's 2.5·cos > 1) still plans
    with --score-kind cosine: the score is the clipped cosine, at most 1."""
    from dalda_aug.cli import main

    # the tiny CLIP encodes a flat image and the text of a class made to match it; any cos works,
    # what matters is that no score is > 1 and the plan is written
    root = tmp_path / "data"
    for name, colour in (("red", (250, 10, 10)), ("blue", (10, 10, 250))):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (40, 32), colour).save(root / name / "a.png")
    models = tiny_models.save(tmp_path / "models.json")
    assert main(["plan", "--data", str(root), "--out", str(tmp_path / "plan"), "--variants", "1",
                 "--models", str(models), "--score-kind", "cosine"]) == 0
    import json

    rows = [json.loads(line) for line in (tmp_path / "plan" / "plan.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_cosine_is_clipped_cos_not_hessel_for_high_similarity(tiny_models, images, monkeypatch):
    """cos = 0.9 (fixed here): "cosine" gives 0.9, "hessel" 2.25."""
    scorer = CLIPScorer.from_models(tiny_models, kind="cosine")
    hessel = CLIPScorer.from_models(tiny_models, kind="hessel")
    unit = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[0.9, float(np.sqrt(1 - 0.81))], [0.0, 1.0]])
    for s in (scorer, hessel):
        monkeypatch.setattr(s, "_forward", lambda pixels: unit.repeat(len(pixels), 1))
        monkeypatch.setattr(s, "text_features", lambda names: text)
    assert scorer.score(images[:1], [0], ["a", "b"])[0] == pytest.approx(0.9)
    assert hessel.score(images[:1], [0], ["a", "b"])[0] == pytest.approx(2.25)


def test_text_features_computed_once_per_class_list(tiny_models, images):
    scorer = CLIPScorer.from_models(tiny_models)
    classes = ["cat", "coffee"]
    first = scorer.text_features(classes)
    scorer.score(images[:2], [0, 1], classes)
    assert scorer.text_features(classes) is first
    assert len(scorer._text_cache) == 1
    scorer.text_features(["cat", "coffee", "dog"])
    assert len(scorer._text_cache) == 2


def test_score_depends_on_every_class(tiny_models, images):
    scorer = CLIPScorer.from_models(tiny_models)
    two = scorer.score(images[:1], [0], ["cat", "coffee"])
    three = scorer.score(images[:1], [0], ["cat", "coffee", "rocket"])
    assert three[0] < two[0]


def test_bad_inputs(tiny_models, images):
    scorer = CLIPScorer.from_models(tiny_models)
    with pytest.raises(InputError, match="labels"):
        scorer.score(images[:1], [3], ["cat", "dog"])
    with pytest.raises(InputError, match="1 images but 2 labels"):
        scorer.score(images[:1], [0, 1], ["cat", "dog"])
    with pytest.raises(InputError, match="template"):
        CLIPScorer(template="a photo")
    with pytest.raises(InputError, match="softmax, cosine, hessel"):
        CLIPScorer(kind="clip")
    with pytest.raises(ModelLoadError, match="nope.pt"):
        CLIPScorer(tiny_models.clip_model, "/tmp/definitely/nope.pt").score(images[:1], [0], ["cat"])
    assert scorer.score([], [], ["cat"]).shape == (0,)


def test_unreachable_hub_weights_give_a_clear_error(images, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'ViT-B-16' with pretrained='openai'.*local checkpoint"):
        CLIPScorer("ViT-B-16", "openai").score(images[:1], [0], ["cat"])


def test_preprocessed_tensors_score_like_pil_images(tiny_models, images):
    """score() takes PIL images or the tensors preprocess() made (as plan's reading threads do)."""
    scorer = CLIPScorer.from_models(tiny_models)
    classes = ["cat", "coffee", "rocket", "astronaut"]
    from_pil = scorer.score(images, [0, 1, 2, 3], classes)
    mixed = [scorer.preprocess(im) if i % 2 else im for i, im in enumerate(images)]
    assert np.array_equal(scorer.score(mixed, [0, 1, 2, 3], classes), from_pil)
    assert scorer.preprocess(images[0]).shape == (3, 32, 32)  # the tiny CLIP's 32 px transform
