"""What fixes a cached image's pixels: :class:`GenerationSpec` and the entry keys.

The bottom floor of :mod:`dalda_aug.cache`: nothing here imports another cache module.

* :func:`variant_key` hashes a generation fingerprint and a plan variant into an entry's key
  (:data:`KEY_FORMAT` is part of every key: changing it would change them all).
* :func:`plan_fingerprint` names a plan in the spec records (:mod:`~dalda_aug.cache.specs`).
* :meth:`GenerationSpec.to_dict` and :meth:`GenerationSpec.from_dict` are what a spec record
  holds: its config class is named, and looked up in the generator registry, never imported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .._lazy import module_getattr
from ..config import ModelConfig
from ..errors import DaldaError, InputError

__all__ = [
    "KEY_FORMAT",
    "GenerationSpec",
    "GeneratorFactory",
    "plan_fingerprint",
    "variant_key",
    "variant_keys",
    "variant_digests",
    "key_bytes",
    "digest_hex",
    "is_entry_key",
]

log = logging.getLogger("dalda_aug.cache")  # the cache's one logger, whichever of its modules speaks

KEY_FORMAT = "dalda_aug.cache/1"


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that fixes a generated image's pixels apart from the variant itself.

    ``models`` and ``config`` (a :class:`~dalda_aug.generators.ip_adapter.IPAdapterConfig`, the paper's
    settings when ``None``) and ``dtype`` ("float32", "bfloat16", "float16" or a torch dtype).
    :meth:`key` gives the cache key of a plan variant; :meth:`make_generator` builds the
    generator that produces exactly those images. Small and picklable.
    """

    models: ModelConfig
    config: Any = None
    dtype: Any = "float32"

    def __post_init__(self) -> None:
        from ..generators import IPAdapterConfig, GeneratorConfig, dtype_name as _dtype_name

        if not isinstance(self.models, ModelConfig):
            raise InputError(f"GenerationSpec.models must be a ModelConfig, got {type(self.models).__name__}")
        config = self.config if self.config is not None else IPAdapterConfig()
        if not isinstance(config, GeneratorConfig):
            raise InputError(f"GenerationSpec.config must be a generator config (IPAdapterConfig, "
                             f"RealGuidanceConfig, DAFusionConfig, ...), got {type(config).__name__}")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))

    @classmethod
    def of(cls, generator: Any) -> "GenerationSpec":
        """The spec of an :class:`~dalda_aug.generators.ip_adapter.IPAdapterGenerator`."""
        return cls(generator.models, generator.config, generator.dtype)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`~dalda_aug.generators.base.generation_fingerprint` of models, config and dtype."""
        from ..generators.base import generation_fingerprint

        return generation_fingerprint(self.models, self.config, self.dtype)

    def key(self, variant: Any) -> str:
        """The cache key (64 hex characters) of a :class:`~dalda_aug.plan.Variant`."""
        return variant_key(self.fingerprint, variant.prompt, variant.lam, variant.seed, variant.source_sha256)

    def make_generator(self, device: Any = "cpu") -> Any:
        """A (not yet loaded) generator for this spec: the one registered for the config's class
        (:func:`~dalda_aug.generators.register_generator`; e.g. ``IPAdapterConfig`` ->
        :class:`~dalda_aug.generators.ip_adapter.IPAdapterGenerator`)."""
        from ..generators import generator_class_for

        cls = generator_class_for(self.config)
        return cls(self.models, self.config, device=device, dtype=self.dtype)

    def describe(self) -> str:
        c = self.config
        return (f"{c.width}x{c.height}, {c.num_inference_steps} {c.scheduler} steps, CFG {c.guidance_scale:g}, "
                f"{self.dtype}, fingerprint {self.fingerprint}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (models, config class and fields, dtype, fingerprint)."""
        import dataclasses

        config_cls = type(self.config)
        return {
            "fingerprint": self.fingerprint,
            "models": self.models.to_dict(),
            "config_class": f"{config_cls.__module__}:{config_cls.__qualname__}",
            "config": dataclasses.asdict(self.config),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> "GenerationSpec":
        """Rebuild a spec written by :meth:`to_dict` (``where`` names the source in errors).

        The record names its config class; it is looked up among the registered generator
        configs (:func:`~dalda_aug.generators.register_generator`), never imported: a name that
        is not registered is an :class:`~dalda_aug.errors.InputError` naming ``where``.
        """
        import dataclasses

        try:
            if not isinstance(data, dict):
                raise InputError(f"a generation spec is a JSON object, got {type(data).__name__}")
            config_cls = _registered_config_class(data.get("config_class", "dalda_aug.generators.ip_adapter:IPAdapterConfig"))
            known = {f.name for f in dataclasses.fields(config_cls)}
            fields = data.get("config") or {}
            if not isinstance(fields, dict):
                raise InputError(f"config must be a JSON object, got {type(fields).__name__}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
            config = config_cls(**values)
            return cls(ModelConfig.from_dict(data["models"]), config, data.get("dtype", "float32"))
        except DaldaError as exc:
            raise InputError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where}: not a readable generation spec ({type(exc).__name__}: {exc})") from None


# A spec record may name a registered config class by the package's top level, by its room or by a
# path that moved (``dalda_aug.generation:GenerationConfig``; the map of moved paths, _lazy.MOVED).
_CONFIG_ROOMS = ("dalda_aug", "dalda_aug.generators")


def _config_path(name: str) -> tuple[str, str]:
    """``module:Qualname`` of a record, with a moved path read through the map of moved paths."""
    from .._lazy import MOVED

    module, _, qualname = name.partition(":")
    moved = MOVED.get(f"{module}.{qualname}")
    if moved is not None:
        module, _, qualname = moved.rpartition(".")
        return module, qualname
    return MOVED.get(module, module), qualname


def _registered_config_class(name: Any) -> Any:
    """The registered generator config class a spec record's ``config_class`` names
    (``"module:Qualname"``), found in the generator registry; nothing is imported by name.
    :class:`~dalda_aug.errors.InputError` for any other name."""
    from ..generators import registered_configs

    configs = list(registered_configs().values())
    if isinstance(name, str):
        module, qualname = _config_path(name)
        for config_cls in configs:
            if qualname == config_cls.__qualname__ and (module == config_cls.__module__ or module in _CONFIG_ROOMS):
                return config_cls
    known = sorted(f"{c.__module__}:{c.__qualname__}" for c in configs)
    raise InputError(f"config class {str(name)[:200]!r} is not a registered generator config (known: {known}); "
                     "nothing is imported by a name a record gives")


def plan_fingerprint(plan: Any) -> str:
    """A short hash of what a plan asks to generate (each variant's source hash, prompt, λ,
    seed), independent of generation settings: names the plan in a cache's spec records."""
    rows = sorted(json.dumps([v.source_sha256, v.prompt, float(v.lam), int(v.seed)], ensure_ascii=False)
                  for v in plan)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]


def variant_key(fingerprint: str, prompt: str, lam: float, seed: int, source_sha256: str) -> str:
    """SHA-256 key of one image: generation fingerprint + prompt + λ + seed + source hash."""
    blob = json.dumps([KEY_FORMAT, fingerprint, prompt, float(lam), int(seed), source_sha256], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def variant_keys(fingerprint: str, prompts: Sequence[str], prompt_codes: Sequence[int], lams: Sequence[float],
                 seeds: Sequence[int], shas: Sequence[str], sha_codes: Sequence[int]) -> list[str]:
    """:func:`variant_key` of many variants at once, for counting a plan's keys in a cache.

    Variant ``i`` has prompt ``prompts[prompt_codes[i]]``, λ ``lams[i]``, seed ``seeds[i]`` and
    source hash ``shas[sha_codes[i]]``. The same bytes are hashed as :func:`variant_key` hashes
    (``json.dumps`` of the list, default separators), but each distinct prompt's prefix is
    hashed once and copied, and each distinct string JSON-encoded once: about a microsecond a
    variant instead of five."""
    return [h.hexdigest() for h in _key_hashes(fingerprint, prompts, prompt_codes, lams, seeds, shas, sha_codes)]


def variant_digests(fingerprint: str, prompts: Sequence[str], prompt_codes: Sequence[int], lams: Sequence[float],
                    seeds: Sequence[int], shas: Sequence[str], sha_codes: Sequence[int]) -> Any:
    """:func:`variant_keys` as raw SHA-256 digests, a NumPy ``S32`` array (32 bytes a key instead of
    a 64-character string: sorting it sorts the keys, as hex preserves byte order)."""
    import numpy as np

    raw = b"".join(h.digest() for h in _key_hashes(fingerprint, prompts, prompt_codes, lams, seeds, shas, sha_codes))
    return np.frombuffer(raw, dtype="S32").copy()


def digest_hex(digests: Any) -> list[str]:
    """The 64-character keys of an ``S32`` array of digests (:func:`variant_digests`)."""
    import numpy as np

    rows = np.ascontiguousarray(digests).view(np.uint8).reshape(-1, 32)
    return [bytes(row).hex() for row in rows]


_LOWER_HEX = re.compile(r"[0-9a-f]{64}")


def key_bytes(key: str) -> bytes:
    """32 bytes standing for an entry key in NumPy ``S32`` arrays: the key's own bytes when it is a
    lowercase SHA-256 hex digest (every key this library writes: :func:`variant_digests` gives the
    same), else a hash of its text (a shard from elsewhere may hold any 64 characters), so
    distinct keys stay distinct."""
    if _LOWER_HEX.fullmatch(key):
        return bytes.fromhex(key)
    return hashlib.sha256(b"\0other key\0" + key.encode("utf-8", "surrogatepass")).digest()


def _key_hashes(fingerprint: str, prompts: Sequence[str], prompt_codes: Sequence[int], lams: Sequence[float],
                seeds: Sequence[int], shas: Sequence[str], sha_codes: Sequence[int]) -> Iterator[Any]:
    head = json.dumps([KEY_FORMAT, fingerprint], ensure_ascii=False)[:-1] + ", "
    prefixes = [hashlib.sha256((head + json.dumps(p, ensure_ascii=False) + ", ").encode("utf-8")) for p in prompts]
    tails = [(", " + json.dumps(h, ensure_ascii=False) + "]").encode("utf-8") for h in shas]
    for p, lam, seed, h in zip(prompt_codes, lams, seeds, sha_codes):
        lam = float(lam)
        text = repr(lam) if math.isfinite(lam) else json.dumps(lam)
        digest = prefixes[p].copy()
        digest.update(f"{text}, {int(seed)}".encode("ascii") + tails[h])
        yield digest


def is_entry_key(key: Any) -> bool:
    """Whether ``key`` is an entry key: 64 lowercase hex digits (a SHA-256, as :func:`variant_key`
    gives), not a counter or a lease. A shard from elsewhere may hold any other key; it is never
    read as an entry (it would name files in an export, e.g. ``../../x``), and never written."""
    return isinstance(key, str) and _LOWER_HEX.fullmatch(key) is not None


class GeneratorFactory:
    """A picklable zero-argument callable that builds the generator of a spec on a device.

    Give it to :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` (``generator=``) so each
    DataLoader worker builds its own generator on first need instead of receiving a model.
    """

    def __init__(self, spec: GenerationSpec, device: Any = "cpu"):
        if not isinstance(spec, GenerationSpec):
            raise InputError(f"spec must be a GenerationSpec, got {type(spec).__name__}")
        self.spec = spec
        self.device = str(device)

    def __call__(self) -> Any:
        return self.spec.make_generator(self.device)

    def __repr__(self) -> str:
        return f"GeneratorFactory(device={self.device!r}, fingerprint={self.spec.fingerprint!r})"


# the spec records moved to specs.py; their old paths here resolve through the map of moved paths
__getattr__ = module_getattr(__name__)
