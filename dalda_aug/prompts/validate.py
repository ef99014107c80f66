"""Checking a prompt: which classes a text names, one sentence, CLIP's token window, duplicates.

:func:`validate_prompt` is the public check; :func:`check_prompt` is the same check with a
prepared :class:`ClassMatcher`, as :func:`~dalda_aug.prompts.generate.generate_prompt_bank`
runs it for every candidate.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any, Iterable, Sequence

from ._text import NAME_PLACEHOLDER, norm_text

__all__ = [
    "validate_prompt",
    "check_prompt",
    "clean_candidate",
    "ClassMatcher",
    "class_matcher",
    "DEFAULT_PREFIX",
    "CLIP_MAX_TOKENS",
]

# Prepended to every prompt at generation time (the reference code's prefix).
DEFAULT_PREFIX = "best quality, high quality, "
# CLIP's text window, start and end tokens included; SD 1.x silently truncates beyond it.
CLIP_MAX_TOKENS = 77

_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR")


def _unspaced(char: str) -> bool:
    """Whether ``char`` belongs to a script written without spaces between words (or, for
    Hangul, with particles glued to nouns), where a name is found without word boundaries."""
    return unicodedata.name(char, "").startswith(_UNSPACED_SCRIPTS)


def _name_pattern(name: str) -> tuple[str, re.Pattern[str]] | None:
    """(substring probe, regex) finding ``name`` as whole words, any case, with a plural ending."""
    tokens = [t for t in re.split(r"[\s_\-]+", norm_text(name)) if t]
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


class ClassMatcher:
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
            groups.setdefault(" ".join(t for t in re.split(r"[\s_\-]+", norm_text(name)) if t), []).append(name)
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
        t = norm_text(text)
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
def class_matcher(class_names: tuple[str, ...]) -> ClassMatcher:
    """A :class:`ClassMatcher` for ``class_names``, the last few kept (``validate_prompt`` calls)."""
    return ClassMatcher(class_names)


_ABBREVIATIONS = re.compile(r"(?<!\w)(?:e\.g|i\.e|etc|vs|mr|mrs|ms|dr|st|jr|sr|no|approx)\.", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"[.!?…][\"'”’)\]]*\s+\S|[。！？][\"'”’)\]」』]*\s*\S")
_WRAPPING_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("「", "」"), ("`", "`")]


def clean_candidate(candidate: str) -> str:
    """Strip the white space and the pair of quotes a model may wrap a sentence in."""
    text = candidate.strip()
    for left, right in _WRAPPING_QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
            break
    return text


def _dedup_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", norm_text(text)))


def _count_tokens(tokenizer: Any, text: str) -> int:
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # we measure over-long texts on purpose: no "too long" warning
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return len(tokenizer(text, truncation=False)["input_ids"])


def check_prompt(
    prompt: Any,
    class_name: str,
    matcher: ClassMatcher,
    tokenizer: Any,
    prefix: str,
    existing: Iterable[str],
    max_tokens: int,
) -> str | None:
    """Why ``prompt`` is unfit for ``class_name``, or ``None``: :func:`validate_prompt` with the
    class list already prepared as ``matcher`` and every argument given."""
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
    rest = norm_text(text)
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
    return check_prompt(prompt, class_name, class_matcher(names), tokenizer, prefix, existing, max_tokens)
