"""IPAdapterGenerator against stock diffusers, on tiny random models (CPU, float32).

The central property: for every request, the batched generator returns what a stock
``StableDiffusionPipeline`` + ``load_ip_adapter`` + ``set_ip_adapter_scale(λ)`` returns for that
request alone, within 2/255, whatever the batch size and the batch mates.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from dalda_aug.errors import InputError, ModelLoadError  # noqa: E402
from dalda_aug.generators.ip_adapter import IPAdapterConfig, IPAdapterGenerator, estimate_sample_bytes  # noqa: E402
from dalda_aug.generators.base import GenerationRequest, generation_fingerprint  # noqa: E402
from dalda_aug.generators.loading import ddim_scheduler_config  # noqa: E402

TOL = 2  # max abs difference in 8-bit pixel levels (2/255)
STEPS = 3
SIZE = 64  # the tiny VAE downsamples 2x: 32x32 latents


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(_pixels(a) - _pixels(b)).max())



@pytest.fixture(scope="module")
def config():
    return IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def images():
    """Reference images of different sizes, aspect ratios and modes."""
    rng = np.random.default_rng(0)

    def noise(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    wide = Image.fromarray(noise(24, 40))
    tall = Image.fromarray(noise(57, 19))
    square = Image.fromarray(noise(64, 64))
    gray = Image.fromarray(noise(30, 30)[..., 0], mode="L")
    return [wide, tall, square, gray]


@pytest.fixture(scope="module")
def requests_(images):
    return [
        GenerationRequest(images[0], "a photo of a cat", 0.0, 11),
        GenerationRequest(images[1], "a dog running on the beach", 1.0, 22),
        GenerationRequest(images[2], "a red car", 0.35, 33),
        GenerationRequest(images[0], "a photo of a cat", 0.8, 44),
        GenerationRequest(images[3], "a bird", 1.0, 55),
    ]


@pytest.fixture(scope="module")
def generator(tiny_models, config):
    return IPAdapterGenerator(tiny_models, config).load()


def _stock_pipeline(tiny_models, with_adapter: bool):
    """Stock diffusers, built here independently of dalda_aug.generators.ip_adapter's loader."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_models.base, vae=AutoencoderKL.from_pretrained(tiny_models.vae), safety_checker=None
    )
    pipe.scheduler = DDIMScheduler(**ddim_scheduler_config())
    if with_adapter:
        pipe.load_ip_adapter(
            tiny_models.ip_adapter,
            subfolder=tiny_models.ip_adapter_subfolder,
            weight_name=tiny_models.ip_adapter_weight,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(tiny_models):
    return _stock_pipeline(tiny_models, with_adapter=True)


@pytest.fixture(scope="module")
def stock_no_adapter(tiny_models):
    return _stock_pipeline(tiny_models, with_adapter=False)


def _stock_call(pipe, request, config, with_adapter=True):
    kwargs = {}
    if with_adapter:
        pipe.set_ip_adapter_scale(request.scale)
        kwargs["ip_adapter_image"] = request.image
    return pipe(
        prompt=config.prompt_prefix + request.prompt,
        negative_prompt=config.negative_prompt,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **kwargs,
    ).images[0]


@pytest.fixture(scope="module")
def stock_images(stock, requests_, config):
    return [_stock_call(stock, r, config) for r in requests_]


# -- the correctness contract ------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_batched_output_equals_stock_diffusers_per_request(generator, requests_, stock_images, batch_size):
    out = generator.generate(requests_, batch_size=batch_size)
    assert len(out) == len(requests_)
    for i, (ours, ref) in enumerate(zip(out, stock_images)):
        assert ours.size == (SIZE, SIZE) and ours.mode == "RGB"
        assert _max_diff(ours, ref) <= TOL, f"request {i} (λ={requests_[i].scale}) differs from stock diffusers"


def test_comparison_is_not_vacuous(stock_images, requests_):
    # λ, the reference image and the prompt all visibly change the stock output, so equality
    # with it above really checks per-sample λ / image / prompt handling.
    cat_0, cat_08 = stock_images[0], stock_images[3]  # same image, prompt; λ 0 vs 0.8
    assert _max_diff(cat_0, cat_08) > 10
    assert _max_diff(stock_images[1], stock_images[4]) > 10  # λ = 1, different images


def test_lambda_zero_equals_pipeline_without_adapter(generator, stock_no_adapter, requests_, config):
    zero = requests_[0]
    assert zero.scale == 0.0
    plain = _stock_call(stock_no_adapter, zero, config, with_adapter=False)
    out = generator.generate([requests_[1], zero, requests_[4]], batch_size=3)
    assert _max_diff(out[1], plain) <= TOL


def test_same_seed_same_image_different_seed_different_image(generator, images):
    a = GenerationRequest(images[2], "a red car", 0.6, 7)
    b = GenerationRequest(images[2], "a red car", 0.6, 8)
    first, second, other = generator.generate([a, a, b], batch_size=3)
    # The same call twice is bit-identical; a different batch position or batch size may move
    # a pixel by float rounding only.
    assert generator.generate([a, b], batch_size=2)[0] == generator.generate([a, b], batch_size=2)[0]
    assert _max_diff(first, second) <= TOL
    assert _max_diff(first, generator.generate([a], batch_size=1)[0]) <= TOL
    assert _max_diff(first, other) > 10


def test_order_and_batch_mates_do_not_change_a_request(generator, requests_, images):
    target = requests_[2]
    alone = generator.generate([target], batch_size=1)[0]
    mates = [GenerationRequest(images[3], "something else entirely", 1.0, 99), *requests_[::-1]]
    out = generator.generate(mates, batch_size=len(mates))
    position = 1 + requests_[::-1].index(target)
    assert _max_diff(out[position], alone) <= TOL


def test_scheduler_dpmsolver_matches_stock(tiny_models, stock, requests_):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="dpmsolver++")
    gen = IPAdapterGenerator(tiny_models, config)
    out = gen.generate(requests_[1:3], batch_size=2)
    saved = stock.scheduler
    stock.scheduler = DPMSolverMultistepScheduler.from_config(
        DDIMScheduler(**ddim_scheduler_config()).config, algorithm_type="dpmsolver++"
    )
    try:
        for ours, request in zip(out, requests_[1:3]):
            assert _max_diff(ours, _stock_call(stock, request, config)) <= TOL
    finally:
        stock.scheduler = saved


def test_without_guidance_matches_stock(tiny_models, stock, requests_):
    config = IPAdapterConfig(num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=1.0)
    out = IPAdapterGenerator(tiny_models, config).generate(requests_[1:4], batch_size=3)
    for ours, request in zip(out, requests_[1:4]):
        assert _max_diff(ours, _stock_call(stock, request, config)) <= TOL


def test_speedups_compute_the_same_images(tiny_models, generator, requests_, config):
    import dataclasses

    fast = dataclasses.replace(config, attention="math", channels_last=True)
    out = IPAdapterGenerator(tiny_models, fast).generate(requests_[:2], batch_size=2)
    for ours, ref in zip(out, generator.generate(requests_[:2], batch_size=2)):
        assert _max_diff(ours, ref) <= TOL
    assert fast.fingerprint() == config.fingerprint()


def test_tiny_vae_decodes_and_changes_fingerprint(tiny_models, tmp_path, stock, requests_, config):
    import dataclasses

    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
    ).save_pretrained(tmp_path / "taesd")
    tiny_config = dataclasses.replace(config, tiny_vae=str(tmp_path / "taesd"))
    assert tiny_config.fingerprint() != config.fingerprint()
    ours = IPAdapterGenerator(tiny_models, tiny_config).generate(requests_[1:2])[0]
    assert ours.size == (SIZE, SIZE)
    # Same as the stock pipeline with its VAE swapped for the tiny one (the diffusers recipe).
    saved = stock.vae
    stock.vae = AutoencoderTiny.from_pretrained(tmp_path / "taesd")
    try:
        assert _max_diff(ours, _stock_call(stock, requests_[1], config)) <= TOL
    finally:
        stock.vae = saved


# -- embeddings are computed once per distinct reference image -----------------------------
def test_each_distinct_reference_image_is_encoded_once(generator, images):
    encoder = generator.pipeline.image_encoder
    encoded = []
    handle = encoder.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        generator.clear_cache()
        duplicate = images[1].copy()  # same content, another object
        requests = [
            GenerationRequest(image, f"variant {v}", 0.2 * v, 100 + 10 * k + v)
            for v in range(3)
            for k, image in enumerate([images[0], images[1], duplicate])
        ]
        generator.generate(requests, batch_size=2)  # 5 sub-batches
        assert sum(encoded) == 2
        generator.generate(requests[:4], batch_size=4)
        assert sum(encoded) == 2  # cached across calls too
    finally:
        handle.remove()


# -- loading errors ----------------------------------------------------------------------------
def _load_error(models) -> str:
    with pytest.raises(ModelLoadError) as info:
        IPAdapterGenerator(models).load()
    return str(info.value)


def test_missing_weight_file_names_the_expected_path(tiny_models):
    import dataclasses
    from pathlib import Path

    message = _load_error(dataclasses.replace(tiny_models, ip_adapter_weight="ip-adapter_missing.bin"))
    assert str(Path(tiny_models.ip_adapter) / "models" / "ip-adapter_missing.bin") in message


def test_wrong_subfolder_names_the_expected_path(tiny_models):
    import dataclasses
    from pathlib import Path

    message = _load_error(dataclasses.replace(tiny_models, ip_adapter_subfolder="weights"))
    assert str(Path(tiny_models.ip_adapter) / "weights" / "ip-adapter_sd15.bin") in message
    message = _load_error(dataclasses.replace(tiny_models, image_encoder_subfolder="models/vit-h"))
    assert str(Path(tiny_models.ip_adapter) / "models" / "vit-h" / "config.json") in message


def test_missing_base_folder_and_unreachable_hub_id(tiny_models, tmp_path):
    import dataclasses

    missing = tmp_path / "no-such-sd"
    assert str(missing) in _load_error(dataclasses.replace(tiny_models, base=str(missing)))
    # Hub ids are handed to diffusers/transformers; offline, their failure is wrapped.
    message = _load_error(dataclasses.replace(tiny_models, ip_adapter="no-such-org/no-such-adapter"))
    assert "no-such-org/no-such-adapter" in message


# -- input validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale=float("nan")), "scale"),
        (dict(scale=-0.1), "scale"),
        (dict(scale=math.inf), "scale"),
        (dict(scale=True), "scale"),
        (dict(image=np.zeros((8, 8, 3), dtype=np.uint8)), "PIL"),
        (dict(image="cat.jpg"), "PIL"),
        (dict(prompt=None), "prompt"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**64), "seed"),
    ],
)
def test_bad_requests_are_rejected(images, kwargs, match):
    values = dict(image=images[0], prompt="a cat", scale=0.5, seed=0)
    values.update(kwargs)
    with pytest.raises(InputError, match=match):
        GenerationRequest(**values)


def test_request_normalises_numbers(images):
    request = GenerationRequest(images[0], "a cat", np.float32(0.25), np.int64(3))
    assert type(request.scale) is float and type(request.seed) is int


def test_bad_generate_arguments(generator, requests_):
    with pytest.raises(InputError, match="empty"):
        generator.generate([])
    with pytest.raises(InputError, match=r"requests\[1\]"):
        generator.generate([requests_[0], "a cat"])
    with pytest.raises(InputError, match="batch_size"):
        generator.generate(requests_[:1], batch_size=0)


# -- configuration -----------------------------------------------------------------------------
def test_config_defaults_are_the_papers():
    config = IPAdapterConfig()
    assert (config.num_inference_steps, config.guidance_scale, config.height, config.width) == (30, 7.5, 512, 512)
    assert config.prompt_prefix == "best quality, high quality, "
    assert config.negative_prompt == "monochrome, lowres, bad anatomy, worst quality, low quality"
    assert config.scheduler == "ddim" and config.tiny_vae is None
    assert not config.compile and not config.channels_last and config.attention == "sdpa"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_inference_steps=0),
        dict(height=60),
        dict(width=0),
        dict(guidance_scale=float("nan")),
        dict(scheduler="euler"),
        dict(tiny_vae=""),
        dict(compile="yes"),
        dict(attention="flash"),
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(InputError):
        IPAdapterConfig(**kwargs)


def test_fingerprint_covers_pixel_fields_only(tiny_models):
    import dataclasses

    base = IPAdapterConfig()
    assert base.fingerprint() == IPAdapterConfig().fingerprint()
    assert IPAdapterConfig.from_dict(base.to_dict()) == base
    for change in [
        dict(num_inference_steps=20),
        dict(guidance_scale=5.0),
        dict(height=256),
        dict(width=256),
        dict(prompt_prefix=""),
        dict(negative_prompt=""),
        dict(scheduler="dpmsolver++"),
        dict(tiny_vae="madebyollin/taesd"),
    ]:
        assert dataclasses.replace(base, **change).fingerprint() != base.fingerprint(), change
    for change in [dict(compile=True), dict(channels_last=True), dict(attention="math")]:
        assert dataclasses.replace(base, **change).fingerprint() == base.fingerprint(), change

    key = generation_fingerprint(tiny_models, base)
    assert key == generation_fingerprint(tiny_models, base, "float32")
    assert key != generation_fingerprint(tiny_models, base, "bfloat16")
    assert key != generation_fingerprint(dataclasses.replace(tiny_models, ip_adapter_revision="v2"), base)
    assert key == generation_fingerprint(dataclasses.replace(tiny_models, clip_model="RN50"), base)
    assert IPAdapterGenerator(tiny_models, base, dtype=torch.bfloat16).fingerprint() == generation_fingerprint(
        tiny_models, base, "bf16"
    )


def test_dtype_and_device_arguments(tiny_models):
    assert IPAdapterGenerator(tiny_models).dtype == torch.float32
    assert IPAdapterGenerator(tiny_models, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(InputError, match="dtype"):
        IPAdapterGenerator(tiny_models, dtype="int8")
    with pytest.raises(InputError, match="device"):
        IPAdapterGenerator(tiny_models, device="not-a-device")


def test_auto_batch_size_and_memory_estimate(generator):
    assert generator.auto_batch_size(3) == 3
    assert 1 <= generator.auto_batch_size() <= 32
    paper = IPAdapterConfig()
    assert estimate_sample_bytes(paper, "bfloat16") == 2 ** 30
    assert estimate_sample_bytes(paper, "float32") == 2 * 2 ** 30


def test_constructor_loads_nothing_and_import_is_light(tiny_models):
    gen = IPAdapterGenerator(tiny_models)
    assert not gen.is_loaded and "not loaded" in repr(gen)
    code = (
        "import sys, dalda_aug.generators.ip_adapter as g; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    os.environ.get("RUN_COMPILE", "0") in ("", "0", "false"),
    reason="torch.compile takes about a minute on CPU; set RUN_COMPILE=1",
)
def test_compiled_unet_matches_eager_and_never_recompiles_for_new_lambdas(tiny_models, generator, images):
    import dataclasses

    from torch._dynamo.utils import counters

    config = dataclasses.replace(generator.config, compile=True)
    compiled = IPAdapterGenerator(tiny_models, config)
    graphs = None
    for lam in (0.3, 0.9, 0.0):
        requests = [GenerationRequest(images[0], "a cat", lam, 1), GenerationRequest(images[1], "a dog", 1 - lam, 2)]
        for ours, ref in zip(compiled.generate(requests, batch_size=2), generator.generate(requests, batch_size=2)):
            assert _max_diff(ours, ref) <= TOL
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs  # λ is a tensor input: no recompilation


# -- step caching (DeepCache), opt-in ----------------------------------------------------------
def _unet_inputs(generator, batch=4):
    unet = generator.pipeline.unet
    g = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, SIZE // 2, SIZE // 2, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    image_dim = unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
    image = torch.randn(batch, 1, image_dim, generator=g)
    scale = torch.tensor([0.0, 0.4, 1.0, 0.7][:batch])
    return unet, sample, torch.tensor(481), text, {"ip_scale": scale}, {"image_embeds": [image]}


@pytest.mark.parametrize("branch", [0, 1])
def test_step_function_reproduces_the_unet(generator, branch):
    from dalda_aug.generators.step_cache import unet_step as _unet_step

    unet, sample, t, text, cak, acak = _unet_inputs(generator)
    with torch.inference_mode():
        ref = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs=cak, added_cond_kwargs=acak,
                   return_dict=False)[0]
        full, deep = _unet_step(unet, sample, t, text, cak, acak, branch)
        # A shallow pass on the deep features of the same inputs is the full pass again.
        shallow, same = _unet_step(unet, sample, t, text, cak, acak, branch, deep=deep)
        # ... and on other deep features it is not (the cached features are used).
        other, _ = _unet_step(unet, sample, t, text, cak, acak, branch, deep=torch.zeros_like(deep))
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shallow, ref, rtol=1e-5, atol=1e-5)
    assert same is deep
    assert (other - ref).abs().max() > 1e-3


def _count_full_unet_calls(unet):
    calls = []
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


def test_cache_interval_one_is_the_default(tiny_models, requests_, config):
    import dataclasses

    off = dataclasses.replace(config, cache_interval=1, cache_branch=1)  # branch unused when off
    assert off.fingerprint() == config.fingerprint()
    # Fresh generators on both sides (cached image embeddings encoded in other batches may
    # differ by rounding): bit-identical images.
    ours = IPAdapterGenerator(tiny_models, off).generate(requests_[1:3], batch_size=2)
    assert ours == IPAdapterGenerator(tiny_models, config).generate(requests_[1:3], batch_size=2)


@pytest.mark.parametrize("branch", [0, 1])
def test_cache_interval_three_runs_fewer_full_unets_and_stays_close(tiny_models, requests_, branch):
    import dataclasses

    steps = 4  # full UNet at steps 0 and 3
    plain_config = IPAdapterConfig(num_inference_steps=steps, height=SIZE, width=SIZE)
    cached_config = IPAdapterConfig(num_inference_steps=steps, height=SIZE, width=SIZE, cache_interval=3,
                                     cache_branch=branch)
    plain, cached = IPAdapterGenerator(tiny_models, plain_config), IPAdapterGenerator(tiny_models, cached_config)
    batch = requests_[1:3]
    counts = []
    outputs = []
    for gen in (plain, cached):
        calls, handle = _count_full_unet_calls(gen.pipeline.unet)
        try:
            outputs.append(gen.generate(batch, batch_size=2))
        finally:
            handle.remove()
        counts.append(len(calls))
    assert counts == [steps, 2]
    other_seed = plain.generate([dataclasses.replace(r, seed=r.seed + 1000) for r in batch], batch_size=2)
    for ref, ours, other in zip(*outputs, other_seed):
        change = np.abs(_pixels(ours) - _pixels(ref)).mean()
        assert change > 0  # output-changing
        assert change < 0.2 * np.abs(_pixels(other) - _pixels(ref)).mean()


def test_cache_settings_fingerprint_and_validation(tiny_models):
    import dataclasses

    base = IPAdapterConfig()
    assert "cache_interval" not in base.pixel_dict() and "cache_branch" not in base.pixel_dict()
    # At their "off" defaults the step-caching fields leave the fingerprint as without them.
    assert base.fingerprint() == dataclasses.replace(base, cache_branch=1).fingerprint()
    on = dataclasses.replace(base, cache_interval=3)
    assert on.fingerprint() != base.fingerprint()
    assert dataclasses.replace(on, cache_interval=5).fingerprint() != on.fingerprint()
    assert dataclasses.replace(on, cache_branch=1).fingerprint() != on.fingerprint()
    assert generation_fingerprint(tiny_models, on) != generation_fingerprint(tiny_models, base)
    assert IPAdapterConfig.from_dict(on.to_dict()) == on
    for bad in (dict(cache_interval=0), dict(cache_interval=1.5), dict(cache_interval=True),
                dict(cache_branch=-1), dict(cache_branch="0")):
        with pytest.raises(InputError, match="cache_"):
            IPAdapterConfig(**bad)
    # The branch's upper bound is the UNet's down-block count (2 in the tiny UNet), checked on load.
    config = IPAdapterConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE, cache_interval=2, cache_branch=2)
    with pytest.raises(InputError, match=r"cache_branch must lie in \[0, 1\]"):
        IPAdapterGenerator(tiny_models, config).load()
