"""PyTorch Lightning: :class:`SyntheticEpochCallback` pins the training set(s) to the trainer's
epoch, so ``Trainer.fit(ckpt_path=...)`` serves the choices the uninterrupted run would have.

Lightning calls a sampler's ``set_epoch`` but never a dataset's. Without ``set_epoch`` the dataset
counts draws in process memory, which a resumed process starts again from zero: its first resumed
epoch would serve epoch 0's choices. With the callback, epoch e serves epoch e's choices, exactly.
It is a ``lightning.pytorch`` callback (the ``lightning`` package), as the rest of the project uses.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

from ..dataset import SyntheticAugmentedDataset
from . import find_datasets, pin_epoch

__all__ = ["SyntheticEpochCallback"]


def _resumed_epoch(checkpoint: dict[str, Any]) -> int | None:
    """The epoch a checkpoint resumes at: the epochs its fit loop had processed (Lightning's own
    rule for ``current_epoch`` after a restore), else its ``epoch``."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        epoch = checkpoint.get("epoch")
        return int(epoch) if isinstance(epoch, int) else None


class SyntheticEpochCallback(pl.Callback):
    """Pin each :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` of the training data to
    ``trainer.current_epoch`` at the start of every training epoch (``set_epoch``).

    The datasets are found in the trainer's train dataloader(s), through ``Subset``,
    ``ConcatDataset`` and lists or dicts of loaders; ``datasets`` adds more. When a checkpoint is
    restored, the callback also pins the resumed epoch before Lightning starts the first iterator,
    so DataLoader workers that prefetch before ``on_train_epoch_start`` already draw that epoch.
    A training epoch in which no dataset is found warns (nothing would be pinned).
    """

    def __init__(self, *datasets: SyntheticAugmentedDataset) -> None:
        self.datasets = list(datasets)
        self._first_epoch = False

    def _datasets(self, trainer: pl.Trainer, before_setup: bool = False) -> list[SyntheticAugmentedDataset]:
        found = find_datasets(self.datasets)
        if before_setup:  # the loaders fit() was given, or the module/datamodule's attributes
            # Lightning keeps what fit() was given in its fit loop's data source (no public accessor
            # before the loop builds its loaders); a Lightning without it finds nothing here.
            source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
            instance = getattr(source, "instance", None)
            if isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
                instance = [value for value in vars(instance).values()
                            if not isinstance(value, (pl.Trainer, pl.LightningModule))]
            found += find_datasets(instance)
        else:
            found += find_datasets(trainer.train_dataloader)
        return list({id(d): d for d in found}.values())

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        epoch = _resumed_epoch(checkpoint)
        if epoch is not None:
            pin_epoch(self._datasets(trainer, before_setup=True), epoch)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_epoch = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datasets = self._datasets(trainer)
        if not datasets:
            warnings.warn("SyntheticEpochCallback found no SyntheticAugmentedDataset in the training dataloader(s): "
                          "nothing is pinned (pass the dataset: SyntheticEpochCallback(train))", UserWarning,
                          stacklevel=2)
        if self._first_epoch:
            self._first_epoch = False
            self._check_early_draws(datasets, trainer.current_epoch)
        pin_epoch(datasets, trainer.current_epoch)

    @staticmethod
    def _check_early_draws(datasets: list[SyntheticAugmentedDataset], epoch: int) -> None:
        """Lightning starts a fit's first iterator before this hook: DataLoader workers may already
        have drawn items, for the epoch the dataset was at. Say so when that is not ``epoch``."""
        for dataset in datasets:
            state = dataset.state_dict()
            drawn_for = max(int(state["epoch"]), 0)  # unpinned, an item's first draw is epoch 0's
            taken = int(state["draws"].sum())
            if taken and drawn_for != epoch:
                warnings.warn(
                    f"{taken} items were drawn for epoch {drawn_for} before SyntheticEpochCallback pinned epoch "
                    f"{epoch} (DataLoader workers fetch ahead, and the dataset was not found when the checkpoint "
                    "was loaded): they are served with other choices than the uninterrupted run's. Pass the "
                    "dataset to the callback, SyntheticEpochCallback(train), or build it before fit()",
                    UserWarning, stacklevel=3)
