"""Real Guidance (He et al., ICLR 2023) as the DALDA paper ran it: through DA-Fusion's implementation.

Each synthetic image is Stable Diffusion img2img from the real image at strength 0.5 with the
prompt "a photo of a {class}" (the plan's base prompt). The DALDA paper's Real Guidance numbers
come from DA-Fusion's code (github.com/brandontrabucco/da-fusion,
``semantic_aug/augmentations/real_guidance.py``), which the DALDA reference code forks: a stock
``StableDiffusionImg2ImgPipeline`` of CompVis/stable-diffusion-v1-4 with its own scheduler
(PNDM) at diffusers' default 50 steps, the model's own VAE, guidance 7.5, the image resized to
512x512 and the output resized back to the source size (both bilinear). Those are the defaults
of :class:`RealGuidanceConfig`. :meth:`RealGuidanceConfig.with_dalda_sampler` gives the settings
this library used before (DALDA's DDIM 30 steps, the sd-vae-ft-mse VAE, 512x512 output, bicubic).

It plugs into the same plan, cache and dataset as DALDA: its fingerprint covers only what
Real Guidance loads and uses, and a request's ``scale`` (λ) is ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import GenerationRequest, check_real, pixel_field
from .img2img import Img2ImgConfig, Img2ImgGenerator

__all__ = ["RealGuidanceConfig", "RealGuidanceGenerator"]


@dataclass(frozen=True)
class RealGuidanceConfig(Img2ImgConfig):
    """img2img settings of Real Guidance (DA-Fusion's implementation by default), strength 0.5."""

    METHOD: ClassVar[str] = "real_guidance"

    # Share of the denoising schedule run from the noised real image (1.0 = text-to-image);
    # DA-Fusion's real-guidance default 0.5.
    strength: float = pixel_field(0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "strength", check_real(type(self).__name__, "strength", self.strength, 0.0, 1.0,
                                                        low_open=True))

    @classmethod
    def with_dalda_sampler(cls, **changes: Any) -> "RealGuidanceConfig":
        """The settings dalda_aug used before following DA-Fusion: DALDA's DDIM sampler at 30
        steps, ModelConfig.vae (sd-vae-ft-mse), the 512x512 canvas kept as output, bicubic resize."""
        base = cls(num_inference_steps=30, scheduler="ddim", vae="override", output_size="canvas", resample="bicubic")
        return dataclasses.replace(base, **changes) if changes else base


class RealGuidanceGenerator(Img2ImgGenerator):
    """Batched SD img2img from each request's real image at ``config.strength`` (``request.scale`` unused).

    Each request has its own ``torch.Generator("cpu").manual_seed(seed)``, so a request's image
    does not depend on its batch companions.
    """

    config_class: ClassVar[type[Img2ImgConfig]] = RealGuidanceConfig
    config: RealGuidanceConfig

    def strength_of(self, request: GenerationRequest) -> float:
        return self.config.strength
