import numpy as np
import pytest
from PIL import Image

from dalda_aug.errors import InputError
from dalda_aug.generation import GenerationConfig, GenerationRequest, generation_fingerprint
from dalda_aug.real_guidance import RealGuidanceConfig, RealGuidanceGenerator


@pytest.fixture(scope="module")
def generator(tiny_models):
    cfg = RealGuidanceConfig(num_inference_steps=4, height=64, width=64)
    return RealGuidanceGenerator(tiny_models, cfg).load()


def _img(seed, size=(70, 50)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_batched_equals_alone_and_seeds_matter(generator):
    reqs = [GenerationRequest(_img(i), f"a photo of a thing {i}", 0.0, 100 + i) for i in range(3)]
    batch = generator.generate(reqs, batch_size=3)
    alone = [generator.generate([r])[0] for r in reqs]
    for b, a in zip(batch, alone):
        assert b.size == (64, 64)
        assert np.abs(np.asarray(b, dtype=int) - np.asarray(a, dtype=int)).max() <= 2
    again = generator.generate([reqs[0]])[0]
    other = generator.generate([GenerationRequest(reqs[0].image, reqs[0].prompt, 0.0, 999)])[0]
    assert np.array_equal(np.asarray(again), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(other), np.asarray(alone[0]))


def test_strength_changes_output_and_keys(tiny_models, generator):
    req = GenerationRequest(_img(5), "a photo of a cat", 0.0, 7)
    weak = RealGuidanceGenerator(tiny_models, RealGuidanceConfig(num_inference_steps=4, height=64, width=64,
                                                                 strength=0.25))
    a = np.asarray(generator.generate([req])[0], dtype=int)
    b = np.asarray(weak.generate([req])[0], dtype=int)
    assert np.abs(a - b).max() > 0
    rg, ours = RealGuidanceConfig(), GenerationConfig()
    assert generation_fingerprint(tiny_models, rg) != generation_fingerprint(tiny_models, ours)
    assert rg.fingerprint() != RealGuidanceConfig(strength=0.6).fingerprint()


def test_bad_input():
    with pytest.raises(InputError, match="strength"):
        RealGuidanceConfig(strength=0)
    with pytest.raises(InputError, match="strength"):
        RealGuidanceConfig(strength=1.5)
    with pytest.raises(InputError, match="cache_interval"):
        RealGuidanceConfig(cache_interval=3)  # the stock img2img pipeline has no step caching
