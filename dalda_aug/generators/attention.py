"""Attention processors that take a per-sample IP-Adapter weight λ (a tensor of shape ``[batch]``).

Stock diffusers' IP-Adapter processor holds one Python-float scale for the whole batch. The
processors here read ``cross_attention_kwargs={"ip_scale": λ}`` instead, so one UNet call serves
requests with different λ (a tensor, so new λ values never recompile a ``torch.compile``-d UNet).
:func:`install_per_sample_processors` swaps them into a UNet after ``load_ip_adapter``, reusing
its loaded ``to_k_ip``/``to_v_ip`` layers.

Importing this module imports torch and diffusers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
)

from ..errors import ModelLoadError

__all__ = ["ScaleAwareAttnProcessor", "PerSampleIPAdapterAttnProcessor", "install_per_sample_processors"]

class ScaleAwareAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor that accepts (and ignores) ``ip_scale``.

    Installed on self-attention layers so that passing λ through ``cross_attention_kwargs``
    does not make every self-attention layer warn about an unexpected argument.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # diffusers' __init__ is unannotated

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_scale: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out


class PerSampleIPAdapterAttnProcessor(torch.nn.Module):
    """Decoupled cross-attention Z = Attn(Q, K_t, V_t) + λ_b · Attn(Q, K_i, V_i), λ per sample.

    ``ip_scale`` is a float tensor of shape ``[batch]`` (with classifier-free guidance the
    unconditional half first, like the rest of the batch). Owns the ``to_k_ip``/``to_v_ip``
    projections that ``load_ip_adapter`` created. Overrides ``__call__`` (as diffusers'
    IP-Adapter processors do) because ``Attention.forward`` passes only the keyword
    arguments named in the processor's ``__call__`` signature.
    """

    def __init__(self, to_k_ip: torch.nn.ModuleList, to_v_ip: torch.nn.ModuleList) -> None:
        super().__init__()
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                "PerSampleIPAdapterAttnProcessor expects encoder_hidden_states=(text states, [image tokens]) "
                "as produced by a UNet with an IP-Adapter image projection"
            )
        if ip_scale is None:
            raise ValueError(
                "PerSampleIPAdapterAttnProcessor needs cross_attention_kwargs={'ip_scale': tensor [batch]}; "
                "use IPAdapterGenerator.generate instead of calling the pipeline directly"
            )
        text_states, ip_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, text_len, _ = text_states.shape
        if ip_scale.shape != (batch_size,):
            raise ValueError(f"ip_scale must have shape ({batch_size},), got {tuple(ip_scale.shape)}")
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = attn.to_k(text_states)
        value = attn.to_v(text_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, heads*dim) -> (batch, heads, tokens, dim)
            return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)

        def merge_heads(x: torch.Tensor) -> torch.Tensor:  # inverse of split_heads, back in the query's dtype
            return x.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)

        query = split_heads(query)
        out = merge_heads(
            F.scaled_dot_product_attention(
                query, split_heads(key), split_heads(value), attn_mask=attention_mask, dropout_p=0.0,
                is_causal=False,
            )
        )
        # λ stays float32: λ·image-attention is rounded once to the activation dtype, as when
        # diffusers multiplies by a Python float. λ = 0 adds exact zeros (no branch, so a
        # compiled graph does not depend on the values of λ).
        weight = ip_scale.reshape(batch_size, 1, 1)
        for tokens, to_k_ip, to_v_ip in zip(ip_states, self.to_k_ip, self.to_v_ip):
            image_out = merge_heads(
                F.scaled_dot_product_attention(
                    query, split_heads(to_k_ip(tokens)), split_heads(to_v_ip(tokens)), dropout_p=0.0,
                    is_causal=False,
                )
            )
            out = out + (weight * image_out).to(out.dtype)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        result: torch.Tensor = out / attn.rescale_output_factor
        return result


def install_per_sample_processors(unet: Any) -> int:
    """Swap the UNet's processors for per-sample-λ ones; returns the number of IP-Adapter layers."""
    processors: dict[str, Any] = {}
    n_ip = 0
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, (IPAdapterAttnProcessor2_0, IPAdapterAttnProcessor)):
            processors[name] = PerSampleIPAdapterAttnProcessor(proc.to_k_ip, proc.to_v_ip)
            n_ip += 1
        elif isinstance(proc, (AttnProcessor2_0, AttnProcessor)):
            processors[name] = ScaleAwareAttnProcessor()
        else:
            raise ModelLoadError(f"unsupported attention processor {type(proc).__name__} at UNet layer {name}")
    if n_ip == 0:
        raise ModelLoadError("load_ip_adapter installed no IP-Adapter attention processor in the UNet")
    unet.set_attn_processor(processors)
    return n_ip
