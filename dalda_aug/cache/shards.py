"""A shard: one diskcache folder ``CACHE/shard-<name>/`` (SQLite plus value files), read and written here.

Everything that touches a shard's SQLite rows is in this module:

* :func:`row_refusal`, the one rule of what a row may be (text keys; values of raw bytes, text
  or numbers; value files named as diskcache names them). A pickled key or value is a corrupt
  entry, never unpickled.
* :func:`safe_disk`, the ``diskcache.Disk`` of the writing handles, which applies that rule and
  never pickles; :func:`shard_settings`, the settings they are opened with (no eviction).
* :class:`ShardReader`, read-only access that never writes (a read-only or full disk serves readers).
* the persistent counter of corrupt entries removed (:func:`count_corrupt`) and the removal of a
  refused row by its rowid (:func:`delete_row`).
* shard names (:func:`default_shard_name`) and network filesystem detection
  (:func:`is_network_filesystem`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import CacheStorageError, CorruptEntryError, require
from .codecs import HEAD_READ, HEADER, MAGIC, Refused, check_entry, check_head, head_length
from .spec import is_entry_key

__all__ = [
    "SHARD_PREFIX",
    "MODE_RAW",
    "MODE_BINARY",
    "MODE_TEXT",
    "MODE_PICKLE",
    "VALUE_FILE",
    "ShardReader",
    "row_refusal",
    "safe_disk",
    "shard_settings",
    "count_corrupt",
    "delete_row",
    "default_shard_name",
    "sanitize_shard_name",
    "is_network_filesystem",
    "existing_parent",
    "human_bytes",
]

log = logging.getLogger("dalda_aug.cache")  # the cache's one logger, whichever of its modules speaks

SHARD_PREFIX = "shard-"
# Persistent counter of corrupt entries removed, kept in each shard under this text key (entry
# keys are 64 hex characters). Before it, the counter's key was a pickled tuple: such a row is
# still recognised, by comparing its bytes, never by unpickling them (_legacy_counter_keys).
_CORRUPT_COUNTER = "dalda_aug:corrupt_removed"
_LEGACY_CORRUPT_COUNTER = ("dalda_aug", "corrupt_removed")
# diskcache's value modes (diskcache.core.MODE_*): bytes/text/number in the row, bytes in a file,
# text in a file, a pickle. This library writes the first three only and never reads the fourth.
MODE_RAW, MODE_BINARY, MODE_TEXT, MODE_PICKLE = 1, 2, 3, 4
# The value files diskcache names (Disk.filename): two levels of 2 hex digits, 28 hex digits, .val.
VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
# Keys per SQL ``IN (...)`` query (SQLite's older builds allow 999 parameters).
_IN_BATCH = 900
# Network filesystems on which SQLite's WAL mode and mmap are unsafe.
_NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.juicefs", "9p", "afs", "panfs", "wekafs",
}


# ------------------------------------------------------------------------------------------
# shard names and filesystems
# ------------------------------------------------------------------------------------------
def sanitize_shard_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def default_shard_name(rank: int | None = None) -> str:
    """``<host>-<rank>``: the shard this process writes to (rank: argument, ``$RANK`` or 0)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    return f"{sanitize_shard_name(socket.gethostname())}-{int(rank)}"


def _mount_fstype(path: Path) -> str | None:
    """Filesystem type of the mount holding ``path`` (Linux ``/proc/mounts``), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def is_network_filesystem(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (or its nearest existing parent) is on a known network filesystem."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return (_mount_fstype(p) or "").lower() in _NETWORK_FS


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"



# ------------------------------------------------------------------------------------------
# what a shard row may be: the one rule every read and write of a shard applies
# ------------------------------------------------------------------------------------------
def row_refusal(raw: Any, mode: Any, filename: Any) -> str | None:
    """Why a diskcache row (its ``raw``, ``mode`` and ``filename`` columns) is refused, or None.

    A shard is data written by whoever made it: a cache shipped by someone else, or one whose
    folder is named like this process's own shard. This library writes keys raw (text) and values
    raw (bytes, text, numbers in the row) or as bytes/text in a value file named by diskcache; a
    row that says its key (``raw = 0``) or value (mode 4) is pickled would run code when loaded,
    so it is never deserialised: reads treat it as a corrupt entry. A value file whose name is
    not one diskcache gives (an absolute path, ``..``) is refused too: it would be read, and on
    removal deleted, outside the shard.
    """
    if not raw:
        return "its key is stored pickled (diskcache raw = 0): refused, never unpickled"
    if mode == MODE_PICKLE:
        return "its value is stored pickled (diskcache mode 4): refused, never unpickled"
    if mode not in (MODE_RAW, MODE_BINARY, MODE_TEXT):
        return f"its value has an unknown storage mode {mode!r}"
    if mode != MODE_RAW and not (isinstance(filename, str) and VALUE_FILE.fullmatch(filename)):
        return f"its value file name {str(filename)[:80]!r} is not one diskcache writes"
    return None


@functools.lru_cache(maxsize=None)
def _legacy_counter_keys() -> frozenset[bytes]:
    """The bytes older versions stored as the corrupt-entry counter's key (a pickled tuple,
    as diskcache's ``Disk.put`` writes it for any protocol): recognised by comparison only."""
    import pickle  # pickle.dumps of a constant tuple of strings: nothing is ever loaded
    import pickletools

    return frozenset(pickletools.optimize(pickle.dumps(_LEGACY_CORRUPT_COUNTER, protocol=p))
                     for p in range(pickle.HIGHEST_PROTOCOL + 1))


@functools.lru_cache(maxsize=None)
def safe_disk() -> Any:
    """A ``diskcache.Disk`` that never pickles or unpickles (the writing handles use it).

    Keys and values this library writes are text, bytes and numbers, which diskcache stores raw;
    anything it would pickle is refused on writing (``TypeError``) and a pickled row met while
    reading (diskcache's own get, incr, cull paths) raises :class:`CorruptEntryError` instead
    of being loaded. Value files are removed only under the names diskcache gives them.
    """
    diskcache = require("diskcache", "generate")

    class SafeDisk(diskcache.Disk):  # type: ignore[misc,name-defined]
        def put(self, key: Any) -> tuple[Any, bool]:
            db_key, raw = super().put(key)  # pickle.dumps only: a key it cannot store raw is refused
            if not raw:
                raise TypeError(f"dalda_aug.cache stores text, bytes and number keys only, not "
                                f"{type(key).__name__} (it never pickles)")
            return db_key, raw

        def get(self, key: Any, raw: Any) -> Any:
            reason = row_refusal(raw, MODE_RAW, None)
            if reason is not None:
                raise CorruptEntryError(f"a cache row: {reason}")
            return super().get(key, raw)

        def store(self, value: Any, read: Any, key: Any = diskcache.core.UNKNOWN) -> Any:
            kind = type(value)
            if not read and not (kind in (bytes, str, float)
                                 or (kind is int and -(2**63) <= value < 2**63)):
                raise TypeError(f"dalda_aug.cache stores bytes, text and numbers only, not {kind.__name__} "
                                "(it never pickles)")
            return super().store(value, read, key=key)

        def fetch(self, mode: Any, filename: Any, value: Any, read: Any) -> Any:
            reason = row_refusal(True, mode, filename)
            if reason is not None:
                raise CorruptEntryError(f"a cache value: {reason}")
            return super().fetch(mode, filename, value, read)

        def remove(self, file_path: Any) -> Any:
            if not (isinstance(file_path, str) and VALUE_FILE.fullmatch(file_path)):
                log.warning("not removing %r: not a value file name diskcache writes", str(file_path)[:80])
                return None
            return super().remove(file_path)

    return SafeDisk


class ShardReader:
    """Read-only access to one shard (its SQLite file and value files) that never writes.

    Opening a ``diskcache.Cache`` writes (tables, settings, journal mode), which fails on a
    read-only folder and on a full disk; every read goes through this instead. The database is
    opened with SQLite's ``mode=ro``, which sees what live writers commit (through the WAL).
    Where that cannot open — a read-only folder without the WAL's ``-shm`` file, which a
    reader may not create — it is opened ``immutable=1``: nobody can write there anyway.
    It reads diskcache's table layout directly: a row (key, raw=1) holds the entry's bytes in
    ``value`` (mode raw) or names the file holding them (mode binary); any other row is refused
    (:func:`row_refusal`), never deserialised.
    """

    def __init__(self, path: Path, timeout: float, mmap: bool) -> None:
        self.path = path
        self.timeout = timeout
        self.mmap = mmap
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def _connect(self, uri: str) -> sqlite3.Connection:
        con = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False, isolation_level=None)
        try:
            if not self.mmap:
                con.execute("PRAGMA mmap_size = 0")
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()  # opens the file now
        except sqlite3.Error:
            con.close()
            raise
        return con

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            from urllib.request import pathname2url

            db = "file:" + pathname2url(str(self.path / "cache.db"))
            try:
                con = self._connect(db + "?mode=ro")
            except sqlite3.Error:
                try:
                    con = self._connect(db + "?immutable=1")
                except sqlite3.Error as exc:
                    raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._con().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a shard being created right now
                return []
            raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None

    def keys(self) -> list[str]:
        return [k for (k,) in self._rows("SELECT key FROM Cache WHERE raw = 1 ORDER BY rowid") if is_entry_key(k)]

    def count_rows(self) -> int:
        """Rows stored with a raw key (entries, and the few counter and lease rows): one SQL count."""
        rows = self._rows("SELECT COUNT(*) FROM Cache WHERE raw = 1")
        return int(rows[0][0]) if rows else 0

    def __contains__(self, key: str) -> bool:
        return bool(self._rows("SELECT 1 FROM Cache WHERE key = ? AND raw = 1 LIMIT 1", (key,)))

    def get(self, key: str) -> Any:
        """The stored value (normally bytes), None if absent or its value file is gone, or a
        :class:`Refused` for a row :func:`row_refusal` refuses (decoding reports it as corrupt)."""
        rows = self._rows("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1 "
                          "AND (expire_time IS NULL OR expire_time > ?)", (key, time.time()))
        if not rows:
            return None
        mode, filename, value = rows[0]
        reason = row_refusal(True, mode, filename)
        if reason is not None:
            return Refused(reason)
        if mode == MODE_RAW:
            return bytes(value) if isinstance(value, memoryview) else value
        if mode == MODE_TEXT:
            return Refused("its value is text, not an encoded image")
        path = self.path / filename
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheStorageError(f"cache file {path} cannot be read: {exc}") from None

    def head(self, key: str, limit: int = 1 << 20) -> dict[str, Any] | None:
        """An entry's metadata read from its header alone (no image bytes, no checksum: use it to
        count or name, never to trust), or None where there is none readable."""
        rows = self._rows("SELECT mode, filename, substr(value, 1, ?) FROM Cache WHERE key = ? AND raw = 1 "
                          "AND (expire_time IS NULL OR expire_time > ?)", (HEADER.size + limit, key, time.time()))
        if not rows or row_refusal(True, rows[0][0], rows[0][1]) is not None:
            return None
        mode, filename, value = rows[0]
        try:
            if mode == MODE_BINARY:
                with open(self.path / filename, "rb", buffering=0) as fh:  # unbuffered: the header only
                    head = _read_upto(fh, HEAD_READ)
                    if len(head) < HEADER.size:
                        return None
                    meta_len = HEADER.unpack_from(head)[2]
                    if meta_len > limit:
                        return None
                    if HEADER.size + meta_len > len(head):
                        head += _read_upto(fh, HEADER.size + meta_len - len(head))
            elif mode == MODE_RAW and isinstance(value, (bytes, memoryview)):
                head = bytes(value)
            else:
                return None
            magic, version, meta_len = HEADER.unpack_from(head)
            if magic != MAGIC or len(head) < HEADER.size + meta_len:
                return None
            meta = json.loads(head[HEADER.size:HEADER.size + meta_len].decode("utf-8"))
        except (OSError, ValueError, struct.error, RecursionError):
            return None
        return meta if isinstance(meta, dict) else None

    def present(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` this shard has a live row for (SQL ``IN`` batches on diskcache's
        key index; nothing but the keys is read)."""
        found: set[str] = set()
        now = time.time()
        for start in range(0, len(keys), _IN_BATCH):
            batch = list(keys[start:start + _IN_BATCH])
            marks = ",".join("?" * len(batch))
            found.update(k for (k,) in self._rows(
                f"SELECT key FROM Cache WHERE key IN ({marks}) AND raw = 1 "
                "AND (expire_time IS NULL OR expire_time > ?)", (*batch, now)))
        return found

    def check_heads(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        """``(key, metadata, None)`` or ``(key, None, why)`` for each entry row (or those of
        ``keys`` that have one), checked by :func:`~dalda_aug.cache.codecs.check_head` without
        reading the image bytes of a value file: its size must be the row's and the one its header
        implies; only its first :data:`~dalda_aug.cache.codecs.HEAD_READ` bytes are read (more only
        for a longer metadata). An entry held inline in the row (diskcache: under 32 KB) comes
        whole with the row, so it is checked whole (:func:`~dalda_aug.cache.codecs.check_entry`:
        its image bytes' CRC-32 too) at no extra read."""
        now = time.time()
        columns = "key, mode, filename, size, value"
        if keys is None:
            batches: Iterable[list[Any]] = [self._rows(
                f"SELECT {columns} FROM Cache WHERE raw = 1 AND typeof(key) = 'text' AND length(key) = 64 "
                "AND (expire_time IS NULL OR expire_time > ?) ORDER BY rowid", (now,))]
        else:
            batches = (self._rows(f"SELECT {columns} FROM Cache WHERE key IN ({','.join('?' * len(batch))}) "
                                  "AND raw = 1 AND (expire_time IS NULL OR expire_time > ?)", (*batch, now))
                       for batch in (list(keys[i:i + _IN_BATCH]) for i in range(0, len(keys), _IN_BATCH)))
        for rows in batches:
            for key, mode, filename, size, value in rows:
                if not is_entry_key(key):
                    continue
                try:
                    meta = self._check_head(mode, filename, size, value, key)
                except CorruptEntryError as exc:
                    yield key, None, str(exc)
                    continue
                yield key, meta, None

    def _check_head(self, mode: Any, filename: Any, size: Any, value: Any, key: str) -> dict[str, Any]:
        reason = row_refusal(True, mode, filename)
        if reason is not None:
            raise CorruptEntryError(f"entry refused: {reason}")
        if mode == MODE_TEXT:
            raise CorruptEntryError("entry refused: its value is text, not an encoded image")
        if mode == MODE_RAW:  # the whole entry came with the row
            return check_entry(bytes(value) if isinstance(value, memoryview) else value, key)
        path = self.path / filename
        try:
            with open(path, "rb", buffering=0) as fh:
                on_disk = os.fstat(fh.fileno()).st_size
                if on_disk != size:
                    raise CorruptEntryError(f"the entry's value file holds {on_disk} bytes, its row says {size}")
                head = _read_upto(fh, HEAD_READ)
                need = head_length(head)
                if need > len(head):
                    head += _read_upto(fh, need - len(head))
        except FileNotFoundError:
            raise CorruptEntryError("the entry's value file is missing") from None
        except OSError as exc:
            raise CacheStorageError(f"cache file {path} cannot be read: {exc}") from None
        return check_head(head, on_disk, key)

    def refused_rows(self) -> list[tuple[int, str]]:
        """``(rowid, reason)`` of the live rows that are not entries and that :func:`row_refusal`
        refuses (a pickled key or value): corrupt entries, never deserialised. Entry rows
        (64-character text keys) are not listed: :meth:`get` reports them."""
        found = []
        rows = self._rows("SELECT rowid, key, raw, mode, filename FROM Cache "
                          "WHERE NOT (raw = 1 AND typeof(key) = 'text' AND length(key) = 64) "
                          "AND (raw = 0 OR mode NOT IN (1, 2, 3) OR filename IS NOT NULL) "
                          "AND (expire_time IS NULL OR expire_time > ?) ORDER BY rowid", (time.time(),))
        for rowid, key, raw, mode, filename in rows:
            if not raw and mode == MODE_RAW and isinstance(key, (bytes, memoryview)) \
                    and bytes(key) in _legacy_counter_keys():
                continue  # an older version's counter: its key compared as bytes, its value a number
            reason = row_refusal(raw, mode, filename)
            if reason is not None:
                found.append((int(rowid), reason))
        return found

    def corrupt_counter(self) -> int:
        count = 0
        for key, mode, value in self._rows("SELECT key, mode, value FROM Cache WHERE (raw = 1 AND key = ?) OR "
                                           "(raw = 0 AND length(key) < 100)", (_CORRUPT_COUNTER,)):
            ours = key == _CORRUPT_COUNTER or (isinstance(key, (bytes, memoryview))
                                               and bytes(key) in _legacy_counter_keys())
            if ours and mode == MODE_RAW and isinstance(value, int) and value > 0:
                count += value
        return count

    def volume(self) -> int:
        pages = self._rows("PRAGMA page_count")
        page_size = self._rows("PRAGMA page_size")
        size = self._rows("SELECT value FROM Settings WHERE key = 'size'")
        return int(pages[0][0] * page_size[0][0] if pages and page_size else 0) + int(size[0][0] if size else 0)

    def close(self) -> None:
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()
        self._local = threading.local()



def _read_upto(fh: Any, n: int) -> bytes:
    """Up to ``n`` bytes from an unbuffered file (fewer at its end), in as few reads as it takes."""
    parts = []
    while n > 0:
        chunk = fh.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


# ------------------------------------------------------------------------------------------
# writing handles
# ------------------------------------------------------------------------------------------
def shard_settings(network: bool, journal_mode: str | None = None) -> dict[str, Any]:
    """The ``diskcache.Cache`` settings a shard is opened with for writing: never evicting, the
    journal ``journal_mode`` (default: ``"delete"`` on a network filesystem, else ``"wal"``),
    no mmap on a network filesystem."""
    journal = journal_mode or ("delete" if network else "wal")
    return dict(
        eviction_policy="none",  # never evict: a full disk is an error, not a silent loss
        size_limit=2**62,
        cull_limit=0,
        statistics=0,
        sqlite_journal_mode=journal,
        sqlite_mmap_size=0 if network else 2**26,
    )


def count_corrupt(handle: Any) -> None:
    """Add one to the shard's persistent counter of corrupt entries removed (a number under a
    text key; whatever else is found there is replaced, never loaded)."""
    with handle.transact(retry=True):
        rows = handle._sql("SELECT mode, value FROM Cache WHERE key = ? AND raw = 1",
                           (_CORRUPT_COUNTER,)).fetchall()
        count = rows[0][1] if rows and rows[0][0] == MODE_RAW and isinstance(rows[0][1], int) else 0
        handle.set(_CORRUPT_COUNTER, max(count, 0) + 1, retry=True)


def delete_row(handle: Any, rowid: int) -> bool:
    """Delete a row :func:`row_refusal` refuses, by its rowid (its key is never unpickled), and
    its value file (the :func:`safe_disk` removes only a file named as diskcache names them)."""
    with handle.transact(retry=True):
        rows = handle._sql("SELECT filename FROM Cache WHERE rowid = ?", (rowid,)).fetchall()
        handle._sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
    if rows and rows[0][0] is not None:
        handle._disk.remove(rows[0][0])
    return bool(rows)
