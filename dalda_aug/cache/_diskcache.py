"""The parts of diskcache's private interface the cache relies on, in one place.

diskcache has no public way to run a statement inside a handle's transaction (``Cache._sql``),
to remove a value file through the handle's ``Disk`` (``Cache._disk``), or to learn a ``Disk``'s
folder (``Disk._directory``). The leases (:mod:`~dalda_aug.cache.leases`), the corrupt-row
clean-up and the safe ``Disk`` (:mod:`~dalda_aug.cache.shards`) go through the functions below,
so a diskcache release that renames them is met here, and ``setup.cfg`` pins the range tested
(:data:`TESTED`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TESTED", "sql", "remove_value_file", "disk_directory"]

#: The diskcache releases these functions are tested with (``setup.cfg`` requires the same).
TESTED = ">=5.6,<6"


def sql(handle: Any, statement: str, params: tuple[Any, ...] = ()) -> Any:
    """Run ``statement`` on the connection of ``handle`` (a ``diskcache.Cache``), inside its
    ``transact()`` block when called from one; returns the cursor."""
    return handle._sql(statement, params)


def remove_value_file(handle: Any, name: str) -> Any:
    """Remove the value file ``name`` (relative to the shard, as its row holds it) through the
    ``Disk`` of ``handle``, so that the ``Disk``'s own checks apply."""
    return handle._disk.remove(name)


def disk_directory(disk: Any) -> str:
    """The folder a ``diskcache.Disk`` writes its value files under."""
    return str(disk._directory)
