"""What several commands do the same way: declare a subcommand and its ``--data`` folder, pass
options on by name, refuse a plan folder that is taken, find the processes of ``accelerate
launch``, pick the default device, take ``--threads``.

The command modules import from here (never from the dispatcher, :mod:`dalda_aug.cli`), so each
small thing a command does has one place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_command", "add_data_argument", "options", "refuse_taken_plan_folder", "launched_processes",
           "default_device", "accelerate_cpu", "partial_state", "add_threads_argument", "check_threads", "set_threads"]


def add_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str,
                run: Callable[[argparse.Namespace], int], help: str, description: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: ``help`` is its line in ``dalda-aug --help``,
    ``description`` heads its own ``--help``; ``run(args)`` is what it does (``args.func``)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run)
    return parser


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """``--data``, the image folder of real images a command reads (required)."""
    parser.add_argument("--data", required=True, help="image folder: ROOT/<class>/<image>")


def options(args: argparse.Namespace, *names: str, given: bool = False) -> dict[str, Any]:
    """``{name: args.name}`` for each of ``names``: options handed on under their own names
    (with ``given``, only those not None)."""
    return {name: getattr(args, name) for name in names if not given or getattr(args, name) is not None}


def refuse_taken_plan_folder(out: Path, overwrite: bool) -> None:
    """A plan folder ``--out`` that already holds a plan is refused unless ``--overwrite``."""
    from ..errors import InputError

    if (out / "plan.json").exists() and not overwrite:
        raise InputError(f"--out {out} already holds a plan; pass --overwrite to replace it")


def launched_processes(device: str | None) -> Any:
    """``accelerate.PartialState`` when the command was started by ``accelerate launch`` or
    ``torchrun`` with more than one process (``WORLD_SIZE`` > 1): the processes then share the
    work and the main process writes the result. ``None`` otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return partial_state(device)


def accelerate_cpu() -> bool:
    """Whether ``accelerate launch --cpu`` asked for the CPU (``ACCELERATE_USE_CPU``), read in one place."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def partial_state(device: str | None) -> Any:
    """``accelerate.PartialState`` (rank and world size under ``accelerate launch``).

    Processes run on the CPU (gloo) when ``--device cpu`` is given, when accelerate was told
    ``--cpu`` (``ACCELERATE_USE_CPU``) or when there is no CUDA device. Note that
    ``accelerate launch --cpu`` starts a single process unless MPI is set up; on a machine
    without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N CPU processes.
    """

    import torch

    from ..errors import require

    accelerate = require("accelerate", "generate")
    cpu = (
        (device is not None and device.startswith("cpu"))
        or accelerate_cpu()
        or not torch.cuda.is_available()
    )
    return accelerate.PartialState(cpu=cpu)


def default_device(device: str | None) -> str:
    """``device``, or (None or empty) ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the command's model work."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, or the models file's: 1 for the tiny models, whose "
                             "small layers lose more to thread hand-offs than they gain)")


def check_threads(threads: int | None) -> None:
    """``--threads`` is None or at least 1; else one line naming it."""
    if threads is not None and threads < 1:
        from ..errors import InputError

        raise InputError(f"--threads must be >= 1, got {threads}")


def set_threads(threads: int | None) -> None:
    """Give torch ``--threads`` CPU threads (checked); nothing when it is not given."""
    check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
