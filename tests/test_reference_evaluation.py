"""The reference evaluation's 6,400 draws with replacement run the model once per distinct image
(issue 32). The reference (kkyuhun94/dalda ``train_classifier.py``) evaluates after
``model.eval()`` with a fixed ``val_transform`` (Resize, ToTensor, Normalize), so every draw of
one image gets the same logits: the accuracy must be exactly the per-draw loop's, which is run
here beside it, with the forwards counted by a hook on the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import write_toy  # noqa: E402


class _Forwards:
    """Counts the images the model runs on (a forward hook on the model itself)."""

    def __init__(self, model):
        self.images = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self.images += int(inputs[0].shape[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An EfficientNet-Lite0 linear probe with BatchNorm in train mode (the reference's), trained
    two steps so its running statistics moved, and the 6 toy test images with the reference's
    evaluation transform."""
    from torch.utils.data import Subset, TensorDataset
    from torchvision.datasets import ImageFolder

    import dalda_aug.classify as C

    toy = write_toy(tmp_path_factory.mktemp("eval"))
    model = C.build_classifier("efficientnet_lite0", 2, mode="linear", pretrained=False, seed=0, bn_mode="train")
    train = ImageFolder(str(toy / "train"), transform=C.train_transform(model, 16, recipe="reference"))
    C.train_classifier(model, Subset(train, list(range(len(train)))),
                       C.TrainConfig(epochs=1, batch_size=3, iterations_per_epoch=2, seed=0), progress=False)
    folder = ImageFolder(str(toy / "test"), transform=C.eval_transform(model, 16, recipe="reference"))
    # the transform is fixed, so the images are read once (the per-draw loop then costs forwards only)
    x, y = zip(*(folder[i] for i in range(len(folder))))
    pool = TensorDataset(torch.stack(x), torch.tensor(y))
    pool.targets = list(y)
    return model, pool


def test_distinct_images_give_exactly_the_per_draw_accuracy_with_1000x_fewer_forwards(trained):
    import numpy as np
    from torch.utils.data import Subset

    from dalda_aug.classify import evaluate
    from dalda_aug.fewshot import evaluation_draws
    from dalda_aug.fewshot.run import drawn_items

    model, pool = trained
    assert len(pool) == 6
    # each image's prediction, computed directly in eval mode: the independent expectation
    model.eval()
    with torch.inference_mode():
        x = torch.stack([pool[i][0] for i in range(len(pool))])
        pred = model(x).argmax(dim=1).numpy()
    targets = np.asarray(pool.targets)
    for epoch in (1,):
        draws = evaluation_draws(len(pool), 6400, seed=0, epoch=epoch)
        counter = _Forwards(model)
        try:
            per_draw = evaluate(model, Subset(pool, draws), batch_size=800, progress=False)
            loop_forwards = counter.images
            items, counts = drawn_items(pool, draws)
            dedup = evaluate(model, Subset(pool, items), batch_size=800, progress=False, counts=counts)
            dedup_forwards = counter.images - loop_forwards
        finally:
            counter.handle.remove()
        assert sorted(items) == items and sum(counts) == 6400 and len(items) == 6
        for key in ("top1", "mean_per_class", "per_class", "per_class_n", "n"):
            assert dedup[key] == per_draw[key], key
        drawn_targets = targets[draws]
        hits = (pred[draws] == drawn_targets)
        expected = [float(hits[drawn_targets == c].sum() / (drawn_targets == c).sum()) for c in range(2)]
        assert dedup["per_class"] == pytest.approx(expected, abs=0) and dedup["n"] == 6400
        assert dedup["top1"] == hits.sum() / 6400
        # forwards: 6,400 per draw, 6 once per image (1,000x fewer or better)
        assert (loop_forwards, dedup_forwards) == (6400, 6) == (per_draw["forwards"], dedup["forwards"])
        assert loop_forwards / dedup_forwards >= 1000


def test_a_flowers_sized_half_needs_about_half_the_forwards():
    import math

    from dalda_aug.fewshot import evaluation_draws
    from dalda_aug.fewshot.run import drawn_items

    # Flowers-102's 8,189 images pooled: the validation half keeps floor(n_c / 2) of each class,
    # about 4,050 images. Expected distinct images among D draws from N: N (1 - (1 - 1/N)^D).
    n = 4050
    expected = n * (1 - (1 - 1 / n) ** 6400)
    for epoch in range(3):
        items, counts = drawn_items(list(range(n)), evaluation_draws(n, 6400, seed=epoch, epoch=epoch))
        assert sum(counts) == 6400
        assert abs(len(items) - expected) < 0.01 * expected
    saved = 1 - expected / 6400
    assert 0.45 < saved < 0.55 and math.isclose(saved, 0.5, abs_tol=0.05)


def test_counts_are_checked(trained):
    from dalda_aug.classify import evaluate
    from dalda_aug.errors import InputError

    model, pool = trained
    with pytest.raises(InputError, match="one integer >= 0 per item"):
        evaluate(model, pool, counts=[1, 2], progress=False)
    with pytest.raises(InputError, match="all 0"):
        evaluate(model, pool, counts=[0] * len(pool), progress=False)
