"""Choosing the IP-Adapter scale λ of each generated image.

Parameter choice is kept apart from its use (torchvision v2's ``make_params``): these
functions are pure functions of (scores, n_shot, config, rng) and the generator only applies
the λ it is given.

Strategies, selected with the one explicit field :attr:`Scaling.strategy`:

``"ags"``
    Adaptive guidance scaling (DALDA, Eq. 2–3). An image CLIP recognises poorly
    (score ≤ α) gets a *Low*-confidence range [0.7, 0.9] — keep close to the real image; a
    well-recognised image gets the *High* range [0.1, 0.4] — let the text prompt add diversity.
    Within the range, μ = min + (max − min)·(1 − score), σ = 0.05·n for n shots per class, and
    λ ~ TruncNormal(μ, σ², min, max) (:attr:`AGSConfig.mode` ``"truncnorm"``, the paper).
    ``mode="clip"`` reproduces the reference code instead: a normal draw clipped to the range
    (mass piles up on the bounds); μ uses the High range [0.1, 0.4] as above, and only the
    upper clipping bound of a High draw is widened to 0.4 + 0.1·√n.
``"rs"``
    Random scaling: λ ~ U(0, 1).
``"fixed"``
    The same λ = :attr:`Scaling.value` for every image.
``"da-fusion-strength"``
    DA-Fusion's img2img strength (:mod:`dalda_aug.generators.da_fusion`): each image's strength,
    also its λ, drawn uniformly from :attr:`Scaling.strengths` (:func:`sample_strengths`), from a
    generator seeded for the purpose ``"strength"`` (:attr:`Scaling.seed_purpose`) where the others
    use ``"lambda"``. The scores do not enter the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from ..prompts.presets import DA_FUSION_STRENGTHS  # DA-Fusion's four, the default of Scaling.strengths

__all__ = ["AGSConfig", "Scaling", "sample_lambda", "sample_scales", "ags_parameters", "lambda_from_uniforms",
           "sample_strengths"]

# Where randomness comes from: a NumPy Generator, or an integer seed for one.
RNGLike = Union[np.random.Generator, int]

_MODES = ("truncnorm", "clip")
_STRATEGIES = ("ags", "rs", "fixed", "da-fusion-strength")


def _check_strengths(strengths: Any) -> tuple[float, ...]:
    """``strengths`` as a tuple of floats, each in (0, 1]; else one :class:`InputError` line."""
    try:
        values = tuple(float(x) for x in strengths)
    except (TypeError, ValueError):
        raise InputError(f"strengths must be numbers in (0, 1], got {strengths!r}") from None
    if not values or not all(0.0 < x <= 1.0 for x in values):
        raise InputError(f"strengths must be numbers in (0, 1], got {list(values)}")
    return values


def _check_range(name: str, rng_: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng_)
    except (TypeError, ValueError) as exc:
        raise InputError(f"AGSConfig.{name} must be a pair (min, max), got {rng_!r}") from exc
    if not (0.0 <= lo < hi) or not math.isfinite(hi):
        raise InputError(f"AGSConfig.{name} must satisfy 0 <= min < max, got {rng_!r}")
    return lo, hi


@dataclass(frozen=True)
class AGSConfig:
    """The constants of adaptive guidance scaling (paper defaults)."""

    # Threshold on the CLIPScore (zero-shot class probability): score <= alpha is "Low".
    alpha: float = 0.3
    # λ range for images CLIP recognises poorly (stay close to the reference image).
    low: tuple[float, float] = (0.7, 0.9)
    # λ range for well-recognised images (let the prompt add diversity).
    high: tuple[float, float] = (0.1, 0.4)
    # σ = sigma_per_shot · n, for n shots per class.
    sigma_per_shot: float = 0.05
    # "truncnorm": exact truncated normal (paper); "clip": clipped normal (reference code).
    mode: Literal["truncnorm", "clip"] = "truncnorm"

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise InputError(f"AGSConfig.alpha must lie in [0, 1], got {self.alpha!r}")
        object.__setattr__(self, "low", _check_range("low", self.low))
        object.__setattr__(self, "high", _check_range("high", self.high))
        if not (float(self.sigma_per_shot) > 0.0) or not math.isfinite(self.sigma_per_shot):
            raise InputError(f"AGSConfig.sigma_per_shot must be > 0, got {self.sigma_per_shot!r}")
        if self.mode not in _MODES:
            raise InputError(f"AGSConfig.mode must be one of {_MODES}, got {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "low": list(self.low),
            "high": list(self.high),
            "sigma_per_shot": self.sigma_per_shot,
            "mode": self.mode,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AGSConfig":
        values = dict(data)
        for key in ("low", "high"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Scaling:
    """Which λ strategy to use: ``"ags"`` (with :attr:`ags`), ``"rs"``, ``"fixed"`` (:attr:`value`) or
    ``"da-fusion-strength"`` (:attr:`strengths`)."""

    strategy: Literal["ags", "rs", "fixed", "da-fusion-strength"] = "ags"
    ags: AGSConfig = field(default_factory=AGSConfig)
    # λ for strategy "fixed" (ignored otherwise).
    value: float = 0.5
    # The img2img strengths strategy "da-fusion-strength" draws from, uniformly (ignored otherwise).
    strengths: tuple[float, ...] = DA_FUSION_STRENGTHS

    def __post_init__(self) -> None:
        if self.strategy not in _STRATEGIES:
            raise InputError(f"unknown scaling strategy {self.strategy!r}; expected one of {_STRATEGIES}")
        if not isinstance(self.ags, AGSConfig):
            raise InputError(f"Scaling.ags must be an AGSConfig, got {type(self.ags).__name__}")
        if self.strategy == "fixed" and not (0.0 <= float(self.value) and math.isfinite(self.value)):
            raise InputError(f"fixed λ must be a finite number >= 0, got {self.value!r}")
        object.__setattr__(self, "strengths", _check_strengths(self.strengths))

    @property
    def draws_strength(self) -> bool:
        """Whether each drawn value is an img2img strength (a plan row's ``strength`` as well as its λ)."""
        return self.strategy == "da-fusion-strength"

    @property
    def seed_purpose(self) -> str:
        """The purpose in :func:`~dalda_aug.plan.variant.derive_seed` of a source's draw generator."""
        return "strength" if self.draws_strength else "lambda"

    @classmethod
    def parse(cls, text: str, ags: AGSConfig | None = None) -> "Scaling":
        """Parse the CLI form: ``ags``, ``rs`` or ``fixed:0.5``."""
        ags = ags or AGSConfig()
        text = str(text).strip()
        if text == "ags":
            return cls(strategy="ags", ags=ags)
        if text == "rs":
            return cls(strategy="rs", ags=ags)
        if text.startswith("fixed:"):
            raw = text[len("fixed:"):]
            try:
                value = float(raw)
            except ValueError:
                raise InputError(f"invalid --scaling value {text!r}: {raw!r} is not a number") from None
            return cls(strategy="fixed", ags=ags, value=value)
        raise InputError(f"invalid --scaling value {text!r}; expected 'ags', 'rs' or 'fixed:<λ>' (e.g. fixed:0.5)")

    def describe(self) -> str:
        if self.strategy == "fixed":
            return f"fixed:{self.value:g}"
        if self.strategy == "ags":
            return f"ags({self.ags.mode})"
        if self.draws_strength:
            return f"da-fusion-strength({','.join(f'{x:g}' for x in self.strengths)})"
        return "rs"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy}
        if self.strategy == "ags":
            out["ags"] = self.ags.to_dict()
        if self.strategy == "fixed":
            out["value"] = self.value
        if self.draws_strength:
            out["strengths"] = list(self.strengths)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scaling":
        ags = AGSConfig.from_dict(data["ags"]) if "ags" in data else AGSConfig()
        strengths = data.get("strengths", DA_FUSION_STRENGTHS)
        if isinstance(strengths, (str, bytes, Mapping)):
            raise InputError(f"scaling strengths must be a list of numbers, got {strengths!r}")
        return cls(strategy=data["strategy"], ags=ags, value=data.get("value", 0.5), strengths=strengths)


def _validate_scores(scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InputError(f"scores must be a 1-D sequence, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"score {arr[i]!r} at position {i} lies outside [0, 1]")
    return arr


def _validate_n_shot(n_shot: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(n_shot)
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise InputError(f"n_shot must be a whole number >= 1, got {n_shot!r}")
    if np.any(arr < 1):
        raise InputError(f"n_shot must be >= 1, got {n_shot!r}")
    return arr.astype(np.float64)


def ags_parameters(scores: npt.ArrayLike, n_shot: npt.ArrayLike, config: AGSConfig = AGSConfig()
                   ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64],
                          npt.NDArray[np.float64]]:
    """Per-score (μ, σ, lower bound, upper bound) of the AGS distribution.

    ``n_shot`` is an int or one int per score. μ is computed from the configured range
    (High: 0.1–0.4) in both modes; in ``clip`` mode only the returned High *upper bound*, the
    value draws are clipped to, is widened to 0.4 + 0.1·√n, as in the reference code.
    """
    s = _validate_scores(scores)
    n = np.broadcast_to(_validate_n_shot(n_shot), s.shape)
    is_low = s <= config.alpha
    lo = np.where(is_low, config.low[0], config.high[0])
    # μ always uses the configured range (the reference code's μ line uses max_val = 0.4 too);
    # ``clip`` widens only the bound the High draw is clipped to.
    mu = lo + (np.where(is_low, config.low[1], config.high[1]) - lo) * (1.0 - s)
    hi_high = config.high[1] + (0.1 * np.sqrt(n) if config.mode == "clip" else 0.0)
    hi = np.where(is_low, config.low[1], hi_high)
    sigma = config.sigma_per_shot * n
    return mu, sigma, lo, hi


def _as_rng(rng: RNGLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise InputError("an explicit rng (numpy Generator) or integer seed is required")
    return np.random.default_rng(rng)


def sample_lambda(scores: npt.ArrayLike, n_shot: npt.ArrayLike, rng: RNGLike,
                  config: AGSConfig = AGSConfig()) -> npt.NDArray[np.float64]:
    """Draw one AGS λ per CLIPScore.

    Args:
        scores: CLIPScores in [0, 1] (DALDA's zero-shot class probability).
        n_shot: shots per class (int, or one per score); σ = ``config.sigma_per_shot``·n.
        rng: a ``numpy.random.Generator`` or an int seed — the only source of randomness.
        config: :class:`AGSConfig`.
    """
    mu, sigma, lo, hi = ags_parameters(scores, n_shot, config)
    gen = _as_rng(rng)
    if config.mode == "clip":
        return np.asarray(np.clip(gen.normal(mu, sigma), lo, hi), dtype=np.float64)
    return lambda_from_uniforms(gen.random(mu.shape), mu, sigma, lo, hi)


def lambda_from_uniforms(u: npt.ArrayLike, mu: npt.ArrayLike, sigma: npt.ArrayLike, lo: npt.ArrayLike,
                         hi: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """AGS's truncated normal by inversion: the λ of uniforms ``u`` in [0, 1) under
    (μ, σ, lo, hi) of :func:`ags_parameters`, elementwise. Exact, and robust when μ sits on a bound
    or σ is large; :func:`sample_lambda` and the plan's bulk draw both go through it."""
    from scipy.stats import truncnorm

    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    out = truncnorm.ppf(u, (lo - mu) / sigma, (hi - mu) / sigma, loc=mu, scale=sigma)
    return np.asarray(np.clip(out, lo, hi), dtype=np.float64)  # the clip guards the last ulp only


def sample_strengths(n: int, rng: RNGLike, strengths: Any = DA_FUSION_STRENGTHS) -> npt.NDArray[np.float64]:
    """``n`` values drawn uniformly (with replacement) from ``strengths`` (each in (0, 1]), as
    DA-Fusion draws its img2img strengths: ``strengths[rng.integers(0, len(strengths), size=n)]``."""
    values = np.asarray(_check_strengths(strengths), dtype=np.float64)
    return np.asarray(values[_as_rng(rng).integers(0, values.size, size=int(n))], dtype=np.float64)


def sample_scales(scores: npt.ArrayLike, n_shot: npt.ArrayLike, rng: RNGLike,
                  scaling: Scaling = Scaling()) -> npt.NDArray[np.float64]:
    """One λ per score under ``scaling`` (``ags``, ``rs``, ``fixed`` or ``da-fusion-strength``)."""
    s = _validate_scores(scores)
    if scaling.strategy == "ags":
        return sample_lambda(s, n_shot, rng, scaling.ags)
    _validate_n_shot(n_shot)
    if scaling.strategy == "rs":
        return _as_rng(rng).uniform(0.0, 1.0, size=s.shape)
    if scaling.draws_strength:
        return sample_strengths(s.size, rng, scaling.strengths)
    return np.full(s.shape, float(scaling.value))
