"""Judging generated images: filters, and ``dalda-aug filter``'s derived plans (off by default).

A filter scores every variant of a warmed plan from its cached image and says whether it
passes; :func:`filter_plan` keeps the best passing variants per source and writes a *derived
plan*: a normal plan folder holding a subset of the parent's variants (same keys, so the same
cache entries), with the filters' scores as columns under ``filter/`` and their fingerprints in
``plan.json``. Nothing of this is part of DALDA's method: the paper generates and trains on
every planned variant.

=================  ===============================================================================
module             what it holds
=================  ===============================================================================
``base``           :class:`Filter`, the registry (:func:`register_filter`, :func:`make_filter`,
                   :func:`filter_names`), :class:`FilterContext`
``clip``           ``clip-class`` (zero-shot probability of the own class) and ``clip-source``
                   (image-image cosine with the source)
``classifier``     ``classifier:PATH`` and the classifier file (safetensors; ``train-filter``)
``derive``         :func:`filter_plan` (scoring, resumable; keeping; the derived plan, ``filter.json``),
                   :func:`read_filter_record`
=================  ===============================================================================

Names are imported on first use: ``import dalda_aug.filters`` is light.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "Filter": "base",
    "FilterContext": "base",
    "FILTER_FORMAT": "base",
    "register_filter": "base",
    "filter_names": "base",
    "make_filter": "base",
    "ClipClassFilter": "clip",
    "ClipSourceFilter": "clip",
    "ClassifierFilter": "classifier",
    "CLASSIFIER_FORMAT": "classifier",
    "train_filter_classifier": "classifier",
    "save_filter_classifier": "classifier",
    "load_filter_classifier": "classifier",
    "FILL": "derive",
    "FilterReport": "derive",
    "FilterRecord": "derive",
    "filter_plan": "derive",
    "read_filter_record": "derive",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
