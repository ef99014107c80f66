"""Registries that register: an image codec or a generator added at run time is found by name
and offered where the built-ins are (the command line's choices), and the older spellings of
the codec options still work, with a DeprecationWarning."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import warnings
from typing import Any, ClassVar, Mapping

import numpy as np
import pytest
from PIL import Image

from dalda_aug.cache import GenerationSpec, SyntheticCache, decode_entry, encode_entry
from dalda_aug.cache.codecs import CODECS, ImageCodec, image_formats, register_codec, resolve_format
from dalda_aug.errors import InputError
from dalda_aug.generators.ip_adapter import IPAdapterConfig
from dalda_aug.generators import (GeneratorConfig, config_class_for, config_from_dict, generator_class_for,
                                  pixel_field, register_generator, registered_configs)
from dalda_aug.plan import Variant

from helpers import cli_env


def _image(seed: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _variant(i: int) -> Variant:
    return Variant(source=f"cls/img{i}.png", label=0, class_name="cls", score=0.5, variant=i,
                   prompt=f"a photo of a cls, take {i}", lam=0.25, seed=1000 + i, source_sha256="ab" * 32)


# A codec a third party might add: BMP files whose option is how many low bits of each channel
# are dropped (0: lossless), so that the option is visible in the stored pixels.
def _encode_bmp(rgb: Image.Image, drop: int | None) -> bytes:
    pixels = np.asarray(rgb)
    if drop:
        pixels = (pixels >> drop) << drop
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    return buf.getvalue()


def _decode_bmp(payload: bytes, meta: dict) -> Image.Image:
    with Image.open(io.BytesIO(payload)) as img:
        return img.convert("RGB")


@pytest.fixture()
def bmp_codec():
    codec = register_codec(ImageCodec("bmp-test", _encode_bmp, _decode_bmp, "a test codec", option="quality",
                                      option_range=(0, 7), lossy=lambda drop: bool(drop)))
    try:
        yield codec
    finally:
        CODECS.pop("bmp-test", None)


@pytest.fixture()
def spec(tiny_models) -> GenerationSpec:
    return GenerationSpec(tiny_models, IPAdapterConfig(num_inference_steps=2, height=32, width=32), "float32")


# -- codecs -------------------------------------------------------------------------------------
def test_codec_registered_at_run_time_is_offered_and_used(tmp_path, spec, bmp_codec):
    from dalda_aug.cli import build_parser

    assert image_formats()[-1] == "bmp-test" and "bmp-test:3" in image_formats()
    assert "bmp-test:8" not in image_formats() and "bmp-tes" not in image_formats()
    # the command line's --format choices are the registry's, read when the parser is built
    args = build_parser().parse_args(["warm", "--plan", "p", "--cache", "c", "--format", "bmp-test:3"])
    assert args.format == "bmp-test:3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["warm", "--plan", "p", "--cache", "c", "--format", "bmp-test:9"])

    cache = SyntheticCache(tmp_path / "c", spec, image_format="bmp-test:3")
    image = _image(1)
    cache.put(_variant(1), image)
    entry = SyntheticCache(tmp_path / "c", spec).get(_variant(1))  # a reader with the default format
    assert entry.metadata["format"] == "bmp-test" and entry.metadata["quality"] == 3
    assert np.array_equal(np.asarray(entry.image), (np.asarray(image) >> 3) << 3)
    lossless = SyntheticCache(tmp_path / "d", spec, image_format="bmp-test")
    lossless.put(_variant(2), _image(2))
    assert np.array_equal(np.asarray(lossless.get(_variant(2)).image), np.asarray(_image(2)))
    assert "lossy" not in lossless.get(_variant(2)).metadata


def test_register_codec_refuses_a_taken_or_bad_name(bmp_codec):
    with pytest.raises(InputError, match="registered already"):
        register_codec(ImageCodec("jpeg", _encode_bmp, _decode_bmp))
    with pytest.raises(InputError, match="letters, digits"):
        register_codec(ImageCodec("bmp:2", _encode_bmp, _decode_bmp))
    assert CODECS["jpeg"].encode is not _encode_bmp


def test_options_travel_in_the_name():
    image = _image(3)
    for name, option in (("jpeg", 95), ("jpeg:90", 90), ("webp", None), ("webp:80", 80), ("png", 1),
                         ("png:6", 6), ("lz4", None), ("raw", None)):
        codec, got = resolve_format(name)
        assert (codec.name, got) == (name.split(":")[0], option)
    # the option changes what is stored: jpeg at 10 is far smaller than at 95 (PIL's own encoder)
    low, high = decode_entry(encode_entry(image, {}, "jpeg:10")), decode_entry(encode_entry(image, {}, "jpeg:95"))
    assert (low[1]["quality"], high[1]["quality"]) == (10, 95) and low[1]["nbytes"] < high[1]["nbytes"]
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=6)
    assert decode_entry(encode_entry(image, {}, "png:6"))[1]["nbytes"] == len(buf.getvalue())
    for bad in ("jpeg:0", "jpeg:101", "jpeg:x", "jpeg:", "png:10", "lz4:3", "raw:1", "gif", "jpeg:+9"):
        with pytest.raises(InputError):
            resolve_format(bad)
        assert bad not in image_formats()


def test_old_spellings_still_work_with_a_deprecation_warning(tmp_path, spec):
    image = _image(4)
    with pytest.warns(DeprecationWarning, match="image_format='jpeg:90'"):
        old = encode_entry(image, {"k": 1}, "jpeg", quality=90)
    assert old == encode_entry(image, {"k": 1}, "jpeg:90")
    with pytest.warns(DeprecationWarning, match="image_format='png:6'"):
        old = encode_entry(image, {"k": 1}, "png", png_compress_level=6)
    assert old == encode_entry(image, {"k": 1}, "png:6")
    with pytest.raises(InputError, match="disagree"):
        encode_entry(image, {}, "png:6", png_compress_level=3)
    with pytest.raises(InputError, match="disagree"):
        encode_entry(image, {}, "jpeg:90", quality=80)
    # SyntheticCache's quality= is the same setting as the option in the name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_kwarg = SyntheticCache(tmp_path / "a", spec, image_format="webp", quality=70)
        by_name = SyntheticCache(tmp_path / "b", spec, image_format="webp:70")
    assert (by_kwarg.codec_name, by_name.codec_name) == ("webp:70", "webp:70")
    assert (by_kwarg.image_format, by_kwarg.quality) == (by_name.image_format, by_name.quality) == ("webp", 70)
    for cache in (by_kwarg, by_name):
        cache.put(_variant(5), _image(5))
    assert by_kwarg.get(_variant(5)).metadata["quality"] == by_name.get(_variant(5)).metadata["quality"] == 70
    with pytest.raises(InputError, match="disagree"):
        SyntheticCache(tmp_path / "c", spec, image_format="jpeg:90", quality=80)
    with pytest.raises(InputError, match="lossless"):
        SyntheticCache(tmp_path / "c", spec, image_format="png", quality=80)


# -- generators ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EchoConfig(GeneratorConfig):
    """A third party's generator config: one pixel field of its own."""

    METHOD: ClassVar[str] = "echo_test"
    FIELD_DEFAULTS: ClassVar[Mapping[str, Any]] = {"num_inference_steps": 3}
    tint: int = pixel_field(7)


class EchoGenerator:
    """What ``register_generator`` points at (imported by name on first use)."""

    def __init__(self, models: Any, config: EchoConfig, device: Any = "cpu", dtype: str = "float32") -> None:
        self.models, self.config, self.device, self.dtype = models, config, device, dtype


@pytest.fixture()
def echo_registered():
    from dalda_aug.generators import base

    register_generator(EchoConfig, f"{__name__}:EchoGenerator")
    try:
        yield
    finally:
        base._REGISTRY.pop(EchoConfig, None)


def test_generator_registered_at_run_time_is_found_by_name(echo_registered, tiny_models):
    assert list(registered_configs()) == ["ip_adapter", "real_guidance", "da_fusion", "echo_test"]
    assert config_class_for("echo_test") is EchoConfig
    config = config_from_dict("echo_test", EchoConfig(tint=9).to_dict())
    assert config == EchoConfig(tint=9) and config.num_inference_steps == 3
    assert generator_class_for(config) is EchoGenerator
    spec = GenerationSpec(tiny_models, config, "float32")
    assert isinstance(spec.make_generator("cpu"), EchoGenerator) and spec.make_generator("cpu").config.tint == 9
    # the pixel field is part of the spec's fingerprint, as a built-in's are
    assert GenerationSpec(tiny_models, EchoConfig(tint=8), "float32").fingerprint != spec.fingerprint
    with pytest.raises(InputError, match="unknown generation method 'echo'.*echo_test"):
        config_class_for("echo")


def test_register_generator_refuses_a_taken_name():
    @dataclasses.dataclass(frozen=True)
    class Impostor(GeneratorConfig):
        METHOD: ClassVar[str] = "ip_adapter"

    with pytest.raises(InputError, match="built-in"):
        register_generator(Impostor, f"{__name__}:EchoGenerator")
    assert config_class_for("ip_adapter").__name__ == "IPAdapterConfig"
    with pytest.raises(InputError, match="unknown generation method"):
        config_from_dict("no_such_method", {})


def test_builtins_load_one_at_a_time():
    code = ("import sys\nfrom dalda_aug.generators import config_class_for\n"
            "config_class_for('real_guidance')\n"
            "print(sorted(m for m in sys.modules if m.startswith('dalda_aug.generators.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cli_env())
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout.strip()))
    assert "dalda_aug.generators.real_guidance" in loaded
    assert not loaded & {"dalda_aug.generators.ip_adapter", "dalda_aug.generators.da_fusion"}


def test_a_fewshot_method_names_its_generator_and_the_registry_does_the_rest(echo_registered, tiny_models,
                                                                             tmp_path, monkeypatch):
    import argparse

    from dalda_aug.fewshot.methods import METHODS, Method, generator_kinds
    from dalda_aug.fewshot.settings import build_configs
    from dalda_aug.generators.real_guidance import RealGuidanceConfig

    monkeypatch.setitem(METHODS, "echo", Method("echo", "Echo", "base", "fixed", "echo_test"))
    args = argparse.Namespace(steps=4, img2img_steps=6, guidance_scale=5.0, size=32, ti_steps=2, cache_format="raw",
                              epochs=1, batch_size=2, lr=0.01, iterations_per_epoch=0, autocast=None,
                              backbone="resnet50", pretrained=None)
    configs = build_configs(args, tiny_models, "float32", tmp_path / "cache", "cpu", 0)
    assert generator_kinds() == list(configs.generators) == ["ip_adapter", "real_guidance", "da_fusion", "echo_test"]
    assert configs.generators["echo_test"] == EchoConfig(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    assert configs.generators["ip_adapter"] == IPAdapterConfig(num_inference_steps=4, guidance_scale=5.0, height=32,
                                                                width=32)
    # an img2img generator runs --img2img-steps
    assert configs.generators["real_guidance"] == RealGuidanceConfig(num_inference_steps=6, guidance_scale=5.0,
                                                                     height=32, width=32)
    # DA-Fusion makes its config per plan (its tokens): no shared spec; the others get one, and a cache
    assert set(configs.specs) == set(configs.caches) == {"ip_adapter", "real_guidance", "echo_test"}
    assert configs.specs["echo_test"].fingerprint == GenerationSpec(tiny_models, configs.generators["echo_test"],
                                                                    "float32").fingerprint
    assert configs.caches["echo_test"].spec is configs.specs["echo_test"]
    assert isinstance(configs.specs["echo_test"].make_generator("cpu"), EchoGenerator)


def test_warm_writes_the_format_its_name_asks_for(tmp_path, monkeypatch):
    from dalda_aug.cli import main
    from dalda_aug.plan import AugmentationPlan

    from helpers import noise_folder

    noise_folder(tmp_path / "data", ["cat"], per_class=1, size=(40, 32))
    monkeypatch.chdir(tmp_path)
    assert main(["make-tiny-models", "tiny"]) == 0
    assert main(["plan", "--data", "data", "--out", "plan", "--variants", "2", "--models", "tiny"]) == 0
    assert main(["warm", "--plan", "plan", "--cache", "cache", "--format", "webp:80", "--no-progress"]) == 0
    plan = AugmentationPlan.load(tmp_path / "plan")
    cache = SyntheticCache(tmp_path / "cache")
    metas = [cache.get(cache.resolve_spec(plan).key(v)).metadata for v in plan]
    assert [(m["format"], m["lossy"], m["quality"]) for m in metas] == [("webp", True, 80)] * len(plan) == \
        [("webp", True, 80)] * 2
