"""One contract for every generator of the family (after diffusers' tester mixins).

For each registered generator: batched output equals each request generated alone (<= 2/255 in
float32), the same seed gives the same image and another seed another image, the fingerprint
changes with every field declared as changing pixels and with no other field (config fields and
ModelConfig fields alike), every config field declares itself, the registry builds the generator
from a GenerationSpec, and a missing extra raises the ImportError that names it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from dalda_aug.cache import GenerationSpec  # noqa: E402
from dalda_aug.config import ModelConfig  # noqa: E402
from dalda_aug.generators import (  # noqa: E402
    DAFusionConfig,
    DAFusionGenerator,
    IPAdapterConfig,
    GenerationRequest,
    GeneratorConfig,
    IPAdapterGenerator,
    RealGuidanceConfig,
    RealGuidanceGenerator,
    field_changes_pixels,
    generation_fingerprint,
    pixel_field,
    registered_configs,
)
from dalda_aug.generators.textual_inversion import TextualInversionConfig, train_textual_inversion  # noqa: E402

TOL = 2
SIZE = 64


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def token_folders(tiny_models, tmp_path_factory):
    """Two token folders learned (a few steps) on a tiny two-class image folder, with different seeds."""
    root = tmp_path_factory.mktemp("ti-data")
    for k, name in enumerate(("cat a", "dog b")):
        (root / name).mkdir()
        for i in range(2):
            _image(10 * k + i, (40, 40)).save(root / name / f"{i}.png")
    cfg = TextualInversionConfig(steps=2, resolution=32, batch_size=2)
    cache = tmp_path_factory.mktemp("ti-cache")
    out = tmp_path_factory.mktemp("tokens")
    first = train_textual_inversion(root, out / "s0", models=tiny_models, seed=0, config=cfg, cache_dir=cache)
    second = train_textual_inversion(root, out / "s1", models=tiny_models, seed=1, config=cfg, cache_dir=cache)
    return str(first.folder), str(second.folder)


@dataclass
class Case:
    name: str
    generator: type
    config: Callable[[Any], GeneratorConfig]  # token folders -> the config used to generate
    scales: tuple[float, ...]  # per-request scale (λ, strength, ...)
    prompts: tuple[str, ...]
    # A value for EVERY config field, different from the fingerprint base's.
    changes: Callable[[Any], dict[str, Any]]
    fingerprint_base: Callable[[GeneratorConfig], GeneratorConfig] = lambda c: c


CASES = [
    Case(
        "ip_adapter",
        IPAdapterGenerator,
        lambda tokens: IPAdapterConfig(num_inference_steps=3, height=SIZE, width=SIZE),
        (0.0, 1.0, 0.4, 0.8),
        ("a photo of a cat", "a dog", "a red car", "a photo of a cat"),
        lambda tokens: dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, prompt_prefix="x ",
                            negative_prompt="y", scheduler="dpmsolver++", tiny_vae="madebyollin/taesd",
                            cache_interval=3, cache_branch=1, attention="math", channels_last=True, compile=True,
                            compile_mode="max-autotune"),
        # step caching on, so that cache_branch is live
        lambda c: dataclasses.replace(c, cache_interval=2),
    ),
    Case(
        "real_guidance",
        RealGuidanceGenerator,
        lambda tokens: RealGuidanceConfig(num_inference_steps=4, height=SIZE, width=SIZE),
        (0.0, 0.0, 0.0, 0.0),
        ("a photo of a cat", "a dog", "a red car", "a photo of a cat"),
        lambda tokens: dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, prompt_prefix="x ",
                            negative_prompt="y", scheduler="ddim", vae="override", output_size="canvas",
                            resample="bicubic", strength=0.3),
    ),
    Case(
        "da_fusion",
        DAFusionGenerator,
        lambda tokens: DAFusionConfig(num_inference_steps=4, height=SIZE, width=SIZE, tokens=tokens[0]),
        (0.5, 1.0, 0.25, 0.5),
        ("a photo of a <cat_a>", "a photo of a <dog_b>", "a photo of a <cat_a>", "a photo of a <dog_b>"),
        lambda tokens: dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, prompt_prefix="x ",
                            negative_prompt="y", scheduler="ddim", vae="override", output_size="canvas",
                            resample="bicubic", tokens=tokens[1]),
    ),
]


def test_every_registered_generator_has_a_contract_case():
    assert set(registered_configs()) == {case.name for case in CASES}


def test_a_field_without_a_pixel_declaration_fails():
    @dataclass(frozen=True)
    class Undeclared(RealGuidanceConfig):
        extra: int = 3

    with pytest.raises(TypeError, match="extra"):
        Undeclared()

    @dataclass(frozen=True)
    class Declared(RealGuidanceConfig):
        extra: int = pixel_field(3)

    assert Declared().fingerprint() != Declared(extra=4).fingerprint()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
class TestGeneratorContract:
    @pytest.fixture
    def setup(self, case, tiny_models, token_folders):
        config = case.config(token_folders)
        generator = case.generator(tiny_models, config)
        requests = [GenerationRequest(_image(i, (48 + 8 * i, 40)), p, s, 100 + i)
                    for i, (p, s) in enumerate(zip(case.prompts, case.scales))]
        return config, generator, requests

    def test_batched_equals_each_alone(self, setup):
        _, generator, requests = setup
        batched = generator.generate(requests, batch_size=len(requests))
        for request, image in zip(requests, batched):
            assert _diff(image, generator.generate([request], batch_size=1)[0]) <= TOL

    def test_same_seed_same_image_other_seed_other_image(self, setup):
        _, generator, requests = setup
        r = requests[1]
        a = generator.generate([r])[0]
        assert np.array_equal(np.asarray(a), np.asarray(generator.generate([r])[0]))
        other = generator.generate([dataclasses.replace(r, seed=r.seed + 1)])[0]
        assert _diff(a, other) > TOL

    def test_fingerprint_changes_with_every_pixel_field_and_no_other(self, case, tiny_models, token_folders):
        base = case.fingerprint_base(case.config(token_folders))
        changes = case.changes(token_folders)
        fields = dataclasses.fields(base)
        assert {f.name for f in fields} == set(changes), "the contract needs a new value for every config field"
        key = generation_fingerprint(tiny_models, base)
        for f in fields:
            changed = dataclasses.replace(base, **{f.name: changes[f.name]})
            assert getattr(changed, f.name) != getattr(base, f.name)
            differs = generation_fingerprint(tiny_models, changed) != key
            assert differs == field_changes_pixels(f), f.name
            assert (changed.fingerprint() != base.fingerprint()) == field_changes_pixels(f), f.name
        used = set(base.model_fields())
        for f in dataclasses.fields(ModelConfig):
            value = getattr(tiny_models, f.name)
            other = (value or "x") + "-other"
            differs = generation_fingerprint(dataclasses.replace(tiny_models, **{f.name: other}), base) != key
            assert differs == (f.name in used), f.name
        assert generation_fingerprint(tiny_models, base, "bfloat16") != key

    def test_spec_builds_the_registered_generator(self, case, tiny_models, token_folders):
        config = case.config(token_folders)
        built = GenerationSpec(tiny_models, config).make_generator()
        assert type(built) is case.generator and built.config == config
        assert built.fingerprint() == GenerationSpec(tiny_models, config).fingerprint

    def test_missing_extra_raises_the_named_import_error(self, case, tiny_models, token_folders):
        config = case.config(token_folders)
        code = (
            "import sys, json; sys.modules['diffusers'] = None\n"
            "from dalda_aug.config import ModelConfig\n"
            "from dalda_aug.generators import config_from_dict, generator_class_for\n"
            f"config = config_from_dict({case.name!r}, json.loads({repr(__import__('json').dumps(config.to_dict()))}))\n"
            f"models = ModelConfig.load({str(Path(tiny_models.base).parent / 'models.json')!r})\n"
            "try:\n"
            "    generator_class_for(config)(models, config).load()\n"
            "except ImportError as exc:\n"
            "    print(type(exc).__name__, exc); sys.exit(0)\n"
            "sys.exit(1)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "'diffusers' is required" in result.stdout and "dalda-aug[generate]" in result.stdout
