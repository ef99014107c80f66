"""What every generator shares: requests, dtypes, the config and generator bases, the fingerprint, the registry.

A generator derives from :class:`Generator`: it is built as ``Generator(models, config,
device=..., dtype=...)``, loads nothing until :meth:`Generator.load` (or its first ``generate``)
and turns a list of :class:`GenerationRequest` into one PIL image per request, each depending only
on its own request. Its configuration is a frozen dataclass derived from :class:`GeneratorConfig`,
which declares the Stable Diffusion sampling fields every generator shares (a subclass changes
their defaults with ``FIELD_DEFAULTS``); every field says, in its metadata, whether it changes the
pixels (:func:`pixel_field`) or not (:func:`speed_field`), and the fingerprint (part of every
cache key) is built from the fields so marked. :func:`register_generator` maps a config class to
its generator class, so that ``GenerationSpec.make_generator`` needs no change for a new generator.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import json
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

from ..config import ModelConfig
from ..errors import InputError, require

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = [
    "GenerationRequest",
    "GeneratorConfig",
    "Generator",
    "PIXELS",
    "pixel_field",
    "speed_field",
    "field_changes_pixels",
    "generation_fingerprint",
    "dtype_name",
    "resolve_torch_dtype",
    "image_key",
    "check_int",
    "check_choice",
    "check_real",
    "check_requests",
    "register_generator",
    "BUILTIN_GENERATORS",
    "config_class_for",
    "generator_class_for",
    "registered_configs",
    "config_from_dict",
    "load_sd_pipeline",
    "apply_guidance",
    "decode_latents",
]

# Version of the fingerprint layout; bump it when the pixels of existing settings change.
FINGERPRINT_FORMAT = "dalda_aug.generators/2"
# Field-metadata key: True = the field changes generated pixels (enters the fingerprint).
PIXELS = "pixels"
# Field-metadata key: leave the field out of the fingerprint while it has its default value.
OMIT_AT_DEFAULT = "omit_at_default"
# Field-metadata key: a function of the value that enters the fingerprint instead of the value.
DIGEST = "digest"
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


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or :class:`InputError` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InputError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")


def check_real(owner: str, name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InputError(f"{owner}.{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str:
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


def resolve_torch_dtype(dtype: Any) -> "torch.dtype":
    """The torch dtype of :func:`dtype_name` (imports torch)."""
    import torch

    resolved: torch.dtype = getattr(torch, dtype_name(dtype))
    return resolved


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate.

    ``image`` is the real source image (any size, any mode): the IP-Adapter's reference image,
    or the starting point of img2img. ``prompt`` is the text *without* the config's
    ``prompt_prefix`` (the generator adds it). ``scale`` is the generator's per-request weight:
    the IP-Adapter image weight λ >= 0 (0 = text only) for :class:`~dalda_aug.generators.IPAdapterGenerator`,
    the img2img strength in (0, 1] for DA-Fusion, unused by Real Guidance. ``seed`` seeds the
    request's own ``torch.Generator("cpu")`` (0 <= seed < 2**64).
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

    @classmethod
    def from_variant(cls, variant: Any, image: "Image.Image") -> "GenerationRequest":
        """The request of a plan :class:`~dalda_aug.plan.Variant` (its prompt, λ and seed) on its
        loaded source ``image``."""
        return cls(image, variant.prompt, variant.lam, variant.seed)


def check_requests(requests: Any) -> list[GenerationRequest]:
    """The requests as a non-empty list of :class:`GenerationRequest`, or :class:`InputError`."""
    items: list[GenerationRequest] = list(requests)
    if not items:
        raise InputError("generate() needs at least one GenerationRequest, got an empty list")
    for i, request in enumerate(items):
        if not isinstance(request, GenerationRequest):
            raise InputError(f"requests[{i}] must be a GenerationRequest, got {type(request).__name__}")
    return items


def image_key(image: "Image.Image") -> str:
    """Content hash of an image exactly as given (mode, size, palette, pixel bytes)."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    if image.mode in ("P", "PA"):
        h.update(bytes(image.getpalette() or []))
    h.update(image.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# configs: fields that declare whether they change pixels
# --------------------------------------------------------------------------------------------
def pixel_field(default: Any, *, omit_at_default: bool = False, digest: Callable[[Any], Any] | None = None) -> Any:
    """A config field that changes the generated pixels (it enters the fingerprint).

    ``omit_at_default``: leave it out of the fingerprint at its default value (for a field added
    later whose default reproduces the earlier pixels). ``digest``: for a field naming a file or
    folder, the function of its value that enters the fingerprint instead (its content hash).
    """
    metadata: dict[str, Any] = {PIXELS: True, OMIT_AT_DEFAULT: omit_at_default}
    if digest is not None:
        metadata[DIGEST] = digest
    return dataclasses.field(default=default, metadata=metadata)


def speed_field(default: Any) -> Any:
    """A config field that does not change pixels beyond floating-point rounding (a speed-up)."""
    return dataclasses.field(default=default, metadata={PIXELS: False})


def field_changes_pixels(field: "dataclasses.Field[Any]") -> bool:
    """The field's declaration; :class:`TypeError` for a field that declares nothing."""
    if PIXELS not in field.metadata:
        raise TypeError(
            f"config field {field.name!r} does not declare whether it changes pixels: "
            "define it with pixel_field(...) or speed_field(...)"
        )
    return bool(field.metadata[PIXELS])


C = TypeVar("C", bound="GeneratorConfig")


@dataclass(frozen=True)
class GeneratorConfig:
    """Base of every generator's settings: the sampling fields all Stable Diffusion generators share.

    Subclasses are frozen dataclasses; every field is declared with :func:`pixel_field` or
    :func:`speed_field`. The shared fields below are declared here only: a subclass gives them
    other defaults with ``FIELD_DEFAULTS`` (the fields keep their place, comment and metadata).
    ``METHOD`` names the generator in fingerprints and files;
    :meth:`model_fields` names the :class:`~dalda_aug.config.ModelConfig` fields it loads
    (only those enter the fingerprint); :meth:`fingerprint_extras` adds derived constants.
    """

    METHOD: ClassVar[str] = "base"
    SCHEDULERS: ClassVar[tuple[str, ...]] = ("ddim", "dpmsolver++")
    # A subclass's defaults for fields declared by a base class: ``{"num_inference_steps": 50}``
    # in the subclass's body redeclares that field with the base's type and metadata
    # (see __init_subclass__). Read from the class's own body only.
    FIELD_DEFAULTS: ClassVar[Mapping[str, Any]] = {}

    # Denoising steps (for img2img: of the full schedule, of which it runs the last
    # ``strength`` share).
    num_inference_steps: int = pixel_field(30)
    # Classifier-free guidance weight; guidance and the negative prompt are used only when > 1,
    # as in diffusers.
    guidance_scale: float = pixel_field(7.5)
    # Output size (for img2img, the working canvas the real image is resized to) in pixels;
    # multiples of 8.
    height: int = pixel_field(512)
    width: int = pixel_field(512)
    # Prepended to every request's prompt.
    prompt_prefix: str = pixel_field("")
    # Negative prompt of classifier-free guidance ("" = none).
    negative_prompt: str = pixel_field("")
    # Sampler: one of the class's SCHEDULERS: "ddim" (DALDA's; eta = 0,
    # :func:`~dalda_aug.generators.loading.ddim_scheduler_config`), "dpmsolver++" (DPM-Solver++ 2M
    # built from the same betas, commonly run with ~20 steps; other pixels than DDIM's) or, for
    # img2img, "pipeline" (the base model's own scheduler as from_pretrained loads it).
    scheduler: str = pixel_field("ddim")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Redeclare the fields named in the subclass's own ``FIELD_DEFAULTS`` with those defaults.

        Runs before ``@dataclass`` processes the subclass: each such field gets an annotation and
        a ``dataclasses.field`` with the inherited type and metadata (so it keeps its place in the
        field order and its pixel declaration) and the new default.
        """
        super().__init_subclass__(**kwargs)
        defaults = cls.__dict__.get("FIELD_DEFAULTS")
        if not defaults:
            return
        inherited = {f.name: f for f in dataclasses.fields(cls)}  # the base's: cls is not a dataclass yet
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, default in defaults.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}.FIELD_DEFAULTS names {name!r}, which no base class declares")
            if name in annotations:
                raise TypeError(f"{cls.__name__} declares {name!r} and gives it a default in FIELD_DEFAULTS")
            annotations[name] = inherited[name].type
            setattr(cls, name, dataclasses.field(default=default, metadata=inherited[name].metadata))
        cls.__annotations__ = annotations

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            field_changes_pixels(f)  # every field declares itself
        object.__setattr__(self, "num_inference_steps", check_int(owner, "num_inference_steps",
                                                                  self.num_inference_steps, 1))
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(g) or g < 0:
            raise InputError(f"{owner}.guidance_scale must be a finite number >= 0, got {g!r}")
        object.__setattr__(self, "guidance_scale", float(g))
        for name in ("height", "width"):
            value = check_int(owner, name, getattr(self, name), 8)
            if value % 8:
                raise InputError(f"{owner}.{name} must be a multiple of 8, got {value}")
            object.__setattr__(self, name, value)  # plain ints: JSON-able, stable fingerprints
        for name in ("prompt_prefix", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{owner}.{name} must be a string, got {getattr(self, name)!r}")
        check_choice(owner, "scheduler", self.scheduler, self.SCHEDULERS)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        values = dict(data)
        for name, value in values.items():
            if isinstance(value, list):  # JSON has no tuples
                values[name] = tuple(value)
        return cls(**values)

    # -- fingerprint -----------------------------------------------------------------------
    @classmethod
    def pixel_fields(cls) -> tuple[str, ...]:
        """Names of the fields declared with :func:`pixel_field`."""
        return tuple(f.name for f in dataclasses.fields(cls) if field_changes_pixels(f))

    def model_fields(self) -> tuple[str, ...]:
        """The :class:`~dalda_aug.config.ModelConfig` fields this config's generator loads."""
        return ("base", "base_revision")

    def fingerprint_extras(self) -> dict[str, Any]:
        """Constants implied by the fields (e.g. the scheduler's betas), hashed with them."""
        return {}

    def pixel_dict(self) -> dict[str, Any]:
        """The pixel fields' values (those omitted at their default left out) plus :meth:`fingerprint_extras`."""
        values: dict[str, Any] = {"method": self.METHOD}
        for f in dataclasses.fields(self):
            if not field_changes_pixels(f):
                continue
            value = getattr(self, f.name)
            if f.metadata.get(OMIT_AT_DEFAULT) and value == f.default:
                continue
            if DIGEST in f.metadata:
                value = f.metadata[DIGEST](value)
            values[f.name] = list(value) if isinstance(value, tuple) else value
        values.update(self.fingerprint_extras())
        return values

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`pixel_dict` (a pure function of the field values)."""
        blob = json.dumps({"format": FINGERPRINT_FORMAT, **self.pixel_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def generation_fingerprint(models: ModelConfig, config: GeneratorConfig, dtype: Any = None) -> str:
    """Hash of everything that changes the generated pixels, for cache keys.

    Covers the model locations and revisions the config's generator loads
    (:meth:`GeneratorConfig.model_fields`), the config's pixel fields and the dtype; not the
    CLIPScore model, the device or the speed-ups that compute the same function (batch size,
    attention kernel, channels-last, compile). A pure function of its arguments.
    """
    if not isinstance(config, GeneratorConfig):
        raise InputError(f"config must be a generator config (GeneratorConfig), got {type(config).__name__}")
    all_models = models.to_dict()
    payload = {
        "format": FINGERPRINT_FORMAT,
        "models": {name: all_models[name] for name in config.model_fields()},
        "generation": config.pixel_dict(),
        "dtype": dtype_name(dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------
G = TypeVar("G", bound="Generator")


class Generator(abc.ABC):
    """Base of every generator: arguments, state, ``repr`` and fingerprint; subclasses load and generate.

    Args:
        models: where the generator's models live (:class:`~dalda_aug.config.ModelConfig`).
        config: a ``config_class`` instance (``config_class()`` when ``None``).
        device: torch device ("cpu" by default, "cuda", "cuda:1", ...).
        dtype: ``None``/"float32" (default), "bfloat16" or "float16", or the torch dtype.

    The constructor loads nothing; :meth:`load` (called by the first :meth:`generate`) does and
    keeps the diffusers pipeline in ``_pipe``.
    """

    # The config class this generator takes.
    config_class: ClassVar[type[GeneratorConfig]] = GeneratorConfig
    # True: instances of config_class's subclasses are accepted too; False: exactly config_class.
    accepts_config_subclasses: ClassVar[bool] = False
    # The ModelConfig fields that repr shows.
    repr_models: ClassVar[tuple[str, ...]] = ("base",)

    models: ModelConfig
    config: GeneratorConfig
    device: "torch.device"
    dtype: "torch.dtype"

    def __init__(self, models: ModelConfig, config: GeneratorConfig | None = None, device: Any = "cpu",
                 dtype: Any = None) -> None:
        torch = require("torch", "generate")
        if not isinstance(models, ModelConfig):
            raise InputError(f"models must be a ModelConfig, got {type(models).__name__}")
        config = config if config is not None else self.config_class()
        wanted = self.config_class
        if not (isinstance(config, wanted) if self.accepts_config_subclasses else type(config) is wanted):
            raise InputError(f"config must be a {wanted.__name__}, got {type(config).__name__}")
        self._check_arguments()
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"invalid device {device!r}: {exc}") from None
        self.models = models
        self.config = config
        self.dtype = resolve_torch_dtype(dtype)
        # The diffusers pipeline once loaded (diffusers objects are untyped).
        self._pipe: Any = None

    def _check_arguments(self) -> None:
        """Hook: check a subclass's own constructor arguments (after models and config, before device)."""

    def __repr__(self) -> str:
        state = "loaded" if self._pipe is not None else "not loaded"
        models = ", ".join(f"{name}={getattr(self.models, name)!r}" for name in self.repr_models)
        return (f"{type(self).__name__}({models}, device={str(self.device)!r}, dtype={dtype_name(self.dtype)!r}, "
                f"{state})")

    @property
    def is_loaded(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self) -> Any:
        """The underlying diffusers pipeline (loads it)."""
        self.load()
        return self._pipe

    def fingerprint(self) -> str:
        """:func:`generation_fingerprint` of this generator's models, config and dtype."""
        return generation_fingerprint(self.models, self.config, self.dtype)

    @abc.abstractmethod
    def load(self: G) -> G:
        """Load the models (once); returns ``self``."""

    @abc.abstractmethod
    def generate(self, requests: Iterable[GenerationRequest], batch_size: int | None = None,
                 progress: bool = False) -> list["Image.Image"]:
        """One PIL image per request, in order; each depends only on its own request."""


def load_sd_pipeline(pipeline_class: Any, models: ModelConfig, dtype: Any, what: str, **components: Any) -> Any:
    """``pipeline_class.from_pretrained`` of ``models.base`` (its revision, no safety checker, ``dtype``,
    ``components`` replacing the folder's), through :func:`~dalda_aug.generators.loading.call_loader`;
    ``what`` names the pipeline in errors."""
    from ..locations import describe_location, parse_location
    from .loading import call_loader

    return call_loader(
        what,
        f"a diffusers StableDiffusionPipeline (model_index.json) in "
        f"{describe_location(models.base, None, models.base_revision)}",
        pipeline_class.from_pretrained,
        parse_location(models.base).value,
        revision=models.base_revision,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=dtype,
        **components,
    )


# Steps of the Stable Diffusion generators' own denoising loops (diffusers' pipeline __call__s).
def apply_guidance(noise_pred: "torch.Tensor", guidance_scale: float) -> "torch.Tensor":
    """Classifier-free guidance of a UNet output whose first half is the unconditional one."""
    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.__call__
    # (the "perform guidance" step).
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def decode_latents(pipe: Any, latents: "torch.Tensor") -> list["Image.Image"]:
    """The pipeline's VAE decode and post-processing of ``latents`` to PIL images."""
    # Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.__call__
    # (output_type="pil", no safety checker: every image denormalised).
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil",
                                                                 do_denormalize=[True] * len(latents))
    return images


# --------------------------------------------------------------------------------------------
# registry: config class -> generator class
# --------------------------------------------------------------------------------------------
# config class -> "module:Class" of its generator (imported on first use: heavy modules stay unloaded)
_REGISTRY: dict[type[GeneratorConfig], str] = {}

#: The built-in generators, in order: ``METHOD -> ("module:ConfigClass", "module:GeneratorClass")``,
#: each module imported when its method is first asked for; others join by :func:`register_generator`.
BUILTIN_GENERATORS: dict[str, tuple[str, str]] = {
    "ip_adapter": (f"{__package__}.ip_adapter:IPAdapterConfig", f"{__package__}.ip_adapter:IPAdapterGenerator"),
    "real_guidance": (f"{__package__}.real_guidance:RealGuidanceConfig",
                      f"{__package__}.real_guidance:RealGuidanceGenerator"),
    "da_fusion": (f"{__package__}.da_fusion:DAFusionConfig", f"{__package__}.da_fusion:DAFusionGenerator"),
}


def register_generator(config_class: type, generator: str) -> None:
    """Declare that ``config_class`` (exactly) is generated by ``generator`` ("package.module:Class").

    ``config_class`` is a :class:`GeneratorConfig` subclass whose ``METHOD`` names the method
    (in fingerprints, plan files, :func:`config_from_dict`); ``generator`` is imported on first
    use, so registering costs nothing. A ``METHOD`` another class holds (a built-in one
    included) is an :class:`InputError`: two classes under one name would make recorded configs
    ambiguous. Registering the same class again replaces its generator."""
    if not (isinstance(config_class, type) and issubclass(config_class, GeneratorConfig)):
        raise TypeError(f"{config_class!r} is not a GeneratorConfig subclass")
    if ":" not in generator:
        raise ValueError(f"generator must be 'package.module:Class', got {generator!r}")
    method = config_class.METHOD
    builtin = BUILTIN_GENERATORS.get(method)
    if builtin is not None and builtin[0] != f"{config_class.__module__}:{config_class.__qualname__}":
        raise InputError(f"generation method {method!r} is a built-in one ({builtin[0]}); give "
                         f"{config_class.__qualname__} another METHOD")
    taken = next((cls for cls in _REGISTRY if cls.METHOD == method and cls is not config_class), None)
    if taken is not None:
        raise InputError(f"generation method {method!r} is registered already for {taken.__module__}."
                         f"{taken.__qualname__}")
    _REGISTRY[config_class] = generator


def _import_target(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _load_builtins(method: str | None = None) -> None:
    """Register the built-in generators (``method``: only that one) not registered yet."""
    for name, (config_target, generator) in BUILTIN_GENERATORS.items():
        if method in (None, name) and not any(cls.METHOD == name for cls in _REGISTRY):
            register_generator(_import_target(config_target), generator)


def registered_configs() -> dict[str, type[GeneratorConfig]]:
    """``{METHOD: config class}`` of every registered generator: the built-ins
    (:data:`BUILTIN_GENERATORS`, in that order), then those :func:`register_generator` added."""
    _load_builtins()
    order = list(BUILTIN_GENERATORS)
    classes = sorted(_REGISTRY, key=lambda cls: order.index(cls.METHOD) if cls.METHOD in order else len(order))
    return {cls.METHOD: cls for cls in classes}


def config_class_for(method: str) -> type[GeneratorConfig]:
    """The config class registered under ``method`` (its ``METHOD``), importing only that
    built-in; an :class:`InputError` naming the known methods for any other name."""
    _load_builtins(method)
    for cls in _REGISTRY:
        if cls.METHOD == method:
            return cls
    raise InputError(f"unknown generation method {method!r}; known: {sorted(registered_configs())}")


def generator_class_for(config: GeneratorConfig) -> type:
    """The generator class registered for ``type(config)`` (exact type: no silent fallback)."""
    _load_builtins(str(getattr(type(config), "METHOD", "")))
    target = _REGISTRY.get(type(config))
    if target is None:
        _load_builtins()
        known = sorted(cls.__name__ for cls in _REGISTRY)
        raise InputError(
            f"no generator is registered for config class {type(config).__name__}; known: {known} "
            "(register one with dalda_aug.generators.register_generator)"
        )
    cls: type = _import_target(target)
    return cls


def config_from_dict(method: str, data: Mapping[str, Any]) -> GeneratorConfig:
    """Rebuild a config from its ``METHOD`` and :meth:`GeneratorConfig.to_dict`."""
    config: GeneratorConfig = config_class_for(method).from_dict(data)
    return config
