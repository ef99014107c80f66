"""The store: :class:`SyntheticCache`, generated images on disk keyed by what fixes their pixels.

See the package's documentation (:mod:`dalda_aug.cache`) for its guarantees. The shards, the row
rule, reading and writing them are :class:`~dalda_aug.cache.shardset.ShardSet`'s, which this
class extends with the generation spec, variants, images and maintenance.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import InputError, MissingFileError
from .codecs import (DEFAULT_IMAGE_FORMAT, DEFAULT_PNG_LEVEL, META_CRC, check_entry, decode_entry, encode_entry,
                     format_name, resolve_format)
from .imagefolder import export_folder_names, write_image_folder
from .shardset import ShardSet, check_journal_mode
from .spec import GenerationSpec, key_bytes, variant_digests
from .specs import SpecRecords

__all__ = ["SyntheticCache", "CachedImage", "open_cache_dir"]


@dataclass
class CachedImage:
    """A decoded cache entry."""

    key: str
    image: Any  # PIL.Image.Image (RGB)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def lam(self) -> float:
        return float(self.metadata["lambda"])

    @property
    def prompt(self) -> str:
        return str(self.metadata["prompt"])


class SyntheticCache(ShardSet):
    """Generated images on disk, keyed by :class:`GenerationSpec` + variant (see module doc).

    Args:
        directory: the cache folder (created on first write); holds ``shard-*/`` sub-folders.
        spec: the generation settings this cache serves; they turn plan variants into keys
            (:meth:`key`, ``variant`` arguments). ``None`` (default): the spec ``warm``
            recorded in the folder (:meth:`resolve_spec`) — the only one, or the one recorded
            for the plan in use. Low-level methods take keys and need no spec.
        image_format: ``"lz4"`` (default), ``"png"``, ``"webp"``, ``"raw"`` (lossless) or
            ``"jpeg"`` (lossy), or any format :func:`~dalda_aug.cache.codecs.register_codec`
            added, with its option as ``name:option``: ``"jpeg:90"``, ``"webp:95"`` (lossy
            WebP), ``"png:6"`` (see :func:`encode_entry`); used for new entries, entries in any
            format are read. ``"lz4"`` is fast enough for a training epoch with p = 0.5 to cost
            about as much as one on the real JPEGs; ``"png"`` and ``"webp"`` take less disk,
            ``"jpeg"`` (and ``"webp:QUALITY"``) far less, at a loss.
        quality: the older spelling of a lossy format's option (``image_format="jpeg",
            quality=90`` is ``"jpeg:90"``); an :class:`~dalda_aug.errors.InputError` for a
            lossless format or one whose name gives another quality.
        shard: name of the shard this process writes to (``CACHE/shard-<shard>/``); default
            :func:`default_shard_name` (``<host>-<rank>``).
        journal_mode: SQLite journal of the shards: ``"wal"`` (local disks), ``"delete"``
            (network filesystems) or ``None`` to pick from the filesystem type.
        timeout: seconds a writer waits for a SQLite lock before retrying.
        png_compress_level: zlib level of PNG files exported from the cache, and of PNG entries
            where ``image_format`` is ``"png"`` without a level (0-9; 1 encodes ~3x faster than 6
            for ~10 % more bytes; decoding speed hardly depends on it).

    Example::

        cache = SyntheticCache("cache/")    # the spec warm recorded; or SyntheticCache("cache/", spec)
        for variant in plan:
            if variant not in cache: ...
        entry = cache.get(plan[0])          # CachedImage or None
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        spec: GenerationSpec | None = None,
        *,
        image_format: str = DEFAULT_IMAGE_FORMAT,
        shard: str | None = None,
        journal_mode: str | None = None,
        timeout: float = 60.0,
        png_compress_level: int = DEFAULT_PNG_LEVEL,
        quality: int | None = None,
    ):
        if spec is not None and not isinstance(spec, GenerationSpec):
            raise InputError(f"spec must be a GenerationSpec or None, got {type(spec).__name__}")
        codec, option = resolve_format(image_format, quality)
        check_journal_mode(journal_mode)
        if not 0 <= int(png_compress_level) <= 9:
            raise InputError(f"png_compress_level must be in 0..9, got {png_compress_level!r}")
        named = ":" in image_format
        if codec.option == "level" and codec.name == "png":
            if named:
                png_compress_level = int(option) if option is not None else png_compress_level
            else:
                option = int(png_compress_level)
        super().__init__(directory, shard=shard, journal_mode=journal_mode, timeout=timeout)
        self.spec = spec
        #: The codec's name (``"jpeg"``); :attr:`codec_name` adds its option (``"jpeg:95"``).
        self.image_format = codec.name
        self.png_compress_level = int(png_compress_level)
        #: The quality asked for, by the name (``"jpeg:90"``) or by ``quality``; None if none was.
        self.quality = option if codec.option == "quality" and (named or quality is not None) else None
        #: The full format name new entries are written with.
        self.codec_name = format_name(codec, option)
        self._spec_records = SpecRecords(self)  # read once, rebuilt after unpickling

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_spec_records", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._spec_records = SpecRecords(self)

    def __repr__(self) -> str:
        fp = self.spec.fingerprint if self.spec is not None else None
        quality = f", quality={self.quality}" if self.quality is not None else ""
        return (f"SyntheticCache({str(self.directory)!r}, format={self.image_format!r}{quality}, shard={self.shard!r}, "
                f"fingerprint={fp!r})")

    def __enter__(self) -> "SyntheticCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the generation specs the cache describes itself with (the records: specs.SpecRecords) ------
    def record_spec(self, plan: Any = None, spec: GenerationSpec | None = None) -> Path:
        """Record in ``CACHE/specs/`` that images of ``plan`` are written with ``spec``
        (default: this cache's); :func:`~dalda_aug.cache.warm.warm` calls it once its first image
        is stored, so a run that writes nothing leaves no record. One small JSON file
        per (spec, plan), written atomically: concurrent warmers writing the same record are
        safe, and copying ``specs/`` along with the shards merges caches."""
        spec = spec if spec is not None else self.spec
        if spec is None:
            raise InputError("record_spec needs a GenerationSpec (this cache has none)")
        return self._spec_records.record(spec, plan)

    def recorded_specs(self, plan: Any = None) -> list[GenerationSpec]:
        """The specs recorded in the cache folder (by fingerprint), or those recorded for ``plan``."""
        return self._spec_records.specs(plan)

    def resolve_spec(self, plan: Any = None) -> GenerationSpec:
        """The spec to read ``plan``'s images with.

        This cache's explicit spec; else the only one recorded in the folder; else, of the
        recorded specs, the only one that holds images (of ``plan``, when given: its keys for
        the plan are in the cache), so a spec recorded by a run that wrote nothing is passed
        over; else, among those (or all, when none holds any), the only one recorded for
        ``plan``; else an :class:`~dalda_aug.errors.InputError` listing what the folder holds.
        """
        if self.spec is not None:
            return self.spec
        return self._spec_records.resolve(plan)

    def spec_summary(self, plan: Any = None) -> list[dict[str, Any]]:
        """Each recorded spec: ``{"fingerprint", "description", "plans"`` (the plan
        fingerprints it is recorded for), ``"entries"`` (entries made with it, by their
        headers)``}``, with ``plan`` also ``"plan_images"`` and ``"plan_cached"`` (its keys for
        the plan, and how many of them the cache holds)."""
        return self._spec_records.summary(plan)

    def entries_of_spec(self, fingerprint: str) -> int:
        """How many entries were made with the spec of ``fingerprint`` (read from the entries'
        headers, as :meth:`spec_summary` counts them; no spec record is read)."""
        return self._spec_records.entries_of(fingerprint)

    def forget_spec(self, fingerprint: str) -> list[Path]:
        """Delete the records of the spec with ``fingerprint`` from ``CACHE/specs/`` (its entries
        stay), named by their file names: no record is read, so a corrupt one elsewhere in the
        folder does not stand in the way; returns the files removed. :class:`~dalda_aug.errors.InputError` when none is
        recorded under it."""
        return self._spec_records.forget(fingerprint)

    def with_spec(self, spec: GenerationSpec) -> "SyntheticCache":
        """The same cache folder and settings, serving ``spec``."""
        if not isinstance(spec, GenerationSpec):
            raise InputError(f"spec must be a GenerationSpec, got {type(spec).__name__}")
        return SyntheticCache(self.directory, spec, image_format=self.image_format, shard=self.shard,
                              journal_mode=self._journal_mode, timeout=self.timeout,
                              png_compress_level=self.png_compress_level, quality=self.quality)

    # -- keys -----------------------------------------------------------------------------
    def require_spec(self) -> GenerationSpec:
        """The spec keys are made under: the cache's own, else the recorded one (:meth:`resolve_spec`)."""
        return self.resolve_spec()

    def key(self, variant: Any) -> str:
        """Cache key of a plan variant (needs :attr:`spec`); a ``str`` key is returned as is."""
        if isinstance(variant, str):
            return variant
        return self.require_spec().key(variant)

    def __contains__(self, variant_or_key: Any) -> bool:
        return super().__contains__(self.key(variant_or_key))

    def missing(self, variants: Iterable[Any]) -> list[Any]:
        """The variants (or keys) without an entry, in order (SQL look-ups of their keys, no decoding)."""
        variants = list(variants)
        found = self.present([self.key(v) for v in variants])
        return [v for v, here in zip(variants, found) if not here]

    def present(self, variants_or_keys: Iterable[Any]) -> Any:
        """Which of ``variants_or_keys`` have an entry row: a NumPy boolean array, in order.

        Each shard's SQLite key index is asked in ``IN`` batches (a few ms per thousand keys),
        for the keys not found in an earlier shard: no key listing, no entry bytes. A row whose
        entry is damaged counts as present; the readers that decode refuse it (``warm``
        regenerates what fails its header or size checks).
        """
        key = self.key
        return super().present([v if type(v) is str else key(v) for v in variants_or_keys])

    def count_present(self, variants_or_keys: Iterable[Any]) -> int:
        """How many of the distinct variants (or keys) have an entry row (:meth:`present`)."""
        keys = sorted({self.key(v) for v in variants_or_keys})
        return int(self.present(keys).sum())

    # -- read ------------------------------------------------------------------------------
    def get(self, variant_or_key: Any) -> CachedImage | None:
        """The decoded entry, or ``None`` if absent; corrupt entries are removed and give ``None``."""
        # Shards created by other processes are picked up by the periodic rescan of _scan().
        return self._lookup(self.key(variant_or_key), force_scan=False)

    def get_image(self, variant_or_key: Any) -> Any:
        """The PIL image of an entry, or ``None``."""
        entry = self.get(variant_or_key)
        return None if entry is None else entry.image

    def _lookup(self, key: str, force_scan: bool) -> CachedImage | None:
        for name, reader in self._readers(force_scan):
            decoded, _ = self.read_entry(name, reader, key, decode_entry, remove=True, missing_is_corrupt=False)
            if decoded is not None:
                return CachedImage(key, *decoded)
        return None

    def get_raw(self, variant_or_key: Any) -> bytes | None:
        """The encoded entry bytes (header + image) as stored, without decoding."""
        return super().get_raw(self.key(variant_or_key))

    # -- write -----------------------------------------------------------------------------
    def put(self, variant: Any, image: Any, *, metadata: dict[str, Any] | None = None) -> str:
        """Store the image generated for ``variant``; returns its key.

        The entry's metadata records the variant (λ, prompt, seed, score, class, source) and
        the generation and model fingerprints, plus ``metadata``.
        """
        spec = self.require_spec()
        key = spec.key(variant)
        meta = {
            "key": key,
            "lambda": float(variant.lam),
            "prompt": variant.prompt,
            "seed": int(variant.seed),
            "score": float(variant.score),
            "class_name": variant.class_name,
            "label": int(variant.label),
            "source": variant.source,
            "variant": int(variant.variant),
            "source_sha256": variant.source_sha256,
            "generation_fingerprint": spec.fingerprint,
            "model_fingerprint": spec.models.fingerprint(),
            "prompt_prefix": spec.config.prompt_prefix,
            "negative_prompt": spec.config.negative_prompt,
            "dtype": spec.dtype,
            "created": round(time.time(), 3),
        }
        if metadata:
            meta.update(metadata)
        self.put_encoded(key, encode_entry(image, meta, self.codec_name))
        return key

    def delete(self, variant_or_key: Any) -> bool:
        """Remove an entry from every shard; True if one was there."""
        return super().delete(self.key(variant_or_key))

    # -- maintenance -------------------------------------------------------------------------
    def iter_entries(self, keys: Iterable[str] | None = None, *, remove_corrupt: bool = True) -> Iterator[CachedImage]:
        """Decode and yield every valid entry (or those of ``keys``), each key once."""
        seen: set[str] = set()
        wanted = set(keys) if keys is not None else None
        for name, reader in list(self._readers(force_scan=True)):
            for key in reader.keys():
                if key in seen or (wanted is not None and key not in wanted):
                    continue
                decoded, _ = self.read_entry(name, reader, key, decode_entry, remove=remove_corrupt,
                                             missing_is_corrupt=False)
                if decoded is None:
                    continue
                seen.add(key)
                yield CachedImage(key, *decoded)

    def verify(self, *, remove: bool = False, progress: bool = False) -> dict[str, Any]:
        """Decode every entry; report (and with ``remove`` delete) the bad ones.

        Returns ``{"checked", "ok", "bad": [{"shard", "key", "error"}], "removed"}``. An entry
        whose row exists but whose value file is gone, or is not a regular file, counts as bad,
        and so does every row that is stored pickled (key or value) or whose key is not 64
        lowercase hex digits (its ``key`` is given as ``<row N>``): it is never unpickled nor read
        as an entry (:func:`row_refusal`). A shard refused whole (its schema, its files) is one
        bad item, ``<shard>``, and is never removed.
        """
        from tqdm.auto import tqdm

        report: dict[str, Any] = {"checked": 0, "ok": 0, "bad": [], "removed": 0, "unchecked_metadata": 0}
        for name, reader in list(self._readers(force_scan=True)):
            if reader.check() is not None:  # refused whole, never queried
                report["bad"].append({"shard": name, "key": "<shard>", "error": f"shard refused: {reader.refusal}"})
                continue
            keys = reader.keys()
            for key in tqdm(keys, desc=f"verifying {name}", unit="img", disable=not progress):
                report["checked"] += 1
                decoded, error = self.read_entry(name, reader, key, decode_entry, remove=remove, strict=True)
                if decoded is None:
                    report["bad"].append({"shard": name, "key": key, "error": error})
                    report["removed"] += int(remove)
                    continue
                report["unchecked_metadata"] += META_CRC not in decoded[1]
                report["ok"] += 1
            for rowid, reason in reader.refused_rows():  # pickled keys/values: corrupt, never loaded
                report["checked"] += 1
                report["bad"].append({"shard": name, "key": f"<row {rowid}>", "error": f"row refused: {reason}"})
                if remove:
                    self._remove_refused_row(name, rowid, strict=True)
                    report["removed"] += 1
        return report

    def check_entries(self, keys: Iterable[str] | None = None, *, remove: bool = False
                      ) -> tuple[set[str], list[dict[str, str]]]:
        """Check every entry's (or those of ``keys``) header and checksums without decoding
        images (:func:`check_entry`): ``(good keys, [{"shard", "key", "error"}, ...])``.

        With ``remove``, bad entries are deleted (and counted) where the folder allows it.
        A key with a good copy in some shard is good.
        """
        good: set[str] = set()
        bad: list[dict[str, str]] = []
        wanted = None if keys is None else set(keys)
        for name, reader in list(self._readers(force_scan=True)):
            listed = reader.keys() if wanted is None else [k for k in wanted if k in reader]
            for key in listed:
                if key in good:
                    continue
                meta, error = self.read_entry(name, reader, key, check_entry, remove=remove)
                if meta is None:
                    bad.append({"shard": name, "key": key, "error": str(error)})
                    continue
                good.add(key)
        return good, [b for b in bad if b["key"] not in good]

    def stats(self, plan: Any = None) -> dict[str, Any]:
        """Entries, bytes on disk, shards, corrupt entries removed; with a plan, its coverage.

        Entries are counted after checking what can be checked without reading their image
        bytes (:meth:`ShardReader.check_heads`: the header, the metadata checksum, the sizes of
        the row, the value file and the header agree): ``entries`` and the plan's ``cached``
        count only those, ``bad`` the others, rows stored pickled included (``cache verify``
        names them, ``warm`` regenerates them). A changed image byte is left to ``cache verify``
        and the decoding readers.
        """
        import numpy as np

        shards = []
        corrupt = refused = 0
        keys, bad_keys, checked = self.checked_key_digests()
        for row in checked:
            reader = row["reader"]
            refused += len(reader.refused_rows())
            corrupt += reader.corrupt_counter()
            shard: dict[str, Any] = {"name": row["name"], "entries": row["entries"], "bytes": reader.volume()}
            if reader.refusal is not None:  # named in a warning; its entries are not counted
                shard["refused"] = reader.refusal
            shards.append(shard)
        result: dict[str, Any] = {
            "directory": str(self.directory),
            "entries": int(keys.size),
            "bad": int((~np.isin(bad_keys, keys)).sum()) + refused,
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
            "corrupt_removed": corrupt,
        }
        if plan is not None:
            spec = self.resolve_spec(plan)
            columns = getattr(plan, "columns", None)
            if columns is not None:  # an AugmentationPlan: its keys from the columns, no Variant each
                planned = np.unique(variant_digests(spec.fingerprint, *columns.key_inputs(np.arange(columns.n_sources))))
            else:
                planned = np.unique(np.array([key_bytes(spec.key(v)) for v in plan], dtype="S32"))
            covered = int(np.isin(planned, keys).sum())
            result["plan"] = {
                "images": int(planned.size),
                "cached": covered,
                "missing": int(planned.size) - covered,
                "coverage": covered / planned.size if planned.size else 1.0,
                "fingerprint": spec.fingerprint,
            }
        return result

    def export(self, out: str | os.PathLike[str], plan: Any = None, *, progress: bool = False) -> dict[str, Any]:
        """Write cached images as an image folder ``OUT/<class>/<key16>.png`` + ``OUT/samples.csv``.

        With a plan, only its images are exported and class folders are the plan's class
        folder names; otherwise every entry, in folders named after its class name. ``OUT`` must be
        new, empty or an earlier image-folder export (:func:`~dalda_aug.cache.imagefolder.write_image_folder`).
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        classes = list(plan.config.get("classes") or []) if plan is not None else []
        wanted = None
        if plan is not None:
            spec = self.resolve_spec(plan)
            wanted = {spec.key(v) for v in plan}
        # Folder names come from files (plan.json, entry metadata) anyone could have written:
        # export_folder_names keeps Unicode, removes separators/".."/control characters and never
        # gives two classes one folder, even on a disk that ignores case or Unicode normalisation;
        # the resolved path must still lie inside OUT. Without a plan, the class names are first
        # read from the entries' headers, so the folders do not depend on the order of entries.
        names = [str(c) for c in classes] if classes else self._class_names(wanted)
        exported = write_image_folder(out, self.iter_entries(wanted), classes, export_folder_names(names),
                                      png_compress_level=self.png_compress_level, progress=progress)
        missing = len(wanted) - exported if wanted is not None else 0
        return {"exported": exported, "out": str(out), "missing": missing}

    def _class_names(self, wanted: set[str] | None) -> list[str]:
        """The class name in each entry's header (or of those of ``wanted``), ``"unknown"`` where
        none is given: read, not checked (it only names folders)."""
        names = []
        for _, reader in self._readers(force_scan=True):
            for key in reader.keys() if wanted is None else [k for k in wanted if k in reader]:
                meta = reader.head(key)
                names.append(str((meta or {}).get("class_name") or "unknown"))
        return names


def open_cache_dir(directory: str | os.PathLike[str]) -> Path:
    """Check that ``directory`` is an existing cache folder (for read-only commands)."""
    path = Path(directory)
    if not path.is_dir():
        raise MissingFileError(f"cache folder not found: {path}")
    return path
