"""Exports of a :class:`~dalda_aug.cache.SyntheticCache` that clusters stream.

(This module was ``dalda_aug.export_formats``, which still re-exports it.)

``dalda-aug cache export --as FORMAT`` looks the format up in :data:`EXPORT_FORMATS`:

- ``imagefolder`` (default): ``OUT/<class>/<key16>.png`` + ``OUT/samples.csv``
  (:meth:`SyntheticCache.export <dalda_aug.cache.SyntheticCache.export>`).
- ``webdataset``: tar shards ``OUT/shard-000000.tar``... of ``shard_size`` samples; sample
  ``<key>`` is ``<key>.png`` (the image), ``<key>.cls`` (the label, decimal text) and
  ``<key>.json`` (:meth:`ExportSample.to_dict`). Keys are the cache's 64 hex digits, with no
  dot, so ``webdataset.WebDataset(urls).decode("pil").to_tuple("png", "cls")`` reads them.
- ``parquet``: ``OUT/shard-000000.parquet``... of ``shard_size`` rows (row groups of at most
  :data:`PARQUET_ROW_GROUP` rows): ``image`` (struct ``{bytes, path}`` holding PNG bytes),
  ``label`` and the metadata columns of :meth:`ExportSample.to_dict`. The schema metadata
  carries Hugging Face features (``image``: ``Image``, ``label``: ``ClassLabel`` with the class
  names), so ``datasets.load_dataset("parquet", data_dir=OUT)`` decodes them; pyarrow, pandas,
  Spark and DuckDB read the same folder as plain Parquet, and Ray Data with
  :func:`decode_parquet_batch`.

Both sharded formats are lossless (PNG of the cache's decoded RGB pixels) and resumable. The
samples are the cache's valid entries (or, with a plan, the plan's cached variants) sorted by
key, cut into shards of ``shard_size``: shard membership depends only on what is exported.
Each shard is written under a temporary name and renamed when complete, then recorded in
``OUT/.dalda-export/manifest-<format>.json`` (hidden from readers pointed at the folder; its
samples' digest, bytes and SHA-256). A rerun, after a ``kill -9`` or with more entries cached,
skips every shard whose record, file size and SHA-256 match what it would write, rewrites the
others, and removes temporaries and shards left over from a larger export. Only files the manifest lists are ever
replaced or removed, and a non-empty folder without one is refused
(:mod:`~dalda_aug.cache.export_manifest`). One export into a folder at a time.

Corrupt entries are never written: they are skipped and counted (``corrupt``), and removed from
the cache where it is writable, as everywhere else in the library.

The writers need ``pyarrow`` (parquet only, ``pip install 'dalda-aug[export]'``) and the
standard library's :mod:`tarfile`; the ``webdataset`` and ``datasets`` packages only read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .._io import atomic_writer, open_regular
from ..errors import CorruptEntryError, DaldaError, InputError, require
from .codecs import check_entry
from .export_manifest import MANIFEST_FORMAT, ExportFolder, claim_export_folder, manifest_name, remove_owned

if TYPE_CHECKING:
    from ..plan import AugmentationPlan
    from .store import SyntheticCache

__all__ = [
    "EXPORT_FORMATS",
    "DEFAULT_EXPORT_FORMAT",
    "DEFAULT_SHARD_SIZE",
    "PARQUET_ROW_GROUP",
    "MANIFEST_FORMAT",
    "ExportSample",
    "ExportSelection",
    "export",
    "export_imagefolder",
    "export_webdataset",
    "export_parquet",
    "check_export_format",
    "check_output_folder",
    "select_samples",
    "shard_name",
    "manifest_name",
    "parquet_schema",
    "huggingface_features",
    "decode_parquet_batch",
]

log = logging.getLogger("dalda_aug.export_formats")  # its name when this module was dalda_aug.export_formats

DEFAULT_EXPORT_FORMAT = "imagefolder"
#: Samples per tar shard / rows per Parquet file when ``shard_size`` is not given.
DEFAULT_SHARD_SIZE = 1000
#: Most rows per Parquet row group (readers stream a row group at a time; HF uses 100 for images).
PARQUET_ROW_GROUP = 100
_EXTENSIONS = {"webdataset": "tar", "parquet": "parquet"}


# ------------------------------------------------------------------------------------------
# what is exported
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSample:
    """One exported image: its cache key and the metadata written beside it."""

    key: str
    label: int
    class_name: str
    source: str | int | None
    prompt: str | None
    lam: float | None
    seed: int | None
    variant: int | None

    def to_dict(self) -> dict[str, Any]:
        """The metadata of a sample: webdataset's ``<key>.json``, Parquet's metadata columns
        (where ``source`` is text)."""
        return {"key": self.key, "source": self.source, "class": self.class_name, "label": self.label,
                "prompt": self.prompt, "lam": self.lam, "seed": self.seed, "variant": self.variant}


@dataclass
class ExportSelection:
    """The samples of an export, sorted by key, with the class names their labels index."""

    samples: list[ExportSample]
    classes: list[str]
    missing: int = 0  # images of the plan not in the cache
    corrupt: int = 0  # entries skipped because they fail their checksums or do not decode
    corrupt_keys: list[str] = field(default_factory=list)


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _optional_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _label_names(pairs: Iterable[tuple[int, str]], where: str) -> list[str]:
    """``[name of label 0, name of label 1, ...]`` from ``(label, class name)`` pairs; labels no
    pair gives are named ``unused-<label>``. Two names for one label, or one name for two
    labels, is an :class:`InputError` (``where`` says how to avoid it)."""
    by_label: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for label, name in pairs:
        if by_label.setdefault(label, name) != name:
            raise InputError(f"label {label} is class {by_label[label]!r} in some entries and {name!r} in others "
                             f"(entries of several plans?); {where}")
        if by_name.setdefault(name, label) != label:
            raise InputError(f"class {name!r} has labels {by_name[name]} and {label} (entries of several plans?); "
                             f"{where}")
    names = []
    for label in range(max(by_label, default=-1) + 1):
        if label in by_label:
            names.append(by_label[label])
            continue
        name = f"unused-{label}"
        while name in by_name:
            name = f"_{name}"
        names.append(name)
    return names


def _plan_samples(cache: SyntheticCache, plan: AugmentationPlan) -> ExportSelection:
    spec = cache.resolve_spec(plan)
    variants: dict[str, Any] = {}
    for v in plan:
        variants.setdefault(spec.key(v), v)
    classes = [str(c) for c in plan.config.get("classes") or []]
    if not classes or any(not 0 <= v.label < len(classes) for v in variants.values()):
        classes = _label_names(((v.label, v.class_name) for v in variants.values()), "check the plan")
    elif len(set(classes)) != len(classes):
        raise InputError(f"the plan names a class twice in its classes {classes}")
    good, bad = cache.check_entries(list(variants), remove=True)
    samples = [
        ExportSample(key, v.label, classes[v.label], v.source, v.prompt, float(v.lam), int(v.seed), int(v.variant))
        for key, v in sorted(variants.items()) if key in good
    ]
    bad_keys = sorted({b["key"] for b in bad})
    missing = len(variants) - len(samples) - len(bad_keys)
    return ExportSelection(samples, classes, missing=missing, corrupt=len(bad_keys), corrupt_keys=bad_keys)


def _cache_samples(cache: SyntheticCache) -> ExportSelection:
    good, bad = cache.check_entries(remove=True)
    bad_keys = {b["key"] for b in bad}
    found: list[tuple[str, dict[str, Any]]] = []
    for key in sorted(good):
        try:
            meta = check_entry(cache.get_raw(key), key)
        except CorruptEntryError:  # this copy is bad (a read-only shard?): another may not be
            entry = cache.get(key)
            if entry is None:
                bad_keys.add(key)
                continue
            meta = entry.metadata
        found.append((key, meta))
    pairs = []
    for key, meta in found:
        label = _optional_int(meta.get("label"))
        if label is None or label < 0:
            raise InputError(f"cache entry {key[:16]} has no label ({meta.get('label')!r}); export with --plan")
        pairs.append((label, str(meta.get("class_name") or "unknown")))
    classes = _label_names(pairs, "export one plan's images with --plan")
    samples = []
    for (key, meta), (label, name) in zip(found, pairs):
        source = meta.get("source")
        samples.append(ExportSample(
            key, label, name, source if isinstance(source, (str, int)) and not isinstance(source, bool) else None,
            str(meta["prompt"]) if meta.get("prompt") is not None else None, _optional_float(meta.get("lambda")),
            _optional_int(meta.get("seed")), _optional_int(meta.get("variant"))))
    return ExportSelection(samples, classes, corrupt=len(bad_keys), corrupt_keys=sorted(bad_keys))


def select_samples(cache: SyntheticCache, plan: AugmentationPlan | None = None) -> ExportSelection:
    """The samples an export writes, sorted by key (entries are checked, not decoded).

    With ``plan``: its variants that are cached, with the plan's metadata and labels; the class
    names are the plan's ``classes``. Without: every valid entry, with its own metadata; label
    ``i`` is named after the entries of label ``i`` (entries that disagree, e.g. of two plans
    whose classes differ, are an :class:`InputError`: export with a plan).
    """
    return _plan_samples(cache, plan) if plan is not None else _cache_samples(cache)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def check_output_folder(cache: SyntheticCache, out: str | os.PathLike[str]) -> Path:
    """``out`` as an absolute path, or an :class:`InputError` when it is a file or lies inside
    the cache folder (an export there would mix with the cache's shards)."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise InputError(f"the export folder {path} exists and is not a folder")
    cache_real = os.path.realpath(cache.directory)
    out_real = os.path.realpath(path)
    if out_real == cache_real or out_real.startswith(cache_real.rstrip(os.sep) + os.sep):
        raise InputError(f"the export folder {path} lies inside the cache folder {cache.directory}; "
                         "export to a folder outside it")
    return path


def _check_shard_size(shard_size: int | None) -> int:
    if shard_size is None:
        return DEFAULT_SHARD_SIZE
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"the shard size must be a whole number of samples >= 1, got {shard_size!r}")
    return shard_size


def shard_name(index: int, fmt: str) -> str:
    """``shard-000000.tar`` (webdataset) or ``shard-000000.parquet`` (parquet)."""
    return f"shard-{index:06d}.{_EXTENSIONS[fmt]}"


def _shard_pattern(fmt: str) -> re.Pattern[str]:
    return re.compile(rf"shard-\d{{6,}}\.{re.escape(_EXTENSIONS[fmt])}")


# ------------------------------------------------------------------------------------------
# parquet schema
# ------------------------------------------------------------------------------------------
_PARQUET_COLUMNS = (("key", "string"), ("source", "string"), ("class", "string"), ("prompt", "string"),
                    ("lam", "float64"), ("seed", "int64"), ("variant", "int64"))


def huggingface_features(classes: Sequence[str]) -> dict[str, Any]:
    """The Hugging Face ``Features.to_dict()`` of an exported Parquet file."""
    features: dict[str, Any] = {"image": {"_type": "Image"},
                                "label": {"names": list(classes), "_type": "ClassLabel"}}
    for name, dtype in _PARQUET_COLUMNS:
        features[name] = {"dtype": dtype, "_type": "Value"}
    return features


def parquet_schema(classes: Sequence[str]) -> Any:
    """The ``pyarrow.Schema`` of an exported Parquet file, with the Hugging Face features under
    the ``b"huggingface"`` schema metadata key (``{"info": {"features": ...}}``)."""
    pa = require("pyarrow", "export", "pyarrow")
    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
    fields = [pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
              pa.field("label", pa.int64())]
    fields += [pa.field(name, types[dtype]) for name, dtype in _PARQUET_COLUMNS]
    metadata = {"huggingface": json.dumps({"info": {"features": huggingface_features(classes)}})}
    return pa.schema(fields, metadata=metadata)


# ------------------------------------------------------------------------------------------
# shard writers: write(file, [(sample, png bytes)...], classes) for one shard
# ------------------------------------------------------------------------------------------
def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same samples give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_tar(fh: Any, items: Iterator[tuple[ExportSample, bytes]], classes: Sequence[str]) -> None:
    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample, png in items:
            _tar_member(tar, f"{sample.key}.png", png)
            _tar_member(tar, f"{sample.key}.cls", str(sample.label).encode("ascii"))
            meta = json.dumps(sample.to_dict(), ensure_ascii=False, sort_keys=True)
            _tar_member(tar, f"{sample.key}.json", meta.encode("utf-8"))


def _write_parquet(fh: Any, items: Iterator[tuple[ExportSample, bytes]], classes: Sequence[str]) -> None:
    pa = require("pyarrow", "export", "pyarrow")
    pq = require("pyarrow.parquet", "export", "pyarrow")
    schema = parquet_schema(classes)

    def table(rows: list[tuple[ExportSample, bytes]]) -> Any:
        columns: dict[str, list[Any]] = {
            "image": [{"bytes": png, "path": f"{s.key}.png"} for s, png in rows],
            "label": [s.label for s, _ in rows],
        }
        for name, _ in _PARQUET_COLUMNS:
            values = [s.to_dict()[name] for s, _ in rows]
            columns[name] = [None if v is None else str(v) for v in values] if name == "source" else values
        return pa.Table.from_pydict(columns, schema=schema)

    with pq.ParquetWriter(fh, schema) as writer:
        batch: list[tuple[ExportSample, bytes]] = []
        for item in items:
            batch.append(item)
            if len(batch) == PARQUET_ROW_GROUP:
                writer.write_table(table(batch), row_group_size=PARQUET_ROW_GROUP)
                batch = []
        if batch:
            writer.write_table(table(batch), row_group_size=PARQUET_ROW_GROUP)


_SHARD_WRITERS: dict[str, Callable[[Any, Iterator[tuple[ExportSample, bytes]], Sequence[str]], None]] = {
    "webdataset": _write_tar,
    "parquet": _write_parquet,
}


# ------------------------------------------------------------------------------------------
# resumable sharded export
# ------------------------------------------------------------------------------------------
def _digest(fmt: str, png_level: int, classes: Sequence[str], samples: Sequence[ExportSample]) -> str:
    """What a shard holds: format, PNG level, class names (parquet) and the samples' metadata
    (the key stands for the pixels: it hashes everything that makes them)."""
    blob = {"format": MANIFEST_FORMAT, "as": fmt, "png_compress_level": png_level,
            "classes": list(classes) if fmt == "parquet" else None, "samples": [s.to_dict() for s in samples]}
    return hashlib.sha256(json.dumps(blob, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    """The SHA-256 of the regular file ``path`` (opened without following a link; a FIFO never blocks)."""
    fd, _ = open_regular(path, "export shard")
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(path: Path, record: dict[str, Any] | None, digest: str) -> bool:
    """Whether ``path`` is the shard ``record`` describes, with the samples ``digest`` stands for;
    anything but a regular file of that size and SHA-256 (a link, a FIFO, a folder) is not."""
    if record is None or record.get("digest") != digest:
        return False
    try:
        st = os.lstat(path)
        return (stat.S_ISREG(st.st_mode) and st.st_size == record.get("bytes")
                and _file_sha256(path) == record.get("sha256"))
    except (OSError, InputError):
        return False


def _pngs(cache: SyntheticCache, samples: Sequence[ExportSample], written: list[ExportSample],
          corrupt: list[str], bar: Any) -> Iterator[tuple[ExportSample, bytes]]:
    """``(sample, PNG of the cache's decoded pixels)``; entries that no longer decode are
    skipped into ``corrupt``, the others appended to ``written``."""
    for sample in samples:
        entry = cache.get(sample.key)  # decodes and checks; a corrupt entry gives None
        bar.update(1)
        if entry is None:
            corrupt.append(sample.key)
            continue
        buf = io.BytesIO()
        entry.image.save(buf, "PNG", compress_level=cache.png_compress_level)
        written.append(sample)
        yield sample, buf.getvalue()


def _write_shard(out: Path, name: str, fmt: str, cache: SyntheticCache, samples: Sequence[ExportSample],
                 classes: Sequence[str], corrupt: list[str], bar: Any) -> tuple[dict[str, Any], int]:
    """Write one shard under a temporary name, then rename it: its manifest record and size."""
    written: list[ExportSample] = []
    with atomic_writer(out / name) as fh:
        _SHARD_WRITERS[fmt](fh, _pngs(cache, samples, written, corrupt, bar), classes)
    path = out / name
    record = {"name": name, "samples": len(written), "first_key": written[0].key if written else None,
              "digest": _digest(fmt, cache.png_compress_level, classes, written),
              "bytes": path.stat().st_size, "sha256": _file_sha256(path)}
    return record, len(written)


def _claim(fmt: str, cache: SyntheticCache, out: str | os.PathLike[str]) -> ExportFolder:
    """The export folder, checked (before any entry is read): not inside the cache, and new, empty
    or an earlier export of ``fmt`` (its manifest read, bounded)."""
    folder = check_output_folder(cache, out)
    pattern = _shard_pattern(fmt)
    return claim_export_folder(folder, fmt, lambda name: pattern.fullmatch(name) is not None)


def _export_sharded(fmt: str, cache: SyntheticCache, out: str | os.PathLike[str],
                    plan: AugmentationPlan | None, shard_size: int | None, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    size = _check_shard_size(shard_size)
    own = _claim(fmt, cache, out)
    folder = own.path
    selection = select_samples(cache, plan)
    samples, classes = selection.samples, selection.classes
    shards = [samples[i:i + size] for i in range(0, len(samples), size)]
    names = [shard_name(i, fmt) for i in range(len(shards))]
    own.check_writable(names)  # no file of the user's is replaced
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the export folder {folder}: {exc.strerror or exc}") from None
    records = own.manifest.get("shards")
    previous = {r["name"]: r for r in records if isinstance(r, dict) and isinstance(r.get("name"), str)} \
        if isinstance(records, list) else {}
    body: dict[str, Any] = {"format": MANIFEST_FORMAT, "as": fmt, "shard_size": size, "classes": classes,
                            "cache": str(cache.directory), "complete": False, "samples": 0,
                            "files": sorted(own.files | set(names)), "shards": []}
    own.write(body)  # every file this run may write is listed before it is written
    pattern = _shard_pattern(fmt)
    own.remove_temporaries(lambda name: pattern.fullmatch(name) is not None)
    for stale in sorted(own.files - set(names)):  # shards of a larger earlier export
        remove_owned(folder / stale)
    corrupt = list(selection.corrupt_keys)
    exported = written_shards = 0
    with tqdm(total=len(samples), desc=f"exporting {fmt}", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for name, members in zip(names, shards):
            digest = _digest(fmt, cache.png_compress_level, classes, members)
            record = previous.get(name)
            if record is not None and _is_complete(folder / name, record, digest):
                bar.update(len(members))
                count = int(record.get("samples", len(members)))
            else:
                record, count = _write_shard(folder, name, fmt, cache, members, classes, corrupt, bar)
                written_shards += 1
            exported += count
            body["shards"].append(record)
            body["samples"] = exported
            own.write(body)
    body["complete"] = True
    body["files"] = names
    own.write(body)
    if corrupt:
        log.warning("skipped %d corrupt cache entries (not exported): %s", len(corrupt),
                    ", ".join(k[:16] for k in corrupt[:5]) + (" ..." if len(corrupt) > 5 else ""))
    return {"format": fmt, "out": str(folder), "exported": exported, "missing": selection.missing,
            "corrupt": len(corrupt), "shards": len(names), "written": written_shards,
            "skipped": len(names) - written_shards, "classes": classes,
            "manifest": str(folder / manifest_name(fmt))}


def export_webdataset(cache: SyntheticCache, out: str | os.PathLike[str], plan: AugmentationPlan | None = None,
                      *, shard_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write the cached images as WebDataset tar shards (see the module doc); resumable.

    Returns ``{"format", "out", "exported", "missing", "corrupt", "shards", "written",
    "skipped", "classes", "manifest"}`` (``written``/``skipped``: shards written by this call /
    found complete).
    """
    return _export_sharded("webdataset", cache, out, plan, shard_size, progress)


def export_parquet(cache: SyntheticCache, out: str | os.PathLike[str], plan: AugmentationPlan | None = None,
                   *, shard_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write the cached images as Parquet files with Hugging Face features (see the module
    doc); resumable. Returns what :func:`export_webdataset` does."""
    require("pyarrow", "export", "pyarrow")
    return _export_sharded("parquet", cache, out, plan, shard_size, progress)


def export_imagefolder(cache: SyntheticCache, out: str | os.PathLike[str], plan: AugmentationPlan | None = None,
                       *, shard_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """``OUT/<class>/<key16>.png`` + ``OUT/samples.csv``: :meth:`SyntheticCache.export
    <dalda_aug.cache.SyntheticCache.export>`. An image folder has no shards: ``shard_size``
    must be ``None``."""
    if shard_size is not None:
        raise InputError("the shard size applies to the webdataset and parquet exports, not to imagefolder")
    from .imagefolder import claim_image_folder

    claim_image_folder(check_output_folder(cache, out))  # refused before any entry is read
    result = cache.export(out, plan, progress=progress)
    return {"format": "imagefolder", **result}


#: Export format name -> writer ``(cache, out, plan=None, *, shard_size=None, progress=False) -> dict``.
EXPORT_FORMATS: dict[str, Callable[..., dict[str, Any]]] = {
    "imagefolder": export_imagefolder,
    "webdataset": export_webdataset,
    "parquet": export_parquet,
}


def check_export_format(fmt: str) -> str:
    """``fmt`` if it names one of :data:`EXPORT_FORMATS`, else an :class:`InputError`."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def export(cache: SyntheticCache, out: str | os.PathLike[str], fmt: str = DEFAULT_EXPORT_FORMAT,
           plan: AugmentationPlan | None = None, *, shard_size: int | None = None,
           progress: bool = False) -> dict[str, Any]:
    """Export ``cache`` (only ``plan``'s images if given) to the folder ``out`` as ``fmt``, one
    of :data:`EXPORT_FORMATS`. Bad input (an unknown format, ``out`` inside the cache folder,
    a shard size below 1) is an :class:`InputError` before anything is written."""
    check_export_format(fmt)
    try:
        return EXPORT_FORMATS[fmt](cache, out, plan, shard_size=shard_size, progress=progress)
    except DaldaError:
        raise
    except OSError as exc:  # a full or read-only export folder
        where = f" ({exc.filename})" if exc.filename else ""
        raise InputError(f"cannot write the {fmt} export to {out}{where}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------
def decode_parquet_batch(batch: dict[str, Any], *, mode: str = "RGB") -> dict[str, Any]:
    """Decode a batch of the Parquet export for a reader that does not know Hugging Face's
    ``Image`` feature: Ray Data (``read_parquet(OUT).map_batches(decode_parquet_batch)``, numpy batch
    format), or a pyarrow batch turned into numpy. ``batch`` maps column names to arrays, ``image``
    holding ``{"bytes", "path"}`` dicts (what ``pyarrow``'s ``to_numpy`` gives for the struct column).

    Returns ``{"image": uint8 array (N, H, W, C), "label": int64 array (N,)}``, images decoded from
    their PNG bytes and converted to ``mode``. Images of different sizes cannot share one array:
    they come back as an object array of ``(H, W, C)`` arrays (resize them before batching tensors).
    A row without image bytes is an :class:`~dalda_aug.errors.InputError` naming its ``path``.
    """
    import numpy as np
    from PIL import Image

    if "image" not in batch or "label" not in batch:
        raise InputError(f"a batch of the Parquet export has 'image' and 'label' columns; got {sorted(batch)}")
    images = []
    for cell in batch["image"]:
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            where = cell.get("path") if isinstance(cell, dict) else cell
            raise InputError(f"image {where!r} of the Parquet batch holds no image bytes")
        with Image.open(io.BytesIO(bytes(data))) as image:
            images.append(np.asarray(image.convert(mode)))
    labels = np.array(batch["label"], dtype=np.int64)  # a copy: torch wants writable arrays
    if images and all(a.shape == images[0].shape for a in images):
        stacked: Any = np.stack(images)
    elif images:
        stacked = np.empty(len(images), dtype=object)
        for i, array in enumerate(images):
            stacked[i] = array
    else:
        stacked = np.zeros((0, 0, 0, len(mode)), dtype=np.uint8)
    return {"image": stacked, "label": labels}
