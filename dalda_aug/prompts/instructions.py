"""The request and the answer: :class:`Instruction` and :func:`build_messages` word what a chat
model is asked; :func:`parse_answer` finds the JSON object in its answer and :func:`match_answer`
files the sentences under the requested classes (by key, never by position, unless asked)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import InputError, MissingFileError
from ._text import name_key

__all__ = [
    "Instruction",
    "INSTRUCTIONS",
    "INSTRUCTION_PLACEHOLDERS",
    "as_instruction",
    "build_messages",
    "parse_answer",
    "AnswerFormatError",
    "match_answer",
    "match_by_position",
]

INSTRUCTIONS = ("default", "reference")
# Placeholders an instruction template may hold; each is replaced literally (other braces, such
# as a JSON example, stay as written).
INSTRUCTION_PLACEHOLDERS = {
    "{description}": "the dataset description",
    "{classes}": "the dataset's class list shown to the model, as a JSON list",
    "{n_classes}": "how many classes {classes} holds",
    "{requested}": "the classes this request asks a sentence for, as a JSON list",
    "{n_requested}": "how many classes {requested} holds",
    "{notes}": "why earlier sentences were rejected, one '- \"class\": reason' line each (empty in the first round)",
    "{example}": "a JSON object with the first two requested classes as keys and '...' as values",
}
_ROLE_LINE = re.compile(r"^\[(system|user)\][ \t]*$", re.MULTILINE)

# The reference code's instruction, reworded: its structure (an instruction part, then the data:
# dataset description and class list, the answer a JSON object) and only its asks (one sentence
# per class that fits the description, realistic view/colour/action/background/foreground/
# environment details, no other class in it). No length cap, no "use the name exactly".
_REFERENCE_TEMPLATE = """[system]
Instructions:
1. For each requested class, write a sentence describing an image centred on that class, in the setting of the dataset description.
2. Keep what makes the class recognisable, and add elements beyond the class itself.
3. Add details such as the viewpoint, colours, action, background, foreground and surroundings.
4. Every added detail must suit the dataset description and be realistic.
5. Write exactly one sentence for each requested class.

A class's sentence must not include any other class of the dataset.

Answer only with a JSON object, no other text, in this form:
{
    "class1": "sentence",
    "class2": "sentence",
    ...
}
[user]
Dataset description:
{description}

Classes of the dataset ({n_classes}):
{classes}

Write one sentence for each of these {n_requested} classes: {requested}
"""


class Instruction:
    """The text of a request for sentences: built in (``"default"``, ``"reference"``) or a
    user's template (:meth:`from_file`).

    A template is plain text with the placeholders of :data:`INSTRUCTION_PLACEHOLDERS`. Lines
    ``[system]`` and ``[user]`` split it into a system and a user message; without them the
    whole text is one user message. It must hold ``{requested}`` or ``{classes}``, so the model
    learns which classes to write for. Each message is sent with the placeholders filled in and
    the white space at its start and end removed.
    """

    def __init__(self, name: str, template: str | None = None):
        self.name = name
        self.template = template
        if template is not None:
            self.messages = self._split(template)

    @staticmethod
    def _split(template: str) -> list[tuple[str, str]]:
        if "{requested}" not in template and "{classes}" not in template:
            raise InputError("an instruction template must hold {requested} or {classes} (the classes to write for)")
        marks = list(_ROLE_LINE.finditer(template))
        if not marks:
            return [("user", template.strip())]
        if template[: marks[0].start()].strip():
            raise InputError("an instruction template with [system]/[user] lines must start with one of them")
        parts = []
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(template)
            parts.append((m.group(1), template[m.end() : end].strip()))
        if not any(role == "user" and text for role, text in parts):
            raise InputError("an instruction template needs a non-empty [user] part")
        return [(role, text) for role, text in parts if text]

    @classmethod
    def builtin(cls, name: str) -> "Instruction":
        """``"default"`` (ours, see docs/prompts.md) or ``"reference"``."""
        if name == "default":
            return cls("default")
        if name == "reference":
            return cls("reference", _REFERENCE_TEMPLATE)
        raise InputError(f"unknown instruction {name!r}; choose one of {', '.join(INSTRUCTIONS)} or give a file")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Instruction":
        """A template read from a UTF-8 text file (errors name the file)."""
        file = Path(path)
        if not file.is_file():
            raise MissingFileError(f"instruction file not found: {file}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"instruction file {file} is not UTF-8 text: {exc}") from None
        try:
            return cls(f"file:{file}", text)
        except InputError as exc:
            raise InputError(f"instruction file {file}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """What the prompt bank's provenance records."""
        out: dict[str, Any] = {"instruction": self.name}
        if self.template is not None and self.name != "reference":
            out["instruction_text"] = self.template
        return out

    def render(
        self,
        description: str,
        class_names: Sequence[str],
        requested: Sequence[str],
        notes: Mapping[str, str] | None = None,
    ) -> list[dict[str, str]]:
        dumps = _dumps
        values = {
            "{description}": description.strip() or "(none given)",
            "{classes}": dumps(list(class_names)),
            "{n_classes}": str(len(class_names)),
            "{requested}": dumps(list(requested)),
            "{n_requested}": str(len(requested)),
            "{notes}": "\n".join(f"- {dumps(n)}: {why}" for n, why in (notes or {}).items()),
            "{example}": dumps({name: "..." for name in list(requested)[:2]}),
        }
        pattern = re.compile("|".join(re.escape(k) for k in values))
        return [
            {"role": role, "content": pattern.sub(lambda m: values[m.group(0)], text).strip()}
            for role, text in (self.messages or [])
        ]

    def __repr__(self) -> str:
        return f"Instruction({self.name!r})"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def as_instruction(instruction: "Instruction | str | None") -> Instruction:
    """``None`` (the default wording), a built-in name or an :class:`Instruction` as an :class:`Instruction`."""
    if instruction is None:
        return Instruction.builtin("default")
    if isinstance(instruction, Instruction):
        return instruction
    if isinstance(instruction, str):
        return Instruction.builtin(instruction)
    raise InputError(f"instruction must be 'default', 'reference' or an Instruction, got {instruction!r}")


_SYSTEM_MESSAGE = (
    "You write one-sentence image descriptions that serve as prompts for a text-to-image model. "
    "The images become extra training data for an image classifier, so every description shows "
    "its class clearly in a realistic photograph."
)


def build_messages(
    description: str,
    class_names: Sequence[str],
    requested: Sequence[str],
    notes: Mapping[str, str] | None = None,
    max_words: int = 30,
    instruction: "Instruction | str | None" = None,
) -> list[dict[str, str]]:
    """The chat messages asking for one sentence for each class in ``requested``.

    ``class_names`` are the classes shown as the dataset's (all of them, or the chunk when the
    list is too long for one request); ``notes`` map a class to why its last sentence was
    rejected, so the model can do better. ``instruction``: ``"default"`` (ours, below),
    ``"reference"`` (the reference code's asks, reworded) or an :class:`Instruction`.
    """
    chosen = as_instruction(instruction)
    if chosen.template is not None:
        return chosen.render(description, class_names, requested, notes)
    def dumps(obj: Iterable[str]) -> str:
        return _dumps(list(obj))

    lines = [f"Dataset description: {description.strip() or '(none given)'}", ""]
    lines.append(f"Classes of the dataset ({len(class_names)}): {dumps(class_names)}")
    lines.append("")
    lines.append(f"Write one new sentence for each of these {len(requested)} classes: {dumps(requested)}")
    lines += [
        "",
        "Each sentence:",
        "- describes a realistic photograph of one thing of its class and uses the class name exactly as written;",
        "- chooses its own viewpoint, colours, action or pose, background, foreground and environment, "
        "so that sentences differ from each other and from earlier ones;",
        "- describes only its own class: it never names or describes any other class of the dataset;",
        f"- is a single sentence of at most {max_words} words, without quotes, lists or explanations.",
    ]
    if notes:
        lines += ["", "These earlier sentences were rejected; write new ones:"]
        lines += [f"- {json.dumps(name, ensure_ascii=False)}: {why}" for name, why in notes.items()]
    example = {name: "..." for name in list(requested)[:2]}
    lines += [
        "",
        "Answer with one JSON object and nothing else. Its keys are the class names exactly as given "
        "above, each value is that class's sentence, e.g. " + json.dumps(example, ensure_ascii=False),
    ]
    return [{"role": "system", "content": _SYSTEM_MESSAGE}, {"role": "user", "content": "\n".join(lines)}]


class AnswerFormatError(ValueError):
    """An answer holds no usable JSON object (a ``ValueError``, as :func:`parse_answer` documents)."""


_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def parse_answer(text: str) -> dict[str, Any]:
    """The JSON object in a model's answer: bare, in a markdown fence, or amid prose.

    Raises ``ValueError`` when there is none.
    """
    text = _THINK.sub("", text or "").strip()
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            obj = json.loads(candidate.strip(), strict=False)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    snippet = text[:120] + ("..." if len(text) > 120 else "")
    raise AnswerFormatError(f"the answer holds no JSON object: {snippet!r}")


def match_answer(obj: Mapping[str, Any], requested: Sequence[str]) -> dict[str, list[Any]]:
    """Candidates per requested class, matched by key (exactly, else up to case and separators)."""
    by_key: dict[str, str | None] = {}
    for name in requested:
        key = name_key(name)
        by_key[key] = None if key in by_key else name
    if not any(isinstance(k, str) and (k in requested or by_key.get(name_key(k))) for k in obj):
        nested = [v for v in obj.values() if isinstance(v, dict)]
        if len(nested) == 1:  # {"prompts": {class: sentence}}
            obj = nested[0]
    found: dict[str, list[Any]] = {}
    for key, value in obj.items():
        match = key if key in requested else by_key.get(name_key(str(key)))
        if match is None:
            continue  # a class we did not ask for, or no class at all
        values = value if isinstance(value, list) else [value]
        found.setdefault(match, []).extend(values)
    return found


def match_by_position(obj: Mapping[str, Any], requested: Sequence[str]) -> dict[str, list[Any]]:
    """``validate=False``: the answer's values in order, one per requested class, whatever the keys
    (a single nested object is unwrapped); an answer with another count gives nothing."""
    if len(obj) == 1 and len(requested) != 1:
        inner = next(iter(obj.values()))
        if isinstance(inner, dict):
            obj = inner
    values = list(obj.values())
    if len(values) != len(requested):
        raise AnswerFormatError(f"it holds {len(values)} entries for {len(requested)} classes")
    return {name: [value] for name, value in zip(requested, values)}
