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
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from dalda_aug.cache import GenerationSpec, SyntheticCache
from dalda_aug.config import ModelConfig
from dalda_aug.dataset import SyntheticAugmentedDataset
from dalda_aug.generation import GenerationConfig
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
    spec = GenerationSpec(ModelConfig(), GenerationConfig(num_inference_steps=2, height=16, width=16))
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
        ds = _dataset(setup)
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
    unpinned = _dataset(setup)
    table = _lookup(unpinned)
    loader = DataLoader(unpinned, batch_size=4, num_workers=2, persistent_workers=True)
    run = [dict(_served(table, loader)) for _ in range(e + 1)]
    pinned_run = _dataset(setup)
    for epoch in range(e + 1):
        pinned_run.set_epoch(epoch)
        last = dict(_served(table, DataLoader(pinned_run, batch_size=4, num_workers=0)))
    fresh = _dataset(setup)
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
