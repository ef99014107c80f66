"""What Real Guidance and DA-Fusion share: Stable Diffusion img2img from each request's real image.

Both baselines run DA-Fusion's implementation (Trabucco et al., ICLR 2024,
github.com/brandontrabucco/da-fusion, ``semantic_aug/augmentations/real_guidance.py`` and
``textual_inversion.py``): the real image is resized to a 512x512 canvas (bilinear), a stock
``StableDiffusionImg2ImgPipeline`` of the base model runs with its own scheduler at its default
step count (diffusers' 50) and the base model's own VAE, guidance 7.5, no negative prompt,
and the result is resized back to the source image's size (bilinear). Those are the defaults
of :class:`Img2ImgConfig`; each is a field, so other settings stay available.

Batching: our own loop over the pipeline's components computes, for each request, what one stock
pipeline call computes for it alone (the same text encoding, canvas preprocessing, per-request
``torch.Generator("cpu").manual_seed(seed)`` for the VAE sample and the noise, schedule suffix,
guidance and post-processing), within floating-point tolerance. Requests of any strengths share a
batch: each strength keeps its own scheduler (multistep schedulers such as PNDM keep per-run
history) and, at each position of the schedule, one UNet call serves every request that has
started, so a batch costs ``num_inference_steps`` UNet calls whatever its mix of strengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

from ..errors import InputError, require
from .base import (
    GenerationRequest, Generator, GeneratorConfig, apply_guidance, check_choice, check_int, check_requests,
    decode_latents, load_sd_pipeline, pixel_field,
)
from .loading import check_local_folder, load_vae, make_scheduler

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = ["Img2ImgConfig", "Img2ImgGenerator"]

_RESAMPLE = ("bilinear", "bicubic", "lanczos", "nearest")
_CPU_BATCH = 4


@dataclass(frozen=True)
class Img2ImgConfig(GeneratorConfig):
    """img2img settings shared by Real Guidance and DA-Fusion (DA-Fusion's implementation by default)."""

    SCHEDULERS: ClassVar[tuple[str, ...]] = ("pipeline", "ddim", "dpmsolver++")
    # The shared sampling fields (declared by GeneratorConfig) at DA-Fusion's settings: guidance
    # 7.5, a 512 x 512 canvas, no prompt prefix or negative prompt (GeneratorConfig's defaults), and
    FIELD_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        # DA-Fusion calls the pipeline without num_inference_steps: diffusers' default, 50.
        "num_inference_steps": 50,
        # The base model's own scheduler as from_pretrained loads it (PNDM for
        # CompVis/stable-diffusion-v1-4).
        "scheduler": "pipeline",
    }

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


class Img2ImgGenerator(Generator):
    """Batched SD img2img from each request's real image; subclasses choose each request's strength.

    Args:
        models: where the base pipeline (and, with ``config.vae == "override"``, the VAE) lives.
        config: an :class:`Img2ImgConfig` of the subclass's kind (exactly ``config_class``).
        device: torch device ("cpu" by default).
        dtype: ``None``/"float32" (default), "bfloat16" or "float16", or the torch dtype.

    The constructor loads nothing; :meth:`load` (called by the first :meth:`generate`) does; the
    :attr:`pipeline` is a stock ``StableDiffusionImg2ImgPipeline``.
    """

    config_class: ClassVar[type[GeneratorConfig]] = Img2ImgConfig
    config: Img2ImgConfig

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
        pipe = load_sd_pipeline(diffusers.StableDiffusionImg2ImgPipeline, models, self.dtype,
                                "the Stable Diffusion img2img pipeline", **components)
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
        """One PIL image per request, in order; ``batch_size`` requests (default 4) share each UNet call.

        Requests of different strengths share a batch: each strength group keeps its own
        scheduler (its own timestep suffix and, for multistep schedulers, its own history), and at
        every position of the schedule one UNet call serves every group that has started. Each
        image depends only on its own request (within floating-point tolerance).
        """
        import torch
        from tqdm.auto import tqdm

        requests = check_requests(requests)
        strengths = [self.strength_of(r) for r in requests]
        size = check_int("generate", "batch_size", batch_size, 1) if batch_size is not None else _CPU_BATCH
        self.load()
        out: list[Any] = []
        with torch.inference_mode(), tqdm(total=len(requests), desc=f"{self.config.METHOD} img2img", unit="img",
                                          disable=not progress) as bar:
            for start in range(0, len(requests), size):
                out.extend(self._generate_batch(requests[start : start + size], strengths[start : start + size]))
                bar.update(min(size, len(requests) - start))
        return out

    def _generate_batch(self, requests: list[GenerationRequest], strengths: list[float]) -> list["Image.Image"]:
        """The stock img2img pipeline's computation for each request, one UNet call per schedule
        position, in diffusers' ``__call__``'s steps: encode, prepare latents, denoise, decode."""
        import torch

        text, negative = self._encode_prompts(requests)
        pixels = self._preprocess(requests).to(device=self.device, dtype=text.dtype)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        groups, timesteps = self._prepare_groups(pixels, strengths, generators, text.dtype)
        self._denoise(groups, timesteps, text, negative)
        return self._decode(groups, requests, text.dtype)

    def _guided(self) -> bool:
        return self.config.guidance_scale > 1 and self._pipe.unet.config.time_cond_proj_dim is None

    def _resample(self) -> Any:
        """The PIL filter of ``config.resample``."""
        from PIL import Image

        return getattr(Image.Resampling, self.config.resample.upper())

    def _encode_prompts(self, requests: list[GenerationRequest]) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """The pipeline's ``encode_prompt`` of the prefixed prompts (and the negative prompt when guided)."""
        c, n = self.config, len(requests)
        prompts = [c.prompt_prefix + r.prompt for r in requests]
        text, negative = self._pipe.encode_prompt(prompts, self.device, 1, self._guided(),
                                                  [c.negative_prompt] * n if c.negative_prompt else None)
        return text, negative

    def _preprocess(self, requests: list[GenerationRequest]) -> "torch.Tensor":
        """Each real image as RGB, resized to the canvas and preprocessed by the pipeline."""
        c, resample = self.config, self._resample()
        canvases = [r.image.convert("RGB").resize((c.width, c.height), resample) for r in requests]
        pixels: torch.Tensor = self._pipe.image_processor.preprocess(canvases)
        return pixels

    def _prepare_groups(self, pixels: "torch.Tensor", strengths: list[float], generators: list["torch.Generator"],
                        dtype: "torch.dtype") -> tuple[dict[float, dict[str, Any]], Any]:
        """One group per strength: its members, its scheduler (the suffix of the schedule it runs),
        its noised latents; and the full schedule's timesteps."""
        import torch
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor

        pipe, c, device = self._pipe, self.config, self.device
        groups: dict[float, dict[str, Any]] = {}
        for i, s in enumerate(strengths):
            groups.setdefault(s, {"members": []})["members"].append(i)
        full = None
        for s, g in groups.items():
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            scheduler.set_timesteps(c.num_inference_steps, device=device)
            full = scheduler.timesteps
            # Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.StableDiffusionImg2ImgPipeline.get_timesteps
            # (on this group's own scheduler).
            init = min(int(c.num_inference_steps * s), c.num_inference_steps)
            t_start = max(c.num_inference_steps - init, 0) * scheduler.order
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start)
            members = g["members"]
            gens = [generators[i] for i in members]
            # Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.StableDiffusionImg2ImgPipeline.prepare_latents
            # (each image encoded with its own generator, then its own noise).
            latents = torch.cat([retrieve_latents(pipe.vae.encode(pixels[i : i + 1]), generator=generators[i])
                                 for i in members]) * pipe.vae.config.scaling_factor
            noise = randn_tensor(latents.shape, generator=gens, device=device, dtype=dtype)
            timesteps = scheduler.timesteps[t_start:]
            latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(members))) if len(timesteps) else latents
            g.update(scheduler=scheduler, start=t_start, latents=latents,
                     step_kwargs=pipe.prepare_extra_step_kwargs(gens, 0.0))
        assert full is not None
        return groups, full

    def _denoise(self, groups: dict[float, dict[str, Any]], timesteps: Any, text: "torch.Tensor",
                 negative: "torch.Tensor | None") -> None:
        """At each position of the full schedule, one UNet call for every group that has started
        (each group's latents updated in place in ``groups``)."""
        import torch

        pipe, c = self._pipe, self.config
        guided = self._guided()
        for j, t in enumerate(timesteps):
            active = [g for g in groups.values() if g["start"] <= j]
            if not active:
                continue
            index = [i for g in active for i in g["members"]]
            model_in = torch.cat([g["scheduler"].scale_model_input(g["latents"], t) for g in active])
            states = text[index]
            if guided:
                assert negative is not None
                model_in = torch.cat([model_in, model_in])
                states = torch.cat([negative[index], states])
            noise_pred = pipe.unet(model_in, t, encoder_hidden_states=states, return_dict=False)[0]
            if guided:
                noise_pred = apply_guidance(noise_pred, c.guidance_scale)
            offset = 0
            for g in active:
                k = len(g["members"])
                g["latents"] = g["scheduler"].step(noise_pred[offset : offset + k], t, g["latents"],
                                                   **g["step_kwargs"], return_dict=False)[0]
                offset += k

    def _decode(self, groups: dict[float, dict[str, Any]], requests: list[GenerationRequest],
                dtype: "torch.dtype") -> list["Image.Image"]:
        """The groups' latents back in request order, decoded; resized back to each source's size
        with ``output_size="source"``."""
        import torch

        shape = next(iter(groups.values()))["latents"].shape[1:]
        latents = torch.empty((len(requests), *shape), device=self.device, dtype=dtype)
        for g in groups.values():
            latents[g["members"]] = g["latents"]
        images = decode_latents(self._pipe, latents)
        if self.config.output_size == "source":
            resample = self._resample()
            images = [image if image.size == r.image.size else image.resize(r.image.size, resample)
                      for image, r in zip(images, requests)]
        return list(images)
