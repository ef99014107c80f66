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
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .config import ModelConfig
from .errors import InputError, ModelLoadError, require

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = [
    "GenerationConfig",
    "GenerationRequest",
    "IPAdapterGenerator",
    "ddim_scheduler_config",
    "generation_fingerprint",
    "estimate_sample_bytes",
    "load_reference_pipeline",
    "reference_generate",
    "SCHEDULERS",
]

# Version of the generation algorithm; part of every fingerprint, bump it when pixels change.
_FORMAT = "dalda_aug.generation/1"
SCHEDULERS = ("ddim", "dpmsolver++")
_ATTENTION = ("sdpa", "math")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
_GIB = 1024**3
# Auto batch size: fraction of free accelerator memory we plan to use, and the bounds.
_FREE_MEMORY_FRACTION = 0.85
_MAX_AUTO_BATCH = 32
_CPU_AUTO_BATCH = 4


def ddim_scheduler_config() -> dict:
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


# --------------------------------------------------------------------------------------------
# configuration and requests
# --------------------------------------------------------------------------------------------
def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InputError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """How images are generated (the paper's settings by default; diffusers' argument names).

    The fields listed in ``_PIXEL_FIELDS`` change pixels and make up :meth:`fingerprint`
    (``cache_interval``/``cache_branch`` only when step caching is on, so that fingerprints
    from before they existed stay valid). ``attention``, ``channels_last``, ``compile`` and
    ``compile_mode`` are speed-ups that compute the same function and only change results by
    floating-point rounding; they are excluded from the fingerprint. Output-changing speed-ups
    (``tiny_vae``, ``scheduler="dpmsolver++"`` with fewer steps, ``cache_interval > 1``) are
    off by default.
    """

    # Denoising steps (paper: 30).
    num_inference_steps: int = 30
    # Classifier-free guidance weight (paper: 7.5); guidance and the negative prompt are used
    # only when it is > 1, as in diffusers.
    guidance_scale: float = 7.5
    # Output size in pixels; multiples of 8 (paper: 512 x 512).
    height: int = 512
    width: int = 512
    # Prepended to every request's prompt (paper: "best quality, high quality, ").
    prompt_prefix: str = "best quality, high quality, "
    # Negative prompt of classifier-free guidance (paper's).
    negative_prompt: str = "monochrome, lowres, bad anatomy, worst quality, low quality"
    # "ddim" (paper; eta = 0, :func:`ddim_scheduler_config`) or the opt-in "dpmsolver++"
    # (DPM-Solver++ 2M built from the same betas), commonly run with ~20 steps instead of 30
    # (1.5x fewer UNet calls); different pixels from the paper's sampler.
    scheduler: str = "ddim"
    # Opt-in AutoencoderTiny (hub id or folder, e.g. "madebyollin/taesd") that decodes the
    # latents instead of the full VAE: the decode (~5 % of the work at 512², more at small
    # sizes, and most of the per-image peak memory) becomes far cheaper, but the pixels are an
    # approximation (softer fine detail). Changes pixels.
    tiny_vae: str | None = None
    # Opt-in step caching (DeepCache, Ma et al., CVPR 2024): every ``cache_interval``-th
    # denoising step (the first included) runs the full UNet and caches the deep features
    # entering the up-block paired with down-block ``cache_branch``; the steps in between run
    # only the shallow part (conv_in, down_blocks[:cache_branch + 1], the up-blocks from the
    # paired one on, conv_out) on the cached deep features. 1 = off (every step runs the full
    # UNet). Interval 3 needs ~2-2.5x fewer full-UNet FLOPs at a small quality cost. Changes pixels.
    cache_interval: int = 1
    # Which skip branch stays live on cached steps: 0 = the shallowest (DeepCache's default,
    # the cheapest cached steps); up to len(unet.down_blocks) - 1, checked when the models load.
    cache_branch: int = 0
    # Attention kernel: "sdpa" (torch's fused scaled_dot_product_attention, flash/memory-
    # efficient kernels on GPU) or "math" (its plain softmax(QK^T)V fallback; slow, for
    # debugging numerical problems).
    attention: str = "sdpa"
    # Store UNet and VAE activations channels-last: often faster convolutions on GPUs
    # with bf16/fp16; no effect worth having on CPU.
    channels_last: bool = False
    # torch.compile the UNet: faster steps after a warm-up compile per distinct batch size
    # (about a minute for the tiny test UNet on CPU); λ is a tensor input, so new λ values
    # never recompile. Needs a C++ (CPU) or Triton (GPU) toolchain.
    compile: bool = False
    # torch.compile mode when ``compile`` is on.
    compile_mode: str = "default"

    _PIXEL_FIELDS = (
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "prompt_prefix",
        "negative_prompt",
        "scheduler",
        "tiny_vae",
        # In pixel_dict only when step caching is on (see pixel_dict).
        "cache_interval",
        "cache_branch",
    )
    # Step-caching fields left out of pixel_dict at their "off" value, so that fingerprints
    # computed before they existed stay valid.
    _OFF_BY_DEFAULT = ("cache_interval", "cache_branch")

    def __post_init__(self) -> None:
        owner = "GenerationConfig"
        _check_int(owner, "num_inference_steps", self.num_inference_steps, 1)
        object.__setattr__(self, "num_inference_steps", int(self.num_inference_steps))
        if (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, numbers.Real)
            or not math.isfinite(self.guidance_scale)
            or self.guidance_scale < 0
        ):
            raise InputError(f"{owner}.guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        for name in ("height", "width"):
            value = getattr(self, name)
            _check_int(owner, name, value, 8)
            if value % 8:
                raise InputError(f"{owner}.{name} must be a multiple of 8, got {value}")
            object.__setattr__(self, name, int(value))  # plain ints: JSON-able, stable fingerprints
        for name in ("prompt_prefix", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{owner}.{name} must be a string, got {getattr(self, name)!r}")
        _check_choice(owner, "scheduler", self.scheduler, SCHEDULERS)
        if self.tiny_vae is not None and (not isinstance(self.tiny_vae, str) or not self.tiny_vae.strip()):
            raise InputError(f"{owner}.tiny_vae must be None or a hub id / folder, got {self.tiny_vae!r}")
        _check_int(owner, "cache_interval", self.cache_interval, 1)
        object.__setattr__(self, "cache_interval", int(self.cache_interval))
        # Upper bound (the UNet's down-block count) is checked by IPAdapterGenerator.load.
        _check_int(owner, "cache_branch", self.cache_branch, 0)
        object.__setattr__(self, "cache_branch", int(self.cache_branch))
        _check_choice(owner, "attention", self.attention, _ATTENTION)
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}")
        _check_choice(owner, "compile_mode", self.compile_mode, _COMPILE_MODES)

    def to_dict(self) -> dict[str, Any]:
        """Every field (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown GenerationConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))

    def pixel_dict(self) -> dict[str, Any]:
        """The fields that change the generated pixels, plus the sampler constants they imply."""
        values = {name: getattr(self, name) for name in self._PIXEL_FIELDS}
        if self.cache_interval == 1:  # step caching off: cache_branch is unused, pixels as before
            for name in self._OFF_BY_DEFAULT:
                del values[name]
        values["scheduler_config"] = ddim_scheduler_config()
        values["eta"] = 0.0
        return values

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`pixel_dict` (a pure function of the field values)."""
        blob = json.dumps({"format": _FORMAT, **self.pixel_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate.

    ``prompt`` is the text *without* :attr:`GenerationConfig.prompt_prefix` (the generator
    adds it); ``scale`` is the IP-Adapter image weight λ >= 0 (0 = text only); ``seed`` seeds
    the request's own ``torch.Generator("cpu")`` (0 <= seed < 2**64). The reference image is
    given to the IP-Adapter's feature extractor as is (any size, any mode).
    """

    image: "Image.Image"
    prompt: str
    scale: float
    seed: int

    def __post_init__(self) -> None:
        from PIL import Image

        if not isinstance(self.image, Image.Image):
            raise InputError(
                f"GenerationRequest.image must be a PIL.Image.Image, got {type(self.image).__name__}"
            )
        if self.image.width < 1 or self.image.height < 1:
            raise InputError(f"GenerationRequest.image is empty ({self.image.width}x{self.image.height})")
        if not isinstance(self.prompt, str):
            raise InputError(f"GenerationRequest.prompt must be a string, got {type(self.prompt).__name__}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
            raise InputError(f"GenerationRequest.scale (λ) must be a finite number >= 0, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise InputError(f"GenerationRequest.seed must be an integer in [0, 2**64), got {seed!r}")
        object.__setattr__(self, "seed", int(seed))


def _dtype_name(dtype: Any) -> str:
    """Canonical name ("float32", "bfloat16", "float16") of a dtype given as string or torch.dtype."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, str):
        name = _DTYPE_NAMES.get(dtype.lower())
    else:
        name = _DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
    if name is None:
        raise InputError(f"dtype must be float32, bfloat16 or float16 (or None for float32), got {dtype!r}")
    return name


def generation_fingerprint(models: ModelConfig, config: GenerationConfig, dtype: Any = None) -> str:
    """Hash of everything that changes the generated pixels, for cache keys.

    Covers the generation models (locations, files, revisions), :meth:`GenerationConfig.pixel_dict`
    and the dtype; not the CLIPScore model, the device or the speed-ups that compute the same
    function (batch size, attention kernel, channels-last, compile), which only move results by
    floating-point rounding. A pure function of its arguments.
    """
    gen_models = {
        k: v for k, v in models.to_dict().items() if k not in ("clip_model", "clip_pretrained")
    }
    payload = {
        "format": _FORMAT,
        "models": gen_models,
        "generation": config.pixel_dict(),
        "dtype": _dtype_name(dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def estimate_sample_bytes(config: GenerationConfig, dtype: Any = None) -> int:
    """Rough extra peak accelerator memory one more image in a batch costs, in bytes.

    Model: ≈ 1 GiB per image at 512x512 in a 16-bit dtype: the VAE decode of one image
    (feature maps of 128-512 channels at up to full resolution, ≈ 0.7 GiB) plus the UNet
    activations of its classifier-free-guidance pair with SDPA attention (≈ 0.3 GiB).
    Proportional to the pixel count and to the element size (twice as much in float32).
    A deliberately conservative estimate that has not been calibrated on a GPU yet;
    ``benchmarks/bench_generation.py`` prints the measured peak per batch size.
    """
    itemsize = 4 if _dtype_name(dtype) == "float32" else 2
    pixels = config.height * config.width / (512 * 512)
    return int(0.5 * _GIB * itemsize * pixels)


# --------------------------------------------------------------------------------------------
# loading (shared by the generator and the stock reference pipeline)
# --------------------------------------------------------------------------------------------
def _looks_local(location: str) -> bool:
    """True when ``location`` is (meant as) a local path rather than a hub id."""
    if os.path.exists(os.path.expanduser(location)):
        return True
    return (
        os.path.isabs(location)
        or location.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in location
        or location.count("/") > 1
    )


def _where(location: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """Human-readable description of a hub location."""
    text = f"hub repository {location!r}"
    if subfolder:
        text += f", subfolder {subfolder!r}"
    if revision:
        text += f", revision {revision!r}"
    return text


def _check_local_locations(models: ModelConfig, config: GenerationConfig) -> None:
    """Fail early, naming the expected file, for local model locations that are incomplete."""

    def folder(location: str, field: str, what: str, marker: str) -> None:
        path = Path(location).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{what} folder not found: {path} ({field}={location!r})")
        if not (path / marker).is_file():
            raise ModelLoadError(f"{what}: expected {path / marker} ({field}={location!r})")

    if _looks_local(models.base):
        folder(models.base, "ModelConfig.base", "Stable Diffusion pipeline", "model_index.json")
    if models.vae is not None and _looks_local(models.vae):
        folder(models.vae, "ModelConfig.vae", "VAE (AutoencoderKL)", "config.json")
    if config.tiny_vae is not None and _looks_local(config.tiny_vae):
        folder(config.tiny_vae, "GenerationConfig.tiny_vae", "tiny VAE (AutoencoderTiny)", "config.json")
    if _looks_local(models.ip_adapter):
        root = Path(models.ip_adapter).expanduser()
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


def _loading(what: str, expected: str, fn: Callable, *args, **kwargs):
    """Call a diffusers/transformers loader; turn its failure into a :class:`ModelLoadError`."""
    try:
        return fn(*args, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(f"could not load {what}: expected {expected} ({type(exc).__name__}: {exc})") from exc


def _resolve_torch_dtype(dtype: Any):
    import torch

    return getattr(torch, _dtype_name(dtype))


def _load_vae_override(models: ModelConfig, dtype):
    """The ``AutoencoderKL`` at ``models.vae`` that replaces the base pipeline's VAE."""
    diffusers = require("diffusers", "generate")
    return _loading(
        "the VAE",
        f"an AutoencoderKL in {_where(models.vae)}",
        diffusers.AutoencoderKL.from_pretrained,
        models.vae,
        dtype=dtype,
    )


def _load_stock_pipeline(models: ModelConfig, config: GenerationConfig, device, dtype):
    """Stock diffusers SD1.x pipeline with the IP-Adapter loaded and the configured scheduler."""
    require("torch", "generate")
    diffusers = require("diffusers", "generate")
    transformers = require("transformers", "generate")
    _check_local_locations(models, config)

    ip_rev = models.ip_adapter_revision
    image_encoder = _loading(
        "the IP-Adapter image encoder",
        f"a CLIPVisionModelWithProjection in {_where(models.ip_adapter, models.image_encoder_subfolder, ip_rev)}",
        transformers.CLIPVisionModelWithProjection.from_pretrained,
        models.ip_adapter,
        subfolder=models.image_encoder_subfolder,
        revision=ip_rev,
        dtype=dtype,
    )
    components: dict[str, Any] = {"image_encoder": image_encoder}
    if models.vae is not None:
        components["vae"] = _load_vae_override(models, dtype)
    pipe = _loading(
        "the Stable Diffusion pipeline",
        f"a diffusers StableDiffusionPipeline (model_index.json) in {_where(models.base, None, models.base_revision)}",
        diffusers.StableDiffusionPipeline.from_pretrained,
        models.base,
        revision=models.base_revision,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=dtype,
        **components,
    )
    _loading(
        "the IP-Adapter weights",
        f"{models.ip_adapter_subfolder}/{models.ip_adapter_weight} in {_where(models.ip_adapter, None, ip_rev)}",
        pipe.load_ip_adapter,
        models.ip_adapter,
        subfolder=models.ip_adapter_subfolder,
        weight_name=models.ip_adapter_weight,
        image_encoder_folder=None,  # registered above, with its revision
        revision=ip_rev,
    )
    pipe.scheduler = _make_scheduler(config)
    if config.tiny_vae is not None:
        tiny = _loading(
            "the tiny VAE",
            f"an AutoencoderTiny in {_where(config.tiny_vae)}",
            diffusers.AutoencoderTiny.from_pretrained,
            config.tiny_vae,
            dtype=dtype,
        )
        factor = tiny.config.upsampling_scaling_factor ** (len(tiny.config.decoder_block_out_channels) - 1)
        if factor != pipe.vae_scale_factor:
            raise ModelLoadError(
                f"tiny VAE {config.tiny_vae!r} upsamples latents {factor}x but the pipeline's VAE "
                f"{pipe.vae_scale_factor}x; they must match"
            )
        pipe.vae = tiny
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _make_scheduler(config: GenerationConfig):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = DDIMScheduler(**ddim_scheduler_config())
    if config.scheduler == "ddim":
        return ddim
    # The usual diffusers recipe: DPM-Solver++ (2M) from the DDIM scheduler's config.
    return DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2)


def load_reference_pipeline(
    models: ModelConfig, config: GenerationConfig | None = None, device: Any = "cpu", dtype: Any = None
):
    """The reference approach: a stock ``StableDiffusionPipeline`` with the IP-Adapter loaded.

    Uses the configured scheduler (and tiny VAE, if any); generate with
    :func:`reference_generate`, one pipeline call per image. For baselines and checks.
    """
    config = config if config is not None else GenerationConfig()
    import torch

    return _load_stock_pipeline(models, config, torch.device(device), _resolve_torch_dtype(dtype))


def reference_generate(pipe, request: GenerationRequest, config: GenerationConfig | None = None):
    """One image the stock way: ``set_ip_adapter_scale(λ)`` then one pipeline call."""
    import torch

    config = config if config is not None else GenerationConfig()
    pipe.set_ip_adapter_scale(request.scale)
    return pipe(
        prompt=config.prompt_prefix + request.prompt,
        negative_prompt=config.negative_prompt,
        ip_adapter_image=request.image,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images[0]


# --------------------------------------------------------------------------------------------
# attention processors taking a per-sample λ tensor
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _processor_classes():
    """Build (once) the two processor classes; deferred so that importing this module stays light."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor2_0

    class ScaleAwareAttnProcessor(AttnProcessor2_0):
        """diffusers' SDPA processor that accepts (and ignores) ``ip_scale``.

        Installed on self-attention layers so that passing λ through ``cross_attention_kwargs``
        does not make every self-attention layer warn about an unexpected argument.
        """

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     ip_scale=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    class PerSampleIPAdapterAttnProcessor(torch.nn.Module):
        """Decoupled cross-attention Z = Attn(Q, K_t, V_t) + λ_b · Attn(Q, K_i, V_i), λ per sample.

        ``ip_scale`` is a float tensor of shape ``[batch]`` (with classifier-free guidance the
        unconditional half first, like the rest of the batch). Owns the ``to_k_ip``/``to_v_ip``
        projections that ``load_ip_adapter`` created. Overrides ``__call__`` (as diffusers'
        IP-Adapter processors do) because ``Attention.forward`` passes only the keyword
        arguments named in the processor's ``__call__`` signature.
        """

        def __init__(self, to_k_ip: torch.nn.ModuleList, to_v_ip: torch.nn.ModuleList):
            super().__init__()
            self.to_k_ip = to_k_ip
            self.to_v_ip = to_v_ip

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     ip_scale=None):
            if not isinstance(encoder_hidden_states, tuple):
                raise ValueError(
                    "PerSampleIPAdapterAttnProcessor expects encoder_hidden_states=(text states, [image tokens]) "
                    "as produced by a UNet with an IP-Adapter image projection"
                )
            if ip_scale is None:
                raise ValueError(
                    "PerSampleIPAdapterAttnProcessor needs cross_attention_kwargs={'ip_scale': tensor [batch]}; "
                    "use IPAdapterGenerator.generate instead of calling the pipeline directly"
                )
            text_states, ip_states = encoder_hidden_states
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            input_ndim = hidden_states.ndim
            if input_ndim == 4:
                batch_size, channel, height, width = hidden_states.shape
                hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            batch_size, text_len, _ = text_states.shape
            if ip_scale.shape != (batch_size,):
                raise ValueError(f"ip_scale must have shape ({batch_size},), got {tuple(ip_scale.shape)}")
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, text_len, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

            query = attn.to_q(hidden_states)
            if attn.norm_cross:
                text_states = attn.norm_encoder_hidden_states(text_states)
            key = attn.to_k(text_states)
            value = attn.to_v(text_states)
            heads = attn.heads
            head_dim = key.shape[-1] // heads

            def split_heads(x):  # (batch, tokens, heads*dim) -> (batch, heads, tokens, dim)
                return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)

            def merge_heads(x):  # inverse of split_heads, back in the query's dtype
                return x.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)

            query = split_heads(query)
            out = merge_heads(
                F.scaled_dot_product_attention(
                    query, split_heads(key), split_heads(value), attn_mask=attention_mask, dropout_p=0.0,
                    is_causal=False,
                )
            )
            # λ stays float32: λ·image-attention is rounded once to the activation dtype, as when
            # diffusers multiplies by a Python float. λ = 0 adds exact zeros (no branch, so a
            # compiled graph does not depend on the values of λ).
            weight = ip_scale.reshape(batch_size, 1, 1)
            for tokens, to_k_ip, to_v_ip in zip(ip_states, self.to_k_ip, self.to_v_ip):
                image_out = merge_heads(
                    F.scaled_dot_product_attention(
                        query, split_heads(to_k_ip(tokens)), split_heads(to_v_ip(tokens)), dropout_p=0.0,
                        is_causal=False,
                    )
                )
                out = out + (weight * image_out).to(out.dtype)

            out = attn.to_out[1](attn.to_out[0](out))
            if input_ndim == 4:
                out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

    return ScaleAwareAttnProcessor, PerSampleIPAdapterAttnProcessor


def _install_per_sample_processors(unet) -> int:
    """Swap the UNet's processors for per-sample-λ ones; returns the number of IP-Adapter layers."""
    from diffusers.models.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
    )

    scale_aware, per_sample = _processor_classes()
    processors = {}
    n_ip = 0
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, (IPAdapterAttnProcessor2_0, IPAdapterAttnProcessor)):
            processors[name] = per_sample(proc.to_k_ip, proc.to_v_ip)
            n_ip += 1
        elif isinstance(proc, (AttnProcessor2_0, AttnProcessor)):
            processors[name] = scale_aware()
        else:
            raise ModelLoadError(f"unsupported attention processor {type(proc).__name__} at UNet layer {name}")
    if n_ip == 0:
        raise ModelLoadError("load_ip_adapter installed no IP-Adapter attention processor in the UNet")
    unet.set_attn_processor(processors)
    return n_ip


# --------------------------------------------------------------------------------------------
# step caching (DeepCache) over the UNet's public submodules
# --------------------------------------------------------------------------------------------
def _check_step_caching_unet(unet, branch: int) -> None:
    """Fail early when :func:`_unet_step` does not cover this UNet or ``branch`` is out of range."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    if not 0 <= branch < n_down:
        raise InputError(
            f"GenerationConfig.cache_branch must lie in [0, {n_down - 1}] for this UNet "
            f"({n_down} down blocks), got {branch}"
        )
    cfg = unet.config
    unsupported = {
        "center_input_sample": cfg.center_input_sample,
        "class_embedding": unet.class_embedding is not None,
        "addition_embed_type": cfg.addition_embed_type,
        "time_embed_act": unet.time_embed_act is not None,
        "text_encoder_hid_proj": getattr(unet, "text_encoder_hid_proj", None) is not None,
        "encoder_hid_dim_type != 'ip_image_proj'": cfg.encoder_hid_dim_type != "ip_image_proj",
        "up/down block counts differ": n_up != n_down,
    }
    bad = [name for name, value in unsupported.items() if value]
    # The up-blocks from the paired one on must consume only skip connections of down_blocks[:branch+1].
    produced = 1 + sum(
        len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
        for block in unet.down_blocks[: branch + 1]
    )
    needed = sum(len(block.resnets) for block in unet.up_blocks[n_up - 1 - branch :])
    if produced < needed:
        bad.append(f"up-blocks from {n_up - 1 - branch} on need {needed} skip connections, "
                   f"down_blocks[:{branch + 1}] give {produced}")
    if bad:
        raise ModelLoadError(f"step caching (cache_interval > 1) supports SD1.x UNets only; this one has {bad}")


def _unet_step(unet, sample, timestep, encoder_hidden_states, cross_attention_kwargs, added_cond_kwargs,
               branch: int, deep=None):
    """One UNet evaluation with DeepCache-style step caching; returns ``(noise, deep_features)``.

    Mirrors ``UNet2DConditionModel.forward`` for SD1.x with an IP-Adapter image projection (no
    class/addition embeddings, masks, ControlNet or adapter residuals), over the UNet's public
    submodules. Up-block ``n_up - 1 - branch`` pairs with down-block ``branch``: it consumes the
    skip connections of ``down_blocks[branch]`` (and of the input entering it).

    * ``deep=None``: the full UNet; ``deep_features`` is the hidden state entering the paired
      up-block (the output of the deeper up-blocks), to be cached.
    * ``deep=<cached features>``: only the shallow part: conv_in, the time embedding,
      ``down_blocks[:branch + 1]``, then the up-blocks from the paired one on with ``deep``
      in place of the deeper blocks' output plus fresh skip connections, and conv_norm_out /
      conv_act / conv_out; ``deep_features`` is ``deep``.
    """
    import torch

    n_up = len(unet.up_blocks)
    paired = n_up - 1 - branch
    # Upsample sizes are forwarded when the latent is not a multiple of the overall factor.
    overall_up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % overall_up_factor != 0 for dim in sample.shape[-2:])

    # Time embedding (get_time_embed + time_embedding; time_proj is float32 -> sample dtype).
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.int64, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype), None)

    # encoder_hid_dim_type == "ip_image_proj": (text states, [image tokens per IP-Adapter]).
    states = (encoder_hidden_states, unet.encoder_hid_proj(added_cond_kwargs["image_embeds"]))

    sample = unet.conv_in(sample)
    res_samples = (sample,)
    down_blocks = unet.down_blocks if deep is None else unet.down_blocks[: branch + 1]
    for block in down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(
                hidden_states=sample, temb=emb, encoder_hidden_states=states,
                cross_attention_kwargs=cross_attention_kwargs,
            )
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        res_samples += res

    if deep is None:
        first = 0
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(
                    sample, emb, encoder_hidden_states=states, cross_attention_kwargs=cross_attention_kwargs
                )
            else:
                sample = unet.mid_block(sample, emb)
    else:
        # Keep the skip connections the live up-blocks consume (the first ones; down_blocks[branch]'s
        # downsampler output, if any, belonged to the deeper, cached up-block), so that the
        # slicing below, and the upsample sizes, are those of the full pass.
        first = paired
        needed = sum(len(block.resnets) for block in unet.up_blocks[paired:])
        res_samples = res_samples[:needed]
        sample = deep

    upsample_size = None
    for i in range(first, n_up):
        block = unet.up_blocks[i]
        if i == paired:
            deep = sample
        res = res_samples[-len(block.resnets) :]
        res_samples = res_samples[: -len(block.resnets)]
        if i != n_up - 1 and forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=states,
                cross_attention_kwargs=cross_attention_kwargs, upsample_size=upsample_size,
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), deep


def _image_key(image: "Image.Image") -> str:
    """Content hash of an image exactly as given (mode, size, palette, pixel bytes)."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    if image.mode in ("P", "PA"):
        h.update(bytes(image.getpalette() or []))
    h.update(image.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------------
class IPAdapterGenerator:
    """Batched SD1.x + IP-Adapter generator: per-sample reference image, prompt, λ and seed.

    Args:
        models: where the base pipeline, VAE override, IP-Adapter weights and image encoder live.
        config: sampling settings (:class:`GenerationConfig`; the paper's by default).
        device: torch device ("cpu" by default, "cuda", "cuda:1", ...).
        dtype: ``None``/"float32" (default), "bfloat16" or "float16", or the torch dtype.
        max_cached_embeddings: how many reference-image embeddings to keep (LRU).

    The constructor loads nothing; :meth:`load` (called by the first :meth:`generate`) does,
    with diffusers' and transformers' own loaders, from hub ids or local folders, and raises
    :class:`~dalda_aug.errors.ModelLoadError` naming the file it expected where.
    """

    def __init__(
        self,
        models: ModelConfig,
        config: GenerationConfig | None = None,
        device: Any = "cpu",
        dtype: Any = None,
        *,
        max_cached_embeddings: int = 4096,
    ):
        import torch

        if not isinstance(models, ModelConfig):
            raise InputError(f"models must be a ModelConfig, got {type(models).__name__}")
        config = config if config is not None else GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise InputError(f"config must be a GenerationConfig, got {type(config).__name__}")
        _check_int("IPAdapterGenerator", "max_cached_embeddings", max_cached_embeddings, 1)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"invalid device {device!r}: {exc}") from None
        self.models = models
        self.config = config
        self.dtype = _resolve_torch_dtype(dtype)
        self.max_cached_embeddings = int(max_cached_embeddings)
        self._pipe = None
        self._unet_forward = None
        self._cached_step = None
        self._negative_text = None
        self._embeddings: OrderedDict[str, Any] = OrderedDict()

    def __repr__(self) -> str:
        state = "loaded" if self._pipe is not None else "not loaded"
        return (
            f"{type(self).__name__}(base={self.models.base!r}, ip_adapter={self.models.ip_adapter!r}, "
            f"device={str(self.device)!r}, dtype={_dtype_name(self.dtype)!r}, {state})"
        )

    # -- state ---------------------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self):
        """The underlying ``StableDiffusionPipeline`` (loads it).

        Its UNet carries the per-sample processors, which need ``ip_scale``: generate with
        :meth:`generate`, not by calling the pipeline.
        """
        self.load()
        return self._pipe

    def fingerprint(self) -> str:
        """:func:`generation_fingerprint` of this generator's models, config and dtype."""
        return generation_fingerprint(self.models, self.config, self.dtype)

    def clear_cache(self) -> None:
        """Forget the cached reference-image embeddings."""
        self._embeddings.clear()

    def load(self) -> "IPAdapterGenerator":
        """Load the models (once); returns ``self``."""
        if self._pipe is not None:
            return self
        import torch

        pipe = _load_stock_pipeline(self.models, self.config, self.device, self.dtype)
        unet = pipe.unet
        if unet.config.time_cond_proj_dim is not None:
            raise ModelLoadError(
                f"{self.models.base!r}: UNets with a guidance embedding (time_cond_proj_dim) are not supported"
            )
        from diffusers.models.embeddings import ImageProjection

        layers = list(getattr(unet.encoder_hid_proj, "image_projection_layers", []))
        if len(layers) != 1 or not isinstance(layers[0], ImageProjection):
            kinds = [type(layer).__name__ for layer in layers]
            raise ModelLoadError(
                f"{self.models.ip_adapter_weight}: expected one IP-Adapter in ip-adapter_sd15's format "
                f"(ImageProjection), got projection layers {kinds}"
            )
        caching = self.config.cache_interval > 1
        if caching:
            _check_step_caching_unet(unet, self.config.cache_branch)
        _install_per_sample_processors(unet)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
            module.eval()
        if self.config.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self._unet_forward = torch.compile(unet, mode=self.config.compile_mode) if self.config.compile else unet
        if caching:
            branch = self.config.cache_branch

            def step(sample, t, text, cross_attention_kwargs, added_cond_kwargs, deep=None):
                return _unet_step(unet, sample, t, text, cross_attention_kwargs, added_cond_kwargs, branch, deep)

            # One compiled callable; the full (deep=None) and shallow (deep=tensor) calls get a
            # graph each (a guard on ``deep``). λ stays a tensor input.
            self._cached_step = torch.compile(step, mode=self.config.compile_mode) if self.config.compile else step
        self._pipe = pipe
        return self

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
    def _image_embeddings(self, images: Sequence["Image.Image"]):
        """(n, D) image embeddings; each distinct image is encoded once and cached."""
        import torch

        pipe = self._pipe
        keys = [_image_key(image) for image in images]
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

    def _text_embeddings(self, prompts: Sequence[str]):
        """(n, tokens, C) text-encoder states of ``prompts`` (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds, _ = self._pipe.encode_prompt(unique, self.device, 1, False)
        index = {prompt: i for i, prompt in enumerate(unique)}
        return embeds[[index[p] for p in prompts]]

    def _negative_embedding(self):
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

        requests = list(requests)
        if not requests:
            raise InputError("generate() needs at least one GenerationRequest, got an empty list")
        for i, request in enumerate(requests):
            if not isinstance(request, GenerationRequest):
                raise InputError(f"requests[{i}] must be a GenerationRequest, got {type(request).__name__}")
        if batch_size is not None:
            _check_int("generate", "batch_size", batch_size, 1)
        self.load()
        batch_size = int(batch_size) if batch_size is not None else self.auto_batch_size(len(requests))

        from tqdm.auto import tqdm

        chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
        images: list = []
        with (
            torch.inference_mode(),
            self._attention_context(),
            tqdm(total=len(chunks) * self.config.num_inference_steps, disable=not progress, unit="step",
                 desc="generating") as bar,
        ):
            for chunk in chunks:
                images.extend(self._generate_batch(chunk, bar))
        return images

    def _attention_context(self):
        if self.config.attention == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _generate_batch(self, requests: Sequence[GenerationRequest], bar) -> list["Image.Image"]:
        import inspect

        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipe, cfg, device = self._pipe, self.config, self.device
        n = len(requests)
        guided = cfg.guidance_scale > 1.0

        text = self._text_embeddings([cfg.prompt_prefix + r.prompt for r in requests])
        image = self._image_embeddings([r.image for r in requests])[:, None, :]  # (n, 1, D)
        scale = torch.tensor([r.scale for r in requests], dtype=torch.float32, device=device)
        if guided:  # unconditional half first, as in diffusers
            text = torch.cat([self._negative_embedding().expand(n, -1, -1), text])
            image = torch.cat([torch.zeros_like(image), image])  # ip-adapter_sd15's negative: zeros
            scale = torch.cat([scale, scale])

        scheduler = _make_scheduler(cfg)
        scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        factor = pipe.vae_scale_factor
        shape = (n, pipe.unet.config.in_channels, cfg.height // factor, cfg.width // factor)
        # One CPU generator per sample, each drawing a (1, C, h, w) block: the same numbers as
        # a batch-1 pipeline call with that generator.
        latents = randn_tensor(shape, generator=generators, device=device, dtype=text.dtype)
        latents = latents * scheduler.init_noise_sigma
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
                uncond, cond = noise.chunk(2)
                noise = uncond + cfg.guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            bar.update()

        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * n)
