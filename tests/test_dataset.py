"""SyntheticAugmentedDataset on tiny models and a real diskcache (plus the GeneratorPool)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import signal
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from torchvision.datasets import DatasetFolder, ImageFolder

from dalda_aug.cache import GenerationSpec, GeneratorFactory, SyntheticCache
from dalda_aug.dataset import BaseAdapter, CacheMissError, SyntheticAugmentedDataset, register_base_adapter, source_ids
from dalda_aug.dataset.bases import ADAPTERS, FolderAdapter, GenericAdapter, adapter_for
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.generators.base import GenerationRequest
from dalda_aug.plan import build_plan
from dalda_aug.dataset.pool import GeneratorPool, PoolError
from dalda_aug.cache.warm import warm

from helpers import assert_workers_name_the_file, bomb_png

CLASSES = ["ant", "bee", "cat"]
PER_CLASS = 3
VARIANTS = 3
TO_TENSOR = T.Compose([T.Resize((24, 24)), T.PILToTensor()])



def _write_folder(root):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (20 + i, 28 + c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_models):
    root = _write_folder(tmp_path_factory.mktemp("data") / "folder")
    n = len(CLASSES) * PER_CLASS
    plan = build_plan(root, variants=VARIANTS, seed=1, scores=np.linspace(0.05, 0.95, n), models=tiny_models)
    spec = GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")
    return root, plan, spec


@pytest.fixture(scope="module")
def generator(data):
    return data[2].make_generator("cpu").load()


@pytest.fixture(scope="module")
def warm_cache(data, generator, tmp_path_factory):
    root, plan, spec = data
    cache = SyntheticCache(tmp_path_factory.mktemp("warm") / "cache", spec)
    report = warm(plan, cache, generator=generator, batch_size=4, progress=False)
    assert report.generated == len(plan)
    return cache


def _dataset(data, cache, **kwargs):
    root, plan, _ = data
    kwargs.setdefault("transform", TO_TENSOR)
    return SyntheticAugmentedDataset(ImageFolder(root), plan, cache, **kwargs)


def _tensor(image):
    return TO_TENSOR(image)


def _rgb_loader(path):
    with open(path, "rb") as fh:
        return Image.open(fh).convert("RGB")


# -- the torchvision contract ----------------------------------------------------------------------
def test_p0_equals_imagefolder(data, warm_cache):
    root = data[0]
    reference = ImageFolder(root, transform=TO_TENSOR)
    ds = _dataset(data, warm_cache, p=0.0)
    assert len(ds) == len(reference)
    assert ds.classes == reference.classes and ds.class_to_idx == reference.class_to_idx
    assert ds.targets == reference.targets
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, y = ds[i]
            rx, ry = reference[i]
            assert y == ry and torch.equal(x, rx)


def test_p1_every_item_synthetic_with_its_label(data, warm_cache):
    reference = ImageFolder(data[0], transform=TO_TENSOR)
    ds = _dataset(data, warm_cache, p=1.0, on_miss="error", target_transform=lambda y: y + 100)
    for i in range(len(ds)):
        x, y = ds[i]
        variant = ds.choose(i)
        assert variant is not None and variant in data[1].variants_for(source_ids(ds.base)[i])
        assert y == reference.targets[i] + 100 and variant.label == reference.targets[i]
        assert torch.equal(x, _tensor(warm_cache.get(variant).image))
        assert not torch.equal(x, reference[i][0])


def test_substitution_rate_and_uniform_variants(data, warm_cache):
    ds = _dataset(data, warm_cache, p=0.3, seed=7)
    counts = np.zeros(VARIANTS, dtype=int)
    synthetic = draws = 0
    for epoch in range(400):
        for i in range(len(ds)):
            draws += 1
            v = ds.choose(i, epoch)
            if v is not None:
                synthetic += 1
                counts[v.variant] += 1
    rate = synthetic / draws
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / draws)
    expected = synthetic / VARIANTS
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # __getitem__ follows choose(): a synthetic item equals its cached variant.
    ds.set_epoch(5)
    for i in range(len(ds)):
        v = ds.choose(i)
        if v is not None:
            assert torch.equal(ds[i][0], _tensor(warm_cache.get(v).image))


def test_choices_depend_on_seed_epoch_index_only(data, warm_cache):
    a = _dataset(data, warm_cache, p=0.5, seed=3)
    b = _dataset(data, warm_cache, p=0.5, seed=3)
    c = _dataset(data, warm_cache, p=0.5, seed=4)
    pick = lambda ds, e: [ds.choose(i, e) for i in range(len(ds))]  # noqa: E731
    assert pick(a, 0) == pick(b, 0)
    assert any(pick(a, e) != pick(a, 0) for e in range(1, 4))
    assert any(pick(a, e) != pick(c, e) for e in range(4))


def _epochs(ds, num_workers, epochs=(0, 1, 2), persistent=False):
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=num_workers,
                        persistent_workers=persistent and num_workers > 0)
    out = []
    for epoch in epochs:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"set_epoch\(\d+\) after", category=UserWarning)
            ds.set_epoch(epoch)  # the same epochs again, on purpose
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def test_same_choices_with_0_and_2_workers(data, warm_cache):
    ds = _dataset(data, warm_cache, p=0.5, seed=11, on_miss="error")
    serial = _epochs(ds, 0)
    for persistent in (False, True):
        parallel = _epochs(ds, 2, persistent=persistent)
        for e, (s_batches, p_batches) in enumerate(zip(serial, parallel)):
            for (sx, sy), (px, py) in zip(s_batches, p_batches):
                assert torch.equal(sx, px) and torch.equal(sy, py), (persistent, e)
    # ...and the epochs differ.
    flat = [torch.cat([x for x, _ in batches]) for batches in serial]
    assert not torch.equal(flat[0], flat[1]) or not torch.equal(flat[1], flat[2])


# -- misses -------------------------------------------------------------------------------------
def test_on_miss_error_and_real(data, tmp_path):
    empty = SyntheticCache(tmp_path / "empty", data[2])
    reference = ImageFolder(data[0], transform=TO_TENSOR)
    with pytest.raises(CacheMissError, match="not in"):
        _dataset(data, empty, p=1.0, on_miss="error")[0]
    with pytest.warns(UserWarning, match="does not exist"):
        ds = _dataset(data, empty, p=1.0, on_miss="real")
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x, reference[i][0]) and y == reference.targets[i]
    with pytest.raises(InputError, match="pool"):
        _dataset(data, empty, p=1.0, on_miss="wait")[0]


def test_on_miss_generate_with_generator_instance(data, generator, tmp_path):
    cache = SyntheticCache(tmp_path / "c", data[2])
    ds = _dataset(data, cache, p=1.0, on_miss="generate", generator=generator)
    x, _ = ds[4]
    variant = ds.choose(4)
    assert variant in cache
    source = ds.base[4][0]
    expected = generator.generate([GenerationRequest(source, variant.prompt, variant.lam, variant.seed)])[0]
    assert torch.equal(x, _tensor(expected))
    ds.set_epoch(0)  # the same draw again
    assert torch.equal(ds[4][0], x)  # now a cache hit
    assert len(cache) == 1


def test_on_miss_generate_in_dataloader_workers_with_factory(data, tmp_path):
    cache = SyntheticCache(tmp_path / "c", data[2])
    factory = GeneratorFactory(data[2], "cpu")
    ds = _dataset(data, cache, p=1.0, on_miss="generate", generator=factory)
    batches = list(DataLoader(Subset(ds, [0, 4, 8]), batch_size=1, num_workers=2))
    assert len(batches) == 3
    assert len(cache) == 3
    for i, (x, _) in zip([0, 4, 8], batches):
        assert torch.equal(x[0], _tensor(cache.get(ds.choose(i)).image))


def test_corrupt_entry_is_regenerated(data, generator, tmp_path):
    import diskcache

    root, plan, spec = data
    cache = SyntheticCache(tmp_path / "c", spec)
    ds = _dataset(data, cache, p=1.0, on_miss="generate", generator=generator)
    first, _ = ds[2]
    variant = ds.choose(2)
    key = cache.key(variant)
    with diskcache.Cache(str(cache.directory / f"shard-{cache.shard}")) as raw:
        blob = raw[key]
        raw[key] = blob[:-10]  # damaged image bytes
    ds.set_epoch(0)  # the same draw again: the same (now damaged) variant
    again, _ = ds[2]
    assert cache.corrupt_removed == 1
    assert torch.equal(again, first)  # regenerated: same seed, same pixels
    assert cache.get(variant) is not None and cache.verify()["bad"] == []


# -- pickling and construction -----------------------------------------------------------------------
def test_pickles_small_without_models(data, warm_cache, generator):
    ds = _dataset(data, warm_cache, p=0.5, generator=generator)
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 64 * 1024
    assert b"UNet2DConditionModel" not in blob and b"sqlite3" not in blob
    clone = pickle.loads(blob)
    assert isinstance(clone._generator, GeneratorFactory)
    assert [clone.choose(i) for i in range(len(ds))] == [ds.choose(i) for i in range(len(ds))]
    assert torch.equal(clone[3][0], ds[3][0])


def test_construction_loads_nothing_and_validates(data, warm_cache, tmp_path):
    root, plan, spec = data

    def exploding_factory():
        raise AssertionError("a model was built")

    ds = SyntheticAugmentedDataset(ImageFolder(root), plan, warm_cache, generator=exploding_factory)
    ds[0]  # warm cache: no miss, no model
    text = repr(ds)
    assert "p=0.5" in text and "on_miss='generate'" in text and str(len(ds)) in text
    # A stock ImageFolder may keep its transform (see test_clients); given twice, one must go.
    with pytest.raises(InputError, match="transform was given both to the base ImageFolder and to "
                                         "SyntheticAugmentedDataset: drop one"):
        SyntheticAugmentedDataset(ImageFolder(root, transform=TO_TENSOR), plan, warm_cache, transform=TO_TENSOR)
    with pytest.raises(InputError, match="target_transform was given both"):
        SyntheticAugmentedDataset(ImageFolder(root, target_transform=int), plan, warm_cache, target_transform=int)
    # A base read through its own loader keeps today's rule: no transform on the base.
    custom = DatasetFolder(str(root), loader=_rgb_loader, extensions=(".png",), transform=TO_TENSOR)
    with pytest.raises(InputError, match=r"the base dataset \(DatasetFolder\) has a transform; create it with "
                                         "transform=None"):
        SyntheticAugmentedDataset(custom, plan, warm_cache)
    with pytest.raises(InputError, match="items must be one of"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, warm_cache, items="few-shot")
    with pytest.raises(InputError, match="seed must be an integer >= 0 or None"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, warm_cache, seed=-1)
    with pytest.raises(InputError, match="p must be"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, warm_cache, p=1.5)
    with pytest.raises(InputError, match="on_miss"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, warm_cache, on_miss="skip")
    with pytest.raises(InputError, match="does not exist.*GenerationSpec"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(tmp_path / "x"))
    other = _write_folder(tmp_path / "other")
    for f in (other / "ant").iterdir():
        f.rename(other / "ant" / f"renamed_{f.name}")
    for name in ("bee", "cat"):
        for f in (other / name).iterdir():
            f.rename(other / name / f"renamed_{f.name}")
    with pytest.raises(InputError, match="none of the 9 items.*looked for ImageFolder file paths relative to its "
                                         "root .*'ant/renamed_img_0.png'.*'ant/img_0.png'.*source_ids="):
        SyntheticAugmentedDataset(ImageFolder(other), plan, warm_cache)
    other_spec = dataclasses.replace(spec, dtype="float16")
    with pytest.raises(InputError, match="fingerprint"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, warm_cache, generator=other_spec.make_generator())


def test_subset_and_plain_datasets(data, warm_cache):
    root, plan, _ = data
    folder = ImageFolder(root)
    subset = Subset(folder, [8, 1, 5])
    ds = SyntheticAugmentedDataset(subset, plan, warm_cache, p=1.0, on_miss="error", transform=TO_TENSOR)
    assert ds.targets == [folder.targets[i] for i in (8, 1, 5)]
    for j, i in enumerate((8, 1, 5)):
        assert ds.choose(j).source == source_ids(folder)[i]
        assert ds[j][1] == folder.targets[i]


class _Album(torch.utils.data.Dataset):
    """A dataset class of one's own: photos decoded into memory, newest file name first, each with the
    file it came from in ``files`` and its label in ``labels`` (no ``samples``, no ``targets``)."""

    def __init__(self, root):
        self.root = root
        self.files = sorted(root.glob("*/*.png"), key=lambda f: (f.name, f.parent.name), reverse=True)
        self.labels = [CLASSES.index(f.parent.name) for f in self.files]
        self.images = []
        for f in self.files:
            with Image.open(f) as image:
                self.images.append(image.convert("RGB"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.images[index].copy(), self.labels[index]


class _AlbumAdapter(BaseAdapter):
    kind = "album"

    @classmethod
    def matches(cls, dataset):
        return isinstance(dataset, _Album)

    def source_ids(self, root=None):
        return [f.relative_to(self.dataset.root).as_posix() for f in self.dataset.files], "album files"

    def targets(self):
        return list(self.dataset.labels)

    def item_file(self, index):
        return str(self.dataset.files[index])


@pytest.fixture
def adapters():
    """The registry as the test found it, restored afterwards (a registration lasts for the process)."""
    saved = dict(ADAPTERS)
    yield ADAPTERS
    ADAPTERS.clear()
    ADAPTERS.update(saved)


def test_a_registered_adapter_serves_a_dataset_class_of_ones_own(data, warm_cache, adapters):
    root, plan, _ = data
    album = _Album(root)
    expected_sources = [f"{f.parent.name}/{f.name}" for f in album.files]  # the plan's ids: folder-relative paths
    assert sorted(expected_sources) == sorted(plan.sources()) and expected_sources != plan.sources()
    # unregistered, the generic kind names its items by index, which the plan does not list
    with pytest.raises(InputError, match="none of the 9 items.*item indices"):
        SyntheticAugmentedDataset(album, plan, warm_cache, p=1.0)
    assert register_base_adapter(_AlbumAdapter) is _AlbumAdapter
    assert list(adapters) == ["subset", "folder", "timm", "huggingface", "album", "generic"]
    assert type(adapter_for(album)) is _AlbumAdapter and type(adapter_for([(1, 0)])) is GenericAdapter

    ds = SyntheticAugmentedDataset(album, plan, warm_cache, p=1.0, on_miss="error", transform=TO_TENSOR)
    assert ds.targets == album.labels
    for i in range(len(ds)):
        x, y = ds[i]
        variant = ds.choose(i)
        assert variant.source == expected_sources[i] and variant in plan.variants_for(expected_sources[i])
        assert y == album.labels[i] == variant.label
        assert torch.equal(x, _tensor(warm_cache.get(variant).image))  # the cached synthetic pixels
    real = SyntheticAugmentedDataset(album, plan, warm_cache, p=0.0, transform=TO_TENSOR)
    assert all(torch.equal(real[i][0], _tensor(album.images[i])) and real[i][1] == album.labels[i]
               for i in range(len(real)))
    # a Subset of it goes through the subset kind to the registered one
    part = SyntheticAugmentedDataset(Subset(album, [4, 0]), plan, warm_cache, p=1.0, on_miss="error")
    assert [part.choose(j).source for j in range(2)] == [expected_sources[4], expected_sources[0]]
    assert [part[j][1] for j in range(2)] == [album.labels[4], album.labels[0]]


def test_register_base_adapter_keeps_first_match_order_and_refuses_bad_adapters(data, adapters):
    folder = ImageFolder(data[0])

    class ListingAdapter(BaseAdapter):  # accepts what the folder kind accepts too
        kind = "listing"

        @classmethod
        def matches(cls, dataset):
            return isinstance(dataset, ImageFolder)

    class EarlyListingAdapter(ListingAdapter):
        kind = "early-listing"

    register_base_adapter(ListingAdapter)
    assert type(adapter_for(folder)) is FolderAdapter  # the first kind that accepts it wins
    register_base_adapter(EarlyListingAdapter, before="folder")
    assert list(adapters) == ["subset", "early-listing", "folder", "timm", "huggingface", "listing", "generic"]
    assert type(adapter_for(folder)) is EarlyListingAdapter
    assert type(adapter_for(Subset(folder, [0])).innermost()) is EarlyListingAdapter

    class NoKind(BaseAdapter):
        @classmethod
        def matches(cls, dataset):
            return False

    class NoMatches(BaseAdapter):
        kind = "no-matches"

    class Folder2(ListingAdapter):
        kind = "folder"

    before = list(adapters)
    for bad, kwargs, message in (
        (lambda dataset: None, {}, "needs a subclass of dalda_aug.dataset.bases.BaseAdapter, got <function"),
        (Subset, {}, "needs a subclass of dalda_aug.dataset.bases.BaseAdapter, got <class 'torch.utils"),
        (_AlbumAdapter(None), {}, "needs a subclass"),
        (NoKind, {}, "NoKind names no kind of its own"),
        (Folder2, {}, "kind 'folder' of Folder2 is taken \\(by FolderAdapter\\)"),
        (ListingAdapter, {}, "kind 'listing' of ListingAdapter is taken"),
        (NoMatches, {}, "NoMatches does not define matches"),
        (_AlbumAdapter, {"before": "albums"}, "before='albums'\\): no such kind; the kinds are \\['subset'"),
    ):
        with pytest.raises(InputError, match=message):
            register_base_adapter(bad, **kwargs)
        assert list(adapters) == before  # nothing was added


# -- the GPU worker pool (CPU workers here) ------------------------------------------------------------
def test_pool_wait_and_real(data, tmp_path):
    root, plan, spec = data
    cache = SyntheticCache(tmp_path / "c", spec)
    reference = ImageFolder(root, transform=TO_TENSOR)
    with GeneratorPool(cache, devices=["cpu"], batch_size=4, start_timeout=300, torch_threads=1) as pool:
        waiting = _dataset(data, cache, p=1.0, on_miss="wait", pool=pool, wait_timeout=300)
        x, y = waiting[0]
        assert torch.equal(x, _tensor(cache.get(waiting.choose(0)).image)) and y == reference.targets[0]
        # Through DataLoader workers (the handle is shared with them).
        for (bx, _), i in zip(DataLoader(Subset(waiting, [1, 2]), batch_size=1, num_workers=2), (1, 2)):
            assert torch.equal(bx[0], _tensor(cache.get(waiting.choose(i)).image))

        with pytest.warns(UserWarning, match="synthetic variants of the plan are cached"):  # 3 of 27 so far
            real = _dataset(data, cache, p=1.0, on_miss="real", pool=pool)
        x, _ = real[6]
        assert torch.equal(x, reference[6][0])  # the real item now...
        pool.wait(real.choose(6), timeout=300)  # ...and the variant is being generated
        real.set_epoch(0)  # the same draw again: now a cache hit
        assert torch.equal(real[6][0], _tensor(cache.get(real.choose(6)).image))
    assert pool.handle().state == "closed"
    assert all(not p.is_alive() for p in pool.processes)


def test_pool_worker_exception_is_reported(data, tmp_path):
    root, plan, spec = data
    broken = dataclasses.replace(spec, models=dataclasses.replace(spec.models, base=str(tmp_path / "no-such-model")))
    cache = SyntheticCache(tmp_path / "c", broken)
    with GeneratorPool(cache, devices=["cpu"]) as pool:
        ds = SyntheticAugmentedDataset(ImageFolder(root), plan, cache, p=1.0, on_miss="wait", pool=pool,
                                       wait_timeout=300)
        started = time.monotonic()
        with pytest.raises(PoolError, match="no-such-model") as info:
            ds[0]
        assert "Traceback" in str(info.value)
        assert time.monotonic() - started < 120


def test_pool_killed_worker_is_reported(data, tmp_path):
    root, plan, spec = data
    cache = SyntheticCache(tmp_path / "c", spec)
    with GeneratorPool(cache, devices=["cpu"], start_timeout=300, torch_threads=1) as pool:
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        ds = _dataset(data, cache, p=1.0, on_miss="wait", pool=pool, wait_timeout=300)
        with pytest.raises(PoolError, match="exited with code -9"):
            ds[0]


# -- the cache describes itself; nothing degrades silently --------------------------------------------
def test_spec_less_cache_serves_the_recorded_spec(data, warm_cache):
    root, plan, spec = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full coverage: no warning
        ds = SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(warm_cache.directory), p=1.0,
                                       on_miss="error", transform=TO_TENSOR)
    assert ds.cache.spec == spec and ds.cached_variants == ds.planned_variants == len(plan)
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], _tensor(warm_cache.get(ds.choose(i)).image))


def test_coverage_warning_names_the_specs(data, warm_cache):
    root, plan, spec = data
    other = dataclasses.replace(spec, config=dataclasses.replace(spec.config, num_inference_steps=3))
    with pytest.warns(UserWarning) as record:
        ds = SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(warm_cache.directory, other), p=1.0,
                                       on_miss="real")
    text = str(record[0].message)
    assert f"0/{len(plan)} synthetic variants" in text and other.fingerprint in text
    assert f"fingerprint {spec.fingerprint} ({len(plan)} of these variants)" in text
    assert ds.cached_variants == 0
    # Other policies do not fall back to real images, but a spec that misses what warm's spec
    # holds (e.g. restated settings that differ) is still said: on_miss="generate" would redo it all.
    with pytest.warns(UserWarning, match=f"on_miss='generate'.*Warm the cache"):
        SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(warm_cache.directory, other), p=1.0,
                                  on_miss="generate")
    # ...and a partly warm cache under the right spec is no news for them.
    partial = SyntheticCache(warm_cache.directory.parent / "partial", spec)
    for variant in list(plan)[:5]:
        partial.put(variant, warm_cache.get(variant).image)
    partial.record_spec(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = SyntheticAugmentedDataset(ImageFolder(root), plan, SyntheticCache(partial.directory), p=1.0,
                                       on_miss="error")
    assert ds.cached_variants == 5


def test_changed_source_is_refused(data, warm_cache, tmp_path):
    root, plan, _ = data
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    SyntheticAugmentedDataset(ImageFolder(copy), plan, warm_cache)  # same pixels elsewhere: fine
    changed = copy / "bee" / "img_1.png"
    pixels = np.asarray(Image.open(changed)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(changed)
    with pytest.raises(InputError, match=f"{changed}.*changed since the plan was made.*re-plan"):
        SyntheticAugmentedDataset(ImageFolder(copy), plan, warm_cache)
    SyntheticAugmentedDataset(ImageFolder(copy), plan, warm_cache, p=0.0)  # never synthetic: not checked


# -- any base dataset ----------------------------------------------------------------------------------
def _served_versions(ds):
    """Per item: -1 if the real image came out, else the variant index (from the tensors)."""
    out = []
    for i in range(len(ds)):
        x, _ = ds[i]
        real = _tensor(ds._base_item(i)[0])
        if torch.equal(x, real):
            out.append(-1)
            continue
        out.append(next(v.variant for v in ds.variants_for(i) if torch.equal(x, _tensor(ds.cache.get(v).image))))
    return out


def _reference_versions(data, warm_cache, p=0.5):
    ds = _dataset(data, warm_cache, p=p, seed=5, on_miss="error")
    return ds, _served_versions(ds)


def test_timm_image_dataset_base(data, warm_cache):
    from timm.data import ImageDataset

    root, plan, _ = data
    reference, expected = _reference_versions(data, warm_cache)
    ds = SyntheticAugmentedDataset(ImageDataset(str(root)), plan, warm_cache, p=0.5, seed=5, on_miss="error",
                                   transform=TO_TENSOR)
    assert ds.targets == reference.targets and ds.classes == reference.classes
    assert ds.class_to_idx == reference.class_to_idx
    assert source_ids(ds.base) == source_ids(reference.base)
    assert _served_versions(ds) == expected and set(expected) != {-1}


def test_hugging_face_imagefolder_base(data, warm_cache, tmp_path):
    datasets = pytest.importorskip("datasets")

    root, plan, _ = data
    reference, expected = _reference_versions(data, warm_cache)
    hf = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(hf[0], dict)
    ds = SyntheticAugmentedDataset(hf, plan, warm_cache, p=0.5, seed=5, on_miss="error", transform=TO_TENSOR)
    # HF may order the files differently: compare item by item through the source ids.
    ids = source_ids(hf, root)
    order = [source_ids(reference.base).index(source) for source in ids]
    assert ds.classes == reference.classes
    assert ds.targets == [reference.targets[j] for j in order]
    assert ds.num_augmentable == len(ds)
    versions = _served_versions(ds)
    assert set(versions) != {-1}
    # p = 0: (image, label) pairs, not the dict's keys.
    plain = SyntheticAugmentedDataset(hf, plan, warm_cache, p=0.0, transform=TO_TENSOR)
    x, y = plain[0]
    assert isinstance(x, torch.Tensor) and y == reference.targets[order[0]]
    assert torch.equal(x, _tensor(reference.base[order[0]][0]))


def test_explicit_source_ids_and_item_shapes(data, warm_cache):
    root, plan, _ = data
    reference, expected = _reference_versions(data, warm_cache)
    folder = ImageFolder(root)
    pairs = [(Image.open(path).convert("RGB"), label) for path, label in folder.samples]
    with pytest.raises(InputError, match="none of the 9 items.*looked for item indices.*source_ids="):
        SyntheticAugmentedDataset(pairs, plan, warm_cache)
    ds = SyntheticAugmentedDataset(pairs, plan, warm_cache, p=0.5, seed=5, on_miss="error", transform=TO_TENSOR,
                                   source_ids=source_ids(folder))
    assert _served_versions(ds) == expected
    with pytest.raises(InputError, match="source_ids= lists 2 ids"):
        SyntheticAugmentedDataset(pairs, plan, warm_cache, source_ids=["a", "b"])
    tensors = [(TO_TENSOR(image), label) for image, label in pairs]
    with pytest.raises(InputError, match="item 0 of the base dataset holds a Tensor"):
        SyntheticAugmentedDataset(tensors, plan, warm_cache, source_ids=source_ids(folder))
    with pytest.raises(InputError, match="item 0 of the base dataset is a dict with keys"):
        SyntheticAugmentedDataset([{"pixels": 1}] * 9, plan, warm_cache, source_ids=source_ids(folder))
    with pytest.raises(InputError, match="item 0 of the base dataset is a Image"):
        SyntheticAugmentedDataset([image for image, _ in pairs], plan, warm_cache, source_ids=source_ids(folder))


@pytest.mark.parametrize("kind", ["custom loader", "timm"])
def test_a_decompression_bomb_read_by_the_base_names_the_file(kind, data, tmp_path):
    # Issue 18 point 6: a base that reads its own files (a custom loader, a timm ImageDataset not in
    # RGB mode) lets PIL's DecompressionBombError (not an OSError) through, naming no file.
    from timm.data import ImageDataset

    root, plan, spec = data
    folder = tmp_path / "folder"
    shutil.copytree(root, folder)
    bomb = bomb_png(folder / CLASSES[-1] / "zz_bomb.png")  # the last item
    if kind == "timm":
        base = ImageDataset(str(folder), input_img_mode="L")
    else:
        base = DatasetFolder(str(folder), loader=_rgb_loader, extensions=(".png",))
    with pytest.warns(UserWarning, match="1 of the 10 items"):
        ds = SyntheticAugmentedDataset(base, plan, SyntheticCache(tmp_path / "cache", spec), p=0.0, seed=0)
    # Its own generator: the test leaves torch's global one as it found it (later tests draw seeds from it).
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda batch: batch,
                        generator=torch.Generator().manual_seed(0))
    assert_workers_name_the_file(loader, ds, bomb, "MAX_IMAGE_PIXELS", len(ds) - 1)
