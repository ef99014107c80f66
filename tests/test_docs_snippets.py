"""Every fenced ```python block of README.md and docs/*.md runs as printed, offline (issue 20.3).

The files are read when the tests are collected, so a block edited since is tested as it now
reads. Each block runs in its own Python process, in a working folder laid out as the snippets
expect it:

* ``data/train/<class>/<image>``: photos that ship with scikit-image, small;
* ``plan/``: ``dalda-aug plan --data data/train --out plan --variants 2 --models tiny``;
* ``cache/``: ``dalda-aug warm --plan plan --cache cache --models tiny`` (the tiny models'
  CPU-sized defaults: 64 px, 2 steps);
* ``tiny/``: ``dalda-aug make-tiny-models tiny``,

with ``HF_HUB_OFFLINE=1`` and nothing reachable. The block must exit with status 0.

Conventions for documentation writers:

* ``# prints: TEXT`` at the end of a line: the block's standard output must contain ``TEXT``.
* ``# doctest: skip-offline`` anywhere in a block: the block needs the network (the hub, an API
  key) and is skipped here, with that reason. Use it sparingly: prefer a block that runs offline
  (``parse_backend("template")``, ``weights=None``) and say in a comment what to change online.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = "# doctest: skip-offline"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
_PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$", re.M)


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> list[tuple[str, str]]:
    found = []
    for doc in _documents():
        text = doc.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT).as_posix()}:{line}", match.group(1)))
    return found


BLOCKS = _blocks()


def test_the_documents_hold_python_blocks():
    # The runner must find them: README's training loop and the docs' clients at least.
    names = [name for name, _ in BLOCKS]
    assert any(n.startswith("README.md:") for n in names) and any(n.startswith("docs/") for n in names), names


def _photos(folder: Path) -> None:
    from PIL import Image
    from skimage import data

    photos = {"cat": ("chelsea", "cat"), "rocket": ("rocket", "astronaut")}
    for cls, names in photos.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(getattr(data, name)()).convert("RGB").resize((96, 64)).save(folder / cls / f"{name}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dalda_aug.cli import main

    work = tmp_path_factory.mktemp("snippets")
    _photos(work / "data" / "train")
    cwd = os.getcwd()
    os.chdir(work)  # the commands as a reader types them, relative paths included
    try:
        assert main(["make-tiny-models", "tiny"]) == 0
        assert main(["plan", "--data", "data/train", "--out", "plan", "--variants", "2", "--models", "tiny"]) == 0
        assert main(["warm", "--plan", "plan", "--cache", "cache", "--models", "tiny", "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    return work


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT",)}
    # A torch.distributed block defaults MASTER_PORT when torchrun did not set it; set it here as
    # torchrun would, to a free port (another process on the machine may hold the printed one).
    env.update(MASTER_PORT=_free_port(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(work / ".hf"), DALDA_AUG_CACHE=str(work / ".dalda-aug"),
               TORCH_HOME=str(work / ".torch"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs_offline(workdir, name, code):
    if SKIP_MARKER in code:
        pytest.skip(f"{name} is marked `{SKIP_MARKER}`: it needs the network")
    script = workdir / f"snippet_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, script.name], cwd=workdir, env=_env(workdir), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    for expected in _PRINTS.findall(code):
        assert expected in proc.stdout, f"{name}: expected {expected!r} in its output, got:\n{proc.stdout[-2000:]}"
    if re.search(r"^\s*print\(", code, re.M):
        assert proc.stdout.strip(), f"{name} prints, but wrote nothing"
