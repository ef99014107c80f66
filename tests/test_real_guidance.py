"""Real Guidance as the DALDA paper ran it (through DA-Fusion's implementation), on tiny models."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dalda_aug.errors import InputError  # noqa: E402
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.generators.base import GenerationRequest, generation_fingerprint  # noqa: E402
from dalda_aug.generators.real_guidance import RealGuidanceConfig, RealGuidanceGenerator  # noqa: E402

CANVAS = 64


def _img(seed, size=(70, 50)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _max_diff(a, b):
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


@pytest.fixture(scope="module")
def config():
    return RealGuidanceConfig(num_inference_steps=4, height=CANVAS, width=CANVAS)


@pytest.fixture(scope="module")
def generator(tiny_models, config):
    return RealGuidanceGenerator(tiny_models, config).load()


def test_defaults_are_da_fusions_real_guidance():
    # DA-Fusion semantic_aug/augmentations/real_guidance.py: StableDiffusionImg2ImgPipeline.from_pretrained(
    # "CompVis/stable-diffusion-v1-4") with its own scheduler and VAE, called with image=canvas (512x512,
    # BILINEAR), strength=0.5, guidance_scale=7.5 and no num_inference_steps (diffusers' default 50);
    # the output is resized back to image.size (BILINEAR); prompt "a photo of a {name}", no negative prompt.
    c = RealGuidanceConfig()
    assert (c.strength, c.guidance_scale, c.num_inference_steps) == (0.5, 7.5, 50)
    assert (c.scheduler, c.vae, c.output_size, c.resample) == ("pipeline", "base", "source", "bilinear")
    assert (c.height, c.width, c.prompt_prefix, c.negative_prompt) == (512, 512, "", "")
    old = RealGuidanceConfig.with_dalda_sampler()
    assert (old.scheduler, old.num_inference_steps, old.vae, old.output_size) == ("ddim", 30, "override", "canvas")


def test_matches_da_fusions_stock_call(tiny_models, generator, config):
    """Our output equals DA-Fusion's recipe written out with stock diffusers."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_models.base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the base model's own, as SD v1-4's
    image = _img(1)
    canvas = image.resize((CANVAS, CANVAS), Image.BILINEAR)
    stock = pipe(image=canvas, prompt=["a photo of a cat"], strength=0.5, guidance_scale=7.5, num_inference_steps=4,
                 generator=torch.Generator("cpu").manual_seed(5)).images[0].resize(image.size, Image.BILINEAR)
    ours = generator.generate([GenerationRequest(image, "a photo of a cat", 0.0, 5)])[0]
    assert ours.size == image.size == (70, 50)
    assert _max_diff(ours, stock) <= 2


def test_dalda_sampler_option_keeps_the_canvas_and_uses_the_vae_override(tiny_models):
    cfg = RealGuidanceConfig.with_dalda_sampler(num_inference_steps=3, height=CANVAS, width=CANVAS)
    gen = RealGuidanceGenerator(tiny_models, cfg).load()
    assert type(gen.pipeline.scheduler).__name__ == "DDIMScheduler"
    assert gen.pipeline.vae.config._name_or_path.rstrip("/").endswith("vae")  # the override folder, not sd/vae
    out = gen.generate([GenerationRequest(_img(2), "a photo of a dog", 0.0, 3)])[0]
    assert out.size == (CANVAS, CANVAS)
    assert generation_fingerprint(tiny_models, cfg) != generation_fingerprint(
        dataclasses.replace(tiny_models, vae=None), dataclasses.replace(cfg, vae="base"))


def test_strength_changes_output_and_keys(tiny_models, generator, config):
    req = GenerationRequest(_img(5), "a photo of a cat", 0.0, 7)
    weak = RealGuidanceGenerator(tiny_models, dataclasses.replace(config, strength=0.25))
    assert _max_diff(generator.generate([req])[0], weak.generate([req])[0]) > 0
    rg, ours = RealGuidanceConfig(), IPAdapterConfig()
    assert generation_fingerprint(tiny_models, rg) != generation_fingerprint(tiny_models, ours)
    assert rg.fingerprint() != RealGuidanceConfig(strength=0.6).fingerprint()


def test_ip_adapter_and_unused_model_fields_do_not_enter_its_key(tiny_models):
    rg = RealGuidanceConfig()
    key = generation_fingerprint(tiny_models, rg)
    for change in (dict(ip_adapter="elsewhere/x"), dict(ip_adapter_weight="other.bin"), dict(vae="other/vae"),
                   dict(clip_model="RN50")):
        assert generation_fingerprint(dataclasses.replace(tiny_models, **change), rg) == key, change
    assert generation_fingerprint(dataclasses.replace(tiny_models, base="other/sd"), rg) != key
    assert not hasattr(rg, "tiny_vae") and not hasattr(rg, "compile")  # no fields it would ignore


def test_bad_input():
    with pytest.raises(InputError, match="strength"):
        RealGuidanceConfig(strength=0)
    with pytest.raises(InputError, match="strength"):
        RealGuidanceConfig(strength=1.5)
    with pytest.raises(InputError, match="scheduler"):
        RealGuidanceConfig(scheduler="euler")
    with pytest.raises(InputError, match="output_size"):
        RealGuidanceConfig(output_size="huge")
