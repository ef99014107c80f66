"""What a shard's files and SQLite schema may be, checked before SQLite or diskcache runs a query on it.

A shard's ``cache.db`` is data written by whoever made it, and its schema is code: a view runs
when it is queried (a recursive one never ends), a trigger when a row is written, and diskcache
turns the rows of its ``Settings`` table into PRAGMAs and attributes as it opens the shard. So
before any query:

* :func:`files_refusal`: the shard folder stays inside the cache folder (a symlink may not lead
  elsewhere), and ``cache.db`` and its journals are regular files (a FIFO would block SQLite, a
  symlink have it write elsewhere);
* :func:`schema_refusal`: ``sqlite_master`` holds only the tables, indexes and triggers diskcache
  creates, with diskcache's SQL, and ``Settings`` only diskcache's settings with values of their type;
* :func:`harden_connection`: ``PRAGMA trusted_schema = OFF`` and SQLite's defensive mode where
  Python exposes it.

:func:`shard_refusal` makes the whole check on a connection of its own (the writing handles use
it before diskcache opens a shard); :class:`~dalda_aug.cache.shards.ShardReader` makes it on its own.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

from .._io import inside
from ..errors import DaldaError

__all__ = ["files_refusal", "schema_refusal", "harden_connection", "shard_refusal"]


def _sql_text(sql: Any) -> Any:
    return " ".join(sql.split()) if isinstance(sql, str) else sql


# The objects diskcache (5.x) creates in cache.db: name -> (type, table, SQL as sqlite_master
# keeps it). The Cache_store_time/access_time/access_count indexes belong to its eviction
# policies, Cache_tag_rowid to its tag index. Anything else (a view, another trigger, a Cache
# that is not this table) is refused: SQLite runs views and triggers as code.
_DISKCACHE_SCHEMA: dict[str, tuple[str, str, Any]] = {
    name: (kind, table, _sql_text(sql)) for name, kind, table, sql in [
        ("Settings", "table", "Settings", "CREATE TABLE Settings ( key TEXT NOT NULL UNIQUE, value)"),
        ("sqlite_autoindex_Settings_1", "index", "Settings", None),
        ("Cache", "table", "Cache",
         "CREATE TABLE Cache ( rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL, expire_time REAL, "
         "access_time REAL, access_count INTEGER DEFAULT 0, tag BLOB, size INTEGER DEFAULT 0, mode INTEGER DEFAULT 0, "
         "filename TEXT, value BLOB)"),
        ("Cache_key_raw", "index", "Cache", "CREATE UNIQUE INDEX Cache_key_raw ON Cache(key, raw)"),
        ("Cache_expire_time", "index", "Cache", "CREATE INDEX Cache_expire_time ON Cache (expire_time)"),
        ("Cache_store_time", "index", "Cache", "CREATE INDEX Cache_store_time ON Cache (store_time)"),
        ("Cache_access_time", "index", "Cache", "CREATE INDEX Cache_access_time ON Cache (access_time)"),
        ("Cache_access_count", "index", "Cache", "CREATE INDEX Cache_access_count ON Cache (access_count)"),
        ("Cache_tag_rowid", "index", "Cache", "CREATE INDEX Cache_tag_rowid ON Cache(tag, rowid)"),
        ("Settings_count_insert", "trigger", "Cache",
         'CREATE TRIGGER Settings_count_insert AFTER INSERT ON Cache FOR EACH ROW BEGIN '
         'UPDATE Settings SET value = value + 1 WHERE key = "count"; END'),
        ("Settings_count_delete", "trigger", "Cache",
         'CREATE TRIGGER Settings_count_delete AFTER DELETE ON Cache FOR EACH ROW BEGIN '
         'UPDATE Settings SET value = value - 1 WHERE key = "count"; END'),
        ("Settings_size_insert", "trigger", "Cache",
         'CREATE TRIGGER Settings_size_insert AFTER INSERT ON Cache FOR EACH ROW BEGIN '
         'UPDATE Settings SET value = value + NEW.size WHERE key = "size"; END'),
        ("Settings_size_update", "trigger", "Cache",
         'CREATE TRIGGER Settings_size_update AFTER UPDATE ON Cache FOR EACH ROW BEGIN '
         'UPDATE Settings SET value = value + NEW.size - OLD.size WHERE key = "size"; END'),
        ("Settings_size_delete", "trigger", "Cache",
         'CREATE TRIGGER Settings_size_delete AFTER DELETE ON Cache FOR EACH ROW BEGIN '
         'UPDATE Settings SET value = value - OLD.size WHERE key = "size"; END'),
    ]
}
# diskcache applies Settings rows when it opens a shard: ``sqlite_*`` ones as PRAGMAs (their text
# pasted into the statement), ``disk_*`` ones as attributes of its Disk, the others as attributes
# of the Cache. Only its own settings, with values of their type, are accepted.
_JOURNAL_MODES = {"wal", "delete", "truncate", "persist", "memory", "off"}
_SETTINGS: dict[str, Any] = {
    "statistics": int, "tag_index": int, "size_limit": int, "cull_limit": int,
    "eviction_policy": {"none", "least-recently-stored", "least-recently-used", "least-frequently-used"},
    "sqlite_auto_vacuum": int, "sqlite_cache_size": int, "sqlite_journal_mode": _JOURNAL_MODES,
    "sqlite_mmap_size": int, "sqlite_synchronous": int, "sqlite_trusted_schema": int,
    "disk_min_file_size": int, "disk_pickle_protocol": int,
    "count": int, "size": int, "hits": int, "misses": int,
}


def harden_connection(con: sqlite3.Connection) -> None:
    """Make a connection to a shard someone else may have written treat its schema as untrusted:
    ``PRAGMA trusted_schema = OFF`` (views and triggers may not call functions with side effects)
    and SQLite's defensive mode where Python exposes it (3.12+: no writes to the schema itself)."""
    con.execute("PRAGMA trusted_schema = OFF")
    setconfig = getattr(con, "setconfig", None)
    defensive = getattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE", None)
    if setconfig is not None and defensive is not None:
        setconfig(defensive, True)


def schema_refusal(con: sqlite3.Connection) -> str | None:
    """Why the shard open on ``con`` is refused, or None: every object of its ``sqlite_master``
    must be one diskcache creates, with diskcache's SQL (``Cache`` a table with its columns; no
    view, no other trigger), and its ``Settings`` rows diskcache's own with values of their type.
    Only ``sqlite_master`` and ``Settings`` are read (a few rows each, bounded)."""
    rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master LIMIT 65").fetchall()
    if len(rows) > 64:
        return "its schema holds more objects than diskcache creates"
    names = set()
    for kind, name, table, sql in rows:
        known = _DISKCACHE_SCHEMA.get(name) if isinstance(name, str) else None
        if known is None:
            what = kind if kind in ("table", "index", "view", "trigger") else "object"
            return f"its schema holds a {what} {str(name)[:60]!r} diskcache does not create"
        if (kind, table, _sql_text(sql)) != known:
            return f"its {str(name)[:60]!r} is not diskcache's {known[0]} (a {str(kind)[:20]}: {str(sql)[:80]!r})"
        names.add(name)
    if "Settings" not in names:
        return None  # a shard being created right now: no settings yet
    settings = con.execute("SELECT key, value FROM Settings LIMIT 65").fetchall()
    if len(settings) > 64:
        return "its Settings table holds more rows than diskcache writes"
    for key, value in settings:
        allowed = _SETTINGS.get(key) if isinstance(key, str) else None
        if allowed is None:
            return f"its Settings table holds {str(key)[:60]!r}, not a diskcache setting"
        if allowed is int:
            if type(value) is not int or not -(2**63) <= value < 2**63:
                return f"its setting {key} is {str(value)[:60]!r}, not a whole number"
        elif value not in allowed:
            return f"its setting {key} is {str(value)[:60]!r}, not one of {sorted(allowed)}"
    return None


def _file_refusal(path: Path, what: str) -> str | None:
    """Why ``path`` (the shard's database or a journal beside it) is refused, or None: where it
    exists it must be a regular file, not a symlink (a FIFO would hang SQLite, a link write elsewhere)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"its {what} cannot be examined: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"its {what} {path.name} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"its {what} {path.name} is not a regular file"
    return None


def files_refusal(path: Path, root: Path | None = None) -> str | None:
    """Why the shard folder ``path`` is refused for its files, or None: the folder stays under the
    cache folder ``root`` (a symlink may not lead elsewhere), and ``cache.db`` and its journals,
    where they exist, are regular files (``lstat``: nothing is opened)."""
    if root is not None:
        try:
            inside(path, root, "cache shard folder")
        except DaldaError:
            return f"the folder is a symbolic link leading outside the cache folder {root} (to {os.path.realpath(path)})"
    db = path / "cache.db"
    for file, what in ((db, "database"), (path / "cache.db-wal", "WAL journal"),
                       (path / "cache.db-shm", "shared-memory file"), (path / "cache.db-journal", "journal")):
        reason = _file_refusal(file, what)
        if reason is not None:
            return reason
    return None


def shard_refusal(path: Path, root: Path | None = None, timeout: float = 60.0) -> str | None:
    """Why the shard folder ``path`` is refused, or None, checked before diskcache opens it for
    writing: :func:`files_refusal`, then :func:`schema_refusal` on a read-only connection made for
    the check (waiting up to ``timeout`` seconds for a writer's lock)."""
    reason = files_refusal(path, root)
    db = path / "cache.db"
    if reason is not None or not os.path.lexists(db):
        return reason
    from urllib.request import pathname2url

    uri = "file:" + pathname2url(str(db))
    # As the readers open it: read-only, or where that cannot open (a read-only folder without the
    # WAL's -shm file, which a reader may not create) immutable.
    for mode in ("?mode=ro", "?immutable=1"):
        try:
            con = sqlite3.connect(uri + mode, uri=True, timeout=timeout, isolation_level=None)
        except sqlite3.Error:
            continue
        try:
            harden_connection(con)
            con.execute("PRAGMA query_only = ON")
            return schema_refusal(con)
        except sqlite3.OperationalError:
            continue
        except sqlite3.DatabaseError as exc:
            return f"it is not a readable SQLite database: {exc}"
        finally:
            con.close()
    return None  # cannot be opened at all: diskcache's own open fails and says so
