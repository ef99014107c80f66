#!/usr/bin/env python
"""Throughput of the batched IP-Adapter generator against the reference approach.

On the same requests, in one process:

* baseline: the reference approach, one ``set_ip_adapter_scale(λ)`` + one stock
  ``StableDiffusionPipeline`` call per image (what the paper's code does);
* ours: :class:`dalda_aug.generators.ip_adapter.IPAdapterGenerator`, one UNet call per step for a batch
  of requests with per-sample λ, reference image, prompt and seed — for each ``--batch-sizes``.

The img2img baselines get the same treatment (``--img2img real_guidance,da_fusion``, default
both): DA-Fusion's stock loop (resize to the canvas, one ``StableDiffusionImg2ImgPipeline`` call
per image, resize back; DA-Fusion's class tokens loaded with ``load_textual_inversion``) against
:class:`~dalda_aug.generators.RealGuidanceGenerator` / :class:`~dalda_aug.generators.DAFusionGenerator`
(one UNet call per schedule position for a batch of any strengths; DA-Fusion draws one of four
strengths per image).

Prints images/s, the speed-up, the largest pixel difference from the baseline images, the
achieved TFLOP/s as a fraction of the device's bf16 peak (the SD1.5 performance model in
benchmarks/README.md, *Performance model*)
and, on CUDA, the peak memory per batch size. ``--arch tiny`` builds the tiny random test models;
``--arch sd15-random`` builds the full-size SD1.5 + ViT-H/14 + ip-adapter_sd15 architecture with
random weights (speed does not depend on the weights). Both are saved to a folder and loaded
through the same ``from_pretrained``/``load_ip_adapter`` path as real weights.

    python benchmarks/bench_generation.py                         # CPU: tiny models
    python benchmarks/bench_generation.py --device cuda --arch sd15-random --dtype bfloat16 \\
        --batch-sizes 1,4,8,16 --num-images 32 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

# The performance model of benchmarks/README.md ("Performance model"), SD1.5 at 512x512
# (TFLOP = 1e12 floating-point operations).
UNET_TFLOP_512 = 0.80  # one UNet forward of one sample (x2 per step with guidance)
VAE_DECODE_TFLOP_512 = 2.5  # one VAE decode
VAE_ENCODE_TFLOP_512 = 1.1  # one VAE encode (img2img's source image, a textual-inversion sample)
IMAGE_ENCODER_TFLOP = 0.34  # ViT-H/14 at 224 px, one reference image
DEFAULT_PEAK_TFLOPS = 790.0  # dense bf16 peak of an H100/H200 SXM
PROMPTS = [
    "a photo of a dog playing on the grass",
    "a photo of a cat sleeping on a sofa",
    "a close-up photo of a flower in the garden",
    "a photo of an airplane in a clear blue sky",
]


def tflop_per_image(size: int, steps: int, guidance: bool = True) -> float:
    """Useful work per image: UNet steps (x2 with guidance), VAE decode, one image encoding.

    The UNet and VAE terms scale with the pixel count (convolutions dominate; attention grows
    faster, so this underestimates work above 512 px); 512 px, 30 steps, CFG gives ≈ 51 TFLOP.
    """
    pixels = (size / 512) ** 2
    unet = UNET_TFLOP_512 * pixels * steps * (2 if guidance else 1)
    return unet + VAE_DECODE_TFLOP_512 * pixels + IMAGE_ENCODER_TFLOP


def img2img_tflop_per_image(size: int, steps: int, strength: float, guidance: bool = True) -> float:
    """Useful work of one img2img image (Real Guidance, DA-Fusion): a VAE encode of the source, the
    ``int(steps * strength)`` UNet steps the schedule suffix runs (as diffusers' ``get_timesteps``;
    x2 with guidance) and a VAE decode; no image encoder."""
    pixels = (size / 512) ** 2
    unet = UNET_TFLOP_512 * pixels * min(int(steps * strength), steps) * (2 if guidance else 1)
    return unet + (VAE_ENCODE_TFLOP_512 + VAE_DECODE_TFLOP_512) * pixels


def textual_inversion_tflop(steps: int, batch_size: int, size: int = 512) -> float:
    """Work of one class's textual inversion: per sample a VAE encode and a UNet forward and
    backward (≈ 3 forwards; no guidance)."""
    pixels = (size / 512) ** 2
    return steps * batch_size * (3 * UNET_TFLOP_512 + VAE_ENCODE_TFLOP_512) * pixels


def fewshot_generation_cost(classes: int, *, shots: int = 1, variants: int = 10, seeds: int = 3,
                            methods: tuple[str, ...] | None = None, steps: int = 30, img2img_steps: int = 50,
                            size: int = 512, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
                            reference_images_per_s: float = 1.5) -> dict:
    """What ``fewshot.py``'s generation costs for one dataset of ``classes`` classes at one shot
    setting, from the performance model: images per generator (classes x shots x M x seeds per
    method of ``methods``, default ``DEFAULT_METHODS``), TFLOP per image and in all, the seconds of
    the images at ``peak_tflops`` (and a quarter of it), DA-Fusion's textual inversion, and the
    reference code's time at ``reference_images_per_s``. Strengths and the textual-inversion
    steps and batch are the generators' defaults."""
    from dalda_aug.fewshot import DEFAULT_METHODS, METHODS
    from dalda_aug.generators.da_fusion import DA_FUSION_STRENGTHS
    from dalda_aug.generators.real_guidance import RealGuidanceConfig
    from dalda_aug.generators.textual_inversion import TextualInversionConfig

    chosen = DEFAULT_METHODS if methods is None else methods
    per_method = classes * shots * variants * seeds
    images = {kind: per_method * sum(METHODS[m].generator == kind for m in chosen)
              for kind in ("ip_adapter", "real_guidance", "da_fusion")}
    per_image = {
        "ip_adapter": tflop_per_image(size, steps),
        "real_guidance": img2img_tflop_per_image(size, img2img_steps, RealGuidanceConfig().strength),
        "da_fusion": sum(img2img_tflop_per_image(size, img2img_steps, s) for s in DA_FUSION_STRENGTHS)
        / len(DA_FUSION_STRENGTHS),
    }
    work = sum(images[k] * per_image[k] for k in images)
    ti = TextualInversionConfig()
    ti_work = (classes * seeds * textual_inversion_tflop(ti.steps, ti.batch_size, size)
               if images["da_fusion"] else 0.0)
    return {
        "classes": classes, "images": images, "tflop_per_image": per_image,
        "unet_steps": {
            "real_guidance": int(img2img_steps * RealGuidanceConfig().strength),
            "da_fusion": sum(int(img2img_steps * s) for s in DA_FUSION_STRENGTHS) / len(DA_FUSION_STRENGTHS)},
        "textual_inversion_tflop_per_class_seed": textual_inversion_tflop(ti.steps, ti.batch_size, size),
        "image_tflop": work, "image_seconds": work / peak_tflops, "image_seconds_25": work / (0.25 * peak_tflops),
        "ti_tflop": ti_work, "ti_seconds": ti_work / peak_tflops, "ti_seconds_25": ti_work / (0.25 * peak_tflops),
        "reference_seconds": sum(images.values()) / reference_images_per_s,
    }


def _about(seconds: float) -> str:
    """``≈ N min`` under 2 hours, else ``≈ X.Y h``."""
    return f"≈ {seconds / 60:.0f} min" if seconds < 7200 else f"≈ {seconds / 3600:.1f} h"


def _flop(tflop: float) -> str:
    """PFLOP under 1,500 PFLOP, else EFLOP."""
    return f"{tflop / 1e3:,.0f} PFLOP" if tflop < 1.5e6 else f"{tflop / 1e6:.1f} EFLOP"


# The paper's three datasets and their class counts, for the README's cost table.
FEWSHOT_DATASETS = (("Pets", 37), ("Caltech-101", 101), ("Flowers102", 102))


def fewshot_cost_markdown() -> str:
    """The cost sentences and table of benchmarks/README.md (*Expected time per stage*), from
    :func:`fewshot_generation_cost` at 1-shot, M = 10, 3 seeds, the default methods."""
    rows = [(name, fewshot_generation_cost(n)) for name, n in FEWSHOT_DATASETS]
    first = rows[0][1]
    tf, steps = first["tflop_per_image"], first["unet_steps"]
    ip, rg, da = (f"{DEFAULT_PEAK_TFLOPS / tf[k]:.1f}" for k in ("ip_adapter", "real_guidance", "da_fusion"))
    rates = f"{ip}, {rg} and {da}"
    lines = [
        f"Cost per image from the *Performance model* above: IP-Adapter ≈ {tf['ip_adapter']:.0f} TFLOP "
        f"(512², 30 DDIM steps, CFG); Real Guidance (img2img, 50 PNDM steps at strength 0.5: "
        f"{steps['real_guidance']} UNet steps with CFG, plus a VAE encode of ≈ {VAE_ENCODE_TFLOP_512:g} TFLOP) "
        f"≈ {tf['real_guidance']:.0f} TFLOP; DA-Fusion (the same at a strength drawn from 0.25, 0.5, 0.75 and 1: "
        f"≈ {steps['da_fusion']:g} UNet steps on average) ≈ {tf['da_fusion']:.0f} TFLOP. DA-Fusion also trains "
        "its tokens first: 1,000 steps of batch 4 per class and seed, a UNet forward and backward "
        f"(≈ 3 × {UNET_TFLOP_512:.2f} TFLOP, no CFG) and a VAE encode per sample, "
        f"≈ {first['textual_inversion_tflop_per_class_seed'] / 1e3:.0f} PFLOP per class and seed. "
        f"At the bf16/fp16 peak of an H100/H200 ({DEFAULT_PEAK_TFLOPS:g} TFLOP/s) the images alone are {rates} "
        "images/s; public diffusers figures reach 17–39 % of peak, so the \"25 %\" columns assume a quarter of it:",
        "",
        "| dataset | classes | IP-Adapter images | Real Guidance images | DA-Fusion images | image work "
        "| warm at 25 % of peak | at 100 % | textual inversion (classes × 3 seeds) | at 25 % | at 100 % "
        "| reference code (1.5 images/s, all images) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in rows:
        im = c["images"]
        lines.append(f"| {name} | {c['classes']} | {im['ip_adapter']:,} | {im['real_guidance']:,} | "
                     f"{im['da_fusion']:,} | {_flop(c['image_tflop'])} | {_about(c['image_seconds_25'])} | "
                     f"{_about(c['image_seconds'])} | {_flop(c['ti_tflop'])} | {_about(c['ti_seconds_25'])} | "
                     f"{_about(c['ti_seconds'])} | {_about(c['reference_seconds'])} |")
    return "\n".join(lines) + "\n"


# -- model building ----------------------------------------------------------------------------
def _ip_adapter_state_dict(unet, image_embed_dim: int, torch, std: float = 0.02) -> dict:
    """A random state dict in ip-adapter_sd15's format (``image_proj`` + ``ip_adapter``) for ``unet``."""
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    image_proj = {
        "proj.weight": torch.randn(4 * cross, image_embed_dim, generator=g) * std,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    cross_layers = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for i, name in enumerate(cross_layers):  # numbered 1, 3, 5, ... like the original checkpoint
        attention = unet.get_submodule(name[: -len(".processor")])
        for proj in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(attention.to_k.out_features, cross, generator=g) * std
            ip_adapter[f"{2 * i + 1}.{proj}.weight"] = weight
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def build_sd15_random(root: Path, seed: int = 0):
    """Full-size SD1.5 / ViT-H/14 / ip-adapter_sd15 architecture, random weights, saved in fp16."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from dalda_aug.config import ModelConfig
    from dalda_aug.generators.loading import ddim_scheduler_config
    from dalda_aug.tiny_models import write_clip_tokenizer

    root = Path(root)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "tokenizer-src"))
    pipe = StableDiffusionPipeline(
        unet=unet.half(),
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**ddim_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd", safe_serialization=True)

    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=16,
            intermediate_size=5120,
            patch_size=14,
            image_size=224,
            projection_dim=1024,
            hidden_act="gelu",
        )
    )
    ip_root = root / "ip-adapter"
    encoder.half().save_pretrained(ip_root / "models" / "image_encoder", safe_serialization=True)
    state = _ip_adapter_state_dict(unet, 1024, torch)
    state = {part: {k: v.half() for k, v in tensors.items()} for part, tensors in state.items()}
    torch.save(state, ip_root / "models" / "ip-adapter_sd15.bin")
    del pipe, unet, vae, text_encoder, encoder

    config = ModelConfig(base=str(root / "sd"), vae=None, ip_adapter=str(ip_root))
    config.save(root / "models.json")
    return config


def prepare_models(arch: str, models_dir: Path):
    """Reuse ``models_dir/models.json`` when present, else build ``arch`` there."""
    from dalda_aug.config import ModelConfig
    from dalda_aug.tiny_models import make_tiny_models

    if (models_dir / "models.json").is_file():
        return ModelConfig.load(models_dir / "models.json")
    models_dir.mkdir(parents=True, exist_ok=True)
    if arch == "tiny":
        return make_tiny_models(models_dir)
    return build_sd15_random(models_dir)


def make_requests(num_images: int, variants_per_source: int, seed: int = 0):
    """DALDA-shaped work: ``variants_per_source`` variants (λ, prompt, seed) per reference image."""
    import numpy as np
    from PIL import Image

    from dalda_aug.generators.base import GenerationRequest

    rng = np.random.default_rng(seed)
    sizes = [(240, 320), (375, 500), (256, 256), (500, 375)]
    n_sources = math.ceil(num_images / variants_per_source)
    sources = [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n_sources)
    ]
    return [
        GenerationRequest(
            image=sources[i // variants_per_source],
            prompt=PROMPTS[i % len(PROMPTS)],
            scale=float(rng.uniform(0.1, 0.9)),
            seed=i,
        )
        for i in range(num_images)
    ], n_sources


# -- measuring ---------------------------------------------------------------------------------
def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(torch, device, fn, repeats: int = 1, before=None):
    """(result of the last run, seconds of the fastest of ``repeats`` runs)."""
    best = math.inf
    for _ in range(repeats):
        if before is not None:
            before()
        _sync(torch, device)
        start = time.perf_counter()
        result = fn()
        _sync(torch, device)
        best = min(best, time.perf_counter() - start)
    return result, best


def _reset_peak(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(torch, device):
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1024**3


def _max_pixel_diff(a_images, b_images) -> int:
    import numpy as np

    return max(
        int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())
        for a, b in zip(a_images, b_images)
    )


def _device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type} ({cpu}, {torch.get_num_threads()} threads)"


_STARTED = time.perf_counter()


def _say(text: str) -> None:
    """One progress line on stderr, with the seconds since the script started."""
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {text}", file=sys.stderr, flush=True)


def bench_img2img(kind: str, models, requests, *, device, dtype: str, size: int, steps: int, batch_sizes: list[int],
                  repeats: int, work_dir: Path) -> dict:
    """Stock one-call-per-image img2img loop (as DA-Fusion runs it) vs our batched generator."""
    import dataclasses

    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from dalda_aug.generators import (DAFusionConfig, DAFusionGenerator, RealGuidanceConfig, RealGuidanceGenerator,
                                      draw_strengths, resolve_torch_dtype)

    if kind == "da_fusion":  # class tokens (one step of textual inversion: their values do not change the speed)
        from dalda_aug.generators.textual_inversion import TextualInversionConfig, train_textual_inversion

        data = work_dir / "ti-data"
        for c in range(2):
            (data / f"class {c}").mkdir(parents=True, exist_ok=True)
            requests[c].image.convert("RGB").save(data / f"class {c}" / "0.png")
        tokens = train_textual_inversion(data, work_dir / "tokens", models=models, device=device, dtype=dtype,
                                         config=TextualInversionConfig(steps=1, batch_size=1, resolution=size),
                                         cache_dir=work_dir / "ti-cache")
        strengths = draw_strengths(len(requests), np.random.default_rng(0))
        requests = [dataclasses.replace(r, prompt=f"a photo of a {tokens.token_of(f'class {i % 2}')}",
                                        scale=float(s)) for i, (r, s) in enumerate(zip(requests, strengths))]
        config = DAFusionConfig(num_inference_steps=steps, height=size, width=size, tokens=str(tokens.folder))
        generator_cls = DAFusionGenerator
    else:
        config = RealGuidanceConfig(num_inference_steps=steps, height=size, width=size)
        generator_cls = RealGuidanceGenerator

    def strength(r) -> float:
        return r.scale if kind == "da_fusion" else config.strength

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(models.base, safety_checker=None,
                                                          dtype=resolve_torch_dtype(dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    if kind == "da_fusion":
        for name in tokens.class_names:
            pipe.load_textual_inversion(str(tokens.file_of(name)), token=tokens.token_of(name))

    def stock(r):
        canvas = r.image.convert("RGB").resize((size, size), Image.BILINEAR)
        out = pipe(prompt=[r.prompt], image=canvas, strength=strength(r), guidance_scale=config.guidance_scale,
                   num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(r.seed)).images[0]
        return out.resize(r.image.size, Image.BILINEAR)

    _say(f"{kind}: stock loop, one img2img call per image ({len(requests)} images, {steps} steps)")
    stock(requests[0])  # warm-up
    baseline_images, seconds = _timed(torch, device, lambda: [stock(r) for r in requests], repeats)
    baseline = {"images_per_s": len(requests) / seconds, "seconds": seconds}
    pipe = None  # freed before ours loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    generator = generator_cls(models, config, device=device, dtype=dtype).load()
    runs = []
    for batch_size in batch_sizes:
        _say(f"{kind}: ours, batch {batch_size}")
        generator.generate(requests[:batch_size], batch_size=batch_size)  # warm-up
        images, seconds = _timed(torch, device, lambda: generator.generate(requests, batch_size=batch_size), repeats)
        runs.append({"batch_size": batch_size, "images_per_s": len(requests) / seconds, "seconds": seconds,
                     "speedup": (len(requests) / seconds) / baseline["images_per_s"],
                     "max_pixel_diff_vs_baseline": _max_pixel_diff(images, baseline_images)})
    best = max(runs, key=lambda r: r["images_per_s"])
    return {"steps": steps, "baseline": baseline, "ours": runs, "best_batch_size": best["batch_size"],
            "ratio": best["speedup"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False,
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Time: on a 2-core CPU the defaults (tiny models, 16 images, 30 steps, batch sizes 1,4,8,16, "
               "then both img2img baselines at 50 steps) took about 16 minutes; a line per measurement on "
               "stderr shows the progress. Shorter: fewer --steps / --img2img-steps, --batch-sizes 8, "
               "--img2img ''.",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--arch", default=None, choices=["tiny", "sd15-random"],
                   help="models to build (default: tiny on cpu, sd15-random on cuda)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="build the models here (or reuse DIR/models.json); default: a temporary folder")
    p.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated batch sizes for ours")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (paper: 30)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: 512; 64 for tiny)")
    p.add_argument("--num-images", type=int, default=None, help="images per run (default: 32; 16 for tiny)")
    p.add_argument("--variants-per-source", type=int, default=10,
                   help="requests sharing one reference image (paper's M = 10)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). On a shared machine use fewer threads "
                        "than free cores: oversubscribed OpenMP threads slow tiny-model runs down many times")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per measurement; the fastest counts (use >1 on a shared machine)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (ours)")
    p.add_argument("--channels-last", action="store_true", help="channels-last UNet/VAE (ours)")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="step caching (DeepCache) for ours: the full UNet every N-th step, only its shallow "
                        "part in between (IPAdapterConfig.cache_interval; 1 = off, the default). "
                        "Changes pixels, so the max pixel diff vs the baseline is no longer ~0")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"device bf16 peak for the utilisation figure (default {DEFAULT_PEAK_TFLOPS:g}: H100/H200)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--img2img", default="real_guidance,da_fusion",
                   help="img2img baselines to measure too: comma list of real_guidance, da_fusion ('' = none)")
    p.add_argument("--img2img-steps", type=int, default=50,
                   help="denoising steps of the img2img baselines (DA-Fusion's implementation: 50)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from dalda_aug.generators.ip_adapter import IPAdapterConfig, IPAdapterGenerator, estimate_sample_bytes, load_reference_pipeline, reference_generate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        if args.threads < 1:
            print("--threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    arch = args.arch or ("sd15-random" if device.type == "cuda" else "tiny")
    size = args.size or (64 if arch == "tiny" else 512)
    num_images = args.num_images or (16 if arch == "tiny" else 32)
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        print(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}", file=sys.stderr)
        return 2
    if not batch_sizes or min(
        [*batch_sizes, args.steps, num_images, args.variants_per_source, args.repeats, args.cache_interval]
    ) < 1:
        print("batch sizes, --steps, --num-images, --variants-per-source, --repeats and --cache-interval "
              "must be >= 1",
              file=sys.stderr)
        return 2
    kept = [b for b in batch_sizes if b <= num_images] or [num_images]
    if kept != batch_sizes:
        print(f"note: batch sizes above --num-images {num_images} skipped: {sorted(set(batch_sizes) - set(kept))}")
    batch_sizes = kept

    config = IPAdapterConfig(
        num_inference_steps=args.steps,
        height=size,
        width=size,
        compile=args.compile,
        channels_last=args.channels_last,
        cache_interval=args.cache_interval,
    )
    requests, n_sources = make_requests(num_images, args.variants_per_source)
    work = tflop_per_image(size, args.steps, guidance=config.guidance_scale > 1)
    model_applies = arch == "sd15-random"

    with tempfile.TemporaryDirectory(prefix="dalda-bench-") as tmp:
        models_dir = args.models_dir or Path(tmp) / arch
        started = time.perf_counter()
        _say(f"preparing the {arch} models")
        models = prepare_models(arch, models_dir)
        print(f"models: {arch} in {models_dir} ({time.perf_counter() - started:.1f} s to prepare)")
        print(
            f"device: {_device_name(torch, device)}, dtype {dtype}, {size}x{size}, {args.steps} steps, "
            f"CFG {config.guidance_scale:g}, {num_images} images from {n_sources} reference image(s)"
            + (f", ours with step caching every {config.cache_interval} steps" if config.cache_interval > 1 else "")
        )

        # Baseline: the reference approach, loaded, measured and freed before ours loads.
        _say(f"baseline: one pipeline call per image ({num_images} images, {args.steps} steps, "
             f"{args.repeats} timed run(s))")
        pipe = load_reference_pipeline(models, config, device=device, dtype=dtype)
        reference_generate(pipe, requests[0], config)  # warm-up
        _reset_peak(torch, device)
        baseline_images, seconds = _timed(
            torch, device, lambda: [reference_generate(pipe, r, config) for r in requests], args.repeats
        )
        baseline = {
            "images_per_s": num_images / seconds,
            "seconds": seconds,
            "peak_memory_gib": _peak_gib(torch, device),
        }
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

        generator = IPAdapterGenerator(models, config, device=device, dtype=dtype).load()
        runs = []
        for batch_size in batch_sizes:
            _say(f"ours: batch {batch_size}")
            # Warm-up at every batch shape the timed run uses (compiles when --compile).
            for shape in {batch_size, num_images % batch_size} - {0}:
                generator.generate(requests[:shape], batch_size=shape)
            _reset_peak(torch, device)
            images, seconds = _timed(
                torch,
                device,
                lambda: generator.generate(requests, batch_size=batch_size),
                args.repeats,
                before=generator.clear_cache,  # each timed run encodes its reference images itself
            )
            runs.append(
                {
                    "batch_size": batch_size,
                    "images_per_s": num_images / seconds,
                    "seconds": seconds,
                    "speedup": baseline["images_per_s"] and (num_images / seconds) / baseline["images_per_s"],
                    "max_pixel_diff_vs_baseline": _max_pixel_diff(images, baseline_images),
                    "peak_memory_gib": _peak_gib(torch, device),
                }
            )
        generator = None  # free it before the img2img pipelines load
        img2img = {}
        for kind in [k.strip() for k in args.img2img.split(",") if k.strip()]:
            if kind not in ("real_guidance", "da_fusion"):
                print(f"--img2img: unknown baseline {kind!r}", file=sys.stderr)
                return 2
            img2img[kind] = bench_img2img(kind, models, requests, device=device, dtype=dtype, size=size,
                                          steps=args.img2img_steps, batch_sizes=batch_sizes, repeats=args.repeats,
                                          work_dir=Path(tmp) / kind)

    for entry in [baseline, *runs]:
        achieved = entry["images_per_s"] * work
        entry["tflops"] = achieved if model_applies else None
        entry["peak_fraction"] = achieved / args.peak_tflops if model_applies else None

    def mem(entry) -> str:
        return f", peak memory {entry['peak_memory_gib']:.2f} GiB" if entry["peak_memory_gib"] is not None else ""

    def util(entry) -> str:
        if entry["tflops"] is None:
            return ""
        return f", {entry['tflops']:.1f} TFLOP/s = {100 * entry['peak_fraction']:.1f} % of peak"

    print(f"baseline (set_ip_adapter_scale + 1 pipeline call per image): "
          f"{baseline['images_per_s']:.3f} images/s{util(baseline)}{mem(baseline)}")
    for run in runs:
        print(
            f"ours, batch {run['batch_size']:>3}: {run['images_per_s']:.3f} images/s, x{run['speedup']:.2f} vs "
            f"baseline, max pixel diff {run['max_pixel_diff_vs_baseline']}/255{util(run)}{mem(run)}"
        )
    best = max(runs, key=lambda r: r["images_per_s"])
    print(f"ratio ours/baseline: x{best['speedup']:.2f} (best batch size {best['batch_size']}: "
          f"{best['images_per_s']:.3f} vs {baseline['images_per_s']:.3f} images/s)")
    if model_applies:
        print(f"performance model: {work:.1f} TFLOP per image; peak {args.peak_tflops:g} TFLOP/s "
              f"-> ceiling {args.peak_tflops / work:.2f} images/s")
    else:
        print("TFLOP/s: n/a (the performance model in benchmarks/README.md describes SD1.5; use --arch sd15-random)")
    if device.type == "cuda":
        print(f"per-sample memory estimate used by auto batch sizing: "
              f"{estimate_sample_bytes(config, dtype) / 1024**3:.2f} GiB")

    labels = {"real_guidance": "Real Guidance", "da_fusion": "DA-Fusion"}
    for kind, res in img2img.items():
        print(f"{labels[kind]} ({res['steps']} steps), stock loop (1 img2img call per image): "
              f"{res['baseline']['images_per_s']:.3f} images/s")
        for run in res["ours"]:
            print(f"{labels[kind]}, ours, batch {run['batch_size']:>3}: {run['images_per_s']:.3f} images/s, "
                  f"x{run['speedup']:.2f}, max pixel diff {run['max_pixel_diff_vs_baseline']}/255")
        print(f"{labels[kind]} ratio ours/stock: x{res['ratio']:.2f} (best batch size {res['best_batch_size']})")

    if args.json is not None:
        result = {
            "device": _device_name(torch, device),
            "device_type": device.type,
            "dtype": dtype,
            "arch": arch,
            "size": size,
            "steps": args.steps,
            "guidance_scale": config.guidance_scale,
            "num_images": num_images,
            "num_reference_images": n_sources,
            "compile": args.compile,
            "repeats": args.repeats,
            "channels_last": args.channels_last,
            "cache_interval": args.cache_interval,
            "tflop_per_image": work if model_applies else None,
            "peak_tflops": args.peak_tflops,
            "baseline": baseline,
            "ours": runs,
            "best_batch_size": best["batch_size"],
            "ratio": best["speedup"],
            "img2img": img2img,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
