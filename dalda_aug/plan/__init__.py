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

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence, Union

import numpy as np

from .._io import loads_bounded, read_json_object, write_atomic
from .ags import Scaling, ags_parameters, sample_scales
from ..config import ModelConfig
from ..data import ImageSource, SourceItem, check_scaled_size, image_sha256
from ..errors import InputError, MissingFileError
from .columns import PlanColumns, lf_sha256
from ..presets import PHOTO_TEMPLATE

if TYPE_CHECKING:
    from .clipscore import CLIPScorer
    from ..prompts import PromptBank

# A prompt bank, or {class name: [prompts]}.
Prompts = Union["PromptBank", Mapping[str, Sequence[str]]]

__all__ = ["Variant", "AugmentationPlan", "build_plan", "derive_seed", "MAX_VARIANTS", "PLAN_FORMAT"]

PLAN_FORMAT = "dalda_aug.plan/1"
_DIGESTS = "digests"  # key of plan.json: {"plan.jsonl": sha256, "summary.json": sha256}
_COLUMN_DIGESTS = "column_digests"  # key of plan.json: {"columns/<name>.npy": sha256}
#: The most variants per source image a plan may hold (the paper uses 10; a mistyped -M 1000000000
#: would ask for tens of GiB before anything else happens).
MAX_VARIANTS = 10_000
_MAX_ROW_BYTES = 1024 * 1024  # one plan.jsonl row (a row is well under 1 KiB; prompts are one sentence)
BASE_TEMPLATE = PHOTO_TEMPLATE
# Source images read (decoded, hashed, resized) and scored at a time: the chunk being scored (its
# pixel tensor, about 77 MB at 224 px) and the one being read (resized RGB images, about 19 MB) are
# held. A multiple of clipscore.SCORE_BLOCK, so only the last block of a plan is padded; any value
# gives the same scores.
_CHUNK = 128
_READ_WORKERS = min(8, os.cpu_count() or 1)  # threads that decode, hash and resize sources


class Processes(Protocol):
    """This process's place among the processes that plan together (``accelerate.PartialState``)."""

    @property
    def process_index(self) -> int: ...

    @property
    def num_processes(self) -> int: ...


def derive_seed(seed: int, source_sha256: str, variant: int, purpose: str = "generation") -> int:
    """A 63-bit seed from (plan seed, source content hash, variant index, purpose)."""
    blob = f"{int(seed)}:{source_sha256}:{int(variant)}:{purpose}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Variant:
    """One planned synthetic image (``lam`` is λ, stored as ``"lambda"`` in JSON)."""

    source: str | int
    label: int
    class_name: str
    score: float
    variant: int
    prompt: str
    lam: float
    seed: int
    source_sha256: str
    # img2img strength of a DA-Fusion variant (then equal to ``lam``, which carries it into the
    # request and the cache key); None for the other methods.
    strength: float | None = None

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "source": self.source,
            "label": self.label,
            "class_name": self.class_name,
            "score": self.score,
            "variant": self.variant,
            "prompt": self.prompt,
            "lambda": self.lam,
            "seed": self.seed,
            "source_sha256": self.source_sha256,
        }
        if self.strength is not None:
            row["strength"] = self.strength
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "plan") -> "Variant":
        if not isinstance(row, dict):
            raise InputError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        for name, kinds in (("source", (str, int)), ("class_name", str), ("prompt", str), ("source_sha256", str)):
            if name in row and (not isinstance(row[name], kinds) or isinstance(row[name], bool)):
                raise InputError(f"{where}: field {name!r} must be a {'string or integer' if name == 'source' else 'string'}, "
                                 f"got {type(row[name]).__name__}")
        for name in ("label", "score", "variant", "lambda", "seed", "strength"):
            if isinstance(row.get(name), (dict, list)):
                raise InputError(f"{where}: field {name!r} must be a number, got {type(row[name]).__name__}")
        try:
            return cls(
                source=row["source"],
                label=int(row["label"]),
                class_name=str(row["class_name"]),
                score=float(row["score"]),
                variant=int(row["variant"]),
                prompt=str(row["prompt"]),
                lam=float(row["lambda"]),
                seed=int(row["seed"]),
                source_sha256=str(row["source_sha256"]),
                strength=float(row["strength"]) if row.get("strength") is not None else None,
            )
        except KeyError as exc:
            raise InputError(f"{where}: row is missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: bad value in row: {exc}") from None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


# A code point UTF-8 cannot hold: the surrogates os.fsdecode gives a file name's bytes that are not UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8_rows(text: str) -> str:
    """JSON text as it can be written in UTF-8: each lone surrogate (only ever inside a JSON string
    here: a source path whose file name is not UTF-8) written as its ``\\uXXXX`` escape, which
    ``json.loads`` reads back as the same surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)
    return text


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str | None:
    """SHA-256 of a text file's bytes (CRLF read as LF), ``None`` when it does not exist."""
    if not path.is_file():
        return None
    return lf_sha256(path)


class _Variants(Sequence[Variant]):
    """The plan's variants, made from its columns on access (no object kept per variant)."""

    def __init__(self, columns: PlanColumns) -> None:
        self._columns = columns

    def __len__(self) -> int:
        return len(self._columns)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"variant {index} is out of range for a plan of {len(self)} variants")
        return Variant(*self._columns.fields(i))

    def __iter__(self) -> Iterator[Variant]:
        return (Variant(*self._columns.fields(i)) for i in range(len(self)))


class AugmentationPlan:
    """An ordered list of :class:`Variant` plus how it was made. Iterate it for the variants.

    The rows live in :class:`~dalda_aug.plan.columns.PlanColumns` (mapped from ``PLAN/columns``
    when loaded from a folder that has them); a :class:`Variant` is made on access.
    """

    def __init__(self, variants: Sequence[Variant], config: dict[str, Any], summary: dict[str, Any] | None = None,
                 *, columns: PlanColumns | None = None):
        self.columns: PlanColumns = columns if columns is not None else PlanColumns.from_rows(variants)
        self.config: dict[str, Any] = dict(config)
        self.summary: dict[str, Any] = summary if summary is not None else _summarize_columns(self.columns, self.config)
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
        """Write ``plan.jsonl``, ``plan.json``, ``summary.json`` and ``columns/`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = _utf8_rows("".join(_dumps(v.to_row()) + "\n" for v in self.variants))
        summary = json.dumps(self.summary, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        write_atomic(directory / "plan.jsonl", rows)
        write_atomic(directory / "summary.json", summary)
        digests = {"plan.jsonl": _sha256(rows), "summary.json": _sha256(summary)}
        columns = self.columns.save(directory, len(rows.encode("utf-8")), digests["plan.jsonl"])
        # plan.json last: its presence marks a complete plan. It records what the others hold.
        config = {**self.config, _DIGESTS: digests, _COLUMN_DIGESTS: columns}
        write_atomic(directory / "plan.json", json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "AugmentationPlan":
        directory = Path(directory)
        meta_path, rows_path = directory / "plan.json", directory / "plan.jsonl"
        if not directory.is_dir():
            raise MissingFileError(f"plan folder not found: {directory}")
        for p in (meta_path, rows_path):
            if not p.is_file():
                raise MissingFileError(f"not a complete plan folder: {p} is missing (write one with `dalda-aug plan`)")
        config = read_json_object(meta_path, "plan file")
        if config.get("format") != PLAN_FORMAT:
            raise InputError(f"{meta_path}: unsupported plan format {config.get('format')!r} (expected {PLAN_FORMAT!r})")
        digests = config.pop(_DIGESTS, None)  # absent in plans written before digests were recorded
        if digests is not None and not (isinstance(digests, dict)
                                        and all(isinstance(v, str) for v in digests.values())):
            raise InputError(f"{meta_path}: {_DIGESTS!r} must map file names to SHA-256 digests")
        column_digests = config.pop(_COLUMN_DIGESTS, None)  # absent in plans written before columns
        if column_digests is not None and not (isinstance(column_digests, dict)
                                               and all(isinstance(v, str) for v in column_digests.values())):
            raise InputError(f"{meta_path}: {_COLUMN_DIGESTS!r} must map file names to SHA-256 digests")
        classes = config.get("classes")
        n_classes = len(classes) if isinstance(classes, list) else None
        mapped = cls._load_columns(directory, config, digests or {}, column_digests or {}, n_classes)
        if mapped is not None:
            return mapped
        variants = []
        outside: str | None = None  # the first row whose label the plan's classes cannot hold
        rows_hash = hashlib.sha256()
        with rows_path.open("rb") as fh:
            lineno = 0
            while raw := fh.readline(_MAX_ROW_BYTES + 1):
                lineno += 1
                rows_hash.update(raw[:-2] + b"\n" if raw.endswith(b"\r\n") else raw)  # as written on Windows
                where = f"{rows_path}:{lineno}"
                if len(raw) > _MAX_ROW_BYTES:
                    raise InputError(f"{where}: row longer than {_MAX_ROW_BYTES >> 20} MiB; refusing to read it")
                if not raw.strip():
                    continue
                try:
                    row = loads_bounded(raw.decode("utf-8"), where)
                except UnicodeDecodeError as exc:
                    raise InputError(f"{where}: not UTF-8 text: {exc}") from None
                variant = Variant.from_row(row, where)
                if outside is None and n_classes is not None and not 0 <= variant.label < n_classes:
                    outside = (f"{where}: label {variant.label} is outside the {n_classes} classes of {meta_path}; "
                               "do plan.jsonl and plan.json come from the same run?")
                variants.append(variant)
        summary_path = directory / "summary.json"
        summary = read_json_object(summary_path, "plan summary") if summary_path.is_file() else None
        if digests is not None:
            mixed = [name for name, actual in (("plan.jsonl", rows_hash.hexdigest()),
                                               ("summary.json", _file_sha256(summary_path)))
                     if name in digests and actual is not None and digests[name] != actual]
            if mixed:
                raise InputError(
                    f"plan folder {directory}: {' and '.join(mixed)} differ{'s' if len(mixed) == 1 else ''} from what "
                    "plan.json records (SHA-256): the files come from two runs or were edited; write the plan "
                    "again with `dalda-aug plan`"
                )
        if outside is not None:
            raise InputError(outside)
        return cls(variants, config, summary)

    @classmethod
    def _load_columns(cls, directory: Path, config: dict[str, Any], digests: dict[str, str],
                      column_digests: dict[str, str], n_classes: int | None) -> "AugmentationPlan | None":
        """The plan mapped from ``directory/columns`` (digests checked), or None where the folder
        has no columns that plan.json records (then plan.jsonl is parsed)."""
        rows_path, summary_path = directory / "plan.jsonl", directory / "summary.json"
        columns = PlanColumns.load(directory, column_digests, rows_path.stat().st_size,
                                   rows_digest=digests.get("plan.jsonl"))
        if columns is None:
            return None
        summary = read_json_object(summary_path, "plan summary") if summary_path.is_file() else None
        if "summary.json" in digests and _file_sha256(summary_path) not in (None, digests["summary.json"]):
            raise InputError(f"plan folder {directory}: summary.json differs from what plan.json records (SHA-256): "
                             "the files come from two runs or were edited; write the plan again with `dalda-aug plan`")
        labels = columns.arrays["label"]
        if n_classes is not None and labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            row = int(np.flatnonzero((labels < 0) | (labels >= n_classes))[0])
            raise InputError(f"{rows_path}:{row + 1}: label {int(labels[row])} is outside the {n_classes} classes of "
                             f"{directory / 'plan.json'}; do plan.jsonl and plan.json come from the same run?")
        _check_scaling_bounds(columns, config, directory)
        return cls([], config, summary, columns=columns)


def _check_scaling_bounds(columns: PlanColumns, config: dict[str, Any], directory: Path) -> None:
    """The bounds the plan's scaling puts on its columns (as :func:`build_plan` draws them): AGS
    reads scores in [0, 1], and AGS and RS draw λ in [0, 1]; an :class:`InputError` naming the
    column file otherwise."""
    scaling = config.get("scaling")
    strategy = scaling.get("strategy") if isinstance(scaling, dict) else None
    bounded = (("score", "lambda") if strategy == "ags" else ("lambda",) if strategy == "rs" else ())
    for name in bounded:
        values = columns.arrays[name]
        bad = (values < 0.0) | (values > 1.0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{directory / 'columns' / (name + '.npy')}: {name} {float(values[row])!r} of row {row} "
                             f"lies outside [0, 1], which a plan of scaling {strategy!r} never holds")


def summarize(variants: Sequence[Variant], config: dict[str, Any]) -> dict[str, Any]:
    """Counts, the score histogram (10 bins on [0, 1]) and the Low/High shares."""
    alpha = float(config.get("scaling", {}).get("ags", {}).get("alpha", 0.3))
    per_source: dict[Any, Variant] = {}
    for v in variants:
        per_source.setdefault(v.source, v)
    scores = np.array([v.score for v in per_source.values()], dtype=np.float64)
    lams = np.array([v.lam for v in variants], dtype=np.float64)
    per_class: dict[str, dict[str, Any]] = {}
    src_per_class = Counter(v.class_name for v in per_source.values())
    var_per_class = Counter(v.class_name for v in variants)
    for name in sorted(src_per_class):
        cls_scores = [v.score for v in per_source.values() if v.class_name == name]
        per_class[name] = {
            "sources": src_per_class[name],
            "variants": var_per_class[name],
            "mean_score": round(float(np.mean(cls_scores)), 6),
        }
    return _summary(len(per_source), len(variants), scores, lams, per_class, alpha)


def _summarize_columns(columns: PlanColumns, config: dict[str, Any]) -> dict[str, Any]:
    """:func:`summarize` of the plan whose rows ``columns`` holds, from its arrays (no Variant made).

    The same dict, float for float: every mean is taken over an array holding the same values in
    the same order as :func:`summarize`'s (each source's first row, sources in order of first
    appearance; the classes in sorted order)."""
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


def _class_prompts(prompts: Prompts | None, class_name: str, base_name: str | None = None) -> list[str]:
    if prompts is None:
        return [BASE_TEMPLATE.format(base_name if base_name is not None else class_name)]
    if class_name not in prompts:
        raise InputError(f"the prompt bank has no prompts for class {class_name!r}")
    found = [str(p).replace("{name}", base_name if base_name is not None else class_name) for p in prompts[class_name]]
    if not found:
        raise InputError(f"the prompt bank has an empty prompt list for class {class_name!r}")
    return found


_READ_SLICE = 16  # sources one reading task decodes, hashes and prepares


def _read_slice(items: Sequence[SourceItem], scorer: CLIPScorer | None) -> tuple[list[str], list[Any]]:
    """Decode each source, hash its pixels and (with a scorer) prepare it for CLIP, in order; an
    image whose resize for CLIP would be too large is refused (naming it) before it is resized."""
    hashes, prepared = [], []
    edge = scorer.input_edge if scorer is not None else 0
    for item in items:
        img = item.load()
        hashes.append(image_sha256(img))
        if scorer is not None:
            check_scaled_size(img.size, edge, str(getattr(item.load, "path", None) or f"source {item.source!r}"))
            prepared.append(scorer.prepare(img))
    return hashes, prepared


def _read_and_score(items: Sequence[SourceItem], class_names: Sequence[str], scorer: CLIPScorer | None,
                    progress: bool = False, workers: int | None = None) -> tuple[list[str], np.ndarray | None]:
    """Content hashes of ``items`` and, with a scorer, their CLIPScores (else ``None``).

    Sources are read ``_CHUNK`` at a time by ``workers`` threads (``_READ_WORKERS`` by default),
    each task decoding, hashing and preparing ``_READ_SLICE`` sources (PIL decoding and resizing,
    hashlib and torch release the GIL), while the scorer runs on the previous chunk; results keep
    the order of ``items`` and the first unreadable item raises, as in a plain loop. The scores are
    those :meth:`~dalda_aug.plan.clipscore.CLIPScorer.score` gives each image alone: they do not depend on
    the chunk, the order, the number of threads or the other items.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    items = list(items)
    workers = _READ_WORKERS if workers is None else int(workers)
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers!r}")
    hashes: list[str] = []
    chunks: list[np.ndarray] = []
    if scorer is not None and items:
        scorer.load()  # before the threads use its transform
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dalda-read")

    def submit(start: int) -> list[Future[tuple[list[str], list[Any]]]]:
        stop = min(start + _CHUNK, len(items))
        return [pool.submit(_read_slice, items[i : min(i + _READ_SLICE, stop)], scorer)
                for i in range(start, stop, _READ_SLICE)]

    try:
        with tqdm(total=len(items), desc="reading and scoring sources", unit="img", disable=not progress) as bar:
            pending = submit(0)
            for start in range(0, len(items), _CHUNK):
                done = [f.result() for f in pending]
                pending = submit(start + _CHUNK)
                prepared: list[Any] = []
                for part_hashes, part_prepared in done:
                    hashes.extend(part_hashes)
                    prepared.extend(part_prepared)
                if scorer is not None:
                    labels = [item.label for item in items[start : start + len(prepared)]]
                    chunks.append(scorer.score(scorer.pixels(prepared), labels, class_names, progress=False))
                bar.update(min(_CHUNK, len(items) - start))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if scorer is None:
        return hashes, None
    return hashes, np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)


def _process_share(processes: Processes | None) -> tuple[int, int]:
    if processes is None:
        return 0, 1
    rank, world = int(processes.process_index), int(processes.num_processes)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"processes: process_index {rank} is not in [0, num_processes={world})")
    return rank, world


def _gather_shares(hashes: list[str], scores: np.ndarray | None, world: int) -> tuple[list[str], np.ndarray | None]:
    """Every process's (hashes, scores), concatenated in process order, on every process.

    Over torch.distributed on a CPU gloo group (a new one when the default group is NCCL); the
    float64 scores travel exactly. Only this library's own processes exchange these objects.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        raise InputError(f"processes says {world} processes, but torch.distributed is not initialized for them "
                         "(build it with accelerate.PartialState() under `accelerate launch` or `torchrun`)")
    # new_group is typed to return a marker for non-members; every process is a member here
    group: Any = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    share = (hashes, None if scores is None else [float(x) for x in scores])
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, share, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    all_hashes = [sha for part_hashes, _ in gathered for sha in part_hashes]
    if scores is None:
        return all_hashes, None
    return all_hashes, np.array([x for _, part in gathered for x in part], dtype=np.float64)


def _variant_seeds(seed: int, source_sha256: str, variants: int) -> list[int]:
    """``[derive_seed(seed, source_sha256, k) for k in range(variants)]``, the common prefix hashed once."""
    prefix = hashlib.sha256(f"{int(seed)}:{source_sha256}:".encode())
    out = []
    for k in range(variants):
        h = prefix.copy()
        h.update(f"{k}:generation".encode())
        out.append(int.from_bytes(h.digest()[:8], "big") >> 1)
    return out


_LAMBDA_BLOCK = 1 << 16  # λ drawn by inversion this many at a time (bounds the temporaries' memory)


def _draw_lambdas(hashes: Sequence[str], scores: np.ndarray, shots: Sequence[int], variants: int, seed: int,
                  scaling: Scaling) -> np.ndarray:
    """The ``(sources, variants)`` λ of a plan: row ``i`` is
    ``sample_scales(np.full(variants, scores[i]), shots[i], rng_i, scaling)`` with ``rng_i`` seeded by
    ``derive_seed(seed, hashes[i], 0, "lambda")``, exactly.

    AGS's truncated normal (``ags.sample_lambda``) inverts scipy's ``truncnorm`` CDF, whose call costs
    about a millisecond whatever its size: there each source's uniforms are drawn from its own
    generator as ``sample_lambda`` draws them, and the inversion, an elementwise function, runs over
    many sources at once. The other strategies call :func:`~dalda_aug.plan.ags.sample_scales` per source.
    """
    n_sources = len(hashes)
    rngs = (np.random.default_rng(derive_seed(seed, sha, 0, "lambda")) for sha in hashes)
    if scaling.strategy != "ags" or scaling.ags.mode != "truncnorm":
        out = np.empty((n_sources, variants), dtype=np.float64)
        for i, rng in enumerate(rngs):
            out[i] = sample_scales(np.full(variants, scores[i]), shots[i], rng, scaling)
        return out
    from scipy.stats import truncnorm

    # what sample_lambda draws, per source: u = rng.random(variants) after ags_parameters (no draw)
    uniforms = np.empty((n_sources, variants), dtype=np.float64)
    for i, rng in enumerate(rngs):
        uniforms[i] = rng.random(variants)
    u = uniforms.reshape(-1)
    row_scores = np.repeat(np.asarray(scores, dtype=np.float64), variants)
    row_shots = np.repeat(np.asarray(shots, dtype=np.int64), variants)
    out = np.empty(u.shape, dtype=np.float64)
    for start in range(0, u.size, _LAMBDA_BLOCK):
        part = slice(start, start + _LAMBDA_BLOCK)
        mu, sigma, lo, hi = ags_parameters(row_scores[part], row_shots[part], scaling.ags)
        a = (lo - mu) / sigma
        b = (hi - mu) / sigma
        out[part] = np.clip(truncnorm.ppf(u[part], a, b, loc=mu, scale=sigma), lo, hi)
    return out.reshape(n_sources, variants)


def build_plan(
    source: ImageSource | str | os.PathLike[str],
    *,
    variants: int = 10,
    seed: int = 0,
    n_shot: int | None = None,
    scaling: Scaling = Scaling(),
    prompts: Prompts | None = None,
    models: ModelConfig | None = None,
    scorer: CLIPScorer | None = None,
    scores: Sequence[float] | None = None,
    progress: bool | None = None,
    base_prompt_names: str = "readable",
    processes: Processes | None = None,
) -> AugmentationPlan:
    """Plan ``variants`` synthetic images per real image.

    Args:
        source: an image folder path or an :class:`~dalda_aug.data.ImageSource`
            (``ImageSource.from_dataset(ds)`` wraps any dataset of ``(PIL image, label)``).
        variants: M, images to generate per source image.
        seed: the plan seed; every λ, prompt order and generation seed derives from it.
        n_shot: if given, keep ``n_shot`` images per class with a seeded split (nested in n);
            σ of AGS uses it. Otherwise all images are used and n is each class's image count.
        scaling: λ strategy (:class:`~dalda_aug.plan.ags.Scaling`).
        prompts: a :class:`~dalda_aug.prompts.PromptBank` (or ``{class name: [prompts]}``);
            ``None`` uses "a photo of a {class}". Variant k gets prompt k of its class in a
            per-image seeded order (cycling if the class has fewer than M prompts).
        models: where the CLIP model lives (``ModelConfig()`` by default); recorded in the plan.
        scorer: a :class:`~dalda_aug.plan.clipscore.CLIPScorer` (built from ``models`` if omitted).
        scores: precomputed CLIPScores, one per source image (skips the scorer).
        base_prompt_names: the class name written into the base prompt (and into a prompt
            bank's ``{name}`` placeholders): ``"readable"`` ("a photo of a american bulldog",
            the paper's text) or ``"folder"`` (the folder name as is, "a photo of a
            american_bulldog", as the reference code writes it). CLIPScores always use the
            readable names.
        processes: an ``accelerate.PartialState`` (or anything with ``process_index`` and
            ``num_processes``) when several processes plan together (``accelerate launch``,
            ``torchrun``): every process must call ``build_plan`` with the same arguments; each
            reads and scores its share of the sources, the shares are gathered over
            ``torch.distributed`` (a CPU gloo group) and every process returns the whole plan,
            the same as one process makes. Save it from the main process only.
    """
    if base_prompt_names not in ("readable", "folder"):
        raise InputError(f"base_prompt_names must be 'readable' or 'folder', got {base_prompt_names!r}")
    if int(variants) != variants or not 1 <= variants <= MAX_VARIANTS:
        raise InputError(f"variants must be an integer in [1, {MAX_VARIANTS}], got {variants!r}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(scaling, Scaling):
        raise InputError(f"scaling must be a Scaling, got {type(scaling).__name__}")
    if not isinstance(source, ImageSource):
        source = ImageSource.from_folder(source)
    if n_shot is not None:
        source = source.few_shot(n_shot, seed)
    if len(source) == 0:
        raise InputError("no source images to plan for")
    models = models or ModelConfig()
    class_names = source.class_names
    for name in set(class_names):
        _class_prompts(prompts, name)  # fail early on a missing class

    labels = [item.label for item in source.items]
    if scores is not None:
        scores_arr = np.asarray(scores, dtype=np.float64)
        if scores_arr.shape != (len(labels),):
            raise InputError(f"got {scores_arr.size} scores for {len(labels)} source images")
        score_kind = "given"
    elif scorer is None:
        from .clipscore import CLIPScorer

        scorer = CLIPScorer.from_models(models)
    # Each process (one without `processes`) reads, hashes and scores its contiguous share of the
    # sources; the shares are gathered in process order. A score does not depend on which images
    # share its forward pass (clipscore.SCORE_BLOCK), so any split gives the one-process plan.
    rank, world = _process_share(processes)
    lo, hi = rank * len(labels) // world, (rank + 1) * len(labels) // world
    show = (progress if progress is not None else len(labels) > _CHUNK) and rank == 0
    hashes, read_scores = _read_and_score(source.items[lo:hi], class_names, scorer if scores is None else None,
                                          progress=show)
    if world > 1:
        hashes, read_scores = _gather_shares(hashes, read_scores, world)
    if scores is None:
        assert read_scores is not None  # a scorer was given or built above
        scores_arr = read_scores
        score_kind = getattr(scorer, "kind", "softmax")
    if len(source.classes) == 1 and score_kind == "softmax" and scaling.strategy == "ags":
        import logging

        logging.getLogger(__name__).warning(
            "%s holds one class (%s): a softmax CLIPScore over one class is always 1, so AGS draws every λ from "
            "its High range whatever the image; add classes, or score with kind 'cosine' (--score-kind cosine)",
            source.root or "the source", source.classes[0])
    bad = np.flatnonzero(~np.isfinite(scores_arr) | (scores_arr < 0) | (scores_arr > 1))
    if bad.size and scaling.strategy == "ags":
        i = int(bad[0])
        raise InputError(f"score {float(scores_arr[i])!r} of {source.items[i].source!r} lies outside [0, 1]")

    per_class = Counter(labels)
    shots = [n_shot if n_shot is not None else per_class[label] for label in labels]
    lams = _draw_lambdas(hashes, scores_arr, shots, int(variants), seed, scaling)
    options_of: dict[int, list[str]] = {}  # each class's prompts, built once
    rows: list[Variant] = []
    for item, sha, score, source_lams in zip(source.items, hashes, scores_arr, lams):
        label = item.label
        options = options_of.get(label)
        if options is None:
            options = options_of[label] = _class_prompts(
                prompts, class_names[label], source.classes[label] if base_prompt_names == "folder" else None)
        name = class_names[label]
        # a permutation of one prompt is [0]: the seeded order is drawn only where there is a choice
        order = (np.random.default_rng(derive_seed(seed, sha, 0, "prompts")).permutation(len(options)).tolist()
                 if len(options) > 1 else [0])
        rounded = round(float(score), 8)
        for k, (lam, variant_seed) in enumerate(zip(source_lams.tolist(), _variant_seeds(seed, sha, int(variants)))):
            rows.append(Variant(item.source, label, name, rounded, k, options[order[k % len(options)]],
                                round(lam, 8), variant_seed, sha))
    provenance = dict(getattr(prompts, "provenance", None) or {"backend": "unknown"}) if prompts is not None else None
    config = {
        "format": PLAN_FORMAT,
        "seed": int(seed),
        "n_shot": n_shot,
        "variants_per_image": int(variants),
        "scaling": scaling.to_dict(),
        "score_kind": score_kind,
        "models": models.to_dict(),
        "data_root": source.root,
        "classes": source.classes,
        "class_names": class_names,
        "prompts": provenance if prompts is not None else {"backend": "template", "template": BASE_TEMPLATE,
                                                           "class_names": base_prompt_names},
    }
    return AugmentationPlan(rows, config)
