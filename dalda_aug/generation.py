"""DALDA's batched SD 1.x + IP-Adapter generator (kept as an import path).

The code lives in :mod:`dalda_aug.generators` (``ip_adapter``, ``base``, ``loading``,
``attention``, ``step_cache``); this module re-exports its public names so that
``from dalda_aug.generation import GenerationConfig, IPAdapterGenerator, ...`` keeps working.
Importing it stays light (no torch, diffusers or transformers).
"""

from __future__ import annotations

from .generators.base import GenerationRequest, generation_fingerprint
from .generators.ip_adapter import (
    SCHEDULERS,
    GenerationConfig,
    IPAdapterGenerator,
    estimate_sample_bytes,
    load_reference_pipeline,
    reference_generate,
)
from .generators.loading import ddim_scheduler_config

__all__ = [
    "GenerationConfig",
    "GenerationRequest",
    "IPAdapterGenerator",
    "ddim_scheduler_config",
    "generation_fingerprint",
    "estimate_sample_bytes",
    "load_reference_pipeline",
    "reference_generate",
    "SCHEDULERS",
]
