"""The ``dalda-aug`` command line: ``main(argv=None) -> int``.

Each subcommand lives next to the feature it drives and registers itself through a
``register(subparsers)`` function; this module only assembles them and turns the library's
:class:`~dalda_aug.errors.DaldaError` into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import __version__
from ..config import describe_model_defaults, load_models_arg  # live with ModelConfig; importable from here too
from ..errors import DaldaError
from ._common import add_command, add_data_argument, launched_processes, refuse_taken_plan_folder

__all__ = ["main", "build_parser", "load_models_arg", "version_report", "describe_model_defaults"]

# Modules contributing subcommands (each defines ``register(subparsers)``).
_COMMAND_MODULES: tuple[str, ...] = (
    __name__,
    "dalda_aug.cli.prompts",
    "dalda_aug.cli.cache",
    "dalda_aug.cli.inspect",
    "dalda_aug.cli.demo",
    "dalda_aug.cli.da_fusion",
    "dalda_aug.cli.filter",
)


# -- make-tiny-models ------------------------------------------------------------------
def _run_make_tiny_models(args: argparse.Namespace) -> int:
    from ..tiny_models import make_tiny_models

    config = make_tiny_models(args.dir, seed=args.seed)
    print(f"wrote tiny models to {Path(args.dir).resolve()}; config: {Path(args.dir).resolve() / 'models.json'} "
          f"(paths relative to the folder; CPU-sized defaults for warm, demo, textual-inversion and "
          f"benchmarks/fewshot.py)")
    if args.verbose:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


# -- plan ------------------------------------------------------------------------------
def _plan_methods() -> dict[str, str]:
    """``plan --method`` choices -> the generator registry's ``METHOD`` (``real_guidance`` is
    ``real-guidance`` on the command line); ``dalda`` is the IP-Adapter's, as the paper names it."""
    from ..generators.base import registered_configs

    methods = {method.replace("_", "-"): method for method in registered_configs()}
    methods["dalda"] = "ip_adapter"
    return methods


def _run_plan(args: argparse.Namespace) -> int:
    from ..plan.ags import AGSConfig, Scaling
    from .cache import check_device, check_output_folder
    from ..errors import InputError
    from ..hub import require_hub_models
    from ..plan.build import MAX_VARIANTS

    check_output_folder(args.out)
    refuse_taken_plan_folder(Path(args.out), args.overwrite)
    if not 1 <= args.variants <= MAX_VARIANTS:
        raise InputError(f"--variants {args.variants}: plan between 1 and {MAX_VARIANTS} images per source image")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: the plan seed must be >= 0")
    if args.shots is not None and args.shots < 1:
        raise InputError(f"--shots {args.shots}: keep at least 1 image per class")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be >= 1")
    check_device(args.device, available=False)  # the name now; whether this machine has it after the hub check
    models = load_models_arg(args.models)
    scaling = Scaling.parse(args.scaling, AGSConfig(mode=args.ags_mode))
    from ..data import ImageSource

    ImageSource.from_folder(args.data)  # a missing or empty folder or a symlink loop is said before the hub is asked
    if scaling.strategy == "fixed" and not 0.0 <= scaling.value <= 1.0:
        raise InputError(f"--scaling {args.scaling}: the fixed λ must lie in [0, 1]")
    require_hub_models(models, ("clip_model", "clip_pretrained"))  # before any model loads
    check_device(args.device)  # imports torch (except for "cpu"), so after the hub check

    from ..plan.clipscore import CLIPScorer
    from ..plan.build import build_plan

    prompts = None
    if args.prompts:
        from ..prompts import PromptBank

        prompts = PromptBank.load(args.prompts)
    scorer = CLIPScorer.from_models(models, device=args.device, kind=args.score_kind, batch_size=args.batch_size)
    method = _plan_methods()[args.method]
    if method == "da_fusion":  # DA-Fusion: class-token prompts, a drawn img2img strength per variant
        from ..generators.da_fusion import build_da_fusion_plan

        if not args.tokens or prompts is not None:
            raise InputError("--method da-fusion needs --tokens TOKENS (dalda-aug textual-inversion) and no --prompts")
        plan = build_da_fusion_plan(args.data, args.tokens, variants=args.variants, seed=args.seed, n_shot=args.shots,
                                    models=models, scorer=scorer)
        _record_model_defaults(plan, args.models)
        print(f"planned {len(plan)} DA-Fusion images for {plan.summary['sources']} source images "
              f"(strengths {plan.config['scaling']['strengths']}) -> {plan.save(args.out)}")
        return 0
    if method not in ("ip_adapter", "da_fusion"):
        # another generator (Real Guidance: img2img of the base prompt) ignores λ: a constant keeps its
        # cache keys independent of the n-shot setting, as the few-shot benchmark plans it
        scaling = Scaling("fixed", value=0.0)
    processes = launched_processes(args.device)
    plan = build_plan(
        args.data,
        variants=args.variants,
        seed=args.seed,
        n_shot=args.shots,
        scaling=scaling,
        prompts=prompts,
        models=models,
        scorer=scorer,
        base_prompt_names=args.class_names,
        processes=processes,
    )
    if processes is not None and not processes.is_main_process:
        return 0  # every process holds the whole plan; the main process writes it
    if method != "ip_adapter":  # the plan names its generator's config, which warm reads
        from ..generators.base import registered_configs

        plan.config["generator"] = {"method": method, "config": registered_configs()[method]().to_dict()}
    _record_model_defaults(plan, args.models)
    out = plan.save(args.out)
    s = plan.summary
    print(
        f"planned {_count(s['variants'], 'image')} for {_count(s['sources'], 'source image')} in "
        f"{_count(s['classes'], 'class')} "
        f"(scaling {scaling.describe()}, mean score {s['mean_score']:.3f}, "
        f"Low {s['low_share']:.0%} / High {s['high_share']:.0%}) -> {out}"
    )
    return 0


def _record_model_defaults(plan: Any, models: str | None) -> None:
    """Copy the option defaults the ``--models`` file records (the tiny models' CPU-sized ones)
    into the plan (``plan.json``'s ``model_defaults``), so that ``warm --plan`` without
    ``--models`` takes them with the plan's models. Not part of any cache key."""
    from ..config import PLAN_DEFAULTS_KEY, all_model_defaults

    defaults = all_model_defaults(models) if models is not None else {}
    if defaults:
        plan.config[PLAN_DEFAULTS_KEY] = defaults


def _count(n: int, noun: str) -> str:
    """``1 class``, ``2 classes``, ``1 image``, ``3 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = add_command(subparsers, "make-tiny-models", _run_make_tiny_models,
                    help="write tiny random models (offline) and DIR/models.json",
                    description="Write tiny random-weight SD 1.x, IP-Adapter and open_clip models in the real "
                                "formats, plus DIR/models.json pointing at them (for tests, CI and offline demos).")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")

    p = add_command(subparsers, "plan", _run_plan,
                    help="score source images and plan M variants per image (prompt, λ, seed)",
                    description="Score every source image with CLIP, draw λ per variant and write "
                                "OUT/plan.jsonl, OUT/plan.json and OUT/summary.json.")
    add_data_argument(p)
    p.add_argument("--out", required=True, help="output plan folder")
    p.add_argument("--shots", type=int, default=None,
                   help="keep N images per class (seeded split); default: all images")
    p.add_argument("--variants", "-M", type=int, default=10, help="synthetic images per source image (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scaling", default="ags", help="ags | rs | fixed:<λ> (default ags)")
    p.add_argument("--ags-mode", choices=("truncnorm", "clip"), default="truncnorm",
                   help="truncnorm: the paper's truncated normal (default); clip: the reference code's clipped normal")
    p.add_argument("--prompts", default=None, help="prompt bank JSON (dalda-aug prompts); default 'a photo of a {class}'")
    p.add_argument("--class-names", choices=("readable", "folder"), default="readable",
                   help="class name in the base prompt 'a photo of a {class}': readable (american bulldog, the "
                        "paper) or folder (american_bulldog, as the reference code writes it)")
    p.add_argument("--models", default=None,
                   help="models JSON (see ModelConfig) or a folder holding models.json; default: the paper's hub models")
    p.add_argument("--score-kind", choices=("softmax", "cosine"), default="softmax")
    p.add_argument("--device", default="cpu", help="torch device for CLIP scoring (default cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per CLIP batch")
    methods = _plan_methods()
    p.add_argument("--method", choices=sorted(methods), default="dalda",
                   help="the generator the plan is for, any registered one (dalda_aug.generators): dalda or "
                        "ip-adapter (default): prompts + λ; da-fusion: 'a photo of a <class token>' + a drawn "
                        "strength; real-guidance: the base prompts, img2img at the config's strength (λ unused)")
    p.add_argument("--tokens", default=None, help="DA-Fusion token folder (dalda-aug textual-inversion)")
    p.add_argument("--overwrite", action="store_true", help="replace a plan already in --out (refused otherwise)")


# -- --version -------------------------------------------------------------------------
# (name shown, distribution name): the libraries whose versions a bug report needs.
_REPORTED_PACKAGES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("diffusers", "diffusers"),
    ("transformers", "transformers"),
    ("open_clip", "open_clip_torch"),
)


def version_report() -> str:
    """What ``dalda-aug --version`` prints: one ``name version`` line per package.

    Versions are read from the installed distributions' metadata, so nothing heavy is imported;
    a package that is not installed is reported as such.
    """
    import platform
    from importlib import metadata

    lines = [f"dalda-aug {__version__}", f"python {platform.python_version()}"]
    for name, distribution in _REPORTED_PACKAGES:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
            continue
        if name == "torch":
            version = _torch_build() or version
        lines.append(f"{name} {version}")
    return "\n".join(lines)


def _torch_build() -> str | None:
    """torch's own version string with its build (``2.5.1+cu124 (CUDA 12.4)``), read from
    ``torch/version.py`` without importing torch; None if that file cannot be read."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
        folders = list(spec.submodule_search_locations or []) if spec else []
        text = (Path(folders[0]) / "version.py").read_text(encoding="utf-8") if folders else ""
    except (ImportError, OSError, ValueError):
        return None
    values: dict[str, str] = dict(re.findall(r"^(__version__|cuda|hip)\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE))
    if "__version__" not in values:
        return None
    builds = [f"{label} {values[key]}" for key, label in (("cuda", "CUDA"), ("hip", "HIP")) if key in values]
    return values["__version__"] + (f" ({', '.join(builds)})" if builds else "")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalda-aug",
        description="DALDA generative data augmentation for few-shot image classification.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the versions of dalda-aug, Python, torch, "
                        "diffusers, transformers and open_clip, and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        module.register(subparsers)
    for each in _all_parsers(parser):
        each.allow_abbrev = False  # long options are documented whole: --cach is a typo, not --cache
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` holds: ``plan``, ``cache stats``... (the top one if none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if isinstance(chosen, argparse.ArgumentParser):
                return _chosen_parser(chosen, args)
    return parser


# Commands taking the generation options (--models --size --steps ...; cli.cache.add_spec_arguments).
_SPEC_COMMANDS = ("warm", "cache", "metrics", "inspect")


def _apply_model_defaults(args: argparse.Namespace) -> None:
    """Options a ``--models`` file records as defaults for this command (``make-tiny-models``'
    CPU-sized ones) fill the options not given; ``args.model_defaults`` says which, and
    ``args.model_defaults_from`` where they were read, for the command's startup line.
    ``cache stats|export``, ``metrics`` and ``inspect`` read ``warm``'s, so that the same
    ``--models`` names the same cache keys. ``warm`` without ``--models`` takes the plan's models
    and the defaults the plan recorded with them (``plan.json``'s ``model_defaults``)."""
    from ..config import DEFAULTABLE_OPTIONS, model_defaults

    args.model_defaults = {}
    args.model_defaults_from = None
    command = getattr(args, "command", None)
    # The commands that name a generation spec read warm's defaults, so that their keys are warm's.
    section = "warm" if command in _SPEC_COMMANDS else command
    if section not in DEFAULTABLE_OPTIONS or section == "demo":
        return  # the demo reads its own (its --models may be "tiny")
    if getattr(args, "models", None) is not None:
        recorded = model_defaults(args.models, section)
        args.model_defaults_from = args.models
    elif command == "warm" and getattr(args, "plan", None):
        recorded = _plan_model_defaults(args.plan).get(section, {})
        args.model_defaults_from = f"{Path(args.plan) / 'plan.json'}, the plan's models"
    else:
        return  # the readers take the spec warm recorded
    for option, value in recorded.items():
        dest = option.replace("-", "_")
        if hasattr(args, dest) and getattr(args, dest) is None:
            setattr(args, dest, value)
            args.model_defaults[option] = value


def _plan_model_defaults(plan: str) -> dict[str, dict[str, int | str]]:
    """The option defaults a plan recorded with its models (``{}`` when none, or when the plan
    cannot be read: the command then says why, naming the file)."""
    from .._io import read_json_object
    from ..config import PLAN_DEFAULTS_KEY, check_model_defaults

    path = Path(plan) / "plan.json"
    try:
        data = read_json_object(path, "plan file")
    except DaldaError:
        return {}
    return check_model_defaults(data.get(PLAN_DEFAULTS_KEY, {}), path)


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for chosen in dict.fromkeys(action.choices.values()):  # aliases name the same parser once
                yield from _all_parsers(chosen)


def _unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """``unrecognized arguments: ...``, with ``(did you mean --shots?)`` for each mistyped option
    close to one of ``parser``'s own."""
    import difflib

    options = [option for option in parser._option_string_actions if option.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("--"):
            hints += difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.75)
    hint = f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""
    return f"unrecognized arguments: {' '.join(extras)}{hint}"


def _subparsers(parser: argparse.ArgumentParser) -> "argparse._SubParsersAction[argparse.ArgumentParser] | None":
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _check_commands(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """An unknown (sub)command stops with one line under its parser's usage (exit status 2) that
    suggests the command meant: a close spelling (``paln`` -> ``plan``) or the command one level
    down that has this name (``export`` -> ``cache export``)."""
    import difflib

    current, i = parser, 0
    words: list[str] = []  # the commands read so far ("cache")
    while True:
        action = _subparsers(current)
        if action is None:
            return
        if current is parser:  # the top level's options take no value (--version, -h)
            while i < len(argv) and argv[i].startswith("-"):
                i += 1
        if i >= len(argv) or argv[i].startswith("-"):
            return  # no command here: argparse says what is missing
        name = argv[i]
        if name in action.choices:
            current, i = action.choices[name], i + 1
            words.append(name)
            continue
        hints = [" ".join([*words, close]) for close in difflib.get_close_matches(name, list(action.choices), n=2)]
        for command, sub in action.choices.items():
            nested = _subparsers(sub)
            if nested is not None and name in nested.choices:
                hints.append(" ".join([*words, command, name]))
        hint = f" (did you mean {' or '.join(f'`{parser.prog} {h}`' for h in dict.fromkeys(hints))}?)" if hints else ""
        current.error(f"unknown command {name!r}{hint}; commands: {', '.join(action.choices)}")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, an unknown option said first: argparse checks the required options (``plan
    --data/--out``) before it returns the ones it does not know, so ``plan --shtos 2`` would say
    ``--data`` is missing. A first pass with nothing required finds the unknown ones and names them
    in one line under the chosen subcommand's usage (exit status 2); then the real pass. ``--help``
    skips the first pass, so its usage line shows the required options as required."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_commands(parser, argv)
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "-h" in options or "--help" in options:
        return parser.parse_args(argv)
    parsers = list(_all_parsers(parser))
    relaxed: list[Any] = [action for each in parsers for action in each._actions if action.required]
    relaxed += [group for each in parsers for group in each._mutually_exclusive_groups if group.required]
    for item in relaxed:
        item.required = False
    try:
        args, extras = parser.parse_known_args(argv)
    finally:
        for item in relaxed:
            item.required = True
    if extras:  # the chosen subcommand's usage, not the top level's
        chosen = _chosen_parser(parser, args)
        chosen.error(_unrecognized(chosen, extras))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with _command_log(f"dalda-aug {args.command}"):
        return _run_command(args)


@contextlib.contextmanager
def _command_log(prefix: str) -> Iterator[None]:
    """While a command runs, the package's warnings print as ``dalda-aug plan: warning: ...``
    (one line each) on stderr, whatever a library did to the root logger; restored afterwards."""
    logger = logging.getLogger("dalda_aug")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{prefix}: warning: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _run_command(args: argparse.Namespace) -> int:
    try:
        _apply_model_defaults(args)
        return int(args.func(args) or 0)
    except DaldaError as exc:
        print(f"dalda-aug {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dalda-aug {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
