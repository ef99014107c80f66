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

__all__ = ["ModelConfig"]


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
            from .generators.loading import parse_location  # the one "hub id or local path" rule

            for name in ("base", "vae", "ip_adapter", "clip_model", "clip_pretrained"):
                value = values.get(name)
                if isinstance(value, str) and value.strip():
                    location = parse_location(value, base_dir=base_dir)
                    if location.is_local:
                        values[name] = location.value
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Read a models JSON file (as written by :meth:`save` or ``make-tiny-models``)."""
        path = Path(path)
        data = read_json_object(path, "models file")
        return cls.from_dict(data, base_dir=path.parent)

    def fingerprint(self) -> str:
        """A short stable hash of every location and revision (part of cache keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
