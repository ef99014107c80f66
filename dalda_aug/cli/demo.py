"""The end-to-end demo (``make demo`` / ``dalda-aug demo``): photos in, a contact sheet out.

1. builds a 1-shot image folder from photos that ship with scikit-image (Chelsea the cat,
   a coffee cup, a rocket, an astronaut, a motorcycle);
2. writes the prompt bank: the base template "a photo of a {class}", or M sentences per class
   from an LLM when ``DALDA_LLM`` (or ``--llm``) names one (``openai:MODEL``, ``hf:MODEL``);
3. plans M variants per photo (CLIPScore, adaptive λ, seeds);
4. warms a synthetic-image cache with the generator;
5. writes ``contact_sheet.png``: per photo, the original and its variants, each labelled with
   λ and its prompt.

Models: ``DALDA_MODELS`` (or ``--models``) is ``tiny`` — tiny random models written by
:func:`~dalda_aug.tiny_models.make_tiny_models`, fully offline on a CPU in well under two minutes
(the images are noise: the weights are random) — or a models JSON file; unset, the paper's
models from the Hugging Face hub. The GPU is used when there is one.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config import ModelConfig
from ..errors import InputError, ModelLoadError
from ..hub import HUB_PROBE_TIMEOUT, HubUnreachableError, hub_endpoint, hub_reachable
from ._common import add_command, default_device, options

if TYPE_CHECKING:
    import argparse

    from ..prompts import PromptBank

__all__ = [
    "run_demo", "write_demo_folder", "resolve_models", "register", "main", "DEMO_IMAGES",
    "hub_endpoint", "hub_reachable", "missing_from_hub_cache", "OFFLINE_HINT",
]

# The one line an offline user gets when the demo needs the hub.
OFFLINE_HINT = "`DALDA_MODELS=tiny make demo` runs the demo offline with tiny random models"
# HUB_PROBE_TIMEOUT, HubUnreachableError, hub_endpoint and hub_reachable live in
# dalda_aug.hub (every command checks the hub the same way); re-exported here.

# class folder -> scikit-image loader name (all bundled with scikit-image, no download).
DEMO_IMAGES = {
    "cat": "chelsea",
    "coffee_cup": "coffee",
    "rocket": "rocket",
    "astronaut": "astronaut",
    "motorcycle": "stereo_motorcycle",
}


@dataclass(frozen=True)
class _Settings:
    models: ModelConfig
    tiny: bool
    size: int
    steps: int
    tile: int


def write_demo_folder(root: str | os.PathLike[str]) -> Path:
    """Write ``root/<class>/<name>.png``, one scikit-image photo per class (1-shot)."""
    from PIL import Image

    from ..errors import require

    data = require("skimage.data", "dev", package="scikit-image")
    folder_root = Path(root)
    for folder, name in DEMO_IMAGES.items():
        array = getattr(data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        (folder_root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).convert("RGB").save(folder_root / folder / f"{name}.png")
    return folder_root


def resolve_models(choice: str | None, workdir: str | os.PathLike[str]) -> tuple[ModelConfig, bool]:
    """``(ModelConfig, tiny?)`` for ``choice``: ``"tiny"``, a models JSON path, or None (the hub)."""
    if choice is None or _uses_hub(choice):
        return ModelConfig(), False
    if choice.strip().lower() == "tiny":
        from ..tiny_models import make_tiny_models

        folder = Path(workdir) / "tiny-models"
        if (folder / "models.json").is_file():
            return ModelConfig.load(folder / "models.json"), True
        return make_tiny_models(folder), True
    return ModelConfig.load(choice), False


def _settings(models_choice: str | None, out: Path, size: int | None, steps: int | None) -> _Settings:
    models, tiny = resolve_models(models_choice, out)
    if tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
        return _Settings(models, True, size or 64, steps or 2, 128)
    _check_hub(models, paper=_uses_hub(models_choice))  # local models: no probe
    recorded: dict[str, int | str] = {}
    if not _uses_hub(models_choice) and models_choice is not None:
        from ..config import model_defaults

        recorded = model_defaults(models_choice, "demo")  # e.g. make-tiny-models' CPU-sized options
    return _Settings(models, False, size or int(recorded.get("size", 512)), steps or int(recorded.get("steps", 30)), 256)


# -- is the hub there? (the check every command makes: dalda_aug.hub) ---------------
def _uses_hub(choice: str | None) -> bool:
    """``--models``/``DALDA_MODELS`` names the paper's hub models: unset, empty, hub, paper or default."""
    return choice is None or not choice.strip() or choice.strip().lower() in ("hub", "paper", "default")


# The ModelConfig fields the demo loads (CLIP for the plan, the diffusion models for the cache).
_DEMO_FIELDS = ("base", "vae", "ip_adapter", "clip_model", "clip_pretrained")


def missing_from_hub_cache(models: ModelConfig, cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The hub repositories of ``models``' diffusion models (base pipeline, IP-Adapter, VAE) that
    are not in the local Hugging Face cache (``cache_dir``, default ``$HF_HUB_CACHE``)."""
    from ..hub import hub_files
    from ..hub import missing_from_hub_cache as missing

    return missing(hub_files(models, ("base", "vae", "ip_adapter")), cache_dir)


def _check_hub(models: ModelConfig, paper: bool = True) -> None:
    """Stop within seconds, with one line suggesting the tiny models, when the hub models are
    neither reachable nor cached (:func:`~dalda_aug.hub.require_hub_models`)."""
    from ..hub import require_hub_models

    require_hub_models(models, _DEMO_FIELDS, hint=OFFLINE_HINT, what="the paper's models" if paper else "")


def _prompt_bank(class_names: list[str], variants: int, llm: str | None, models: ModelConfig,
                 out: Path) -> PromptBank:
    from ..prompts import PromptBank

    path = out / "prompts.json"
    if not llm:
        bank = PromptBank.from_template(class_names)
    else:
        from ..prompts import generate_prompt_bank, load_clip_tokenizer, parse_backend

        tokenizer = load_clip_tokenizer(models.base, revision=models.base_revision)
        bank = generate_prompt_bank(
            class_names, parse_backend(llm), m=variants,
            description="Everyday photographs, each showing one animal, object or person.",
            tokenizer=tokenizer, out=path, allow_short=True,
        )
    bank.save(path)
    return bank


def run_demo(
    out: str | os.PathLike[str] = "demo_out",
    *,
    models: str | None = None,
    llm: str | None = None,
    variants: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    size: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the paths written and the timings.

    ``models``: ``"tiny"``, a models JSON path, or None for the paper's hub models.
    ``llm``: an LLM backend (``openai:MODEL``, ``hf:MODEL``) for the prompts; None: template.
    Defaults per model kind: tiny 64 px, 2 steps, 128 px tiles; real 512 px, 30 steps.
    """
    if int(variants) != variants or variants < 1:
        raise InputError(f"variants must be an integer >= 1, got {variants!r}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(models, out, size, steps)  # before torch: an unreachable hub stops here

    import torch

    from ..cache import GenerationSpec, SyntheticCache
    from ..plan.clipscore import CLIPScorer
    from ..generators.ip_adapter import IPAdapterConfig
    from ..plan.build import build_plan
    from ..viz import plan_contact_sheet
    from ..cache.warm import warm

    device = default_device(device)
    dtype = dtype or ("float16" if str(device).startswith("cuda") else "float32")
    if settings.tiny and str(device) == "cpu":
        torch.set_num_threads(1)  # tiny layers: thread hand-offs cost more than they save

    data_dir = write_demo_folder(out / "data")
    from ..data import ImageSource

    source = ImageSource.from_folder(data_dir)
    bank = _prompt_bank(source.class_names, variants, llm, settings.models, out)
    scorer = CLIPScorer.from_models(settings.models, device=device)
    plan = build_plan(source, variants=variants, seed=seed, prompts=bank, models=settings.models, scorer=scorer)
    plan.save(out / "plan")

    config = replace(IPAdapterConfig(), num_inference_steps=settings.steps, height=settings.size, width=settings.size)
    spec = GenerationSpec(settings.models, config, dtype)
    cache = SyntheticCache(out / "cache", spec)
    report = warm(plan, cache, device=device, batch_size=batch_size, progress=progress)

    kind = "tiny random models (noise)" if settings.tiny else settings.models.base
    title = f"DALDA demo · {kind} · {settings.size}px, {settings.steps} steps, {device}"
    sheet = plan_contact_sheet(plan, cache, tile=settings.tile, title=title)
    sheet_path = out / "contact_sheet.png"
    sheet.save(sheet_path)
    cache.close()
    return {
        "contact_sheet": sheet_path,
        "size": sheet.size,
        "plan": out / "plan",
        "cache": out / "cache",
        "prompts": out / "prompts.json",
        "data": data_dir,
        "warm": report,
        "seconds": time.perf_counter() - started,
    }


# -- command line ---------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    result = run_demo(
        args.out,
        models=args.models if args.models is not None else os.environ.get("DALDA_MODELS"),
        llm=args.llm if args.llm is not None else os.environ.get("DALDA_LLM"),
        progress=not args.no_progress,
        **options(args, "variants", "device", "dtype", "size", "steps", "batch_size", "seed"),
    )
    w, h = result["size"]
    print(f"dalda-aug demo: {result['warm'].summary()}")
    print(f"dalda-aug demo: wrote {result['contact_sheet']} ({w}x{h}) in {result['seconds']:.0f} s "
          f"(plan {result['plan']}, cache {result['cache']}, prompts {result['prompts']})")
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = add_command(subparsers, "demo", _run,
                    help="end-to-end demo: scikit-image photos -> prompts, plan, cache -> contact sheet PNG",
                    description="Build a 1-shot folder from photos bundled with scikit-image, write prompts, plan, "
                                "warm the cache and write OUT/contact_sheet.png. DALDA_MODELS=tiny runs offline on a CPU.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--models", default=None,
                   help="'tiny', a models JSON, or omit for the paper's hub models (default: $DALDA_MODELS)")
    p.add_argument("--llm", default=None, help="LLM for prompts, e.g. openai:gpt-4o-mini (default: $DALDA_LLM; "
                                               "unset: the template 'a photo of a {class}')")
    p.add_argument("--variants", "-M", type=int, default=4, help="variants per photo (default 4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float16 on cuda)")
    p.add_argument("--size", type=int, default=None, help="image size (default 512; 64 with tiny models)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; 2 with tiny models)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dalda_aug.cli.demo [options]``: the demo without the rest of the CLI."""
    import argparse

    from ..errors import DaldaError

    parser = argparse.ArgumentParser(prog="dalda-aug demo", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    try:
        return _run(args)
    except DaldaError as exc:
        message = " ".join(str(exc).split())  # one line
        hub = _uses_hub(args.models if args.models is not None else os.environ.get("DALDA_MODELS"))
        if isinstance(exc, ModelLoadError) and hub and OFFLINE_HINT not in message:
            message += f"; no access to the model hub? {OFFLINE_HINT}"
        print(f"dalda-aug demo: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
