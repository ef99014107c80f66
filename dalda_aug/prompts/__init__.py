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

Layout (each module imports only those listed before it):

* :mod:`.presets`: the paper's dataset descriptions (its Table 5) and the ``"a photo of a {}"``
  template CLIPScore, the filters and DA-Fusion share;
* :mod:`._text`: how names and prompts are compared, the class list check, ``{name}``;
* :mod:`.bank`: :class:`PromptBank` and its file format (:data:`PROMPTS_FORMAT`);
* :mod:`.validate`: :func:`validate_prompt` (class matching, one sentence, CLIP tokens, duplicates);
* :mod:`.tokenizer`: :func:`load_clip_tokenizer` and the cache folder of the default one;
* :mod:`.instructions`: :class:`Instruction`, :func:`build_messages`, :func:`parse_answer`;
* :mod:`.backends`: the template, OpenAI-compatible and transformers chat backends;
* :mod:`.generate`: :func:`generate_prompt_bank`.

This module only re-exports; every name below has been importable from ``dalda_aug.prompts``
since it was one file.
"""

from __future__ import annotations

from ..errors import BackendError, IncompletePromptBankError
from ._text import NAME_PLACEHOLDER
from .backends import (
    DEFAULT_BASE_URL,
    MAX_ANSWER_BYTES,
    OPENAI_SAMPLING,
    REDACTED,
    HFChatBackend,
    OpenAIChatBackend,
    TemplateBackend,
    parse_backend,
    redact,
)
from .bank import DEFAULT_TEMPLATE, PROMPTS_FORMAT, PromptBank
from .generate import generate_prompt_bank
from .instructions import INSTRUCTION_PLACEHOLDERS, INSTRUCTIONS, Instruction, build_messages, parse_answer
from .tokenizer import load_clip_tokenizer
from .validate import CLIP_MAX_TOKENS, DEFAULT_PREFIX, validate_prompt

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
