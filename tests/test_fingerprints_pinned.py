"""Pinned cache keys: the fingerprints and variant keys of every generator, as the code gave them
before the generator clean-up of issue 21 (which must change no behaviour).

Every value below was printed by the code *before* that refactor and is hard-coded on purpose: a
refactor that changes one of them changes the cache key of existing images (their cache entries
would silently become misses). Change a value here only together with a deliberate fingerprint
change (``FINGERPRINT_FORMAT``), and say so in the README.

The models are fixed hub-id-like strings (the fingerprint hashes model locations as written, so
paths under a temporary folder would not be stable); the DA-Fusion token folder is written by the
test, and only its manifest's content (not its path) enters the fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from dalda_aug.cache import GenerationSpec
from dalda_aug.config import ModelConfig
from dalda_aug.generators import (
    DAFusionConfig,
    IPAdapterConfig,
    GeneratorConfig,
    Img2ImgConfig,
    RealGuidanceConfig,
    field_changes_pixels,
)
from dalda_aug.generators.base import DIGEST, OMIT_AT_DEFAULT
from dalda_aug.generators.textual_inversion import MANIFEST, TOKENS_FORMAT
from dalda_aug.plan import Variant

MODELS = ModelConfig(
    base="tiny/sd-pipe",
    vae="tiny/vae",
    ip_adapter="tiny/ip-adapter",
    clip_model="tiny/clip.json",
    clip_pretrained="tiny/clip.pt",
)

VARIANT = Variant(
    source="cat/0.png", label=0, class_name="cat", score=0.3, variant=1,
    prompt="a photo of a cat on a sofa", lam=0.35, seed=123456789, source_sha256="c" * 64,
)

# name -> (dtype -> (GenerationSpec.fingerprint, GenerationSpec.key(VARIANT)))
PINNED: dict[str, dict[str, tuple[str, str]]] = {
    "ip_adapter": {
        "float32": ("e048db714a4a0bc6", "d13ef89744882e985e368025576e1b9a23658dde498e02f10ea16c3d2fed4675"),
        "bfloat16": ("e4bd93ed4654c8aa", "e39cc4933c302e2e64cab3c936a0cdf70fa41ee4e16bd3c2810c9a2a221b172f"),
    },
    "ip_adapter_cached": {
        "float32": ("fd7dd5e6cc52334f", "ebde6f39a905a791f1d0a55e0a32a3b85e6f42748c472f609223582a0cb1b1fe"),
        "bfloat16": ("162e7acb0b8bf25e", "ddffd29497a24dafdef619f03b3638c919a43d5a73f8ee91070f88467cc5628e"),
    },
    "real_guidance": {
        "float32": ("fad754d256f29bef", "7d81e0547d6f8fac09bc3402bcc2d1c8cffb48adc570becc13cda5c763dad8b4"),
        "bfloat16": ("c330eed3968dbb47", "ddc48fa471a1fb83eae5b208ecf46d4e56d973510a75b4324f2b200ad37cb9c9"),
    },
    "real_guidance_dalda": {
        "float32": ("c2b2a7132c71fe98", "b2434d0be74818f2bd205b12279691af12f71c8b5b92630306711e91ef62c676"),
        "bfloat16": ("0dce5fff8add1ed7", "3f604997fcc1cb74ca0f957086630e991dd18376e8de86243fa653eccdf27f5a"),
    },
    "da_fusion_no_tokens": {
        "float32": ("b5669c23e3458d14", "f3b8cb7c4fb30a9a0d30e5bc51f6fa4a4f7dd504c379ef2fcbbac4067592cffd"),
        "bfloat16": ("26ccbb69782889e4", "4ae6087b4ae283fd31b43abdc47a73cac048482b0cfbfe3cc05b642721af9c59"),
    },
    "da_fusion": {
        "float32": ("b70bf28ceed27fd2", "018e39fcdcf82f56e1604c2dcdd38bee98b73a89c2a6f4fca63a072021d3d29b"),
        "bfloat16": ("a6247b060541e428", "b8b0ee7908d1899e0bc7147de4f397f5eb01f3794987caa6ccd95b696953ba50"),
    },
}

# name -> (config class recorded by GenerationSpec.to_dict, GeneratorConfig.fingerprint())
PINNED_CONFIG: dict[str, tuple[str, str]] = {
    "ip_adapter": ("dalda_aug.generators.ip_adapter:IPAdapterConfig", "c2153e95dd0d618c"),
    "ip_adapter_cached": ("dalda_aug.generators.ip_adapter:IPAdapterConfig", "da5d69f37eb8bec6"),
    "real_guidance": ("dalda_aug.generators.real_guidance:RealGuidanceConfig", "e22f1fb12d4eb638"),
    "real_guidance_dalda": ("dalda_aug.generators.real_guidance:RealGuidanceConfig", "ccae403179ced491"),
    "da_fusion_no_tokens": ("dalda_aug.generators.da_fusion:DAFusionConfig", "3e9df02edbb56fc4"),
    "da_fusion": ("dalda_aug.generators.da_fusion:DAFusionConfig", "c2e2b05b971e152e"),
}

_SHARED = [("num_inference_steps", True, False, False), ("guidance_scale", True, False, False),
           ("height", True, False, False), ("width", True, False, False), ("prompt_prefix", True, False, False),
           ("negative_prompt", True, False, False), ("scheduler", True, False, False)]
_IMG2IMG = _SHARED + [("vae", True, False, False), ("output_size", True, False, False),
                      ("resample", True, False, False)]
# class -> [(field, changes pixels, omitted at default, has a digest)], in field order
PINNED_FIELDS: dict[type, list[tuple[str, bool, bool, bool]]] = {
    GeneratorConfig: _SHARED,
    IPAdapterConfig: _SHARED + [
        ("tiny_vae", True, False, False), ("cache_interval", True, True, False), ("cache_branch", True, True, False),
        ("attention", False, False, False), ("channels_last", False, False, False), ("compile", False, False, False),
        ("compile_mode", False, False, False),
    ],
    Img2ImgConfig: _IMG2IMG,
    RealGuidanceConfig: _IMG2IMG + [("strength", True, False, False)],
    DAFusionConfig: _IMG2IMG + [("tokens", True, False, True)],
}

_IMG2IMG_REPR = ("num_inference_steps=50, guidance_scale=7.5, height=512, width=512, prompt_prefix='', "
                 "negative_prompt='', scheduler='pipeline', vae='base', output_size='source', resample='bilinear'")
PINNED_REPR: dict[type, str] = {
    GeneratorConfig: "GeneratorConfig(num_inference_steps=30, guidance_scale=7.5, height=512, width=512, "
                     "prompt_prefix='', negative_prompt='', scheduler='ddim')",
    IPAdapterConfig: "IPAdapterConfig(num_inference_steps=30, guidance_scale=7.5, height=512, width=512, "
                      "prompt_prefix='best quality, high quality, ', negative_prompt='monochrome, lowres, bad "
                      "anatomy, worst quality, low quality', scheduler='ddim', tiny_vae=None, cache_interval=1, "
                      "cache_branch=0, attention='sdpa', channels_last=False, compile=False, compile_mode='default')",
    Img2ImgConfig: f"Img2ImgConfig({_IMG2IMG_REPR})",
    RealGuidanceConfig: f"RealGuidanceConfig({_IMG2IMG_REPR}, strength=0.5)",
    DAFusionConfig: f"DAFusionConfig({_IMG2IMG_REPR}, tokens=None)",
}


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token folder whose manifest has fixed content (only the manifest enters the fingerprint)."""
    folder = tmp_path_factory.mktemp("tokens")
    classes = {
        "cat": {"token": "<cat>", "file": "cat.safetensors", "sha256": "a" * 64},
        "dog": {"token": "<dog>", "file": "dog.safetensors", "sha256": "b" * 64},
    }
    (folder / MANIFEST).write_text(json.dumps({"format": TOKENS_FORMAT, "classes": classes}))
    return folder


def _configs(token_folder: Path) -> dict[str, Any]:
    return {
        "ip_adapter": IPAdapterConfig(),
        "ip_adapter_cached": IPAdapterConfig(cache_interval=3, cache_branch=1, scheduler="dpmsolver++",
                                              num_inference_steps=20),
        "real_guidance": RealGuidanceConfig(),
        "real_guidance_dalda": RealGuidanceConfig.with_dalda_sampler(),
        "da_fusion_no_tokens": DAFusionConfig(),
        "da_fusion": DAFusionConfig(tokens=str(token_folder)),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(PINNED))
def test_spec_fingerprint_and_key_are_pinned(name: str, dtype: str, token_folder: Path) -> None:
    spec = GenerationSpec(MODELS, _configs(token_folder)[name], dtype)
    fingerprint, key = PINNED[name][dtype]
    assert spec.fingerprint == fingerprint
    assert spec.key(VARIANT) == key


@pytest.mark.parametrize("name", sorted(PINNED_CONFIG))
def test_config_fingerprint_and_recorded_class_are_pinned(name: str, token_folder: Path) -> None:
    config = _configs(token_folder)[name]
    config_class, fingerprint = PINNED_CONFIG[name]
    assert GenerationSpec(MODELS, config).to_dict()["config_class"] == config_class
    assert config.fingerprint() == fingerprint


def test_default_spec_is_the_ip_adapter_one() -> None:
    assert GenerationSpec(MODELS).fingerprint == PINNED["ip_adapter"]["float32"][0]


@pytest.mark.parametrize("cls", list(PINNED_FIELDS), ids=lambda c: c.__name__)
def test_config_fields_order_and_declarations_are_pinned(cls: type) -> None:
    declared = [(f.name, field_changes_pixels(f), bool(f.metadata.get(OMIT_AT_DEFAULT)), DIGEST in f.metadata)
                for f in dataclasses.fields(cls)]
    assert declared == PINNED_FIELDS[cls]


@pytest.mark.parametrize("cls", list(PINNED_REPR), ids=lambda c: c.__name__)
def test_default_config_repr_and_to_dict_are_pinned(cls: type) -> None:
    config = cls()
    assert repr(config) == PINNED_REPR[cls]
    assert list(config.to_dict()) == [name for name, *_ in PINNED_FIELDS[cls]]
    assert cls.from_dict(config.to_dict()) == config


def test_generator_fingerprints_match_their_spec(token_folder: Path) -> None:
    pytest.importorskip("torch")
    from dalda_aug.generators import DAFusionGenerator, IPAdapterGenerator, RealGuidanceGenerator

    configs = _configs(token_folder)
    for name, cls in (("ip_adapter", IPAdapterGenerator), ("real_guidance", RealGuidanceGenerator),
                      ("da_fusion", DAFusionGenerator)):
        for dtype in ("float32", "bfloat16"):
            generator = cls(MODELS, configs[name], dtype=dtype)
            assert generator.fingerprint() == PINNED[name][dtype][0]
            assert not generator.is_loaded


def test_generator_reprs_are_pinned(token_folder: Path) -> None:
    pytest.importorskip("torch")
    from dalda_aug.generators import DAFusionGenerator, IPAdapterGenerator, RealGuidanceGenerator

    configs = _configs(token_folder)
    assert repr(IPAdapterGenerator(MODELS, dtype="bf16")) == (
        "IPAdapterGenerator(base='tiny/sd-pipe', ip_adapter='tiny/ip-adapter', device='cpu', dtype='bfloat16', "
        "not loaded)")
    assert repr(RealGuidanceGenerator(MODELS)) == (
        "RealGuidanceGenerator(base='tiny/sd-pipe', device='cpu', dtype='float32', not loaded)")
    assert repr(DAFusionGenerator(MODELS, configs["da_fusion"], dtype="float16")) == (
        "DAFusionGenerator(base='tiny/sd-pipe', device='cpu', dtype='float16', not loaded)")


def test_field_defaults_redeclare_only_inherited_fields() -> None:
    """``FIELD_DEFAULTS`` (how the configs above change the shared fields' defaults) refuses a name
    no base class declares and a field the subclass also declares itself."""
    from dalda_aug.generators import pixel_field

    with pytest.raises(TypeError, match="no base class declares"):
        @dataclasses.dataclass(frozen=True)
        class Unknown(GeneratorConfig):
            FIELD_DEFAULTS = {"no_such_field": 1}

    with pytest.raises(TypeError, match="declares 'height'"):
        @dataclasses.dataclass(frozen=True)
        class Twice(GeneratorConfig):
            FIELD_DEFAULTS = {"height": 64}
            height: int = pixel_field(64)

    @dataclasses.dataclass(frozen=True)
    class Small(IPAdapterConfig):
        FIELD_DEFAULTS = {"height": 64, "width": 64}

    assert [f.name for f in dataclasses.fields(Small)] == [name for name, *_ in PINNED_FIELDS[IPAdapterConfig]]
    assert (Small().height, Small().width, Small().prompt_prefix) == (64, 64, IPAdapterConfig().prompt_prefix)
    assert all(field_changes_pixels(f) for f in dataclasses.fields(Small) if f.name in ("height", "width"))
