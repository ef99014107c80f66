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
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..errors import HubUnreachableError, ModelLoadError  # HubUnreachableError: importable from here too
from ..locations import ModelLocation, describe_location, is_local_location, parse_location  # re-exported

__all__ = [
    "KNOWN_OPEN_CLIP_HUB",
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
    "HubFile",
    "HubUnreachableError",
    "HUB_PROBE_TIMEOUT",
    "MODELS_HINT",
    "hub_endpoint",
    "hub_reachable",
    "hub_files",
    "missing_from_hub_cache",
    "check_hub",
    "require_hub_models",
]

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


# --------------------------------------------------------------------------------------------
# is the hub there? (one check for every command that loads hub models)
# --------------------------------------------------------------------------------------------
# Seconds the hub probe waits for any answer (DNS included) before calling the hub unreachable.
HUB_PROBE_TIMEOUT = 5.0
# What a command without the hub says to do (the demo says `DALDA_MODELS=tiny make demo` instead).
MODELS_HINT = ("pass --models models.json naming local copies (`dalda-aug make-tiny-models DIR` writes tiny offline "
               "ones) and set HF_HUB_OFFLINE=1 on a machine without the hub")
# The clause of MODELS_HINT left out when HF_HUB_OFFLINE is set already.
_OFFLINE_CLAUSE = " and set HF_HUB_OFFLINE=1 on a machine without the hub"
# open_clip's hub location of the paper's CLIP (its pretrained table, ``hf_hub``), so that the hub
# check of the default models needs no ``import open_clip`` (which imports torch: seconds).
# tests/test_cpu_path.py compares it with open_clip's own table.
KNOWN_OPEN_CLIP_HUB: dict[tuple[str, str], str] = {("ViT-B-16", "openai"): "timm/vit_base_patch16_clip_224.openai/"}




@dataclass(frozen=True)
class HubFile:
    """A file a loader reads from a hub repository (any of ``filename`` and ``alternatives``)."""

    repo: str
    filename: str
    revision: str | None = None
    alternatives: tuple[str, ...] = ()
    label: str = ""  # the model as the user names it (open_clip "ViT-B-16/openai"), when not the repository


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The Hugging Face hub's address: ``$HF_ENDPOINT``, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


_PROBE_REPO = "CompVis/stable-diffusion-v1-4"  # any public repository: any HTTP answer counts


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT, repo: str = _PROBE_REPO) -> bool:
    """Whether ``endpoint`` (default :func:`hub_endpoint`) answers an HTTP request within ``timeout``
    seconds. Any HTTP answer counts, an error status included; no answer (refused, unroutable, no
    DNS, silence) does not. Proxies from the environment are used as the hub client uses them."""
    import threading
    import urllib.error
    import urllib.request

    url = f"{endpoint or hub_endpoint()}/api/models/{repo}"
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # the server is there; it just says no
        except (OSError, ValueError):
            answered.append(False)

    # A thread, so that a hanging DNS lookup (not covered by urlopen's timeout) cannot hold us.
    thread = threading.Thread(target=probe, name="dalda-aug-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def _open_clip_files(model: str, pretrained: str | None) -> list[HubFile]:
    """The hub files open_clip reads for ``model`` / ``pretrained`` (none for local files)."""
    if model.startswith("hf-hub:"):
        return [HubFile(model[len("hf-hub:"):], "open_clip_config.json")]
    if model.startswith("local-dir:") or parse_location(model).is_local:
        model_is_local = True
    else:
        model_is_local = False
    if not pretrained or parse_location(pretrained).is_local or model_is_local:
        return []
    hub = KNOWN_OPEN_CLIP_HUB.get((model, pretrained))
    if hub is None:
        try:
            import open_clip

            cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
        except Exception:  # an unknown name or tag: open_clip's own error says so when it loads
            return []
        hub = str(cfg.get("hf_hub") or "")
    if not hub:
        return []
    label = f"open_clip {model}/{pretrained}"
    repo, filename = hub.rstrip("/"), ""
    if not hub.endswith("/"):
        repo, filename = os.path.split(hub)
    if filename:
        stem = filename.rsplit(".", 1)[0]
        return [HubFile(repo, filename, alternatives=(f"{stem}.safetensors",), label=label)]
    return [HubFile(repo, "open_clip_pytorch_model.bin", alternatives=("open_clip_model.safetensors",), label=label)]


def _hub(location: str | None) -> bool:
    return bool(location) and not parse_location(str(location)).is_local


def _needs_open_clip_hub(models: Any) -> bool:
    """Whether open_clip may read the hub for ``models`` (known without importing open_clip)."""
    model, pretrained = str(models.clip_model), models.clip_pretrained
    if model.startswith("hf-hub:"):
        return True
    return not model.startswith("local-dir:") and _hub(model) and _hub(pretrained)


def hub_files(models: Any, fields: Iterable[str], *, clip: bool = True) -> list[HubFile]:
    """The hub files a loader of ``models`` (a :class:`~dalda_aug.config.ModelConfig`) reads for
    the given ModelConfig ``fields`` (e.g. a generator config's ``model_fields()``); local
    locations give none. ``clip=False`` leaves out open_clip's (whose names need ``import open_clip``)."""
    wanted = set(fields)
    files: list[HubFile] = []
    if "base" in wanted and _hub(models.base):
        files.append(HubFile(models.base, "model_index.json", models.base_revision))
    if "ip_adapter" in wanted and _hub(models.ip_adapter):
        files.append(HubFile(models.ip_adapter, f"{models.ip_adapter_subfolder}/{models.ip_adapter_weight}",
                             models.ip_adapter_revision))
    if "vae" in wanted and _hub(models.vae):
        files.append(HubFile(models.vae, "config.json"))
    if clip and wanted & {"clip_model", "clip_pretrained"} and _needs_open_clip_hub(models):
        files.extend(_open_clip_files(models.clip_model, models.clip_pretrained))
    return files


def missing_from_hub_cache(files: Sequence[HubFile], cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The repositories of ``files`` with a file not in the local Hugging Face cache (``cache_dir``,
    default ``$HF_HUB_CACHE``), each named once, in order."""
    from ..errors import require

    hf = require("huggingface_hub", "generate")
    missing: list[str] = []
    for file in files:
        found = any(
            isinstance(hf.try_to_load_from_cache(file.repo, name, revision=file.revision,
                                                 cache_dir=None if cache_dir is None else str(cache_dir)), str)
            for name in (file.filename, *file.alternatives)
        )
        if not found and file.repo not in missing:
            missing.append(file.repo)
    return missing


def check_hub(files: Sequence[HubFile], *, hint: str = MODELS_HINT, what: str = "",
              more: Callable[[], Sequence[HubFile]] | None = None) -> None:
    """Stop within seconds, with one line, when hub ``files`` are needed, the hub is offline or
    silent, and they are not in the local Hugging Face cache.

    Nothing to check (no hub file, no ``more``): returns at once, without probing.
    ``HF_HUB_OFFLINE`` set: only the local cache is read. Otherwise the hub is probed
    (:func:`hub_reachable`, at most :data:`HUB_PROBE_TIMEOUT` seconds); when it does not answer,
    ``HF_HUB_OFFLINE=1`` is set for this process, so that cached models load at once instead of
    being looked up again. ``more`` gives further files, asked for only when ``files`` are all
    cached (open_clip's names cost an ``import torch``). Raises :class:`HubUnreachableError`:
    ``why and ... not in the local Hugging Face cache (repos); hint``.
    """
    if not files and more is None:
        return
    if _env_flag("HF_HUB_OFFLINE"):
        why = "HF_HUB_OFFLINE is set"
        hint = hint.replace(_OFFLINE_CLAUSE, "")  # suggest only what is not done yet
    elif hub_reachable(repo=files[0].repo if files else _PROBE_REPO):
        return
    else:
        why = f"the model hub {hub_endpoint()} cannot be reached"
        # Before huggingface_hub is imported, the loaders then read the cache and never retry;
        # if it already is, its constant is set too.
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            setattr(constants, "HF_HUB_OFFLINE", True)
    missing = missing_from_hub_cache(files)
    if not missing and more is not None:
        files = more()
        missing = missing_from_hub_cache(files)
    if missing:
        labels = {file.repo: file.label for file in files if file.label}
        named = [f"{labels[repo]}, hub repository {repo}" if repo in labels else repo for repo in missing]
        subject = what or ("the model" if len(missing) == 1 else "the models")
        raise HubUnreachableError(
            f"{why} and {subject} {'is' if len(missing) == 1 else 'are'} not in the local Hugging Face cache "
            f"({'; '.join(named)}); {hint}")


def require_hub_models(models: Any, fields: Iterable[str], *, hint: str = MODELS_HINT, what: str = "") -> None:
    """:func:`check_hub` for the ModelConfig ``fields`` of ``models`` a command is about to load
    (see :func:`hub_files`). The one call every command that loads hub models makes first."""
    fields = tuple(fields)
    clip = bool(set(fields) & {"clip_model", "clip_pretrained"}) and _needs_open_clip_hub(models)
    more = (lambda: _open_clip_files(models.clip_model, models.clip_pretrained)) if clip else None
    check_hub(hub_files(models, fields, clip=False), hint=hint, what=what, more=more)
