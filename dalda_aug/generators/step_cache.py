"""DeepCache-style step caching (Ma et al., CVPR 2024) over the UNet's public submodules.

:func:`unet_step` runs either the full SD1.x UNet (and returns the deep features to cache) or
only its shallow part on cached deep features; :func:`check_step_caching_unet` fails early when
a UNet or branch is not covered. Used by :class:`~dalda_aug.generators.ip_adapter.IPAdapterGenerator` when
``IPAdapterConfig.cache_interval > 1``.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError, ModelLoadError

__all__ = ["check_step_caching_unet", "unet_step"]


def check_step_caching_unet(unet: Any, branch: int) -> None:
    """Fail early when :func:`unet_step` does not cover this UNet or ``branch`` is out of range."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    if not 0 <= branch < n_down:
        raise InputError(
            f"IPAdapterConfig.cache_branch must lie in [0, {n_down - 1}] for this UNet "
            f"({n_down} down blocks), got {branch}"
        )
    cfg = unet.config
    unsupported = {
        "center_input_sample": cfg.center_input_sample,
        "class_embedding": unet.class_embedding is not None,
        "addition_embed_type": cfg.addition_embed_type,
        "time_embed_act": unet.time_embed_act is not None,
        "text_encoder_hid_proj": getattr(unet, "text_encoder_hid_proj", None) is not None,
        "encoder_hid_dim_type != 'ip_image_proj'": cfg.encoder_hid_dim_type != "ip_image_proj",
        "up/down block counts differ": n_up != n_down,
    }
    bad = [name for name, value in unsupported.items() if value]
    # The up-blocks from the paired one on must consume only skip connections of down_blocks[:branch+1].
    produced = 1 + sum(
        len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
        for block in unet.down_blocks[: branch + 1]
    )
    needed = sum(len(block.resnets) for block in unet.up_blocks[n_up - 1 - branch :])
    if produced < needed:
        bad.append(f"up-blocks from {n_up - 1 - branch} on need {needed} skip connections, "
                   f"down_blocks[:{branch + 1}] give {produced}")
    if bad:
        raise ModelLoadError(f"step caching (cache_interval > 1) supports SD1.x UNets only; this one has {bad}")


def unet_step(unet: Any, sample: Any, timestep: Any, encoder_hidden_states: Any, cross_attention_kwargs: Any,
              added_cond_kwargs: Any, branch: int, deep: Any = None) -> tuple[Any, Any]:
    """One UNet evaluation with DeepCache-style step caching; returns ``(noise, deep_features)``.

    Mirrors ``UNet2DConditionModel.forward`` for SD1.x with an IP-Adapter image projection (no
    class/addition embeddings, masks, ControlNet or adapter residuals), over the UNet's public
    submodules. Up-block ``n_up - 1 - branch`` pairs with down-block ``branch``: it consumes the
    skip connections of ``down_blocks[branch]`` (and of the input entering it).

    * ``deep=None``: the full UNet; ``deep_features`` is the hidden state entering the paired
      up-block (the output of the deeper up-blocks), to be cached.
    * ``deep=<cached features>``: only the shallow part: conv_in, the time embedding,
      ``down_blocks[:branch + 1]``, then the up-blocks from the paired one on with ``deep``
      in place of the deeper blocks' output plus fresh skip connections, and conv_norm_out /
      conv_act / conv_out; ``deep_features`` is ``deep``.
    """
    import torch

    n_up = len(unet.up_blocks)
    paired = n_up - 1 - branch
    # Upsample sizes are forwarded when the latent is not a multiple of the overall factor.
    overall_up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % overall_up_factor != 0 for dim in sample.shape[-2:])

    # Time embedding (get_time_embed + time_embedding; time_proj is float32 -> sample dtype).
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.int64, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype), None)

    # encoder_hid_dim_type == "ip_image_proj": (text states, [image tokens per IP-Adapter]).
    states = (encoder_hidden_states, unet.encoder_hid_proj(added_cond_kwargs["image_embeds"]))

    sample = unet.conv_in(sample)
    res_samples = (sample,)
    down_blocks = unet.down_blocks if deep is None else unet.down_blocks[: branch + 1]
    for block in down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(
                hidden_states=sample, temb=emb, encoder_hidden_states=states,
                cross_attention_kwargs=cross_attention_kwargs,
            )
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        res_samples += res

    if deep is None:
        first = 0
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(
                    sample, emb, encoder_hidden_states=states, cross_attention_kwargs=cross_attention_kwargs
                )
            else:
                sample = unet.mid_block(sample, emb)
    else:
        # Keep the skip connections the live up-blocks consume (the first ones; down_blocks[branch]'s
        # downsampler output, if any, belonged to the deeper, cached up-block), so that the
        # slicing below, and the upsample sizes, are those of the full pass.
        first = paired
        needed = sum(len(block.resnets) for block in unet.up_blocks[paired:])
        res_samples = res_samples[:needed]
        sample = deep

    upsample_size = None
    for i in range(first, n_up):
        block = unet.up_blocks[i]
        if i == paired:
            deep = sample
        res = res_samples[-len(block.resnets) :]
        res_samples = res_samples[: -len(block.resnets)]
        if i != n_up - 1 and forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=states,
                cross_attention_kwargs=cross_attention_kwargs, upsample_size=upsample_size,
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), deep

