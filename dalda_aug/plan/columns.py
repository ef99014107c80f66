"""The plan as columns: one ``.npy`` per field, memory-mapped by readers instead of parsed.

``plan.jsonl`` stays the readable, editable interchange; ``PLAN/columns/`` holds the same rows as
arrays that :class:`~dalda_aug.plan.AugmentationPlan` maps with ``numpy.load(mmap_mode="r",
allow_pickle=False)``, so a plan of millions of variants costs no Python object per variant, and
DataLoader workers map the pages the parent process already read (file-backed, shared memory).

Per variant (``V`` rows): ``source``, ``class_name``, ``prompt``, ``source_sha256`` (int32 indices
into string tables), ``label``, ``variant`` (int32), ``score``, ``lambda``, ``strength`` (float64;
NaN: no strength), ``seed`` (int64). Grouping: ``order`` (int32, the rows sorted by source index
then variant, stable) and ``group_start`` (int64, ``S + 1`` offsets into ``order``), so the
variants of source ``s`` are ``order[group_start[s]:group_start[s + 1]]``. Sources are numbered in
order of first appearance (the plan's order); ``source_is_int`` (bool, per source) keeps sources
that are item indices integers.

Strings are one UTF-8 blob plus int64 offsets per table (``<table>.blob.npy``,
``<table>.offsets.npy``), as Arrow lays out strings: paths and prompts vary from 20 to 200 bytes,
so a fixed width would pad every entry to the longest, and NumPy's ``U`` dtype stores 4 bytes per
character. Each distinct string is stored once (prompts repeat across sources).

``plan.json`` records the SHA-256 of every column file (``"column_digests"``, beside the
``"digests"`` of ``plan.jsonl`` and ``summary.json``); a reader checks them before use (a worker mapping what its parent
checked does not), and ``columns/meta.json`` records the size and the SHA-256 of the ``plan.jsonl`` they
were derived from, so a folder whose ``plan.jsonl`` was since rewritten (even to the same size, with
``plan.json``'s digest stamped again) is read from ``plan.jsonl``.

A column file is untrusted input: it must be a regular file (no symlink, FIFO or device; refused
before it is hashed) and its content is checked at load, in one vectorised pass: dtypes, string
tables (UTF-8 text; source paths may hold any bytes but NUL, as file names do), every index within
its table, ``order`` a permutation sorting the rows by source then variant, ``group_start`` the
matching offsets, ``source_is_int`` true to the strings, labels, variants and seeds non-negative,
scores finite, λ finite and non-negative, strengths within [0, 1], and one score per source (each
source has one CLIPScore, so a ``score`` and ``lambda`` swapped between files is refused); the plan
checks the bounds its scaling sets (:meth:`~dalda_aug.plan.AugmentationPlan.load`). Anything else is an
:class:`~dalda_aug.errors.InputError` naming the file.

Source paths are file names, so they are stored as the bytes the file system gives
(``surrogateescape``, as :func:`os.fsencode`): a file whose name is not UTF-8 is planned, mapped and
read back under the same name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

from .._io import atomic_writer, open_regular, sweep_orphans
from ..errors import InputError, TemporaryFolderError
from .arrays import (
    StringTable, string_blob, flock_shared, grouping, lf_sha256, mapped, not_int_text, npy_bytes, remove_spill,
    write_bytes_atomic,
)
from .records import StatRecord, file_stats, stat_row

__all__ = ["COLUMNS_DIR", "COLUMNS_FORMAT", "KeyFields", "PlanColumns", "SPILL_ROWS", "STRING_TABLES"]

COLUMNS_DIR = "columns"
COLUMNS_FORMAT = "dalda_aug.plan-columns/2"  # /1 bound the columns to plan.jsonl's size only
#: Fields stored as indices into a table of distinct strings.
STRING_TABLES = ("source", "class_name", "prompt", "source_sha256")
#: An in-memory plan of at least this many rows is written to a temporary folder when pickled
#: (:meth:`PlanColumns.spill`), so spawned DataLoader workers map it instead of each copying it.
SPILL_ROWS = 100_000
#: Name prefix of :meth:`PlanColumns.spill`'s folders: ``dalda-aug-plan-<pid>-<random>`` in the
#: temporary folder; those of processes that are gone are swept (:func:`~dalda_aug._io.sweep_orphans`).
SPILL_PREFIX = "dalda-aug-plan-"
_NUMERIC = {"label": np.int32, "variant": np.int32, "score": np.float64, "lambda": np.float64,
            "strength": np.float64, "seed": np.int64}
_PER_VARIANT = (*STRING_TABLES, *_NUMERIC)
_GROUPING = ("order", "group_start", "source_is_int")
_DTYPES = {**{name: np.int32 for name in STRING_TABLES}, **_NUMERIC, "order": np.int32, "group_start": np.int64,
           "source_is_int": np.bool_}
# How each string table's bytes decode: source paths as file names (any bytes, as os.fsdecode gives
# them), the others as UTF-8 text.
_DECODING = {"source": "surrogateescape"}

Array = "np.ndarray[Any, Any]"


def _file_names() -> list[str]:
    names = [f"{name}.npy" for name in (*_PER_VARIANT, *_GROUPING)]
    names += [f"{table}.{part}.npy" for table in STRING_TABLES for part in ("blob", "offsets")]
    return names


class KeyFields(NamedTuple):
    """The fields of a variant its cache key reads (``GenerationSpec.key`` takes it as a variant)."""

    prompt: str
    lam: float
    seed: int
    source_sha256: str


class PlanColumns:
    """A plan's rows as arrays (in memory, or mapped from ``PLAN/columns``)."""

    def __init__(self, arrays: dict[str, Any], directory: Path | None = None) -> None:
        self.arrays = arrays
        #: The folder the arrays are mapped from (a plan folder, or the temporary folder of
        #: :meth:`spill`), or None when they live in memory.
        self.directory = directory
        self._spilled: Any = None  # the finalizer that removes a spilled folder
        self._check_shapes()

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Iterable[Any]) -> "PlanColumns":
        """Columns of ``rows`` (:class:`~dalda_aug.plan.Variant` objects)."""
        tables = {name: StringTable() for name in STRING_TABLES if name != "source"}
        sources: dict[tuple[bool, Any], int] = {}  # 3 and "3" may both be sources: keyed apart
        cols: dict[str, list[Any]] = {name: [] for name in _PER_VARIANT}
        for v in rows:
            key = (type(v.source) is int, v.source)
            s = sources.get(key)
            if s is None:
                s = sources[key] = len(sources)
            cols["source"].append(s)
            cols["class_name"].append(tables["class_name"].add(v.class_name))
            cols["prompt"].append(tables["prompt"].add(v.prompt))
            cols["source_sha256"].append(tables["source_sha256"].add(v.source_sha256))
            cols["label"].append(v.label)
            cols["variant"].append(v.variant)
            cols["score"].append(v.score)
            cols["lambda"].append(v.lam)
            cols["strength"].append(np.nan if v.strength is None else v.strength)
            cols["seed"].append(v.seed)
        arrays: dict[str, Any] = {}
        for name in STRING_TABLES:
            arrays[name] = np.asarray(cols[name], dtype=np.int32).reshape(-1)
            if name == "source":  # file names: any bytes the file system gave (os.fsdecode's surrogates)
                blob, offsets = string_blob([str(source) for (_, source) in sources], _DECODING["source"], "plan source")
            else:
                blob, offsets = tables[name].arrays(_DECODING.get(name, "strict"), f"plan {name.replace('_', ' ')}")
            arrays[f"{name}.blob"], arrays[f"{name}.offsets"] = blob, offsets
        for name, dtype in _NUMERIC.items():
            arrays[name] = np.asarray(cols[name], dtype=dtype).reshape(-1)
        arrays["source_is_int"] = np.asarray([is_int for (is_int, _) in sources], dtype=bool).reshape(-1)
        arrays["order"], arrays["group_start"] = grouping(arrays["source"], arrays["variant"], len(sources))
        return cls(arrays)

    # -- files -------------------------------------------------------------------------------------
    def save(self, directory: Path, rows_size: int, rows_digest: str) -> dict[str, str]:
        """Write every column into ``directory/columns``; ``{relative file name: SHA-256}``.
        ``columns/meta.json`` binds them to the ``plan.jsonl`` of ``rows_size`` bytes and SHA-256
        ``rows_digest`` (CRLF read as LF) they were made with."""
        folder = directory / COLUMNS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        digests: dict[str, str] = {}
        for file_name in _file_names():
            data = npy_bytes(self.arrays[file_name[: -len(".npy")]])
            write_bytes_atomic(folder / file_name, data)
            digests[f"{COLUMNS_DIR}/{file_name}"] = hashlib.sha256(data).hexdigest()
        meta = json.dumps({"format": COLUMNS_FORMAT, "plan.jsonl bytes": int(rows_size),
                           "plan.jsonl sha256": str(rows_digest)}) + "\n"
        write_bytes_atomic(folder / "meta.json", meta.encode("utf-8"))
        return digests

    @classmethod
    def load(cls, directory: Path, digests: dict[str, str], rows_size: int, verify: bool = True,
             rows_digest: str | None = None) -> "PlanColumns | None":
        """The columns mapped from ``directory/columns``, or None where the folder has none that
        ``plan.json`` records (an older plan) or they were derived from another ``plan.jsonl``.
        A column whose bytes differ from the recorded digest, that is not a regular file, or whose
        content is not that of plan columns, is an :class:`InputError` naming it.

        ``plan.jsonl`` is the editable interchange, so the columns stand for it only while
        ``columns/meta.json`` records ``rows_digest`` (``plan.json``'s SHA-256 of ``plan.jsonl``)
        and ``plan.jsonl`` still hashes to it (CRLF read as LF): an edited ``plan.jsonl``, even one
        of the same size whose digest was stamped into ``plan.json`` again, gives None, and the
        JSONL reader then reads it (or refuses it against ``plan.json``). Hashing ``plan.jsonl``
        and every column on every load would cost about a second per million variants, so, as for
        the dataset's sources, a stat record of this user
        (:class:`~dalda_aug.plan.records.StatRecord`, named by the paths and the digests) remembers
        the ``(size, mtime_ns, inode, ctime_ns)`` each file had when it matched, and only files
        whose stat moved are hashed again (a copied folder once, a read-only one too)."""
        from .._io import read_json_object

        folder = directory / COLUMNS_DIR
        names = _file_names()
        if not all(f"{COLUMNS_DIR}/{name}" in digests for name in names) or not (folder / "meta.json").is_file():
            return None
        meta = read_json_object(folder / "meta.json", "plan columns record")
        if (meta.get("format") != COLUMNS_FORMAT or meta.get("plan.jsonl bytes") != rows_size
                or rows_digest is None or meta.get("plan.jsonl sha256") != rows_digest):
            return None
        # Files whose stat a stat record of this user says matched these digests are not hashed
        # again (as the dataset's sources: dalda_aug.plan.records); the others are.
        rows_path = directory / "plan.jsonl"
        paths = [os.path.abspath(rows_path), *(os.path.abspath(folder / name) for name in names)]
        expected = [rows_digest, *(digests[f"{COLUMNS_DIR}/{name}"] for name in names)]
        record = StatRecord(paths, expected)
        stats = file_stats(paths)
        known = record.load() if verify else None
        unchanged = np.zeros(len(paths), dtype=bool) if known is None else \
            (known == stats).all(axis=1) & (stats[:, 0] >= 0)
        if verify and not unchanged[0]:
            if lf_sha256(rows_path) != rows_digest:
                return None
        arrays: dict[str, Any] = {}
        # every file as a record of this user says it was when its bytes matched and its content was
        # checked (a record is written only after both): the content check is not repeated
        checked = verify and bool(unchanged.all())
        for j, name in enumerate(names, start=1):
            path = folder / name
            # opened once, as data: no symlink, FIFO, device or folder (refused before any byte is
            # read); the bytes hashed are the bytes mapped
            fd, st = open_regular(path, "plan column")
            with os.fdopen(fd, "rb") as fh:
                if verify and not (unchanged[j] and tuple(stats[j]) == stat_row(st)):
                    digest = hashlib.sha256()
                    while chunk := fh.read(1 << 22):
                        digest.update(chunk)
                    if digest.hexdigest() != digests[f"{COLUMNS_DIR}/{name}"]:
                        raise InputError(f"plan folder {directory}: {COLUMNS_DIR}/{name} differs from what plan.json "
                                         "records (SHA-256): write the plan again with `dalda-aug plan`")
                    stats[j] = stat_row(st)
                    checked = False
                    fh.seek(0)
                try:
                    arrays[name[: -len(".npy")]] = mapped(fh)
                except (ValueError, OSError, EOFError) as exc:
                    raise InputError(f"{path}: not a plan column: {exc}") from None
        columns = cls(arrays, directory)
        if not checked:
            columns.check_content()
        if verify and not unchanged.all():
            record.save_settled(stats)  # where it cannot be written: hashed next time
        return columns

    def _check_shapes(self) -> None:
        a = self.arrays
        where = self.directory or "plan columns"
        missing = [name for name in (*_PER_VARIANT, *_GROUPING) if name not in a]
        if missing:
            raise InputError(f"{where}: no column {missing[0]!r}")
        for name, dtype in _DTYPES.items():
            if not isinstance(a[name], np.ndarray) or a[name].dtype != dtype:
                raise InputError(f"{self._file(name)}: column {name!r} holds {getattr(a[name], 'dtype', '?')}, "
                                 f"expected {np.dtype(dtype)}")
        n = a["source"].shape
        for name in _PER_VARIANT:
            if a[name].ndim != 1 or a[name].shape != n:
                raise InputError(f"{self._file(name)}: column {name!r} has shape {a[name].shape}, expected {n}")
        for table in STRING_TABLES:
            offsets, blob = a[f"{table}.offsets"], a[f"{table}.blob"]
            if offsets.dtype != np.int64 or blob.dtype != np.uint8 or offsets.ndim != 1 or offsets.size < 1 \
                    or blob.ndim != 1 or offsets[0] != 0 or offsets[-1] != blob.size or (np.diff(offsets) < 0).any():
                raise InputError(f"{self._file(table + '.offsets')}: string table {table!r} is not a blob with "
                                 "ascending offsets")
            if a[table].size and (int(a[table].min()) < 0 or int(a[table].max()) >= offsets.size - 1):
                raise InputError(f"{self._file(table)}: column {table!r} points outside its string table")
        s = a["source.offsets"].size - 1
        if a["source_is_int"].shape != (s,) or a["group_start"].shape != (s + 1,) or a["order"].shape != n:
            raise InputError(f"{where}: the grouping columns do not match {s} sources")

    def _file(self, name: str) -> str:
        """Where column ``name`` lives, for a message: its file, or the column's name in memory."""
        return str(Path(self.directory) / COLUMNS_DIR / f"{name}.npy") if self.directory is not None \
            else f"plan column {name!r}"

    def check_content(self) -> None:
        """Check what :meth:`load` maps beyond shapes and dtypes (an :class:`InputError` naming
        the file otherwise): the string tables decode (UTF-8 text; source paths any bytes but NUL,
        each entry starting on a character), ``order`` is the permutation that sorts the rows by
        source then variant (stable) and ``group_start`` its offsets, every source has rows,
        numbered in order of first appearance, ``source_is_int`` marks integers only, labels,
        variants and seeds are non-negative, scores are finite, λ finite and non-negative,
        strengths NaN or in [0, 1], and all the rows of a source share its score. One vectorised
        pass, about 0.1 s per million variants; :meth:`load` skips it where a stat record says
        every file is as it was when it was last checked."""
        a = self.arrays
        for table in STRING_TABLES:
            blob, offsets = a[f"{table}.blob"], a[f"{table}.offsets"]
            if _DECODING.get(table) == "surrogateescape":
                if blob.size and not blob.all():
                    raise InputError(f"{self._file(table + '.blob')}: a {table} holds a NUL byte")
                continue
            try:
                blob.tobytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{self._file(table + '.blob')}: string table {table!r} is not UTF-8 text "
                                 f"({exc.reason} at byte {exc.start})") from None
            starts = offsets[:-1][offsets[:-1] < blob.size]
            if starts.size and ((blob[starts] & 0xC0) == 0x80).any():
                raise InputError(f"{self._file(table + '.offsets')}: an entry of string table {table!r} starts "
                                 "inside a UTF-8 character")
        n, n_sources = len(self), self.n_sources
        order, start = a["order"], a["group_start"]
        if n and (int(order.min()) < 0 or int(order.max()) >= n):
            raise InputError(f"{self._file('order')}: row numbers outside [0, {n})")
        if n and np.bincount(order, minlength=n).max() != 1:
            raise InputError(f"{self._file('order')}: a row is listed twice (not a permutation of the rows)")
        sizes = np.diff(start)
        if start[0] != 0 or start[-1] != n or (sizes < 1).any():
            raise InputError(f"{self._file('group_start')}: not the offsets of {n_sources} non-empty groups of "
                             f"{n} rows (ascending from 0 to {n})")
        source, variant = a["source"][order], a["variant"][order]
        if not np.array_equal(source, np.repeat(np.arange(n_sources, dtype=np.int32), sizes)):
            raise InputError(f"{self._file('order')}: does not group the rows by source as group_start says")
        same = source[1:] == source[:-1]
        ahead = (variant[1:] > variant[:-1]) | ((variant[1:] == variant[:-1]) & (order[1:] > order[:-1]))
        if (same & ~ahead).any():
            raise InputError(f"{self._file('order')}: the rows of a source are not in variant order")
        if n_sources and (np.diff(np.minimum.reduceat(order, start[:-1])) <= 0).any():
            raise InputError(f"{self._file('source')}: sources are not numbered in order of first appearance")
        bad_int = not_int_text(a["source.blob"], a["source.offsets"], a["source_is_int"])
        if bad_int is not None:
            offsets = a["source.offsets"]
            text = bytes(a["source.blob"][int(offsets[bad_int]) : int(offsets[bad_int + 1])])
            raise InputError(f"{self._file('source_is_int')}: source {bad_int} is marked an integer, but its text "
                             f"{text[:80]!r} is not one")
        for name in ("label", "variant", "seed"):
            if n and int(a[name].min()) < 0:
                raise InputError(f"{self._file(name)}: a negative {name} ({int(a[name].min())})")
        # what every plan holds (the scaling's own bounds are checked by the plan, which knows it)
        for name, low, high, what in (("score", -np.inf, np.inf, "a finite number"),
                                      ("lambda", 0.0, np.inf, "a finite number >= 0"),
                                      ("strength", 0.0, 1.0, "NaN or in [0, 1]")):
            values = a[name]
            bad = ~((values >= low) & (values <= high) & np.isfinite(values))
            if name == "strength":
                bad &= ~np.isnan(values)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise InputError(f"{self._file(name)}: {name} {float(values[row])!r} of row {row} is not {what}")
        score = a["score"][order]
        if (same & (score[1:] != score[:-1])).any():
            raise InputError(f"{self._file('score')}: the rows of one source have different scores (a source has "
                             "one CLIPScore; are the score and lambda columns swapped?)")

    # -- reading -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.arrays["source"].shape[0])

    @property
    def n_sources(self) -> int:
        return int(self.arrays["source_is_int"].shape[0])

    def string(self, table: str, k: int) -> str:
        offsets = self.arrays[f"{table}.offsets"]
        return bytes(self.arrays[f"{table}.blob"][int(offsets[k]) : int(offsets[k + 1])]).decode(
            "utf-8", _DECODING.get(table, "strict"))

    def strings(self, table: str, codes: Any = None) -> list[str]:
        """The strings of ``table`` at ``codes`` (all of them when None), decoded in bulk: the blob
        read once, each entry sliced from it (a few times faster than :meth:`string` per entry)."""
        offsets = self.arrays[f"{table}.offsets"]
        if codes is None:
            starts, ends = offsets[:-1], offsets[1:]
        else:
            codes = np.asarray(codes, dtype=np.int64)
            starts, ends = offsets[codes], offsets[codes + 1]
        raw = self.arrays[f"{table}.blob"].tobytes()
        errors = _DECODING.get(table, "strict")
        return [raw[a:b].decode("utf-8", errors) for a, b in zip(starts.tolist(), ends.tolist())]

    def source(self, s: int) -> str | int:
        text = self.string("source", s)
        return int(text) if self.arrays["source_is_int"][s] else text

    def sources(self) -> list[str | int]:
        texts = self.strings("source")
        is_int = self.arrays["source_is_int"]
        if not is_int.any():
            return list(texts)
        return [int(t) if i else t for t, i in zip(texts, is_int.tolist())]

    def source_hashes(self, sources: Any) -> list[str]:
        """The content hash (``source_sha256``) of each source number in ``sources``."""
        a = self.arrays
        sources = np.asarray(sources, dtype=np.int64)
        first_rows = a["order"][a["group_start"][sources]]
        return self.strings("source_sha256", a["source_sha256"][first_rows])

    def rows_of(self, s: int) -> Any:
        """Row indices of source ``s``'s variants, in variant order."""
        start = self.arrays["group_start"]
        return self.arrays["order"][int(start[s]) : int(start[s + 1])]

    def n_variants(self, s: int) -> int:
        """How many variants source number ``s`` has."""
        start = self.arrays["group_start"]
        return int(start[s + 1] - start[s])

    def source_hash(self, s: int) -> str:
        """The content hash (SHA-256) of source number ``s``, read from its first row."""
        row = int(self.rows_of(s)[0])
        return self.string("source_sha256", int(self.arrays["source_sha256"][row]))

    def group_sizes(self) -> Any:
        return np.diff(self.arrays["group_start"])

    def fields(self, i: int) -> tuple[Any, ...]:
        """Row ``i`` in :class:`~dalda_aug.plan.Variant` field order."""
        a = self.arrays
        strength = float(a["strength"][i])
        return (self.source(int(a["source"][i])), int(a["label"][i]), self.string("class_name", int(a["class_name"][i])),
                float(a["score"][i]), int(a["variant"][i]), self.string("prompt", int(a["prompt"][i])),
                float(a["lambda"][i]), int(a["seed"][i]), self.string("source_sha256", int(a["source_sha256"][i])),
                None if np.isnan(strength) else strength)

    def rows_for(self, sources: Any) -> Any:
        """Row indices of every variant of the source numbers ``sources``, source by source in
        order, each source's in variant order (one gather, no Python loop)."""
        a = self.arrays
        sources = np.asarray(sources, dtype=np.int64)
        if not sources.size:
            return np.zeros(0, dtype=np.int64)
        start, sizes = a["group_start"][sources], np.diff(a["group_start"])[sources]
        first = np.repeat(start - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
        return a["order"][first + np.arange(int(sizes.sum()))]

    def key_fields(self, sources: Any) -> list[KeyFields]:
        """The key fields of every variant of the source numbers ``sources``, in order (each
        distinct string decoded once; for counting a plan's cache keys without a Variant each)."""
        prompts, prompt_codes, lams, seeds, shas, sha_codes = self.key_inputs(sources)
        return [KeyFields(prompts[p], lam, seed, shas[h])
                for p, lam, seed, h in zip(prompt_codes, lams, seeds, sha_codes)]

    def key_inputs(self, sources: Any) -> tuple[list[str], list[int], list[float], list[int], list[str], list[int]]:
        """What cache keys are made of, for every variant of ``sources`` (as :meth:`key_fields`),
        as columns: ``(prompts, prompt_codes, lambdas, seeds, source_hashes, hash_codes)``, where
        variant ``i``'s prompt is ``prompts[prompt_codes[i]]`` (each distinct string decoded once).
        :func:`dalda_aug.cache.variant_keys` takes them as they are."""
        return self.key_inputs_of_rows(self.rows_for(sources))

    def key_inputs_of_rows(self, rows: Any) -> tuple[list[str], list[int], list[float], list[int], list[str], list[int]]:
        """:meth:`key_inputs` of the rows numbered ``rows`` (plan order: row ``i`` is the plan's
        ``i``-th variant)."""
        a = self.arrays
        rows = np.asarray(rows, dtype=np.int64)
        tables = []
        for table in ("prompt", "source_sha256"):
            used, codes = np.unique(a[table][rows], return_inverse=True)
            tables.append(([self.string(table, int(k)) for k in used], codes.astype(np.int64).tolist()))
        (prompts, prompt_codes), (shas, sha_codes) = tables
        return prompts, prompt_codes, a["lambda"][rows].tolist(), a["seed"][rows].tolist(), shas, sha_codes

    def key_digest(self, sources: Any) -> str:
        """SHA-256 of everything the cache keys of ``sources``' variants are made of, in order (the
        rows' prompt, λ, seed and source-hash columns and both string tables): two calls agree
        exactly when the keys agree, without computing a key (coverage records are named by it)."""
        a = self.arrays
        rows = self.rows_for(sources)
        digest = hashlib.sha256(b"dalda_aug.plan-key-inputs/1\0")
        for name in ("prompt", "lambda", "seed", "source_sha256"):
            digest.update(np.ascontiguousarray(a[name][rows]).tobytes())
        for table in ("prompt", "source_sha256"):
            for part in ("offsets", "blob"):
                digest.update(np.ascontiguousarray(a[f"{table}.{part}"]).tobytes())
        return digest.hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        if self.directory is None and len(self) >= SPILL_ROWS:
            self.spill()
        if self.directory is not None:  # workers map the same files (the parent checked them)
            return {"directory": self.directory, "host": socket.gethostname(), "spilled": self._spilled is not None}
        return {"arrays": {name: np.asarray(value) for name, value in self.arrays.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._spilled = None
        self.directory = state.get("directory")
        if self.directory is not None:
            folder = Path(self.directory) / COLUMNS_DIR
            try:
                self.arrays = {name[: -len(".npy")]: mapped(folder / name) for name in _file_names()}
            except OSError as exc:
                where = (f"the temporary folder {self.directory} an in-memory plan was written to on host "
                         f"{state.get('host')!r}" if state.get("spilled") else f"the plan folder {self.directory}")
                raise InputError(
                    f"cannot map the plan's columns from {where}: {exc.strerror or exc}; a dataset unpickled on "
                    "another machine needs its plan folder on storage both machines mount (plan.save(DIR), then "
                    "pass DIR)") from None
        else:
            self.arrays = state["arrays"]
        self._check_shapes()

    def spill(self) -> Path:
        """Write in-memory columns to a temporary folder and map them from there (once): pickling
        then sends the folder's path, so DataLoader workers map the pages this process reads
        instead of each receiving a private copy (about 50 bytes a variant). Done by pickling a
        plan of :data:`SPILL_ROWS` rows or more; the folder is removed when these columns are
        garbage-collected or the process exits (workers keep their mappings).

        The folder is ``$TMPDIR/dalda-aug-plan-<pid>-<random>``; this process (and the processes
        it forks) hold a shared ``flock`` on it, so a process killed before it could remove its
        folder (``kill -9``) leaves one that the next spill on this machine sweeps
        (:func:`~dalda_aug._io.sweep_orphans`). Where the temporary folder cannot hold it (full,
        or a file-size limit), a :class:`~dalda_aug.errors.TemporaryFolderError` says so in one
        line naming ``TMPDIR`` and ``plan.save(DIR)``."""
        if self.directory is not None:
            return Path(self.directory)
        import shutil
        import weakref

        sweep_orphans(SPILL_PREFIX)
        lock = -1
        folder: Path | None = None
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-"))
            lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
            flock_shared(lock)
            (folder / COLUMNS_DIR).mkdir()
            for file_name in _file_names():
                with atomic_writer(folder / COLUMNS_DIR / file_name) as fh:
                    np.save(fh, np.ascontiguousarray(self.arrays[file_name[: -len(".npy")]]), allow_pickle=False)
            arrays = {name[: -len(".npy")]: mapped(folder / COLUMNS_DIR / name) for name in _file_names()}
        except BaseException as exc:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if lock >= 0:
                os.close(lock)
            if isinstance(exc, OSError):
                raise self._spill_error(exc) from None
            raise
        self.arrays, self.directory = arrays, folder
        self._spilled = weakref.finalize(self, remove_spill, str(folder), lock, os.getpid())
        return folder

    def _spill_error(self, exc: OSError) -> TemporaryFolderError:
        size = sum(int(np.asarray(value).nbytes) for value in self.arrays.values())
        full = " (full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return TemporaryFolderError(
            f"cannot write the plan's {len(self)} rows ({size / 1e6:.1f} MB) to the temporary folder "
            f"{tempfile.gettempdir()} (TMPDIR){full} for DataLoader workers to map: {exc.strerror or exc}; "
            "save the plan (plan.save(DIR)) and pass DIR instead of the plan object, or point TMPDIR at a "
            "folder with room")

    def _copy(self, deep: bool) -> "PlanColumns":
        """A copy for :mod:`copy`: columns mapped from a plan folder stay mapped from it (read-only);
        a spilled folder belongs to its columns alone, so a copy holds the rows in memory (sharing
        the read-only pages) and spills a folder of its own when it is pickled."""
        if self._spilled is not None:
            return PlanColumns(dict(self.arrays))
        arrays = {name: np.array(value) if deep and value.flags.writeable else value
                  for name, value in self.arrays.items()}
        return PlanColumns(arrays, self.directory)

    def __copy__(self) -> "PlanColumns":
        return self._copy(deep=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> "PlanColumns":
        found: PlanColumns = memo.get(id(self)) or self._copy(deep=True)
        memo[id(self)] = found
        return found
