"""The checks a :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` makes at construction: its
arguments, its sources against the plan's content hashes, and how many planned variants the cache
holds (a warning where that changes what is trained on).

A changed source file is an :class:`~dalda_aug.errors.InputError`; ``verify_sources="stat"``, the
default, decodes only files whose size, mtime, inode or ctime changed since they last matched.
Below 100 % of the plan cached with ``on_miss="real"``, a ``UserWarning`` says so."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from ..cache import SyntheticCache
from ..cache.spec import digest_hex, variant_digests
from ..data import image_sha256, load_image
from ..errors import DaldaError, InputError
from ..plan.records import STAT_FIELDS, CoverageRecord, StatRecord, file_stats
from .bases import unwrap

__all__ = ["ON_MISS", "ITEMS", "VERIFY_SOURCES", "check_arguments", "check_generator", "check_sources",
           "measure_coverage"]

ON_MISS = ("generate", "wait", "real", "error")
#: What ``items=`` may be: every item of the base, or only the items whose source is in the plan.
ITEMS = ("all", "plan")
#: What ``verify_sources=`` may be: re-hash only files whose stat changed, every file, or none.
VERIFY_SOURCES = ("stat", "full", "off")


def check_arguments(base: Any, plan: Any, cache: Any, p: Any, on_miss: Any, seed: Any, items: Any,
                     wait_timeout: Any) -> Any:
    """The plan (loaded when given as a folder) once the arguments are valid; else :class:`InputError`."""
    from ..plan import AugmentationPlan

    if isinstance(plan, (str, os.PathLike)):
        plan = AugmentationPlan.load(plan)
    if not isinstance(plan, AugmentationPlan):
        raise InputError(f"plan must be an AugmentationPlan or a plan folder, got {type(plan).__name__}")
    if not isinstance(cache, SyntheticCache):
        raise InputError(f"cache must be a SyntheticCache, got {type(cache).__name__}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise InputError(f"p must be a probability in [0, 1], got {p!r}")
    if on_miss not in ON_MISS:
        raise InputError(f"on_miss must be one of {list(ON_MISS)}, got {on_miss!r}")
    if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
        raise InputError(f"seed must be an integer >= 0 or None, got {seed!r}")
    if items not in ITEMS:
        raise InputError(f"items must be one of {list(ITEMS)}, got {items!r}")
    if wait_timeout <= 0:
        raise InputError(f"wait_timeout must be > 0, got {wait_timeout!r}")
    if type(base).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise InputError("the base is a Hugging Face DatasetDict: pick a split (dataset['train'])")
    return plan


def check_generator(generator: Any) -> None:
    if generator is not None and not (hasattr(generator, "generate") or callable(generator)):
        raise InputError(f"generator must be an IPAdapterGenerator or a factory, got {type(generator).__name__}")



def check_sources(ds: Any, listed: list[str] | None = None) -> None:
    """Every planned source's pixels against the plan's content hash, as ``verify_sources`` says:
    with ``"stat"``, the files read by path whose stat matches the record are not decoded."""
    if ds.verify_sources == "off":
        return
    planned = np.flatnonzero(ds._item_source >= 0).tolist()
    by_stat = planned if ds.verify_sources == "stat" and ds._reads_files else []
    record, known, stats = None, None, np.zeros((0, len(STAT_FIELDS)), dtype=np.int64)
    if by_stat:
        if listed is None or len(listed) != len(ds._item_source):
            listed = ds._adapter.stock_paths()  # in bulk: the same paths as stock_path(i)
        paths = [listed[i] for i in by_stat] if listed is not None else [ds._adapter.stock_path(i)
                                                                           for i in by_stat]
        record = StatRecord(paths, ds._plan.columns.source_hashes(ds._item_source[by_stat]))
        known = record.load()
        stats = file_stats(paths)
    unchanged = np.zeros(len(planned), dtype=bool)
    if known is not None:
        unchanged = (known == stats).all(axis=1) & (stats[:, 0] >= 0)
    for j, index in enumerate(planned):
        if unchanged[j]:
            continue
        image = ds._real_image(index)
        if image_sha256(image) != ds._expected_sha(index):
            raise InputError(mismatch(ds, index, "changed since the plan was made (its pixels no longer "
                                            "match the plan's content hash): re-plan with `dalda-aug plan`, "
                                            "or restore the file"))
    if record is not None and not unchanged.all():
        record.save_settled(stats)  # where it cannot be written, the next construction verifies in full

def mismatch(ds: Any, index: int, what: str) -> str:
    """The message for item ``index`` whose pixels differ from the plan's: when the file itself
    still matches, the base's own loader converts it differently from the plan; say so."""
    samples = getattr(unwrap(ds.base), "samples", None)
    ids = ds._item_id(index)
    if not ds._reads_files and samples is not None and isinstance(ids, str):
        path = os.path.join(os.fspath(ds._root or ""), ids)
        try:
            same_file = image_sha256(load_image(path)) == ds._expected_sha(index)
        except (DaldaError, OSError):
            same_file = False
        if same_file:
            return (f"{path}: the base dataset's loader gives other pixels than the file holds (it converts "
                    "it differently from the plan, e.g. drops transparency or clips 16-bit values); give the "
                    "base torchvision's default loader or dalda_aug.data.load_image")
    return f"{ds._describe_item(index)} {what}"

def measure_coverage(ds: Any, plan: Any, missing_folder: bool) -> None:
    """Count the planned variants the cache holds. With ``on_miss="real"`` anything short of
    all of them changes what is trained on: warn. With any policy, warn when another spec
    recorded in the folder holds more of them (an explicit spec that differs from warm's).

    Counts are remembered per (cache folder, spec, plan) under the shards' stat
    (:class:`~dalda_aug.plan.records.CoverageRecord`): constructing again over an unchanged
    cache computes no key."""
    spec = ds.cache.spec
    sources = ds._item_source[ds._item_source >= 0]
    effect = ("items whose chosen variant is missing are served real (on_miss='real'), so fewer than "
              f"p={ds.p:g} of the items are synthetic")
    if missing_folder:
        ds.cached_variants = 0
        if ds.on_miss == "real":
            warnings.warn(f"the cache folder {ds.cache.directory} does not exist: {effect}; warm it with "
                          "`dalda-aug warm`", UserWarning, stacklevel=3)
        return
    token = ds.cache.state_token()
    digest = ds._plan.columns.key_digest(sources)
    n_planned, ds.cached_variants, entries = 0, 0, None
    if spec is not None:
        counts = coverage(ds, spec.fingerprint, sources, digest, token)
        ds.cached_variants, n_planned = counts["held"], counts["planned"]
        if n_planned and ds.cached_variants == n_planned:
            ds._all_cached = True
            return
        entries = counts.get("entries")
    held = []
    better = False
    for other in ds.cache.recorded_specs():
        other_counts = coverage(ds, other.fingerprint, sources, digest, token)
        held.append(f"{other.describe()} ({other_counts['held']} of these variants)")
        better = better or other_counts["held"] > ds.cached_variants
        entries = other_counts.get("entries", entries)
    if ds.on_miss != "real" and not better:
        return
    if entries is None:
        entries = len(ds.cache.keys())
    holds = "; ".join(held) if held else "no recorded spec"
    if ds.on_miss == "real":
        consequence = effect[0].upper() + effect[1:]
    else:
        consequence = f"Missing variants are handled by on_miss={ds.on_miss!r}"
    warnings.warn(
        f"{ds.cached_variants}/{n_planned} synthetic variants of the plan are cached in "
        f"{ds.cache.directory} under the spec in use ({spec.describe() if spec else None}); the cache "
        f"holds {entries} images, specs: {holds}. {consequence}. Warm the cache "
        "(`dalda-aug warm`) or use the spec it was warmed with (SyntheticCache(directory) reads it).",
        UserWarning, stacklevel=3)

def coverage(ds: Any, fingerprint: str, sources: Any, digest: str, token: list[list[Any]]) -> dict[str, int]:
    """``{"held", "planned"[, "entries"]}``: of the distinct keys of ``sources``' variants under
    ``fingerprint``, how many the cache holds, and (when not all) how many entries it holds;
    read from the coverage record of ``token`` or counted (one digest per variant with
    :func:`~dalda_aug.cache.spec.variant_digests`, then either the cache's checked listing,
    where it holds at most four rows per planned key, or a checked look-up of each). A row
    whose value file is missing, of another size than the row says, or not a regular file is
    not held (a partial copy of a cache): ``cache stats`` counts it out too. Only the rows and
    the value files' stat are read (``cache stats`` also reads each header; an entry damaged
    inside is refused when read, a miss warned about if construction counted every variant)."""
    record = CoverageRecord(ds.cache.directory, fingerprint, digest)
    # on a network filesystem a client may see another node's write late in the stat: recount
    remembered = not ds.cache.is_network()
    counts = record.load(token) if remembered else None
    if counts is None:
        planned = np.unique(variant_digests(fingerprint, *ds._plan.columns.key_inputs(sources)))
        held = 0
        entries = None
        if planned.size and ds.cache.count_rows() <= 4 * planned.size:
            # listing a cache of about the plan's size costs less than a look-up per key
            listed = ds.cache.checked_key_digests(heads=False)[0]
            held = int(np.isin(planned, listed, assume_unique=True).sum())
            entries = int(listed.size)
        elif planned.size:  # a row and a value file's stat per key, no listing
            held = int(ds.cache.check_present(digest_hex(planned), heads=False)[0].sum())
        counts = {"held": held, "planned": int(planned.size)}
        if held < planned.size:
            counts["entries"] = entries if entries is not None else len(ds.cache.keys())
        if remembered and ds.cache.state_token() == token:  # nothing written meanwhile
            record.save(token, counts)
    return counts
