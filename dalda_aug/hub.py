"""Is the Hugging Face hub there? One check for every command that loads hub models (a bottom floor:
it imports only :mod:`dalda_aug.errors`, :mod:`dalda_aug.locations` and the standard library).

Every command that loads hub models first calls :func:`check_hub` (through
:func:`require_hub_models`): when a model is a hub id, the hub is offline (``HF_HUB_OFFLINE``) or
does not answer within :data:`HUB_PROBE_TIMEOUT` seconds, and the model is not in the local
Hugging Face cache, it stops at once with one line (:class:`HubUnreachableError`) instead of
letting every loader retry for about a minute. Local models never probe the hub.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .errors import HubUnreachableError  # importable from here too
from .locations import parse_location

__all__ = [
    "KNOWN_OPEN_CLIP_HUB",
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
    from .errors import require

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
