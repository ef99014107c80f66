"""Training-time mixing of real and synthetic images: :class:`SyntheticAugmentedDataset`.

DALDA's training recipe: with probability ``p`` an item is replaced by one of its M planned
variants, chosen uniformly; the label and the train transform stay the same. The wrapper
follows torchvision's dataset contract (``(sample, target)``, ``classes``, ``class_to_idx``,
``targets``, ``transform``/``target_transform``) and stands in for the base dataset in any
training loop, with no glue::

    base = torchvision.datasets.ImageFolder("data/pets", train_tf)      # or transform=None
    cache = SyntheticCache("cache/")                                    # the spec warm recorded
    train = SyntheticAugmentedDataset(base, plan, cache, p=0.5, on_miss="real", items="plan")
    for epoch in range(50):
        for x, y in DataLoader(train, batch_size=32, shuffle=True, num_workers=8): ...

Choices: every access of an item is a fresh seeded draw (real, or which variant). The n-th
access of item ``i`` is a hash of ``(seed, n, i)`` — no global RNG at draw time — counted per
item in shared memory, so the choices change from epoch to epoch with no ``set_epoch`` call (Lightning,
samplers that only get ``sampler.set_epoch``, timm's multi-epoch loader), repeated draws of an
item within an epoch (sampling with replacement) are independent, and the choices do not depend
on the number of DataLoader workers (persistent or not, fork or spawn). :meth:`set_epoch` is
optional and pins epoch ``e`` exactly: it resets the counts, the first access of each item is
then the draw of epoch ``e`` — the same as epoch ``e`` of a run through epochs 0..e that drew
each item once per epoch, with or without ``set_epoch`` — and further accesses within the epoch
are fresh draws of their own. Under DDP each rank counts its own accesses; a rank other than 0
adds its rank to the draws that are not an epoch's first, so ranks never repeat each other.
``seed=None`` (the default) draws the seed from torch's global generator at construction, as
``RandomSampler`` draws its shuffling seed: ``torch.manual_seed(s)`` before construction
reproduces a run, two datasets built alike (``ConcatDataset([a, b])``, to oversample) choose
independently, and the seed drawn is ``ds.seed`` and shows in ``repr``. The counts are run state:
:meth:`state_dict`/:meth:`load_state_dict` (torchdata's ``Stateful``) carry them into a resumed
process, exactly also through ``StatefulDataLoader`` workers, and ``set_epoch`` to an epoch the
dataset has already passed warns (docs/training.md, *Resuming a run*).

Which items: every item of the base (``items="all"``; items whose source the plan lacks are
always real, and a ``UserWarning`` says how many, e.g. a ``--shots N`` plan over the full folder),
or only those whose source is in the plan (``items="plan"``, the plan's few-shot subset);
:func:`plan_indices` gives the base's indices of the plan's sources. A plan ``dalda-aug filter``
derived may cover sources whose variants it all rejected
(:meth:`~dalda_aug.plan.AugmentationPlan.sources_without_variants`): their items are in the plan
(``items="plan"`` keeps them) and always served real; ``unkept_items`` counts them, ``repr``
shows the count and construction warns once.

Base datasets: torchvision ``ImageFolder``/``DatasetFolder`` (and ``Subset`` of them), timm
``ImageDataset`` (file paths from its reader), Hugging Face ``datasets`` image folders (dict
items with ``image``/``label``; paths from the image column), or any dataset of
``(image, label)`` with ``source_ids=`` naming each item's plan source (plans made from an
in-memory dataset use indices). A dataset class of one's own can name its items' sources and labels
through an adapter, :func:`register_base_adapter` (:mod:`~dalda_aug.dataset.bases`).

Real images: every real image served, every reference image handed to the generator and every
content hash go through one conversion, :func:`~dalda_aug.data.to_rgb` (the plan's): 8-bit RGB,
transparency composited on white, 16-bit images scaled to 8 bits. torchvision's stock loader
instead calls ``convert("RGB")``, which drops transparency (what lies under transparent pixels
shows) and clips 16-bit values (a nearly white image), so for an ``ImageFolder``/``DatasetFolder``
base with that loader, and a timm ``ImageDataset`` over a folder (whose retry loop would otherwise
serve the next file in place of an unreadable one), the dataset reads each item's file itself with
:func:`~dalda_aug.data.load_image`; for RGB, grey, CMYK and opaque palette files this gives
exactly ``ImageFolder``'s pixels. A base with a custom loader is read through that loader.
Because the dataset reads those files itself, such a base may keep the ``transform`` and
``target_transform`` it was created with (torchvision's reference ``train.py`` builds
``ImageFolder(traindir, transform)``): the dataset adopts them as its own and applies them to real
and synthetic images alike. Any other base must be created without them.
A file that cannot be read (truncated, corrupt) raises :class:`~dalda_aug.errors.ImageError`
(an ``OSError``) naming it, also from DataLoader workers.

At construction the dataset checks every planned source against the plan's content hash and
measures how much of the plan the cache holds (:mod:`~dalda_aug.dataset.checks`). A miss (a chosen
variant not in the cache) is handled by the ``on_miss`` policy (:mod:`~dalda_aug.dataset.misses`):
``"generate"`` (now, in this process), ``"wait"`` (for the attached pool), ``"real"`` or ``"error"``.

The dataset never loads a model at construction, never touches CUDA and pickles small: no
model, no open SQLite handle (the cache reopens itself per process).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .bases import (
    BaseAdapter, SubsetAdapter, adopt_transforms, adapter_for, check_item_shape, plan_indices, register_base_adapter,
    source_ids, unwrap,
)
from ..cache import GenerationSpec, GeneratorFactory, SyntheticCache
from ..data import image_sha256, load_image, to_rgb
from .checks import (
    ITEMS, ON_MISS, VERIFY_SOURCES, check_arguments, check_generator, check_sources, measure_coverage, mismatch,
)
from .misses import MISS_POLICIES
from .draws import STATE_FORMAT, DrawCounter, check_state, draw_name, draw_seed, pick, unlink_lock
from ..errors import CacheMissError, DaldaError, ImageError, InputError  # CacheMissError: importable from here too
from ..plan.variant import SourceView

__all__ = ["SyntheticAugmentedDataset", "CacheMissError", "ON_MISS", "ITEMS", "VERIFY_SOURCES", "source_ids",
           "plan_indices", "BaseAdapter", "register_base_adapter"]



class SyntheticAugmentedDataset(Dataset[tuple[Any, Any]]):
    """Replace each item of ``base``, with probability ``p``, by one of its planned variants.

    Args:
        base: the real dataset: torchvision ``ImageFolder`` / ``DatasetFolder`` (or a
            ``Subset``), timm ``ImageDataset``, a Hugging Face ``datasets`` image dataset (dict
            items with an image and a label column), or any dataset of ``(PIL image, label)``.
            Created without a transform, except where the dataset reads the files itself (a
            torchvision folder with the stock loader, a timm ``ImageDataset`` over a folder):
            there the base's ``transform``/``target_transform`` become the dataset's, applied to
            real and synthetic images alike.
        plan: an :class:`~dalda_aug.plan.AugmentationPlan` (or its folder). Items absent from
            the plan are always real (see ``items``).
        cache: a :class:`~dalda_aug.cache.SyntheticCache`; without a spec, the one ``warm``
            recorded in its folder for this plan is used (an explicit spec wins).
        p: probability that an access is synthetic (0 gives the base's items, as RGB images
            converted like the plan's sources: see the module doc).
        transform, target_transform: applied to the image and the label of every item
            (default: the base's, where it may keep them; giving both is an ``InputError``).
        on_miss: ``"generate"``, ``"wait"``, ``"real"`` or ``"error"`` (see module doc).
        generator: for ``"generate"``: an ``IPAdapterGenerator`` or a zero-argument factory
            returning one; default a CPU generator built from the cache's spec.
        seed: seed of the substitution choices; None (default) draws one from torch's global
            generator at construction (so ``torch.manual_seed`` before construction reproduces
            a run, and two datasets built alike choose independently); it is ``self.seed``.
        source_ids: the plan source of every item of ``base`` (default :func:`source_ids`:
            file paths for folder, timm and Hugging Face datasets, else indices).
        pool: a :class:`~dalda_aug.dataset.pool.GeneratorPool` (or its handle) for ``"wait"`` and
            ``"real"``; also settable later with :meth:`attach_pool`.
        wait_timeout: seconds ``"wait"`` waits for one image.
        items: ``"all"`` (default) serves every item of ``base`` (a ``UserWarning`` at
            construction when some are not in the plan: they are always real); ``"plan"`` serves
            only those whose source is in the plan (:func:`plan_indices`), e.g. the few-shot
            subset of a plan made with ``--shots N`` over the full folder.
        verify_sources: how construction checks the planned sources against the plan's content
            hashes: ``"stat"`` (default) decodes only the files whose ``(size, mtime_ns, inode,
            ctime_ns)`` changed since they last matched (a :class:`~dalda_aug.plan.records.StatRecord` in
            ``$DALDA_AUG_CACHE/stat``, as git's index; bases the dataset does not read from files
            are decoded in full), ``"full"`` decodes every source, ``"off"`` checks nothing.

    Raises:
        InputError: bad arguments, an item shape other than ``(image, label)`` or an
            image/label dict, no item of ``base`` in the plan, labels that disagree with the
            plan, a planned source whose pixels changed since planning, a base with a transform
            it may not keep, or a transform given both to the base and here.
    """

    def __init__(
        self,
        base: Any,
        plan: Any,
        cache: SyntheticCache,
        p: float = 0.5,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        on_miss: str = "generate",
        generator: Any = None,
        seed: int | None = None,
        *,
        source_ids: Sequence[Any] | None = None,
        pool: Any = None,
        wait_timeout: float = 600.0,
        items: str = "all",
        verify_sources: str = "stat",
    ) -> None:
        plan = check_arguments(base, plan, cache, p, on_miss, seed, items, wait_timeout)
        if verify_sources not in VERIFY_SOURCES:
            raise InputError(f"verify_sources must be one of {list(VERIFY_SOURCES)}, got {verify_sources!r}")
        self.verify_sources = verify_sources
        n = len(base)
        targets, paths = self._adapt_base(base, n)
        transform, target_transform, self._adopted = adopt_transforms(self._adapter, paths is not None, transform,
                                                                      target_transform)
        self._hf_columns: tuple[str, str] | None = self._adapter.columns()
        check_generator(generator)

        self.base, self.p, self.on_miss, self.items = base, float(p), on_miss, items
        self.transform, self.target_transform = transform, target_transform
        #: The seed of the choices (drawn at construction when ``seed=None``; in ``repr``).
        self.seed = draw_seed(seed)
        self.wait_timeout = float(wait_timeout)
        self._generator = generator
        self._generator_pid: int | None = None
        self._built = None  # the generator a factory made in this process
        self._pool: Any = None
        self._plan_repr = repr(plan)
        self._plan = plan
        self._view = SourceView(plan.columns)  # the plan read per source
        # Whether the dataset reads each item's file itself (adapter.stock_path), with the plan's conversion.
        self._reads_files = paths is not None
        if n > 0 and paths is None:
            check_item_shape(base[0], self._hf_columns)

        item_source, matched = self._match_plan(plan, n, targets, source_ids)
        self._select_items(plan, item_source, matched, targets)
        missing_folder = self._adopt_cache(plan, cache, generator)
        if pool is not None:
            self.attach_pool(pool)
        sizes = plan.columns.group_sizes()
        self.planned_variants = int(sizes[self._item_source[self._item_source >= 0]].sum())
        self.cached_variants: int | None = None  # measured below when p > 0
        # Whether construction counted every planned variant cached; a miss then is news (warned once).
        self._all_cached = False
        if self.p > 0 and matched:
            if paths is not None and self.base is not base:  # items="plan": the kept items' paths
                paths = [paths[int(i)] for i in self.base.indices]
            check_sources(self, paths)
            measure_coverage(self, plan, missing_folder)
        self._adapter.release()
        self._start_counting()

    # -- construction steps -----------------------------------------------------------------------
    def _adapt_base(self, base: Any, n: int) -> tuple[list[int] | None, list[str] | None]:
        """Pick the base's adapter (:func:`~dalda_aug.dataset.bases.adapter_for`); its labels where it lists
        them, and the files this dataset reads itself with the plan's conversion (torchvision folder
        bases with the stock loader, a timm ImageDataset over a folder: the base's __getitem__ is
        never called for them), else None."""
        self._adapter = adapter_for(base)
        targets = self._adapter.targets()
        paths = self._adapter.stock_paths()
        if paths is not None and (targets is None or len(paths) != n):
            paths = None
        return targets, paths

    def _match_plan(self, plan: Any, n: int, targets: list[int] | None, source_ids: Sequence[Any] | None
                    ) -> tuple[Any, int]:
        """``(each item's plan source number or -1, how many items have one)``; labels that
        disagree with the plan, or no item in the plan where one is needed, are an :class:`InputError`."""
        if source_ids is not None:
            ids = list(source_ids)
            looked_for = "the source_ids= given"
            if len(ids) != n:
                raise InputError(f"source_ids= lists {len(ids)} ids for a base dataset of {n} items")
        else:
            ids, looked_for = self._adapter.source_ids(plan.data_root)
            if len(ids) != n:
                raise InputError(f"the base dataset has {n} items but lists {len(ids)} samples")
        index_of = {source: s for s, source in enumerate(plan.columns.sources())}  # plan.source_index(), in bulk
        # a derived plan's sources whose variants were all rejected (dalda-aug filter): -2, in the
        # plan's items but always served real
        index_of.update({source: -2 for source in plan.sources_without_variants() if source not in index_of})
        item_source = np.array([index_of.get(source, -1) for source in ids], dtype=np.int32).reshape(-1)
        matched = int((item_source >= 0).sum())
        #: Items of a source the plan covers without a variant (a filter rejected them all): always real.
        self.unkept_items = int((item_source == -2).sum())
        if targets is not None and matched:
            cols = plan.columns.arrays
            first_rows = cols["order"][cols["group_start"][:-1]]
            planned = np.flatnonzero(item_source >= 0)
            plan_labels = cols["label"][first_rows[item_source[planned]]]
            wrong = planned[plan_labels != np.asarray(targets, dtype=np.int64)[planned]]
            if wrong.size:
                index = int(wrong[0])
                first = plan.source_variants(int(item_source[index]))[0]
                raise InputError(
                    f"item {index} ({ids[index]!r}) has label {targets[index]} in the dataset but "
                    f"{first.label} ({first.class_name!r}) in the plan: do they list classes alike?"
                )
        if self.unkept_items:
            warnings.warn(
                f"{self.unkept_items} items of the base dataset have a source that kept no variant in this filtered "
                f"plan ({len(plan.sources_without_variants())} such sources): they are always served real",
                UserWarning, stacklevel=3)
        if matched == 0 and (self.p > 0 or self.items == "plan"):
            example = plan.columns.source(0) if plan.columns.n_sources else None
            raise InputError(
                f"none of the {n} items of the base dataset is a source of the plan: looked for {looked_for} "
                f"(the first is {ids[0] if ids else None!r}) among the plan's {len(index_of)} sources "
                f"(e.g. {example!r}, data_root {plan.data_root!r}); is it the dataset the plan was made from? "
                "Otherwise pass source_ids= with each item's plan source"
            )
        return item_source, matched

    def _select_items(self, plan: Any, item_source: Any, matched: int, targets: list[int] | None) -> None:
        """Keep the items served: with ``items="plan"`` only the plan's (the base becomes a
        ``Subset``), else all of them, warning when the plan covers only some."""
        n = len(item_source)
        n_shot = plan.config.get("n_shot")
        made = f"the plan was made with --shots {n_shot}; " if n_shot is not None else ""
        in_plan = int((item_source != -1).sum())  # with the sources a filter left without variants
        if self.items == "plan" and in_plan < n:
            keep = np.flatnonzero(item_source != -1)
            self.base = torch.utils.data.Subset(self.base, keep.tolist())
            self._adapter = SubsetAdapter(self.base)
            item_source = item_source[keep]
            targets = None if targets is None else [targets[i] for i in keep]
            self._base_len: int | None = n
        else:
            self._base_len = None
            if 0 < in_plan < n:
                warnings.warn(
                    f"{n - in_plan} of the {n} items of the base dataset are not in the plan ({made}it has "
                    f"{in_plan} of them): they are always served real, so training sees the whole base dataset, "
                    f"not the plan's subset. Pass items='plan' to serve only the plan's {in_plan} items (or "
                    "wrap the base in Subset(base, dalda_aug.dataset.plan_indices(base, plan)))",
                    UserWarning, stacklevel=3)
        # Per item, arrays only (no object per item or variant): its labels and plan source number.
        self._targets: Any = None if targets is None else np.asarray(targets, dtype=np.int64).reshape(-1)
        self._item_source = item_source
        #: Number of items that have planned variants.
        self.num_augmentable = matched
        self._root = self._adapter.root() or plan.data_root

    def _adopt_cache(self, plan: Any, cache: SyntheticCache, generator: Any) -> bool:
        """Give the cache its spec (the one ``warm`` recorded for this plan when it has none) and
        compute every variant's key; a generator with other settings is an :class:`InputError`.
        Returns whether the cache folder is missing."""
        spec = cache.spec
        missing_folder = not cache.directory.is_dir()
        if spec is None and self.p > 0 and not (missing_folder and self.on_miss == "real"):
            spec = cache.resolve_spec(plan)  # InputError naming the folder and what it holds
        if spec is not None and cache.spec is None:
            cache = cache.with_spec(spec)
        self.cache = cache
        if generator is not None and spec is not None and hasattr(generator, "generate") \
                and hasattr(generator, "models"):
            theirs = GenerationSpec.of(generator).fingerprint
            if theirs != spec.fingerprint:
                raise InputError(
                    f"the generator's settings (fingerprint {theirs}) differ from the cache's spec "
                    f"({spec.fingerprint}): its images would not match their cache keys"
                )
        return missing_folder

    def _start_counting(self) -> None:
        """The shared draw state: reaches DataLoader workers (fork or spawn, persistent or not)."""
        self._counter = DrawCounter(len(self._item_source))
        weakref.finalize(self, unlink_lock, self._counter.lock_path, os.getpid())

    @property
    def _lock_path(self) -> str:
        return self._counter.lock_path

    def _count(self, index: int) -> int:
        """How many variants item ``index`` has (0: not in the plan)."""
        s = int(self._item_source[index])
        if s < 0:
            return 0
        return self._view.n_variants(s)

    def _variant(self, index: int, position: int) -> Any:
        """Variant ``position`` (in variant order) of item ``index``."""
        return self._view.variant(int(self._item_source[index]), position)

    def _item_id(self, index: int) -> Any:
        """Item ``index``'s plan source, its file where the dataset reads it, else its index."""
        if self._reads_files:
            return self._adapter.stock_path(index)
        path = self._adapter.item_file(index)
        if path is not None:
            return path
        s = int(self._item_source[index])
        return self._plan.columns.source(s) if s >= 0 else index

    def _expected_sha(self, index: int) -> str:
        """The plan's content hash of item ``index``'s source, read from the columns (no Variant)."""
        return self._view.source_hash(int(self._item_source[index]))

    def _describe_item(self, index: int) -> str:
        source = self._item_id(index)
        if isinstance(source, str) and os.path.isabs(source):
            return source
        if isinstance(source, str) and self._root is not None:
            return os.path.join(os.fspath(self._root), source)
        return f"item {index} ({source!r})"

    # -- torchvision dataset contract -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._item_source)

    @property
    def classes(self) -> list[str] | None:
        classes = self._adapter.attr("classes")
        if classes is None:
            mapping = self._adapter.class_to_idx()
            classes = sorted(mapping, key=mapping.__getitem__) if mapping is not None else None
        return None if classes is None else list(classes)

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        return self._adapter.class_to_idx()

    @property
    def targets(self) -> list[int]:
        if self._targets is None:
            self._targets = np.array([int(self._base_item(i)[1]) for i in range(len(self.base))], dtype=np.int64)
        return [int(t) for t in self._targets]

    def __repr__(self) -> str:
        root = self._root
        lines = [
            f"Number of datapoints: {len(self)} ({self.num_augmentable} with synthetic variants"
            + (f", {self.unkept_items} served real: their source kept no variant after filtering"
               if getattr(self, "unkept_items", 0) else "") + ")",
            f"Base: {type(unwrap(self.base)).__name__}" + (f" at {root}" if root else "")
            + (f" (items='plan': the plan's {len(self)} of its {self._base_len} items)"
               if self._base_len is not None else ""),
            f"Plan: {self._plan_repr}",
            f"Cache: {self.cache!r}",
            f"p={self.p}, on_miss={self.on_miss!r}, seed={self.seed}, "
            + (f"epoch={self.epoch} (pinned)" if self.epoch is not None else "epoch not pinned")
            + (f", pool={self._pool!r}" if self._pool is not None else ""),
        ]
        for name, value in (("Transform", self.transform), ("Target transform", self.target_transform)):
            if value is not None:
                origin = " (the base's)" if value is getattr(self, "_adopted", {}).get(name) else ""
                lines.append(f"{name}{origin}: " + repr(value).replace("\n", "\n    "))
        return f"{type(self).__name__}\n    " + "\n    ".join(lines)

    # -- randomness ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int | None:
        """The epoch pinned by :meth:`set_epoch`, or None if it was never called."""
        value = self._counter.epoch
        return None if value < 0 else value

    def set_epoch(self, epoch: int) -> None:
        """Pin epoch ``epoch``: the next access of each item gets that epoch's draw (optional;
        without it every access is a fresh draw all the same)."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise InputError(f"epoch must be an integer >= 0, got {epoch!r}")
        pinned, fewest = self._counter.progress()
        if epoch < pinned or (pinned < 0 and epoch < fewest):
            done = f"epoch {pinned} was pinned" if pinned >= 0 else f"every item was drawn {fewest} times unpinned"
            warnings.warn(
                f"set_epoch({epoch}) after {done}: epoch {epoch}'s choices are served again. A resumed run pins "
                "the epoch it resumes at (docs/training.md, Resuming); to replay an epoch on purpose, ignore this",
                UserWarning, stacklevel=2)
        self._counter.pin(int(epoch))

    def state_dict(self) -> dict[str, Any]:
        """The draw state (torchdata's ``Stateful``): the seed, the pinned epoch and how often each
        item has been drawn, so that :meth:`load_state_dict` in a new process continues the run's
        choices instead of starting again at epoch 0's. Tensors and plain values only, so
        ``torch.load(weights_only=True)`` reads it back.

        Inside a DataLoader worker (where torchdata's ``StatefulDataLoader`` calls it after each
        batch) it is that worker's share: the counts the workers started from and the draws this
        worker took; the loader keeps one share per worker, taken right after a batch that worker
        fetched and served, so the shares add up to the draws of the batches served exactly, not
        counting what the workers prefetched. Called in the main process while DataLoader workers
        run, it counts every draw taken so far, also those of batches prefetched but not yet served.
        """
        state: dict[str, Any] = {"format": STATE_FORMAT, "seed": int(self.seed), "items": len(self)}
        info = torch.utils.data.get_worker_info()
        if info is not None:
            state.update(self._counter.worker_state(info.id, info.num_workers))
        else:
            state.update(self._counter.state())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the draws of a run saved with :meth:`state_dict` (torchdata's ``Stateful``).

        Raises:
            InputError: not such a state, or one saved by a dataset with another seed or another
                number of items (its counts would name other draws).
        """
        epoch, draws, share = check_state(state_dict, int(self.seed), len(self))
        if share is None:
            self._counter.restore(epoch, draws)
            return
        if torch.utils.data.get_worker_info() is None:
            raise InputError("this draw state is one DataLoader worker's share: restore the loader's whole state "
                             "(StatefulDataLoader.load_state_dict), which hands each worker its own")
        own, segments, workers = share
        self._counter.restore_worker(epoch, draws, own, segments, workers)

    def variants_for(self, index: int) -> tuple[Any, ...]:
        """The plan variants item ``index`` may be replaced by."""
        return tuple(self._variant(index, k) for k in range(self._count(index)))

    def choose(self, index: int, epoch: int | None = None, draw: int = 0) -> Any:
        """The variant (or None: real) of access number ``draw`` (0 = the first) of item ``index``
        in epoch ``epoch`` (default: the pinned epoch, else 0), as :meth:`__getitem__` would pick
        it on rank 0. Pure: consumes no draw."""
        if epoch is None:
            epoch = self.epoch or 0
        position = self._position(index, draw_name(self.seed, int(epoch), index, int(draw), 0))
        return None if position is None else self._variant(index, position)

    def _position(self, index: int, name: str) -> int | None:
        """Which of item ``index``'s variants a draw named ``name`` picks, or None (real)."""
        return pick(name, self.p, self._count(index))

    # -- items ----------------------------------------------------------------------------------
    def _base_item(self, index: int) -> tuple[Any, Any]:
        """Item ``index`` of the base, as the base gives it; a file it cannot read is an
        :class:`ImageError` naming the file (loaders' own errors seldom do)."""
        try:
            item = self.base[index]
        except DaldaError:
            raise
        except OSError as exc:  # PIL's "image file is truncated", UnidentifiedImageError, a vanished file
            raise ImageError(f"cannot read {self._describe_item(index)}: {exc}") from exc
        except Image.DecompressionBombError as exc:  # not an OSError; as data.load_image says it
            raise ImageError(f"cannot read {self._describe_item(index)}: {exc} Raise PIL.Image.MAX_IMAGE_PIXELS "
                             "to accept images this large") from exc
        if self._hf_columns is not None:
            image_col, label_col = self._hf_columns
            return item[image_col], item[label_col]
        return item[0], item[1]

    def _real_item(self, index: int) -> tuple[Any, Any]:
        """Item ``index`` with its image converted as the plan converts sources (see the module doc)."""
        if self._reads_files and self._targets is not None:
            return load_image(self._adapter.stock_path(index)), int(self._targets[index])
        image, target = self._base_item(index)
        if hasattr(image, "mode") and image.mode != "RGB":
            image = to_rgb(image, self._describe_item(index))
        return image, target

    def _real_image(self, index: int) -> Any:
        image = self._real_item(index)[0]
        return to_rgb(image, self._describe_item(index))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} items")
        position = None
        if self.p > 0.0 and self._item_source[index] >= 0:
            position = self._position(index, self._counter.next_name(self.seed, index))
        image = self._synthetic(index, position) if position is not None else None
        if image is None or position is None:
            image, target = self._real_item(index)
        else:  # the plan's label is the base's (checked at construction when the base lists targets)
            target = int(self._targets[index]) if self._targets is not None else self._variant(index, position).label
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _synthetic(self, index: int, position: int) -> Any:
        """The cached image of variant ``position`` of item ``index``; a miss is handled by
        ``on_miss`` (None: use the real item)."""
        spec = self.cache.spec
        if spec is None:  # no cache folder and no spec: everything is real (warned)
            return None
        variant = self._variant(index, position)
        key = spec.key(variant)  # a hash of a few fields, per access: no key kept per variant
        entry = self.cache.get(key)
        if entry is not None:
            return entry.image
        return MISS_POLICIES[self.on_miss].handle(self, index, variant, key)

    def _source_image(self, index: int, variant: Any) -> Any:
        """The real image of item ``index``, checked against the plan's content hash."""
        image = self._real_image(index)
        if image_sha256(image) != variant.source_sha256:
            raise InputError(mismatch(self, index, "is not the image the plan was made from (content hash differs); "
                                                   "re-plan after changing the dataset"))
        return image

    def _get_generator(self) -> Any:
        generator = self._generator
        if generator is None:
            generator = self._generator = GeneratorFactory(self.cache.resolve_spec(), "cpu")
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
            spec = self.cache.spec
            if spec is None or pool.cache.spec is None or pool.cache.spec.fingerprint != spec.fingerprint:
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
