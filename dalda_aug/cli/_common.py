"""What several commands do the same way: declare a subcommand and its ``--data`` folder, pass
options on by name, refuse a plan folder that is taken, find the processes of ``accelerate
launch``, pick the default device.

The command modules import from here (never from the dispatcher, :mod:`dalda_aug.cli`), so each
small thing a command does has one place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_command", "add_data_argument", "options", "refuse_taken_plan_folder", "launched_processes",
           "default_device"]


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
    from .cache import partial_state

    return partial_state(device)


def default_device(device: str | None) -> str:
    """``device``, or (None or empty) ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
