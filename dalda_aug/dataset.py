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
independently, and the seed drawn is ``ds.seed`` and shows in ``repr``.

Which items: every item of the base (``items="all"``; items whose source the plan lacks are
always real, and a ``UserWarning`` says how many, e.g. a ``--shots N`` plan over the full folder),
or only those whose source is in the plan (``items="plan"``, the plan's few-shot subset);
:func:`plan_indices` gives the base's indices of the plan's sources.

Base datasets: torchvision ``ImageFolder``/``DatasetFolder`` (and ``Subset`` of them), timm
``ImageDataset`` (file paths from its reader), Hugging Face ``datasets`` image folders (dict
items with ``image``/``label``; paths from the image column), or any dataset of
``(image, label)`` with ``source_ids=`` naming each item's plan source (plans made from an
in-memory dataset use indices).

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

At construction the dataset checks every planned source's pixels against the plan's content
hash (a changed file is an :class:`~dalda_aug.errors.InputError`) and measures how much of the
plan the cache holds (below 100 % with ``on_miss="real"``: a ``UserWarning``).

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
import sys
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .cache import GenerationSpec, GeneratorFactory, SyntheticCache
from .data import image_sha256, load_image, to_rgb
from .errors import CacheMissError, DaldaError, ImageError, InputError  # CacheMissError: importable from here too

__all__ = ["SyntheticAugmentedDataset", "CacheMissError", "ON_MISS", "ITEMS", "source_ids", "plan_indices"]

ON_MISS = ("generate", "wait", "real", "error")
#: What ``items=`` may be: every item of the base, or only the items whose source is in the plan.
ITEMS = ("all", "plan")




# ------------------------------------------------------------------------------------------
# base datasets
# ------------------------------------------------------------------------------------------
def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.split(".")[0] == "datasets" and hasattr(dataset, "features")


def _hf_columns(dataset: Any) -> tuple[str, str]:
    """The image and label columns of a Hugging Face dataset."""
    import datasets

    features = dataset.features
    image = next((name for name, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((name for name, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    image = image or next((n for n in ("image", "img") if n in features), None)
    label = label or next((n for n in ("label", "labels") if n in features), None)
    if image is None or label is None:
        raise InputError(f"the Hugging Face dataset has columns {list(features)}; SyntheticAugmentedDataset needs "
                         "an image column (datasets.Image) and a label column")
    return image, label


def _timm_reader(dataset: Any) -> Any:
    reader = getattr(dataset, "reader", None) or getattr(dataset, "parser", None)  # timm < 0.8: .parser
    return reader if reader is not None and hasattr(reader, "filenames") else None


def _describe_ids(dataset: Any, root: str | os.PathLike[str] | None = None) -> tuple[list[Any], str]:
    """``(source id of every item, what they are)``; see :func:`source_ids`."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner, what = _describe_ids(dataset.dataset, root)
        return [inner[int(i)] for i in dataset.indices], what
    samples = getattr(dataset, "samples", None)
    base_root = getattr(dataset, "root", None)
    if samples is not None and base_root is not None:
        base_root = os.path.abspath(os.fspath(base_root))
        ids = [Path(os.path.relpath(os.path.abspath(path), base_root)).as_posix() for path, *_ in samples]
        return ids, f"{type(dataset).__name__} file paths relative to its root {base_root}"
    reader = _timm_reader(dataset)
    if reader is not None:
        ids = [Path(name).as_posix() for name in reader.filenames(basename=False, absolute=False)]
        return ids, f"timm {type(reader).__name__} file paths relative to its root {getattr(reader, 'root', '?')}"
    if _is_hf_dataset(dataset):
        import datasets

        image_col, _ = _hf_columns(dataset)
        column = dataset.cast_column(image_col, datasets.Image(decode=False))[image_col]
        paths: list[str] = [str(item.get("path") or "") if isinstance(item, dict) else "" for item in column]
        if all(paths):
            base = os.path.abspath(os.fspath(root)) if root else None
            ids = []
            for path in paths:
                path = os.path.abspath(path)
                inside = base is not None and (path == base or path.startswith(base.rstrip(os.sep) + os.sep))
                ids.append(Path(os.path.relpath(path, base)).as_posix() if inside else Path(path).as_posix())
            return ids, ("Hugging Face image paths" + (f" relative to the plan's data_root {base}" if base else ""))
    return list(range(len(dataset))), "item indices (the dataset lists no file paths; pass source_ids=)"


def source_ids(dataset: Any, root: str | os.PathLike[str] | None = None) -> list[Any]:
    """Plan source id of every item of ``dataset``.

    torchvision ``ImageFolder``/``DatasetFolder`` (``samples`` and ``root``) give each file's
    POSIX path relative to the root, as :func:`~dalda_aug.plan.build_plan` records it; timm
    ``ImageDataset`` gives its reader's root-relative file names; a Hugging Face ``datasets``
    image dataset gives its image files' paths, relative to ``root`` (the plan's ``data_root``)
    when inside it; a ``torch.utils.data.Subset`` maps through its indices; any other dataset
    gives its indices.
    """
    return _describe_ids(dataset, root)[0]


def plan_indices(dataset: Any, plan: Any, source_ids: Sequence[Any] | None = None) -> list[int]:
    """Indices, ascending, of the items of ``dataset`` whose source is in ``plan`` (an
    :class:`~dalda_aug.plan.AugmentationPlan` or its folder): for a plan made with ``--shots N``
    over a folder, the folder's few-shot subset, found by file path (not by re-drawing it).

    ``source_ids`` names each item's plan source (default :func:`source_ids`).
    ``torch.utils.data.Subset(dataset, plan_indices(dataset, plan))`` is what
    ``SyntheticAugmentedDataset(dataset, plan, cache, items="plan")`` serves.
    """
    from .plan import AugmentationPlan

    if isinstance(plan, (str, os.PathLike)):
        plan = AugmentationPlan.load(plan)
    ids = list(source_ids) if source_ids is not None else _describe_ids(dataset, plan.data_root)[0]
    planned = plan.by_source()
    return [index for index, source in enumerate(ids) if source in planned]


def _stock_folder_paths(dataset: Any) -> list[str] | None:
    """The absolute file of every item when ``dataset`` is a torchvision ``DatasetFolder`` (or a
    ``Subset`` of one) that reads files with torchvision's stock loader, or a timm ``ImageDataset``
    over an image folder in RGB mode: both only call ``convert("RGB")``. Else None (a custom
    loader is the user's choice and is kept)."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _stock_folder_paths(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    # Only the stock __getitem__ (a subclass that overrides it does more than load a file).
    own_getitem = getattr(type(dataset), "__getitem__", None)
    reader = _timm_reader(dataset)
    if reader is not None and type(reader).__name__ == "ReaderImageFolder":
        # timm's ImageDataset opens the file and calls convert(input_img_mode) on it.
        timm_getitem = getattr(sys.modules.get("timm.data.dataset"), "ImageDataset", None)
        stock = (getattr(dataset, "input_img_mode", "RGB") == "RGB" and not getattr(dataset, "load_bytes", False)
                 and getattr(dataset, "additional_features", None) is None
                 and timm_getitem is not None and own_getitem is timm_getitem.__getitem__)
        samples = getattr(reader, "samples", None)
        return [os.path.abspath(path) for path, *_ in samples] if stock and samples is not None else None
    samples = getattr(dataset, "samples", None)
    loader = getattr(dataset, "loader", None)
    if samples is None or loader is None:
        return None
    try:
        from torchvision import get_image_backend
        from torchvision.datasets import folder
    except ImportError:  # pragma: no cover - torchvision not installed
        return None
    if loader not in (folder.default_loader, folder.pil_loader) or get_image_backend() != "PIL" \
            or own_getitem is not folder.DatasetFolder.__getitem__:
        return None
    return [os.path.abspath(path) for path, *_ in samples]


def _base_targets(dataset: Any) -> list[int] | None:
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _base_targets(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    reader = _timm_reader(dataset)
    if reader is not None and getattr(reader, "samples", None) is not None:
        return [int(t) for _, t, *_ in reader.samples]
    if _is_hf_dataset(dataset):
        return [int(t) for t in dataset[_hf_columns(dataset)[1]]]
    return None


def _base_attr(dataset: Any, name: str) -> Any:
    while True:
        if hasattr(dataset, name):
            return getattr(dataset, name)
        if isinstance(dataset, torch.utils.data.Subset):
            dataset = dataset.dataset
            continue
        return None


def _base_class_to_idx(dataset: Any) -> dict[str, int] | None:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    mapping = getattr(dataset, "class_to_idx", None)
    if mapping is None:
        reader = _timm_reader(dataset)
        mapping = getattr(reader, "class_to_idx", None) if reader is not None else None
    if mapping is None and _is_hf_dataset(dataset):
        names = getattr(dataset.features[_hf_columns(dataset)[1]], "names", None)
        mapping = {name: i for i, name in enumerate(names)} if names else None
    return dict(mapping) if mapping is not None else None


def _unwrap(dataset: Any) -> Any:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


# ------------------------------------------------------------------------------------------
# per-item draw counts shared by every process of one training job
# ------------------------------------------------------------------------------------------
def _unlink_lock(path: str, owner: int) -> None:
    if os.getpid() == owner:
        try:
            os.unlink(path)
        except OSError:
            pass


def _process_rank(hint: int | None) -> int:
    """This process's distributed rank: torch.distributed's, else the one seen when the dataset
    was sent to this worker, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover - a broken process group: fall back
        pass
    if hint is not None:
        return int(hint)
    return int(os.environ.get("RANK", "0") or 0)


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
        pool: a :class:`~dalda_aug.pool.GeneratorPool` (or its handle) for ``"wait"`` and
            ``"real"``; also settable later with :meth:`attach_pool`.
        wait_timeout: seconds ``"wait"`` waits for one image.
        items: ``"all"`` (default) serves every item of ``base`` (a ``UserWarning`` at
            construction when some are not in the plan: they are always real); ``"plan"`` serves
            only those whose source is in the plan (:func:`plan_indices`), e.g. the few-shot
            subset of a plan made with ``--shots N`` over the full folder.

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
    ) -> None:
        from .plan import AugmentationPlan

        if isinstance(plan, (str, os.PathLike)):
            plan = AugmentationPlan.load(plan)
        if not isinstance(plan, AugmentationPlan):
            raise InputError(f"plan must be an AugmentationPlan or a plan folder, got {type(plan).__name__}")
        if not isinstance(cache, SyntheticCache):
            raise InputError(f"cache must be a SyntheticCache, got {type(cache).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise InputError(f"p must be a probability in [0, 1], got {p!r}")
        if on_miss not in ON_MISS:
            raise InputError(f"on_miss must be one of {list(ON_MISS)}, got {on_miss!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise InputError(f"seed must be an integer >= 0 or None, got {seed!r}")
        if items not in ITEMS:
            raise InputError(f"items must be one of {list(ITEMS)}, got {items!r}")
        if wait_timeout <= 0:
            raise InputError(f"wait_timeout must be > 0, got {wait_timeout!r}")
        if type(base).__name__ in ("DatasetDict", "IterableDatasetDict"):
            raise InputError("the base is a Hugging Face DatasetDict: pick a split (dataset['train'])")
        n = len(base)
        targets = _base_targets(base)
        # Files read here with the plan's conversion (torchvision folder bases, stock loader; timm
        # ImageDataset over a folder): the base's __getitem__ is never called for them.
        paths = _stock_folder_paths(base)
        if paths is not None and (targets is None or len(paths) != n):
            paths = None
        transform, target_transform = self._adopt_transforms(base, paths is not None, transform, target_transform)
        inner = _unwrap(base)
        self._hf_columns: tuple[str, str] | None = None
        if _is_hf_dataset(inner):
            if (getattr(inner, "format", None) or {}).get("type") is not None:
                raise InputError("the Hugging Face base dataset has a format or transform set (set_format / "
                                 "with_transform); give the transform to SyntheticAugmentedDataset instead")
            self._hf_columns = _hf_columns(inner)
        if generator is not None and not (hasattr(generator, "generate") or callable(generator)):
            raise InputError(f"generator must be an IPAdapterGenerator or a factory, got {type(generator).__name__}")

        self.base = base
        self.p = float(p)
        self.transform = transform
        self.target_transform = target_transform
        self.on_miss = on_miss
        if seed is None:
            # As RandomSampler seeds its shuffling: from torch's global generator, here, once.
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        #: The seed of the choices (drawn at construction when ``seed=None``; in ``repr``).
        self.seed = int(seed)
        self.items = items
        self.wait_timeout = float(wait_timeout)
        self._generator = generator
        self._generator_pid: int | None = None
        self._built = None  # the generator a factory made in this process
        self._pool: Any = None
        self._plan_repr = repr(plan)
        self._paths = paths
        if n > 0 and paths is None:
            self._check_item_shape()

        # -- which plan source each item is ---------------------------------------------------
        if source_ids is not None:
            ids = list(source_ids)
            looked_for = "the source_ids= given"
            if len(ids) != n:
                raise InputError(f"source_ids= lists {len(ids)} ids for a base dataset of {n} items")
        else:
            ids, looked_for = _describe_ids(base, plan.data_root)
            if len(ids) != n:
                raise InputError(f"the base dataset has {n} items but lists {len(ids)} samples")
        by_source = plan.by_source()
        options: list[tuple[Any, ...]] = []
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
            options.append(variants)
        if matched == 0 and (self.p > 0 or items == "plan"):
            example = next(iter(by_source), None)
            raise InputError(
                f"none of the {n} items of the base dataset is a source of the plan: looked for {looked_for} "
                f"(the first is {ids[0] if ids else None!r}) among the plan's {len(by_source)} sources "
                f"(e.g. {example!r}, data_root {plan.data_root!r}); is it the dataset the plan was made from? "
                "Otherwise pass source_ids= with each item's plan source"
            )
        n_shot = plan.config.get("n_shot")
        made = f"the plan was made with --shots {n_shot}; " if n_shot is not None else ""
        if items == "plan" and matched < n:
            keep = [index for index, variants in enumerate(options) if variants]
            base = self.base = torch.utils.data.Subset(base, keep)
            options = [options[i] for i in keep]
            ids = [ids[i] for i in keep]
            targets = None if targets is None else [targets[i] for i in keep]
            self._paths = None if self._paths is None else [self._paths[i] for i in keep]
            self._base_len: int | None = n
            n = len(keep)
        else:
            self._base_len = None
            if 0 < matched < n:
                warnings.warn(
                    f"{n - matched} of the {n} items of the base dataset are not in the plan ({made}it has "
                    f"{matched} of them): they are always served real, so training sees the whole base dataset, "
                    f"not the plan's subset. Pass items='plan' to serve only the plan's {matched} items (or "
                    "wrap the base in Subset(base, dalda_aug.dataset.plan_indices(base, plan)))",
                    UserWarning, stacklevel=2)
        self._targets = targets
        self._options = options
        #: Number of items that have planned variants.
        self.num_augmentable = matched
        self._ids = ids
        self._root = getattr(_unwrap(base), "root", None) or getattr(_timm_reader(_unwrap(base)), "root", None) \
            or plan.data_root

        # -- the cache and its spec -------------------------------------------------------------
        spec = cache.spec
        missing_folder = not cache.directory.is_dir()
        if spec is None and self.p > 0 and not (missing_folder and on_miss == "real"):
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
        self._keys: list[tuple[str, ...]] = [
            tuple(spec.key(v) for v in variants) if spec is not None else () for variants in options]
        if pool is not None:
            self.attach_pool(pool)

        self.planned_variants = sum(len(v) for v in options)
        self.cached_variants: int | None = None  # measured below when p > 0
        if self.p > 0 and matched:
            self._check_sources()
            self._measure_coverage(plan, missing_folder)

        # -- shared draw state: reaches DataLoader workers (fork or spawn, persistent or not) ----
        # -1: set_epoch never called; else the pinned epoch.
        self._epoch = torch.full((), -1, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        # Accesses of each item since construction or the last set_epoch.
        self._draws = torch.zeros(max(n, 1), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        fd, self._lock_path = tempfile.mkstemp(prefix="dalda-aug-draws-", suffix=".lock")
        os.close(fd)
        weakref.finalize(self, _unlink_lock, self._lock_path, os.getpid())
        self._rank_hint: int | None = None
        self._reset_process_state()

    # -- construction checks ------------------------------------------------------------------------
    def _adopt_transforms(self, base: Any, reads_files: bool, transform: Callable[[Any], Any] | None,
                          target_transform: Callable[[Any], Any] | None
                          ) -> tuple[Callable[[Any], Any] | None, Callable[[Any], Any] | None]:
        """The transforms to apply: the ones given, else the base's where the dataset reads the
        base's files itself (its transform never runs there); any other base with a transform,
        or a transform given both to the base and here, is an :class:`InputError`."""
        given = {"transform": transform, "target_transform": target_transform}
        kind = type(_unwrap(base)).__name__
        self._adopted: dict[str, Any] = {}
        for attr, label in (("transform", "Transform"), ("target_transform", "Target transform")):
            theirs = _base_attr(base, attr)
            if theirs is None:
                continue
            if not reads_files:
                raise InputError(
                    f"the base dataset ({kind}) has a {attr}; create it with {attr}=None and give the {attr} "
                    "to SyntheticAugmentedDataset, which applies it to real and synthetic items alike (only a "
                    "torchvision ImageFolder/DatasetFolder with the stock loader or a timm ImageDataset over a "
                    "folder may keep it: the dataset reads their files itself)"
                )
            if given[attr] is not None:
                raise InputError(
                    f"a {attr} was given both to the base {kind} and to SyntheticAugmentedDataset: drop one, "
                    f"either {attr}= here (the base's is then applied to real and synthetic images alike) or "
                    f"the base's (create it with {attr}=None)"
                )
            given[attr] = self._adopted[label] = theirs
        return given["transform"], given["target_transform"]

    def _check_item_shape(self) -> None:
        item = self.base[0]
        if isinstance(item, dict):
            if self._hf_columns is None or not all(c in item for c in self._hf_columns):
                raise InputError(
                    f"item 0 of the base dataset is a dict with keys {sorted(item)}; SyntheticAugmentedDataset "
                    "understands (image, label) pairs and Hugging Face image datasets (image and label columns)")
            image = item[self._hf_columns[0]]
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            image = item[0]
        else:
            raise InputError(
                f"item 0 of the base dataset is a {type(item).__name__}; SyntheticAugmentedDataset needs "
                "(image, label) pairs or dicts with image and label (Hugging Face datasets)")
        if not hasattr(image, "mode") or not hasattr(image, "convert"):
            raise InputError(
                f"item 0 of the base dataset holds a {type(image).__name__} where a PIL image belongs: create "
                "the base dataset without a transform and give the transform to SyntheticAugmentedDataset")

    def _describe_item(self, index: int) -> str:
        source = self._ids[index]
        if isinstance(source, str) and os.path.isabs(source):
            return source
        if isinstance(source, str) and self._root is not None:
            return os.path.join(os.fspath(self._root), source)
        return f"item {index} ({source!r})"

    def _check_sources(self) -> None:
        """Every planned source's pixels against the plan's content hash."""
        for index, variants in enumerate(self._options):
            if variants:
                image = self._real_image(index)
                if image_sha256(image) != variants[0].source_sha256:
                    raise InputError(self._mismatch(index, "changed since the plan was made (its pixels no longer "
                                                    "match the plan's content hash): re-plan with `dalda-aug plan`, "
                                                    "or restore the file"))

    def _mismatch(self, index: int, what: str) -> str:
        """The message for item ``index`` whose pixels differ from the plan's: when the file itself
        still matches, the base's own loader converts it differently from the plan; say so."""
        samples = getattr(_unwrap(self.base), "samples", None)
        ids = self._ids[index]
        if self._paths is None and samples is not None and isinstance(ids, str):
            path = os.path.join(os.fspath(self._root or ""), ids)
            try:
                same_file = image_sha256(load_image(path)) == self._options[index][0].source_sha256
            except (DaldaError, OSError):
                same_file = False
            if same_file:
                return (f"{path}: the base dataset's loader gives other pixels than the file holds (it converts "
                        "it differently from the plan, e.g. drops transparency or clips 16-bit values); give the "
                        "base torchvision's default loader or dalda_aug.data.load_image")
        return f"{self._describe_item(index)} {what}"

    def _measure_coverage(self, plan: Any, missing_folder: bool) -> None:
        """Count the planned variants the cache holds. With ``on_miss="real"`` anything short of
        all of them changes what is trained on: warn. With any policy, warn when another spec
        recorded in the folder holds more of them (an explicit spec that differs from warm's)."""
        planned = {key for keys in self._keys for key in keys}
        present = set() if missing_folder else self.cache.keys()
        self.cached_variants = len(planned & present)
        if planned and self.cached_variants == len(planned):
            return
        effect = ("items whose chosen variant is missing are served real (on_miss='real'), so fewer than "
                  f"p={self.p:g} of the items are synthetic")
        if missing_folder:
            if self.on_miss == "real":
                warnings.warn(f"the cache folder {self.cache.directory} does not exist: {effect}; warm it with "
                              "`dalda-aug warm`", UserWarning, stacklevel=3)
            return
        spec = self.cache.spec
        held = []
        better = False
        variants = [v for vs in self._options for v in vs]
        for other in self.cache.recorded_specs():
            count = len({other.key(v) for v in variants} & present)
            held.append(f"{other.describe()} ({count} of these variants)")
            better = better or count > self.cached_variants
        if self.on_miss != "real" and not better:
            return
        holds = "; ".join(held) if held else "no recorded spec"
        if self.on_miss == "real":
            consequence = effect[0].upper() + effect[1:]
        else:
            consequence = f"Missing variants are handled by on_miss={self.on_miss!r}"
        warnings.warn(
            f"{self.cached_variants}/{len(planned)} synthetic variants of the plan are cached in "
            f"{self.cache.directory} under the spec in use ({spec.describe() if spec else None}); the cache "
            f"holds {len(present)} images, specs: {holds}. {consequence}. Warm the cache "
            "(`dalda-aug warm`) or use the spec it was warmed with (SyntheticCache(directory) reads it).",
            UserWarning, stacklevel=3)

    # -- torchvision dataset contract -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._options)

    @property
    def classes(self) -> list[str] | None:
        classes = _base_attr(self.base, "classes")
        if classes is None:
            mapping = _base_class_to_idx(self.base)
            classes = sorted(mapping, key=mapping.__getitem__) if mapping is not None else None
        return None if classes is None else list(classes)

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        return _base_class_to_idx(self.base)

    @property
    def targets(self) -> list[int]:
        if self._targets is None:
            self._targets = [int(self._base_item(i)[1]) for i in range(len(self.base))]
        return self._targets

    def __repr__(self) -> str:
        root = self._root
        lines = [
            f"Number of datapoints: {len(self)} ({self.num_augmentable} with synthetic variants)",
            f"Base: {type(_unwrap(self.base)).__name__}" + (f" at {root}" if root else "")
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
        value = int(self._epoch.item())
        return None if value < 0 else value

    def set_epoch(self, epoch: int) -> None:
        """Pin epoch ``epoch``: the next access of each item gets that epoch's draw (optional;
        without it every access is a fresh draw all the same)."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise InputError(f"epoch must be an integer >= 0, got {epoch!r}")
        with self._locked():
            self._epoch.fill_(int(epoch))
            self._draws.zero_()

    def variants_for(self, index: int) -> tuple[Any, ...]:
        """The plan variants item ``index`` may be replaced by."""
        return self._options[index]

    def choose(self, index: int, epoch: int | None = None, draw: int = 0) -> Any:
        """The variant (or None: real) of access number ``draw`` (0 = the first) of item ``index``
        in epoch ``epoch`` (default: the pinned epoch, else 0), as :meth:`__getitem__` would pick
        it on rank 0. Pure: consumes no draw."""
        if epoch is None:
            epoch = self.epoch or 0
        position = self._position(index, self._draw_name(index, int(epoch), int(draw), 0))
        return None if position is None else self._options[index][position]

    def _draw_name(self, index: int, epoch: int, count: int, rank: int) -> str:
        """What one access hashes: the first access in an epoch is that epoch's draw (without
        set_epoch, the n-th access is epoch n's); other accesses have their own names."""
        if count == 0:
            return f"{self.seed}:{epoch}:{index}"
        return f"{self.seed}:{epoch}:{index}:{count}" + (f":r{rank}" if rank else "")

    def _next_draw(self, index: int) -> str:
        """Consume item ``index``'s next draw (counted across all processes) and name it."""
        with self._locked():
            pinned = int(self._epoch_np[()])
            count = int(self._draws_np[index])
            self._draws_np[index] = count + 1
        if pinned < 0:
            # Never pinned: access n is epoch n's draw. Under DDP each rank counts its own
            # accesses, so ranks other than 0 name theirs apart (never repeating rank 0's).
            rank = _process_rank(self._rank_hint)
            return self._draw_name(index, count, 0, 0) + (f":r{rank}" if rank else "")
        return self._draw_name(index, pinned, count, _process_rank(self._rank_hint) if count else 0)

    def _position(self, index: int, name: str) -> int | None:
        """Which of item ``index``'s variants a draw named ``name`` picks, or None (real).

        A 128-bit hash of the name gives a uniform u in [0, 1) (synthetic when u < p) and the
        variant's position among the item's M.
        """
        options = self._options[index]
        if not options or self.p <= 0.0:
            return None
        digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
        if int.from_bytes(digest[:8], "big") / 2.0**64 >= self.p:
            return None
        return int.from_bytes(digest[8:], "big") % len(options)

    # -- per-process state --------------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock_fd: int | None = None
        self._epoch_np = self._epoch.numpy()
        self._draws_np = self._draws.numpy()

    def _locked(self) -> "_FileLock":
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        return _FileLock(self._lock_fd)

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
        if self._hf_columns is not None:
            image_col, label_col = self._hf_columns
            return item[image_col], item[label_col]
        return item[0], item[1]

    def _real_item(self, index: int) -> tuple[Any, Any]:
        """Item ``index`` with its image converted as the plan converts sources (see the module doc)."""
        if self._paths is not None and self._targets is not None:
            return load_image(self._paths[index]), self._targets[index]
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
        if self._options[index] and self.p > 0.0:
            position = self._position(index, self._next_draw(index))
        image = self._synthetic(index, position) if position is not None else None
        if image is None or position is None:
            image, target = self._real_item(index)
        else:  # the plan's label is the base's (checked at construction when the base lists targets)
            target = self._targets[index] if self._targets is not None else self._options[index][position].label
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _synthetic(self, index: int, position: int) -> Any:
        """The cached image of variant ``position`` of item ``index``; a miss is handled by
        ``on_miss`` (None: use the real item)."""
        if not self._keys[index]:  # no cache folder and no spec: everything is real (warned)
            return None
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

    def _source_image(self, index: int, variant: Any) -> Any:
        """The real image of item ``index``, checked against the plan's content hash."""
        image = self._real_image(index)
        if image_sha256(image) != variant.source_sha256:
            raise InputError(self._mismatch(index, "is not the image the plan was made from (content hash differs); "
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
        for name in ("_pid", "_lock_fd", "_epoch_np", "_draws_np"):
            state.pop(name, None)
        # Spawned DataLoader workers do not join the process group: they keep the rank seen here.
        state["_rank_hint"] = _process_rank(self._rank_hint)
        generator = state.get("_generator")
        if generator is not None and hasattr(generator, "generate"):
            # Never ship a model: workers rebuild the same generator from its settings.
            device = str(getattr(generator, "device", "cpu"))
            state["_generator"] = GeneratorFactory(GenerationSpec.of(generator), device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()


class _FileLock:
    """An exclusive ``flock`` on an open file: serialises draw counting across processes
    (a no-op where ``fcntl`` is missing, i.e. Windows)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fcntl.flock(self.fd, fcntl.LOCK_UN)
