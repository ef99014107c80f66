"""Writing a prompt bank with a chat model: :func:`generate_prompt_bank`.

The procedure is a short function calling named steps, each testable on its own:
:func:`_check_inputs`, :func:`_resume` (the prompts of an earlier, interrupted run),
:func:`_provenance`, then :func:`_fill_from_template` (no LLM) or :func:`_ask_in_rounds` (rounds
of :func:`_ask`, one request per chunk of classes still short, every candidate checked by
:meth:`_BankInProgress.accept`), and :func:`_finish` (save, report the classes still short).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import IncompletePromptBankError, InputError
from ._text import check_class_names, fill_template, utc_now
from .backends import HFChatBackend, OpenAIChatBackend, TemplateBackend
from .bank import PromptBank
from .instructions import (
    AnswerFormatError,
    Instruction,
    as_instruction,
    build_messages,
    match_answer,
    match_by_position,
    parse_answer,
)
from .tokenizer import load_clip_tokenizer
from .validate import CLIP_MAX_TOKENS, DEFAULT_PREFIX, ClassMatcher, check_prompt, clean_candidate

__all__ = ["generate_prompt_bank"]


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
    names, shown_name, chosen, max_rounds = _check_inputs(
        class_names, backend, m, chunk_size, temperature, max_rounds, instruction, llm_names
    )
    template = isinstance(backend, TemplateBackend)
    target = 1 if template else int(m)  # a template gives one prompt per class
    if tokenizer is None:
        tokenizer = load_clip_tokenizer()
    matcher = ClassMatcher(names)
    out_path = Path(out) if out is not None else None
    prompts, history = _resume(resume_from, names, shown_name)
    provenance = _provenance(
        backend, chosen, shown_name, history, temperature=temperature, description=description, target=target,
        prefix=prefix, max_tokens=max_tokens, validate=validate,
    )
    run = _BankInProgress(names, shown_name, prompts, provenance, target,
                          matcher=matcher, tokenizer=tokenizer, prefix=prefix, max_tokens=max_tokens, validate=validate)
    if isinstance(backend, TemplateBackend):
        _fill_from_template(run, backend)
    else:
        _ask_in_rounds(run, backend, description, chosen, temperature=temperature, chunk_size=chunk_size,
                       max_rounds=max_rounds, out_path=out_path, progress=progress)
    return _finish(run, out_path, allow_short=allow_short, template=template)


# -- the steps -------------------------------------------------------------------------------
def _check_inputs(
    class_names: Sequence[str],
    backend: OpenAIChatBackend | HFChatBackend | TemplateBackend,
    m: int,
    chunk_size: int,
    temperature: float,
    max_rounds: int | None,
    instruction: "Instruction | str | None",
    llm_names: Mapping[str, str] | None,
) -> tuple[list[str], dict[str, str], Instruction, int]:
    """The names the LLM sees (in class order), ``{class name: name shown}``, the instruction and
    the number of rounds; every argument checked, in this order, with an :class:`InputError`."""
    names = check_class_names(class_names)
    chosen = as_instruction(instruction)
    shown_name = {n: n for n in names}
    if llm_names and not isinstance(backend, TemplateBackend):  # a template writes the class names
        unknown = [n for n in llm_names if n not in shown_name]
        if unknown:
            raise InputError(f"llm_names holds classes that are not in the class list: {unknown[:10]}")
        shown_name.update({n: str(v) for n, v in llm_names.items()})
        check_class_names(shown_name.values(), "the class names shown to the LLM")
    if int(m) != m or m < 1:
        raise InputError(f"m (prompts per class) must be an integer >= 1, got {m!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise InputError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature!r}")
    max_rounds = 2 * m + 2 if max_rounds is None else max_rounds
    if int(max_rounds) != max_rounds or max_rounds < 1:
        raise InputError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    return [shown_name[n] for n in names], shown_name, chosen, max_rounds


def _resume(
    resume_from: "PromptBank | str | os.PathLike[str] | None",
    names: Sequence[str],
    shown_name: Mapping[str, str],
) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """The prompts to start from, by shown name (none, or those of the bank ``resume_from``), and
    the provenance history (the earlier runs' provenance, oldest first)."""
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
    return prompts, history


def _provenance(
    backend: OpenAIChatBackend | HFChatBackend | TemplateBackend,
    instruction: Instruction,
    shown_name: Mapping[str, str],
    history: list[dict[str, Any]],
    *,
    temperature: float,
    description: str,
    target: int,
    prefix: str,
    max_tokens: int,
    validate: bool,
) -> dict[str, Any]:
    """How the bank is made, as its file records it (the rounds and requests are added as they run)."""
    template = isinstance(backend, TemplateBackend)
    provenance: dict[str, Any] = {
        **backend.describe(),
        **({} if template else {"temperature": temperature, **instruction.describe()}),
        "description": description,
        "date": utc_now(),
        "m": target,
        "prefix": prefix,
        "max_tokens": int(max_tokens),
        **({} if validate else {"validate": False}),
    }
    if history:
        provenance["history"] = history
    if not template and shown_name != {n: n for n in shown_name}:
        provenance["llm_names"] = {k: v for k, v in shown_name.items() if k != v}
    return provenance


class _BankInProgress:
    """The prompts accepted so far (by the names the LLM sees), every rejection and the provenance.

    :meth:`accept` checks each candidate (:func:`~dalda_aug.prompts.validate.check_prompt`, or only
    that it is a string when ``validate`` is off); :meth:`snapshot` is the bank as it stands, filed
    under the class names."""

    def __init__(
        self,
        names: list[str],
        shown_name: Mapping[str, str],
        prompts: dict[str, list[str]],
        provenance: dict[str, Any],
        target: int,
        *,
        matcher: ClassMatcher,
        tokenizer: Any,
        prefix: str,
        max_tokens: int,
        validate: bool,
    ):
        self.names = names
        self.real_name = {v: k for k, v in shown_name.items()}
        self.prompts = prompts
        self.provenance = provenance
        self.target = target
        self.matcher = matcher
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.max_tokens = max_tokens
        self.validate = validate
        self.reasons: dict[str, list[str]] = {}  # every rejection, for the final report
        self.notes: dict[str, str] = {}  # why the last candidate of a class failed, told to the model

    def short_classes(self) -> dict[str, int]:
        return {n: len(p) for n, p in self.prompts.items() if len(p) < self.target}

    def done(self) -> int:
        return sum(min(len(p), self.target) for p in self.prompts.values())

    def snapshot(self) -> PromptBank:
        short = self.short_classes()
        prov = dict(self.provenance, date=utc_now(), complete=not short)
        if short:
            prov["short"] = {self.real_name[n]: c for n, c in short.items()}
        return PromptBank({self.real_name[n]: p for n, p in self.prompts.items()}, prov)

    def reject(self, name: str, why: str) -> None:
        self.reasons.setdefault(name, []).append(why)
        self.notes[name] = why

    def accept(self, name: str, candidates: list[Any]) -> None:
        for candidate in candidates:
            if len(self.prompts[name]) >= self.target:
                break
            text = clean_candidate(candidate) if isinstance(candidate, str) else candidate
            if self.validate:
                why = check_prompt(text, name, self.matcher, self.tokenizer, self.prefix, self.prompts[name],
                                   self.max_tokens)
            else:
                why = None if isinstance(text, str) else f"it is not a string but {type(text).__name__}"
            if why is None:
                self.prompts[name].append(text)
                self.notes.pop(name, None)
            else:
                self.reject(name, why)


def _fill_from_template(run: _BankInProgress, backend: TemplateBackend) -> None:
    """One prompt from the template for each class that has none yet."""
    for name in run.names:
        if not run.prompts[name]:
            run.accept(name, [fill_template(backend.template, name)])


def _ask_in_rounds(
    run: _BankInProgress,
    backend: OpenAIChatBackend | HFChatBackend,
    description: str,
    instruction: Instruction,
    *,
    temperature: float,
    chunk_size: int,
    max_rounds: int,
    out_path: Path | None,
    progress: bool,
) -> None:
    """Up to ``max_rounds`` rounds, each one request (:func:`_ask`) per chunk of the classes still
    short; the bank is saved to ``out_path`` after every request."""
    names = run.names
    run.provenance.update(chunk_size=int(chunk_size), rounds=0, requests=0)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names) * run.target, initial=run.done(), unit="prompt", desc="prompts", disable=not progress)
    try:
        for round_index in range(1, int(max_rounds) + 1):
            wanted = list(run.short_classes())
            if not wanted:
                break
            run.provenance["rounds"] = round_index
            bar.set_postfix_str(f"round {round_index}/{max_rounds}, {len(wanted)} classes short")
            for start in range(0, len(wanted), chunk_size):
                chunk = wanted[start : start + chunk_size]
                shown = names if len(names) <= chunk_size else chunk
                _ask(run, backend, description, shown, chunk, instruction, temperature)
                if out_path is not None:
                    run.snapshot().save(out_path)
                bar.update(run.done() - bar.n)
    finally:
        bar.close()


def _ask(
    run: _BankInProgress,
    backend: OpenAIChatBackend | HFChatBackend,
    description: str,
    shown: Sequence[str],
    chunk: list[str],
    instruction: Instruction,
    temperature: float,
) -> None:
    """One request for a sentence for each class of ``chunk`` (``shown`` as the dataset's classes);
    each answer is accepted or rejected, a class the answer misses is rejected with the reason."""
    messages = build_messages(description, shown, chunk, {n: run.notes[n] for n in chunk if n in run.notes},
                              instruction=instruction)
    answer = backend.chat(messages, temperature=temperature, max_tokens=64 + 60 * len(chunk))
    run.provenance["requests"] += 1
    try:
        found = (match_answer(parse_answer(answer), chunk) if run.validate
                 else match_by_position(parse_answer(answer), chunk))
        missing = "the answer had no sentence for it"
    except AnswerFormatError as exc:
        found, missing = {}, f"the answer was unusable: {exc}"
    for n in chunk:
        if n in found:
            run.accept(n, found[n])
        else:
            run.reject(n, missing)


def _finish(run: _BankInProgress, out_path: Path | None, *, allow_short: bool, template: bool) -> PromptBank:
    """The bank, saved to ``out_path``; :class:`IncompletePromptBankError` (carrying it) when classes
    are still short and ``allow_short`` is off."""
    bank = run.snapshot()
    short = {run.real_name[n]: c for n, c in run.short_classes().items()}
    reasons = {run.real_name[n]: r for n, r in run.reasons.items()}
    if out_path is not None:
        bank.save(out_path)
    if short and not allow_short:
        where = f"; the partial bank is in {out_path} (run again to resume)" if out_path is not None else ""
        rounds = "" if template else f" after {run.provenance['rounds']} round(s)"
        raise IncompletePromptBankError(
            f"{len(short)} of {len(run.names)} classes are short of prompts{rounds}{where}:\n"
            + _format_short(short, reasons, run.target),
            bank,
            short,
            reasons,
        )
    return bank


def _format_short(short: Mapping[str, int], reasons: Mapping[str, list[str]], m: int, limit: int = 20) -> str:
    lines = []
    for name, count in list(short.items())[:limit]:
        why = reasons.get(name) or []
        tail = f"; last rejected because {why[-1]}" if why else ""
        lines.append(f"  {name!r}: {count}/{m}{tail}")
    if len(short) > limit:
        lines.append(f"  ... and {len(short) - limit} more")
    return "\n".join(lines)
