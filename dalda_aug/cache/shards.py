"""A shard: one diskcache folder ``CACHE/shard-<name>/`` (SQLite plus value files), read and written here.

Everything that touches a shard's SQLite rows is in this module:

* :func:`row_refusal`, the one rule of what a row may be (text keys; values of raw bytes, text
  or numbers; value files named as diskcache names them). A pickled key or value is a corrupt
  entry, never unpickled.
* :func:`safe_disk`, the ``diskcache.Disk`` of the writing handles, which applies that rule and
  never pickles; :func:`shard_settings`, the settings they are opened with (no eviction).
* the check of a shard's files and SQLite schema before any query runs on it (:mod:`.schema`),
  made by :class:`ShardReader` on its own connection.
* :class:`ShardReader`, read-only access that never writes (a read-only or full disk serves readers).
* the persistent counter of corrupt entries removed (:func:`count_corrupt`) and the removal of a
  refused row by its rowid (:func:`delete_row`).

Shard names and the filesystem under them are :mod:`~dalda_aug.cache.disks`'.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .._io import inside as stays_inside, open_regular
from .._lazy import module_getattr
from ..errors import CacheStorageError, CorruptEntryError, DaldaError, require
from ._diskcache import disk_directory, remove_value_file, sql
from .codecs import HEAD_READ, HEADER, MAGIC, Refused, check_entry, check_head, head_length
from .schema import files_refusal, harden_connection, schema_refusal
from .spec import is_entry_key, log  # the cache's one logger (defined in spec, the bottom module)

__all__ = [
    "SHARD_PREFIX",
    "MODE_RAW",
    "MODE_BINARY",
    "MODE_TEXT",
    "MODE_PICKLE",
    "VALUE_FILE",
    "MAX_ENTRY_BYTES",
    "LEASE_PREFIX",
    "ShardReader",
    "row_refusal",
    "safe_disk",
    "shard_settings",
    "count_corrupt",
    "delete_row",
]


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
#: The most bytes an entry may hold (in its row or its value file): a 9,000 x 9,000 raw RGB image
#: fits; a row or file claiming more is a corrupt entry, never read.
MAX_ENTRY_BYTES = 256 * 1024 * 1024
# Leases (see leases.py) are rows of the writer's shard under this text key prefix + an entry key.
LEASE_PREFIX = "dalda_aug:lease:"
# The SQL condition of an entry row: a raw text key of 64 lowercase hex digits (spec.is_entry_key).
_ENTRY_ROW = "raw = 1 AND typeof(key) = 'text' AND length(key) = 64 AND key NOT GLOB '*[^0-9a-f]*'"
# The shards refused (path, why) this process has warned about already.
_REFUSALS_WARNED: set[tuple[str, str]] = set()
# Keys per SQL ``IN (...)`` query (SQLite's older builds allow 999 parameters).
_IN_BATCH = 900


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

        def filename(self, key: Any = diskcache.core.UNKNOWN, value: Any = diskcache.core.UNKNOWN) -> Any:
            name, full_path = super().filename(key, value)  # the folders are made later, by _write
            # A folder planted as a symlink to elsewhere is never written through.
            stays_inside(os.path.dirname(full_path), disk_directory(self), "cache value folder")
            return name, full_path

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
    (:func:`row_refusal`), never deserialised. Only rows keyed by 64 lowercase hex digits are
    entries (:func:`~dalda_aug.cache.spec.is_entry_key`).

    Before its first query the shard is checked (:meth:`check`: regular files, diskcache's
    schema) and its connections are hardened (:func:`harden_connection`, ``query_only``). A shard
    that fails is refused: a warning naming its database, once, and it reads as empty
    (:attr:`refusal` says why), so the other shards still serve. A value file is opened with
    ``O_NOFOLLOW | O_NONBLOCK``, must be a regular file, and is read up to its row's size
    (at most :data:`MAX_ENTRY_BYTES`); anything else is a corrupt entry.
    """

    def __init__(self, path: Path, timeout: float, mmap: bool, root: Path | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.mmap = mmap
        self.root = root
        #: Why this shard is refused (:meth:`check`), or None; known after the first query.
        self.refusal: str | None = None
        self._checked = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def _connect(self, uri: str) -> sqlite3.Connection:
        con = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False, isolation_level=None)
        try:
            harden_connection(con)
            con.execute("PRAGMA query_only = ON")
            if not self.mmap:
                con.execute("PRAGMA mmap_size = 0")
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()  # opens the file now
        except sqlite3.Error:
            con.close()
            raise
        return con

    def check(self) -> str | None:
        """Check the shard (once per reader, before any query): the reason it is refused, or None.
        Its files first (:func:`files_refusal`), then its schema (:func:`schema_refusal`) on this
        reader's own hardened connection."""
        if not self._checked:
            reason = files_refusal(self.path, self.root)
            if reason is None:
                try:
                    reason = schema_refusal(self._con())
                except sqlite3.OperationalError as exc:  # locked, busy: not a verdict, ask again next time
                    raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None
                except sqlite3.DatabaseError as exc:
                    reason = f"it is not a readable SQLite database: {exc}"
            if reason is not None and (str(self.path), reason) not in _REFUSALS_WARNED:
                _REFUSALS_WARNED.add((str(self.path), reason))  # one line per shard and process
                log.warning("cache shard %s refused: %s; its entries are not used (the other shards still serve)",
                            self.path / "cache.db", reason)
            self.refusal = reason
            self._checked = True
        return self.refusal

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
                except sqlite3.OperationalError as exc:
                    raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None
                # any other sqlite3.DatabaseError (not a database at all): check() refuses the shard
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    def _cursor(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor | None:
        """The rows of ``sql`` as a cursor, or None where there are none (a refused shard, one
        without its tables yet)."""
        if self.check() is not None:
            return None
        try:
            return self._con().execute(sql, params)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a shard being created right now
                return None
            raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None
        except sqlite3.DatabaseError as exc:  # not a database, a malformed one
            raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        cursor = self._cursor(sql, params)
        if cursor is None:
            return []
        try:
            return cursor.fetchall()
        except sqlite3.DatabaseError as exc:
            raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None

    def _iter_rows(self, sql: str, params: tuple[Any, ...] = ()) -> Iterator[Any]:
        """:meth:`_rows`, one row at a time (a listing holding entries' bytes is never all in memory)."""
        cursor = self._cursor(sql, params)
        if cursor is None:
            return
        while True:
            try:
                row = cursor.fetchone()
            except sqlite3.DatabaseError as exc:
                raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None
            if row is None:
                return
            yield row

    def keys(self) -> list[str]:
        return [k for (k,) in self._rows(f"SELECT key FROM Cache WHERE {_ENTRY_ROW} ORDER BY rowid")]

    def count_rows(self) -> int:
        """Rows stored with a raw key (entries, and the few counter and lease rows): one SQL count."""
        rows = self._rows("SELECT COUNT(*) FROM Cache WHERE raw = 1")
        return int(rows[0][0]) if rows else 0

    def __contains__(self, key: str) -> bool:
        return is_entry_key(key) and bool(self._rows(f"SELECT 1 FROM Cache WHERE key = ? AND {_ENTRY_ROW} LIMIT 1",
                                                     (key,)))

    def get(self, key: str) -> Any:
        """The stored value (normally bytes), None if absent or its value file is gone, or a
        :class:`Refused` for a row :func:`row_refusal` refuses or a value file that is not a
        regular file of at most the row's size (decoding reports it as corrupt)."""
        if not is_entry_key(key):
            return None
        rows = self._rows(f"SELECT mode, filename, size, length(value), CASE WHEN length(value) <= ? THEN value END "
                          f"FROM Cache WHERE key = ? AND {_ENTRY_ROW} AND (expire_time IS NULL OR expire_time > ?)",
                          (MAX_ENTRY_BYTES, key, time.time()))
        if not rows:
            return None
        mode, filename, size, length, value = rows[0]
        reason = row_refusal(True, mode, filename)
        if reason is not None:
            return Refused(reason)
        if mode == MODE_RAW:
            if value is None and length is not None:
                return Refused(f"its value holds {length} bytes, more than the {MAX_ENTRY_BYTES} an entry may")
            return bytes(value) if isinstance(value, memoryview) else value
        if mode == MODE_TEXT:
            return Refused("its value is text, not an encoded image")
        return self._read_value(filename, size)

    def _read_value(self, filename: str, size: Any) -> Any:
        """A value file's bytes (its row says it holds ``size``), None if it is gone, or a
        :class:`Refused`: not a regular file (a symlink, a FIFO, a device, a folder), or larger
        than its row or :data:`MAX_ENTRY_BYTES` allows."""
        if type(size) is not int or not 0 <= size <= MAX_ENTRY_BYTES:
            return Refused(f"its row gives its value file the size {str(size)[:40]}")
        path = self.path / filename
        try:
            fd, st = open_regular(path, "cache value file")
        except DaldaError as exc:
            if not os.path.lexists(path):
                return None
            return Refused(str(exc))
        try:
            if st.st_size != size:
                return Refused(f"its value file holds {st.st_size} bytes, its row says {size}")
            return _read_fd(fd, size)
        except OSError as exc:
            return Refused(f"its value file {path} cannot be read: {exc.strerror}")
        finally:
            os.close(fd)

    def head(self, key: str, limit: int = 1 << 20) -> dict[str, Any] | None:
        """An entry's metadata read from its header alone (no image bytes, no checksum: use it to
        count or name, never to trust), or None where there is none readable."""
        if not is_entry_key(key):
            return None
        rows = self._rows(f"SELECT mode, filename, substr(value, 1, ?) FROM Cache WHERE key = ? AND {_ENTRY_ROW} "
                          "AND (expire_time IS NULL OR expire_time > ?)", (HEADER.size + limit, key, time.time()))
        if not rows or row_refusal(True, rows[0][0], rows[0][1]) is not None:
            return None
        mode, filename, value = rows[0]
        try:
            if mode == MODE_BINARY:
                try:
                    fd, _ = open_regular(self.path / filename, "cache value file")
                except DaldaError:
                    return None
                try:
                    head = _read_fd(fd, HEAD_READ)
                    if len(head) < HEADER.size:
                        return None
                    meta_len = HEADER.unpack_from(head)[2]
                    if meta_len > limit:
                        return None
                    if HEADER.size + meta_len > len(head):
                        head += _read_fd(fd, HEADER.size + meta_len - len(head))
                finally:
                    os.close(fd)
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
                f"SELECT key FROM Cache WHERE key IN ({marks}) AND {_ENTRY_ROW} "
                "AND (expire_time IS NULL OR expire_time > ?)", (*batch, now)))
        return found

    def check_heads(self, keys: Sequence[str] | None = None, *, heads: bool = True
                    ) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        """``(key, metadata, None)`` or ``(key, None, why)`` for each entry row (or those of
        ``keys`` that have one), checked by :func:`~dalda_aug.cache.codecs.check_head` without
        reading the image bytes of a value file: its size must be the row's and the one its header
        implies; only its first :data:`~dalda_aug.cache.codecs.HEAD_READ` bytes are read (more only
        for a longer metadata). An entry held inline in the row (diskcache: under 32 KB) comes
        whole with the row, so it is checked whole (:func:`~dalda_aug.cache.codecs.check_entry`:
        its image bytes' CRC-32 too) at no extra read.

        With ``heads=False`` nothing is read but the rows and each value file's ``lstat`` (about
        a tenth of the cost): the row must pass :func:`row_refusal` and its value file be a regular
        file of the row's size (what a partial copy, a truncation or a planted special file
        breaks); the metadata given is then ``{}``."""
        now = time.time()
        value = "CASE WHEN length(value) <= ? THEN value END" if heads else "NULL AND ?"
        columns = f"key, mode, filename, size, length(value), {value}"
        if keys is None:
            batches: Iterable[Iterable[Any]] = [self._iter_rows(
                f"SELECT {columns} FROM Cache WHERE {_ENTRY_ROW} "
                "AND (expire_time IS NULL OR expire_time > ?) ORDER BY rowid", (MAX_ENTRY_BYTES, now))]
        else:
            batches = (self._iter_rows(f"SELECT {columns} FROM Cache WHERE key IN ({','.join('?' * len(batch))}) "
                                       f"AND {_ENTRY_ROW} AND (expire_time IS NULL OR expire_time > ?)",
                                       (MAX_ENTRY_BYTES, *batch, now))
                       for batch in (list(keys[i:i + _IN_BATCH]) for i in range(0, len(keys), _IN_BATCH)))
        for rows in batches:
            for key, mode, filename, size, length, value in rows:
                try:
                    if mode == MODE_RAW and length is not None and length > MAX_ENTRY_BYTES:
                        raise CorruptEntryError(f"entry refused: its value holds {length} bytes, more than the "
                                                f"{MAX_ENTRY_BYTES} an entry may")
                    meta = self._check_head(mode, filename, size, value, key) if heads \
                        else self._check_size(mode, filename, size)
                except CorruptEntryError as exc:
                    yield key, None, str(exc)
                    continue
                yield key, meta, None

    def _check_size(self, mode: Any, filename: Any, size: Any) -> dict[str, Any]:
        reason = row_refusal(True, mode, filename)
        if reason is not None:
            raise CorruptEntryError(f"entry refused: {reason}")
        if mode == MODE_TEXT:
            raise CorruptEntryError("entry refused: its value is text, not an encoded image")
        if mode == MODE_BINARY:
            try:
                st = os.lstat(self.path / filename)
            except OSError:
                raise CorruptEntryError("the entry's value file is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise CorruptEntryError("the entry's value file is not a regular file")
            if st.st_size != size:
                raise CorruptEntryError(f"the entry's value file holds {st.st_size} bytes, its row says {size}")
        return {}

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
            fd, st = open_regular(path, "the entry's value file")
        except DaldaError as exc:
            if not os.path.lexists(path):
                raise CorruptEntryError("the entry's value file is missing") from None
            raise CorruptEntryError(str(exc)) from None
        try:
            on_disk = st.st_size
            if on_disk != size:
                raise CorruptEntryError(f"the entry's value file holds {on_disk} bytes, its row says {size}")
            head = _read_fd(fd, HEAD_READ)
            need = head_length(head)
            if need > len(head):
                head += _read_fd(fd, need - len(head))
        except OSError as exc:
            raise CorruptEntryError(f"the entry's value file cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)
        return check_head(head, on_disk, key)

    def refused_rows(self) -> list[tuple[int, str]]:
        """``(rowid, reason)`` of the live rows that are not entries and are not this library's
        counter or leases, or are but :func:`row_refusal` refuses them (a pickled key or value):
        corrupt entries, never deserialised, never read as entries. A key that is not 64 lowercase
        hex digits (``../../x...``, ``/abs/...``, a dotted or upper-case one) is such a row. Entry
        rows are not listed: :meth:`get` reports them."""
        found = []
        for rowid, key, raw, mode, filename in self._iter_rows(
                f"SELECT rowid, substr(key, 1, 200), raw, mode, filename FROM Cache WHERE NOT ({_ENTRY_ROW}) "
                "AND (expire_time IS NULL OR expire_time > ?) ORDER BY rowid", (time.time(),)):
            if not raw and mode == MODE_RAW and isinstance(key, (bytes, memoryview)) \
                    and bytes(key) in _legacy_counter_keys():
                continue  # an older version's counter: its key compared as bytes, its value a number
            reason = row_refusal(raw, mode, filename)
            ours = raw and isinstance(key, str) and (
                key == _CORRUPT_COUNTER or (key.startswith(LEASE_PREFIX) and is_entry_key(key[len(LEASE_PREFIX):])))
            if reason is None and raw and not ours:
                shown = key if isinstance(key, str) else repr(bytes(key) if isinstance(key, memoryview) else key)
                reason = f"its key {shown[:80]!r} is not an entry key (64 lowercase hex digits): never read as one"
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



def _read_fd(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from a file descriptor (fewer at its end), in as few reads as it takes."""
    parts = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 24))
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
        # diskcache applies sqlite_* settings as PRAGMAs on each connection it opens: views and
        # triggers of the shard may not call functions with side effects.
        sqlite_trusted_schema=0,
    )


def count_corrupt(handle: Any) -> None:
    """Add one to the shard's persistent counter of corrupt entries removed (a number under a
    text key; whatever else is found there is replaced, never loaded)."""
    with handle.transact(retry=True):
        rows = sql(handle, "SELECT mode, value FROM Cache WHERE key = ? AND raw = 1", (_CORRUPT_COUNTER,)).fetchall()
        count = rows[0][1] if rows and rows[0][0] == MODE_RAW and isinstance(rows[0][1], int) else 0
        handle.set(_CORRUPT_COUNTER, max(count, 0) + 1, retry=True)


def delete_row(handle: Any, rowid: int) -> bool:
    """Delete a row :func:`row_refusal` refuses, by its rowid (its key is never unpickled), and
    its value file (the :func:`safe_disk` removes only a file named as diskcache names them)."""
    with handle.transact(retry=True):
        rows = sql(handle, "SELECT filename FROM Cache WHERE rowid = ?", (rowid,)).fetchall()
        sql(handle, "DELETE FROM Cache WHERE rowid = ?", (rowid,))
    if rows and rows[0][0] is not None:
        remove_value_file(handle, rows[0][0])
    return bool(rows)


# shard names and filesystems moved to disks.py; their old paths here resolve through the map of moved paths
__getattr__ = module_getattr(__name__)
