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

# module -> the names it holds (the table above); imported on first use.
_EXPORTS = {name: module for module, names in {
    "base": ("Filter", "FilterContext", "FILTER_FORMAT", "register_filter", "filter_names", "make_filter"),
    "clip": ("ClipClassFilter", "ClipSourceFilter"),
    "classifier": ("ClassifierFilter", "CLASSIFIER_FORMAT", "train_filter_classifier", "save_filter_classifier",
                   "load_filter_classifier"),
    "derive": ("FILL", "FilterReport", "FilterRecord", "filter_plan", "read_filter_record"),
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
