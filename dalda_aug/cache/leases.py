"""Leases: "this process is generating that key", so that warmers writing one shard skip each other's work.

A lease is a row of the writer's shard: the text key ``dalda_aug:lease:<key>``, valued with the
owner's text, with a diskcache expiry time. Leases are read and written with SQL inside a
transaction of the shard's writing handle, never through diskcache's get: a row that is
anything else is nobody's lease. No lease lasts longer than :data:`LEASE_CAP_SECONDS` unless
renewed. The functions here take the writing handle and raise ``OSError``/``sqlite3.Error``;
:class:`~dalda_aug.cache.SyntheticCache` turns those into one-line storage errors.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from ..errors import InputError
from ._diskcache import sql
from .shards import LEASE_PREFIX, MODE_RAW

__all__ = [
    "LEASE_CAP_SECONDS",
    "LEASE_PREFIX",
    "check_lease_seconds",
    "lease_row",
    "claim",
    "update_own",
    "longest_foreign",
]

# Leases (warm: "this process is generating that key"), kept in the writer's shard under the text
# key LEASE_PREFIX + <key> ("dalda_aug:lease:<key>", defined beside the rule of what a row may be),
# valued with the owner's text, with a diskcache expiry time.
#: The longest a lease lasts without being renewed (seconds). A lease found with a later expiry
#: (or none), e.g. planted in a shipped shard, counts as expiring this long after it is seen: it is
#: rewritten to do so. ``warm``'s ``lease_seconds`` may not exceed it. Read when used: setting
#: ``dalda_aug.cache.LEASE_CAP_SECONDS`` (a moved path) reads it here.
LEASE_CAP_SECONDS = 60.0


def check_lease_seconds(seconds: float) -> float:
    """``seconds`` as a float if it is more than 0 and at most :data:`LEASE_CAP_SECONDS`, else an
    :class:`~dalda_aug.errors.InputError`."""
    if not 0 < seconds <= LEASE_CAP_SECONDS:
        raise InputError(f"a lease lasts more than 0 and at most {LEASE_CAP_SECONDS:g} s (LEASE_CAP_SECONDS), "
                         f"got {seconds!r}")
    return float(seconds)


def lease_row(handle: Any, key: str, now: float, owner: str) -> tuple[float, bool] | None:
    """``(expiry, owned by owner)`` of the live lease on ``key``, or None. Call inside a transaction.

    An expiry further than :data:`LEASE_CAP_SECONDS` from ``now`` (or none) is rewritten to
    ``now`` + the cap: a lease cannot hold a key longer than that without being renewed.
    """
    rows = sql(handle, "SELECT rowid, expire_time, mode, value FROM Cache WHERE key = ? AND raw = 1",
               (LEASE_PREFIX + key,)).fetchall()
    if not rows:
        return None
    rowid, expire, mode, value = rows[0]
    if mode != MODE_RAW or not isinstance(value, str):
        return None  # not a lease this library writes (a text owner): nobody's, overwritten
    cap = now + LEASE_CAP_SECONDS
    if not isinstance(expire, (int, float)) or expire > cap:
        sql(handle, "UPDATE Cache SET expire_time = ? WHERE rowid = ?", (cap, rowid))
        expire = cap
    if expire <= now:
        return None
    return float(expire), mode == MODE_RAW and value == owner


def claim(handle: Any, keys: Iterable[str], seconds: float, owner: str) -> list[str]:
    """Lease to ``owner`` for ``seconds`` each of ``keys`` that nobody else holds (renewing its
    own); returns those, in order."""
    got: list[str] = []
    with handle.transact(retry=True):
        now = time.time()
        for key in keys:
            held = lease_row(handle, key, now, owner)
            if held is None or held[1]:
                handle.set(LEASE_PREFIX + key, owner, expire=seconds)
                got.append(key)
    return got


def update_own(handle: Any, keys: Iterable[str], seconds: float | None, owner: str) -> None:
    """Renew ``owner``'s leases of ``keys`` for ``seconds`` from now, or with None give them back."""
    with handle.transact(retry=True):
        now = time.time()
        for key in keys:
            held = lease_row(handle, key, now, owner)
            if held is not None and held[1]:
                if seconds is None:
                    handle.delete(LEASE_PREFIX + key)
                else:
                    handle.set(LEASE_PREFIX + key, owner, expire=seconds)


def longest_foreign(handle: Any, keys: Iterable[str], owner: str) -> float:
    """Seconds until the last live lease on ``keys`` held by another owner than ``owner``
    expires (0 if none)."""
    longest = 0.0
    with handle.transact(retry=True):
        now = time.time()
        for key in keys:
            held = lease_row(handle, key, now, owner)
            if held is not None and not held[1]:
                longest = max(longest, held[0] - now)
    return longest
