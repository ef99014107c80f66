"""Batched Stable Diffusion 1.x + IP-Adapter generation with a per-sample image weight λ.

:class:`IPAdapterGenerator` turns a list of :class:`GenerationRequest` (reference image,
prompt, λ, seed) into images. A whole (sub)batch shares one UNet call per denoising step, yet
every request gets, within floating-point tolerance, the image that stock diffusers gives for
it alone::

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)   # (+ VAE override)
    pipe.scheduler = DDIMScheduler(**ddim_scheduler_config())
    pipe.load_ip_adapter(ip_adapter, subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.set_ip_adapter_scale(request.scale)
    pipe(prompt_prefix + request.prompt, negative_prompt=..., ip_adapter_image=request.image,
         num_inference_steps=30, guidance_scale=7.5, height=512, width=512,
         generator=torch.Generator("cpu").manual_seed(request.seed))

whatever the batch size and whatever the other requests in the batch. Stock diffusers cannot
batch this: its IP-Adapter attention processor holds one Python-float scale for the whole
batch, and its pipeline repeats one set of image embeddings over the batch. So we

* replace the UNet's attention processors (after ``load_ip_adapter``, reusing its loaded
  ``to_k_ip``/``to_v_ip`` layers) by ones that read a λ *tensor* of shape ``[batch]`` from
  ``cross_attention_kwargs={"ip_scale": λ}`` (a tensor, so new λ values never recompile a
  ``torch.compile``-d UNet), and
* run our own denoising loop: one text embedding, one image embedding (computed once per
  distinct reference image and cached), one CPU ``torch.Generator`` and one λ per sample,
  the zero negative image embedding of ip-adapter_sd15, classifier-free guidance, DDIM with
  eta = 0, the VAE decode and the pipeline's own post-processing.

Nothing is imported or loaded at import time: torch, diffusers and transformers are imported
by the functions that need them, and the models load on :meth:`IPAdapterGenerator.load` (or
the first :meth:`~IPAdapterGenerator.generate`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from .._lazy import module_getattr
from ..config import ModelConfig
from ..errors import InputError, ModelLoadError, require
from .base import (
    GenerationRequest,
    Generator,
    GeneratorConfig,
    apply_guidance,
    check_choice,
    check_int,
    check_requests,
    decode_latents,
    dtype_name,
    image_key,
    load_sd_pipeline,
    pixel_field,
    resolve_torch_dtype,
    speed_field,
)
from .loading import (
    call_loader,
    check_local_folder,
    ddim_scheduler_config,
    describe_location,
    load_tiny_vae,
    load_vae,
    make_scheduler,
    parse_location,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = [
    "IPAdapterConfig",
    "IPAdapterGenerator",
    "estimate_sample_bytes",
    "load_reference_pipeline",
    "reference_generate",
    "SCHEDULERS",
]

SCHEDULERS = ("ddim", "dpmsolver++")
_ATTENTION = ("sdpa", "math")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GIB = 1024**3
# Auto batch size: fraction of free accelerator memory we plan to use, and the bounds.
_FREE_MEMORY_FRACTION = 0.85
_MAX_AUTO_BATCH = 32
_CPU_AUTO_BATCH = 4


@dataclass(frozen=True)
class IPAdapterConfig(GeneratorConfig):
    """How DALDA's images are generated (the reference code's settings by default, which the paper does
    not state; diffusers' argument names).

    Each field declares in its metadata whether it changes pixels (:func:`~dalda_aug.generators.pixel_field`)
    or not (:func:`~dalda_aug.generators.speed_field`); :meth:`fingerprint` is built from the
    former (``cache_interval``/``cache_branch`` only away from their "off" defaults). ``attention``,
    ``channels_last``, ``compile`` and ``compile_mode`` are speed-ups that compute the same
    function and only change results by floating-point rounding. Output-changing speed-ups
    (``tiny_vae``, ``scheduler="dpmsolver++"`` with fewer steps, ``cache_interval > 1``) are off
    by default.
    """

    METHOD: ClassVar[str] = "ip_adapter"
    SCHEDULERS: ClassVar[tuple[str, ...]] = SCHEDULERS
    # The shared sampling fields (declared by GeneratorConfig) keep its defaults, which are the
    # paper's: 30 "ddim" steps (eta = 0; the opt-in "dpmsolver++" is commonly run with ~20 steps,
    # 1.5x fewer UNet calls, other pixels), guidance 7.5, 512 x 512; the paper's prompts:
    FIELD_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "prompt_prefix": "best quality, high quality, ",
        "negative_prompt": "monochrome, lowres, bad anatomy, worst quality, low quality",
    }
    # Opt-in AutoencoderTiny (hub id or folder, e.g. "madebyollin/taesd") that decodes the
    # latents instead of the full VAE: the decode (~5 % of the work at 512², more at small
    # sizes, and most of the per-image peak memory) becomes far cheaper, but the pixels are an
    # approximation (softer fine detail). Changes pixels.
    tiny_vae: str | None = pixel_field(None)
    # Opt-in step caching (DeepCache, Ma et al., CVPR 2024): every ``cache_interval``-th
    # denoising step (the first included) runs the full UNet and caches the deep features
    # entering the up-block paired with down-block ``cache_branch``; the steps in between run
    # only the shallow part (conv_in, down_blocks[:cache_branch + 1], the up-blocks from the
    # paired one on, conv_out) on the cached deep features. 1 = off (every step runs the full
    # UNet). Interval 3 needs ~2-2.5x fewer full-UNet FLOPs at a small quality cost. Changes pixels.
    cache_interval: int = pixel_field(1, omit_at_default=True)
    # Which skip branch stays live on cached steps: 0 = the shallowest (DeepCache's default,
    # the cheapest cached steps); up to len(unet.down_blocks) - 1, checked when the models load.
    cache_branch: int = pixel_field(0, omit_at_default=True)
    # Attention kernel: "sdpa" (torch's fused scaled_dot_product_attention, flash/memory-
    # efficient kernels on GPU) or "math" (its plain softmax(QK^T)V fallback; slow, for
    # debugging numerical problems).
    attention: str = speed_field("sdpa")
    # Store UNet and VAE activations channels-last: often faster convolutions on GPUs
    # with bf16/fp16; no effect worth having on CPU.
    channels_last: bool = speed_field(False)
    # torch.compile the UNet: faster steps after a warm-up compile per distinct batch size
    # (about a minute for the tiny test UNet on CPU); λ is a tensor input, so new λ values
    # never recompile. Needs a C++ (CPU) or Triton (GPU) toolchain.
    compile: bool = speed_field(False)
    # torch.compile mode when ``compile`` is on.
    compile_mode: str = speed_field("default")

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.tiny_vae is not None and (not isinstance(self.tiny_vae, str) or not self.tiny_vae.strip()):
            raise InputError(f"{owner}.tiny_vae must be None or a hub id / folder, got {self.tiny_vae!r}")
        object.__setattr__(self, "cache_interval", check_int(owner, "cache_interval", self.cache_interval, 1))
        # Upper bound (the UNet's down-block count) is checked by IPAdapterGenerator.load.
        object.__setattr__(self, "cache_branch", check_int(owner, "cache_branch", self.cache_branch, 0))
        check_choice(owner, "attention", self.attention, _ATTENTION)
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}")
        check_choice(owner, "compile_mode", self.compile_mode, _COMPILE_MODES)

    def model_fields(self) -> tuple[str, ...]:
        return ("base", "base_revision", "vae", "ip_adapter", "ip_adapter_subfolder", "ip_adapter_weight",
                "image_encoder_subfolder", "ip_adapter_revision")

    def fingerprint_extras(self) -> dict[str, Any]:
        return {"scheduler_config": ddim_scheduler_config(), "eta": 0.0}

    def pixel_dict(self) -> dict[str, Any]:
        values = super().pixel_dict()
        if self.cache_interval == 1:  # step caching off: cache_branch is unused, the pixels do not depend on it
            values.pop("cache_branch", None)
        return values


def estimate_sample_bytes(config: IPAdapterConfig, dtype: Any = None) -> int:
    """Rough extra peak accelerator memory one more image in a batch costs, in bytes.

    Model: ≈ 1 GiB per image at 512x512 in a 16-bit dtype: the VAE decode of one image
    (feature maps of 128-512 channels at up to full resolution, ≈ 0.7 GiB) plus the UNet
    activations of its classifier-free-guidance pair with SDPA attention (≈ 0.3 GiB).
    Proportional to the pixel count and to the element size (twice as much in float32).
    A deliberately conservative estimate that has not been calibrated on a GPU yet;
    ``benchmarks/bench_generation.py`` prints the measured peak per batch size.
    """
    itemsize = 4 if dtype_name(dtype) == "float32" else 2
    pixels = config.height * config.width / (512 * 512)
    return int(0.5 * _GIB * itemsize * pixels)


def _check_ip_adapter_folder(models: ModelConfig) -> None:
    """Fail early, naming the expected file, for a local IP-Adapter folder that is incomplete."""
    parsed = parse_location(models.ip_adapter)
    if not parsed.is_local:
        return
    root = parsed.path
    if not root.is_dir():
        raise ModelLoadError(f"IP-Adapter folder not found: {root} (ModelConfig.ip_adapter={models.ip_adapter!r})")
    weight = root / models.ip_adapter_subfolder / models.ip_adapter_weight
    if not weight.is_file():
        raise ModelLoadError(
            f"IP-Adapter weight file not found: expected {weight} "
            f"(ModelConfig.ip_adapter_subfolder={models.ip_adapter_subfolder!r}, "
            f"ip_adapter_weight={models.ip_adapter_weight!r})"
        )
    encoder = root / models.image_encoder_subfolder / "config.json"
    if not encoder.is_file():
        raise ModelLoadError(
            f"IP-Adapter image encoder not found: expected {encoder} "
            f"(ModelConfig.image_encoder_subfolder={models.image_encoder_subfolder!r})"
        )


def load_stock_pipeline(models: ModelConfig, config: IPAdapterConfig, device: Any, dtype: Any) -> Any:
    """Stock diffusers SD1.x pipeline with the IP-Adapter loaded and the configured scheduler."""
    require("torch", "generate")
    diffusers = require("diffusers", "generate")
    transformers = require("transformers", "generate")
    check_local_folder(models.base, "ModelConfig.base", "Stable Diffusion pipeline", "model_index.json")
    _check_ip_adapter_folder(models)
    if config.tiny_vae is not None:
        check_local_folder(config.tiny_vae, "IPAdapterConfig.tiny_vae", "tiny VAE (AutoencoderTiny)", "config.json")

    ip_rev = models.ip_adapter_revision
    ip_location = parse_location(models.ip_adapter).value
    image_encoder = call_loader(
        "the IP-Adapter image encoder",
        f"a CLIPVisionModelWithProjection in "
        f"{describe_location(models.ip_adapter, models.image_encoder_subfolder, ip_rev)}",
        transformers.CLIPVisionModelWithProjection.from_pretrained,
        ip_location,
        subfolder=models.image_encoder_subfolder,
        revision=ip_rev,
        dtype=dtype,
    )
    components: dict[str, Any] = {"image_encoder": image_encoder}
    if models.vae is not None:
        components["vae"] = load_vae(models.vae, dtype)
    pipe = load_sd_pipeline(diffusers.StableDiffusionPipeline, models, dtype, "the Stable Diffusion pipeline",
                            **components)
    call_loader(
        "the IP-Adapter weights",
        f"{models.ip_adapter_subfolder}/{models.ip_adapter_weight} in {describe_location(models.ip_adapter, None, ip_rev)}",
        pipe.load_ip_adapter,
        ip_location,
        subfolder=models.ip_adapter_subfolder,
        weight_name=models.ip_adapter_weight,
        image_encoder_folder=None,  # registered above, with its revision
        revision=ip_rev,
    )
    pipe.scheduler = make_scheduler(config.scheduler)
    if config.tiny_vae is not None:
        pipe.vae = load_tiny_vae(config.tiny_vae, dtype, pipe.vae_scale_factor, field="IPAdapterConfig.tiny_vae")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_reference_pipeline(
    models: ModelConfig, config: IPAdapterConfig | None = None, device: Any = "cpu", dtype: Any = None
) -> Any:
    """The reference approach: a stock ``StableDiffusionPipeline`` with the IP-Adapter loaded.

    Uses the configured scheduler (and tiny VAE, if any); generate with
    :func:`reference_generate`, one pipeline call per image. For baselines and checks.
    """
    config = config if config is not None else IPAdapterConfig()
    import torch

    return load_stock_pipeline(models, config, torch.device(device), resolve_torch_dtype(dtype))


def reference_generate(pipe: Any, request: GenerationRequest, config: IPAdapterConfig | None = None) -> Image.Image:
    """One image the stock way: ``set_ip_adapter_scale(λ)`` then one pipeline call."""
    import torch

    config = config if config is not None else IPAdapterConfig()
    pipe.set_ip_adapter_scale(request.scale)
    image: Image.Image = pipe(
        prompt=config.prompt_prefix + request.prompt,
        negative_prompt=config.negative_prompt,
        ip_adapter_image=request.image,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images[0]
    return image


class IPAdapterGenerator(Generator):
    """Batched SD1.x + IP-Adapter generator: per-sample reference image, prompt, λ and seed.

    Args:
        models: where the base pipeline, VAE override, IP-Adapter weights and image encoder live.
        config: sampling settings (:class:`IPAdapterConfig`; the paper's by default).
        device: torch device ("cpu" by default, "cuda", "cuda:1", ...).
        dtype: ``None``/"float32" (default), "bfloat16" or "float16", or the torch dtype.
        max_cached_embeddings: how many reference-image embeddings to keep (LRU).

    The constructor loads nothing; :meth:`load` (called by the first :meth:`generate`) does,
    with diffusers' and transformers' own loaders, from hub ids or local folders, and raises
    :class:`~dalda_aug.errors.ModelLoadError` naming the file it expected where. The loaded
    :attr:`pipeline`'s UNet carries the per-sample processors, which need ``ip_scale``: generate
    with :meth:`generate`, not by calling the pipeline.
    """

    config_class: ClassVar[type[GeneratorConfig]] = IPAdapterConfig
    accepts_config_subclasses: ClassVar[bool] = True
    repr_models: ClassVar[tuple[str, ...]] = ("base", "ip_adapter")
    config: IPAdapterConfig
    _negative_text: torch.Tensor | None  # text states of the negative prompt, once encoded

    def __init__(
        self,
        models: ModelConfig,
        config: IPAdapterConfig | None = None,
        device: Any = "cpu",
        dtype: Any = None,
        *,
        max_cached_embeddings: int = 4096,
    ) -> None:
        self.max_cached_embeddings = max_cached_embeddings  # checked by _check_arguments
        super().__init__(models, config, device, dtype)
        # diffusers objects (the UNet's forward, the step-caching step) are untyped.
        self._unet_forward: Any = None
        self._cached_step: Any = None
        self._negative_text = None
        self._embeddings: OrderedDict[str, Any] = OrderedDict()

    def _check_arguments(self) -> None:
        self.max_cached_embeddings = check_int("IPAdapterGenerator", "max_cached_embeddings",
                                               self.max_cached_embeddings, 1)

    def clear_cache(self) -> None:
        """Forget the cached reference-image embeddings."""
        self._embeddings.clear()

    # -- loading -------------------------------------------------------------------------
    def load(self) -> "IPAdapterGenerator":
        """Load the models (once); returns ``self``."""
        if self._pipe is not None:
            return self
        require("diffusers", "generate")  # before the modules below import it
        require("transformers", "generate")
        pipe = load_stock_pipeline(self.models, self.config, self.device, self.dtype)
        self._check_unet(pipe.unet)
        self._prepare_unet(pipe)
        self._pipe = pipe
        return self

    def _check_unet(self, unet: Any) -> None:
        """Fail for a UNet this generator cannot batch (guidance embedding, other IP-Adapter formats)."""
        from diffusers.models.embeddings import ImageProjection

        from .step_cache import check_step_caching_unet

        if unet.config.time_cond_proj_dim is not None:
            raise ModelLoadError(
                f"{self.models.base!r}: UNets with a guidance embedding (time_cond_proj_dim) are not supported"
            )
        layers = list(getattr(unet.encoder_hid_proj, "image_projection_layers", []))
        if len(layers) != 1 or not isinstance(layers[0], ImageProjection):
            kinds = [type(layer).__name__ for layer in layers]
            raise ModelLoadError(
                f"{self.models.ip_adapter_weight}: expected one IP-Adapter in ip-adapter_sd15's format "
                f"(ImageProjection), got projection layers {kinds}"
            )
        if self.config.cache_interval > 1:
            check_step_caching_unet(unet, self.config.cache_branch)

    def _prepare_unet(self, pipe: Any) -> None:
        """Per-sample processors, eval mode, channels-last, compile and the step-caching step."""
        import torch

        from .attention import install_per_sample_processors
        from .step_cache import unet_step

        unet, config = pipe.unet, self.config
        install_per_sample_processors(unet)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
            module.eval()
        if config.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self._unet_forward = torch.compile(unet, mode=config.compile_mode) if config.compile else unet
        if config.cache_interval > 1:
            branch = config.cache_branch

            def step(sample: Any, t: Any, text: Any, cross_attention_kwargs: Any, added_cond_kwargs: Any,
                     deep: Any = None) -> Any:
                return unet_step(unet, sample, t, text, cross_attention_kwargs, added_cond_kwargs, branch, deep)

            # One compiled callable; the full (deep=None) and shallow (deep=tensor) calls get a
            # graph each (a guard on ``deep``). λ stays a tensor input.
            self._cached_step = torch.compile(step, mode=config.compile_mode) if config.compile else step

    # -- batch sizing --------------------------------------------------------------------
    def auto_batch_size(self, num_requests: int | None = None) -> int:
        """Batch size for this device: free CUDA memory / :func:`estimate_sample_bytes`.

        On CUDA, ``0.85 x torch.cuda.mem_get_info(device)`` free bytes (measured after the
        models are loaded) divided by the per-sample estimate; 4 on other devices; always
        between 1 and 32 and at most ``num_requests``.
        """
        import torch

        if self.device.type == "cuda":
            self.load()
            free, _total = torch.cuda.mem_get_info(self.device)
            size = int(free * _FREE_MEMORY_FRACTION // estimate_sample_bytes(self.config, self.dtype))
        else:
            size = _CPU_AUTO_BATCH
        size = max(1, min(size, _MAX_AUTO_BATCH))
        if num_requests:
            size = min(size, num_requests)
        return size

    # -- encoders ------------------------------------------------------------------------
    def _image_embeddings(self, images: Sequence["Image.Image"]) -> torch.Tensor:
        """(n, D) image embeddings; each distinct image is encoded once and cached."""
        import torch

        pipe = self._pipe
        keys = [image_key(image) for image in images]
        fresh: dict[str, Any] = {}
        todo: OrderedDict[str, Any] = OrderedDict()
        for key, image in zip(keys, images):
            if key in self._embeddings:
                self._embeddings.move_to_end(key)
            elif key not in todo:
                todo[key] = image
        if todo:
            encoder_dtype = next(pipe.image_encoder.parameters()).dtype
            pixels = pipe.feature_extractor(list(todo.values()), return_tensors="pt").pixel_values
            pixels = pixels.to(device=self.device, dtype=encoder_dtype)
            embeds = pipe.image_encoder(pixels).image_embeds
            fresh = dict(zip(todo, embeds))
        stacked = torch.stack([fresh[k] if k in fresh else self._embeddings[k] for k in keys])
        for key, embed in fresh.items():
            self._embeddings[key] = embed
        while len(self._embeddings) > self.max_cached_embeddings:
            self._embeddings.popitem(last=False)
        return stacked

    def _text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, tokens, C) text-encoder states of ``prompts`` (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds, _ = self._pipe.encode_prompt(unique, self.device, 1, False)
        index = {prompt: i for i, prompt in enumerate(unique)}
        selected: torch.Tensor = embeds[[index[p] for p in prompts]]
        return selected

    def _negative_embedding(self) -> torch.Tensor:
        if self._negative_text is None:
            self._negative_text = self._text_embeddings([self.config.negative_prompt])
        return self._negative_text

    # -- generation ----------------------------------------------------------------------
    def generate(
        self,
        requests: Iterable[GenerationRequest],
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list["Image.Image"]:
        """Generate one PIL image per request, in order, ``batch_size`` requests per UNet call.

        ``batch_size=None`` picks :meth:`auto_batch_size`. Each image depends only on its own
        request (within floating-point tolerance), not on the batch size or its batch mates.
        """
        import torch

        requests = check_requests(requests)
        if batch_size is not None:
            check_int("generate", "batch_size", batch_size, 1)
        self.load()
        batch_size = int(batch_size) if batch_size is not None else self.auto_batch_size(len(requests))

        from tqdm.auto import tqdm

        chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
        images: list[Image.Image] = []
        with (
            torch.inference_mode(),
            self._attention_context(),
            tqdm(total=len(chunks) * self.config.num_inference_steps, disable=not progress, unit="step",
                 desc="generating") as bar,
        ):
            for chunk in chunks:
                images.extend(self._generate_batch(chunk, bar))
        return images

    def _attention_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.attention == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _generate_batch(self, requests: Sequence[GenerationRequest], bar: Any) -> list["Image.Image"]:
        """One batch, as diffusers' ``__call__``: encode, prepare latents, denoise, decode."""
        import torch

        text, image, scale = self._encode(requests)
        scheduler = make_scheduler(self.config.scheduler)
        scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        latents = self._prepare_latents(scheduler, generators, text.dtype)
        latents = self._denoise(latents, scheduler, generators, text, image, scale, bar)
        return decode_latents(self._pipe, latents)

    def _encode(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text states, image embeddings (n, 1, D) and λ of the batch; with guidance, the
        unconditional half first (as in diffusers)."""
        import torch

        cfg, n = self.config, len(requests)
        text = self._text_embeddings([cfg.prompt_prefix + r.prompt for r in requests])
        image = self._image_embeddings([r.image for r in requests])[:, None, :]  # (n, 1, D)
        scale = torch.tensor([r.scale for r in requests], dtype=torch.float32, device=self.device)
        if cfg.guidance_scale > 1.0:
            text = torch.cat([self._negative_embedding().expand(n, -1, -1), text])
            image = torch.cat([torch.zeros_like(image), image])  # ip-adapter_sd15's negative: zeros
            scale = torch.cat([scale, scale])
        return text, image, scale

    def _prepare_latents(self, scheduler: Any, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
        """The initial noise: one CPU generator per sample, each drawing a (1, C, h, w) block, the
        same numbers as a batch-1 pipeline call with that generator."""
        from diffusers.utils.torch_utils import randn_tensor

        # Adapted from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_latents
        # (one generator per sample).
        pipe, cfg, factor = self._pipe, self.config, self._pipe.vae_scale_factor
        shape = (len(generators), pipe.unet.config.in_channels, cfg.height // factor, cfg.width // factor)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=dtype)
        scaled: torch.Tensor = latents * scheduler.init_noise_sigma
        return scaled

    def _denoise(self, latents: torch.Tensor, scheduler: Any, generators: list[torch.Generator], text: torch.Tensor,
                 image: torch.Tensor, scale: torch.Tensor, bar: Any) -> torch.Tensor:
        """The denoising loop: one (full or, with step caching, shallow) UNet call per step for the batch."""
        import inspect

        import torch

        cfg = self.config
        guided = cfg.guidance_scale > 1.0
        step_params = set(inspect.signature(scheduler.step).parameters)
        step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in step_params}
        cross_attention_kwargs = {"ip_scale": scale}
        added_cond_kwargs = {"image_embeds": [image]}

        deep = None  # step caching: the cached deep features
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if cfg.cache_interval == 1:
                noise = self._unet_forward(
                    model_input,
                    t,
                    encoder_hidden_states=text,
                    cross_attention_kwargs=cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
            else:  # full UNet every cache_interval-th step (the first included), shallow between
                noise, deep = self._cached_step(
                    model_input, t, text, cross_attention_kwargs, added_cond_kwargs,
                    deep=None if i % cfg.cache_interval == 0 else deep,
                )
            if guided:
                noise = apply_guidance(noise, cfg.guidance_scale)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            bar.update()
        return latents


# The old name of IPAdapterConfig (``GenerationConfig``) resolves through the map of moved paths.
__getattr__ = module_getattr(__name__)
