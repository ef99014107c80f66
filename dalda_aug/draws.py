"""Draws: what each access of an item picks, and per-item access counts shared by every process.

:class:`~dalda_aug.dataset.SyntheticAugmentedDataset` names the n-th access of item ``i`` by
``(seed, n, i)`` (:func:`draw_name`), whose hash picks real or one of its variants
(:func:`pick`); :class:`DrawCounter` counts those accesses. The counts and the pinned epoch live
in shared-memory tensors, so they reach DataLoader workers (fork or spawn, persistent or not), and
an exclusive ``flock`` on a small temporary file (:class:`FileLock`) serialises their updates
across processes. Under DDP each rank counts its own accesses (:func:`process_rank`).

The lock file is ``$TMPDIR/dalda-aug-draws-<pid>-<random>.lock``; the counter's owner removes it,
and one left by a process that was killed (``kill -9``) is swept by the next counter made on the
machine (:func:`~dalda_aug._io.sweep_orphans`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import torch

from ._io import sweep_orphans

__all__ = ["DrawCounter", "FileLock", "LOCK_PREFIX", "draw_name", "draw_seed", "pick", "process_rank", "unlink_lock"]

#: Name prefix of the counters' lock files in the temporary folder (followed by the owner's pid).
LOCK_PREFIX = "dalda-aug-draws-"


def draw_seed(seed: int | None) -> int:
    """``seed``, or when None one drawn as RandomSampler seeds its shuffling: from torch's global
    generator, here, once."""
    if seed is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return int(seed)


def draw_name(seed: int, epoch: int, index: int, count: int, rank: int) -> str:
    """What one access of item ``index`` hashes: the first access in an epoch is that epoch's draw
    (without set_epoch, the n-th access is epoch n's); other accesses have their own names."""
    if count == 0:
        return f"{seed}:{epoch}:{index}"
    return f"{seed}:{epoch}:{index}:{count}" + (f":r{rank}" if rank else "")


def pick(name: str, p: float, choices: int) -> int | None:
    """Which of an item's ``choices`` variants a draw named ``name`` picks, or None (real).

    A 128-bit hash of the name gives a uniform u in [0, 1) (synthetic when u < p) and the
    variant's position among the item's M.
    """
    if not choices or p <= 0.0:
        return None
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    if int.from_bytes(digest[:8], "big") / 2.0**64 >= p:
        return None
    return int.from_bytes(digest[8:], "big") % choices


def unlink_lock(path: str, owner: int) -> None:
    """Remove the lock file ``path``, in the process ``owner`` that created it only."""
    if os.getpid() == owner:
        try:
            os.unlink(path)
        except OSError:
            pass


def process_rank(hint: int | None) -> int:
    """This process's distributed rank: torch.distributed's, else the one seen when the dataset
    was sent to this worker, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover - a broken process group: fall back
        pass
    if hint is not None:
        return int(hint)
    return int(os.environ.get("RANK", "0") or 0)


class FileLock:
    """An exclusive ``flock`` on an open file: serialises draw counting across processes
    (a no-op where ``fcntl`` is missing, i.e. Windows)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class DrawCounter:
    """Accesses of each of ``n`` items since construction or the last :meth:`pin`, and the pinned
    epoch (-1: never pinned), shared by every process the counter is sent to.

    The lock file is created here and removed by whoever owns the counter (the dataset registers
    :func:`unlink_lock` for it); pickling ships the shared tensors and the rank seen when sent
    (spawned DataLoader workers do not join the process group), never an open file.
    """

    def __init__(self, n: int) -> None:
        # -1: set_epoch never called; else the pinned epoch.
        self.epoch_tensor = torch.full((), -1, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        # Accesses of each item since construction or the last pin.
        self.draws = torch.zeros(max(n, 1), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        sweep_orphans(LOCK_PREFIX)  # lock files of killed processes
        fd, self.lock_path = tempfile.mkstemp(prefix=f"{LOCK_PREFIX}{os.getpid()}-", suffix=".lock")
        os.close(fd)
        self.rank_hint: int | None = None
        self._reset_process_state()

    @property
    def epoch(self) -> int:
        """The pinned epoch, or -1."""
        return int(self.epoch_tensor.item())

    def rank(self) -> int:
        """This process's rank (see :func:`process_rank`)."""
        return process_rank(self.rank_hint)

    def pin(self, epoch: int) -> None:
        """Pin ``epoch`` and reset every count."""
        with self.locked():
            self.epoch_tensor.fill_(int(epoch))
            self.draws.zero_()

    def take(self, index: int) -> tuple[int, int]:
        """Count one access of item ``index``: ``(pinned epoch or -1, accesses before this one)``."""
        with self.locked():
            pinned = int(self._epoch_np[()])
            count = int(self._draws_np[index])
            self._draws_np[index] = count + 1
        return pinned, count

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock_fd: int | None = None
        self._epoch_np = self.epoch_tensor.numpy()
        self._draws_np = self.draws.numpy()

    def locked(self) -> FileLock:
        """The cross-process lock (the file is opened once per process)."""
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._lock_fd is None:
            # never through a link planted at the name (the temporary folder is shared)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            self._lock_fd = os.open(self.lock_path, flags, 0o600)
        return FileLock(self._lock_fd)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_pid", "_lock_fd", "_epoch_np", "_draws_np"):
            state.pop(name, None)
        # Spawned DataLoader workers do not join the process group: they keep the rank seen here.
        state["rank_hint"] = self.rank()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()
