"""GPU worker pool: generator processes that fill the cache on request.

:class:`GeneratorPool` starts one *spawned* process per device (``"cuda:0"``, ``"cuda:1"``...,
or ``"cpu"`` for tests), each holding one :class:`~dalda_aug.generators.ip_adapter.IPAdapterGenerator`
built from the cache's :class:`~dalda_aug.cache.GenerationSpec`. Datasets — in the training
process or in its DataLoader workers — send requests through a :class:`PoolHandle` (a
multiprocessing queue plus a little shared memory; picklable to DataLoader workers, holds no
model). Each worker takes requests from the shared queue, batches what is waiting (up to
``batch_size``, waiting at most ``max_delay`` seconds for more), skips images that are
already cached, generates, and writes the results to the cache, where the readers find them.

Failure handling: a worker that raises (a model that will not load, out of memory...)
records its traceback in shared memory; a worker that dies without a word (killed, segfault)
is noticed by a monitor thread in the pool's process, which records its exit code. Either
way the pool is marked failed and every reader waiting in :meth:`PoolHandle.wait` raises
:class:`PoolError` with that report instead of hanging. The pool is a context manager;
:meth:`GeneratorPool.close` stops the workers (a worker busy with a batch is given
``timeout`` seconds, then terminated).

Why spawn: a forked child cannot use CUDA initialised by its parent, and models must not be
copied into DataLoader workers. The workers re-import ``dalda_aug`` and load their models
themselves.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

from ..cache import CachedImage, CacheStorageError, SyntheticCache
from ..errors import DaldaError, InputError, PoolClosedError, PoolError, WaitTimeoutError  # importable from here too

__all__ = ["GeneratorPool", "PoolHandle", "PoolError", "PoolClosedError", "WaitTimeoutError"]

log = logging.getLogger(__name__)

# Pool states, kept in shared memory.
_RUNNING, _CLOSED, _FAILED = 0, 1, 2
_ERROR_BYTES = 32768








@dataclass(frozen=True)
class _Request:
    key: str
    variant: Any  # dalda_aug.plan.Variant
    image: Any  # PIL image of the source


class PoolHandle:
    """The requesting side of a :class:`GeneratorPool`: picklable, holds no model.

    Shared with DataLoader workers by inheritance (fork) or when they are started (spawn).
    """

    # requests: a multiprocessing Queue; state, error: a shared int Value and char Array.
    def __init__(self, requests: Any, state: Any, error: Any, num_workers: int) -> None:
        self._requests = requests
        self._state = state
        self._error = error
        self.num_workers = num_workers
        self._sent: set[str] = set()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sent"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"PoolHandle(workers={self.num_workers}, state={self.state!r})"

    @property
    def state(self) -> str:
        return {_RUNNING: "running", _CLOSED: "closed", _FAILED: "failed"}[self._state.value]

    def check(self) -> None:
        """Raise :class:`PoolError` if a worker crashed, :class:`PoolClosedError` if closed."""
        value = self._state.value
        if value == _FAILED:
            report = self.error_report()
            sep = "\n" if "\n" in report else " "  # a traceback below, or one line
            raise PoolError(f"the generator pool failed:{sep}{report}")
        if value == _CLOSED:
            raise PoolClosedError("the generator pool has been closed")

    def error_report(self) -> str:
        with self._error.get_lock():
            return str(self._error.value.decode("utf-8", "replace"))

    def submit(self, key: str, variant: Any, image: Any, *, force: bool = False) -> bool:
        """Ask for the image of ``variant`` (``image`` is its source); False if already asked.

        Non-blocking. Requests are deduplicated per process unless ``force``; workers also
        skip images that are in the cache by the time they get to them.
        """
        self.check()
        if os.getpid() != self._pid:
            self._pid, self._sent = os.getpid(), set()
        if key in self._sent and not force:
            return False
        self._requests.put(_Request(key, variant, image))
        # Do not block this process's exit on flushing requests nobody may read any more.
        self._requests.cancel_join_thread()
        self._sent.add(key)
        return True

    def wait(self, key: str, cache: SyntheticCache, timeout: float = 600.0, poll: float = 0.02) -> CachedImage:
        """Wait until ``key`` is in ``cache``; returns the :class:`~dalda_aug.cache.CachedImage`.

        Raises :class:`PoolError` as soon as the pool fails, :class:`PoolClosedError` if it is
        closed, :class:`WaitTimeoutError` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            entry = cache.get(key)
            if entry is not None:
                return entry
            self.check()
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(f"image {key} was not generated within {timeout:g} s "
                                       f"(pool of {self.num_workers} worker(s), state {self.state})")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)


def _fail(state: Any, error: Any, message: str) -> None:
    """Record the first failure report and mark the pool failed."""
    with error.get_lock():
        if not error.value:
            data = message.encode("utf-8", "replace")
            if len(data) >= _ERROR_BYTES:
                data = b"..." + data[-(_ERROR_BYTES - 8):]
            error.value = data
    state.value = _FAILED


def _worker_main(index: int, device: str, cache: SyntheticCache, batch_size: int, max_delay: float,
                 torch_threads: int | None, requests: Any, state: Any, error: Any, ready: Any) -> None:
    """Body of one worker process: load a generator, then serve batches until closed."""
    from ..generators.base import GenerationRequest

    try:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        assert cache.spec is not None  # GeneratorPool gives its workers a cache with a spec
        generator = cache.spec.make_generator(device).load()
        ready.release()
        while state.value == _RUNNING:
            try:
                first = requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if first is None:
                break
            batch, stop = [first], False
            deadline = time.monotonic() + max_delay
            while len(batch) < batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = requests.get(timeout=remaining) if remaining > 0 else requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            todo: dict[str, _Request] = {}
            for request in batch:
                if request.key not in todo and request.key not in cache:
                    todo[request.key] = request
            if todo:
                items = list(todo.values())
                images = generator.generate(
                    [GenerationRequest.from_variant(r.variant, r.image) for r in items],
                    batch_size=len(items),
                )
                for request, image in zip(items, images):
                    cache.put(request.variant, image)
            if stop:
                break
    except CacheStorageError as exc:  # a full or read-only cache folder: its one line says it all
        _fail(state, error, f"worker {index} on {device} (pid {os.getpid()}): {exc}")
        ready.release()
        raise SystemExit(1) from None
    except BaseException:  # report everything, including KeyboardInterrupt and SystemExit
        _fail(state, error, f"worker {index} on {device} (pid {os.getpid()}) raised:\n{traceback.format_exc()}")
        ready.release()
        raise SystemExit(1) from None
    finally:
        cache.close()


class GeneratorPool:
    """One spawned generator process per device, filling ``cache`` on request.

    Args:
        cache: where results go; its :attr:`~dalda_aug.cache.SyntheticCache.spec` (or, without
            one, the spec recorded in its folder) says which generator to build.
        devices: one worker per entry (``["cuda:0", "cuda:1"]``, ``["cpu"]``); default every
            visible CUDA device, else one CPU worker.
        batch_size: most requests per generator call.
        max_delay: seconds a worker waits for more requests to fill a batch.
        start_timeout: seconds :meth:`start` waits for the workers to load their models
            (``None``: do not wait).
        torch_threads: ``torch.set_num_threads`` in each worker (for CPU workers sharing a
            machine); default torch's own choice.

    Use it as a context manager around the training loop::

        with GeneratorPool(cache, devices=["cuda:0"]) as pool:
            ds = SyntheticAugmentedDataset(base, plan, cache, on_miss="wait", pool=pool)
            ...
    """

    def __init__(self, cache: SyntheticCache, devices: Sequence[str] | None = None, *, batch_size: int = 8,
                 max_delay: float = 0.05, start: bool = True, start_timeout: float | None = None,
                 torch_threads: int | None = None):
        if not isinstance(cache, SyntheticCache):
            raise InputError(f"cache must be a SyntheticCache, got {type(cache).__name__}")
        if cache.spec is None:
            cache = cache.with_spec(cache.resolve_spec())  # the recorded one, or an InputError saying why not
        if int(batch_size) != batch_size or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if max_delay < 0:
            raise InputError(f"max_delay must be >= 0, got {max_delay!r}")
        if devices is None:
            devices = _default_devices()
        devices = [str(d) for d in devices]
        if not devices:
            raise InputError("devices must name at least one device")
        self.cache = cache
        self.devices = devices
        self.batch_size = int(batch_size)
        self.max_delay = float(max_delay)
        if torch_threads is not None and (int(torch_threads) != torch_threads or torch_threads < 1):
            raise InputError(f"torch_threads must be an integer >= 1 or None, got {torch_threads!r}")
        self.torch_threads = torch_threads
        ctx = mp.get_context("spawn")
        self._ctx = ctx
        self._requests = ctx.Queue()
        self._state = ctx.Value("i", _RUNNING)
        self._error = ctx.Array("c", _ERROR_BYTES)
        self._ready = ctx.Semaphore(0)
        self._processes: list[Any] = []
        self._monitor: threading.Thread | None = None
        self._closing = threading.Event()
        if start:
            self.start(timeout=start_timeout)

    def __repr__(self) -> str:
        return (f"GeneratorPool(devices={self.devices}, batch_size={self.batch_size}, "
                f"state={self.handle().state!r}, cache={self.cache!r})")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> "GeneratorPool":
        """Start the workers; with ``timeout``, wait until their models are loaded."""
        if self._processes:
            return self
        for index, device in enumerate(self.devices):
            process = self._ctx.Process(
                target=_worker_main,
                args=(index, device, self.cache, self.batch_size, self.max_delay, self.torch_threads,
                      self._requests, self._state, self._error, self._ready),
                name=f"dalda-generator-{index}",
                daemon=True,
            )
            process.start()
            self._processes.append(process)
        self._monitor = threading.Thread(target=self._watch, name="dalda-pool-monitor", daemon=True)
        self._monitor.start()
        if timeout is not None:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until every worker has loaded its model (or raise :class:`PoolError`)."""
        deadline = time.monotonic() + timeout
        for _ in self._processes:
            while not self._ready.acquire(timeout=0.1):
                self.handle().check()
                if time.monotonic() > deadline:
                    raise WaitTimeoutError(f"generator workers not ready within {timeout:g} s")
        self.handle().check()
        for _ in self._processes:  # leave the semaphore as it was
            self._ready.release()

    def _watch(self) -> None:
        """Monitor thread: report a worker that exits while the pool is running."""
        from multiprocessing.connection import wait

        alive = {p.sentinel: (i, p) for i, p in enumerate(self._processes)}
        while alive and not self._closing.is_set():
            for sentinel in wait(list(alive), timeout=0.2):
                index, process = alive.pop(sentinel)
                process.join()
                if self._state.value == _RUNNING and not self._closing.is_set():
                    _fail(self._state, self._error,
                          f"worker {index} on {self.devices[index]} (pid {process.pid}) exited with code "
                          f"{process.exitcode} without reporting an error (killed, out of memory or crashed)")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers: each finishes its batch (up to ``timeout`` s), then is terminated."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._state.value == _RUNNING:
            self._state.value = _CLOSED
        for _ in self._processes:
            try:
                self._requests.put_nowait(None)
            except Exception:  # pragma: no cover - queue already broken
                pass
        deadline = time.monotonic() + timeout
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                log.warning("terminating generator worker %s (pid %s)", process.name, process.pid)
                process.terminate()
                process.join(5)
        if self._monitor is not None:
            self._monitor.join(1)
        self._requests.cancel_join_thread()
        self._requests.close()

    def __enter__(self) -> "GeneratorPool":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------
    def handle(self) -> PoolHandle:
        """A picklable handle for datasets and DataLoader workers."""
        return PoolHandle(self._requests, self._state, self._error, len(self.devices))

    @property
    def processes(self) -> list[Any]:
        return list(self._processes)

    def submit(self, variant: Any, image: Any) -> str:
        """Ask for ``variant`` (``image``: its source image); returns its key."""
        key = self.cache.key(variant)
        self.handle().submit(key, variant, image)
        return key

    def wait(self, variant_or_key: Any, timeout: float = 600.0) -> CachedImage:
        """Wait for an image to be in the cache (see :meth:`PoolHandle.wait`)."""
        return self.handle().wait(self.cache.key(variant_or_key), self.cache, timeout)


def _default_devices() -> list[str]:
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # pragma: no cover
        count = 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
