"""A plan folder: writing it (:func:`save_plan`) and reading it back with its digests checked
(:func:`load_plan`); ``plan.json`` records the SHA-256 of ``plan.jsonl``, ``summary.json`` and every
column file, so a folder mixing the files of two runs is refused."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._io import loads_bounded, read_json_object, write_atomic
from ..errors import InputError, MissingFileError
from .arrays import lf_sha256
from .columns import PlanColumns
from .variant import Variant

__all__ = ["PLAN_FORMAT", "save_plan", "load_plan"]

PLAN_FORMAT = "dalda_aug.plan/1"
_DIGESTS = "digests"  # key of plan.json: {"plan.jsonl": sha256, "summary.json": sha256}
_COLUMN_DIGESTS = "column_digests"  # key of plan.json: {"columns/<name>.npy": sha256}
_MAX_ROW_BYTES = 1024 * 1024  # one plan.jsonl row (a row is well under 1 KiB; prompts are one sentence)


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



def save_plan(plan: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``plan.jsonl``, ``plan.json``, ``summary.json`` and ``columns/`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = _utf8_rows("".join(_dumps(v.to_row()) + "\n" for v in plan.variants))
    summary = json.dumps(plan.summary, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    write_atomic(directory / "plan.jsonl", rows)
    write_atomic(directory / "summary.json", summary)
    digests = {"plan.jsonl": _sha256(rows), "summary.json": _sha256(summary)}
    columns = plan.columns.save(directory, len(rows.encode("utf-8")), digests["plan.jsonl"])
    # plan.json last: its presence marks a complete plan. It records what the others hold.
    config = {**plan.config, _DIGESTS: digests, _COLUMN_DIGESTS: columns}
    write_atomic(directory / "plan.json", json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return directory

def load_plan(cls: Any, directory: str | os.PathLike[str]) -> Any:
    """The plan in ``directory``, built by ``cls`` (:class:`~dalda_aug.plan.AugmentationPlan`), its digests checked."""
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
    mapped = _load_columns(cls, directory, config, digests or {}, column_digests or {}, n_classes)
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

def _load_columns(cls: Any, directory: Path, config: dict[str, Any], digests: dict[str, str],
                  column_digests: dict[str, str], n_classes: int | None) -> Any:
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
