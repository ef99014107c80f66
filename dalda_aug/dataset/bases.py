"""Base datasets: how :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` reads each kind.

One adapter per kind of base dataset, behind one small interface (:class:`BaseAdapter`), as timm
reads a folder, a tar or a Hugging Face dataset through one ``Reader``; :func:`adapter_for` picks
the first kind in :data:`ADAPTERS` whose :meth:`~BaseAdapter.matches` accepts the dataset:

``subset``        ``torch.utils.data.Subset`` of any of these: maps through its indices;
``folder``        torchvision ``ImageFolder``/``DatasetFolder`` (anything listing ``samples``);
``timm``          timm ``ImageDataset`` (a ``reader`` listing ``filenames``);
``huggingface``   a Hugging Face ``datasets`` image dataset (dict items, image and label columns);
``generic``       any dataset of ``(image, label)``: item indices (or ``source_ids=``).

:func:`register_base_adapter` adds a kind (a :class:`BaseAdapter` subclass) for a dataset class of
one's own, tried before ``generic`` (which takes any dataset, so it stays last) or before a kind
named with ``before=``.

An adapter answers what the wrapper needs to know about its base: each item's plan source id
(:meth:`~BaseAdapter.source_ids`), the files it may read itself with the plan's conversion
(:meth:`~BaseAdapter.stock_paths`), labels, ``class_to_idx``, attributes such as ``transform``
(:meth:`~BaseAdapter.attr`), the image and label columns of dict items and the folder root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch

from ..errors import InputError

__all__ = ["ADAPTERS", "BaseAdapter", "FolderAdapter", "GenericAdapter", "HuggingFaceAdapter", "SubsetAdapter",
           "TimmAdapter", "adapter_for", "adopt_transforms", "register_base_adapter", "check_item_shape", "hf_columns",
           "is_hf_dataset", "plan_indices", "source_ids", "timm_reader", "unwrap"]


def is_hf_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is a Hugging Face ``datasets`` dataset (a split, not a ``DatasetDict``)."""
    return type(dataset).__module__.split(".")[0] == "datasets" and hasattr(dataset, "features")


def hf_columns(dataset: Any) -> tuple[str, str]:
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


def timm_reader(dataset: Any) -> Any:
    """The reader of a timm ``ImageDataset`` (one listing ``filenames``), else None."""
    reader = getattr(dataset, "reader", None) or getattr(dataset, "parser", None)  # timm < 0.8: .parser
    return reader if reader is not None and hasattr(reader, "filenames") else None


def unwrap(dataset: Any) -> Any:
    """The dataset under any ``torch.utils.data.Subset`` wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


class BaseAdapter:
    """What the wrapper reads from one kind of base dataset; the defaults are a plain dataset's."""

    #: The kind's name in :data:`ADAPTERS`.
    kind: ClassVar[str] = "generic"

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        """Whether ``dataset`` is of this kind."""
        return True

    def source_ids(self, root: str | os.PathLike[str] | None = None) -> tuple[list[Any], str]:
        """``(plan source id of every item, what they are)``; see :func:`dalda_aug.dataset.source_ids`."""
        return list(range(len(self.dataset))), "item indices (the dataset lists no file paths; pass source_ids=)"

    def stock_paths(self) -> list[str] | None:
        """The absolute file of every item when the base only opens it and calls ``convert("RGB")``
        on it (the wrapper then reads the file itself, with the plan's conversion); else None (a
        custom loader is the user's choice and is kept)."""
        return None

    def stock_path(self, index: int) -> str:
        """The absolute file of item ``index`` where :meth:`stock_paths` lists them (one at a time,
        so a dataset keeps no list of paths)."""
        raise InputError(f"a {type(self.dataset).__name__} base lists no files")

    def item_file(self, index: int) -> str | None:
        """The absolute file of item ``index`` where the base lists files (for messages), else None."""
        return None

    def targets(self) -> list[int] | None:
        """Every item's label without reading an image, or None where the base does not list them."""
        targets = getattr(self.dataset, "targets", None)
        return None if targets is None else [int(t) for t in targets]

    def class_to_idx(self) -> dict[str, int] | None:
        mapping = getattr(self.dataset, "class_to_idx", None)
        return dict(mapping) if mapping is not None else None

    def attr(self, name: str) -> Any:
        """The base's attribute ``name`` (``transform``, ``classes``...), or None."""
        return getattr(self.dataset, name) if hasattr(self.dataset, name) else None

    def columns(self) -> tuple[str, str] | None:
        """The image and label keys of dict items; None where items are ``(image, label)``."""
        return None

    def root(self) -> Any:
        """The folder the base's files lie in, or None."""
        return getattr(self.dataset, "root", None)

    def innermost(self) -> BaseAdapter:
        """The adapter of the dataset under any ``Subset`` wrappers."""
        return self

    def release(self) -> None:
        """Drop what was kept for the construction's several passes over the base (its file list)."""


class GenericAdapter(BaseAdapter):
    """Any dataset of ``(image, label)``: its items are named by their indices."""


def _is_normal_under(path: str, prefix: str) -> bool:
    """Whether ``path`` starts with ``prefix`` (a normalised absolute folder plus ``/``) and is
    itself normalised, i.e. ``os.path.abspath(path) == path``: a few substring tests instead of
    ``normpath`` (POSIX; elsewhere only ``normpath`` decides)."""
    if not path.startswith(prefix):
        return False
    if not _POSIX:
        return os.path.normpath(path) == path
    # The prefix is normalised; below it, no empty, "." or ".." component and no trailing "/"
    # (a component that merely starts with "." is sent to normpath too: rare, and still right).
    rest = path[len(prefix):]
    return bool(rest) and not ("//" in rest or "/." in rest or rest[0] in "./" or rest[-1] == "/")


_POSIX = os.sep == "/" and not os.altsep


def _folder_prefix(base_root: str) -> str:
    return base_root.rstrip(os.sep) + os.sep


def _absolute_paths(paths: Iterable[Any], base_root: Any) -> list[str]:
    """``os.path.abspath`` of each path, skipping the call for those already normalised under the
    absolute ``base_root`` (every path of an ImageFolder whose root is absolute)."""
    if base_root is None:
        return [os.path.abspath(path) for path in paths]
    prefix = _folder_prefix(os.path.abspath(os.fspath(base_root)))
    return [path if type(path) is str and _is_normal_under(path, prefix) else os.path.abspath(path) for path in paths]


class FolderAdapter(BaseAdapter):
    """torchvision ``ImageFolder``/``DatasetFolder`` (or anything listing ``samples``)."""

    kind = "folder"

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        return getattr(dataset, "samples", None) is not None

    def source_ids(self, root: str | os.PathLike[str] | None = None) -> tuple[list[Any], str]:
        base_root = getattr(self.dataset, "root", None)
        if base_root is None:
            return super().source_ids(root)
        base_root = os.path.abspath(os.fspath(base_root))
        prefix = _folder_prefix(base_root)
        n = len(prefix)
        # The absolute paths are normalised: one under the root is the root's prefix plus its id.
        ids = [path[n:] if path.startswith(prefix) else Path(os.path.relpath(path, base_root)).as_posix()
               for path in self._absolute()]
        if not _POSIX:
            ids = [i.replace(os.sep, "/") for i in ids]
        return ids, f"{type(self.dataset).__name__} file paths relative to its root {base_root}"

    def _absolute(self) -> list[str]:
        """``os.path.abspath`` of every sample's path, kept until :meth:`release` (construction
        reads it twice: the items' source ids and the files it checks) while ``samples`` is the
        same list of the same length."""
        samples = self.dataset.samples
        memo = self.__dict__.get("_absolute_memo")
        if memo is not None and memo[0] is samples and memo[1] == len(samples):
            return list(memo[2])
        paths = _absolute_paths([path for path, *_ in samples], getattr(self.dataset, "root", None))
        self._absolute_memo = (samples, len(samples), paths)
        return list(paths)

    def release(self) -> None:
        self.__dict__.pop("_absolute_memo", None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_absolute_memo", None)  # never pickled into DataLoader workers
        return state

    def stock_paths(self) -> list[str] | None:
        # Only the stock loader and the stock __getitem__ (a subclass that overrides it does more
        # than load a file).
        loader = getattr(self.dataset, "loader", None)
        if loader is None:
            return None
        try:
            from torchvision import get_image_backend
            from torchvision.datasets import folder
        except ImportError:  # pragma: no cover - torchvision not installed
            return None
        own_getitem = getattr(type(self.dataset), "__getitem__", None)
        if loader not in (folder.default_loader, folder.pil_loader) or get_image_backend() != "PIL" \
                or own_getitem is not folder.DatasetFolder.__getitem__:
            return None
        return self._absolute()

    def stock_path(self, index: int) -> str:
        return os.path.abspath(str(self.dataset.samples[index][0]))

    def item_file(self, index: int) -> str | None:
        return self.stock_path(index)


class TimmAdapter(BaseAdapter):
    """timm ``ImageDataset``: file names, labels and classes from its reader."""

    kind = "timm"

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        return timm_reader(dataset) is not None

    @property
    def reader(self) -> Any:
        return timm_reader(self.dataset)

    def source_ids(self, root: str | os.PathLike[str] | None = None) -> tuple[list[Any], str]:
        reader = self.reader
        ids = [Path(name).as_posix() for name in reader.filenames(basename=False, absolute=False)]
        return ids, f"timm {type(reader).__name__} file paths relative to its root {getattr(reader, 'root', '?')}"

    def stock_paths(self) -> list[str] | None:
        # timm's ImageDataset over a folder opens the file and calls convert(input_img_mode) on it;
        # its retry loop would otherwise serve the next file in place of an unreadable one.
        reader, dataset = self.reader, self.dataset
        if type(reader).__name__ != "ReaderImageFolder":
            return None
        timm_dataset = getattr(sys.modules.get("timm.data.dataset"), "ImageDataset", None)
        stock = (getattr(dataset, "input_img_mode", "RGB") == "RGB" and not getattr(dataset, "load_bytes", False)
                 and getattr(dataset, "additional_features", None) is None and timm_dataset is not None
                 and getattr(type(dataset), "__getitem__", None) is timm_dataset.__getitem__)
        samples = getattr(reader, "samples", None)
        return [os.path.abspath(path) for path, *_ in samples] if stock and samples is not None else None

    def stock_path(self, index: int) -> str:
        return os.path.abspath(str(self.reader.samples[index][0]))

    def item_file(self, index: int) -> str | None:
        return self.stock_path(index) if getattr(self.reader, "samples", None) is not None else None

    def targets(self) -> list[int] | None:
        targets = super().targets()
        if targets is None and getattr(self.reader, "samples", None) is not None:
            targets = [int(t) for _, t, *_ in self.reader.samples]
        return targets

    def class_to_idx(self) -> dict[str, int] | None:
        mapping = super().class_to_idx()
        if mapping is None:
            mapping = getattr(self.reader, "class_to_idx", None)
        return dict(mapping) if mapping is not None else None

    def root(self) -> Any:
        return super().root() or getattr(self.reader, "root", None)


class HuggingFaceAdapter(BaseAdapter):
    """A Hugging Face ``datasets`` image dataset: dict items with an image and a label column."""

    kind = "huggingface"

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        return is_hf_dataset(dataset)

    def source_ids(self, root: str | os.PathLike[str] | None = None) -> tuple[list[Any], str]:
        import datasets

        image_col, _ = hf_columns(self.dataset)
        column = self.dataset.cast_column(image_col, datasets.Image(decode=False))[image_col]
        paths: list[str] = [str(item.get("path") or "") if isinstance(item, dict) else "" for item in column]
        if not all(paths):
            return super().source_ids(root)
        base = os.path.abspath(os.fspath(root)) if root else None
        ids = []
        for path in paths:
            path = os.path.abspath(path)
            inside = base is not None and (path == base or path.startswith(base.rstrip(os.sep) + os.sep))
            ids.append(Path(os.path.relpath(path, base)).as_posix() if inside else Path(path).as_posix())
        return ids, ("Hugging Face image paths" + (f" relative to the plan's data_root {base}" if base else ""))

    def targets(self) -> list[int] | None:
        targets = super().targets()
        return targets if targets is not None else [int(t) for t in self.dataset[hf_columns(self.dataset)[1]]]

    def class_to_idx(self) -> dict[str, int] | None:
        mapping = super().class_to_idx()
        if mapping is None:
            names = getattr(self.dataset.features[hf_columns(self.dataset)[1]], "names", None)
            mapping = {name: i for i, name in enumerate(names)} if names else None
        return mapping

    def columns(self) -> tuple[str, str] | None:
        if (getattr(self.dataset, "format", None) or {}).get("type") is not None:
            raise InputError("the Hugging Face base dataset has a format or transform set (set_format / "
                             "with_transform); give the transform to SyntheticAugmentedDataset instead")
        return hf_columns(self.dataset)


class SubsetAdapter(BaseAdapter):
    """``torch.utils.data.Subset`` of any base: the inner base's answers, mapped through the indices."""

    kind = "subset"

    def __init__(self, dataset: Any) -> None:
        super().__init__(dataset)
        self.inner = adapter_for(dataset.dataset)

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        return isinstance(dataset, torch.utils.data.Subset)

    def release(self) -> None:
        self.inner.release()

    def _pick(self, values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [values[int(i)] for i in self.dataset.indices]

    def source_ids(self, root: str | os.PathLike[str] | None = None) -> tuple[list[Any], str]:
        inner, what = self.inner.source_ids(root)
        return [inner[int(i)] for i in self.dataset.indices], what

    def stock_paths(self) -> list[str] | None:
        return self._pick(self.inner.stock_paths())

    def stock_path(self, index: int) -> str:
        return self.inner.stock_path(int(self.dataset.indices[index]))

    def item_file(self, index: int) -> str | None:
        return self.inner.item_file(int(self.dataset.indices[index]))

    def targets(self) -> list[int] | None:
        return self._pick(self.inner.targets())

    def class_to_idx(self) -> dict[str, int] | None:
        return self.inner.class_to_idx()

    def attr(self, name: str) -> Any:
        return super().attr(name) if hasattr(self.dataset, name) else self.inner.attr(name)

    def columns(self) -> tuple[str, str] | None:
        return self.inner.columns()

    def root(self) -> Any:
        return self.inner.root()

    def innermost(self) -> BaseAdapter:
        return self.inner.innermost()


#: The kinds of base dataset, in the order :func:`adapter_for` tries them (the last takes any);
#: :func:`register_base_adapter` adds one.
ADAPTERS: dict[str, type[BaseAdapter]] = {
    adapter.kind: adapter for adapter in (SubsetAdapter, FolderAdapter, TimmAdapter, HuggingFaceAdapter,
                                          GenericAdapter)
}


def register_base_adapter(adapter_class: type[BaseAdapter], *, before: str | None = None) -> type[BaseAdapter]:
    """Add ``adapter_class`` to :data:`ADAPTERS`, the kinds of base dataset :func:`adapter_for` tries
    in order (the first whose :meth:`~BaseAdapter.matches` accepts a dataset reads it).

    It is tried just before ``generic``, the last kind, which takes any dataset (so after the built-in
    kinds and the kinds registered before it), or, with ``before=KIND`` (``"folder"``, ``"subset"``,
    a registered kind...), just before that kind: for a dataset another kind would also accept (one
    listing ``samples`` would be read as a ``folder``). Keep ``subset`` first to have a
    ``torch.utils.data.Subset`` of your dataset mapped through its indices to your adapter.
    ``adapter_class`` must be a :class:`BaseAdapter` subclass with a :attr:`~BaseAdapter.kind` of its
    own and its own :meth:`~BaseAdapter.matches` (the default accepts every dataset); anything else
    is an :class:`InputError`. Returns ``adapter_class`` (so it can
    decorate the class). A DataLoader worker reads the adapter the dataset picked at construction,
    so registering in the main process is enough.
    """
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, BaseAdapter)):
        raise InputError(f"register_base_adapter needs a subclass of dalda_aug.dataset.bases.BaseAdapter, "
                         f"got {adapter_class!r}")
    kind = adapter_class.kind
    if not isinstance(kind, str) or not kind or (kind == BaseAdapter.kind and "kind" not in adapter_class.__dict__):
        raise InputError(f"{adapter_class.__name__} names no kind of its own: set the class attribute kind "
                         f"(the kinds taken are {list(ADAPTERS)})")
    if kind in ADAPTERS:
        raise InputError(f"the base dataset kind {kind!r} of {adapter_class.__name__} is taken (by "
                         f"{ADAPTERS[kind].__name__}); the kinds taken are {list(ADAPTERS)}")
    if getattr(adapter_class.matches, "__func__", None) is getattr(BaseAdapter.matches, "__func__"):
        raise InputError(f"{adapter_class.__name__} does not define matches(dataset): the default accepts every "
                         "dataset, which would take every base the generic kind reads now")
    anchor = GenericAdapter.kind if before is None else before
    if anchor not in ADAPTERS:
        raise InputError(f"register_base_adapter(before={before!r}): no such kind; the kinds are {list(ADAPTERS)}")
    order = list(ADAPTERS.items())
    at = [name for name, _ in order].index(anchor)
    order.insert(at, (kind, adapter_class))
    ADAPTERS.clear()  # the same dict, in the new order (a module that imported ADAPTERS sees it)
    ADAPTERS.update(order)
    return adapter_class


def adapter_for(dataset: Any) -> BaseAdapter:
    """The adapter of the first kind in :data:`ADAPTERS` that ``dataset`` is."""
    return next(adapter for adapter in ADAPTERS.values() if adapter.matches(dataset))(dataset)


def source_ids(dataset: Any, root: str | os.PathLike[str] | None = None) -> list[Any]:
    """Plan source id of every item of ``dataset``.

    torchvision ``ImageFolder``/``DatasetFolder`` (``samples`` and ``root``) give each file's
    POSIX path relative to the root, as :func:`~dalda_aug.plan.build_plan` records it; timm
    ``ImageDataset`` gives its reader's root-relative file names; a Hugging Face ``datasets``
    image dataset gives its image files' paths, relative to ``root`` (the plan's ``data_root``)
    when inside it; a ``torch.utils.data.Subset`` maps through its indices; any other dataset
    gives its indices (each kind is an adapter of :data:`ADAPTERS`).
    """
    return adapter_for(dataset).source_ids(root)[0]


def plan_indices(dataset: Any, plan: Any, source_ids: Sequence[Any] | None = None) -> list[int]:
    """Indices, ascending, of the items of ``dataset`` whose source is in ``plan`` (an
    :class:`~dalda_aug.plan.AugmentationPlan` or its folder): for a plan made with ``--shots N``
    over a folder, the folder's few-shot subset, found by file path (not by re-drawing it).

    ``source_ids`` names each item's plan source (default :func:`source_ids`).
    ``torch.utils.data.Subset(dataset, plan_indices(dataset, plan))`` is what
    ``SyntheticAugmentedDataset(dataset, plan, cache, items="plan")`` serves.
    """
    from ..plan import AugmentationPlan

    if isinstance(plan, (str, os.PathLike)):
        plan = AugmentationPlan.load(plan)
    ids = list(source_ids) if source_ids is not None else adapter_for(dataset).source_ids(plan.data_root)[0]
    planned = set(plan.source_index()) | set(plan.sources_without_variants())  # a derived plan's unkept: real
    return [index for index, source in enumerate(ids) if source in planned]


def check_item_shape(item: Any, columns: tuple[str, str] | None) -> None:
    """Item 0 of a base read through its own ``__getitem__`` must be ``(PIL image, label)`` or a dict
    holding the image and label ``columns``; else :class:`InputError`."""
    if isinstance(item, dict):
        if columns is None or not all(c in item for c in columns):
            raise InputError(
                f"item 0 of the base dataset is a dict with keys {sorted(item)}; SyntheticAugmentedDataset "
                "understands (image, label) pairs and Hugging Face image datasets (image and label columns)")
        image = item[columns[0]]
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


def adopt_transforms(adapter: BaseAdapter, reads_files: bool, transform: Callable[[Any], Any] | None,
                     target_transform: Callable[[Any], Any] | None
                     ) -> tuple[Callable[[Any], Any] | None, Callable[[Any], Any] | None, dict[str, Any]]:
    """``(transform, target_transform, the base's adopted, by label)``: the ones given, else the base's
    where the dataset reads the base's files itself (its transform never runs there); any other base
    with a transform, or a transform given both to the base and here, is an :class:`InputError`."""
    given = {"transform": transform, "target_transform": target_transform}
    kind = type(adapter.innermost().dataset).__name__
    adopted: dict[str, Any] = {}
    for attr, label in (("transform", "Transform"), ("target_transform", "Target transform")):
        theirs = adapter.attr(attr)
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
        given[attr] = adopted[label] = theirs
    return given["transform"], given["target_transform"], adopted
