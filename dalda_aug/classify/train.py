"""Training and evaluating a classifier: :func:`train_classifier`, :func:`evaluate` and the autocast
context they share. torch and tqdm are imported on use.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from ..errors import InputError
from .spec import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    import contextlib

    import torch

    from ..plan.clipscore import Device

__all__ = ["autocast", "train_classifier", "evaluate"]


def _check_targets(y: Any, num_classes: int | None) -> None:
    import torch

    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"targets must be integer class indices (one per image), got {getattr(y, 'dtype', type(y))}")
    if y.numel() and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise InputError(f"target {int(y.max()) if int(y.min()) >= 0 else int(y.min())} is outside the "
                         f"{num_classes} classes of the model")


def autocast(device: Device, dtype_name: str | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype_name`` (e.g. ``"bfloat16"``) on ``device``'s type; None: no autocast."""
    import contextlib

    import torch

    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype_name))


def train_classifier(
    model: torch.nn.Module,
    train_dataset: Any,
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``train_dataset`` (any Dataset of ``(image tensor, class index)``).

    Cross-entropy, a constant learning rate, the optimizer of ``config`` (or the backbone's
    default). Calls ``train_dataset.set_epoch(epoch)`` before each epoch when it exists. Every
    random draw (batch order, transforms and dropout in the main process, worker seeds) derives
    from ``config.seed``; the caller's global RNG state is restored afterwards.

    Returns one record per epoch: ``epoch`` (from 0), ``loss`` and ``top1`` (running training
    values), ``steps``, ``images``, ``lr`` and ``seconds``; ``on_epoch_end(record)`` gets each.
    No test data is looked at here: the model after the last epoch is the result.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm.auto import tqdm

    if not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}")
    n = len(train_dataset)
    if n == 0:
        raise InputError("train_dataset is empty")
    spec = getattr(model, "spec", None)
    num_classes = spec.num_classes if spec is not None else None
    device = torch.device(config.device)
    model.to(device)

    opt_name = config.optimizer or (spec.optimizer if spec else "adam")
    lr = config.lr if config.lr is not None else (spec.lr if spec else 1e-4)
    wd = config.weight_decay if config.weight_decay is not None else (spec.weight_decay if spec else 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameter")
    opt_cls = torch.optim.AdamW if opt_name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=lr, weight_decay=wd)

    generator = torch.Generator().manual_seed(config.seed)
    if config.iterations_per_epoch is None:
        sampler = RandomSampler(train_dataset, generator=generator)
        steps_per_epoch = math.ceil(n / config.batch_size)
    else:
        sampler = RandomSampler(train_dataset, replacement=True, generator=generator,
                                num_samples=config.iterations_per_epoch * config.batch_size)
        steps_per_epoch = config.iterations_per_epoch
    # No persistent workers: fresh workers each epoch see the state set by set_epoch().
    loader = DataLoader(train_dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.num_workers, generator=generator,
                        pin_memory=device.type == "cuda")

    history: list[dict[str, Any]] = []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        bar = tqdm(total=config.epochs * steps_per_epoch, desc="train", unit="batch", disable=not progress)
        try:
            for epoch in range(config.epochs):
                if hasattr(train_dataset, "set_epoch"):
                    train_dataset.set_epoch(epoch)
                model.train()
                start = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float32, device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                seen = steps = 0
                for x, y in loader:
                    _check_targets(y, num_classes)
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    with autocast(device, config.autocast_dtype):
                        logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
                    optimizer.step()
                    with torch.no_grad():
                        loss_sum += loss.detach() * y.numel()
                        correct += (logits.argmax(dim=1) == y).sum()
                    seen += y.numel()
                    steps += 1
                    bar.update(1)
                    if progress and (steps % 10 == 1 or steps == steps_per_epoch):  # .item() syncs the device
                        bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{loss.item():.4f}", refresh=False)
                record = {
                    "epoch": epoch,
                    "loss": float(loss_sum) / max(seen, 1),
                    "top1": int(correct) / max(seen, 1),
                    "steps": steps,
                    "images": seen,
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                }
                history.append(record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
        finally:
            bar.close()
    model.eval()
    return history


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Device | None = None,
    autocast_dtype: Literal["bfloat16"] | None = None,
    progress: bool = True,
    counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on every item of ``dataset`` (a Dataset of ``(tensor, class index)``).

    Returns ``{"top1", "mean_per_class", "per_class", "per_class_n", "n", "forwards"}``: ``top1``
    is the fraction of correct items; ``per_class[c]`` the accuracy on class ``c`` (``None`` when
    the dataset has no item of it); ``mean_per_class`` the mean of the classes present;
    ``forwards`` the number of images the model ran on. The model's device is used unless
    ``device`` is given; its train/eval mode is restored afterwards.

    ``counts``: item ``i`` counts ``counts[i]`` times (draws with replacement of one item, 0 for
    none), the model still running once on it. The model runs in eval mode on a deterministic
    ``dataset``, so each draw of an item gets the same prediction, and the result is exactly that
    of evaluating every draw (``n`` = ``sum(counts)``).
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise InputError("the evaluation dataset is empty")
    if autocast_dtype not in (None, "bfloat16"):
        raise InputError(f"autocast_dtype must be None or 'bfloat16', got {autocast_dtype!r}")
    weights = None
    if counts is not None:
        if len(counts) != len(dataset) or any(not isinstance(c, int) or c < 0 for c in counts):
            raise InputError(f"counts must hold one integer >= 0 per item ({len(dataset)}), got {len(counts)} values")
        weights = torch.tensor(list(counts), dtype=torch.int64)
    spec = getattr(model, "spec", None)
    num_classes = spec.num_classes if spec is not None else None
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    correct: torch.Tensor | None = None
    total: torch.Tensor | None = None
    forwards = 0
    try:
        with torch.inference_mode():
            for x, y in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
                _check_targets(y, num_classes)
                with autocast(device, autocast_dtype):
                    logits = model(x.to(device, non_blocking=True))
                pred = logits.argmax(dim=1).cpu()
                if num_classes is None:
                    num_classes = logits.shape[1]
                    _check_targets(y, num_classes)
                if correct is None or total is None:
                    correct = torch.zeros(num_classes, dtype=torch.int64)
                    total = torch.zeros(num_classes, dtype=torch.int64)
                w = torch.ones_like(y) if weights is None else weights[forwards:forwards + y.numel()]
                total += torch.bincount(y, weights=w, minlength=num_classes).to(torch.int64)
                hit = pred == y
                correct += torch.bincount(y[hit], weights=w[hit], minlength=num_classes).to(torch.int64)
                forwards += y.numel()
    finally:
        model.train(was_training)
    assert correct is not None and total is not None  # the dataset is not empty
    if int(total.sum()) == 0:
        raise InputError("the evaluation counts are all 0")
    present = total > 0
    per_class = [int(c) / int(t) if t else None for c, t in zip(correct, total)]
    return {
        "top1": int(correct.sum()) / int(total.sum()),
        "mean_per_class": float((correct[present].double() / total[present].double()).mean()),
        "per_class": per_class,
        "per_class_n": [int(t) for t in total],
        "n": int(total.sum()),
        "forwards": forwards,
    }
