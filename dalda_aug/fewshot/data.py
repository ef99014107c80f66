"""The benchmark's images: loading the training and test folders, splitting one folder per class,
and the reference code's few-shot draw and validation halves.

:func:`load_data` returns a :class:`Data`: the training images as an
:class:`~dalda_aug.data.ImageSource` and where the test images are, as torchvision's
``ImageFolder`` lists them (the classifier reads both through ``ImageFolder``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError

__all__ = [
    "Data",
    "load_data",
    "dataset_name",
    "split_per_class",
    "check_folder_order",
    "reference_class_order",
    "POOL_KINDS",
    "pool_kind",
    "reference_halves",
    "reference_few_shot_indices",
]


@dataclass
class Data:
    """The training images (``source``: an ImageSource) and where the test images are."""

    name: str
    source: Any  # ImageSource of the training split
    train_root: Path  # ImageFolder root holding the training images
    train_indices: list[int]  # source item i = ImageFolder(train_root)[train_indices[i]]
    test_root: Path
    test_indices: list[int] | None  # None: every image of test_root
    split: dict[str, Any]
    # "reference": per seed, the second halves of the reference's per-class permutations of
    # test_root (test_targets, classes iterated in class_order) are the evaluation split.
    eval_split: str = "whole"
    test_targets: list[int] | None = None
    class_order: list[int] | None = None  # labels in the reference's class order (None: label order)
    pool: str = "no classes.json"  # pool_kind() of the training folder

    def eval_indices(self, seed: int) -> list[int] | None:
        """Items of ImageFolder(test_root) evaluated for ``seed`` (None: every item)."""
        if self.eval_split == "whole":
            return self.test_indices
        assert self.test_targets is not None
        return reference_halves(self.test_targets, seed, self.class_order)[1]


def reference_class_order(folder: Path, classes: Sequence[str]) -> tuple[list[int] | None, str | None]:
    """The reference's class order for the reference draws: the key order of the ``classes.json``
    that ``examples/prepare_datasets.py`` writes beside the split folders (label order of the
    original dataset; for Flowers-102 not alphabetical), else None (folder order)."""
    path = folder.parent / "classes.json"
    if not path.is_file():
        return None, None
    try:
        listed = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None, None
    if not isinstance(listed, dict) or sorted(listed) != sorted(classes):
        return None, None
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in listed], str(path)


# What pool_kind() calls a folder: the reference's pool, another split prepare_datasets.py wrote,
# or a folder without a classes.json that lists its classes (the reference draws then follow
# folder order, not the reference's class order).
POOL_KINDS = ("reference", "official", "no classes.json")


def pool_kind(folder: Path, classes: Sequence[str]) -> str:
    """Which pool ``folder`` is, from the ``classes.json`` that ``examples/prepare_datasets.py``
    writes beside the split folders: ``"reference"`` when it holds the pool the reference code
    permutes (``reference_pool``; files written without that key: ``split`` ``"reference"``, or
    Pets, whose two splits are the same files), else its ``split`` (``"official"``), or ``"no
    classes.json"`` when there is none or it does not list ``classes``."""
    from .._io import read_json_object

    path = folder.parent / "classes.json"
    if not path.is_file():
        return "no classes.json"
    try:
        info = read_json_object(path, "classes.json")
    except InputError:
        return "no classes.json"
    listed = info.get("classes")
    if not isinstance(listed, dict) or sorted(listed) != sorted(classes):
        return "no classes.json"
    reference = info.get("reference_pool")
    if not isinstance(reference, bool):
        reference = info.get("split") == "reference" or info.get("dataset") == "pets"
    return "reference" if reference else str(info.get("split", "official"))


def dataset_name(args: argparse.Namespace) -> str:
    """``--name``, else the dataset folder's name (its parent's for a ``train``-like folder)."""
    if args.name:
        return str(args.name)
    folder = (args.data or args.train).resolve()
    return str(folder.parent.name if folder.name.lower() in ("train", "training", "trainval", "all") else folder.name)


def split_per_class(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: ``round(fraction · count)`` images of each class go to test (at
    least one, and at least one stays for training)."""
    import numpy as np

    labels = np.asarray(targets)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < 2:
            raise InputError(f"class {int(label)} has {members.size} image: need 2 or more to split train/test")
        n_test = min(max(int(round(members.size * fraction)), 1), members.size - 1)
        perm = np.random.default_rng([int(seed), int(label), 0x7E57]).permutation(members.size)
        test.extend(int(i) for i in members[perm[:n_test]])
        train.extend(int(i) for i in members[perm[n_test:]])
    return sorted(train), sorted(test)


def check_folder_order(source: Any, root: Path) -> None:
    """ImageSource and torchvision's ImageFolder must list the same files in the same order."""
    from torchvision.datasets import ImageFolder

    from ..dataset import source_ids

    folder = ImageFolder(str(root))
    if folder.classes != source.classes or source_ids(folder) != [it.source for it in source.items]:
        raise InputError(f"torchvision's ImageFolder lists {root} differently from dalda_aug "
                         "(hidden class folders or unusual file names?)")


def load_data(args: argparse.Namespace, eval_split: str = "whole") -> Data:
    """The images of ``--data`` (split here) or ``--train`` and ``--test``."""
    if args.data is not None:
        if args.train is not None or args.test is not None:
            raise InputError("give either --data (one folder, split here) or --train and --test, not both")
        if eval_split == "reference":  # the pool itself; halves per seed (Data.eval_indices)
            return _reference_pool(args, eval_split)
        return _split_folder(args)
    if args.train is None or args.test is None:
        raise InputError("give --train DIR and --test DIR, or --data DIR (with --test-fraction)")
    return _train_and_test_folders(args, eval_split)


def _reference_pool(args: argparse.Namespace, eval_split: str) -> Data:
    """``--data`` under ``--eval-split reference``: the whole folder, halved per seed."""
    from ..data import ImageSource

    pool: Any = ImageSource.from_folder(args.data)
    check_folder_order(pool, args.data)
    root = Path(pool.root)
    order, order_file = reference_class_order(args.data.resolve(), pool.classes)
    split = {"kind": "reference halves of one pool", "folder": str(root), "images": len(pool),
             "train_images": len(pool), "test_images": None, "class_order": order_file}
    return Data(dataset_name(args), pool, root, list(range(len(pool))), root, None, split,
                eval_split, list(pool.targets), order, pool_kind(args.data.resolve(), pool.classes))


def _split_folder(args: argparse.Namespace) -> Data:
    """``--data``: one folder split per class into training and test images."""
    from ..data import ImageSource

    if not 0.0 < args.test_fraction < 1.0:
        raise InputError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
    full: Any = ImageSource.from_folder(args.data)
    check_folder_order(full, args.data)
    train_idx, test_idx = split_per_class(full.targets, args.test_fraction, args.split_seed)
    root = Path(full.root)
    split = {"kind": "per-class split", "folder": str(root), "test_fraction": args.test_fraction,
             "split_seed": args.split_seed, "train_images": len(train_idx), "test_images": len(test_idx)}
    return Data(dataset_name(args), full.subset(train_idx), root, train_idx, root, test_idx, split,
                pool=pool_kind(args.data.resolve(), full.classes))


def _train_and_test_folders(args: argparse.Namespace, eval_split: str) -> Data:
    """``--train`` and ``--test``: two folders with the same class folders."""
    from ..data import ImageSource, find_classes

    source: Any = ImageSource.from_folder(args.train)
    check_folder_order(source, args.train)
    test_classes, _ = find_classes(args.test)
    if test_classes != source.classes:
        missing = sorted(set(source.classes) ^ set(test_classes))
        raise InputError(f"the class folders of --test {args.test} differ from --train's (e.g. {missing[:3]})")
    from torchvision.datasets import ImageFolder

    test_folder = ImageFolder(str(args.test))
    n_test = len(test_folder)
    split: dict[str, Any] = {"kind": "folders", "train": str(Path(source.root)), "test": str(args.test.resolve()),
                             "train_images": len(source), "test_images": n_test}
    order = None
    if eval_split == "reference":
        order, split["class_order"] = reference_class_order(args.train.resolve(), source.classes)
        split["test_images"] = None  # per seed
    return Data(dataset_name(args), source, Path(source.root), list(range(len(source))), args.test.resolve(), None,
                split, eval_split, list(test_folder.targets), order, pool_kind(args.train.resolve(), source.classes))


def _reference_permutations(targets: Sequence[int], seed: int,
                            class_order: Sequence[int] | None = None) -> list[tuple[Any, Any]]:
    """(members, permutation) per class, drawn as the reference's dataset classes draw them: one
    ``np.random.default_rng(seed)``, ``rng.permutation(n_class)`` per class in the reference's
    class order (``class_order``, default label order)."""
    import numpy as np

    labels_of = np.asarray(targets)
    rng = np.random.default_rng(seed)
    labels = list(np.unique(labels_of)) if class_order is None else list(class_order)
    out = []
    for label in labels:
        members = np.flatnonzero(labels_of == label)
        out.append((members, rng.permutation(members.size)))
    return out


def reference_halves(targets: Sequence[int], seed: int,
                     class_order: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """The reference's (training, validation) halves of one folder for ``seed``: per class
    ``np.array_split(permutation, 2)`` (kkyuhun94/dalda ``semantic_aug/datasets/*.py``, split
    "train" takes part 0, "val" part 1). Sorted indices."""
    import numpy as np

    first: list[int] = []
    second: list[int] = []
    for members, perm in _reference_permutations(targets, seed, class_order):
        a, b = np.array_split(perm, 2)
        first.extend(int(i) for i in members[a])
        second.extend(int(i) for i in members[b])
    return sorted(first), sorted(second)


def reference_few_shot_indices(targets: Sequence[int], shots: int, seed: int,
                               class_order: Sequence[int] | None = None) -> list[int]:
    """Few-shot indices drawn as the reference code draws them (kkyuhun94/dalda
    ``semantic_aug/datasets/*.py``): one ``np.random.default_rng(seed)`` for the dataset; for
    each class in the reference's class order ``rng.permutation(n_class)``, its first half
    (``np.array_split(perm, 2)[0]``) is the training pool, whose first ``shots`` are used.
    The same draw as the reference's only when the folder holds the pool the reference permutes,
    in its file order (``prepare_datasets.py --split reference``). Returned in ascending index
    order; nested in ``shots`` for a seed."""
    import numpy as np

    chosen: list[int] = []
    for members, perm in _reference_permutations(targets, seed, class_order):
        pool = np.array_split(perm, 2)[0]
        if pool.size < shots:
            raise InputError(f"a class has {members.size} training image(s); the reference draw keeps "
                             f"the first half ({pool.size}), fewer than {shots} shots")
        chosen.extend(int(i) for i in members[pool[:shots]])
    return sorted(chosen)
