"""Real Guidance (kept as an import path): see :mod:`dalda_aug.generators.real_guidance`."""

from __future__ import annotations

from .generators.real_guidance import RealGuidanceConfig, RealGuidanceGenerator

__all__ = ["RealGuidanceConfig", "RealGuidanceGenerator"]
