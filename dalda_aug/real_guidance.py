"""Real Guidance (He et al., ICLR 2023): the baseline DALDA compares with.

Each synthetic image is Stable Diffusion img2img from the real image at ``strength`` 0.5 with
the prompt "a photo of a {class}". It plugs into the same plan, cache and dataset as DALDA:
:class:`RealGuidanceConfig` is a :class:`~dalda_aug.generation.GenerationConfig` whose
fingerprint also covers the img2img mode and strength (so the two methods never share cache
entries), and :class:`RealGuidanceGenerator` has the generator interface
(``generate(requests) -> list[PIL.Image]``); a request's ``scale`` (λ) is ignored.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from .config import ModelConfig
from .errors import InputError
from .generation import (
    GenerationConfig,
    GenerationRequest,
    _dtype_name,
    _load_vae_override,
    _loading,
    _make_scheduler,
    _resolve_torch_dtype,
    _where,
    generation_fingerprint,
)

__all__ = ["RealGuidanceConfig", "RealGuidanceGenerator"]


@dataclass(frozen=True)
class RealGuidanceConfig(GenerationConfig):
    """img2img settings of Real Guidance: no prompt prefix or negative prompt, strength 0.5."""

    prompt_prefix: str = ""
    negative_prompt: str = ""
    # Share of the denoising schedule run from the noised real image (1.0 = text-to-image).
    strength: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or not 0 < s <= 1:
            raise InputError(f"RealGuidanceConfig.strength must lie in (0, 1], got {s!r}")
        object.__setattr__(self, "strength", float(s))
        if self.cache_interval != 1:  # the stock img2img pipeline has no step caching
            raise InputError(f"RealGuidanceConfig.cache_interval must be 1 (not supported), got {self.cache_interval!r}")

    def pixel_dict(self) -> dict[str, Any]:
        values = super().pixel_dict()
        values["mode"] = "img2img"
        values["strength"] = self.strength
        return values


class RealGuidanceGenerator:
    """Batched SD img2img from each request's real image (``request.scale`` is unused).

    The reference image is resized to ``config.width`` x ``config.height`` (img2img keeps the
    input size). Each request has its own ``torch.Generator("cpu").manual_seed(seed)``, so a
    request's image does not depend on its batch companions.
    """

    def __init__(self, models: ModelConfig, config: RealGuidanceConfig | None = None, device: Any = "cpu",
                 dtype: Any = None):
        import torch

        config = config if config is not None else RealGuidanceConfig()
        if not isinstance(config, RealGuidanceConfig):
            raise InputError(f"config must be a RealGuidanceConfig, got {type(config).__name__}")
        self.models = models
        self.config = config
        self.device = torch.device(device)
        self.dtype = _resolve_torch_dtype(dtype)
        self._pipe = None

    def __repr__(self) -> str:
        return (f"RealGuidanceGenerator(base={self.models.base!r}, strength={self.config.strength}, "
                f"device={str(self.device)!r}, dtype={_dtype_name(self.dtype)!r})")

    def fingerprint(self) -> str:
        return generation_fingerprint(self.models, self.config, self.dtype)

    def load(self) -> "RealGuidanceGenerator":
        if self._pipe is not None:
            return self
        import diffusers

        components = {}
        if self.models.vae is not None:
            components["vae"] = _load_vae_override(self.models, self.dtype)
        pipe = _loading(
            "the Stable Diffusion img2img pipeline",
            f"a diffusers StableDiffusionPipeline (model_index.json) in "
            f"{_where(self.models.base, None, self.models.base_revision)}",
            diffusers.StableDiffusionImg2ImgPipeline.from_pretrained,
            self.models.base,
            revision=self.models.base_revision,
            safety_checker=None,
            requires_safety_checker=False,
            dtype=self.dtype,
            **components,
        )
        pipe.scheduler = _make_scheduler(self.config)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(self.device)
        return self

    def generate(self, requests: Sequence[GenerationRequest], batch_size: int | None = None,
                 progress: bool = False) -> list:
        import torch
        from tqdm.auto import tqdm

        requests = list(requests)
        if not requests:
            raise InputError("generate() needs at least one request")
        for r in requests:
            if not isinstance(r, GenerationRequest):
                raise InputError(f"requests must be GenerationRequest objects, got {type(r).__name__}")
        self.load()
        c = self.config
        size = batch_size or 4
        out = []
        with tqdm(total=len(requests), desc="real guidance", unit="img", disable=not progress) as bar:
            for start in range(0, len(requests), size):
                chunk = requests[start : start + size]
                images = [r.image.convert("RGB").resize((c.width, c.height)) for r in chunk]
                with torch.inference_mode():
                    result = self._pipe(
                        prompt=[c.prompt_prefix + r.prompt for r in chunk],
                        negative_prompt=[c.negative_prompt] * len(chunk) if c.negative_prompt else None,
                        image=images,
                        strength=c.strength,
                        num_inference_steps=c.num_inference_steps,
                        guidance_scale=c.guidance_scale,
                        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in chunk],
                    ).images
                out.extend(result)
                bar.update(len(chunk))
        return out
