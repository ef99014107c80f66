"""Helpers shared by several test modules: ``from helpers import ...``.

tests/ has no ``__init__.py``, so pytest puts this folder on ``sys.path`` (as for ``llm_server``).
Nothing here is a test or a fixture; each function says what it writes or asserts.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image


# -- images on disk ----------------------------------------------------------------------------------
def noise(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    """An RGB image of uniform noise, ``size`` = (width, height), the same pixels for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def noise_folder(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (24, 20)) -> Path:
    """``root/<class>/<i>.png`` for i < per_class: ``noise(10 * c + i, size)`` for the c-th class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise(10 * c + i, size=size).save(root / name / f"{i}.png")
    return root


def write_photos(root: Path, per_class: int, offset: int) -> None:
    """``root/<class>/<i>.png``: small crops of two real photos (skimage's chelsea and coffee, as
    classes cat and coffee), different crops per split (``offset``)."""
    from skimage import data

    for name, array in (("cat", data.chelsea()), ("coffee", data.coffee())):
        img = Image.fromarray(array)
        (root / name).mkdir(parents=True)
        w, h = img.size
        for i in range(per_class):
            k = offset + i
            box = (k * w // 12, k * h // 16, w // 2 + k * w // 12, h // 2 + k * h // 16)
            img.crop(box).resize((48, 40)).save(root / name / f"{i}.png")


def write_toy(base: Path) -> Path:
    """``base/toy/{train,test}``: :func:`write_photos` with 3 photos per class in each, other crops in test."""
    write_photos(base / "toy" / "train", per_class=3, offset=0)
    write_photos(base / "toy" / "test", per_class=3, offset=3)
    return base / "toy"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit grey PNG of side x side pixels (900 million for 30000): a few hundred KB on disk."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


# -- a file the base cannot read ----------------------------------------------------------------------
def assert_workers_name_the_file(loader: Any, ds: Any, path: Path, reason: str, index: int) -> None:
    """Iterating ``loader`` (DataLoader workers) fails with an :class:`ImageError` naming ``path`` and
    ``reason``, which is both an ``OSError`` and a ``DaldaError``; reading ``ds[index]`` in this
    process raises an ``ImageError`` naming ``path`` too."""
    from dalda_aug.errors import DaldaError, ImageError

    with pytest.raises(ImageError) as info:
        for _ in loader:
            pass
    assert str(path) in str(info.value) and reason in str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, DaldaError)
    with pytest.raises(ImageError, match=str(path)):  # in this process too
        ds[index]


# -- the CLI in a subprocess ---------------------------------------------------------------------------
def cli_env() -> dict[str, str]:
    """This environment, offline, one OpenMP thread, and no RANK or ACCELERATE_USE_CPU of a launcher."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_dalda(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m dalda_aug ARGS`` in :func:`cli_env`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "dalda_aug", *args], env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# -- scripts (benchmarks/, examples/) ------------------------------------------------------------------
def load_script(path: Path, name: str) -> ModuleType:
    """The script at ``path`` imported as module ``name`` (in ``sys.modules``: dataclasses look
    their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(bench: Any, argv: list[str]) -> Any:
    """``bench.main(argv)``; the torch thread count its --threads option changes is put back."""
    import torch

    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)
