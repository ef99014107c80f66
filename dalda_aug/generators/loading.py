"""Where a model lives, and loading it with one error policy.

Every model location in the project (the Stable Diffusion pipeline, the VAE overrides, the
IP-Adapter, the CLIPScore model and checkpoint, the LLM of the prompt bank, the tokenizer used to
count prompt tokens, textual-inversion token files) is read by :func:`parse_location`, the one
rule for "hub id or local path":

1. a location that exists on disk (``~`` expanded; relative ones against ``base_dir`` when
   given, else the working directory) is a local path;
2. so is one *written as a path* even if it is missing: absolute, starting with ``./``, ``../``,
   ``~`` or ``.\\``, containing a backslash, more than one ``/`` (a hub id is ``name`` or
   ``owner/name``), or ending in a weight or config file extension (``.json``, ``.bin``, ``.pt``,
   ``.pth``, ``.ckpt``, ``.safetensors``);
3. anything else is a hub id (or, for open_clip, a registered name or pretrained tag).

So a missing ``models/sd`` is a hub id (``owner/name``) everywhere; write ``./models/sd`` to mean
the folder. Nothing here imports torch, diffusers or transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from ..errors import ModelLoadError

__all__ = [
    "ModelLocation",
    "parse_location",
    "is_local_location",
    "describe_location",
    "check_local_folder",
    "call_loader",
    "ddim_scheduler_config",
    "make_scheduler",
    "load_vae",
    "load_tiny_vae",
]

_FILE_SUFFIXES = (".json", ".bin", ".pt", ".pth", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class ModelLocation:
    """A parsed model location: ``kind`` is ``"local"`` (``value`` is the expanded path) or ``"hub"``."""

    kind: Literal["local", "hub"]
    value: str
    given: str

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def path(self) -> Path:
        """The local path (only meaningful when :attr:`is_local`)."""
        return Path(self.value)


def _written_as_path(text: str) -> bool:
    return (
        os.path.isabs(text)
        or text.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith(_FILE_SUFFIXES)
    )


def parse_location(location: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None) -> ModelLocation:
    """Apply the project's one rule (see the module docstring) to a model location."""
    given = os.fspath(location)
    expanded = os.path.expanduser(given)
    candidate = expanded
    if base_dir is not None and not os.path.isabs(expanded):
        candidate = os.path.join(os.fspath(base_dir), expanded)
    if os.path.exists(candidate) or _written_as_path(given):
        return ModelLocation("local", str(Path(candidate).resolve()) if base_dir is not None else candidate, given)
    return ModelLocation("hub", given, given)


def is_local_location(location: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when :func:`parse_location` reads ``location`` as a local path."""
    return parse_location(location, base_dir=base_dir).is_local


def describe_location(location: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """Human-readable description of a model location, for error messages."""
    parsed = parse_location(location)
    text = f"folder {parsed.value!r}" if parsed.is_local else f"hub repository {location!r}"
    if subfolder:
        text += f", subfolder {subfolder!r}"
    if revision:
        text += f", revision {revision!r}"
    return text


def check_local_folder(location: str, field: str, what: str, marker: str) -> None:
    """For a local ``location``: fail now, naming the file, unless ``location/marker`` exists."""
    parsed = parse_location(location)
    if not parsed.is_local:
        return
    path = parsed.path
    if not path.is_dir():
        raise ModelLoadError(f"{what} folder not found: {path} ({field}={location!r})")
    if not (path / marker).is_file():
        raise ModelLoadError(f"{what}: expected {path / marker} ({field}={location!r})")


def call_loader(what: str, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a diffusers/transformers loader; turn its failure into a :class:`ModelLoadError`."""
    try:
        return fn(*args, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(f"could not load {what}: expected {expected} ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------
# shared pieces of the Stable Diffusion loaders
# --------------------------------------------------------------------------------------------
def ddim_scheduler_config() -> dict[str, Any]:
    """The DDIM configuration of the paper's reference code (scaled-linear betas 0.00085–0.012)."""
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


def make_scheduler(name: str, pipeline_scheduler: Any = None) -> Any:
    """A fresh scheduler: ``"ddim"`` (:func:`ddim_scheduler_config`, eta 0), ``"dpmsolver++"``
    (DPM-Solver++ 2M from the same betas) or ``"pipeline"`` (a copy of ``pipeline_scheduler``,
    the base model's own ``scheduler/`` as ``from_pretrained`` loaded it)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "pipeline":
        if pipeline_scheduler is None:
            raise ValueError("scheduler 'pipeline' needs the pipeline's own scheduler")
        return type(pipeline_scheduler).from_config(pipeline_scheduler.config)
    ddim = DDIMScheduler(**ddim_scheduler_config())
    if name == "ddim":
        return ddim
    if name == "dpmsolver++":
        # The usual diffusers recipe: DPM-Solver++ (2M) from the DDIM scheduler's config.
        config = ddim.config  # type: ignore[attr-defined]  # set at run time by diffusers' ConfigMixin
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}")


def load_vae(location: str, dtype: Any, *, field: str = "ModelConfig.vae") -> Any:
    """The ``AutoencoderKL`` at ``location`` (a VAE that replaces the base pipeline's own)."""
    from ..errors import require

    diffusers = require("diffusers", "generate")
    check_local_folder(location, field, "VAE (AutoencoderKL)", "config.json")
    return call_loader(
        "the VAE",
        f"an AutoencoderKL in {describe_location(location)}",
        diffusers.AutoencoderKL.from_pretrained,
        parse_location(location).value,
        dtype=dtype,
    )


def load_tiny_vae(location: str, dtype: Any, vae_scale_factor: int, *, field: str) -> Any:
    """An ``AutoencoderTiny`` (e.g. TAESD) whose upsampling factor matches the pipeline's VAE."""
    from ..errors import require

    diffusers = require("diffusers", "generate")
    check_local_folder(location, field, "tiny VAE (AutoencoderTiny)", "config.json")
    tiny = call_loader(
        "the tiny VAE",
        f"an AutoencoderTiny in {describe_location(location)}",
        diffusers.AutoencoderTiny.from_pretrained,
        parse_location(location).value,
        dtype=dtype,
    )
    factor = tiny.config.upsampling_scaling_factor ** (len(tiny.config.decoder_block_out_channels) - 1)
    if factor != vae_scale_factor:
        raise ModelLoadError(
            f"tiny VAE {location!r} upsamples latents {factor}x but the pipeline's VAE "
            f"{vae_scale_factor}x; they must match"
        )
    return tiny
