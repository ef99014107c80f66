"""A plan's ``summary.json``: counts, the CLIPScore histogram and the share of Low/High images,
made from the plan's columns only."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .columns import PlanColumns
from .variant import Variant

__all__ = ["summarize", "summarize_columns"]


def summarize(variants: Sequence[Variant], config: dict[str, Any]) -> dict[str, Any]:
    """Counts, the score histogram (10 bins on [0, 1]) and the Low/High shares of ``variants``
    (:func:`summarize_columns` of their columns)."""
    return summarize_columns(PlanColumns.from_rows(variants), config)


def summarize_columns(columns: PlanColumns, config: dict[str, Any]) -> dict[str, Any]:
    """The summary of the plan whose rows ``columns`` holds, from its arrays (no Variant made):
    counts, the score histogram (10 bins on [0, 1]) and the Low/High shares. Each source's score
    is its first row's (sources in order of first appearance); the classes come in sorted order."""
    arrays = columns.arrays
    alpha = float(config.get("scaling", {}).get("ags", {}).get("alpha", 0.3))
    source_col = np.asarray(arrays["source"])
    # sources are numbered in order of first appearance, so np.unique's first rows come in that order
    _, first = np.unique(source_col, return_index=True)
    scores = np.asarray(arrays["score"], dtype=np.float64)[first]
    lams = np.asarray(arrays["lambda"], dtype=np.float64)
    names = [columns.string("class_name", k) for k in range(arrays["class_name.offsets"].size - 1)]
    class_col = np.asarray(arrays["class_name"])
    source_class = class_col[first]
    src_counts = np.bincount(source_class, minlength=len(names))
    var_counts = np.bincount(class_col, minlength=len(names))
    # each class's source scores, in source order (a stable sort by class keeps it)
    by_class = np.split(scores[np.argsort(source_class, kind="stable")], np.cumsum(src_counts)[:-1])
    per_class: dict[str, dict[str, Any]] = {}
    for code in sorted((k for k in range(len(names)) if src_counts[k]), key=lambda k: names[k]):
        per_class[names[code]] = {
            "sources": int(src_counts[code]),
            "variants": int(var_counts[code]),
            "mean_score": round(float(np.mean(by_class[code])), 6),
        }
    return _summary(int(first.size), int(lams.size), scores, lams, per_class, alpha)


def _summary(n_sources: int, n_variants: int, scores: Any, lams: Any, per_class: dict[str, dict[str, Any]],
             alpha: float) -> dict[str, Any]:
    """The summary dict of :func:`summarize`: ``scores`` holds each source's score (in order of
    first appearance), ``lams`` every variant's λ."""
    counts, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    low = int((scores <= alpha).sum())
    return {
        "sources": n_sources,
        "variants": n_variants,
        "classes": len(per_class),
        "alpha": alpha,
        "low_sources": low,
        "high_sources": n_sources - low,
        "low_share": round(low / n_sources, 6) if n_sources else 0.0,
        "high_share": round(1 - low / n_sources, 6) if n_sources else 0.0,
        "mean_score": round(float(scores.mean()), 6) if scores.size else None,
        "score_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]},
        "lambda": {
            "mean": round(float(lams.mean()), 6) if lams.size else None,
            "min": round(float(lams.min()), 6) if lams.size else None,
            "max": round(float(lams.max()), 6) if lams.size else None,
        },
        "per_class": per_class,
    }
