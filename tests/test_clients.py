"""SyntheticAugmentedDataset inside real training clients, with no glue code.

Each test runs a client as its users do (a plain loop, a DistributedSampler loop, a Lightning
Trainer, timm's create_loader, accelerate, sampling with replacement) and reads back, from the
tensors that come out, which version of each item was served: the real image or variant k.
The cache is a real diskcache filled with distinct random images (these tests are about the
choices, not about generation) and its spec is recorded, so every dataset is built from
``SyntheticCache(directory)`` alone, as docs/training.md shows.
"""

from __future__ import annotations

import collections
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, RandomSampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.config import ModelConfig
from dalda_aug.data import few_shot_indices
from dalda_aug.dataset import SyntheticAugmentedDataset, plan_indices
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.plan import build_plan

CLASSES = ["ant", "bee", "cat", "dog"]
PER_CLASS = 6
VARIANTS = 3
P = 0.5
EPOCHS = 4
TO_TENSOR = T.PILToTensor()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An image folder, its plan and a cache holding every variant, with the spec recorded."""
    work = tmp_path_factory.mktemp("clients")
    rng = np.random.default_rng(0)
    root = work / "data"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    n = len(CLASSES) * PER_CLASS
    plan = build_plan(root, variants=VARIANTS, seed=3, scores=np.linspace(0.05, 0.95, n), models=ModelConfig())
    spec = GenerationSpec(ModelConfig(), IPAdapterConfig(num_inference_steps=2, height=16, width=16))
    cache = SyntheticCache(work / "cache", spec)
    for variant in plan:
        cache.put(variant, Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)))
    cache.record_spec(plan)
    return root, plan, work / "cache"


def _dataset(setup, transform=TO_TENSOR, **kwargs):
    root, plan, cache_dir = setup
    kwargs.setdefault("p", P)
    kwargs.setdefault("on_miss", "error")
    return SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(cache_dir), transform=transform,
                                     **kwargs)


def _lookup(ds, transform=None):
    """``{tensor bytes: (index, version)}``, version -1 = real, k = variant k."""
    transform = transform or ds.transform
    table = {}
    for i in range(len(ds)):
        table[_key(transform(ds.base[i][0]))] = (i, -1)
        for variant in ds.variants_for(i):
            table[_key(transform(ds.cache.get(variant).image))] = (i, variant.variant)
    assert len(table) == len(ds) * (VARIANTS + 1), "test images must be distinct"
    return table


def _key(x):
    return x.detach().cpu().numpy().tobytes()


def _served(table, batches):
    """``[(index, version)]`` of every item of ``batches`` ((x, y) pairs)."""
    out = []
    for x, y in batches:
        for xi, yi in zip(x, y):
            index, version = table[_key(xi)]
            assert int(yi) == index // PER_CLASS  # the label follows the item, real or synthetic
            out.append((index, version))
    return out


def _check_epochs(epochs, n, *, expect=None, across_epochs=False):
    """Each epoch serves every item once; the synthetic share is about p; choices change.

    ``expect(e)``: the draws epoch e must serve. With ``across_epochs`` (a loader that prefetches
    across the epoch boundary, so item i of epoch e and item i of epoch e+1 may be fetched at the
    same time by two workers, in either order), each item's draws over all epochs must be exactly
    the expected ones, each consumed once: none repeated, none skipped."""
    draws = 0
    synthetic = 0
    for served in epochs:
        assert sorted(i for i, _ in served) == list(range(n))
        draws += len(served)
        synthetic += sum(v >= 0 for _, v in served)
    sigma = np.sqrt(P * (1 - P) / draws)
    assert abs(synthetic / draws - P) < 4 * sigma, (synthetic, draws)
    # P(an item keeps its version between two epochs) = (1-p)^2 + p^2/M = 1/3 here.
    for a, b in zip(epochs, epochs[1:]):
        changed = sum(dict(a)[i] != dict(b)[i] for i in range(n))
        assert changed >= n // 4, f"only {changed}/{n} items changed version between epochs"
    if expect is not None and across_epochs:
        wanted = [expect(e) for e in range(len(epochs))]
        for i in range(n):
            assert sorted(dict(served)[i] for served in epochs) == sorted(w[i] for w in wanted), i
    elif expect is not None:  # each index once per epoch: epoch e is the pinned draw of epoch e
        for e, served in enumerate(epochs):
            assert dict(served) == expect(e)


def _pinned(ds, epoch):
    """What ``set_epoch(epoch)`` pins, from the public, pure :meth:`choose`."""
    return {i: (-1 if (v := ds.choose(i, epoch)) is None else v.variant) for i in range(len(ds))}


def test_plain_loop_without_set_epoch(setup):
    ds = _dataset(setup)
    table = _lookup(ds)
    loader = DataLoader(ds, batch_size=5, shuffle=True, num_workers=2)
    epochs = [_served(table, loader) for _ in range(EPOCHS)]
    _check_epochs(epochs, len(ds), expect=lambda e: _pinned(ds, e))


def test_distributed_sampler_set_epoch_only(setup, monkeypatch):
    """Two DDP ranks (one dataset object each, as in real DDP) that only call
    ``sampler.set_epoch``: together they serve every item once per epoch, with fresh choices,
    although each rank counts its own accesses and items move between ranks."""
    ranks = []
    for rank in (0, 1):
        # Every rank runs the same script with the same seed, as in real DDP; a fixed seed also keeps
        # the last assertion (a chance event for some seeds) independent of the tests run before.
        ds = _dataset(setup, seed=0)
        ranks.append((ds, DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)))
    table = _lookup(ranks[0][0])
    epochs = []
    for epoch in range(EPOCHS):
        served = []
        for rank, (ds, sampler) in enumerate(ranks):
            monkeypatch.setenv("RANK", str(rank))  # what torchrun/accelerate set in each process
            sampler.set_epoch(epoch)
            served += _served(table, DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0))
        epochs.append(served)
    _check_epochs(epochs, len(ranks[0][0]))
    # No item gets the same choice sequence it had in epoch 0 in every later epoch.
    assert all(len({dict(s)[i] for s in epochs}) > 1 for i in range(3))


def test_lightning_trainer(setup):
    lightning = pytest.importorskip("lightning")

    ds = _dataset(setup)
    table = _lookup(ds)
    seen = collections.defaultdict(list)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(12 * 12 * 3, len(CLASSES))

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen[self.current_epoch].append((x.clone(), y.clone()))
            return torch.nn.functional.cross_entropy(self.layer(x.float().flatten(1) / 255), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers and logging
        trainer.fit(Module(), DataLoader(ds, batch_size=4, shuffle=True, num_workers=2))
    epochs = [_served(table, seen[e]) for e in range(EPOCHS)]
    _check_epochs(epochs, len(ds), expect=lambda e: _pinned(ds, e))


@pytest.mark.parametrize("multi_epochs", [False, True])
def test_timm_create_loader(setup, multi_epochs):
    from timm.data import create_loader

    ds = _dataset(setup, transform=None)
    loader = create_loader(ds, input_size=(3, 12, 12), batch_size=4, is_training=True, no_aug=True, hflip=0.0,
                           use_prefetcher=False, num_workers=2, use_multi_epochs_loader=multi_epochs,
                           persistent_workers=False, crop_pct=1.0)
    assert ds.transform is not None  # create_loader sets the dataset's transform, as on its own datasets
    table = _lookup(ds)
    epochs = [_served(table, loader) for _ in range(EPOCHS)]
    # The multi-epoch loader prefetches across epoch boundaries; each access still counts once.
    _check_epochs(epochs, len(ds), expect=lambda e: _pinned(ds, e), across_epochs=multi_epochs)


def test_accelerate_prepare(setup):
    from accelerate import Accelerator

    ds = _dataset(setup)
    table = _lookup(ds)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(ds, batch_size=4, shuffle=True, num_workers=2))
    epochs = [_served(table, loader) for _ in range(EPOCHS)]
    _check_epochs(epochs, len(ds), expect=lambda e: _pinned(ds, e))


def test_sampling_with_replacement(setup):
    """The paper's protocol: batches drawn with replacement. Every access is an independent draw:
    an item drawn k times over the run got exactly the draws of epochs 0..k-1, in some order."""
    ds = _dataset(setup)
    table = _lookup(ds)
    generator = torch.Generator().manual_seed(0)
    sampler = RandomSampler(ds, replacement=True, num_samples=4 * len(ds), generator=generator)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2)
    per_item = collections.defaultdict(list)
    served_all = []
    for _ in range(3):
        served = _served(table, loader)
        served_all += served
        for i, v in served:
            per_item[i].append(v)
    for i, versions in per_item.items():
        expected = [(-1 if (v := ds.choose(i, k)) is None else v.variant) for k in range(len(versions))]
        assert sorted(versions) == sorted(expected)
    # Within one epoch an item drawn many times gets several versions (not one per epoch).
    many = [vs for vs in per_item.values() if len(vs) >= 8]
    assert many and all(len(set(vs)) > 1 for vs in many)
    share = sum(v >= 0 for _, v in served_all) / len(served_all)
    assert abs(share - P) < 4 * np.sqrt(P * (1 - P) / len(served_all))


def test_set_epoch_pins_an_epoch_with_any_workers(setup):
    """A fresh dataset set to epoch e serves what epoch e of a run through 0..e served, with or
    without set_epoch in that run, 0 or 2 workers, persistent or not, fork or spawn."""
    e = 2
    unpinned = _dataset(setup, seed=21)  # three datasets, one seed: the same choices
    table = _lookup(unpinned)
    loader = DataLoader(unpinned, batch_size=4, num_workers=2, persistent_workers=True)
    run = [dict(_served(table, loader)) for _ in range(e + 1)]
    pinned_run = _dataset(setup, seed=21)
    for epoch in range(e + 1):
        pinned_run.set_epoch(epoch)
        last = dict(_served(table, DataLoader(pinned_run, batch_size=4, num_workers=0)))
    fresh = _dataset(setup, seed=21)
    fresh.set_epoch(e)
    spawned = dict(_served(table, DataLoader(fresh, batch_size=4, num_workers=2,
                                             multiprocessing_context="spawn")))
    assert run[e] == last == spawned == _pinned(fresh, e)
    # Pinned, a second pass of the same epoch draws afresh; set_epoch again replays the epoch.
    again = dict(_served(table, DataLoader(fresh, batch_size=4, num_workers=0)))
    assert again != spawned
    fresh.set_epoch(e)
    assert dict(_served(table, DataLoader(fresh, batch_size=4, num_workers=2))) == spawned
    assert os.path.exists(fresh._lock_path)



try:  # module level, so that ddp_spawn can pickle it
    import lightning as _lightning
except ImportError:  # pragma: no cover - lightning is in the dev extra
    _lightning = None

if _lightning is not None:
    class _Recorder(_lightning.LightningModule):
        """Saves every training batch it sees, with its epoch, to OUT/rank<r>.pt."""

        def __init__(self, out_dir):
            super().__init__()
            self.layer = torch.nn.Linear(12 * 12 * 3, len(CLASSES))
            self.out_dir = str(out_dir)
            self.batches = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.batches.append((self.current_epoch, x.clone(), y.clone()))
            return torch.nn.functional.cross_entropy(self.layer(x.float().flatten(1) / 255), y)

        def on_train_end(self):
            torch.save(self.batches, os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.timeout(600)
def test_lightning_ddp_two_cpu_processes(setup, tmp_path):
    """Lightning DDP (2 spawned CPU processes, gloo): Lightning gives each rank a
    DistributedSampler and calls only its set_epoch; each rank has its own dataset copy."""
    if _lightning is None:
        pytest.skip("lightning is not installed")
    ds = _dataset(setup)
    table = _lookup(ds)
    trainer = _lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy="ddp_spawn",
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Recorder(tmp_path), DataLoader(ds, batch_size=4, shuffle=True, num_workers=0))
    per_epoch = collections.defaultdict(list)
    for rank in (0, 1):
        for epoch, x, y in torch.load(tmp_path / f"rank{rank}.pt"):
            per_epoch[epoch].append((x, y))
    epochs = [_served(table, per_epoch[e]) for e in range(EPOCHS)]
    _check_epochs(epochs, len(ds))


# -- issue 19: the default seed, a base that keeps its transform, few-shot plans ----------------------
def _agreement_bound(pairs):
    """Two independent draws of an item agree (same version) with probability
    q = (1-p)^2 + p^2/M; the count of agreements over ``pairs`` draws is Binomial(pairs, q)."""
    q = (1 - P) ** 2 + P ** 2 / VARIANTS
    return pairs * q, 4 * np.sqrt(pairs * q * (1 - q))


@pytest.mark.parametrize("same_object", [False, True])
def test_two_wrappers_built_alike_choose_independently(setup, same_object):
    """ConcatDataset([a, b]) of two wrappers built alike (the usual 2x oversampling), and
    ConcatDataset([a, a]): the two halves choose independently (48 of 48 alike was the bug)."""
    a = _dataset(setup)
    b = a if same_object else _dataset(setup)
    if not same_object:
        assert a.seed != b.seed
    n = len(a)
    table = _lookup(a)
    loader = DataLoader(ConcatDataset([a, b]), batch_size=5, shuffle=False, num_workers=2)
    agree = pairs = synthetic = 0
    for _ in range(3):
        served = _served(table, loader)
        assert [i for i, _ in served] == list(range(n)) * 2
        first, second = served[:n], served[n:]
        agree += sum(va == vb for (_, va), (_, vb) in zip(first, second))
        pairs += n
        synthetic += sum(v >= 0 for _, v in served)
    mean, bound = _agreement_bound(pairs)
    assert abs(agree - mean) < bound, (agree, pairs, mean)
    draws = 2 * pairs
    assert abs(synthetic / draws - P) < 4 * np.sqrt(P * (1 - P) / draws)


def test_default_seed_comes_from_torch_manual_seed(setup):
    """seed=None draws the seed from torch's global generator at construction, as RandomSampler
    draws its shuffling seed: torch.manual_seed(s) before construction reproduces a run."""
    torch.manual_seed(1234)
    expected = int(torch.empty((), dtype=torch.int64).random_().item())  # what RandomSampler draws
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        ds = _dataset(setup)
        assert ds.seed == expected and f"seed={expected}," in repr(ds)
        table = _lookup(ds)
        loader = DataLoader(ds, batch_size=5, shuffle=True, num_workers=2)
        runs.append([_served(table, loader) for _ in range(3)])
    assert runs[0] == runs[1]
    # Without re-seeding, another seed and other choices.
    other = _dataset(setup)
    assert other.seed != expected
    table = _lookup(other)
    loader = DataLoader(other, batch_size=5, shuffle=False, num_workers=2)
    mine = [dict(epoch) for epoch in runs[0]]
    theirs = [dict(_served(table, loader)) for _ in range(3)]
    mean, bound = _agreement_bound(3 * len(other))
    agree = sum(m[i] == t[i] for m, t in zip(mine, theirs) for i in m)
    assert abs(agree - mean) < bound, (agree, mean)
    # An explicit seed stays exact.
    explicit = [_dataset(setup, seed=5) for _ in range(2)]
    assert [d.seed for d in explicit] == [5, 5]
    table = _lookup(explicit[0])
    served = [_served(table, DataLoader(d, batch_size=5, num_workers=0)) for d in explicit]
    assert served[0] == served[1]


SMALL = T.Compose([T.Resize((8, 8)), T.PILToTensor()])


def _plus_100(label):
    return label + 100


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_base_created_with_its_transform(setup, kind):
    """ImageFolder(root, transform=t) (torchvision's reference train.py) and timm's
    ImageDataset(root, transform=t): the wrapper adopts t and the target transform, for real and
    synthetic images alike, through DataLoader workers."""
    from timm.data import ImageDataset

    root, plan, cache_dir = setup
    if kind == "torchvision":
        make = lambda: ImageFolder(root, transform=SMALL, target_transform=_plus_100)  # noqa: E731
    else:
        make = lambda: ImageDataset(str(root), transform=SMALL, target_transform=_plus_100)  # noqa: E731
    reference = make()  # the base's own items, read by the base itself
    cache = SyntheticCache(cache_dir)
    samples = reference.samples if kind == "torchvision" else reference.reader.samples
    files = [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in samples]
    labels = [CLASSES.index(f.split("/")[0]) for f in files]

    real = SyntheticAugmentedDataset(make(), plan, cache, p=0.0)
    assert real.transform is SMALL and real.target_transform is _plus_100
    assert "Transform (the base's)" in repr(real) and "Target transform (the base's)" in repr(real)
    served = [(x, y) for bx, by in DataLoader(real, batch_size=5, num_workers=2) for x, y in zip(bx, by)]
    assert len(served) == len(reference) == len(files)
    for i, (x, y) in enumerate(served):
        rx, ry = reference[i]
        assert torch.equal(x, rx) and int(y) == ry == labels[i] + 100

    synthetic = SyntheticAugmentedDataset(make(), plan, cache, p=1.0, on_miss="error")
    # Every variant of every file, transformed: computed from the plan and the cache directly.
    variants = {}
    for i, f in enumerate(files):
        for v in plan.variants_for(f):
            variants[_key(SMALL(cache.get(v).image))] = (i, v.variant)
    assert len(variants) == len(files) * VARIANTS
    seen = collections.defaultdict(set)
    for _ in range(3):
        batches = DataLoader(synthetic, batch_size=5, num_workers=2)
        out = [(x, y) for bx, by in batches for x, y in zip(bx, by)]
        for i, (x, y) in enumerate(out):
            index, version = variants[_key(x)]  # a KeyError: not a transformed variant
            assert index == i and int(y) == labels[i] + 100
            seen[i].add(version)
    assert any(len(v) > 1 for v in seen.values())  # the variants vary across epochs

    # Given twice: one must go, and the error says which.
    with pytest.raises(InputError, match="drop one, either transform= here .* or the base's"):
        SyntheticAugmentedDataset(make(), plan, cache, p=0.5, transform=SMALL)


@pytest.fixture(scope="module")
def few_shot(setup, tmp_path_factory):
    """A 2-shot plan over the full folder, with its cache."""
    root, _, _ = setup
    work = tmp_path_factory.mktemp("fewshot")
    plan = build_plan(root, variants=2, seed=5, n_shot=2, scores=np.linspace(0.1, 0.9, 2 * len(CLASSES)),
                      models=ModelConfig())
    spec = GenerationSpec(ModelConfig(), IPAdapterConfig(num_inference_steps=2, height=16, width=16))
    cache = SyntheticCache(work / "cache", spec)
    rng = np.random.default_rng(7)
    for variant in plan:
        cache.put(variant, Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)))
    cache.record_spec(plan)
    return plan, work / "cache"


def test_few_shot_plan_over_the_full_folder(setup, few_shot):
    """A --shots 2 plan over a folder of 6 images per class: wrapping the whole folder warns (how
    many items are not in the plan, and the --shots), items="plan" serves the plan's 8 items."""
    root = setup[0]
    plan, cache_dir = few_shot
    planned = sorted({v.source for v in plan})
    assert len(planned) == 2 * len(CLASSES)
    folder = ImageFolder(root)
    files = [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in folder.samples]
    expected_indices = [i for i, f in enumerate(files) if f in planned]

    with pytest.warns(UserWarning) as record:
        whole = SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(cache_dir), p=0.5,
                                          transform=TO_TENSOR, on_miss="error")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert "16 of the 24 items of the base dataset are not in the plan (the plan was made with --shots 2; it " \
           "has 8 of them)" in messages[0] and "items='plan'" in messages[0]
    assert len(whole) == 24

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -W error: nothing to say
        subset = SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(cache_dir), p=0.5,
                                           transform=TO_TENSOR, on_miss="error", items="plan")
    assert len(subset) == len(planned) == subset.num_augmentable
    assert subset.targets == [folder.targets[i] for i in expected_indices]
    assert "items='plan': the plan's 8 of its 24 items" in repr(subset)
    # The helper gives the same indices, found by path; few_shot_indices re-draws the same subset
    # from the labels and the plan's seed (as long as the folder is unchanged).
    assert plan_indices(folder, plan) == expected_indices
    assert few_shot_indices(folder.targets, 2, 5) == expected_indices

    # What comes out: each planned file once per epoch, real or one of its own variants.
    table = {}
    for j, i in enumerate(expected_indices):
        table[_key(TO_TENSOR(Image.open(folder.samples[i][0]).convert("RGB")))] = (j, -1)
        for v in plan.variants_for(files[i]):
            table[_key(TO_TENSOR(SyntheticCache(cache_dir).get(v).image))] = (j, v.variant)
    loader = DataLoader(subset, batch_size=3, shuffle=True, num_workers=2)
    served_all = []
    for _ in range(EPOCHS):
        served = []
        for x, y in loader:
            for xi, yi in zip(x, y):
                j, version = table[_key(xi)]
                assert int(yi) == folder.targets[expected_indices[j]]
                served.append((j, version))
        assert sorted(j for j, _ in served) == list(range(len(planned)))
        served_all += served
    share = sum(v >= 0 for _, v in served_all) / len(served_all)
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / len(served_all))


# -- issue 28: resuming a run gives the uninterrupted run's choices -------------------------------------------
# Each test runs a client uninterrupted, then again interrupted (saved as the client saves, then restored
# into a new dataset object built alike, as a new process would build it) and compares, epoch by epoch,
# which version (real, or variant k) each item got.
RESUME_SEED = 41


def _versions(table, batches):
    """``{index: version}`` of the items in ``batches``."""
    return dict(_served(table, batches))


def _roundtrip(state, tmp_path, name="state.pt"):
    """``state`` as a checkpoint file gives it back: torch.save, then torch.load(weights_only=True)."""
    path = tmp_path / name
    torch.save(state, path)
    return torch.load(path, weights_only=True)


TORCHDATA_VITAL = "ignore:'set_vital' is deprecated"  # torchdata 0.11 calls a torch function torch deprecated


@pytest.mark.filterwarnings(TORCHDATA_VITAL)
@pytest.mark.parametrize("workers, persistent, every", [(0, False, 1), (2, False, 1), (2, True, 3)])
def test_torchdata_stateful_dataloader_resumes_exactly(setup, tmp_path, capfd, workers, persistent, every):
    """torchdata's StatefulDataLoader saves and restores the draw state with no glue (the dataset is
    Stateful): stopped after batch 2 of epoch 1 and restored into a new loader and dataset, every later
    batch serves what the uninterrupted run served, with 0 and with 2 workers (the workers prefetch past
    the saved batch; each worker's share counts only its own served batches). ``every=3``: torchdata
    snapshots every 3 batches and replays the batches since, drawing them again from the restored state."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def run(stop=None, state=None):
        ds = _dataset(setup, seed=RESUME_SEED)
        loader = StatefulDataLoader(ds, batch_size=4, shuffle=True, num_workers=workers,
                                    persistent_workers=persistent, snapshot_every_n_steps=every,
                                    generator=torch.Generator().manual_seed(0),
                                    worker_init_fn=_print_warnings if workers else None)
        start = 0
        if state is not None:
            loader.load_state_dict(state["loader"])
            start = state["epoch"]
        table = _lookup(ds)
        epochs = []
        for epoch in range(start, EPOCHS):
            served = []
            for b, batch in enumerate(loader):
                served += _served(table, [batch])
                if (epoch, b) == stop:
                    return epochs, served, _roundtrip({"loader": loader.state_dict(), "epoch": epoch}, tmp_path)
            epochs.append(served)
        return epochs, None, None

    full, _, _ = run()
    _check_epochs(full, len(_dataset(setup, seed=RESUME_SEED)))
    before, partial, state = run(stop=(1, 2))
    after, _, _ = run(state=state)
    assert before == full[:1]
    assert partial + after[0] == full[1]  # the same items, in the same order, with the same choices
    # Later epochs: the same choice per item (the shuffle after a restore is the loader's business).
    assert [dict(e) for e in after[1:]] == [dict(e) for e in full[2:]]
    assert "draw state of only" not in capfd.readouterr().err  # every worker's share was restored
    if workers == 0:
        # Without the dataset's share of the state, the resumed run starts its counts at 0 again:
        # the rest of epoch 1 gets epoch 0's choices (what issue 28 measured).
        state["loader"]["dataset_state"] = None
        repeated, _, _ = run(state=state)
        assert dict(repeated[0]) != dict(full[1][len(partial):])
        assert dict(repeated[0]) == {i: v for i, v in full[0] if i in dict(repeated[0])}


def test_state_dict_with_workers_counts_the_prefetched_batches(setup):
    """Called in the main process while DataLoader workers run (a plain DataLoader, no torchdata), the
    state counts every draw taken so far: the served batches and at most prefetch_factor x num_workers
    batches fetched ahead, each of whose items is counted one draw early (a resumed run would give
    each such item its next draw instead: a shift of one for those items, nothing else)."""
    ds = _dataset(setup, seed=RESUME_SEED)
    batch_size, workers, prefetch = 2, 2, 2
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, prefetch_factor=prefetch)
    table = _lookup(ds)
    iterator = iter(loader)
    served = [_served(table, [next(iterator)]) for _ in range(3)]
    exact = torch.zeros(len(ds), dtype=torch.int64)
    for batch in served:
        for i, _ in batch:
            exact[i] += 1
    bound = prefetch * workers * batch_size
    deadline = time.monotonic() + 30
    while True:  # the workers fill their prefetch queue in the background
        extra = ds.state_dict()["draws"] - exact
        if int(extra.sum()) >= bound or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert int(extra.min()) >= 0 and int(extra.max()) <= 1
    assert int(extra.sum()) == bound  # the bound is reached, not exceeded
    # The extra draws are the next items in the loader's order, right after the served ones.
    assert torch.nonzero(extra).flatten().tolist() == list(range(3 * batch_size, 3 * batch_size + bound))
    del iterator


def test_plain_loop_resumes_from_the_datasets_state_dict(setup, tmp_path):
    """The plain loop of docs/training.md, without set_epoch: the dataset's state_dict saved with the
    checkpoint at the end of epoch 1 and loaded into a new dataset continues with epochs 2 and 3."""
    def run(start=0, stop=EPOCHS, state=None):
        ds = _dataset(setup, seed=RESUME_SEED)
        if state is not None:
            ds.load_state_dict(state)
        table = _lookup(ds)
        loader = DataLoader(ds, batch_size=5, shuffle=True, num_workers=2, persistent_workers=True)
        epochs = [_versions(table, loader) for _ in range(start, stop)]
        return epochs, _roundtrip(ds.state_dict(), tmp_path)

    full, _ = run()
    _, state = run(stop=2)
    resumed, _ = run(start=2, state=state)
    assert resumed == full[2:]
    assert full[2] != full[0]


def test_load_state_dict_refuses_another_run(setup):
    ds = _dataset(setup, seed=RESUME_SEED)
    state = ds.state_dict()
    with pytest.raises(InputError, match=f"saved by a dataset with seed={RESUME_SEED}, this one has seed=5"):
        _dataset(setup, seed=5).load_state_dict(state)
    with pytest.raises(InputError, match="not a draw state"):
        ds.load_state_dict({"epoch": 3})
    bad = dict(state, draws=state["draws"][:-1])
    with pytest.raises(InputError, match=f"must be {len(ds)} counts"):
        ds.load_state_dict(bad)


def test_set_epoch_back_to_an_epoch_already_served_warns(setup):
    """A resume that pins an epoch lower than the dataset has reached (accelerate's restored loader
    counts its epochs from 0) serves earlier choices again: the dataset says so."""
    ds = _dataset(setup, seed=RESUME_SEED)
    ds.set_epoch(3)
    restored = _dataset(setup, seed=RESUME_SEED)
    restored.load_state_dict(ds.state_dict())
    with pytest.warns(UserWarning, match=r"set_epoch\(0\) after epoch 3 was pinned: epoch 0's choices are served"):
        restored.set_epoch(0)
    unpinned = _dataset(setup, seed=RESUME_SEED)
    for _ in range(2):
        list(DataLoader(unpinned, batch_size=8, num_workers=0))
    with pytest.warns(UserWarning, match=r"set_epoch\(1\) after every item was drawn 2 times unpinned"):
        unpinned.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.set_epoch(3)  # the same epoch again: a replay, on purpose
        ds.set_epoch(4)
        unpinned.set_epoch(2)


def _lightning_fit(setup, max_epochs, seen, callbacks, ckpt_path=None, loader_kwargs=None):
    """Fit a _Recorder-like module on a new dataset built alike; ``seen[epoch]`` collects its batches."""
    ds = _dataset(setup, seed=RESUME_SEED)

    class Module(_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(12 * 12 * 3, len(CLASSES))

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen[self.current_epoch].append((x.clone(), y.clone()))
            return torch.nn.functional.cross_entropy(self.layer(x.float().flatten(1) / 255), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    checkpointing = any(isinstance(c, _lightning.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = _lightning.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                                 enable_checkpointing=checkpointing, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|log_every_n_steps|not empty).*")
        trainer.fit(Module(), DataLoader(ds, **(loader_kwargs or {})), ckpt_path=ckpt_path)
    return ds


@pytest.mark.timeout(300)
def test_lightning_fit_ckpt_path_resumes_exactly_with_the_callback(setup, tmp_path):
    """Trainer.fit(ckpt_path=...) with SyntheticEpochCallback: the resumed epochs 2 and 3 serve what
    the uninterrupted run served, with 2 persistent workers (Lightning starts the first iterator before
    on_train_epoch_start; the callback pins the resumed epoch when the checkpoint is loaded)."""
    if _lightning is None:
        pytest.skip("lightning is not installed")
    from dalda_aug.integrations.lightning import SyntheticEpochCallback

    loader_kwargs = dict(batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    seen = collections.defaultdict(list)
    ds = _lightning_fit(setup, EPOCHS, seen, [SyntheticEpochCallback()], loader_kwargs=loader_kwargs)
    table = _lookup(ds)
    full = [_versions(table, seen[e]) for e in range(EPOCHS)]
    assert full == [_pinned(ds, e) for e in range(EPOCHS)]
    seen.clear()
    # Interrupted after epoch 1: the checkpoint ModelCheckpoint wrote at its end.
    saver = _lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    _lightning_fit(setup, 2, seen, [SyntheticEpochCallback(), saver], loader_kwargs=loader_kwargs)
    seen.clear()
    saver = _lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)  # as when created
    _lightning_fit(setup, EPOCHS, seen, [SyntheticEpochCallback(), saver], ckpt_path=tmp_path / "epoch=1-step=12.ckpt",
                   loader_kwargs=loader_kwargs)
    assert sorted(seen) == [2, 3]
    assert [_versions(table, seen[e]) for e in (2, 3)] == full[2:]


def test_lightning_callback_finds_wrapped_datasets_and_warns_without_one(setup):
    if _lightning is None:
        pytest.skip("lightning is not installed")
    from dalda_aug.integrations import find_datasets
    from dalda_aug.integrations.lightning import SyntheticEpochCallback

    a, b = _dataset(setup, seed=1), _dataset(setup, seed=2)
    nested = {"x": DataLoader(ConcatDataset([torch.utils.data.Subset(a, [0, 1]), b])), "y": [DataLoader(a)]}
    assert find_datasets(nested) == [a, b]

    class Plain(_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = _lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False,
                                 callbacks=[SyntheticEpochCallback()])
    data = torch.utils.data.TensorDataset(torch.zeros(4, 2))
    with pytest.warns(UserWarning, match="SyntheticEpochCallback found no SyntheticAugmentedDataset"):
        trainer.fit(Plain(), DataLoader(data, batch_size=2))


def test_ignite_checkpoint_resumes_exactly_with_attach_epoch(setup, tmp_path):
    """ignite: a Checkpoint of the trainer saved after epoch 2 (ignite counts from 1) and loaded
    into a new Engine over a new dataset: with attach_epoch, epochs 3 and 4 serve what the
    uninterrupted run served."""
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, DiskSaver

    from dalda_aug.integrations.ignite import attach_epoch

    def run(folder, stop=None, resume=None):
        ds = _dataset(setup, seed=RESUME_SEED)
        seen = collections.defaultdict(list)
        engine = Engine(lambda engine, batch: seen[engine.state.epoch].append(batch))
        attach_epoch(engine, ds)
        saver = Checkpoint({"trainer": engine}, DiskSaver(tmp_path / folder), n_saved=None,
                           global_step_transform=lambda engine, _: engine.state.epoch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, saver)
        if stop is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED(once=stop), lambda engine: engine.terminate())
        if resume is not None:
            Checkpoint.load_objects({"trainer": engine}, torch.load(resume, weights_only=True))
        engine.run(DataLoader(ds, batch_size=4, shuffle=True, num_workers=2), max_epochs=EPOCHS)
        table = _lookup(ds)
        return {epoch: _versions(table, batches) for epoch, batches in seen.items()}, ds

    full, ds = run("full")
    assert [full[e] for e in range(1, EPOCHS + 1)] == [_pinned(ds, e) for e in range(EPOCHS)]
    run("stopped", stop=2)
    resumed, _ = run("resumed", resume=tmp_path / "stopped" / "trainer_2.pt")
    assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == [full[3], full[4]]


def test_accelerate_save_state_and_skip_first_batches_resume_exactly(setup, tmp_path):
    """accelerate: save_state mid-epoch 1, then load_state and skip_first_batches in a new Accelerator
    over a new dataset; with the documented line (``loader.set_epoch(epoch); train.set_epoch(epoch)``
    before each epoch) every resumed batch serves what the uninterrupted run served."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    def run(stop=None, resume=None):
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        train = _dataset(setup, seed=RESUME_SEED)
        model = accelerator.prepare(torch.nn.Linear(2, 2))
        loader = accelerator.prepare(DataLoader(train, batch_size=4, shuffle=True, num_workers=2))
        table = _lookup(train)
        start, skip = 0, 0
        if resume is not None:
            accelerator.load_state(resume)
            start, skip = resume_at
        epochs = {}
        for epoch in range(start, EPOCHS):
            loader.set_epoch(epoch)
            train.set_epoch(epoch)
            active = accelerator.skip_first_batches(loader, skip) if epoch == start and skip else loader
            served = []
            for step, batch in enumerate(active):
                served += _served(table, [batch])
                if (epoch, step) == stop:
                    accelerator.save_state(tmp_path / "state")
                    epochs[epoch] = served
                    return epochs
            epochs[epoch] = served
        del model
        return epochs

    full = run()
    resume_at = (1, 3)  # after batches 0..2 of epoch 1
    before = run(stop=(1, 2))
    resumed = run(resume=tmp_path / "state")
    assert before[0] == full[0] and before[1] == full[1][:12]
    assert resumed[1] == full[1][12:]
    assert [dict(resumed[e]) for e in (2, 3)] == [dict(full[e]) for e in (2, 3)]


@pytest.mark.timeout(300)
def test_hf_trainer_resume_from_checkpoint_is_exact(setup, tmp_path):
    """Hugging Face Trainer: resumed from a checkpoint saved mid-epoch 1 (checkpoint-9: 3 of its 6
    batches done) into a new Trainer over a new dataset, the rest of the run serves what the
    uninterrupted run served. The docs' callback pins ``int(state.epoch)`` when each epoch begins
    (Trainer hands its epoch to accelerate's loader; the loader that skips a resumed epoch's done
    batches passes it to its sampler only, and without the callback serves other choices)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    steps_per_epoch = len(_dataset(setup, seed=RESUME_SEED)) // 4

    def run(resume=None):
        train = _dataset(setup, seed=RESUME_SEED)
        seen = []

        class PinEpoch(TrainerCallback):  # as docs/training.md prints it
            def on_epoch_begin(self, args, state, control, **kwargs):
                train.set_epoch(int(state.epoch or 0))

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(12 * 12 * 3, len(CLASSES))

            def forward(self, pixel_values, labels):
                seen.append((pixel_values.clone(), labels.clone()))
                logits = self.layer(pixel_values.float().flatten(1) / 255)
                return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

        def collate(items):
            return {"pixel_values": torch.stack([x for x, _ in items]), "labels": torch.tensor([y for _, y in items])}

        args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                 num_train_epochs=EPOCHS, save_strategy="steps", save_steps=3, use_cpu=True,
                                 report_to="none", logging_strategy="no", disable_tqdm=True, seed=0,
                                 dataloader_num_workers=2)
        trainer = Trainer(model=Tiny(), args=args, train_dataset=train, data_collator=collate,
                          callbacks=[PinEpoch()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
        table = _lookup(train)
        return _served(table, seen), train

    full, train = run()
    per_step = 4
    epochs = [full[e * steps_per_epoch * per_step:(e + 1) * steps_per_epoch * per_step] for e in range(EPOCHS)]
    assert [dict(e) for e in epochs] == [_pinned(train, e) for e in range(EPOCHS)]
    resumed, _ = run(resume=str(tmp_path / "out" / "checkpoint-9"))
    assert resumed == full[9 * per_step:]


def test_timm_create_loader_resumes_at_an_epoch_with_set_epoch(setup):
    """timm: a create_loader loop that calls set_epoch (timm's train.py does, and --resume restores
    its epoch), restarted at epoch 2 over a new dataset, serves epochs 2 and 3 as the uninterrupted
    run did."""
    from timm.data import create_loader

    def run(start):
        train = _dataset(setup, transform=None, seed=RESUME_SEED)
        loader = create_loader(train, input_size=(3, 12, 12), batch_size=4, is_training=True, no_aug=True, hflip=0.0,
                               use_prefetcher=False, num_workers=2, crop_pct=1.0)
        table = _lookup(train)
        epochs = []
        for epoch in range(start, EPOCHS):
            train.set_epoch(epoch)
            epochs.append(_versions(table, loader))
        return epochs, train

    full, train = run(0)
    assert full == [_pinned(train, e) for e in range(EPOCHS)]
    resumed, _ = run(2)
    assert resumed == full[2:]


def test_distributed_sampler_padding_repeats_the_choice_with_set_epoch(setup, monkeypatch):
    """24 items over 5 ranks: DistributedSampler pads with one item served twice, on two ranks. With
    set_epoch the copy gets the original's choice (by design, docs/training.md); every other item
    is served once with its pinned choice."""
    world = 5
    for epoch in range(3):
        served = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            ds = _dataset(setup, seed=RESUME_SEED)  # one dataset object per rank, as in DDP
            ds.set_epoch(epoch)
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            served += _served(_lookup(ds), DataLoader(ds, batch_size=5, sampler=sampler))
        counts = collections.Counter(i for i, _ in served)
        twice = [i for i, c in counts.items() if c == 2]
        assert len(served) == 25 and len(twice) == 1 and len(counts) == 24
        versions = {v for i, v in served if i == twice[0]}
        assert len(versions) == 1
        assert dict(served) == _pinned(ds, epoch)


def test_a_probe_read_shifts_only_its_item(setup):
    """fastai's DataLoaders.from_dsets reads item 0 once to learn the types: an access like any other.
    Without set_epoch item 0's draws move on by one (each still a fresh draw), no other item changes;
    set_epoch before the epoch removes the trace."""
    plain, probed = _dataset(setup, seed=RESUME_SEED), _dataset(setup, seed=RESUME_SEED)
    table = _lookup(plain)
    probed[0]  # the probe
    first = [_versions(table, DataLoader(d, batch_size=6)) for d in (plain, probed)]
    second = [_versions(table, DataLoader(d, batch_size=6)) for d in (plain, probed)]
    assert {i: v for i, v in first[1].items() if i} == {i: v for i, v in first[0].items() if i}
    assert first[1][0] == second[0][0]  # item 0's first training draw is "epoch 1"'s
    pinned = _dataset(setup, seed=RESUME_SEED)
    pinned[0]
    pinned.set_epoch(0)
    assert _versions(table, DataLoader(pinned, batch_size=6)) == first[0]


def _print_warnings(worker_id):
    """A worker_init_fn: print the worker's warnings to stderr (a forked worker inherits pytest's
    recording of warnings, which the test process never sees)."""
    def show(message, category, filename, lineno, file=None, line=None):
        os.write(2, f"{category.__name__}: {message}\n".encode())

    warnings.showwarning = show


@pytest.mark.filterwarnings(TORCHDATA_VITAL)
def test_restoring_only_some_workers_shares_warns(setup, capfd):
    """A StatefulDataLoader state in which one worker's share of the draw state is missing (saved
    before the dataset was Stateful, or edited): the first draw after the restore says that the other
    workers' draws will be taken again (printed by the DataLoader worker)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(ds, **kwargs):
        return StatefulDataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                                  generator=torch.Generator().manual_seed(0), **kwargs)

    first = loader(_dataset(setup, seed=RESUME_SEED))
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    del iterator
    state["_snapshot"]["_worker_snapshots"]["worker_1"]["dataset_state"] = None
    resumed = loader(_dataset(setup, seed=RESUME_SEED), worker_init_fn=_print_warnings)
    resumed.load_state_dict(state)
    assert len([b for b in resumed]) == len(first) - 3
    said = capfd.readouterr().err
    assert "the draw state of only 1 of the 2 DataLoader workers it was saved with was restored" in said


@pytest.mark.timeout(300)
def test_lightning_callback_warns_when_workers_drew_before_it_could_pin(setup, tmp_path):
    """A dataset built inside train_dataloader() is out of the callback's reach when the checkpoint is
    loaded; Lightning starts the resumed fit's iterator before on_train_epoch_start, and its workers
    draw the first batches for epoch 0: the callback says so."""
    if _lightning is None:
        pytest.skip("lightning is not installed")
    from dalda_aug.integrations.lightning import SyntheticEpochCallback

    built = []

    class Module(_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(12 * 12 * 3, len(CLASSES))

        def train_dataloader(self):
            built.append(_dataset(setup, seed=RESUME_SEED))
            return DataLoader(built[-1], batch_size=4, num_workers=2)

        def on_train_start(self):
            deadline = time.monotonic() + 30  # the workers started by the iterator fetch meanwhile
            while not int(built[-1].state_dict()["draws"].sum()) and time.monotonic() < deadline:
                time.sleep(0.05)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.layer(batch[0].float().flatten(1) / 255), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(max_epochs, ckpt_path=None, callback=None):
        trainer = _lightning.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                                     enable_model_summary=False, enable_checkpointing=False,
                                     callbacks=[callback or SyntheticEpochCallback()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Module(), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / "run.ckpt")
        return [str(w.message) for w in caught if "before SyntheticEpochCallback pinned" in str(w.message)]

    assert fit(1) == []  # a fresh run: the early draws are epoch 0's, as pinned
    said = fit(2, ckpt_path=tmp_path / "run.ckpt")
    assert len(said) == 1 and "drawn for epoch 0 before SyntheticEpochCallback pinned epoch 1" in said[0]


def test_accelerate_restored_loader_counting_from_0_warns(setup, tmp_path):
    """accelerate, without the documented line: the dataset's state saved with the run
    (register_for_checkpointing) and restored, the new prepared loader pins epoch 0 again when it is
    iterated; the dataset says that epoch 0's choices are served again."""
    from accelerate import Accelerator

    def prepared():
        accelerator = Accelerator(cpu=True)
        train = _dataset(setup, seed=RESUME_SEED)
        accelerator.register_for_checkpointing(train)
        return accelerator, train, accelerator.prepare(DataLoader(train, batch_size=6, shuffle=True))

    accelerator, train, loader = prepared()
    for _ in range(2):
        list(loader)
    accelerator.save_state(tmp_path / "state")
    accelerator, restored, loader = prepared()
    accelerator.load_state(tmp_path / "state")
    assert restored.epoch == 1 and torch.equal(restored.state_dict()["draws"], train.state_dict()["draws"])
    with pytest.warns(UserWarning, match=r"set_epoch\(0\) after epoch 1 was pinned: epoch 0's choices are served"):
        list(loader)
