"""Class prompts written by an LLM: :class:`PromptBank` and :func:`generate_prompt_bank`.

DALDA's diversity comes from its prompts: M rounds, each asking a chat model for one realistic
sentence per class (given the dataset description and the class list), at temperature 1.0.
Here

* answers are matched to classes by their JSON key, never by position;
* every sentence is checked (:func:`validate_prompt`) and a failing one is asked for again,
  for a bounded number of rounds, after which the classes still short are reported;
* large class lists are split into chunks, one request each, so a request fits the context;
* the partial bank is written atomically to the output file after every request, so an
  interrupted run resumes without losing finished classes;
* text stays UTF-8 (``ensure_ascii=False``) end to end.

Backends: :class:`OpenAIChatBackend` (any OpenAI-compatible chat-completions endpoint: OpenAI,
Azure OpenAI, vLLM, Ollama, llama.cpp server), :class:`HFChatBackend` (a local transformers
chat model) and :class:`TemplateBackend` (no LLM). :func:`parse_backend` builds one from a
``"kind:MODEL"`` string. This module imports neither torch nor transformers until a backend or
tokenizer needs them.
"""

from __future__ import annotations

import datetime
import functools
import http.client
import json
import os
import re
import socket
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .._io import read_json_object, write_atomic
from ..errors import (  # BackendError, IncompletePromptBankError: importable from here too
    BackendError,
    DaldaError,
    IncompletePromptBankError,
    InputError,
    MissingFileError,
    ModelLoadError,
    require,
)

__all__ = [
    "PromptBank",
    "generate_prompt_bank",
    "validate_prompt",
    "build_messages",
    "parse_answer",
    "parse_backend",
    "load_clip_tokenizer",
    "OpenAIChatBackend",
    "HFChatBackend",
    "TemplateBackend",
    "BackendError",
    "IncompletePromptBankError",
    "PROMPTS_FORMAT",
    "DEFAULT_PREFIX",
    "DEFAULT_TEMPLATE",
    "CLIP_MAX_TOKENS",
    "DEFAULT_BASE_URL",
    "INSTRUCTIONS",
    "INSTRUCTION_PLACEHOLDERS",
    "Instruction",
    "OPENAI_SAMPLING",
    "MAX_ANSWER_BYTES",
    "redact",
]

PROMPTS_FORMAT = "dalda_aug.prompts/1"
# Prepended to every prompt at generation time (the reference code's prefix).
DEFAULT_PREFIX = "best quality, high quality, "
DEFAULT_TEMPLATE = "a photo of a {}"
# CLIP's text window, start and end tokens included; SD 1.x silently truncates beyond it.
CLIP_MAX_TOKENS = 77
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Placeholder that consumers replace with the class name.
NAME_PLACEHOLDER = "{name}"






# -- text helpers ------------------------------------------------------------------------
def _norm(text: str) -> str:
    """NFKC + casefold: the form in which names and prompts are compared."""
    return unicodedata.normalize("NFKC", text).casefold()


def _norm_key(name: str) -> str:
    """A class name or answer key, compared loosely ("American_Bulldog" == "american bulldog")."""
    return " ".join(re.split(r"[\s_\-]+", _norm(name).strip(" \t\"'`")))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _check_class_names(class_names: Iterable[str], what: str = "class_names") -> list[str]:
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


# -- PromptBank ------------------------------------------------------------------------------
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
            key = _norm_key(name)
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
        return self._keys.get(_norm_key(class_name))

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
        names = _check_class_names(class_names)
        if "{}" not in template and NAME_PLACEHOLDER not in template:
            raise InputError(f"template {template!r} must contain '{{}}' or '{{name}}' for the class name")
        prompts = {n: [template.replace("{}", n).replace(NAME_PLACEHOLDER, n)] for n in names}
        return cls(prompts, {"backend": "template", "template": template, "date": _now()})

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


# -- validation ----------------------------------------------------------------------------
_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR")


def _unspaced(char: str) -> bool:
    """Whether ``char`` belongs to a script written without spaces between words (or, for
    Hangul, with particles glued to nouns), where a name is found without word boundaries."""
    return unicodedata.name(char, "").startswith(_UNSPACED_SCRIPTS)


def _name_pattern(name: str) -> tuple[str, re.Pattern[str]] | None:
    """(substring probe, regex) finding ``name`` as whole words, any case, with a plural ending."""
    tokens = [t for t in re.split(r"[\s_\-]+", _norm(name)) if t]
    if not tokens:
        return None
    last = tokens[-1]
    if _unspaced(last[-1]):  # no plural ending, no boundary after the name
        stem, tail, end = last, re.escape(last), ""
    elif last.endswith("y") and len(last) > 1:  # "butterfly" also finds "butterflies"
        stem, tail, end = last[:-1], re.escape(last[:-1]) + r"(?:y|ies)", r"(?!\w)"
    elif last.endswith("s") and not last.endswith("ss") and len(last) > 3:  # "Leopards" finds "leopard"
        stem, tail, end = last[:-1], re.escape(last[:-1]) + r"(?:e?s)?", r"(?!\w)"
    else:
        stem, tail, end = last, re.escape(last) + r"(?:e?s)?", r"(?!\w)"
    probe = tokens[0] if len(tokens) > 1 else stem
    body = r"[\s_\-]*".join([re.escape(t) for t in tokens[:-1]] + [tail])
    start = "" if _unspaced(tokens[0][0]) else r"(?<!\w)"
    return probe, re.compile(start + body + end)


def _exact_pattern(name: str) -> re.Pattern[str]:
    """``name`` exactly as written (same code points, same case) as whole words, with a plural ending."""
    start = "" if _unspaced(name[0]) else r"(?<!\w)"
    end = "" if _unspaced(name[-1]) else r"(?:e?s)?(?!\w)"
    return re.compile(start + re.escape(name) + end)


class _ClassMatcher:
    """Finds which classes a text names. Where names overlap ("bulldog" inside "american
    bulldog"), only the longest match counts, so a text about an "american bulldog" does not
    name "bulldog", and "wildcat" does not name "cat" (whole words only).

    Classes whose names read alike once compared loosely ("Cat" and "cat", "café" in NFC and in
    NFD, "sea_lion" and "sea lion") are "twins": every text naming one matches all of them. With
    ``own`` given, a twin of ``own`` counts as named only when the text holds its exact name, so a
    text naming its own class exactly does not name the other."""

    def __init__(self, class_names: Sequence[str]):
        self.entries = [(n, *pat) for n in class_names if (pat := _name_pattern(n)) is not None]
        groups: dict[str, list[str]] = {}
        for name, *_ in self.entries:
            groups.setdefault(" ".join(t for t in re.split(r"[\s_\-]+", _norm(name)) if t), []).append(name)
        self.twins: dict[str, list[str]] = {
            name: [other for other in group if other != name] for group in groups.values() if len(group) > 1
            for name in group
        }

    def matches(self, text: str, own: str | None = None) -> list[tuple[int, int, str]]:
        found = self._matches(text)
        twins = self.twins.get(own) if own is not None else None
        if not twins:
            return found
        exact = {name for name in twins if _exact_pattern(name).search(text)}
        return [m for m in found if m[2] not in twins or m[2] in exact]

    def _matches(self, text: str) -> list[tuple[int, int, str]]:
        t = _norm(text)
        found = [
            (m.start(), m.end(), name)
            for name, probe, pattern in self.entries
            if probe in t
            for m in pattern.finditer(t)
        ]
        return [
            a for a in found
            if not any(b[0] <= a[0] and a[1] <= b[1] and b[1] - b[0] > a[1] - a[0] for b in found)
        ]


@lru_cache(maxsize=8)
def _matcher(class_names: tuple[str, ...]) -> _ClassMatcher:
    return _ClassMatcher(class_names)


_ABBREVIATIONS = re.compile(r"(?<!\w)(?:e\.g|i\.e|etc|vs|mr|mrs|ms|dr|st|jr|sr|no|approx)\.", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"[.!?…][\"'”’)\]]*\s+\S|[。！？][\"'”’)\]」』]*\s*\S")
_WRAPPING_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("「", "」"), ("`", "`")]


def _clean(candidate: str) -> str:
    """Strip the white space and the pair of quotes a model may wrap a sentence in."""
    text = candidate.strip()
    for left, right in _WRAPPING_QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
            break
    return text


def _dedup_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", _norm(text)))


def _count_tokens(tokenizer: Any, text: str) -> int:
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # we measure over-long texts on purpose: no "too long" warning
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return len(tokenizer(text, truncation=False)["input_ids"])


def _validate(
    prompt: Any,
    class_name: str,
    matcher: _ClassMatcher,
    tokenizer: Any,
    prefix: str,
    existing: Iterable[str],
    max_tokens: int,
) -> str | None:
    if not isinstance(prompt, str):
        return f"it is not a string but {type(prompt).__name__}"
    if not prompt.strip():
        return "it is empty"
    text = prompt.replace(NAME_PLACEHOLDER, class_name).strip()
    if "\n" in text or "\r" in text:
        return "it spans several lines; write one sentence"
    masked = _ABBREVIATIONS.sub("X", text.replace(class_name, "X"))
    if _SENTENCE_BREAK.search(masked):
        return "it is more than one sentence"
    found = matcher.matches(text, class_name)
    others = sorted({name for _, _, name in found if name != class_name})
    if others:
        return "it names another class: " + ", ".join(repr(o) for o in others)
    own = [(s, e) for s, e, name in found if name == class_name]
    if not own:
        return f"it does not name its class {class_name!r}"
    rest = _norm(text)
    for s, e in reversed(own):
        rest = rest[:s] + " " + rest[e:]
    if sum(ch.isalpha() for ch in rest) < 3:
        return "it says nothing beyond the class name"
    if tokenizer is not None:
        n = _count_tokens(tokenizer, prefix + text)
        if n > max_tokens:
            return (
                f"it is too long: {n} CLIP tokens with the prefix {prefix!r} (at most {max_tokens}); "
                "Stable Diffusion would cut it off"
            )
    key = _dedup_key(text)
    if any(_dedup_key(p.replace(NAME_PLACEHOLDER, class_name)) == key for p in existing):
        return "it repeats an earlier prompt of its class"
    return None


def validate_prompt(
    prompt: str,
    class_name: str,
    class_names: Sequence[str],
    tokenizer: Any = None,
    prefix: str = DEFAULT_PREFIX,
    *,
    existing: Iterable[str] = (),
    max_tokens: int = CLIP_MAX_TOKENS,
) -> str | None:
    """Why ``prompt`` is unfit for ``class_name``, or ``None`` when it is fit.

    A fit prompt names its class (or holds ``{name}``), names no other class of
    ``class_names`` (whole words; the longest overlapping name wins, so "an american bulldog"
    names "american bulldog", not "bulldog"), is one sentence, fits CLIP's ``max_tokens``
    window together with ``prefix`` (counted with ``tokenizer``, a transformers CLIP
    tokenizer; ``None`` skips this check) and is not a duplicate of one of ``existing``.
    """
    names = tuple(class_names) if class_name in class_names else (*class_names, class_name)
    return _validate(prompt, class_name, _matcher(names), tokenizer, prefix, existing, max_tokens)


# -- the request and the answer ------------------------------------------------------------
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


def _as_instruction(instruction: "Instruction | str | None") -> Instruction:
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
    chosen = _as_instruction(instruction)
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


class _AnswerFormatError(ValueError):
    pass


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
    raise _AnswerFormatError(f"the answer holds no JSON object: {snippet!r}")


def _match_answer(obj: Mapping[str, Any], requested: Sequence[str]) -> dict[str, list[Any]]:
    """Candidates per requested class, matched by key (exactly, else up to case and separators)."""
    by_key: dict[str, str | None] = {}
    for name in requested:
        key = _norm_key(name)
        by_key[key] = None if key in by_key else name
    if not any(isinstance(k, str) and (k in requested or by_key.get(_norm_key(k))) for k in obj):
        nested = [v for v in obj.values() if isinstance(v, dict)]
        if len(nested) == 1:  # {"prompts": {class: sentence}}
            obj = nested[0]
    found: dict[str, list[Any]] = {}
    for key, value in obj.items():
        match = key if key in requested else by_key.get(_norm_key(str(key)))
        if match is None:
            continue  # a class we did not ask for, or no class at all
        values = value if isinstance(value, list) else [value]
        found.setdefault(match, []).extend(values)
    return found


def _match_by_position(obj: Mapping[str, Any], requested: Sequence[str]) -> dict[str, list[Any]]:
    """``validate=False``: the answer's values in order, one per requested class, whatever the keys
    (a single nested object is unwrapped); an answer with another count gives nothing."""
    if len(obj) == 1 and len(requested) != 1:
        inner = next(iter(obj.values()))
        if isinstance(inner, dict):
            obj = inner
    values = list(obj.values())
    if len(values) != len(requested):
        raise _AnswerFormatError(f"it holds {len(values)} entries for {len(requested)} classes")
    return {name: [value] for name, value in zip(requested, values)}


# -- backends --------------------------------------------------------------------------------
class TemplateBackend:
    """No LLM: one prompt per class from a template such as "a photo of a {}"."""

    kind = "template"

    def __init__(self, template: str = DEFAULT_TEMPLATE):
        if "{}" not in template and NAME_PLACEHOLDER not in template:
            raise InputError(f"template {template!r} must contain '{{}}' or '{{name}}' for the class name")
        self.template = template

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "template": self.template}

    def __repr__(self) -> str:
        return f"TemplateBackend({self.template!r})"


_AZURE_HOSTS = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
_RETRY_STATUS = {408, 409, 425, 429}
# Table 4 of the paper / the reference's chat call: sent explicitly, as servers' defaults differ
# (temperature is sent too, from the ``temperature`` argument, 1.0 by default).
OPENAI_SAMPLING: dict[str, float] = {"top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
# The most of an HTTP answer the chat client reads (a chat answer of M sentences per class is a few
# KiB; a larger one is refused, not read into memory). An error body is read up to _MAX_ERROR_BYTES.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_MAX_ERROR_BYTES = 64 * 1024
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[^\s\"',;}\]]+")
REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every ``secrets`` value and every ``Bearer <token>`` replaced by [REDACTED]."""
    out = str(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        out = out.replace(secret, REDACTED)
        quoted = urllib.parse.quote(secret, safe="")
        if quoted != secret:
            out = out.replace(quoted, REDACTED)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", out)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the endpoint's origin; a redirect elsewhere would carry the
    API key (urllib copies the ``Authorization`` header) to another host, so it is refused."""

    def __init__(self, backend: "OpenAIChatBackend"):
        self.backend = backend

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        target = urllib.parse.urljoin(req.full_url, newurl)
        if _origin(target) != _origin(req.full_url):
            fp.close()
            raise BackendError(self.backend._redact(
                f"chat endpoint {self.backend.endpoint} redirected (HTTP {code}) to another origin, "
                f"{target}; refusing to send the API key there. Set --base-url to the address that "
                "should receive it"
            ))
        fp.close()  # urllib would read the whole redirect body before following; it is not needed
        if code in (307, 308) and req.get_method() == "POST":  # keeps method and body (RFC 9110)
            return urllib.request.Request(target, data=req.data, headers=dict(req.headers), method="POST")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """A deadline for one whole HTTP request: when it passes, every socket it watches is shut
    down, so a read blocked in connect, headers or body returns at once (a socket timeout alone
    bounds each read, not the request: a server trickling a byte per second never trips it)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._started = time.monotonic()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(0.001, self.seconds - (time.monotonic() - self._started))

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            self._shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:  # the plain socket's shutdown, also for a TLS socket (no TLS close from this thread)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed, or detached when TLS wrapped it (the TLS socket is watched too)

    def message(self) -> str:
        return f"TimeoutError: no complete answer within {self.seconds:g} s (connect, headers and body)"


def _watched_connection(deadline: _Deadline, address: tuple[str, int], timeout: Any = None,
                        source_address: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
    """``socket.create_connection`` within what is left of ``deadline``, the socket then watched."""
    limit = deadline.remaining() if not isinstance(timeout, (int, float)) else min(float(timeout), deadline.remaining())
    sock = socket.create_connection(address, limit, source_address, *args, **kwargs)
    deadline.watch(sock)
    return sock


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_watched_connection, deadline)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = functools.partial(_watched_connection, deadline)

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)  # the TLS socket (the plain one it wrapped is detached)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPSConnection, deadline=self.deadline), req,
                            context=self._context)  # type: ignore[attr-defined]


def _read_capped(response: Any, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of ``response``'s body, and whether there was more."""
    raw = response.read(limit + 1)
    return raw[:limit], len(raw) > limit


class OpenAIChatBackend:
    """Any OpenAI-compatible chat-completions endpoint, over stdlib ``urllib``.

    ``base_url`` is the API root (``https://api.openai.com/v1``; vLLM ``http://host:8000/v1``;
    Ollama ``http://localhost:11434/v1``; llama.cpp ``http://localhost:8080/v1``; Azure
    ``https://RESOURCE.openai.azure.com/openai/v1`` or ``.../openai/deployments/NAME`` with
    ``api_version``). The key comes from ``api_key`` or the environment variable
    ``api_key_env``; it is sent as ``Authorization: Bearer`` or, for Azure hosts (or
    ``azure=True``), as ``api-key``. Local servers need no key.

    HTTP 408/409/425/429, 5xx, time-outs and connection errors are retried up to
    ``max_retries`` times, waiting ``base_delay * 2**attempt`` seconds (or the server's
    ``Retry-After``), at most ``max_delay``; then :class:`BackendError` names the endpoint.
    ``timeout`` is a deadline for each whole request (connect, headers and the full answer), not
    per socket read. An answer larger than :data:`MAX_ANSWER_BYTES` is refused without reading
    the rest.
    """

    kind = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        azure: bool | None = None,
        api_version: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        json_mode: bool = False,
    ):
        if not model or not model.strip():
            raise InputError("the openai backend needs a model name, e.g. 'openai:gpt-4o-mini'")
        base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"base URL {base_url!r} must be an http(s) URL such as {DEFAULT_BASE_URL}")
        if max_retries < 0 or timeout <= 0 or base_delay < 0:
            raise InputError(
                f"need max_retries >= 0, timeout > 0, base_delay >= 0 (got {max_retries}, {timeout}, {base_delay})"
            )
        host = (parts.hostname or "").lower()
        self.model = model
        self.base_url = base_url
        self.azure = host.endswith(_AZURE_HOSTS) if azure is None else bool(azure)
        self.api_version = api_version
        query = f"?{urllib.parse.urlencode({'api-version': api_version})}" if api_version else ""
        self.endpoint = f"{base_url}/chat/completions{query}"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.json_mode = bool(json_mode)
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        # a password in the URL (https://user:PASSWORD@host/v1) is a secret too
        self._secrets = tuple(v for v in (key, parts.password) if v)
        if not key and (host == "api.openai.com" or self.azure):
            raise InputError(f"no API key for {self.endpoint}: set the environment variable {api_key_env}")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "dalda-aug"}
        if key:
            self._headers.update({"api-key": key} if self.azure else {"Authorization": f"Bearer {key}"})

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "base_url": self._redact(self.base_url)}

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIChatBackend({self.model!r}, base_url={self._redact(self.base_url)!r})"

    def _redact(self, text: str) -> str:
        """``text`` without the API key or any ``Bearer`` token (what a server may echo back)."""
        return redact(text, self._secrets)

    def chat(self, messages: list[dict[str, str]], *, temperature: float = 1.0, max_tokens: int | None = None) -> str:
        """The assistant's answer to ``messages``. ``max_tokens`` is a hint this backend ignores."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                **OPENAI_SAMPLING}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last_error = ""
        for attempt in range(self.max_retries + 1):
            delay = min(self.max_delay, self.base_delay * 2**attempt)
            request = urllib.request.Request(self.endpoint, data=data, headers=self._headers, method="POST")
            with _Deadline(self.timeout) as deadline:
                opener = urllib.request.build_opener(
                    _SameOriginRedirects(self), _DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline)
                )
                try:
                    with opener.open(request, timeout=self.timeout) as response:
                        raw, more = _read_capped(response, MAX_ANSWER_BYTES)
                    if deadline.expired:  # the body may look complete when the socket was shut
                        raise TimeoutError(deadline.message())
                except urllib.error.HTTPError as exc:
                    detail = self._redact(_http_error_detail(exc))
                    if exc.code not in _RETRY_STATUS and exc.code < 500:
                        raise BackendError(self._redact(
                            f"chat endpoint {self.endpoint} refused the request: HTTP {exc.code} {detail}"
                        )) from None
                    last_error = f"HTTP {exc.code} {detail}"
                    retry_after = _retry_after(exc.headers)
                    if retry_after is not None:
                        delay = min(self.max_delay, retry_after)
                except (OSError, http.client.HTTPException) as exc:  # URLError, time-outs, resets
                    if deadline.expired:
                        last_error = deadline.message()
                    else:
                        last_error = self._redact(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
                else:
                    if more:
                        raise BackendError(self._redact(
                            f"chat endpoint {self.endpoint} answered with more than {MAX_ANSWER_BYTES >> 20} MiB; "
                            "refusing to read it (a chat answer is a few KiB: is --base-url a chat-completions API?)"
                        ))
                    return self._redact(self._content(raw))
            if attempt < self.max_retries:
                time.sleep(delay)
        raise BackendError(self._redact(
            f"chat endpoint {self.endpoint} is unavailable: {self.max_retries + 1} attempt(s) failed, "
            f"the last with {last_error}"
        ))

    def _content(self, raw: bytes) -> str:
        try:
            return self._parse_content(raw)
        except BackendError as exc:
            raise BackendError(self._redact(str(exc))) from None

    def _parse_content(self, raw: bytes) -> str:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BackendError(
                f"chat endpoint {self.endpoint} answered with something other than JSON: {raw[:200]!r}"
            ) from None
        if isinstance(obj, dict) and obj.get("error"):
            raise BackendError(f"chat endpoint {self.endpoint} answered with an error: {obj['error']}")
        try:
            message = obj["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(
                f"chat endpoint {self.endpoint} answered without choices[0].message: {raw[:200]!r}"
            ) from None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""


def _http_error_detail(exc: urllib.error.HTTPError) -> str:
    """The reason and the start of the error body, on one line (at most _MAX_ERROR_BYTES are read)."""
    try:
        body = exc.read(_MAX_ERROR_BYTES).decode("utf-8", "replace")
    except Exception:  # pragma: no cover - the body is only a detail of the message
        body = ""
    finally:
        exc.close()
    body = " ".join(body[:300].split())
    reason = " ".join(str(exc.reason).split())
    return f"{reason}: {body}" if body else reason


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


class HFChatBackend:
    """A local transformers chat model (a hub id or a folder), on ``device`` in ``dtype``.

    Loaded on first use with ``AutoTokenizer``/``AutoModelForCausalLM``; the prompt is built
    with the tokenizer's chat template. Sampling is seeded per call (``seed`` + call number)
    without touching the caller's global RNG state.
    """

    kind = "hf"

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        revision: str | None = None,
    ):
        if not model or not str(model).strip():
            raise InputError("the hf backend needs a model id or folder, e.g. 'hf:Qwen/Qwen2.5-1.5B-Instruct'")
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.model = str(model)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.seed = int(seed)
        self.revision = revision
        self._calls = 0
        self._loaded: tuple[Any, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "device": str(self.device), "dtype": self.dtype or "float32"}

    def __repr__(self) -> str:
        return f"HFChatBackend({self.model!r}, device={self.device!r})"

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            torch = require("torch", "llm")
            transformers = require("transformers", "llm")
            from ..generators.loading import parse_location  # the one "hub id or local path" rule

            location = parse_location(self.model)
            if location.is_local and not location.path.is_dir():
                raise MissingFileError(f"chat model folder not found: {location.path}")
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(location.value, revision=self.revision)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    location.value, revision=self.revision, dtype=getattr(torch, self.dtype or "float32")
                )
            except OSError as exc:
                raise ModelLoadError(f"could not load the chat model {self.model!r}: {exc}") from exc
            if not getattr(tokenizer, "chat_template", None):
                raise InputError(f"the tokenizer of {self.model!r} has no chat template; use a chat/instruct model")
            self._loaded = (tokenizer, model.to(self.device).eval())
        return self._loaded

    def chat(self, messages: list[dict[str, str]], *, temperature: float = 1.0, max_tokens: int | None = None) -> str:
        """Sample an answer to ``messages`` (at most ``max_new_tokens`` or ``max_tokens`` new tokens)."""
        import torch

        tokenizer, model = self._load()
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        n_prompt = inputs["input_ids"].shape[-1]
        new_tokens = self.max_new_tokens or max_tokens or 1024
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and n_prompt + 1 > limit:
            raise InputError(
                f"the request has {n_prompt} tokens but {self.model!r} reads at most {limit}; lower the chunk size"
            )
        if limit is not None:
            new_tokens = min(new_tokens, limit - n_prompt)
        # Table 4: temperature 1, top-p 1, no frequency/presence penalty. Set explicitly, so a model's
        # generation_config.json (often top_k 20-50, top_p < 1, a repetition penalty) is overridden.
        sampling: dict[str, Any] = dict(top_k=None, top_p=None, min_p=None, typical_p=None, repetition_penalty=None)
        if temperature > 0:
            sampling.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            sampling.update(do_sample=False, temperature=None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = torch.device(self.device)
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.inference_mode():
            torch.manual_seed(self.seed + self._calls)
            self._calls += 1
            output = model.generate(**inputs, max_new_tokens=new_tokens, pad_token_id=pad, **sampling)
        return str(tokenizer.decode(output[0, n_prompt:], skip_special_tokens=True))


def parse_backend(
    spec: str,
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    api_version: str | None = None,
    timeout: float = 120.0,
    max_retries: int = 5,
    base_delay: float = 1.0,
    json_mode: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
) -> OpenAIChatBackend | HFChatBackend | TemplateBackend:
    """A backend from ``"openai:MODEL"``, ``"hf:MODEL_ID_OR_PATH"``, ``"template"`` or
    ``"template:TEMPLATE"``. Each keyword goes only to the backend that uses it; giving one
    to another backend (e.g. ``base_url`` with ``hf``) is an error."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "openai":
        return OpenAIChatBackend(
            arg, base_url=base_url, api_key_env=api_key_env, api_version=api_version, timeout=timeout,
            max_retries=max_retries, base_delay=base_delay, json_mode=json_mode,
        )
    if base_url is not None or api_version is not None:
        raise InputError(f"--base-url/--api-version apply to the openai backend only, not to {spec!r}")
    if kind == "hf":
        return HFChatBackend(arg, device=device, dtype=dtype, seed=seed)
    if kind == "template":
        return TemplateBackend(arg or DEFAULT_TEMPLATE)
    raise InputError(f"unknown LLM backend {spec!r}; use openai:MODEL, hf:MODEL_ID_OR_PATH or template")


# -- the CLIP tokenizer ----------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("DALDA_AUG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dalda_aug"
    )
    return Path(root)


def load_clip_tokenizer(path: str | os.PathLike[str] | None = None, *, revision: str | None = None) -> Any:
    """A transformers ``CLIPTokenizer`` to count prompt tokens as Stable Diffusion 1.x does.

    ``path`` is a tokenizer folder, a Stable Diffusion pipeline folder or hub id (its
    ``tokenizer/`` is used), or ``None``: the real CLIP BPE built offline from open_clip's
    bundled vocabulary (:func:`dalda_aug.testing.write_clip_tokenizer`), cached under
    ``$DALDA_AUG_CACHE`` (default ``~/.cache/dalda_aug``).
    """
    transformers = require("transformers", "llm")
    if path is None:
        folder = _cache_dir() / "clip-tokenizer"
        if not (folder / "tokenizer_config.json").is_file():
            import shutil

            from ..testing import write_clip_tokenizer

            tmp = folder.with_name(f".clip-tokenizer.tmp-{os.getpid()}")
            try:
                write_clip_tokenizer(tmp)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise InputError(
                    f"cannot write the CLIP tokenizer into the cache folder {folder.parent}: {exc.strerror or exc}; "
                    "set DALDA_AUG_CACHE (or XDG_CACHE_HOME) to a writable folder, or pass --tokenizer"
                ) from None
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier copy
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        path = folder
    from ..generators.loading import parse_location  # the one "hub id or local path" rule

    location = parse_location(path)
    local = location.path
    try:
        if location.is_local and local.is_dir():
            if (local / "tokenizer").is_dir() and not (local / "tokenizer_config.json").is_file():
                local = local / "tokenizer"
            return transformers.CLIPTokenizer.from_pretrained(str(local))
        if location.is_local and local.exists():
            raise InputError(f"tokenizer path {path} is a file; give the tokenizer's folder")
        if location.is_local:
            raise MissingFileError(f"tokenizer folder not found: {path}")
        return transformers.CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", revision=revision)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DaldaError):
            raise
        raise ModelLoadError(
            f"could not load a CLIP tokenizer from {str(path)!r} ({exc}); pass a tokenizer folder"
        ) from exc


# -- generation ------------------------------------------------------------------------------
def _format_short(short: Mapping[str, int], reasons: Mapping[str, list[str]], m: int, limit: int = 20) -> str:
    lines = []
    for name, count in list(short.items())[:limit]:
        why = reasons.get(name) or []
        tail = f"; last rejected because {why[-1]}" if why else ""
        lines.append(f"  {name!r}: {count}/{m}{tail}")
    if len(short) > limit:
        lines.append(f"  ... and {len(short) - limit} more")
    return "\n".join(lines)


def generate_prompt_bank(
    class_names: Sequence[str],
    backend: OpenAIChatBackend | HFChatBackend | TemplateBackend,
    m: int = 10,
    description: str = "",
    *,
    temperature: float = 1.0,
    tokenizer: Any = None,
    prefix: str = DEFAULT_PREFIX,
    max_tokens: int = CLIP_MAX_TOKENS,
    chunk_size: int = 120,
    max_rounds: int | None = None,
    out: str | os.PathLike[str] | None = None,
    resume_from: "PromptBank | str | os.PathLike[str] | None" = None,
    allow_short: bool = False,
    progress: bool = False,
    instruction: "Instruction | str | None" = None,
    llm_names: Mapping[str, str] | None = None,
    validate: bool = True,
) -> PromptBank:
    """Ask ``backend`` for ``m`` validated prompts per class; return the :class:`PromptBank`.

    Each round sends, per chunk of at most ``chunk_size`` classes still short of ``m``
    prompts, one request (dataset ``description`` + class list, see :func:`build_messages`)
    and keeps the sentences that pass :func:`validate_prompt`; rejected ones are asked for
    again in the next round, with the reason. After ``max_rounds`` rounds (default
    ``2 * m + 2``) classes still short raise :class:`IncompletePromptBankError` (carrying the
    partial bank), or are recorded in ``provenance["short"]`` when ``allow_short``.

    ``tokenizer`` counts CLIP tokens (default: :func:`load_clip_tokenizer`). ``out``: the
    bank is written there atomically after every request and at the end. ``resume_from``: a
    bank (or its file) whose prompts are kept; only the missing ones are asked for.
    :class:`TemplateBackend` makes one prompt per class, without rounds.

    ``instruction``: the request's wording, ``"default"``, ``"reference"`` or an
    :class:`Instruction` (e.g. ``Instruction.from_file(path)``). ``llm_names``: ``{class name:
    name shown to the LLM}`` for classes the LLM should see under another name (a preset's
    :meth:`~dalda_aug.presets.DatasetPreset.llm_names`); sentences are checked against the
    shown names and filed under the class names.

    ``validate=False`` takes answers as the reference code takes them: any answer holding a JSON
    object with one string per requested class is used, its values mapped to the classes by
    position (the reference's ``generate_prompt_by_LLM.py`` checks only the count), and no
    sentence is checked. ``provenance["validate"]`` records the choice.
    """
    names = _check_class_names(class_names)
    chosen = _as_instruction(instruction)
    shown_name = {n: n for n in names}
    if llm_names and not isinstance(backend, TemplateBackend):  # a template writes the class names
        unknown = [n for n in llm_names if n not in shown_name]
        if unknown:
            raise InputError(f"llm_names holds classes that are not in the class list: {unknown[:10]}")
        shown_name.update({n: str(v) for n, v in llm_names.items()})
        _check_class_names(shown_name.values(), "the class names shown to the LLM")
    real_name = {v: k for k, v in shown_name.items()}
    names = [shown_name[n] for n in names]  # from here on, the names the LLM sees
    if int(m) != m or m < 1:
        raise InputError(f"m (prompts per class) must be an integer >= 1, got {m!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise InputError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature!r}")
    max_rounds = 2 * m + 2 if max_rounds is None else max_rounds
    if int(max_rounds) != max_rounds or max_rounds < 1:
        raise InputError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    if tokenizer is None:
        tokenizer = load_clip_tokenizer()
    matcher = _ClassMatcher(names)
    out_path = Path(out) if out is not None else None

    prompts: dict[str, list[str]] = {name: [] for name in names}
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        previous = resume_from if isinstance(resume_from, PromptBank) else PromptBank.load(resume_from)
        unknown = [c for c in previous.class_names if c not in shown_name]
        if unknown:
            where = f" in {resume_from}" if not isinstance(resume_from, PromptBank) else ""
            raise InputError(
                f"the bank to resume{where} has classes that are not in the class list: {unknown[:10]}"
            )
        for name, items in previous.prompts.items():
            prompts[shown_name[name]] = list(items)
        earlier = {k: v for k, v in previous.provenance.items() if k != "history"}
        history = list(previous.provenance.get("history", [])) + ([earlier] if earlier else [])

    template = isinstance(backend, TemplateBackend)
    target = 1 if template else int(m)  # a template gives one prompt per class
    provenance: dict[str, Any] = {
        **backend.describe(),
        **({} if template else {"temperature": temperature, **chosen.describe()}),
        "description": description,
        "date": _now(),
        "m": target,
        "prefix": prefix,
        "max_tokens": int(max_tokens),
        **({} if validate else {"validate": False}),
    }
    if history:
        provenance["history"] = history
    if not template and shown_name != {n: n for n in shown_name}:
        provenance["llm_names"] = {k: v for k, v in shown_name.items() if k != v}
    reasons: dict[str, list[str]] = {}  # every rejection, for the final report
    notes: dict[str, str] = {}  # why the last candidate of a class failed, told to the model

    def short_classes() -> dict[str, int]:
        return {n: len(p) for n, p in prompts.items() if len(p) < target}

    def snapshot() -> PromptBank:
        short = short_classes()
        prov = dict(provenance, date=_now(), complete=not short)
        if short:
            prov["short"] = {real_name[n]: c for n, c in short.items()}
        return PromptBank({real_name[n]: p for n, p in prompts.items()}, prov)

    def reject(name: str, why: str) -> None:
        reasons.setdefault(name, []).append(why)
        notes[name] = why

    def accept(name: str, candidates: list[Any]) -> None:
        for candidate in candidates:
            if len(prompts[name]) >= target:
                break
            text = _clean(candidate) if isinstance(candidate, str) else candidate
            if validate:
                why = _validate(text, name, matcher, tokenizer, prefix, prompts[name], max_tokens)
            else:
                why = None if isinstance(text, str) else f"it is not a string but {type(text).__name__}"
            if why is None:
                prompts[name].append(text)
                notes.pop(name, None)
            else:
                reject(name, why)

    if isinstance(backend, TemplateBackend):  # = template
        for name in names:
            if not prompts[name]:
                accept(name, [backend.template.replace("{}", name).replace(NAME_PLACEHOLDER, name)])
    else:
        provenance.update(chunk_size=int(chunk_size), rounds=0, requests=0)
        from tqdm.auto import tqdm

        def done() -> int:
            return sum(min(len(p), target) for p in prompts.values())

        bar = tqdm(total=len(names) * target, initial=done(), unit="prompt", desc="prompts", disable=not progress)
        try:
            for round_index in range(1, int(max_rounds) + 1):
                wanted = list(short_classes())
                if not wanted:
                    break
                provenance["rounds"] = round_index
                bar.set_postfix_str(f"round {round_index}/{max_rounds}, {len(wanted)} classes short")
                for start in range(0, len(wanted), chunk_size):
                    chunk = wanted[start : start + chunk_size]
                    shown = names if len(names) <= chunk_size else chunk
                    messages = build_messages(description, shown, chunk, {n: notes[n] for n in chunk if n in notes},
                                              instruction=chosen)
                    answer = backend.chat(messages, temperature=temperature, max_tokens=64 + 60 * len(chunk))
                    provenance["requests"] += 1
                    try:
                        found = (_match_answer(parse_answer(answer), chunk) if validate
                                 else _match_by_position(parse_answer(answer), chunk))
                        missing = "the answer had no sentence for it"
                    except _AnswerFormatError as exc:
                        found, missing = {}, f"the answer was unusable: {exc}"
                    for n in chunk:
                        if n in found:
                            accept(n, found[n])
                        else:
                            reject(n, missing)
                    if out_path is not None:
                        snapshot().save(out_path)
                    bar.update(done() - bar.n)
        finally:
            bar.close()

    bank = snapshot()
    short = {real_name[n]: c for n, c in short_classes().items()}
    reasons = {real_name[n]: r for n, r in reasons.items()}
    if out_path is not None:
        bank.save(out_path)
    if short and not allow_short:
        where = f"; the partial bank is in {out_path} (run again to resume)" if out_path is not None else ""
        rounds = "" if template else f" after {provenance['rounds']} round(s)"
        raise IncompletePromptBankError(
            f"{len(short)} of {len(names)} classes are short of prompts{rounds}{where}:\n"
            + _format_short(short, reasons, target),
            bank,
            short,
            reasons,
        )
    return bank
