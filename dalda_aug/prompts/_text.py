"""Text rules shared by the prompt bank, validation, answer matching and generation.

How class names and prompts are compared (:func:`norm_text`, :func:`name_key`), the class list
check, the ``{name}`` placeholder and the class-name templates ("a photo of a {}"). Bottom of
:mod:`dalda_aug.prompts`: imports nothing from it.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from typing import Iterable

from ..errors import InputError

__all__ = [
    "NAME_PLACEHOLDER",
    "norm_text",
    "name_key",
    "utc_now",
    "check_class_names",
    "check_template",
    "fill_template",
]

# Placeholder that consumers replace with the class name.
NAME_PLACEHOLDER = "{name}"


def norm_text(text: str) -> str:
    """NFKC + casefold: the form in which names and prompts are compared."""
    return unicodedata.normalize("NFKC", text).casefold()


def name_key(name: str) -> str:
    """A class name or answer key, compared loosely ("American_Bulldog" == "american bulldog")."""
    return " ".join(re.split(r"[\s_\-]+", norm_text(name).strip(" \t\"'`")))


def utc_now() -> str:
    """The current UTC time as recorded in a bank's provenance (``2024-01-31T12:00:00Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_class_names(class_names: Iterable[str], what: str = "class_names") -> list[str]:
    """``class_names`` as a list: non-empty, of non-empty strings, none twice (else :class:`InputError`)."""
    names = list(class_names)
    if not names:
        raise InputError(f"{what} is empty")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{what} must hold non-empty strings, got {name!r}")
        if name in seen:
            raise InputError(f"class {name!r} appears twice in {what}")
        seen.add(name)
    return names


def check_template(template: str) -> None:
    """A class-name template must hold "{}" or "{name}" (else :class:`InputError`)."""
    if "{}" not in template and NAME_PLACEHOLDER not in template:
        raise InputError(f"template {template!r} must contain '{{}}' or '{{name}}' for the class name")


def fill_template(template: str, name: str) -> str:
    """``template`` with "{}" and "{name}" replaced by ``name``."""
    return template.replace("{}", name).replace(NAME_PLACEHOLDER, name)
