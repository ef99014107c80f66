"""Stat records: source files already verified against a plan, remembered by their stat, as git's index.

:class:`~dalda_aug.dataset.SyntheticAugmentedDataset` checks every planned source's pixels against
the plan's content hash at construction. Decoding every file on every construction (every rank,
every run) costs about one decode pass over the data, so with ``verify_sources="stat"`` it
remembers, per file, the ``(size, mtime_ns, inode, ctime_ns)`` the file had when its pixels last
matched (the fields git's index compares), and decodes again only the files whose stat changed: a
file replaced by another of the same size whose old mtime was restored still has a new inode or a
new ctime (the kernel sets ctime on every change, and no call sets it back).

A record is one ``.npy`` file of shape ``(N, 4)`` int64 under ``$DALDA_AUG_CACHE/stat`` (default
``$XDG_CACHE_HOME/dalda_aug/stat``, ``~/.cache/dalda_aug/stat``), named by the SHA-256 of the
ordered ``(file path, expected content hash)`` pairs it covers: row ``j`` says "file ``j`` had
this size, mtime_ns, inode and ctime_ns when its pixels hashed to its expected hash" (``-1``: not
verified). The
name binds the paths and the hashes, so a record never vouches for another plan or another folder.

The record is untrusted input: it is read as a regular file (no symlink, FIFO or device: see
:func:`~dalda_aug._io.read_regular`) up to the size its rows allow, with
``numpy.load(allow_pickle=False)``, its size,
dtype and shape are checked, and anything unexpected is ignored (the files are then verified in
full). It is written atomically; where it cannot be written (a read-only cache folder) the files
are verified in full next time too, and nothing fails. A file modified within
:data:`RACY_SECONDS` of its verification is not recorded (git's "racily clean" entries): a write
in the same clock tick could leave its stat unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import loads_bounded, read_regular, write_atomic
from ..errors import DaldaError, InputError
from ..locations import user_cache_dir

__all__ = ["COVERAGE_FORMAT", "CoverageRecord", "RACY_SECONDS", "STAT_FIELDS", "StatRecord", "file_stat", "file_stats",
           "record_dir", "settled", "stat_row"]

RECORD_FORMAT = b"dalda_aug.stat/2"  # /1 recorded (size, mtime_ns) only
#: The fields of a row: what :func:`file_stat` returns.
STAT_FIELDS = ("size", "mtime_ns", "inode", "ctime_ns")
#: Files modified this recently when verified are re-hashed next time (their stat may not move).
RACY_SECONDS = 2.0
_HEADER_MAX = 256  # bytes of .npy header a record may have beyond its rows
_FS_ENCODING = sys.getfilesystemencoding()
COVERAGE_FORMAT = "dalda_aug.coverage/1"
_COVERAGE_MAX = 1 << 20  # bytes: a coverage record lists a few rows per shard


def record_dir() -> Path:
    """``$DALDA_AUG_CACHE/stat`` (default ``$XDG_CACHE_HOME/dalda_aug/stat``)."""
    return user_cache_dir("stat")


def file_stat(path: str) -> tuple[int, int, int, int]:
    """``(size, mtime_ns, inode, ctime_ns)`` of ``path`` (:data:`STAT_FIELDS`); ``(-1, -1, -1, -1)``
    when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, -1, -1
    return stat_row(st)


def stat_row(st: os.stat_result) -> tuple[int, int, int, int]:
    """The :data:`STAT_FIELDS` of a ``stat`` (or ``fstat``) result."""
    return int(st.st_size), int(st.st_mtime_ns), _ino(st.st_ino), int(st.st_ctime_ns)


def _ino(ino: int) -> int:
    """An inode number as int64 (one above 2**63, seen on some network filesystems, wraps: it is
    compared, never used as a number)."""
    return ino if ino < 1 << 63 else ino - (1 << 64)


def file_stats(paths: Sequence[str]) -> "np.ndarray[Any, np.dtype[np.int64]]":
    """:func:`file_stat` of every path as an ``(N, 4)`` int64 array (one ``os.stat`` each, in a
    tight loop: a few microseconds a file)."""
    stat = os.stat
    try:
        found = [stat(path) for path in paths]
    except OSError:  # some file is missing: one at a time
        return np.array([file_stat(path) for path in paths], dtype=np.int64).reshape(-1, len(STAT_FIELDS))
    out = np.empty((len(found), len(STAT_FIELDS)), dtype=np.int64)
    out[:, 0] = [st.st_size for st in found]
    out[:, 1] = [st.st_mtime_ns for st in found]
    out[:, 2] = [_ino(st.st_ino) for st in found]
    out[:, 3] = [st.st_ctime_ns for st in found]
    return out


class StatRecord:
    """The record of ``paths`` (absolute file names) expected to hash to ``expected``."""

    def __init__(self, paths: Sequence[str], expected: Sequence[str], directory: Path | None = None) -> None:
        digest = hashlib.sha256(RECORD_FORMAT + b"\0")
        # One encode of every "path\0hash\n" line: the bytes os.fsencode(path) + b"\0" + hash + b"\n"
        # give (hashes are hex; one that is not names another record, never this one).
        text = "".join([f"{path}\0{sha}\n" for path, sha in zip(paths, expected)])
        digest.update(text.encode(_FS_ENCODING, "surrogateescape"))
        self.n = len(paths)
        self.path = (directory or record_dir()) / f"stat-{digest.hexdigest()}.npy"

    def load(self) -> "np.ndarray[Any, np.dtype[np.int64]] | None":
        """The recorded rows (:data:`STAT_FIELDS`), or None (no record, or one not to be trusted:
        not a regular file, too large, not an int64 array of the right shape)."""
        try:
            raw = read_regular(self.path, self.n * 8 * len(STAT_FIELDS) + _HEADER_MAX, "stat record")
        except (OSError, DaldaError):
            return None
        try:
            rows = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None
        if not isinstance(rows, np.ndarray) or rows.dtype != np.int64 or rows.shape != (self.n, len(STAT_FIELDS)):
            return None
        return rows

    def save_settled(self, stats: "np.ndarray[Any, np.dtype[np.int64]]") -> bool:
        """:meth:`save` the :func:`file_stats` rows of files just verified, each one modified
        racily recently (or missing) recorded as unverified (``-1`` in every field)."""
        now = time.time_ns()
        width = len(STAT_FIELDS)
        rows = np.array([row if settled((int(row[0]), int(row[1])), now) else (-1,) * width for row in stats],
                        dtype=np.int64).reshape(-1, width)
        return self.save(rows)

    def save(self, rows: "np.ndarray[Any, np.dtype[np.int64]]") -> bool:
        """Write ``rows`` atomically; False (and nothing raised) where it cannot be written."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(rows, dtype=np.int64), allow_pickle=False)
        try:
            write_atomic(self.path, buffer.getvalue())
        except OSError:
            return False
        return True


def settled(stat: tuple[int, int], now_ns: int | None = None) -> bool:
    """Whether a file with ``stat`` (``(size, mtime_ns, ...)``) may be recorded: it exists and was
    not modified racily recently (by its mtime, as git's racy-entry rule)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    return stat[0] >= 0 and stat[1] < now_ns - int(RACY_SECONDS * 1e9)


class CoverageRecord:
    """How many of a plan's distinct cache keys a cache folder held, remembered under the state of
    its shards' index files (:meth:`~dalda_aug.cache.shardset.ShardSet.state_token`).

    Counting the planned keys a cache holds takes a key and an SQL look-up per variant (about a
    second at 200,000 variants); a dataset constructed again over the same plan, spec and cache
    (every run, every rank) reads the count back instead while no shard's ``cache.db`` or WAL
    changed. The record is named by the SHA-256 of the cache folder's real path, the spec's
    fingerprint and the plan's key inputs (:meth:`~dalda_aug.plan.columns.PlanColumns.key_digest`),
    so it never vouches for another plan, spec or folder; it lives beside the stat records, in
    this user's cache folder, not in the (shared) cache. A token with a file modified within
    :data:`RACY_SECONDS` is not recorded. The file is JSON, read bounded (1 MiB); anything
    unexpected in it is ignored and the keys are counted."""

    def __init__(self, cache_dir: str | os.PathLike[str], fingerprint: str, key_digest: str,
                 directory: Path | None = None) -> None:
        digest = hashlib.sha256(f"{COVERAGE_FORMAT}\0{fingerprint}\0{key_digest}\0".encode("utf-8"))
        digest.update(os.fsencode(os.path.realpath(cache_dir)))
        self.path = (directory or record_dir()) / f"coverage-{digest.hexdigest()}.json"

    def load(self, token: list[list[Any]]) -> dict[str, int] | None:
        """The counts recorded under exactly ``token`` (``held`` <= ``planned``, and the others
        the writer added, all non-negative integers), or None."""
        try:  # a regular file, bounded: a FIFO or a link to /dev/zero planted here is ignored
            raw = read_regular(self.path, _COVERAGE_MAX, "coverage record")
        except (OSError, DaldaError):
            return None
        try:
            data = loads_bounded(raw, str(self.path))
        except InputError:
            return None
        if not isinstance(data, dict) or data.get("format") != COVERAGE_FORMAT or data.get("token") != token:
            return None
        counts = data.get("counts")
        if not isinstance(counts, dict) or not all(type(v) is int and v >= 0 for v in counts.values()):
            return None
        held, planned = counts.get("held"), counts.get("planned")
        if held is None or planned is None or held > planned:
            return None
        return {str(k): int(v) for k, v in counts.items()}

    def save(self, token: list[list[Any]], counts: dict[str, int], now_ns: int | None = None) -> bool:
        """Record ``counts`` under ``token``; False (nothing raised, nothing written) where the
        token is racy (a file modified within :data:`RACY_SECONDS`) or the folder cannot be written."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        if not token or not all(settled((int(row[2]), int(row[3])), now_ns) for row in token):
            return False
        text = json.dumps({"format": COVERAGE_FORMAT, "token": token, "counts": counts})
        try:
            write_atomic(self.path, text)
        except OSError:
            return False
        return True
