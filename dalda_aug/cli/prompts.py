"""``dalda-aug prompts``: write a prompt bank (M LLM sentences per class) to a JSON file.

Registered into the main parser by :func:`register`; the work is done by
:func:`dalda_aug.prompts.generate_prompt_bank`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, MissingFileError
from ..prompts import CLIP_MAX_TOKENS, DEFAULT_PREFIX
from ._common import add_command, options

if TYPE_CHECKING:
    from ..prompts.presets import DatasetPreset
    from ..prompts import Instruction

__all__ = ["register", "run", "read_class_file"]


def read_class_file(path: str) -> list[str]:
    """One class name per line; blank lines are skipped; a repeated name is an error."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"class list file not found: {file}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"class list file {file} is not UTF-8 text: {exc}") from None
    names: list[str] = []
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise InputError(f"{file}:{number}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise InputError(f"class list file {file} holds no class name")
    return names


def _class_names(args: argparse.Namespace) -> list[str]:
    if args.classes is not None:
        return read_class_file(args.classes)
    from ..data import ImageSource, readable_class_name

    folders = ImageSource.from_folder(args.data).classes  # an empty class folder is refused, as `plan` refuses it
    names = [readable_class_name(f) for f in folders]
    seen: dict[str, str] = {}
    for folder, name in zip(folders, names):
        if name in seen:
            raise InputError(f"class folders {seen[name]!r} and {folder!r} in {args.data} both read as {name!r}")
        seen[name] = folder
    return names


def _preset(args: argparse.Namespace) -> "DatasetPreset | None":
    if getattr(args, "preset", None) is None:
        return None
    from ..prompts.presets import get_preset

    return get_preset(args.preset)


def _instruction(args: argparse.Namespace) -> "Instruction":
    from ..prompts import Instruction

    if getattr(args, "instruction_file", None) is not None:
        return Instruction.from_file(args.instruction_file)
    return Instruction.builtin(getattr(args, "instruction", None) or "default")


def _description(args: argparse.Namespace) -> str:
    preset = _preset(args)
    if args.description_file is None:
        if args.description is None:  # neither given: the preset's (Table 5), else none
            return preset.description if preset is not None else ""
        return str(args.description)
    file = Path(args.description_file)
    if not file.is_file():
        raise MissingFileError(f"description file not found: {file}")
    return file.read_text(encoding="utf-8").strip()


def _tokenizer(args: argparse.Namespace) -> Any:
    from ..prompts import load_clip_tokenizer

    if args.tokenizer is not None:
        return load_clip_tokenizer(args.tokenizer)
    if args.models is not None:
        from ..config import load_models_arg

        models = load_models_arg(args.models)
        return load_clip_tokenizer(models.base, revision=models.base_revision)
    return load_clip_tokenizer()


def _check_hub(args: argparse.Namespace) -> None:
    """Before anything loads: the hf: chat model and the --models tokenizer, when they are hub ids,
    must be reachable or cached (one line in seconds otherwise; see hub.check_hub)."""
    from ..hub import MODELS_HINT, HubFile, check_hub
    from ..locations import parse_location

    llm = str(args.llm or "")
    if llm.startswith("hf:") and llm[3:].strip() and not parse_location(llm[3:].strip()).is_local:
        check_hub([HubFile(llm[3:].strip(), "config.json")], what="the chat model",
                  hint="pass --llm hf:PATH naming a local copy of the chat model and set HF_HUB_OFFLINE=1 on a "
                       "machine without the hub")
    if args.tokenizer is None and args.models is not None:
        from ..config import load_models_arg

        models = load_models_arg(args.models)
        if not parse_location(models.base).is_local:
            check_hub([HubFile(models.base, "tokenizer/tokenizer_config.json", models.base_revision)],
                      what="the base model's tokenizer", hint=MODELS_HINT)


def run(args: argparse.Namespace) -> int:
    from ..prompts import IncompletePromptBankError, PromptBank, generate_prompt_bank, parse_backend

    names = _class_names(args)
    description = _description(args)
    preset = _preset(args)
    instruction = _instruction(args)
    backend = parse_backend(  # builds nothing yet: a bad option is said before the hub is asked
        args.llm, base_delay=args.retry_delay,
        **options(args, "base_url", "api_key_env", "api_version", "timeout", "max_retries", "json_mode", "device",
                  "dtype", "seed"),
    )
    _check_hub(args)
    out = Path(args.out)
    resume = None
    if out.exists() and not args.overwrite:
        resume = PromptBank.load(out)
        have = sum(len(v) for v in resume.prompts.values())
        print(f"resuming from {out} ({have} prompts for {len(resume)} class{'es' if len(resume) != 1 else ''}; --overwrite starts afresh)",
              file=sys.stderr)
    try:
        bank = generate_prompt_bank(
            names,
            backend,
            description=description,
            tokenizer=_tokenizer(args),
            **options(args, "m", "temperature", "prefix", "max_tokens", "chunk_size", "max_rounds"),
            out=out,
            resume_from=resume,
            progress=not args.no_progress,
            instruction=instruction,
            llm_names=preset.llm_names(names) if preset is not None else None,
            validate=getattr(args, "validate", "on") == "on",
        )
    except IncompletePromptBankError as exc:
        print(f"dalda-aug prompts: {exc}", file=sys.stderr)
        return 1
    total = sum(len(v) for v in bank.prompts.values())
    print(f"wrote {total} prompt{'s' if total != 1 else ''} for {len(bank)} class{'es' if len(bank) != 1 else ''} ({backend.describe()['backend']}) -> {out}")
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = add_command(subparsers, "prompts", run,
                    help="write a prompt bank: M LLM-written sentences per class (JSON)",
                    description="Ask an LLM for M realistic one-sentence prompts per class, check each one (names its "
                                "class and no other, one sentence, fits CLIP's 77 tokens with the prefix, no "
                                "duplicate), re-ask the failures and write the bank to --out after every request. An "
                                "existing --out is resumed. Exit status 1 when some classes are still short after "
                                "--max-rounds.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder ROOT/<class>/...: the class names are its sub-folders, "
                                    "made readable (american_bulldog -> american bulldog)")
    src.add_argument("--classes", help="text file with one class name per line")
    p.add_argument("--out", required=True, help="prompt bank JSON to write (resumed when it exists)")
    p.add_argument("-M", "--prompts-per-class", dest="m", type=int, default=10,
                   help="prompts per class (default 10)")
    desc = p.add_mutually_exclusive_group()
    desc.add_argument("--description", default=None, help="a description of the dataset for the LLM")
    desc.add_argument("--description-file", help="a UTF-8 text file holding the dataset description")
    p.add_argument("--preset", choices=("pets", "caltech101", "flowers102"), default=None,
                   help="one of the paper's datasets: its Table 5 description (unless --description or "
                        "--description-file is given) and, for caltech101, the class names the reference "
                        "code shows the LLM (bass -> 'bass fish', faces -> 'face', faces easy -> "
                        "'closed-up face'); sentences are still filed under the folder names")
    ins = p.add_mutually_exclusive_group()
    ins.add_argument("--instruction", choices=("default", "reference"), default="default",
                     help="wording of the request: default (ours: adds a 30-word cap and asks for the class "
                          "name exactly as written) or reference (only the reference code's asks); see "
                          "docs/prompts.md")
    ins.add_argument("--instruction-file", metavar="FILE",
                     help="your own request text: placeholders {description} {classes} {n_classes} "
                          "{requested} {n_requested} {notes} {example}; optional [system] / [user] lines "
                          "split it into two messages (docs/prompts.md)")
    p.add_argument("--validate", choices=("on", "off"), default="on",
                   help="on (default): check every sentence and re-ask failures; off: take any answer that "
                        "parses as JSON with one entry per class, mapped to the classes by position, unchecked, "
                        "as the reference code does")
    p.add_argument("--llm", required=True, metavar="BACKEND",
                   help="openai:MODEL (any OpenAI-compatible endpoint) | hf:MODEL_ID_OR_PATH (local "
                        "transformers chat model) | template[:TEMPLATE] (no LLM, default 'a photo of a {}')")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--chunk-size", type=int, default=120,
                   help="classes per request; longer class lists are split (default 120)")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="rounds before giving up on short classes (default 2*M+2)")
    tok = p.add_argument_group("prompt length")
    tok.add_argument("--tokenizer", help="CLIP tokenizer folder (or SD pipeline folder) used to count tokens")
    tok.add_argument("--models", help="models JSON: count tokens with its base model's tokenizer")
    tok.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"generation prefix (default {DEFAULT_PREFIX!r})")
    tok.add_argument("--max-tokens", type=int, default=CLIP_MAX_TOKENS,
                     help=f"token window of prefix + prompt (default {CLIP_MAX_TOKENS})")
    api = p.add_argument_group("openai backend")
    api.add_argument("--base-url", help="API root (default https://api.openai.com/v1), e.g. "
                                        "http://localhost:8000/v1 for vLLM")
    api.add_argument("--api-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the API key (default OPENAI_API_KEY)")
    api.add_argument("--api-version", help="Azure OpenAI api-version query parameter")
    api.add_argument("--json-mode", action="store_true", help="send response_format=json_object")
    api.add_argument("--timeout", type=float, default=120.0,
                     help="deadline in seconds for each whole HTTP request: connect, headers and the full answer "
                          "(default 120); answers over 4 MiB are refused")
    api.add_argument("--max-retries", type=int, default=5,
                     help="retries on HTTP 429/5xx, time-outs and connection errors (default 5)")
    api.add_argument("--retry-delay", type=float, default=1.0,
                     help="first backoff delay in seconds, doubled per retry (default 1)")
    hf = p.add_argument_group("hf backend")
    hf.add_argument("--device", default="cpu", help="torch device of the chat model (default cpu)")
    hf.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    hf.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
