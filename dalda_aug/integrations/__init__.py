"""Hooks that keep :class:`~dalda_aug.dataset.SyntheticAugmentedDataset`'s choices exact when a
training framework resumes a run: each pins the epoch the framework is at (``set_epoch``), so a run
restored from a checkpoint serves epoch e's choices in epoch e, not epoch 0's again.

* :mod:`dalda_aug.integrations.lightning`: ``SyntheticEpochCallback`` (PyTorch Lightning);
* :mod:`dalda_aug.integrations.ignite`: ``attach_epoch(engine, dataset)`` (pytorch-ignite).

Each module imports its framework when imported; :func:`find_datasets` needs none.
"""

from __future__ import annotations

from typing import Any

from ..dataset import SyntheticAugmentedDataset

__all__ = ["find_datasets", "pin_epoch"]


def find_datasets(obj: Any) -> list[SyntheticAugmentedDataset]:
    """Every :class:`SyntheticAugmentedDataset` reachable from ``obj``: a dataset, a DataLoader (its
    ``dataset``), ``Subset`` (``dataset``), ``ConcatDataset`` (``datasets``), wrappers that name what
    they wrap ``dataset``/``datasets``/``base_dataloader``/``dataloader``/``loader`` (accelerate's
    loaders, timm's), and lists, tuples and dicts of those; each once."""
    found: dict[int, SyntheticAugmentedDataset] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen or isinstance(item, (str, bytes, int, float)):
            continue
        seen.add(id(item))
        if isinstance(item, SyntheticAugmentedDataset):
            found.setdefault(id(item), item)
            continue
        if isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
            continue
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
            continue
        for name in ("datasets", "dataset", "base_dataloader", "dataloader", "loader"):
            try:
                inner = getattr(item, name, None)
            except Exception:  # a proxy whose attribute lookup fails otherwise: nothing to find there
                continue
            if inner is not None and inner is not item:
                stack.append(inner)
    return list(found.values())


def pin_epoch(datasets: list[SyntheticAugmentedDataset], epoch: int) -> None:
    """``set_epoch(epoch)`` on each of ``datasets``."""
    for dataset in datasets:
        dataset.set_epoch(int(epoch))
