"""The augmentation plan: which images to generate, with which prompt, λ and seed.

A plan lists M variants per real source image. It is a pure function of its inputs (images,
class names, prompts, scores, scaling, seed), stored as

* ``plan.jsonl`` — one JSON row per variant with ``source``, ``label``, ``class_name``,
  ``score``, ``variant``, ``prompt``, ``lambda``, ``seed``, ``source_sha256``;
* ``plan.json`` — how it was made (seed, shots, scaling, models, data root, prompts);
* ``summary.json`` — counts, the CLIPScore histogram and the share of Low/High images;
* ``columns/`` — the rows of ``plan.jsonl`` as memory-mapped arrays
  (:mod:`dalda_aug.plan.columns`), what readers load instead of parsing ``plan.jsonl``.

``plan.json`` records the SHA-256 of ``plan.jsonl`` and ``summary.json`` (``"digests"``) and of every
column file (``"column_digests"``), so a
folder mixing the files of two runs is refused when loaded (plans written before have no digests
and load as before).

Seeds come from (plan seed, source content hash, variant index), so a variant keeps its seed
whatever the dataset order, n-shot or batch it ends up in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from .._lazy import lazy_exports
from ..config import ModelConfig
from ..errors import InputError
from .columns import PlanColumns
from .folder import PLAN_FORMAT, load_plan, save_plan
from .summary import summarize, summarize_columns
from .variant import Variant, _Variants, derive_seed

__all__ = ["Variant", "AugmentationPlan", "build_plan", "derive_seed", "summarize", "MAX_VARIANTS", "PLAN_FORMAT"]

# names of plan.build, which imports this module: loaded on first use, so no import circle (the
# package's own modules import them from plan.build)
__getattr__, __dir__ = lazy_exports(__name__, {
    "build_plan": "build", "MAX_VARIANTS": "build", "BASE_TEMPLATE": "build", "Processes": "build",
    "Prompts": "build",
})


class AugmentationPlan:
    """An ordered list of :class:`Variant` plus how it was made. Iterate it for the variants.

    The rows live in :class:`~dalda_aug.plan.columns.PlanColumns` (mapped from ``PLAN/columns``
    when loaded from a folder that has them); a :class:`Variant` is made on access.
    """

    def __init__(self, variants: Sequence[Variant], config: dict[str, Any], summary: dict[str, Any] | None = None,
                 *, columns: PlanColumns | None = None):
        self.columns: PlanColumns = columns if columns is not None else PlanColumns.from_rows(variants)
        self.config: dict[str, Any] = dict(config)
        self.summary: dict[str, Any] = summary if summary is not None else summarize_columns(self.columns, self.config)
        self._by_source: dict[Any, list[Variant]] | None = None
        self._source_numbers: dict[Any, int] | None = None  # source_index(), kept for variants_for

    @property
    def variants(self) -> Sequence[Variant]:
        """The variants in plan order (a sequence view: each is made when accessed)."""
        return _Variants(self.columns)

    # -- container protocol -------------------------------------------------------------
    def __iter__(self) -> Iterator[Variant]:
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, index: int) -> Variant:
        return self.variants[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_by_source"] = None  # a mapped plan pickles as its folder, never as objects
        state["_source_numbers"] = None
        return state

    def __repr__(self) -> str:
        return (f"AugmentationPlan({self.summary.get('sources', '?')} sources x "
                f"{self.config.get('variants_per_image', '?')} variants = {len(self)} images, "
                f"scaling={self.config.get('scaling', {}).get('strategy', '?')}, seed={self.config.get('seed')})")

    # -- lookups -----------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names", []))

    @property
    def data_root(self) -> str | None:
        return self.config.get("data_root")

    def by_source(self) -> dict[Any, list[Variant]]:
        """``{source: [variants in variant order]}`` (one object per variant: for tools over small
        plans; the dataset uses :meth:`source_index` and :meth:`source_variants`)."""
        if self._by_source is None:
            cols = self.columns
            self._by_source = {cols.source(s): self.source_variants(s) for s in range(cols.n_sources)}
        return self._by_source

    def sources(self) -> list[Any]:
        """Distinct sources in plan order."""
        return self.columns.sources()

    def sources_without_variants(self) -> list[Any]:
        """Sources the plan covers but gives no variant: those of a derived plan
        (``dalda-aug filter``) whose every variant a filter rejected (``plan.json``'s
        ``filter.unkept_sources``). A dataset serves them real; ``[]`` for any other plan."""
        section = self.config.get("filter")
        listed = section.get("unkept_sources") if isinstance(section, dict) else None
        if listed is None:
            return []
        if not isinstance(listed, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                   for x in listed):
            raise InputError("plan.json: filter.unkept_sources must list sources (strings or integers)")
        return list(listed)

    def source_index(self) -> dict[Any, int]:
        """``{source: its number}``, sources numbered in plan order (one entry per source)."""
        return {source: s for s, source in enumerate(self.columns.sources())}

    def source_variants(self, s: int) -> list[Variant]:
        """The variants of source number ``s``, in variant order."""
        return [Variant(*self.columns.fields(int(i))) for i in self.columns.rows_of(s)]

    def variants_for(self, source: Any) -> list[Variant]:
        """The variants of ``source`` in variant order (``[]`` when it is not in the plan); made
        from the columns for that source only (no object per variant of the plan is kept)."""
        if self._by_source is not None:
            return self._by_source.get(source, [])
        numbers = getattr(self, "_source_numbers", None)
        if numbers is None:
            numbers = self._source_numbers = self.source_index()
        s = numbers.get(source)
        return [] if s is None else self.source_variants(s)

    @property
    def models(self) -> ModelConfig | None:
        data = self.config.get("models")
        return ModelConfig.from_dict(data) if data else None

    # -- files -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``plan.jsonl``, ``plan.json``, ``summary.json`` and ``columns/`` into ``directory``
        (:func:`~dalda_aug.plan.folder.save_plan`)."""
        return save_plan(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "AugmentationPlan":
        """The plan saved in ``directory`` (:func:`~dalda_aug.plan.folder.load_plan`: digests checked)."""
        plan: AugmentationPlan = load_plan(cls, directory)
        return plan
