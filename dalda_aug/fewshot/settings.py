"""Everything one benchmark invocation resolves before its runs: :func:`prepare` checks the
arguments, resolves the device, the methods and the evaluation components, loads the data and
the prompts and builds the generation and training configurations, into a :class:`Benchmark`;
:func:`write_config` records it as ``OUT/config.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .data import Data, load_data
from .methods import (METHODS, filtered_twin, generator_kinds, method_of, plans_own_config, resolve_methods,
                      uses_llm_prompts)
from .protocol import BN_BACKBONES, COMPONENTS, differing_components, resolve_components, row_settings
from .report import FORMAT

if TYPE_CHECKING:  # pragma: no cover
    from ..classify import TrainConfig
    from ..config import ModelConfig
    from ..prompts import PromptBank

__all__ = [
    "Configs",
    "Benchmark",
    "digest",
    "log",
    "prepare",
    "PAPER_DEFAULTS",
    "resolve_defaults",
    "check_arguments",
    "resolve_device",
    "resolve_evaluation",
    "write_prompts",
    "load_prompts",
    "build_configs",
    "run_identity",
    "write_config",
    "finished_runs",
]


def digest(obj: Any) -> str:
    """A short content hash of a JSON-able object (run identities and keys, prompt banks)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log(message: str) -> None:
    """A ``[fewshot]`` line on stderr that does not break the progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(f"[fewshot] {message}", file=sys.stderr)


@dataclass
class Configs:
    """The generation and training configurations of one invocation, and the caches they write."""

    # generator kind (a method's ``generator``, its registered name) -> its config, in the registry's order
    generators: dict[str, Any]
    ti_config: Any  # TextualInversionConfig (the tokens of the "tokens" methods: DA-Fusion)
    # generator kind -> GenerationSpec, for the kinds that share one spec (not those whose
    # plans make their own config: one spec and cache binding per token set, i.e. per (seed, shots))
    specs: dict[str, Any]
    caches: dict[Any, Any]  # generator kind, or (seed, shots, method) of a plan with its own config -> SyntheticCache
    train_config: TrainConfig
    pretrained: bool | str


@dataclass
class Benchmark:
    """What one invocation resolved before its runs (:func:`prepare`), and its running totals."""

    args: argparse.Namespace
    argv: list[str]
    started: float
    device: str
    dtype: str
    num_workers: int
    cache_dir: Path
    methods: list[str]
    skipped: dict[str, str]
    models: ModelConfig
    components: dict[str, Any]
    data: Data
    bank: PromptBank | None
    configs: Configs
    identity: dict[str, Any]
    timing: dict[str, float] = field(default_factory=lambda: {"scores": 0.0, "plan": 0.0, "warm": 0.0,
                                                               "train": 0.0, "evaluate": 0.0})
    meta: dict[str, Any] = field(default_factory=dict)
    # (seed, shots, method) of a filtered twin -> what its filter did (fewshot.py --filter)
    filter_info: dict[Any, dict[str, Any]] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        out: Path = self.args.out
        return out

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def source(self) -> Any:
        return self.data.source

    @property
    def runs_path(self) -> Path:
        return self.out / "runs.jsonl"

    def run_key(self, seed: int, shots: int, method: str) -> str:
        """The key of one run in ``runs.jsonl``: a finished run with the same key is reused."""
        return digest({"identity": self.identity, "seed": seed, "shots": shots, "method": method})



# ---------------------------------------------------------------------------------------------
# arguments, data, prompts, configurations
# ---------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, argv: list[str], started: float) -> Benchmark:
    """Check and resolve everything the runs need, in the order the errors are reported."""
    from ..config import ModelConfig

    used, where = resolve_defaults(args)
    if used:
        log("from " + where + ": " + " ".join(f"--{option} {value}" for option, value in used.items())
            + " (recorded defaults of the models; a flag given wins)")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    check_arguments(args)
    device, dtype, num_workers = resolve_device(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache if args.cache is not None else out / "cache"

    methods, skipped = resolve_methods(args)
    for m, why in skipped.items():
        log(f"skipping method {m!r}: it {why}")
    if not methods:
        raise InputError("no method left to run")
    filters = list(getattr(args, "filter", None) or [])
    if filters:  # each generating method gets its filtered twin (fewshot.py --filter SPEC --oversample K)
        from ..filters import make_filter

        for spec in filters:
            make_filter(spec)  # a bad --filter is said before anything runs
        if getattr(args, "oversample", 2) < 1:
            raise InputError(f"--oversample must be an integer >= 1, got {args.oversample!r}")
        twins = [filtered_twin(m) for m in methods if method_of(m).generator is not None]
        if not twins:
            raise InputError("--filter needs a method that generates images (--methods)")
        methods = [x for m in methods for x in ([m, filtered_twin(m)] if filtered_twin(m) in twins else [m])]
    models = ModelConfig.load(args.models) if args.models is not None else ModelConfig()
    components = resolve_evaluation(args)
    data = load_data(args, components["eval_split"])
    data.source.few_shot(max(args.shots), 0)  # fails early, naming a class with too few images
    bank = load_prompts(args, methods, data.source.class_names, models)
    configs = build_configs(args, models, dtype, cache_dir, device, num_workers)
    identity = run_identity(args, data, models, configs, methods, components, bank, dtype)
    bench = Benchmark(args, argv, started, device, dtype, num_workers, cache_dir, methods, skipped, models,
                      components, data, bank, configs, identity)
    bench.meta = {"dataset": data.name, "config": "config.json", "skipped_methods": skipped,
                  "timing_seconds": bench.timing, "paper_key": args.preset}
    return bench


#: The paper's settings of the options a models file may default for the benchmark
#: (:data:`~dalda_aug.config.DEFAULTABLE_OPTIONS` ``["fewshot"]``), by option name.
PAPER_DEFAULTS: dict[str, int | str] = {"size": 512, "steps": 30, "img2img-steps": 50, "ti-steps": 1000,
                                        "backbone": "resnet50"}


def resolve_defaults(args: argparse.Namespace) -> tuple[dict[str, int | str], str]:
    """Fill the options left unset (None): the ``--models`` file's recorded ``"fewshot"`` defaults
    first (``make-tiny-models`` writes CPU-sized ones, one torch thread and an offline backbone),
    else :data:`PAPER_DEFAULTS` (and torch's thread count). Returns ``(the options taken from the models file, where)``."""
    from ..classify import BACKBONES
    from ..config import model_defaults, models_file

    recorded: dict[str, int | str] = {}
    where = ""
    if args.models is not None:
        recorded = model_defaults(args.models, "fewshot")
        where = str(models_file(args.models))
    used: dict[str, int | str] = {}
    for option, paper in PAPER_DEFAULTS.items():
        dest = option.replace("-", "_")
        if getattr(args, dest, None) is not None:
            continue
        value = recorded.get(option, paper)
        if option in recorded:
            used[option] = value
        setattr(args, dest, value)
    if getattr(args, "threads", None) is None and "threads" in recorded:  # torch's own count otherwise
        args.threads = used["threads"] = recorded["threads"]
    if args.backbone not in BACKBONES:
        raise InputError(f"{where}: defaults.fewshot.backbone {args.backbone!r} is not one of {', '.join(BACKBONES)}")
    return used, where


def check_arguments(args: argparse.Namespace) -> None:
    """The numeric flags: counts >= 1, seeds >= 0, ``--p`` a probability."""
    for name in ("variants", "steps", "img2img_steps", "ti_steps", "size", "epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.shots) < 1:
        raise InputError(f"--shots must be >= 1, got {args.shots}")
    if min(args.seeds) < 0:
        raise InputError(f"--seeds must be >= 0, got {args.seeds}")
    if not 0.0 <= args.p <= 1.0:
        raise InputError(f"--p must lie in [0, 1], got {args.p}")
    if args.iterations_per_epoch < 0:
        raise InputError(f"--iterations-per-epoch must be >= 0, got {args.iterations_per_epoch}")


def resolve_device(args: argparse.Namespace) -> tuple[str, str, int]:
    """(device, generation dtype, DataLoader workers): CUDA when available, float16 there, else float32;
    ``min(8, cores - 1)`` workers on CUDA, 0 on the CPU."""
    import torch

    device: str = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype: str = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    num_workers: int | None = args.num_workers
    if num_workers is None:
        num_workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if device.startswith("cuda") else 0
    return device, dtype, num_workers


def resolve_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Check the component flags against the backbone and the protocol; the resolved components."""
    if args.clip_head is not None and args.backbone != "clip":
        raise InputError(f"--clip-head {args.clip_head} applies to --backbone clip only")
    if args.bn_mode is not None and (args.backbone not in BN_BACKBONES or args.mode != "linear"):
        raise InputError(f"--bn-mode {args.bn_mode} applies to a linear probe on {' or '.join(BN_BACKBONES)} only")
    if args.eval_draws is not None and args.eval_draws < 0:
        raise InputError(f"--eval-draws must be >= 0, got {args.eval_draws}")
    components = resolve_components(args)
    if args.data is not None and components["eval_split"] == "reference" and args.protocol != "reference":
        raise InputError("--eval-split reference with --data evaluates on the pool's second halves, which only the "
                         "reference few-shot draw (--protocol reference) keeps out of training")
    return components


def write_prompts(args: argparse.Namespace, class_names: list[str], models: ModelConfig, path: Path) -> Path:
    """Write the prompt bank for the LLM methods with ``--llm`` (resumed if ``path`` exists),
    with ``--preset``'s Table 5 description and LLM class names, as ``dalda-aug prompts`` does."""
    from ..prompts import PromptBank, generate_prompt_bank, load_clip_tokenizer, parse_backend

    description, llm_names = "", None
    if args.preset is not None:
        from ..prompts.presets import get_preset

        preset = get_preset(args.preset)
        description, llm_names = preset.description, preset.llm_names(class_names)
    options: dict[str, Any] = {} if args.llm.startswith("openai") else {"device": args.device or "cpu"}
    backend = parse_backend(args.llm, base_url=args.base_url, **options)
    resume = PromptBank.load(path) if path.is_file() and not args.overwrite else None
    generate_prompt_bank(class_names, backend, m=args.variants, description=description,
                         tokenizer=load_clip_tokenizer(models.base, revision=models.base_revision), out=path,
                         resume_from=resume, progress=not args.no_progress, instruction=args.instruction,
                         llm_names=llm_names)
    log(f"wrote the prompt bank {path} ({args.llm}{', preset ' + args.preset if args.preset else ''})")
    return path


def load_prompts(args: argparse.Namespace, methods: list[str], class_names: list[str],
                 models: ModelConfig) -> PromptBank | None:
    """The prompt bank of the LLM methods: ``--prompts``, or written with ``--llm`` into OUT/prompts.json
    (``args.prompts`` then names it); None when no method reads one."""
    from ..prompts import PromptBank

    if args.prompts is not None and args.llm is not None:
        raise InputError("give --prompts FILE or --llm BACKEND (to write OUT/prompts.json), not both")
    if args.prompts is None and args.llm is not None and uses_llm_prompts(methods):
        args.prompts = write_prompts(args, class_names, models, args.out / "prompts.json")
    if args.prompts is None or not uses_llm_prompts(methods):
        return None
    bank = PromptBank.load(args.prompts)
    missing = [c for c in class_names if c not in bank]
    if missing:
        raise InputError(f"the prompt bank {args.prompts} has no prompts for class(es) {missing[:5]}")
    short = bank.short_classes(args.variants)
    if short:
        log(f"{len(short)} class(es) have fewer than M={args.variants} prompts; their prompts repeat "
             f"(e.g. {next(iter(short))!r}: {next(iter(short.values()))})")
    return bank


def build_configs(args: argparse.Namespace, models: ModelConfig, dtype: str, cache_dir: Path, device: str,
                  num_workers: int) -> Configs:
    """The generators' configurations and caches, the training configuration and the backbone weights."""
    from ..cache import GenerationSpec, SyntheticCache
    from ..classify import TrainConfig
    from ..generators import registered_configs
    from ..generators.img2img import Img2ImgConfig
    from ..generators.textual_inversion import TextualInversionConfig

    # Every generator a method names, from the registry: img2img ones run --img2img-steps of the
    # full schedule, the others --steps. A kind whose plans make their own config (DA-Fusion: its
    # tokens) gets its spec and cache binding per plan (see make_plans).
    configs = registered_configs()
    generators = {}
    for kind in generator_kinds():
        config_class = configs[kind]
        steps = args.img2img_steps if issubclass(config_class, Img2ImgConfig) else args.steps
        generators[kind] = config_class(num_inference_steps=steps, guidance_scale=args.guidance_scale,
                                        height=args.size, width=args.size)
    ti_config = TextualInversionConfig(steps=args.ti_steps, resolution=args.size)  # DA-Fusion: 512, as --size
    specs = {kind: GenerationSpec(models, config, dtype) for kind, config in generators.items()
             if not plans_own_config(kind)}
    caches: dict[Any, Any] = {kind: SyntheticCache(cache_dir, spec, image_format=args.cache_format)
                              for kind, spec in specs.items()}
    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        iterations_per_epoch=args.iterations_per_epoch or None, num_workers=num_workers,
        device=device, autocast_dtype=args.autocast,
    )
    pretrained: bool | str = True
    if args.backbone == "clip":
        pretrained = models.clip_pretrained
        if args.pretrained is not None:
            raise InputError("--pretrained is for resnet50/efficientnet_lite0; CLIP weights come from --models")
    elif args.pretrained is not None:
        pretrained = args.pretrained
    return Configs(generators, ti_config, specs, caches, train_config, pretrained)


def run_identity(args: argparse.Namespace, data: Data, models: ModelConfig, configs: Configs, methods: list[str],
                 components: dict[str, Any], bank: PromptBank | None, dtype: str) -> dict[str, Any]:
    """Everything a result row depends on: a finished run with the same identity is reused."""
    identity: dict[str, Any] = {
        "format": FORMAT,
        "data": {k: v for k, v in data.split.items()},
        "classes": data.source.classes,
        "models": models.to_dict(),
        "generation": {kind: spec.fingerprint for kind, spec in configs.specs.items()},
        # a method whose plans make their own config: its generator's settings and the tokens'
        **{kind: {"generation": configs.generators[kind].pixel_dict(), "textual_inversion": configs.ti_config.to_dict(),
                  "dtype": dtype}
           for kind in (str(METHODS[m].generator) for m in methods if m in METHODS and METHODS[m].generator)
           if plans_own_config(kind)},
        "variants": args.variants, "p": args.p, "fixed_lambda": args.fixed_lambda, "ags_mode": args.ags_mode,
        "prompts": digest(bank.to_dict()) if bank is not None else None,
        "classifier": {"backbone": args.backbone, "mode": args.mode, "pretrained": str(configs.pretrained),
                       "image_size": args.image_size},
        "train": {k: v for k, v in configs.train_config.to_dict().items()
                  if k not in ("num_workers", "device", "seed")},
    }
    if getattr(args, "filter", None):
        identity["filter"] = {"specs": list(args.filter), "oversample": args.oversample}
    # Non-default choices only, so the run keys of earlier honest runs stay valid.
    if args.protocol != "honest":
        identity["protocol"] = args.protocol
    for name, value in components.items():
        if value is not None and value != COMPONENTS[name][0]:
            identity.setdefault("components", {})[name] = value
    if data.class_order is not None:
        identity["class_order"] = data.class_order
    if args.class_names != "readable":
        identity["class_names"] = args.class_names
    return identity


def write_config(bench: Benchmark) -> None:
    """``OUT/config.json``: the resolved configuration of this invocation."""
    import torch

    import dalda_aug

    from ..plan.ags import AGSConfig

    args, data, configs, components = bench.args, bench.data, bench.configs, bench.components
    device, bank = bench.device, bench.bank
    config = {
        "format": FORMAT,
        "argv": bench.argv,
        "dataset": data.name,
        "data": data.split,
        "classes": data.source.classes,
        "class_names": data.source.class_names,
        "methods": bench.methods,
        "skipped_methods": bench.skipped,
        "method_definitions": {m: vars(method_of(m)) for m in bench.methods},
        "shots": args.shots,
        "seeds": args.seeds,
        "variants": args.variants,
        "p": args.p,
        "fixed_lambda": args.fixed_lambda,
        "ags": AGSConfig(mode=args.ags_mode).to_dict(),
        "prompts": {"path": str(args.prompts.resolve()), "provenance": bank.provenance} if bank is not None else None,
        "models": bench.models.to_dict(),
        "generation": {
            **{kind: {**config.pixel_dict(), **({"fingerprint": configs.specs[kind].fingerprint} if kind in configs.specs
                                                else {"textual_inversion": configs.ti_config.to_dict()})}
               for kind, config in configs.generators.items()},
            "dtype": bench.dtype, "batch_size": args.gen_batch_size,
        },
        "cache": {"folder": str(Path(bench.cache_dir).resolve()), "format": args.cache_format},
        "classifier": {"backbone": args.backbone, "mode": args.mode, "pretrained": configs.pretrained,
                       "clip_model": bench.models.clip_model if args.backbone == "clip" else None,
                       "clip_head": components["clip_head"], "bn_mode": components["bn_mode"],
                       "recipe": components["recipe"], "image_size": args.image_size},
        "components": components,
        "differs_from_reference": {m: differing_components({
            "protocol": args.protocol, "backbone": args.backbone, "mode": args.mode, **components,
            **row_settings(method_of(m), args.ags_mode, args.class_names, data.pool)}) for m in bench.methods},
        "base_prompt_class_names": args.class_names,
        "pool": data.pool,
        "train": {**configs.train_config.to_dict(), "seed": "= run seed"},
        "eval": {"split": "whole test split" if components["eval_split"] == "whole"
                 else "per seed, the reference's second halves (reference_halves)",
                 "draws": components["eval_draws"] or "every item once", "protocol": args.protocol,
                 "epoch": "last" if args.protocol == "honest" else "best seed-averaged mean per-class accuracy",
                 "few_shot_draw": "per-class seeded permutation (dalda_aug.data.few_shot_indices)"
                 if args.protocol == "honest" else "one seeded permutation per dataset (the reference's)",
                 "class_order": data.split.get("class_order"),
                 "batch_size": args.eval_batch_size},
        "device": device,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "dalda_aug": dalda_aug.__version__, "platform": platform.platform(),
                        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
        "identity": digest(bench.identity),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (bench.out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n",
                                           encoding="utf-8")


def finished_runs(runs_path: Path, overwrite: bool) -> dict[str, dict[str, Any]]:
    """The rows of ``runs.jsonl`` by run key (finished runs of an earlier invocation); with
    ``overwrite`` the file is removed and nothing is reused."""
    done: dict[str, dict[str, Any]] = {}
    if runs_path.is_file() and not overwrite:
        for line in runs_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["run_key"]] = row
    elif runs_path.is_file():
        runs_path.unlink()
    return done
