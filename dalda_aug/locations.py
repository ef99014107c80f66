"""Where a model lives: the project's one rule for "hub id or local path" (bottom floor).

Every model location in the project (the Stable Diffusion pipeline, the VAE overrides, the
IP-Adapter, the CLIPScore model and checkpoint, the LLM of the prompt bank, the tokenizer used to
count prompt tokens, textual-inversion token files) is read by :func:`parse_location`, the one
rule for "hub id or local path":

1. a location that exists on disk (``~`` expanded; relative ones against ``base_dir`` when
   given, else the working directory) is a local path;
2. so is one *written as a path* even if it is missing: absolute, starting with ``./``, ``../``,
   ``~`` or ``.\\``, containing a backslash, more than one ``/`` (a hub id is ``name`` or
   ``owner/name``), or ending in a weight or config file extension (``.json``, ``.bin``, ``.pt``,
   ``.pth``, ``.ckpt``, ``.safetensors``);
3. anything else is a hub id (or, for open_clip, a registered name or pretrained tag).

So a missing ``models/sd`` is a hub id (``owner/name``) everywhere; write ``./models/sd`` to mean
the folder. Nothing here imports torch, diffusers or transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ModelLocation", "parse_location", "is_local_location", "describe_location", "user_cache_dir"]

_FILE_SUFFIXES = (".json", ".bin", ".pt", ".pth", ".ckpt", ".safetensors")


def user_cache_dir(*parts: str) -> Path:
    """This user's own cache folder for the library, joined with ``parts``: ``$DALDA_AUG_CACHE``,
    else ``$XDG_CACHE_HOME/dalda_aug``, else ``~/.cache/dalda_aug`` (the project's one rule; the
    built CLIP tokenizer, textual-inversion tokens, stat and coverage records live there). Not
    created here: each writer creates what it needs and says so in one line where it cannot."""
    root = os.environ.get("DALDA_AUG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dalda_aug")
    return Path(root).joinpath(*parts)


@dataclass(frozen=True)
class ModelLocation:
    """A parsed model location: ``kind`` is ``"local"`` (``value`` is the expanded path) or ``"hub"``."""

    kind: Literal["local", "hub"]
    value: str
    given: str

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def path(self) -> Path:
        """The local path (only meaningful when :attr:`is_local`)."""
        return Path(self.value)


def _written_as_path(text: str) -> bool:
    return (
        os.path.isabs(text)
        or text.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith(_FILE_SUFFIXES)
    )


def parse_location(location: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None) -> ModelLocation:
    """Apply the project's one rule (see the module docstring) to a model location."""
    given = os.fspath(location)
    expanded = os.path.expanduser(given)
    candidate = expanded
    if base_dir is not None and not os.path.isabs(expanded):
        candidate = os.path.join(os.fspath(base_dir), expanded)
    if os.path.exists(candidate) or _written_as_path(given):
        return ModelLocation("local", str(Path(candidate).resolve()) if base_dir is not None else candidate, given)
    return ModelLocation("hub", given, given)


def is_local_location(location: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when :func:`parse_location` reads ``location`` as a local path."""
    return parse_location(location, base_dir=base_dir).is_local


def describe_location(location: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """Human-readable description of a model location, for error messages."""
    parsed = parse_location(location)
    text = f"folder {parsed.value!r}" if parsed.is_local else f"hub repository {location!r}"
    if subfolder:
        text += f", subfolder {subfolder!r}"
    if revision:
        text += f", revision {revision!r}"
    return text
