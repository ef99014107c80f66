"""Where the models live: :class:`ModelConfig`.

Each location is a Hugging Face hub id or a local path; nothing is downloaded or loaded here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ._io import read_json_object
from .errors import InputError

__all__ = ["ModelConfig", "models_file", "model_defaults", "all_model_defaults", "check_model_defaults",
           "load_models_arg", "describe_model_defaults", "DEFAULTS_KEY", "DEFAULTABLE_OPTIONS", "TEXT_OPTIONS",
           "PLAN_DEFAULTS_KEY"]

# The key of a models file that holds per-command option defaults (not a model location).
DEFAULTS_KEY = "defaults"
# The key of plan.json holding the defaults of the models file the plan was made with (``warm --plan``
# without ``--models`` takes the plan's models and these).
PLAN_DEFAULTS_KEY = "model_defaults"
# Which options a models file may default, per command (``make-tiny-models`` writes CPU-sized ones).
DEFAULTABLE_OPTIONS: dict[str, tuple[str, ...]] = {
    "warm": ("size", "steps", "threads"),
    "demo": ("size", "steps"),
    "textual-inversion": ("resolution", "steps", "threads"),
    # benchmarks/fewshot.py: generation and textual-inversion sizes, and a backbone whose weights ship offline
    "fewshot": ("size", "steps", "img2img-steps", "ti-steps", "backbone", "threads"),
}
# Options whose recorded default is a name (any other is an integer >= 1).
TEXT_OPTIONS: frozenset[str] = frozenset({"backbone"})


def models_file(path: str | os.PathLike[str]) -> Path:
    """The models JSON ``path`` names: the file itself, or ``path/models.json`` for a folder
    (``--models tiny`` for a folder written by ``make-tiny-models``)."""
    path = Path(path)
    return path / "models.json" if path.is_dir() else path


def check_model_defaults(data: Any, where: str | os.PathLike[str]) -> dict[str, dict[str, int | str]]:
    """``data`` (a models file's ``"defaults"``, or the copy a plan records) checked: command ->
    option -> value, every command and option known (:data:`DEFAULTABLE_OPTIONS`), values integers
    >= 1 (names for :data:`TEXT_OPTIONS`); else an :class:`InputError` naming ``where``."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: {DEFAULTS_KEY!r} must be an object of commands, got {type(data).__name__}")
    out: dict[str, dict[str, int | str]] = {}
    for command, options in data.items():
        known = DEFAULTABLE_OPTIONS.get(command)
        if known is None:
            raise InputError(f"{where}: {DEFAULTS_KEY!r} names unknown command {command!r}; known: "
                             f"{sorted(DEFAULTABLE_OPTIONS)}")
        if not isinstance(options, Mapping):
            raise InputError(f"{where}: {DEFAULTS_KEY}.{command} must be an object of options")
        for option, value in options.items():
            if option not in known:
                raise InputError(f"{where}: {DEFAULTS_KEY}.{command} names unknown option {option!r}; "
                                 f"known: {list(known)}")
            if option in TEXT_OPTIONS:
                if not isinstance(value, str) or not value.strip() or len(value) > 100:
                    raise InputError(f"{where}: {DEFAULTS_KEY}.{command}.{option} must be a name, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}: {DEFAULTS_KEY}.{command}.{option} must be an integer >= 1, got {value!r}")
        out[str(command)] = {str(k): v if isinstance(v, str) else int(v) for k, v in options.items()}
    return out


def all_model_defaults(path: str | os.PathLike[str]) -> dict[str, dict[str, int | str]]:
    """Every command's option defaults a models file (or folder) records; ``{}`` if none."""
    file = models_file(path)
    data = read_json_object(file, "models file", follow_symlinks=True)
    return check_model_defaults(data.get(DEFAULTS_KEY, {}), file)


def model_defaults(path: str | os.PathLike[str], command: str) -> dict[str, int | str]:
    """The option defaults a models file (or folder, see :func:`models_file`) records for
    ``command`` (e.g. ``{"size": 64, "steps": 2}`` for ``warm`` with tiny models); ``{}`` if none.
    Options given explicitly win over these."""
    return all_model_defaults(path).get(command, {})


@dataclass(frozen=True)
class ModelConfig:
    """Every model DALDA uses, by hub id or local path (the paper's choices by default).

    Save it with :meth:`save` and read it back with :meth:`load`; the CLI takes such a file
    with ``--models FILE.json``. ``dalda-aug make-tiny-models DIR`` writes one that points at
    tiny random models, for offline tests.
    """

    # Stable Diffusion 1.x pipeline (diffusers layout: unet/, vae/, text_encoder/, tokenizer/...).
    base: str = "CompVis/stable-diffusion-v1-4"
    # VAE that replaces the pipeline's own; None keeps the base model's VAE.
    vae: str | None = "stabilityai/sd-vae-ft-mse"
    # Repository or folder holding the IP-Adapter weights and its image encoder.
    ip_adapter: str = "h94/IP-Adapter"
    # Folder inside ``ip_adapter`` that holds the weight file.
    ip_adapter_subfolder: str = "models"
    # IP-Adapter weight file, in ip-adapter_sd15's format (``image_proj``, ``ip_adapter``).
    ip_adapter_weight: str = "ip-adapter_sd15.bin"
    # CLIPVisionModelWithProjection folder inside ``ip_adapter`` (ViT-H/14 for ip-adapter_sd15).
    image_encoder_subfolder: str = "models/image_encoder"
    # open_clip model used for CLIPScore: a registered name, or a path to a model-config JSON.
    clip_model: str = "ViT-B-16"
    # open_clip pretrained tag ("openai") or a path to a checkpoint file.
    clip_pretrained: str = "openai"
    # Optional hub revisions (branch, tag or commit) of the base model and the IP-Adapter.
    base_revision: str | None = None
    ip_adapter_revision: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            optional = field.name in {"vae", "base_revision", "ip_adapter_revision"}
            if value is None and optional:
                continue
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"ModelConfig.{field.name} must be a non-empty string, got {value!r}")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None) -> "ModelConfig":
        """Build from a mapping; relative local paths are resolved against ``base_dir``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        values = dict(data)
        if base_dir is not None:
            from .locations import parse_location  # the one "hub id or local path" rule

            for name in ("base", "vae", "ip_adapter", "clip_model", "clip_pretrained"):
                value = values.get(name)
                if isinstance(value, str) and value.strip():
                    location = parse_location(value, base_dir=base_dir)
                    if location.is_local:
                        values[name] = location.value
        return cls(**values)

    def save(self, path: str | os.PathLike[str], *,
             defaults: Mapping[str, Mapping[str, int | str]] | None = None) -> Path:
        """Write the models file; ``defaults`` (command -> option -> value, see
        :data:`DEFAULTABLE_OPTIONS`) is stored under ``"defaults"``."""
        path = Path(path)
        data = self.to_dict()
        if defaults:
            data[DEFAULTS_KEY] = check_model_defaults(defaults, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Read a models JSON file (as written by :meth:`save` or ``make-tiny-models``), or the
        ``models.json`` of a folder. Relative paths in it resolve against its folder; its
        ``"defaults"`` are read by :func:`model_defaults`."""
        given = Path(path)
        path = models_file(given)
        if given.is_dir() and not path.is_file():
            raise InputError(f"models folder {given} holds no models.json (`dalda-aug make-tiny-models {given}` "
                             "writes tiny offline models there)")
        data = read_json_object(path, "models file", follow_symlinks=True)
        if DEFAULTS_KEY in data:
            check_model_defaults(data[DEFAULTS_KEY], path)
            data = {k: v for k, v in data.items() if k != DEFAULTS_KEY}
        return cls.from_dict(data, base_dir=path.parent)

    def fingerprint(self) -> str:
        """A short stable hash of every location and revision (part of cache keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_models_arg(path: str | os.PathLike[str] | None) -> ModelConfig:
    """``--models FILE.json`` (or a folder holding ``models.json``) -> :class:`ModelConfig`
    (the paper's hub models when omitted). Every command reads ``--models`` through this."""
    return ModelConfig() if path is None else ModelConfig.load(path)


def describe_model_defaults(args: Any) -> str:
    """``"; --size 64 --steps 2 from tiny"`` when a command's options came from the models file
    (``args.model_defaults``; ``args.model_defaults_from`` names where they were read, else
    ``args.models``: an ``argparse.Namespace``), else ``""``."""
    used: dict[str, int | str] = getattr(args, "model_defaults", None) or {}
    if not used:
        return ""
    where = getattr(args, "model_defaults_from", None) or args.models
    return "; " + " ".join(f"--{k} {v}" for k, v in used.items()) + f" from {where}"
