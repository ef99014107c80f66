"""The shards of a cache folder, as one store of encoded entries by key, in this process.

:class:`ShardSet` is what :class:`~dalda_aug.cache.SyntheticCache` is built on: it knows keys and
encoded bytes, not specs, variants or images. It opens each shard lazily, for reading through a
:class:`~dalda_aug.cache.shards.ShardReader` (never writes) and for writing through a
``diskcache.Cache`` with the :func:`~dalda_aug.cache.shards.safe_disk`; reopens them after a fork
(pid check); rescans the folder for shards other processes create; turns a failed write into one
line naming the folder (read-only, full); reads an entry, checking it, in one place
(:meth:`ShardSet.read_entry`), removing it when corrupt; and keeps this process's leases.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

from ..errors import (CacheFullError, CacheReadOnlyError, CacheStorageError, CorruptEntryError, InputError,
                      UnsafeFileError, require)
from . import leases
from .disks import default_shard_name, existing_parent, human_bytes, is_network_filesystem, sanitize_shard_name
from .shards import SHARD_PREFIX, ShardReader, count_corrupt, delete_row, safe_disk, shard_settings
from .schema import shard_refusal
from .spec import is_entry_key, log  # the cache's one logger (defined in spec, the bottom module)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ShardSet", "JOURNAL_MODES", "check_journal_mode"]


T = TypeVar("T")

#: SQLite journal modes a cache may be told to use (None: chosen from the filesystem type).
JOURNAL_MODES = (None, "wal", "delete", "truncate", "persist")
# A miss rescans the cache folder for shards created since, at most this often (seconds).
_RESCAN_INTERVAL = 0.5
# Handles inherited through fork() are parked here instead of being closed or garbage-
# collected in the child: SQLite connections must not be used or closed across a fork.
_ABANDONED: list[Any] = []
# Attributes that belong to one process: not pickled, rebuilt by _reset_handles.
_PROCESS_STATE = ("_pid", "_handles", "_shard_readers", "_owner", "_known", "_scanned_at", "_network")


def check_journal_mode(journal_mode: Any) -> None:
    """An :class:`~dalda_aug.errors.InputError` unless ``journal_mode`` is one of :data:`JOURNAL_MODES`."""
    if journal_mode not in JOURNAL_MODES:
        raise InputError(
            f"journal_mode must be 'wal', 'delete', 'truncate', 'persist' or None, got {journal_mode!r}")


class ShardSet:
    """The shards ``directory/shard-*/`` as one store: this process writes to ``shard``, reads all.

    Args: as :class:`~dalda_aug.cache.SyntheticCache`'s ``directory``, ``shard``,
    ``journal_mode`` and ``timeout``. Picklable: a pickled one carries only its settings.
    """

    def __init__(self, directory: str | os.PathLike[str], *, shard: str | None = None,
                 journal_mode: str | None = None, timeout: float = 60.0):
        check_journal_mode(journal_mode)
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"cache directory {self.directory} exists and is not a folder")
        self.shard = sanitize_shard_name(shard) if shard is not None else default_shard_name()
        self.timeout = float(timeout)
        self._journal_mode = journal_mode
        #: Corrupt entries this process found and removed.
        self.corrupt_removed = 0
        self._reset_handles()

    # -- per-process state ------------------------------------------------------------------
    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[str, Any] = {}  # shard name -> diskcache.Cache (writing)
        self._shard_readers: dict[str, ShardReader] = {}  # shard name -> reader (never writes)
        # Who holds a lease (warm): this object in this process.
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}:{time.time():.6f}"
        self._known: list[str] = []  # shard names found by the last scan
        self._scanned_at = float("-inf")
        self._network: bool | None = None

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: never touch the parent's SQLite connections
            _ABANDONED.extend(self._handles.values())
            _ABANDONED.extend(self._shard_readers.values())
            self._reset_handles()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in _PROCESS_STATE:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def close(self) -> None:
        """Close this process's handles (they reopen on next use)."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
            for reader in self._shard_readers.values():
                reader.close()
        self._reset_handles()

    def is_network(self) -> bool:
        """Whether the cache folder is on a network filesystem (NFS, Lustre, GPFS...; read once)."""
        if self._network is None:
            self._network = is_network_filesystem(self.directory)
        return self._network

    # -- the folder ----------------------------------------------------------------------------
    def writable(self) -> bool:
        """Whether this process may write in the cache folder (or where it would be created)."""
        return os.access(existing_parent(self.directory), os.W_OK)

    def free_bytes(self) -> int:
        """Free space on the cache folder's filesystem, in bytes."""
        return int(shutil.disk_usage(existing_parent(self.directory)).free)

    def storage_error(self, exc: BaseException, doing: str) -> CacheStorageError:
        """One line naming the folder: read-only, full, or another write failure."""
        if isinstance(exc, CacheStorageError):
            return exc
        text = str(exc).lower()
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or "no space" in text:
            try:
                free = human_bytes(self.free_bytes())
            except OSError:
                free = "unknown"
            return CacheFullError(
                f"the cache folder {self.directory} is full ({free} free on its filesystem): {doing} failed; "
                "free some space (or use another folder) and rerun: what was written is kept")
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text \
                or not self.writable():
            return CacheReadOnlyError(f"the cache folder {self.directory} is read-only: cannot {doing}")
        return CacheStorageError(f"cannot {doing} in the cache folder {self.directory}: {type(exc).__name__}: {exc}")

    # -- opening shards ------------------------------------------------------------------------
    def _open(self, name: str) -> Any:
        """The diskcache handle of shard ``name``, for writing (opening one writes)."""
        self._check_process()
        handle = self._handles.get(name)
        if handle is None:
            diskcache = require("diskcache", "generate")
            path = self.directory / f"{SHARD_PREFIX}{name}"
            self.check_shard(name)
            try:
                # The SafeDisk never pickles nor unpickles: the shard may have been made by anyone.
                handle = diskcache.Cache(str(path), timeout=self.timeout, disk=safe_disk(),
                                         **shard_settings(self.is_network(), self._journal_mode))
            except (OSError, sqlite3.Error) as exc:
                raise self.storage_error(exc, f"open the shard {path.name} for writing") from None
            self._handles[name] = handle
            if name not in self._known:  # e.g. our own shard, created by this write
                self._known = sorted([*self._known, name], key=lambda n: (n != self.shard, n))
        return handle

    def check_shard(self, name: str | None = None) -> None:
        """An :class:`~dalda_aug.errors.UnsafeFileError`, one line naming its database, where the
        shard ``name`` (default: this process's) may not be written: diskcache runs its own
        queries (and turns Settings rows into PRAGMAs) as it opens a shard, so its folder, files
        and schema are checked first (:func:`~dalda_aug.cache.schema.shard_refusal`); a folder that
        is a symlink leading outside the cache would put ``cache.db`` there. Writes nothing."""
        path = self.directory / f"{SHARD_PREFIX}{self.shard if name is None else name}"
        reason = shard_refusal(path, self.directory, timeout=self.timeout)
        if reason is not None:
            raise UnsafeFileError(f"cache shard {path / 'cache.db'} refused: {reason}; move it out of "
                                  f"{self.directory} (or write another shard) and rerun")

    def _scan(self, force: bool = False) -> list[str]:
        """Names of the shards on disk (rescanned at most every 0.5 s unless ``force``)."""
        self._check_process()
        now = time.monotonic()
        if force or now - self._scanned_at >= _RESCAN_INTERVAL:
            names = []
            if self.directory.is_dir():
                for entry in os.scandir(self.directory):
                    # lexists: a cache.db that is a FIFO or a link is listed, so that its reader refuses it by name
                    if entry.name.startswith(SHARD_PREFIX) and os.path.lexists(os.path.join(entry.path, "cache.db")):
                        names.append(entry.name[len(SHARD_PREFIX):])
            self._known = sorted(names, key=lambda n: (n != self.shard, n))
            self._scanned_at = now
        return self._known

    def shard_names(self) -> list[str]:
        """Every shard in the cache folder (this process's own first)."""
        return list(self._scan(force=True))

    def state_token(self) -> list[list[Any]]:
        """What every shard's index files look like on disk: ``[name, inode, size, mtime_ns]`` of
        each shard's ``cache.db`` and of its ``cache.db-wal`` where that holds frames, sorted. Any
        entry written or removed changes it (SQLite appends to the WAL or rewrites the database);
        a coverage record remembers a count under it (:class:`~dalda_aug.plan.records.CoverageRecord`)."""
        token: list[list[Any]] = []
        for name in sorted(self._scan(force=True)):
            for file in ("cache.db", "cache.db-wal"):
                try:
                    st = os.stat(self.directory / f"{SHARD_PREFIX}{name}" / file)
                except OSError:
                    continue
                if file == "cache.db" or st.st_size:
                    token.append([f"{name}/{file}", int(st.st_ino), int(st.st_size), int(st.st_mtime_ns)])
        return token

    def _reader(self, name: str) -> ShardReader:
        self._check_process()
        reader = self._shard_readers.get(name)
        if reader is None:
            reader = ShardReader(self.directory / f"{SHARD_PREFIX}{name}", self.timeout, mmap=not self.is_network(),
                                 root=self.directory)
            self._shard_readers[name] = reader
        return reader

    def _readers(self, force_scan: bool = False) -> Iterator[tuple[str, ShardReader]]:
        for name in self._scan(force_scan):
            yield name, self._reader(name)

    # -- keys and encoded entries --------------------------------------------------------------
    def keys(self, shard: str | None = None) -> set[str]:
        """Every entry key in every shard (or in the one named ``shard``)."""
        found: set[str] = set()
        for name, reader in self._readers(force_scan=True):
            if shard is None or name == shard:
                found.update(reader.keys())
        return found

    def __len__(self) -> int:
        return len(self.keys())

    def entry_heads(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """``(key, metadata or None)`` of every entry of every shard, read from its header alone
        (:meth:`~dalda_aug.cache.shards.ShardReader.head`: no image bytes, not checked; to count or
        name by, never to trust); a key held by several shards comes once from each."""
        for _, reader in self._readers(force_scan=True):
            for key in reader.keys():
                yield key, reader.head(key)

    def refused_shards(self) -> dict[str, str]:
        """``{shard name: why}`` of the shards refused (:func:`~dalda_aug.cache.schema.shard_refusal`):
        their entries are not read; each is named once in a warning."""
        return {name: reason for name, reader in self._readers(force_scan=True)
                if (reason := reader.check()) is not None}

    def count_rows(self) -> int:
        """Rows with a raw key over all shards (an upper bound of the entries: a key in two shards
        counts twice, counter and lease rows count), by one SQL count per shard."""
        return sum(reader.count_rows() for _, reader in self._readers(force_scan=True))

    def key_digests(self) -> "np.ndarray[Any, Any]":
        """Every entry key of every shard as sorted, distinct 32-byte digests (NumPy ``S32``;
        :func:`~dalda_aug.cache.spec.key_bytes`)."""
        import numpy as np

        from .spec import key_bytes

        parts = [np.array([key_bytes(k) for k in reader.keys()], dtype="S32") for _, reader in self._readers(True)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype="S32")

    def checked_key_digests(self, *, heads: bool = True
                            ) -> tuple["np.ndarray[Any, Any]", "np.ndarray[Any, Any]", list[dict[str, Any]]]:
        """Every entry of every shard checked by :meth:`~dalda_aug.cache.shards.ShardReader.check_heads`
        (the header and metadata checksum, the sizes of the row, the value file and the header;
        no image bytes; with ``heads=False`` the row and the value file's stat only): ``(good, bad,
        shards)``, the good and the bad keys as sorted, distinct 32-byte digests (a key good in
        one shard and bad in another is in both), and per shard ``{"name", "entries", "reader"}``.
        What ``cache stats`` (heads) and the dataset's coverage (stat only) count."""
        import numpy as np

        from .spec import key_bytes

        good: list[Any] = []  # per shard, its good keys as 32-byte digests (no Python set of keys)
        bad: list[Any] = []
        shards: list[dict[str, Any]] = []
        for name, reader in self._readers(force_scan=True):
            shard_good: list[bytes] = []
            shard_bad: list[bytes] = []
            for key, meta, _ in reader.check_heads(heads=heads):
                (shard_bad if meta is None else shard_good).append(key_bytes(key))
            good.append(np.array(shard_good, dtype="S32"))
            bad.append(np.array(shard_bad, dtype="S32"))
            shards.append({"name": name, "entries": len(shard_good), "reader": reader})
        good_keys = np.unique(np.concatenate(good)) if good else np.zeros(0, dtype="S32")
        bad_keys = np.unique(np.concatenate(bad)) if bad else np.zeros(0, dtype="S32")
        return good_keys, bad_keys, shards

    def __contains__(self, key: Any) -> bool:
        if any(key in reader for _, reader in self._readers()):
            return True
        return any(key in reader for _, reader in self._readers(force_scan=True))

    def present(self, keys: Sequence[str]) -> "np.ndarray[Any, np.dtype[np.bool_]]":
        """Which of ``keys`` have an entry row in some shard: a boolean array, in order.

        Asked of each shard's SQLite key index in ``IN`` batches, for the keys not found in an
        earlier shard; no key listing of the cache, no entry bytes (rows only: a damaged entry
        counts as present, and a decoding reader refuses it)."""
        import numpy as np

        keys = list(keys)
        out = np.zeros(len(keys), dtype=bool)
        for _, reader in self._readers(force_scan=True):
            todo = np.flatnonzero(~out)
            if not len(todo):
                break
            found = reader.present([keys[i] for i in todo])
            if found:
                out[todo] = [keys[i] in found for i in todo]
        return out

    def check_present(self, keys: Sequence[str], *, remove: bool = False, heads: bool = True
                      ) -> tuple["np.ndarray[Any, np.dtype[np.bool_]]", list[dict[str, str]]]:
        """Which of ``keys`` have an entry that passes :func:`~dalda_aug.cache.codecs.check_head`
        in some shard (a boolean array, in order), and the failing ones ``[{"shard", "key",
        "error"}]`` (those with no good copy elsewhere). Reads each entry's row and the first
        bytes of its value file, never the image bytes: a garbage header, a truncated or
        missing value file fail; a changed image byte does not (``cache verify`` and the
        decoding readers catch it). With ``remove``, failing entries are deleted where the
        folder allows it. With ``heads=False`` only the row and the value file's stat are checked
        (:meth:`~dalda_aug.cache.shards.ShardReader.check_heads`)."""
        import numpy as np

        keys = list(keys)
        out = np.zeros(len(keys), dtype=bool)
        bad: dict[str, dict[str, str]] = {}
        for name, reader in list(self._readers(force_scan=True)):
            todo = np.flatnonzero(~out)
            if not len(todo):
                break
            good: set[str] = set()
            for key, meta, error in reader.check_heads([keys[i] for i in todo], heads=heads):
                if meta is not None:
                    good.add(key)
                    bad.pop(key, None)
                elif key not in bad:
                    bad[key] = {"shard": name, "key": key, "error": str(error)}
                    if remove:
                        self._remove_corrupt(name, key, str(error))
            if good:
                out[todo] = [keys[i] in good for i in todo]
        return out, list(bad.values())

    def get_raw(self, key: Any) -> bytes | None:
        """The encoded entry bytes (header + image) stored under ``key``, without decoding."""
        for _, reader in self._readers(force_scan=True):
            blob = reader.get(key)
            if blob is not None:
                return bytes(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else None
        return None

    def read_entry(self, shard: str, reader: ShardReader, key: str, read: Callable[[Any, str], T], *,
                   remove: bool, strict: bool = False, missing_is_corrupt: bool = True) -> tuple[T | None, str | None]:
        """Read ``key`` from the shard ``shard`` and check it: the one read of an entry.

        ``read`` (:func:`~dalda_aug.cache.check_entry` or :func:`~dalda_aug.cache.decode_entry`)
        checks the stored bytes. Returns ``(what read gives, None)``; ``(None, why)`` for a
        corrupt entry, which is never returned and, with ``remove``, deleted and counted
        (``strict``: a folder that refuses it raises :class:`CacheStorageError`); ``(None, None)``
        when there is no entry. A row whose value file is gone is corrupt if
        ``missing_is_corrupt``, else no entry.
        """
        blob = reader.get(key)
        try:
            if blob is None:
                if not missing_is_corrupt:
                    return None, None
                raise CorruptEntryError("the entry's value file is missing")
            return read(blob, key), None
        except CorruptEntryError as exc:
            if remove:
                self._remove_corrupt(shard, key, str(exc), strict=strict)
            return None, str(exc)

    def put_encoded(self, key: str, blob: bytes) -> None:
        """Store an already encoded entry (from :func:`~dalda_aug.cache.encode_entry`) under ``key``."""
        if not is_entry_key(key):
            raise InputError(f"cache keys are 64 lowercase hex digits (a SHA-256), got {str(key)[:80]!r}: not stored")
        handle = self._open(self.shard)
        try:
            handle.set(key, blob, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self.storage_error(exc, f"store entry {key[:16]}") from None

    def delete(self, key: Any) -> bool:
        """Remove the entry ``key`` from every shard; True if one was there."""
        found = False
        for name, reader in list(self._readers(force_scan=True)):
            if key in reader:
                try:
                    found = bool(self._open(name).delete(key, retry=True)) or found
                except (OSError, sqlite3.Error) as exc:
                    raise self.storage_error(exc, f"delete entry {key[:16]}") from None
        return found

    # -- removing corrupt entries ----------------------------------------------------------------
    def _remove_corrupt(self, shard: str, key: str, reason: str, *, strict: bool = False) -> bool:
        """Delete a corrupt entry; True if done. A read-only or full folder: a warning (the
        entry is still never returned), or with ``strict`` a :class:`CacheStorageError`."""
        log.warning("removing corrupt cache entry %s in shard %s: %s", key, shard, reason)
        return self._remove_rows(shard, f"the corrupt entry {key[:16]}",
                                 lambda handle: bool(handle.delete(key, retry=True)), strict=strict)

    def _remove_refused_row(self, shard: str, rowid: int, *, strict: bool = False) -> bool:
        """Delete a row :func:`~dalda_aug.cache.row_refusal` refuses (by its rowid: its key is never unpickled)."""
        return self._remove_rows(shard, f"the refused row {rowid}", lambda handle: delete_row(handle, rowid),
                                 strict=strict)

    def _remove_rows(self, shard: str, what: str, delete: Callable[[Any], bool], *, strict: bool) -> bool:
        try:
            handle = self._open(shard)
            delete(handle)
            count_corrupt(handle)
        except Exception as exc:
            error = self.storage_error(exc, f"remove {what}") \
                if isinstance(exc, (OSError, sqlite3.Error)) else exc
            if strict:
                raise error from None
            log.warning("%s", error)
            return False
        self.corrupt_removed += 1
        return True

    # -- leases: which process is generating which key -----------------------------------------
    def claim(self, keys: Iterable[str], seconds: float) -> list[str]:
        """Lease ``keys`` to this cache object for ``seconds``; returns those it got (in order).

        A key leased by another process (or another cache object) whose lease has not expired
        is left out; one leased by this object is renewed. Leases live in this process's shard,
        so processes writing the same shard skip each other's work (:func:`~dalda_aug.cache.warm.warm`
        leases each batch before generating it); a killed process's leases simply expire. No
        lease lasts longer than :data:`~dalda_aug.cache.LEASE_CAP_SECONDS` unless renewed: one
        found with a later expiry (or none) is cut down to expire that long from now.
        """
        seconds = leases.check_lease_seconds(seconds)
        keys = list(keys)
        handle = self._open(self.shard)
        try:
            return leases.claim(handle, keys, seconds, self._owner)
        except (OSError, sqlite3.Error) as exc:
            raise self.storage_error(exc, "lease keys") from None

    def renew(self, keys: Iterable[str], seconds: float) -> None:
        """Extend this object's leases of ``keys`` by ``seconds`` from now."""
        self._own_leases(keys, leases.check_lease_seconds(seconds))

    def release(self, keys: Iterable[str]) -> None:
        """Give back this object's leases of ``keys``."""
        self._own_leases(keys, None)

    def _own_leases(self, keys: Iterable[str], seconds: float | None) -> None:
        handle = self._open(self.shard)
        try:
            leases.update_own(handle, keys, seconds, self._owner)
        except (OSError, sqlite3.Error) as exc:
            raise self.storage_error(exc, "update leases") from None

    def leased_for(self, keys: Iterable[str]) -> float:
        """Seconds until the last of the other processes' live leases on ``keys`` (in this
        process's shard) expires unless renewed: at most :data:`~dalda_aug.cache.LEASE_CAP_SECONDS`;
        0 if none."""
        handle = self._open(self.shard)
        try:
            return leases.longest_foreign(handle, keys, self._owner)
        except (OSError, sqlite3.Error) as exc:
            raise self.storage_error(exc, "read leases") from None
