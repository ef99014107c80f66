"""What Real Guidance and DA-Fusion share: Stable Diffusion img2img from each request's real image.

Both baselines run DA-Fusion's implementation (Trabucco et al., ICLR 2024,
github.com/brandontrabucco/da-fusion, ``semantic_aug/augmentations/real_guidance.py`` and
``textual_inversion.py``): the real image is resized to a 512x512 canvas (bilinear), a stock
``StableDiffusionImg2ImgPipeline`` of the base model runs with its own scheduler at its default
step count (diffusers' 50) and the base model's own VAE, guidance 7.5, no negative prompt,
and the result is resized back to the source image's size (bilinear). Those are the defaults
of :class:`Img2ImgConfig`; each is a field, so other settings stay available.

Batching: requests are grouped by strength (each group shares one timestep schedule) and each
group runs as batched pipeline calls with one ``torch.Generator("cpu").manual_seed(seed)`` per
request, so a request's image does not depend on its batch mates (diffusers encodes and noises
each image with its own generator).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from ..config import ModelConfig
from ..errors import InputError, require
from .base import (
    GenerationRequest,
    GeneratorConfig,
    check_choice,
    check_int,
    check_requests,
    dtype_name,
    generation_fingerprint,
    pixel_field,
    resolve_torch_dtype,
)
from .loading import call_loader, check_local_folder, describe_location, load_vae, make_scheduler, parse_location

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = ["Img2ImgConfig", "Img2ImgGenerator"]

_RESAMPLE = ("bilinear", "bicubic", "lanczos", "nearest")
_CPU_BATCH = 4


@dataclass(frozen=True)
class Img2ImgConfig(GeneratorConfig):
    """img2img settings shared by Real Guidance and DA-Fusion (DA-Fusion's implementation by default)."""

    SCHEDULERS: ClassVar[tuple[str, ...]] = ("pipeline", "ddim", "dpmsolver++")

    # Denoising steps of the full schedule; img2img runs the last ``strength`` share of them
    # (DA-Fusion calls the pipeline without num_inference_steps: diffusers' default, 50).
    num_inference_steps: int = pixel_field(50)
    # Classifier-free guidance weight (DA-Fusion: 7.5).
    guidance_scale: float = pixel_field(7.5)
    # The canvas the real image is resized to before img2img (DA-Fusion: 512 x 512).
    height: int = pixel_field(512)
    width: int = pixel_field(512)
    # Prepended to every prompt, and the negative prompt (DA-Fusion: none).
    prompt_prefix: str = pixel_field("")
    negative_prompt: str = pixel_field("")
    # "pipeline": the base model's own scheduler as from_pretrained loads it (PNDM for
    # CompVis/stable-diffusion-v1-4; DA-Fusion), or "ddim" / "dpmsolver++" (see GenerationConfig).
    scheduler: str = pixel_field("pipeline")
    # "base": the base model's own VAE (DA-Fusion); "override": ModelConfig.vae (sd-vae-ft-mse).
    vae: str = pixel_field("base")
    # "source": the output is resized back to the source image's size (DA-Fusion);
    # "canvas": it keeps the height x width canvas.
    output_size: str = pixel_field("source")
    # Resampling filter of both resizes (DA-Fusion: bilinear).
    resample: str = pixel_field("bilinear")

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "vae", self.vae, ("base", "override"))
        check_choice(owner, "output_size", self.output_size, ("source", "canvas"))
        check_choice(owner, "resample", self.resample, _RESAMPLE)

    def model_fields(self) -> tuple[str, ...]:
        return ("base", "base_revision") + (("vae",) if self.vae == "override" else ())

    def fingerprint_extras(self) -> dict[str, Any]:
        from .loading import ddim_scheduler_config

        return {"mode": "img2img", **({"scheduler_config": ddim_scheduler_config()} if self.scheduler != "pipeline"
                                      else {})}


class Img2ImgGenerator:
    """Batched SD img2img from each request's real image; subclasses choose each request's strength.

    Args:
        models: where the base pipeline (and, with ``config.vae == "override"``, the VAE) lives.
        config: an :class:`Img2ImgConfig` of the subclass's kind.
        device: torch device ("cpu" by default).
        dtype: ``None``/"float32" (default), "bfloat16" or "float16", or the torch dtype.

    The constructor loads nothing; :meth:`load` (called by the first :meth:`generate`) does.
    """

    config_class: ClassVar[type[Img2ImgConfig]] = Img2ImgConfig

    def __init__(self, models: ModelConfig, config: Img2ImgConfig | None = None, device: Any = "cpu",
                 dtype: Any = None) -> None:
        torch = require("torch", "generate")
        if not isinstance(models, ModelConfig):
            raise InputError(f"models must be a ModelConfig, got {type(models).__name__}")
        config = config if config is not None else self.config_class()
        if type(config) is not self.config_class:
            raise InputError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"invalid device {device!r}: {exc}") from None
        self.models = models
        self.config = config
        self.dtype = resolve_torch_dtype(dtype)
        self._pipe: Any = None

    def __repr__(self) -> str:
        state = "loaded" if self._pipe is not None else "not loaded"
        return (f"{type(self).__name__}(base={self.models.base!r}, device={str(self.device)!r}, "
                f"dtype={dtype_name(self.dtype)!r}, {state})")

    @property
    def is_loaded(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self) -> Any:
        """The underlying stock ``StableDiffusionImg2ImgPipeline`` (loads it)."""
        self.load()
        return self._pipe

    def fingerprint(self) -> str:
        """:func:`~dalda_aug.generators.generation_fingerprint` of models, config and dtype."""
        return generation_fingerprint(self.models, self.config, self.dtype)

    def load(self) -> "Img2ImgGenerator":
        """Load the models (once); returns ``self``."""
        if self._pipe is not None:
            return self
        require("torch", "generate")
        diffusers = require("diffusers", "generate")
        require("transformers", "generate")
        models, config = self.models, self.config
        check_local_folder(models.base, "ModelConfig.base", "Stable Diffusion pipeline", "model_index.json")
        components: dict[str, Any] = {}
        if config.vae == "override":
            if models.vae is None:
                raise InputError(f"{type(config).__name__}.vae='override' needs ModelConfig.vae, which is None")
            components["vae"] = load_vae(models.vae, self.dtype)
        pipe = call_loader(
            "the Stable Diffusion img2img pipeline",
            f"a diffusers StableDiffusionPipeline (model_index.json) in "
            f"{describe_location(models.base, None, models.base_revision)}",
            diffusers.StableDiffusionImg2ImgPipeline.from_pretrained,
            parse_location(models.base).value,
            revision=models.base_revision,
            safety_checker=None,
            requires_safety_checker=False,
            dtype=self.dtype,
            **components,
        )
        pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self._after_load(pipe)
        self._pipe = pipe.to(self.device)
        return self

    def _after_load(self, pipe: Any) -> None:
        """Hook for subclasses (DA-Fusion loads its class tokens here)."""

    def strength_of(self, request: GenerationRequest) -> float:
        """The img2img strength used for ``request``."""
        raise NotImplementedError

    def generate(self, requests: Iterable[GenerationRequest], batch_size: int | None = None,
                 progress: bool = False) -> list["Image.Image"]:
        """One PIL image per request, in order; requests of equal strength share pipeline calls.

        ``batch_size`` (default 4) requests at most per pipeline call. Each image depends only on
        its own request (within floating-point tolerance).
        """
        import torch
        from PIL import Image
        from tqdm.auto import tqdm

        requests = check_requests(requests)
        strengths = [self.strength_of(r) for r in requests]
        size = check_int("generate", "batch_size", batch_size, 1) if batch_size is not None else _CPU_BATCH
        self.load()
        c = self.config
        resample = getattr(Image.Resampling, c.resample.upper())
        groups: dict[float, list[int]] = defaultdict(list)
        for i, s in enumerate(strengths):
            groups[s].append(i)
        out: list[Any] = [None] * len(requests)
        with torch.inference_mode(), tqdm(total=len(requests), desc=f"{self.config.METHOD} img2img", unit="img",
                                          disable=not progress) as bar:
            for strength, members in groups.items():
                for start in range(0, len(members), size):
                    chunk = members[start : start + size]
                    chosen = [requests[i] for i in chunk]
                    canvases = [r.image.convert("RGB").resize((c.width, c.height), resample) for r in chosen]
                    images = self._pipe(
                        prompt=[c.prompt_prefix + r.prompt for r in chosen],
                        negative_prompt=[c.negative_prompt] * len(chosen) if c.negative_prompt else None,
                        image=canvases,
                        strength=strength,
                        num_inference_steps=c.num_inference_steps,
                        guidance_scale=c.guidance_scale,
                        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in chosen],
                    ).images
                    for i, request, image in zip(chunk, chosen, images):
                        if c.output_size == "source" and image.size != request.image.size:
                            image = image.resize(request.image.size, resample)
                        out[i] = image
                    bar.update(len(chunk))
        return out
