"""Where a model lives, and loading it with one error policy.

Every model location in the project is read by :func:`dalda_aug.locations.parse_location`, the
one rule for "hub id or local path" (re-exported here).

Every command that loads hub models first calls :func:`check_hub` (through
:func:`require_hub_models`): when a model is a hub id, the hub is offline (``HF_HUB_OFFLINE``) or
does not answer within :data:`HUB_PROBE_TIMEOUT` seconds, and the model is not in the local
Hugging Face cache, it stops at once with one line (:class:`HubUnreachableError`) instead of
letting every loader retry for about a minute. Local models never probe the hub.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Callable, Iterator, Sequence

from ..errors import HubUnreachableError as HubUnreachableError, ModelLoadError  # importable from here too
from ..locations import ModelLocation, describe_location, is_local_location, parse_location  # re-exported
from ..hub import (  # the hub check lives in dalda_aug.hub (a bottom floor); importable from here too
    HUB_PROBE_TIMEOUT as HUB_PROBE_TIMEOUT, KNOWN_OPEN_CLIP_HUB as KNOWN_OPEN_CLIP_HUB, MODELS_HINT as MODELS_HINT,
    HubFile as HubFile, check_hub as check_hub, hub_endpoint as hub_endpoint, hub_files as hub_files,
    hub_reachable as hub_reachable, missing_from_hub_cache as missing_from_hub_cache,
    require_hub_models as require_hub_models,
)

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
    "quiet_loading",
]  # the hub check's names (require_hub_models, ...) live in dalda_aug.hub; importable from here too


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


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, fragments: Sequence[str]):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# (logger, message fragment): notices the libraries print on loads *we* make on purpose and that
# tell the user nothing. Anything else they log still shows.
_QUIET_NOTICES: tuple[tuple[str, str], ...] = (
    # diffusers' load_ip_adapter casts the UNet with .to(dtype=its own dtype): nothing to keep in float32.
    ("diffusers.models.modeling_utils", "that should be kept in float32: []"),
    # resize_token_embeddings for textual inversion: the new rows are overwritten with the init token's.
    ("transformers.modeling_utils", "mean_resizing"),
)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside: no diffusers/transformers loading or saving progress bars, and none of the
    notices in ``_QUIET_NOTICES`` (each dropped only on its own logger, by its text). The
    libraries' progress-bar switches are put back as they were on exit."""
    filters: list[tuple[logging.Logger, logging.Filter]] = []
    for name, fragment in _QUIET_NOTICES:
        logger = logging.getLogger(name)
        flt = _DropMessages([fragment])
        logger.addFilter(flt)
        filters.append((logger, flt))
    restore: list[Callable[[], None]] = []
    for module_name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(module_name)  # only libraries already imported by the caller
        if module is None:
            continue
        enabled = module.is_progress_bar_enabled()
        module.disable_progress_bar()
        if enabled:
            restore.append(module.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()
        for logger, added in filters:
            logger.removeFilter(added)


def call_loader(what: str, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a diffusers/transformers loader; turn its failure into a :class:`ModelLoadError`.

    The call runs inside :func:`quiet_loading` (no loading bars, no notices about our own choices)."""
    try:
        with quiet_loading():
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
