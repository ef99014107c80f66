"""Filter a warmed plan into a derived plan: :func:`filter_plan`, :func:`read_filter_record`.

Steps: check the inputs (every variant cached, the out folder free) before any model loads;
score every variant (images decoded once from the cache, a chunk of :data:`CHUNK` variants at a
time, each filter in fixed-shape batches); keep, per source, the best ``keep`` passing variants
ranked by the first filter's score (ties: the lower variant index), topped up with the best
failing ones down to ``min_pass`` kept; save the derived plan and ``filter.json``.

**Resumable.** Each scored chunk is written at once to ``OUT/.filter-progress/<run>/<start>.npy``
(:func:`~dalda_aug._io.write_atomic`), ``<run>`` naming what fixes the scores (the parent plan's
key inputs, the generation fingerprint, every filter's fingerprint): a killed run, started
again, scores only the chunks it had not written. The folder is removed once the plan is saved.

**The derived plan** is a plan folder (:class:`~dalda_aug.plan.AugmentationPlan`, the same
digests and checks) holding the kept variants in the parent's order. Its ``plan.json`` has a
``"filter"`` section: the format, each filter's fingerprint, ``keep``/``min_pass``, the parent
plan (its folder and the SHA-256 of its ``plan.json``), the generation fingerprint, the sources
that kept no variant (``unkept_sources``: the dataset serves them real), and the SHA-256 of the
score columns under ``filter/``: ``scores.npy`` (float64, parent rows x filters),
``passed.npy`` (bool, parent rows x filters) and ``kept.npy`` (int64: the parent row of each
derived row). :func:`read_filter_record` reads them back as data (bounded, no pickle, digests
checked).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from .._io import read_regular, write_atomic
from ..errors import DaldaError, InputError
from .base import FILTER_FORMAT, Filter, FilterContext

__all__ = ["CHUNK", "FILL", "FilterReport", "FilterRecord", "filter_plan", "read_filter_record", "PROGRESS_DIR"]

#: Variants scored (and recorded for resuming) at a time.
CHUNK = 64
#: ``fill=``: ``"none"`` keeps passing variants only; ``"best"`` tops each source up to ``keep``
#: with its best failing variants (the same as ``min_pass=keep``).
FILL = ("none", "best")
PROGRESS_DIR = ".filter-progress"
SCORES_DIR = "filter"
_MAX_COLUMN_BYTES = 1 << 31


@dataclass
class FilterReport:
    """What :func:`filter_plan` did: the derived plan, the per-class table, the shortfall."""

    plan: Any
    out: Path
    table: list[dict[str, Any]]
    totals: dict[str, Any]
    scored: int  # variants scored by this run (the others came from the progress record)
    resumed: int

    def format_table(self) -> str:
        head = ("class", "candidates", "passed", "kept", "pass rate", "score q1", "median", "q3")
        rows = [head] + [(r["class"], str(r["candidates"]), str(r["passed"]), str(r["kept"]), f"{r['pass_rate']:.0%}",
                          *(f"{q:.3f}" for q in r["score_quartiles"])) for r in self.table]
        t = self.totals
        rows.append(("all", str(t["candidates"]), str(t["passed"]), str(t["kept"]), f"{t['pass_rate']:.0%}", "", "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)


@dataclass
class FilterRecord:
    """The ``"filter"`` section of a derived plan and its score columns (see the module doc)."""

    section: dict[str, Any]
    scores: npt.NDArray[np.float64]  # (parent rows, filters)
    passed: npt.NDArray[np.bool_]  # (parent rows, filters)
    kept: npt.NDArray[np.int64]  # (derived rows,): the parent row of each

    @property
    def specs(self) -> list[str]:
        return [str(f.get("spec")) for f in self.section.get("filters", [])]

    def parent_plan(self) -> Any:
        """The parent plan, loaded from the folder the section names (its ``plan.json`` checked
        against the recorded SHA-256)."""
        from ..plan import AugmentationPlan

        parent = self.section.get("parent") or {}
        folder = Path(str(parent.get("plan", "")))
        meta = folder / "plan.json"
        if not meta.is_file():
            raise InputError(f"the parent plan {folder} of this derived plan is gone (no plan.json)")
        if hashlib.sha256(read_regular(meta, 64 << 20, "plan file")).hexdigest() != parent.get("plan.json sha256"):
            raise InputError(f"the parent plan {folder} changed since it was filtered (plan.json differs)")
        plan = AugmentationPlan.load(folder)
        if len(plan) != self.scores.shape[0]:
            raise InputError(f"the parent plan {folder} has {len(plan)} variants, the filter scored "
                             f"{self.scores.shape[0]}")
        return plan


def _npy(array: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(path: Path, what: str) -> Any:
    data = read_regular(path, _MAX_COLUMN_BYTES, what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{what} {path} is not a NumPy array file: {exc}") from None


def read_filter_record(plan_or_folder: Any) -> FilterRecord | None:
    """The filter record of a derived plan (a plan folder, or a plan loaded from one), or None
    for a plan no filter made. Score files whose bytes differ from ``plan.json``'s digests, or
    whose shapes do not fit, are an :class:`InputError`."""
    from ..plan import AugmentationPlan

    if isinstance(plan_or_folder, AugmentationPlan):
        plan, folder = plan_or_folder, plan_or_folder.columns.directory
        if folder is None or not (Path(folder) / "plan.json").is_file():
            section = plan.config.get("filter")
            if section is None:
                return None
            raise InputError("a derived plan's scores are read from its folder: load it with AugmentationPlan.load")
    else:
        folder = Path(plan_or_folder)
        plan = AugmentationPlan.load(folder)
    section = plan.config.get("filter")
    if section is None:
        return None
    if not isinstance(section, dict) or section.get("format") != FILTER_FORMAT:
        raise InputError(f"{folder}/plan.json: its 'filter' section is not {FILTER_FORMAT!r}")
    digests = section.get("digests")
    if not isinstance(digests, dict):
        raise InputError(f"{folder}/plan.json: its 'filter' section records no digests")
    arrays = {}
    for name in ("scores", "passed", "kept"):
        path = Path(folder) / SCORES_DIR / f"{name}.npy"
        data = read_regular(path, _MAX_COLUMN_BYTES, "filter column")
        if hashlib.sha256(data).hexdigest() != digests.get(f"{SCORES_DIR}/{name}.npy"):
            raise InputError(f"plan folder {folder}: {SCORES_DIR}/{name}.npy differs from what plan.json records "
                             "(SHA-256): filter the plan again")
        arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
    n_filters = len(section.get("filters", []))
    scores, passed, kept = arrays["scores"], arrays["passed"], arrays["kept"]
    n_parent = scores.shape[0] if scores.ndim == 2 else -1
    if (scores.dtype != np.float64 or scores.shape != (n_parent, n_filters) or passed.dtype != np.bool_
            or passed.shape != scores.shape or kept.dtype != np.int64 or kept.shape != (len(plan),)
            or (kept.size and (int(kept.min()) < 0 or int(kept.max()) >= n_parent))):
        raise InputError(f"plan folder {folder}: the filter columns do not fit {len(plan)} kept variants of "
                         f"{n_filters} filters")
    return FilterRecord(section, scores, passed, kept)


# -- the steps --------------------------------------------------------------------------------------
def _check_inputs(plan: Any, cache: Any, filters: Sequence[Filter], keep: int, min_pass: int, out: Path,
                  overwrite: bool) -> list[str]:
    """Every variant's cache key, once the arguments are valid and the plan is all cached."""
    if not filters:
        raise InputError("give at least one filter (--by)")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InputError(f"--keep must be an integer >= 1, got {keep!r}")
    if isinstance(min_pass, bool) or not isinstance(min_pass, int) or not 0 <= min_pass <= keep:
        raise InputError(f"--min-pass must be an integer in [0, --keep={keep}], got {min_pass!r}")
    if (out / "plan.json").exists() and not overwrite:
        raise InputError(f"--out {out} already holds a plan; pass --overwrite to replace it")
    if plan.columns.directory is not None and Path(plan.columns.directory).resolve() == out.resolve():
        raise InputError(f"--out {out} is the plan's own folder; choose another")
    if plan.config.get("filter") is not None:
        raise InputError("this plan is already a derived plan; filter its parent plan with all the --by at once")
    if len(plan) == 0:
        raise InputError("the plan has no variants")
    keys = [cache.key(v) for v in plan]
    present = cache.present(keys)
    missing = len(keys) - int(np.count_nonzero(present))
    if missing:
        raise InputError(f"{missing} of the plan's {len(keys)} variants are not in the cache {cache.directory}: "
                         "fill it first with `dalda-aug warm` (a filter judges generated images)")
    return keys


def _run_name(plan: Any, spec_fingerprint: str, filters: Sequence[Filter], chunk: int) -> str:
    digest = hashlib.sha256(b"dalda_aug.filter-progress/1\0")
    digest.update(plan.columns.key_digest(np.arange(plan.columns.n_sources)).encode())
    digest.update(spec_fingerprint.encode())
    digest.update(json.dumps([f.fingerprint() for f in filters], sort_keys=True).encode())
    digest.update(str(chunk).encode())
    return digest.hexdigest()[:24]


def _read_progress(folder: Path, start: int, n: int, n_filters: int) -> npt.NDArray[np.float64] | None:
    path = folder / f"{start}.npy"
    if not path.is_file():
        return None
    try:
        array = _load_npy(path, "filter progress record")
    except InputError:
        return None  # a record that cannot be read is scored again
    if array.dtype != np.float64 or array.shape != (n, 2 * n_filters) \
            or not np.isin(array[:, n_filters:], (0.0, 1.0)).all() or not np.isfinite(array).all():
        return None
    return np.asarray(array)


def _source_loader(plan: Any) -> Any:
    """The plan's one source loader (:class:`~dalda_aug.plan.sources.SourceImages`), each source
    checked against its content hash."""
    from ..plan.sources import SourceImages

    if plan.data_root is None:
        raise InputError("clip-source needs the plan's source images, but the plan records no data_root")
    return SourceImages(plan)


def _score_all(plan: Any, cache: Any, keys: list[str], filters: Sequence[Filter], progress_dir: Path,
               progress: bool, chunk: int, share: tuple[int, int] = (0, 1)
               ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], int, int]:
    """Every variant's scores and passes, chunk by chunk from the progress record or scored (and
    recorded); with ``share=(rank, world)`` only chunk numbers ``rank, rank + world, ...`` (the
    others' rows are left unset)."""
    from tqdm.auto import tqdm

    n, f = len(keys), len(filters)
    scores = np.empty((n, f), dtype=np.float64)
    passed = np.empty((n, f), dtype=bool)
    labels = np.asarray(plan.columns.arrays["label"], dtype=np.int64)
    load_source = _source_loader(plan) if any(flt.NEEDS_SOURCES for flt in filters) else None
    scored = resumed = 0
    progress_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=n, desc="filtering", unit="img", disable=not progress) as bar:
        rank, world = share
        for start in range(rank * chunk, n, chunk * world):
            stop = min(start + chunk, n)
            done = _read_progress(progress_dir, start, stop - start, f)
            if done is None:
                images = []
                for key in keys[start:stop]:
                    image = cache.get_image(key)
                    if image is None:
                        raise InputError(f"cache entry {key} vanished (or was corrupt and removed) while filtering: "
                                         "fill the cache again with `dalda-aug warm`, then rerun (scored chunks are kept)")
                    images.append(image)
                sources = None if load_source is None else [load_source(plan.variants[r]) for r in range(start, stop)]
                done = np.empty((stop - start, 2 * f), dtype=np.float64)
                for j, flt in enumerate(filters):
                    s, ok = flt.score(images, labels[start:stop], sources if flt.NEEDS_SOURCES else None)
                    done[:, j], done[:, f + j] = s, ok
                write_atomic(progress_dir / f"{start}.npy", _npy(done))
                scored += stop - start
            else:
                resumed += stop - start
            scores[start:stop] = done[:, :f]
            passed[start:stop] = done[:, f:] == 1.0
            bar.update(stop - start)
    return scores, passed, scored, resumed


def _choose(plan: Any, scores: npt.NDArray[np.float64], passed_all: npt.NDArray[np.bool_], keep: int,
            min_pass: int) -> npt.NDArray[np.int64]:
    """Parent rows kept, in plan order: per source the best ``keep`` passing (first filter's score,
    then variant index), topped up to ``min_pass`` with the best failing ones."""
    cols = plan.columns
    variant = np.asarray(cols.arrays["variant"])
    chosen: list[int] = []
    for s in range(cols.n_sources):
        rows = np.asarray(cols.rows_of(s), dtype=np.int64)
        order = rows[np.lexsort((variant[rows], -scores[rows, 0]))]
        good = order[passed_all[order]][:keep]
        if len(good) < min_pass:
            bad = order[~passed_all[order]][: min_pass - len(good)]
            good = np.concatenate([good, bad])
        chosen.extend(good.tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _table(plan: Any, scores: npt.NDArray[np.float64], passed_all: npt.NDArray[np.bool_], kept: Any,
           keep: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cols = plan.columns
    labels = np.asarray(cols.arrays["label"], dtype=np.int64)
    source = np.asarray(cols.arrays["source"], dtype=np.int64)
    kept_mask = np.zeros(len(labels), dtype=bool)
    kept_mask[kept] = True
    names = plan.class_names or [str(c) for c in sorted(set(labels.tolist()))]
    table = []
    for label in sorted(set(labels.tolist())):
        rows = labels == label
        q = np.quantile(scores[rows, 0], [0.25, 0.5, 0.75]) if rows.any() else np.zeros(3)
        table.append({"class": names[label] if label < len(names) else str(label), "label": label,
                      "candidates": int(rows.sum()), "passed": int(passed_all[rows].sum()),
                      "kept": int(kept_mask[rows].sum()),
                      "pass_rate": round(float(passed_all[rows].mean()), 6),
                      "score_quartiles": [round(float(x), 6) for x in q]})
    kept_per_source = np.bincount(source[kept], minlength=cols.n_sources)
    short = np.maximum(keep - kept_per_source, 0)
    kept_passing = int((kept_mask & passed_all).sum())
    totals = {"candidates": int(len(labels)), "passed": int(passed_all.sum()), "kept": int(kept_mask.sum()),
              "kept_failing": int(kept_mask.sum()) - kept_passing,
              "pass_rate": round(float(passed_all.mean()), 6), "sources": int(cols.n_sources),
              "sources_short": int((short > 0).sum()), "shortfall": int(short.sum()),
              "sources_without_variants": int((kept_per_source == 0).sum())}
    return table, totals


def filter_plan(plan: Any, cache: Any, filters: Sequence[Filter | str], out: str | os.PathLike[str], *,
                keep: int, min_pass: int = 0, fill: str = "none", device: str = "cpu", models: Any = None,
                overwrite: bool = False, progress: bool = False, chunk: int = CHUNK,
                processes: Any = None) -> FilterReport:
    """Score every variant of ``plan`` (a plan folder or a plan loaded from one) from ``cache`` (a
    :class:`~dalda_aug.cache.SyntheticCache` with its spec) with ``filters`` (``--by`` texts or
    :class:`Filter` objects: all must pass, the first ranks) and write the derived plan to ``out``.

    ``keep``: at most this many variants per source; ``min_pass``: at least this many, topped up
    with the best failing ones (default 0: a source whose variants all fail is served real);
    ``fill="best"`` is ``min_pass=keep``. ``models``: the CLIP model of the CLIP filters (default:
    the plan's). ``chunk``: variants scored and recorded at a time. Resumable (see the module doc).

    ``processes``: an ``accelerate.PartialState`` (anything with ``process_index`` and
    ``num_processes``) when several processes filter together (``accelerate launch``,
    ``torchrun``; every process calls this with the same arguments): each scores every
    ``num_processes``-th chunk into the shared progress record, then the main process writes the
    derived plan from the record, the same files byte for byte as one process writes (a score
    depends on its image alone), and every process returns it."""
    from ..plan import AugmentationPlan
    from ..plan.build import process_share
    from .base import make_filter

    if isinstance(plan, (str, os.PathLike)):
        plan = AugmentationPlan.load(plan)
    if fill not in FILL:
        raise InputError(f"--fill must be one of {', '.join(FILL)}, got {fill!r}")
    built = [f if isinstance(f, Filter) else make_filter(f) for f in filters]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be an integer >= 1, got {chunk!r}")
    if fill == "best":
        min_pass = keep
    out = Path(out)
    if plan.columns.directory is None or not (Path(plan.columns.directory) / "plan.json").is_file():
        raise InputError("filter a plan saved in a folder (the derived plan refers to it)")
    if cache.spec is None:
        raise InputError("the cache needs its generation spec (SyntheticCache(dir).with_spec(...resolve_spec(plan)))")
    keys = _check_inputs(plan, cache, built, keep, min_pass, out, overwrite)

    context = FilterContext(class_names=tuple(plan.class_names), classes=tuple(plan.config.get("classes") or ()),
                            models=models if models is not None else plan.models, device=str(device))
    for flt in built:
        flt.load(context)
    run = _run_name(plan, cache.spec.fingerprint, built, chunk)
    progress_dir = out / PROGRESS_DIR / run
    rank, world = process_share(processes)
    if world > 1:  # each process scores its share into the record, then everyone reads it whole
        _, _, scored, resumed = _score_all(plan, cache, keys, built, progress_dir, progress and rank == 0, chunk,
                                           (rank, world))
        _barrier(world)
        scores, passed, _, _ = _score_all(plan, cache, keys, built, progress_dir, False, chunk)
        _barrier(world)  # every process has read the record before the main process removes it
    else:
        scores, passed, scored, resumed = _score_all(plan, cache, keys, built, progress_dir, progress, chunk)
    passed_all: npt.NDArray[np.bool_] = np.asarray(passed.all(axis=1), dtype=bool)
    kept = _choose(plan, scores, passed_all, keep, min_pass)
    table, totals = _table(plan, scores, passed_all, kept, keep)
    if rank != 0:
        _barrier(world)  # while the main process writes the derived plan
        return FilterReport(AugmentationPlan.load(out), out, table, totals, scored, resumed)

    parent_dir = Path(plan.columns.directory).resolve()
    kept_sources = set(np.asarray(plan.columns.arrays["source"])[kept].tolist())
    unkept = [plan.columns.source(s) for s in range(plan.columns.n_sources) if s not in kept_sources]
    columns = {"scores": _npy(scores), "passed": _npy(passed), "kept": _npy(kept)}
    section = {
        "format": FILTER_FORMAT,
        "filters": [f.fingerprint() for f in built],
        "keep": keep,
        "min_pass": min_pass,
        "fill": fill,
        "rank_by": built[0].spec,
        "generation_fingerprint": cache.spec.fingerprint,
        "parent": {"plan": str(parent_dir), "variants": len(plan),
                   "plan.json sha256": hashlib.sha256(read_regular(parent_dir / "plan.json", 64 << 20,
                                                                   "plan file")).hexdigest()},
        "unkept_sources": unkept,
        "totals": totals,
        "digests": {f"{SCORES_DIR}/{name}.npy": hashlib.sha256(data).hexdigest() for name, data in columns.items()},
    }
    config = {**plan.config, "variants_per_image": keep, "filter": section}
    derived = AugmentationPlan([plan.variants[int(r)] for r in kept], config)
    (out / SCORES_DIR).mkdir(parents=True, exist_ok=True)
    for name, data in columns.items():
        write_atomic(out / SCORES_DIR / f"{name}.npy", data)
    report = {"format": FILTER_FORMAT, "filters": section["filters"], "keep": keep, "min_pass": min_pass,
              "fill": fill, "parent": section["parent"], "per_class": table, "totals": totals,
              "unkept_sources": unkept}
    write_atomic(out / "filter.json", json.dumps(report, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    derived.save(out)  # plan.json last: a complete derived plan
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    try:
        cache.record_spec(derived)  # the derived plan finds its spec as its parent did
    except (DaldaError, OSError) as exc:  # a read-only cache still serves the derived plan (resolve_spec by content)
        import logging

        logging.getLogger(__name__).warning("could not record the generation spec for the derived plan in %s: %s",
                                            cache.directory, exc)
    if world > 1:
        _barrier(world)
    return FilterReport(AugmentationPlan.load(out), out, table, totals, scored, resumed)


def _barrier(world: int) -> None:
    """Wait for every process, over torch.distributed (a CPU gloo group when the default is not gloo)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        raise InputError(f"processes says {world} processes, but torch.distributed is not initialized for them "
                         "(build it with accelerate.PartialState() under `accelerate launch` or `torchrun`)")
    group: Any = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    dist.barrier(group=group)
    if group is not None:
        dist.destroy_process_group(group)
