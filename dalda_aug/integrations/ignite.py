"""pytorch-ignite: :func:`attach_epoch` pins a dataset to the engine's epoch at every
``EPOCH_STARTED``, so a run restored with ``Checkpoint.load_objects`` (which restores
``engine.state.epoch``) serves the choices the uninterrupted run would have.

ignite counts epochs from 1 (``state.epoch`` is 1 during the first epoch); the dataset counts
from 0, so epoch ``state.epoch - 1`` is pinned.
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from ..errors import InputError
from . import find_datasets, pin_epoch

__all__ = ["attach_epoch"]


def attach_epoch(engine: Engine, dataset: Any) -> RemovableEventHandle:
    """Pin each :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` in ``dataset`` (a dataset, a
    DataLoader, a ``Subset``/``ConcatDataset`` of them) to ``engine.state.epoch - 1`` when each
    epoch starts. Returns the handle (``.remove()`` detaches it).

    Raises:
        dalda_aug.errors.InputError: ``dataset`` holds no SyntheticAugmentedDataset.
    """
    datasets = find_datasets(dataset)
    if not datasets:
        raise InputError(f"attach_epoch: no SyntheticAugmentedDataset in {type(dataset).__name__}")

    def pin(engine: Engine) -> None:
        pin_epoch(datasets, engine.state.epoch - 1)

    return engine.add_event_handler(Events.EPOCH_STARTED, pin)
