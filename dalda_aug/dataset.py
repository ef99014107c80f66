"""Training-time mixing of real and synthetic images: :class:`SyntheticAugmentedDataset`.

DALDA's training recipe: with probability ``p`` an item is replaced by one of its M planned
variants, chosen uniformly; the label and the train transform stay the same. The wrapper
follows torchvision's dataset contract (``(sample, target)``, ``classes``, ``class_to_idx``,
``targets``, ``transform``/``target_transform``) and can stand in for the base dataset in any
training loop::

    base = torchvision.datasets.ImageFolder("data/pets-1shot")          # transform=None
    cache = SyntheticCache("cache/", GenerationSpec(models, GenerationConfig(), "float16"))
    train = SyntheticAugmentedDataset(base, plan, cache, p=0.5, transform=train_tf, on_miss="real")
    for epoch in range(50):
        train.set_epoch(epoch)
        for x, y in DataLoader(train, batch_size=32, shuffle=True, num_workers=8): ...

Reproducibility: whether item ``i`` is synthetic and which variant it gets are a hash of
``(seed, epoch, i)`` — no global RNG — so the choices are the same with 0, 2 or 8 DataLoader
workers and differ between epochs. The epoch lives in a shared-memory tensor, so
:meth:`set_epoch` reaches persistent DataLoader workers too.

Misses (a chosen variant not in the cache), by ``on_miss``:

``"generate"``  generate it now, in this process, with ``generator`` (an
                :class:`~dalda_aug.generation.IPAdapterGenerator` or a zero-argument factory,
                built lazily in each worker process), then cache it;
``"wait"``      ask the attached :class:`~dalda_aug.pool.GeneratorPool` and wait for it
                (``wait_timeout``); a crashed pool raises instead of hanging;
``"real"``      return the real item now, and ask the pool (if attached) to generate it;
``"error"``     raise :class:`CacheMissError`.

The dataset never loads a model at construction, never touches CUDA and pickles small: no
model, no open SQLite handle (the cache reopens itself per process).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from .cache import GenerationSpec, GeneratorFactory, SyntheticCache
from .data import image_sha256, to_rgb
from .errors import DaldaError, InputError

__all__ = ["SyntheticAugmentedDataset", "CacheMissError", "ON_MISS", "source_ids"]

ON_MISS = ("generate", "wait", "real", "error")


class CacheMissError(DaldaError, LookupError):
    """A chosen synthetic variant is not in the cache and ``on_miss="error"``."""


def source_ids(dataset: Any) -> list[Any]:
    """Plan source id of every item of ``dataset``.

    Folder datasets (torchvision ``ImageFolder``/``DatasetFolder``: ``samples`` and ``root``)
    give each file's POSIX path relative to the root, as :func:`~dalda_aug.plan.build_plan`
    records it; a ``torch.utils.data.Subset`` maps through its indices; any other dataset
    gives its indices.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        inner = source_ids(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    root = getattr(dataset, "root", None)
    if samples is not None and root is not None:
        root = os.path.abspath(os.fspath(root))
        return [Path(os.path.relpath(os.path.abspath(path), root)).as_posix() for path, *_ in samples]
    return list(range(len(dataset)))


def _base_targets(dataset: Any) -> list[int] | None:
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _base_targets(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(t) for t in targets]


def _base_attr(dataset: Any, name: str) -> Any:
    while True:
        if hasattr(dataset, name):
            return getattr(dataset, name)
        if isinstance(dataset, torch.utils.data.Subset):
            dataset = dataset.dataset
            continue
        return None


class SyntheticAugmentedDataset(Dataset):
    """Replace each item of ``base``, with probability ``p``, by one of its planned variants.

    Args:
        base: the real dataset, giving ``(PIL image, label)``; typically a torchvision
            ``ImageFolder`` (or a ``Subset`` of one) created *without* a transform — the
            wrapper applies ``transform`` to real and synthetic images alike.
        plan: an :class:`~dalda_aug.plan.AugmentationPlan` (or its folder). Item ``i`` maps
            to the plan source ``base.samples[i][0]`` relative to ``base.root`` for folder
            datasets, else to ``i``. Items absent from the plan are always real.
        cache: a :class:`~dalda_aug.cache.SyntheticCache` with the
            :class:`~dalda_aug.cache.GenerationSpec` the images were (or will be) made with.
        p: probability that an item is synthetic (0 gives exactly the base's items).
        transform, target_transform: applied to the image and the label of every item.
        on_miss: ``"generate"``, ``"wait"``, ``"real"`` or ``"error"`` (see module doc).
        generator: for ``"generate"``: an ``IPAdapterGenerator`` or a zero-argument factory
            returning one; default a CPU generator built from the cache's spec.
        seed: seed of the substitution choices.
        pool: a :class:`~dalda_aug.pool.GeneratorPool` (or its handle) for ``"wait"`` and
            ``"real"``; also settable later with :meth:`attach_pool`.
        wait_timeout: seconds ``"wait"`` waits for one image.
    """

    def __init__(
        self,
        base: Any,
        plan: Any,
        cache: SyntheticCache,
        p: float = 0.5,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        on_miss: str = "generate",
        generator: Any = None,
        seed: int = 0,
        *,
        pool: Any = None,
        wait_timeout: float = 600.0,
    ):
        from .plan import AugmentationPlan

        if isinstance(plan, (str, os.PathLike)):
            plan = AugmentationPlan.load(plan)
        if not isinstance(plan, AugmentationPlan):
            raise InputError(f"plan must be an AugmentationPlan or a plan folder, got {type(plan).__name__}")
        if not isinstance(cache, SyntheticCache):
            raise InputError(f"cache must be a SyntheticCache, got {type(cache).__name__}")
        if cache.spec is None:
            raise InputError("the cache needs a GenerationSpec (SyntheticCache(dir, spec)) to find the plan's images")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise InputError(f"p must be a probability in [0, 1], got {p!r}")
        if on_miss not in ON_MISS:
            raise InputError(f"on_miss must be one of {list(ON_MISS)}, got {on_miss!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {seed!r}")
        if wait_timeout <= 0:
            raise InputError(f"wait_timeout must be > 0, got {wait_timeout!r}")
        for attr in ("transform", "target_transform"):
            if _base_attr(base, attr) is not None:
                raise InputError(
                    f"the base dataset has a {attr}; create it with {attr}=None and give the {attr} to "
                    "SyntheticAugmentedDataset, which applies it to real and synthetic items alike"
                )
        if generator is not None and not (hasattr(generator, "generate") or callable(generator)):
            raise InputError(f"generator must be an IPAdapterGenerator or a factory, got {type(generator).__name__}")
        if generator is not None and hasattr(generator, "generate") and hasattr(generator, "models"):
            theirs = GenerationSpec.of(generator).fingerprint
            if theirs != cache.spec.fingerprint:
                raise InputError(
                    f"the generator's settings (fingerprint {theirs}) differ from the cache's spec "
                    f"({cache.spec.fingerprint}): its images would not match their cache keys"
                )

        self.base = base
        self.cache = cache
        self.p = float(p)
        self.transform = transform
        self.target_transform = target_transform
        self.on_miss = on_miss
        self.seed = int(seed)
        self.wait_timeout = float(wait_timeout)
        self._generator = generator
        self._generator_pid: int | None = None
        self._built = None  # the generator a factory made in this process
        self._pool = None
        if pool is not None:
            self.attach_pool(pool)
        self._plan_repr = repr(plan)
        # The epoch is shared memory: set_epoch() reaches persistent DataLoader workers.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

        # Per item: the variants it may become (plan order) and their cache keys.
        ids = source_ids(base)
        if len(ids) != len(base):
            raise InputError(f"the base dataset has {len(base)} items but lists {len(ids)} samples")
        targets = _base_targets(base)
        self._targets = targets
        by_source = plan.by_source()
        self._options: list[tuple[Any, ...]] = []
        self._keys: list[tuple[str, ...]] = []
        matched = 0
        for index, source in enumerate(ids):
            variants = tuple(by_source.get(source, ()))
            if variants:
                matched += 1
                if targets is not None and variants[0].label != targets[index]:
                    raise InputError(
                        f"item {index} ({source!r}) has label {targets[index]} in the dataset but "
                        f"{variants[0].label} ({variants[0].class_name!r}) in the plan: do they list classes alike?"
                    )
            self._options.append(variants)
            self._keys.append(tuple(cache.spec.key(v) for v in variants))
        if matched == 0 and self.p > 0:
            raise InputError(
                f"none of the {len(ids)} items of the base dataset is a source of the plan "
                f"({len(by_source)} sources, e.g. {next(iter(by_source), None)!r}; the dataset's first "
                f"item is {ids[0] if ids else None!r}): is it the dataset the plan was made from?"
            )
        #: Number of base items that have planned variants.
        self.num_augmentable = matched

    # -- torchvision dataset contract -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._options)

    @property
    def classes(self) -> list[str] | None:
        return _base_attr(self.base, "classes")

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        return _base_attr(self.base, "class_to_idx")

    @property
    def targets(self) -> list[int]:
        if self._targets is None:
            self._targets = [int(self.base[i][1]) for i in range(len(self.base))]
        return self._targets

    def __repr__(self) -> str:
        lines = [
            f"Number of datapoints: {len(self)} ({self.num_augmentable} with synthetic variants)",
            f"Base: {type(self.base).__name__}" + (f" at {self.base.root}" if hasattr(self.base, "root") else ""),
            f"Plan: {self._plan_repr}",
            f"Cache: {self.cache!r}",
            f"p={self.p}, on_miss={self.on_miss!r}, seed={self.seed}, epoch={self.epoch}"
            + (f", pool={self._pool!r}" if self._pool is not None else ""),
        ]
        if self.transform is not None:
            lines.append("Transform: " + repr(self.transform).replace("\n", "\n    "))
        if self.target_transform is not None:
            lines.append("Target transform: " + repr(self.target_transform).replace("\n", "\n    "))
        return f"{type(self).__name__}\n    " + "\n    ".join(lines)

    # -- randomness ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose substitution choices to use (call before each epoch)."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise InputError(f"epoch must be an integer >= 0, got {epoch!r}")
        self._epoch.fill_(int(epoch))

    def variants_for(self, index: int) -> tuple[Any, ...]:
        """The plan variants item ``index`` may be replaced by."""
        return self._options[index]

    def choose(self, index: int, epoch: int | None = None):
        """The variant that replaces item ``index`` in ``epoch`` (default: the current one), or None."""
        position = self._position(index, epoch)
        return None if position is None else self._options[index][position]

    def _position(self, index: int, epoch: int | None = None) -> int | None:
        """Which of item ``index``'s variants it becomes, or None (real).

        A pure function of ``(seed, epoch, index)``: a 128-bit hash gives a uniform draw
        u in [0, 1) (synthetic when u < p) and the variant's position among the item's M.
        """
        options = self._options[index]
        if not options or self.p <= 0.0:
            return None
        epoch = self.epoch if epoch is None else int(epoch)
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:{index}".encode(), digest_size=16).digest()
        if int.from_bytes(digest[:8], "big") / 2.0**64 >= self.p:
            return None
        return int.from_bytes(digest[8:], "big") % len(options)

    # -- items ----------------------------------------------------------------------------------
    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} items")
        position = self._position(index)
        image = self._synthetic(index, position) if position is not None else None
        if image is None:
            image, target = self.base[index]
        else:  # the plan's label is the base's (checked at construction when the base lists targets)
            target = self._targets[index] if self._targets is not None else self._options[index][position].label
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _synthetic(self, index: int, position: int):
        """The cached image of variant ``position`` of item ``index``; a miss is handled by
        ``on_miss`` (None: use the real item)."""
        variant, key = self._options[index][position], self._keys[index][position]
        entry = self.cache.get(key)
        if entry is not None:
            return entry.image
        if self.on_miss == "error":
            raise CacheMissError(
                f"variant {variant.variant} of {variant.source!r} (key {key}) is not in {self.cache.directory}; "
                "warm the cache first (dalda-aug warm) or use on_miss='generate'/'wait'/'real'"
            )
        if self.on_miss == "real":
            if self._pool is not None:
                self._pool.submit(key, variant, self._source_image(index, variant))
            return None
        if self.on_miss == "wait":
            if self._pool is None:
                raise InputError("on_miss='wait' needs a generator pool: pass pool= or call attach_pool()")
            self._pool.submit(key, variant, self._source_image(index, variant), force=True)
            return self._pool.wait(key, self.cache, timeout=self.wait_timeout).image
        # "generate": now, in this process, then cache it.
        from .generation import GenerationRequest

        source = self._source_image(index, variant)
        generator = self._get_generator()
        image = generator.generate([GenerationRequest(source, variant.prompt, variant.lam, variant.seed)],
                                   batch_size=1)[0]
        self.cache.put(variant, image)
        return image

    def _source_image(self, index: int, variant: Any):
        """The real image of item ``index``, checked against the plan's content hash."""
        image = to_rgb(self.base[index][0], f"item {index}")
        if image_sha256(image) != variant.source_sha256:
            raise InputError(
                f"item {index} ({variant.source!r}) is not the image the plan was made from (content hash differs); "
                "re-plan after changing the dataset"
            )
        return image

    def _get_generator(self):
        generator = self._generator
        if generator is None:
            generator = self._generator = GeneratorFactory(self.cache.spec, "cpu")
        if hasattr(generator, "generate"):
            return generator
        # A factory: build once per process.
        if self._generator_pid != os.getpid() or self._built is None:
            self._built = generator()
            self._generator_pid = os.getpid()
        return self._built

    # -- pool and pickling -------------------------------------------------------------------------
    def attach_pool(self, pool: Any) -> None:
        """Use ``pool`` (a GeneratorPool or its handle) for ``on_miss="wait"`` and ``"real"``."""
        from .pool import GeneratorPool, PoolHandle

        if isinstance(pool, GeneratorPool):
            if pool.cache.spec.fingerprint != self.cache.spec.fingerprint:
                raise InputError("the pool generates with other settings than the dataset's cache spec")
            pool = pool.handle()
        if pool is not None and not isinstance(pool, PoolHandle):
            raise InputError(f"pool must be a GeneratorPool or PoolHandle, got {type(pool).__name__}")
        self._pool = pool

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_built"] = None
        state["_generator_pid"] = None
        generator = state.get("_generator")
        if generator is not None and hasattr(generator, "generate"):
            # Never ship a model: workers rebuild the same generator from its settings.
            device = str(getattr(generator, "device", "cpu"))
            state["_generator"] = GeneratorFactory(GenerationSpec.of(generator), device)
        return state
