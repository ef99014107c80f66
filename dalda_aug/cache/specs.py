"""The spec records of a cache folder: which :class:`~dalda_aug.cache.spec.GenerationSpec` wrote which plan's images.

A record, ``CACHE/specs/<spec fingerprint>-<plan fingerprint>.json`` of format
:data:`SPEC_RECORD_FORMAT`, is one small JSON file written atomically (:func:`write_spec_record`),
so concurrent warmers writing the same record are safe and copying ``specs/`` along with the shards
merges caches. Records are data someone else may have written: read bounded, never followed through
a link, their config class looked up in the generator registry, never imported
(:func:`read_spec_records`).

:class:`SpecRecords` is what :class:`~dalda_aug.cache.SyntheticCache` does with them (its
``record_spec``, ``recorded_specs``, ``resolve_spec``, ``spec_summary``, ``entries_of_spec`` and
``forget_spec`` delegate here): record, list, pick the spec to read a plan's images with, count the
entries each spec made, forget one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .._io import MAX_JSON_BYTES, inside, read_json_object, read_regular, write_atomic
from ..errors import DaldaError, InputError, MissingFileError, UnsafeFileError
from .shardset import ShardSet
from .spec import GenerationSpec, log, plan_fingerprint

__all__ = ["SPECS_DIR", "SPEC_RECORD_FORMAT", "SpecRecords", "write_spec_record", "read_spec_records"]

# Spec records written by warm: CACHE/specs/<spec fingerprint>-<plan fingerprint>.json.
SPECS_DIR = "specs"
SPEC_RECORD_FORMAT = "dalda_aug.cache-spec/1"


def write_spec_record(directory: Path, spec: GenerationSpec, plan: Any = None) -> tuple[Path, bool]:
    """Record in ``directory/specs/`` that images of ``plan`` are written with ``spec``: the
    record's path, and whether it was written (False: the same record was there already, nothing
    is written, so a read-only cache stays usable). Written atomically (:func:`~dalda_aug._io.write_atomic`:
    nothing planted at a temporary's name is followed); ``OSError`` if it cannot be. The record
    already there is read as data (no FIFO, no link, bounded); a ``specs`` folder that is a symlink
    leading outside ``directory`` is an :class:`~dalda_aug.errors.UnsafeFileError`."""
    record: dict[str, Any] = {"format": SPEC_RECORD_FORMAT, "spec": spec.to_dict(), "plan": None}
    plan_fp = "any"
    if plan is not None:
        plan_fp = plan_fingerprint(plan)
        record["plan"] = {"fingerprint": plan_fp, "images": len(plan), "data_root": getattr(plan, "data_root", None)}
    path = directory / SPECS_DIR / f"{spec.fingerprint}-{plan_fp}.json"
    _check_specs_folder(directory)
    text = json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    try:
        if read_regular(path, MAX_JSON_BYTES, "spec record") == text.encode("utf-8"):
            return path, False
    except (OSError, DaldaError):  # none yet, or not a regular file: replaced by write_atomic, never followed
        pass
    write_atomic(path, text)
    return path, True


def _check_specs_folder(directory: Path) -> None:
    """An :class:`~dalda_aug.errors.UnsafeFileError` where ``directory/specs`` is a symlink leading
    outside ``directory`` (records would be read from, and written to, elsewhere)."""
    folder = directory / SPECS_DIR
    if folder.is_symlink():
        inside(folder, directory, "spec record folder")


def read_spec_records(directory: Path) -> list[tuple[GenerationSpec, str | None]]:
    """``(spec, plan fingerprint or None)`` of every record in ``directory/specs/``, in file name
    order; an unreadable record is an :class:`~dalda_aug.errors.InputError` naming it. A record
    that is not a regular file (a FIFO, a symlink, a device, a folder) is skipped, named in a
    warning: no library writes one. A ``specs`` folder that is a symlink leading outside
    ``directory`` is an :class:`~dalda_aug.errors.UnsafeFileError`."""
    records = []
    folder = directory / SPECS_DIR
    _check_specs_folder(directory)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = read_json_object(path, "spec record")
        except MissingFileError:  # removed since the listing (cache specs --forget)
            continue
        except UnsafeFileError as exc:
            log.warning("%s; skipped", exc)
            continue
        except (OSError, DaldaError) as exc:
            raise InputError(f"{exc}; delete it and rerun warm") from None
        if data.get("format") != SPEC_RECORD_FORMAT:
            raise InputError(f"{path}: not a spec record of format {SPEC_RECORD_FORMAT!r}")
        spec = GenerationSpec.from_dict(data.get("spec") or {}, str(path))
        plan = data.get("plan") or {}
        records.append((spec, plan.get("fingerprint") if isinstance(plan, dict) else None))
    return records


class SpecRecords:
    """The spec records of the cache folder of ``shards``, read once and read again after this
    object writes or forgets one; the entries each spec made are counted from the entries' headers.
    Not pickled: a cache rebuilds it (see :class:`~dalda_aug.cache.SyntheticCache`)."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self._records: list[tuple[GenerationSpec, str | None]] | None = None
        self._resolved: GenerationSpec | None = None  # resolve() without a plan, once found

    def _forget_read(self) -> None:
        self._records = None
        self._resolved = None

    def records(self) -> list[tuple[GenerationSpec, str | None]]:
        """``(spec, plan fingerprint or None)`` of each record (:func:`read_spec_records`)."""
        if self._records is None:
            self._records = read_spec_records(self.shards.directory)
        return list(self._records)

    def record(self, spec: GenerationSpec, plan: Any = None) -> Path:
        """Write the record of ``spec`` for ``plan`` (:func:`write_spec_record`); a failed write is
        one line naming the folder (read-only, full)."""
        try:
            path, written = write_spec_record(self.shards.directory, spec, plan)
        except OSError as exc:
            raise self.shards.storage_error(exc, f"record the generation spec in {SPECS_DIR}/") from None
        if written:
            self._forget_read()
        return path

    def specs(self, plan: Any = None) -> list[GenerationSpec]:
        """The specs recorded (by fingerprint), or those recorded for ``plan``."""
        wanted = plan_fingerprint(plan) if plan is not None else None
        found: dict[str, GenerationSpec] = {}
        for spec, plan_fp in self.records():
            if wanted is None or plan_fp == wanted:
                found.setdefault(spec.fingerprint, spec)
        return list(found.values())

    def _count_present(self, keys: set[str]) -> int:
        return int(self.shards.present(sorted(keys)).sum())

    def resolve(self, plan: Any = None) -> GenerationSpec:
        """The recorded spec to read ``plan``'s images with (see
        :meth:`~dalda_aug.cache.SyntheticCache.resolve_spec`, which gives its own spec first)."""
        directory = self.shards.directory
        specs = self.specs()
        if len(specs) == 1:
            return specs[0]
        if not specs:
            where = "does not exist" if not directory.is_dir() else "records no generation spec"
            raise InputError(
                f"the cache folder {directory} {where}: give the spec the images were made with "
                "(SyntheticCache(dir, GenerationSpec(...))) or fill the folder with `dalda-aug warm`")
        if plan is None:
            if self._resolved is None:
                counts = self.entries_per_fingerprint({s.fingerprint for s in specs}, stop_at_one=True)
                holding = [s for s in specs if counts.get(s.fingerprint)]
                if len(holding) != 1:
                    listing = "; ".join(s.describe() for s in specs)
                    held = "none holds images" if not holding else f"{len(holding)} of them hold images"
                    raise InputError(
                        f"the cache folder {directory} records {len(specs)} generation specs ({listing}), "
                        f"{held} and no plan says which one to use: pass the spec explicitly "
                        "(SyntheticCache(dir, spec)), or forget the ones not wanted (`dalda-aug cache specs --forget`)")
                self._resolved = holding[0]
            return self._resolved
        cached = {s.fingerprint: self._count_present({s.key(v) for v in plan}) for s in specs}
        holding = [s for s in specs if cached[s.fingerprint]]
        if len(holding) == 1:
            return holding[0]
        mine = {s.fingerprint for s in self.specs(plan)}
        among = holding or specs
        chosen = [s for s in among if s.fingerprint in mine]
        if len(chosen) == 1:
            return chosen[0]
        listing = "; ".join(f"{s.describe()}: {cached[s.fingerprint]} images of this plan" for s in specs)
        if holding:
            why = f"{len(holding)} of them hold images of this plan, and {'several' if chosen else 'none'} of those " \
                  "are recorded for it"
        else:
            why = f"none holds images of this plan and {'several' if chosen else 'none'} of them are recorded for it"
        raise InputError(
            f"the cache folder {directory} records {len(specs)} generation specs ({listing}); {why}: "
            "pass the spec explicitly (SyntheticCache(dir, spec))")

    def entries_per_fingerprint(self, wanted: set[str] | None = None, *, stop_at_one: bool = False
                                ) -> dict[str, int]:
        """``{generation fingerprint: entries}`` read from the entries' headers (no image bytes;
        counts, not checks). With ``stop_at_one``, reading stops once each of ``wanted`` was seen."""
        counts: dict[str, int] = {}
        seen: set[str] = set()
        for key, meta in self.shards.entry_heads():
            if key in seen:
                continue
            fingerprint = meta.get("generation_fingerprint") if meta is not None else None
            if not isinstance(fingerprint, str) or (wanted is not None and fingerprint not in wanted):
                continue
            seen.add(key)
            counts[fingerprint] = counts.get(fingerprint, 0) + 1
            if stop_at_one and wanted is not None and wanted <= set(counts):
                return counts
        return counts

    def summary(self, plan: Any = None) -> list[dict[str, Any]]:
        """Each recorded spec with its plans and entries (see
        :meth:`~dalda_aug.cache.SyntheticCache.spec_summary`)."""
        records = self.records()
        counts = self.entries_per_fingerprint()
        summary: dict[str, dict[str, Any]] = {}
        for spec, plan_fp in records:
            row = summary.setdefault(spec.fingerprint, {
                "fingerprint": spec.fingerprint, "description": spec.describe(), "plans": [],
                "entries": counts.get(spec.fingerprint, 0)})
            if plan_fp is not None and plan_fp not in row["plans"]:
                row["plans"].append(plan_fp)
            if plan is not None and "plan_images" not in row:
                keys = {spec.key(v) for v in plan}
                row.update(plan_images=len(keys), plan_cached=self._count_present(keys))
        return list(summary.values())

    def entries_of(self, fingerprint: str) -> int:
        """How many entries were made with the spec of ``fingerprint`` (no record is read)."""
        return self.entries_per_fingerprint({fingerprint}).get(fingerprint, 0)

    def forget(self, fingerprint: str) -> list[Path]:
        """Delete the records of the spec with ``fingerprint``, named by their file names (see
        :meth:`~dalda_aug.cache.SyntheticCache.forget_spec`); returns the files removed."""
        if not (isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{16}", fingerprint)):
            raise InputError(f"a spec fingerprint is 16 hex digits, got {str(fingerprint)[:80]!r}")
        folder = self.shards.directory / SPECS_DIR
        paths = sorted(folder.glob(f"{fingerprint}-*.json")) if folder.is_dir() else []
        if not paths:  # the fingerprints as the records' names give them: no record is read
            known = sorted({p.name.split("-", 1)[0] for p in folder.glob("*.json")}) if folder.is_dir() else []
            raise InputError(f"no spec with fingerprint {fingerprint} is recorded in {folder} (recorded: {known})")
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self.shards.storage_error(exc, f"remove the spec record {path.name}") from None
        self._forget_read()
        return paths
