"""The prompt bank: :class:`PromptBank` and its file format (``dalda_aug.prompts/1``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .._io import read_json_object, write_atomic
from ..errors import InputError
from .presets import PHOTO_TEMPLATE
from ._text import NAME_PLACEHOLDER, check_class_names, check_template, fill_template, name_key, utc_now

__all__ = ["PromptBank", "PROMPTS_FORMAT", "DEFAULT_TEMPLATE"]

PROMPTS_FORMAT = "dalda_aug.prompts/1"
DEFAULT_TEMPLATE = PHOTO_TEMPLATE


class PromptBank:
    """``{class name: [prompt, ...]}`` plus how it was made (``provenance``).

    A prompt may hold the placeholder ``{name}``, replaced by the class name in :meth:`render`.
    Lookups (``bank[name]``, ``name in bank``, :meth:`render`) take the class name as stored or
    any spelling equal to it up to case, ``_``/``-``/spaces ("american_bulldog" finds
    "american bulldog"), so folder names work too.

    Saved as ``{"format": "dalda_aug.prompts/1", "provenance": {...}, "prompts": {...}}`` in
    UTF-8 with non-ASCII text kept as is.
    """

    def __init__(self, prompts: Mapping[str, Sequence[str]], provenance: Mapping[str, Any] | None = None):
        if not isinstance(prompts, Mapping):
            raise InputError(f"prompts must be a mapping {{class name: [prompt, ...]}}, got {type(prompts).__name__}")
        self.prompts: dict[str, list[str]] = {}
        for name, items in prompts.items():
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"class names must be non-empty strings, got {name!r}")
            if isinstance(items, str) or not isinstance(items, Sequence):
                raise InputError(f"prompts of class {name!r} must be a list of strings, got {items!r}")
            for p in items:
                if not isinstance(p, str) or not p.strip():
                    raise InputError(f"class {name!r} has an empty or non-string prompt: {p!r}")
            self.prompts[name] = list(items)
        self.provenance: dict[str, Any] = dict(provenance or {})
        self._keys: dict[str, str | None] = {}
        for name in self.prompts:
            key = name_key(name)
            # Two classes that differ only in case/separators: only their exact names find them.
            self._keys[key] = None if key in self._keys else name

    # -- mapping-like access ------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.prompts)

    def resolve(self, class_name: str) -> str | None:
        """The stored class name that ``class_name`` refers to, or ``None``."""
        if class_name in self.prompts:
            return class_name
        if not isinstance(class_name, str):
            return None
        return self._keys.get(name_key(class_name))

    def __contains__(self, class_name: object) -> bool:
        return isinstance(class_name, str) and self.resolve(class_name) is not None

    def __getitem__(self, class_name: str) -> list[str]:
        key = self.resolve(class_name)
        if key is None:
            raise KeyError(f"class {class_name!r} is not in the prompt bank ({len(self.prompts)} classes)")
        return list(self.prompts[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PromptBank):
            return NotImplemented
        return self.prompts == other.prompts and self.provenance == other.provenance

    def __repr__(self) -> str:
        total = sum(len(v) for v in self.prompts.values())
        src = self.provenance.get("backend", "?")
        model = self.provenance.get("model")
        return f"PromptBank({len(self.prompts)} classes, {total} prompts, backend={src!r}" + (
            f", model={model!r})" if model else ")"
        )

    def render(self, class_name: str, k: int) -> str:
        """Prompt ``k`` (modulo the class's count) of ``class_name`` with ``{name}`` filled in."""
        key = self.resolve(class_name)
        if key is None:
            raise KeyError(f"class {class_name!r} is not in the prompt bank ({len(self.prompts)} classes)")
        items = self.prompts[key]
        if not items:
            raise InputError(f"the prompt bank has no prompt for class {key!r}")
        return items[int(k) % len(items)].replace(NAME_PLACEHOLDER, key)

    def short_classes(self, m: int) -> dict[str, int]:
        """Classes with fewer than ``m`` prompts, with their counts."""
        return {name: len(items) for name, items in self.prompts.items() if len(items) < m}

    # -- construction and files ---------------------------------------------------------------
    @classmethod
    def from_template(cls, class_names: Iterable[str], template: str = DEFAULT_TEMPLATE) -> "PromptBank":
        """One prompt per class from ``template`` ("{}" or "{name}" stands for the class name)."""
        names = check_class_names(class_names)
        check_template(template)
        prompts = {n: [fill_template(template, n)] for n in names}
        return cls(prompts, {"backend": "template", "template": template, "date": utc_now()})

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROMPTS_FORMAT, "provenance": self.provenance, "prompts": self.prompts}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bank as UTF-8 JSON, atomically (a crash leaves the previous file intact)."""
        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        except TypeError as exc:
            raise InputError(f"the prompt bank's provenance is not JSON-serialisable: {exc}") from None
        write_atomic(path, text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PromptBank":
        """Read a bank written by :meth:`save` (or a plain ``{class: [prompts]}`` JSON object)."""
        path = Path(path)
        data = read_json_object(path, "prompt bank file")
        if "format" in data:
            if data["format"] != PROMPTS_FORMAT:
                raise InputError(f"prompt bank file {path} has format {data['format']!r}, expected {PROMPTS_FORMAT!r}")
            prompts, provenance = data.get("prompts"), data.get("provenance") or {}
            if not isinstance(provenance, dict):
                raise InputError(f"prompt bank file {path}: 'provenance' must be an object")
        else:
            prompts, provenance = data, {}
        if not isinstance(prompts, dict):
            raise InputError(f"prompt bank file {path}: 'prompts' must be an object {{class: [prompt, ...]}}")
        try:
            return cls(prompts, provenance)
        except InputError as exc:
            raise InputError(f"prompt bank file {path}: {exc}") from None
