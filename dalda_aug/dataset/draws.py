"""Draws: what each access of an item picks, and per-item access counts shared by every process.

:class:`~dalda_aug.dataset.SyntheticAugmentedDataset` names the n-th access of item ``i`` by
``(seed, n, i)`` (:func:`draw_name`), whose hash picks real or one of its variants
(:func:`pick`); :class:`DrawCounter` counts those accesses. The counts and the pinned epoch live
in shared-memory tensors, so they reach DataLoader workers (fork or spawn, persistent or not), and
an exclusive ``flock`` on a small temporary file (:class:`FileLock`) serialises their updates
across processes. Under DDP each rank counts its own accesses (:func:`process_rank`).

The counts are run state: :meth:`DrawCounter.state` and :meth:`DrawCounter.restore` save and
restore them (the dataset's ``state_dict``/``load_state_dict``). In a DataLoader worker,
:meth:`DrawCounter.worker_state` describes the counts the worker started from plus the draws that
worker took itself, so that the states torchdata's ``StatefulDataLoader`` keeps per worker (each
taken right after a batch that worker fetched, see ``_worker_loop``) add up to exactly the draws of
the batches served, whatever the other workers had prefetched meanwhile. A worker records only
once something asks it for its state (a plain DataLoader never does); then it holds two counts per
item (16 bytes) and, per batch, the indices it drew, folded into the counts every
:data:`FOLD_SEGMENTS` batches, so what torchdata sends back per batch stays small.

The lock file is ``$TMPDIR/dalda-aug-draws-<pid>-<random>.lock``; the counter's owner removes it,
and one left by a process that was killed (``kill -9``) is swept by the next counter made on the
machine (:func:`~dalda_aug._io.sweep_orphans`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from typing import Any

import torch

from .._io import sweep_orphans
from ..errors import InputError

__all__ = ["LOCK_PREFIX", "STATE_FORMAT", "DrawCounter", "FileLock", "WorkerRecord", "check_state", "draw_name",
           "draw_seed", "pick", "process_rank", "unlink_lock"]

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


#: The ``format`` of a saved draw state (``SyntheticAugmentedDataset.state_dict``).
STATE_FORMAT = "dalda-aug-draws/1"


def check_state(state: Any, seed: int, items: int) -> tuple[int, Any, Any]:
    """``(epoch, counts, worker share or None)`` of a saved draw state; else :class:`InputError`."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(f"not a draw state of SyntheticAugmentedDataset (format {found!r}, expected {STATE_FORMAT!r})")
    if state.get("seed") != seed:
        raise InputError(f"the draw state was saved by a dataset with seed={state.get('seed')}, this one has "
                         f"seed={seed}: build it with seed={state.get('seed')} (or torch.manual_seed as in the run "
                         "saved) so that the counts name the same draws")
    if state.get("items") != items:
        raise InputError(f"the draw state counts {state.get('items')} items, this dataset has {items}")
    epoch, draws = state.get("epoch"), state.get("draws")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < -1:
        raise InputError(f"the draw state's epoch must be an integer >= -1, got {epoch!r}")

    def counts(value: Any, what: str) -> Any:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.shape != (items,) \
                or (items and int(value.min()) < 0):
            raise InputError(f"the draw state's {what} must be {items} counts >= 0 (int64), got "
                             f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}")
        return value

    draws = counts(draws, "draws")
    share = state.get("worker")
    if share is None:
        return epoch, draws, None
    own = share.get("own") if isinstance(share, dict) else None
    segments = share.get("segments") if isinstance(share, dict) else None
    workers = share.get("workers") if isinstance(share, dict) else None
    if not isinstance(segments, dict) or not isinstance(workers, int) or workers < 1 or not all(
            isinstance(v, list) and all(isinstance(i, int) and 0 <= i < items for i in v) for v in segments.values()):
        raise InputError("the draw state's worker share is malformed (own counts, segments of item indices, workers)")
    if own is not None:
        own = counts(own, "worker counts")
    return epoch, draws, (own, segments, workers)


# Slots of DrawCounter.control, shared like the counts.
_GENERATION = 0  # bumped whenever the counts are set other than by drawing (pin, restore)
_RESTORE_KEY = 1  # which saved run the worker states being restored belong to (0: no restore open)
_RESTORE_DONE = 2  # how many of its workers' states have been added
_RESTORE_OF = 3  # how many workers it had
#: A worker folds its per-batch segments into one array once it holds this many.
FOLD_SEGMENTS = 64


class WorkerRecord:
    """What one DataLoader worker process drew since it started recording: the shared counts it
    started from (``base``, never changed in place: torchdata compares it with the last state it
    saw), its own earlier draws folded into counts (``own``) and its later draws as index lists, one
    per state taken (small deltas for torchdata to send)."""

    def __init__(self, generation: int, epoch: int, base: torch.Tensor, own: torch.Tensor | None = None) -> None:
        self.generation = generation
        self.epoch = epoch
        self.base = base
        self.own = own
        self.segments: dict[str, list[int]] = {}
        self.pending: list[int] = []
        self.next_segment = 0

    def close_segment(self) -> None:
        """File the draws taken since the last state as one segment; fold when there are many."""
        if self.pending:
            self.segments[str(self.next_segment)] = self.pending
            self.next_segment += 1
            self.pending = []
        if len(self.segments) >= FOLD_SEGMENTS:
            self.own = own_counts(self.base.numel(), self.own, self.segments)
            self.segments = {}


def own_counts(n: int, own: torch.Tensor | None, segments: dict[str, list[int]]) -> torch.Tensor:
    """``own`` plus one for every index listed in ``segments``, as a new tensor of ``n`` counts."""
    out = torch.zeros(n, dtype=torch.int64) if own is None else own.to(torch.int64).clone()
    for indices in segments.values():
        if indices:
            out += torch.bincount(torch.as_tensor(indices, dtype=torch.int64), minlength=n)[:n]
    return out


def _restore_key(epoch: int, base: torch.Tensor, workers: int) -> int:
    digest = hashlib.blake2b(f"{epoch}:{workers}:".encode() + base.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1 or 1


class DrawCounter:
    """Accesses of each of ``n`` items since construction or the last :meth:`pin`, and the pinned
    epoch (-1: never pinned), shared by every process the counter is sent to.

    The lock file is created here and removed by whoever owns the counter (the dataset registers
    :func:`unlink_lock` for it); pickling ships the shared tensors and the rank seen when sent
    (spawned DataLoader workers do not join the process group), never an open file.
    """

    _record: WorkerRecord | None  # this process's record, when it is a DataLoader worker that saves state

    def __init__(self, n: int) -> None:
        # -1: set_epoch never called; else the pinned epoch.
        self.epoch_tensor = torch.full((), -1, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        # Accesses of each item since construction or the last pin.
        self.draws = torch.zeros(max(n, 1), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        # _GENERATION, _RESTORE_KEY, _RESTORE_DONE, _RESTORE_OF
        self.control = torch.zeros(4, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        self.items = int(n)
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
            self._control_np[_GENERATION] += 1

    def progress(self) -> tuple[int, int]:
        """``(pinned epoch or -1, fewest draws of any item)``: how far every item has been drawn."""
        with self.locked():
            fewest = int(self._draws_np[: self.items].min()) if self.items else 0
            return int(self._epoch_np[()]), fewest

    def take(self, index: int) -> tuple[int, int]:
        """Count one access of item ``index``: ``(pinned epoch or -1, accesses before this one)``."""
        incomplete = None
        with self.locked():
            pinned = int(self._epoch_np[()])
            count = int(self._draws_np[index])
            self._draws_np[index] = count + 1
            control = self._control_np
            if control[_RESTORE_OF]:  # the first draw after a restore closes it
                if control[_RESTORE_DONE] < control[_RESTORE_OF]:
                    incomplete = (int(control[_RESTORE_DONE]), int(control[_RESTORE_OF]))
                control[_RESTORE_KEY] = control[_RESTORE_DONE] = control[_RESTORE_OF] = 0
        if self._record is not None:
            self._record.pending.append(index)
        if incomplete is not None:
            warnings.warn(
                f"the draw state of only {incomplete[0]} of the {incomplete[1]} DataLoader workers it was saved "
                "with was restored before drawing: the draws of the other workers' batches will be taken again",
                UserWarning, stacklevel=3)
        return pinned, count

    # -- run state -------------------------------------------------------------------------------
    def next_name(self, seed: int, index: int) -> str:
        """Consume item ``index``'s next draw (:meth:`take`, counted across all processes) and name
        it (:func:`draw_name`), the rank included. Never pinned, access n is epoch n's draw; under DDP
        each rank counts its own accesses, so ranks other than 0 name theirs apart (never repeating
        rank 0's). Pinned, an epoch's first access is that epoch's draw on every rank."""
        pinned, count = self.take(index)
        rank = self.rank()
        if pinned < 0:
            return draw_name(seed, count, index, 0, 0) + (f":r{rank}" if rank else "")
        return draw_name(seed, pinned, index, count, rank if count else 0)

    def state(self) -> dict[str, Any]:
        """The pinned epoch and every count, as of now."""
        with self.locked():
            return {"epoch": int(self._epoch_np[()]), "draws": self.draws[: self.items].clone()}

    def worker_state(self, worker: int, workers: int) -> dict[str, Any]:
        """This DataLoader worker's share of the state: the counts it started recording from
        (the same in every worker: they all start before any of them draws) and the draws it took
        itself. The first call in a worker process starts the record; a pin or restore made since
        the last call starts it afresh."""
        with self.locked():
            generation = int(self._control_np[_GENERATION])
            record = self._record
            if record is None or record.generation != generation:
                record = self._record = WorkerRecord(generation, int(self._epoch_np[()]),
                                                     self.draws[: self.items].clone())
            record.close_segment()
        return {"epoch": record.epoch, "draws": record.base,
                "worker": {"id": int(worker), "workers": int(workers), "own": record.own,
                           "segments": dict(record.segments)}}

    def restore(self, epoch: int, draws: torch.Tensor) -> None:
        """Set the pinned epoch and every count (a state from :meth:`state`)."""
        with self.locked():
            self.epoch_tensor.fill_(int(epoch))
            self.draws[: self.items].copy_(draws)
            control = self._control_np
            control[_GENERATION] += 1
            control[_RESTORE_KEY] = control[_RESTORE_DONE] = control[_RESTORE_OF] = 0

    def restore_worker(self, epoch: int, base: torch.Tensor, own: torch.Tensor | None,
                       segments: dict[str, list[int]], workers: int) -> None:
        """Add one worker's share (a state from :meth:`worker_state`). The first share of a restore
        sets the counts to the base all workers started from; each share then adds its worker's own
        draws, so once every worker of the saved loader has restored its share (torchdata restores
        all of them before any worker draws) the counts are the sum. The share also becomes this
        worker's record, so the states it saves from here on keep adding up."""
        with self.locked():
            key = _restore_key(epoch, base, workers)
            control = self._control_np
            if control[_RESTORE_KEY] != key or control[_RESTORE_DONE] >= control[_RESTORE_OF]:
                self.epoch_tensor.fill_(int(epoch))
                self.draws[: self.items].copy_(base)
                control[_GENERATION] += 1
                control[_RESTORE_KEY], control[_RESTORE_DONE], control[_RESTORE_OF] = key, 0, int(workers)
            mine = own_counts(self.items, own, segments)
            self.draws[: self.items] += mine
            control[_RESTORE_DONE] += 1
            self._record = WorkerRecord(int(control[_GENERATION]), int(epoch), base.clone(), mine)

    # -- per process -----------------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock_fd: int | None = None
        self._epoch_np = self.epoch_tensor.numpy()
        self._draws_np = self.draws.numpy()
        self._control_np = self.control.numpy()
        self._record = None

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
        for name in ("_pid", "_lock_fd", "_epoch_np", "_draws_np", "_control_np", "_record"):
            state.pop(name, None)
        # Spawned DataLoader workers do not join the process group: they keep the rank seen here.
        state["rank_hint"] = self.rank()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()
