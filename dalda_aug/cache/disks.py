"""The disk under a cache folder: the shard a process writes, the filesystem type, free space in words.

Nothing here touches a shard's SQLite rows (that is :mod:`~dalda_aug.cache.shards`):

* :func:`default_shard_name` (``<host>-<rank>``) and :func:`sanitize_shard_name`, the name of the
  shard ``CACHE/shard-<name>/`` a process writes to;
* :func:`is_network_filesystem`, read from ``/proc/mounts``: shards there are opened with a rollback
  journal and no mmap;
* :func:`existing_parent`, where a folder not made yet would be (its writability, its free space);
* :func:`human_bytes`, the one wording of byte counts in messages and ``cache stats``.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

__all__ = ["default_shard_name", "sanitize_shard_name", "is_network_filesystem", "existing_parent", "human_bytes"]

# Network filesystems on which SQLite's WAL mode and mmap are unsafe.
_NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.juicefs", "9p", "afs", "panfs", "wekafs",
}


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
    """``"512 B"``, ``"1.5 KiB"``, ... ``"3.0 TiB"`` (powers of 1024; TiB the largest unit):
    the one byte-count wording of the messages and the ``cache stats`` lines."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
