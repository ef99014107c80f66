"""Plots of a plan: the CLIPScore histogram (paper Fig. 4) and the λ distribution.

matplotlib is imported on use (``pip install 'dalda-aug[viz]'``) with the non-interactive Agg
backend, so the plots work on headless machines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import InputError, require

__all__ = ["plot_score_histogram", "plot_lambda_distribution"]


def _pyplot():
    matplotlib = require("matplotlib", "viz")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _source_scores(plan) -> np.ndarray:
    return np.array([vs[0].score for vs in plan.by_source().values()], dtype=np.float64)


def plot_score_histogram(plans: Mapping[str, object], path: str | os.PathLike, alpha: float | None = None,
                         bins: int = 20) -> Path:
    """Histogram of the source images' CLIPScores, one panel per dataset, α marked.

    ``plans`` maps a dataset name to its :class:`~dalda_aug.plan.AugmentationPlan`.
    """
    if not plans:
        raise InputError("no plan to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plans), figsize=(4.2 * len(plans), 3.4), squeeze=False)
    for ax, (name, plan) in zip(axes[0], plans.items()):
        scores = _source_scores(plan)
        a = alpha if alpha is not None else plan.summary.get("alpha", 0.3)
        ax.hist(scores, bins=bins, range=(0, 1), color="#4C72B0", edgecolor="white")
        ax.axvline(a, color="#C44E52", linestyle="--", label=f"α = {a:g}")
        low = float(np.mean(scores <= a)) if scores.size else 0.0
        ax.set_title(f"{name}: mean {scores.mean():.2f}, Low {low:.0%}" if scores.size else name)
        ax.set_xlabel("CLIPScore (zero-shot probability of own class)")
        ax.set_ylabel("source images")
        ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lambda_distribution(plan, path: str | os.PathLike, bins: int = 40) -> Path:
    """Histogram of the planned λ, split into Low (score ≤ α) and High sources."""
    plt = _pyplot()
    a = float(plan.summary.get("alpha", 0.3))
    low = np.array([v.lam for v in plan if v.score <= a])
    high = np.array([v.lam for v in plan if v.score > a])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    top = max(1.0, float(max(low.max(initial=0), high.max(initial=0))))
    if low.size:
        ax.hist(low, bins=bins, range=(0, top), alpha=0.75, color="#C44E52", label=f"Low (score ≤ {a:g}), n={low.size}")
    if high.size:
        ax.hist(high, bins=bins, range=(0, top), alpha=0.75, color="#4C72B0", label=f"High, n={high.size}")
    ax.set_xlabel("λ (IP-Adapter scale)")
    ax.set_ylabel("variants")
    ax.set_title(f"λ per variant — {plan.config.get('scaling', {}).get('strategy', '?')}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
