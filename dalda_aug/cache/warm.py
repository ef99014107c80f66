"""Cache warming: generate every image of a plan that is not cached yet.

:func:`warm` is the generation step of the pipeline, run ahead of training:

* **Keys first.** Every variant's cache key is computed and looked up in the shards' SQLite
  key indexes (and the entries found checked by their headers and sizes, without reading
  their image bytes) before any model is loaded, so a rerun with everything cached loads no
  model and reads well under 1 % of the cache's bytes.
* **Sharded.** With ``num_processes`` > 1 (``accelerate launch``: one process per GPU, over
  any number of nodes), process ``r`` takes every n-th of the plan's sorted keys, starting at
  ``r``: a deterministic, disjoint and balanced split that needs no communication. Each
  process writes its own cache shard (``CACHE/shard-<host>-<rank>``), which keeps SQLite off shared-filesystem
  locking (see :mod:`dalda_aug.cache`).
* **Overlapped writes.** Generated batches go to writer threads that encode (LZ4, PNG, WebP, raw or JPEG)
  and store them while the next batch is generated; a bounded queue keeps memory flat.
* **Self-describing.** When its first image is stored (or, with everything cached, at once), the
  cache's spec is recorded in the cache folder for this plan (``CACHE/specs/``,
  :meth:`~dalda_aug.cache.SyntheticCache.record_spec`), so readers (the dataset, ``cache stats``,
  ``metrics``, ``inspect``) need no generation options. A run that stores nothing (an
  interrupted start, settings that cannot run) records nothing.
* **Resumable.** Entries are written atomically as their batch finishes. After a crash or
  ``kill -9`` at any moment, rerunning generates exactly what is missing; nothing written is
  lost or regenerated. What counts as cached is checked first (header, metadata checksum and
  sizes; no image bytes read): a damaged entry is removed and regenerated. ``verify=True``
  decodes this process's entries first (pixels checked too). Ctrl-C stores what was generated,
  then raises :class:`WarmInterrupted` (a ``KeyboardInterrupt``) with how many images are kept.
* **Cooperative.** Each batch is leased before it is generated
  (:meth:`~dalda_aug.cache.SyntheticCache.claim`): two processes writing the same shard skip
  each other's keys instead of generating everything twice. Leases are renewed while a batch
  runs and expire ``lease_seconds`` after a process dies, so its keys are taken over. No lease
  lasts longer than :data:`~dalda_aug.cache.leases.LEASE_CAP_SECONDS` unless renewed (one planted with
  a later expiry is cut down to that), and waiting for another process's keys is said once.
* **Clear failures.** A full disk or a read-only cache folder stops warming with one line
  naming the folder (:class:`~dalda_aug.cache.CacheFullError`,
  :class:`~dalda_aug.cache.CacheReadOnlyError`); everything written before stays valid.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import leases as _leases
from . import CacheReadOnlyError, SyntheticCache
from .spec import GenerationSpec, digest_hex, variant_digests
from ..data import image_sha256, load_image, source_path
from ..errors import DaldaError, InputError, MissingFileError

__all__ = ["warm", "WarmReport", "WarmInterrupted", "shard_keys", "plan_keys", "plan_share", "rebase_plan"]

log = logging.getLogger(__name__)


def shard_keys(keys: Iterable[str], process_index: int, num_processes: int) -> list[str]:
    """The keys process ``process_index`` of ``num_processes`` generates.

    Every n-th key in sorted order: deterministic (the same split in every process and on
    every rerun, with no communication), disjoint, complete, and balanced to within one image.
    """
    return sorted(set(keys))[process_index::num_processes]


def plan_keys(plan: Any, cache: SyntheticCache | GenerationSpec) -> dict[str, Any]:
    """``{key: variant}`` for a plan's variants, first variant per key, in plan order (the keys of
    ``cache``'s spec, or of a spec)."""
    keys: dict[str, Any] = {}
    for variant in plan:
        keys.setdefault(cache.key(variant), variant)
    return keys


#: Rows hashed at a time by :func:`plan_share` (bounds the transient Python objects).
_SHARE_CHUNK = 1 << 20
#: The shorter side IP-Adapter's image encoder input is resized to (its CLIPImageProcessor's
#: ``shortest_edge``, 224 for h94/IP-Adapter's ViT-H/14): sources are checked against it first.
FEATURE_EXTRACTOR_EDGE = 224


def plan_share(plan: Any, cache: SyntheticCache, process_index: int = 0, num_processes: int = 1
               ) -> tuple[dict[str, Any], int]:
    """``({key: variant}`` of the keys process ``process_index`` of ``num_processes`` generates,
    ``distinct keys in the plan)``: the same share as ``shard_keys(plan_keys(plan, cache), ...)``
    (every n-th key in sorted order, each key's first variant in plan order, in key order), but
    computed from the plan's columns as 32-byte digests, so a process holds a ``Variant`` only
    for its own share (plan_keys makes one per variant of the plan: gigabytes at ImageNet size)."""
    return _share(plan, cache.require_spec(), process_index, num_processes)


def _share(plan: Any, spec: GenerationSpec, process_index: int, num_processes: int) -> tuple[dict[str, Any], int]:
    """:func:`plan_share` under ``spec`` (resolved once by the caller)."""
    columns = getattr(plan, "columns", None)
    if columns is None:  # any iterable of variants
        keys = plan_keys(plan, spec)
        return {k: keys[k] for k in shard_keys(keys, process_index, num_processes)}, len(keys)
    import numpy as np

    from ..plan import Variant

    fingerprint = spec.fingerprint
    n = len(columns)
    parts = [variant_digests(fingerprint, *columns.key_inputs_of_rows(np.arange(start, min(n, start + _SHARE_CHUNK))))
             for start in range(0, n, _SHARE_CHUNK)]
    digests = np.concatenate(parts) if parts else np.zeros(0, dtype="S32")
    distinct, first = np.unique(digests, return_index=True)  # sorted, as the hex keys sort
    picked = np.arange(int(process_index), len(distinct), int(num_processes))
    mine = digest_hex(distinct[picked])
    return {key: Variant(*columns.fields(int(row))) for key, row in zip(mine, first[picked])}, int(len(distinct))


def rebase_plan(plan: Any, data_root: str | os.PathLike[str], option: str = "--data-root") -> Any:
    """``plan`` with its image folder moved to ``data_root`` (the plan's sources are paths relative
    to it, as the dataset finds them after a move). Every source is checked first, as the dataset
    checks it: a path inside ``data_root``, a file there, and pixels that match the plan's content
    hash (files whose size and mtime match a :class:`~dalda_aug.plan.records.StatRecord` of an
    earlier check are not decoded again). One line naming ``option`` and the file otherwise."""
    import numpy as np

    from ..plan.records import StatRecord, file_stats

    root = Path(data_root)
    if not root.is_dir():
        raise MissingFileError(f"{option} {root}: no such folder")
    sources = plan.sources()
    if not all(isinstance(source, str) for source in sources):
        raise InputError(f"{option}: the plan's sources are dataset indices, not files of an image folder")
    paths = [str(source_path(root, source).resolve()) for source in sources]  # refuses paths leaving the root
    expected = plan.columns.source_hashes(np.arange(len(sources)))
    record = StatRecord(paths, expected)
    known, stats = record.load(), file_stats(paths)
    unchanged = (known == stats).all(axis=1) & (stats[:, 0] >= 0) if known is not None else np.zeros(len(paths), bool)
    for i in np.flatnonzero(~unchanged):
        if stats[i, 0] < 0:
            raise MissingFileError(f"{option} {root}: the plan's source {sources[i]!r} is not there ({paths[i]})")
        if image_sha256(load_image(paths[i])) != expected[i]:
            raise InputError(f"{option} {root}: {paths[i]} is not the image the plan's source {sources[i]!r} was "
                             "made from (content hash differs); is it the folder the plan was made from?")
    if not unchanged.all():
        record.save_settled(stats)
    plan.config["data_root"] = str(root.resolve())
    return plan


@dataclass
class WarmReport:
    """What one warming process did."""

    planned: int  # distinct images in the plan
    assigned: int  # images of this process's shard
    already_cached: int  # of those, found in the cache
    generated: int  # generated and written by this run
    seconds: float
    process_index: int = 0
    num_processes: int = 1
    shard: str = ""
    verified_removed: int = 0  # corrupt entries removed by verify=True
    bad_entries: int = 0  # cached entries failing their checksums (regenerated)
    generated_elsewhere: int = 0  # written meanwhile by another process warming the same cache

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 4)}

    def summary(self) -> str:
        who = f"process {self.process_index}/{self.num_processes}: " if self.num_processes > 1 else ""
        rate = f" at {self.images_per_second:.2f} images/s" if self.generated else ""
        bad = f", {self.bad_entries} damaged entries regenerated" if self.bad_entries else ""
        elsewhere = f", {self.generated_elsewhere} by another process" if self.generated_elsewhere else ""
        return (f"{who}{self.planned} planned images, {self.assigned} in this shard, {self.already_cached} already "
                f"cached{bad}, {self.generated} generated in {self.seconds:.1f} s{rate}{elsewhere} "
                f"(cache shard {self.shard})")


class WarmInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) while :func:`warm` generated: the images stored until then stay in the cache.

    ``kept``: images of this process's share in the cache (found there, or stored by this run
    before it stopped); ``stored``: of those, written by this run; ``assigned``: the share's size.
    """

    def __init__(self, kept: int, stored: int, assigned: int):
        super().__init__(f"interrupted: {kept} of {assigned} images kept ({stored} written by this run)")
        self.kept, self.stored, self.assigned = kept, stored, assigned


class _Writer:
    """Background threads that encode and store generated images while generation goes on.

    PIL's encoders release the GIL, so ``threads`` writers encode in parallel with each other
    and with the generator; a bounded queue keeps memory flat (the generator waits when the
    writers fall behind).
    """

    def __init__(self, cache: SyntheticCache, max_pending: int, threads: int = 2,
                 on_stored: Callable[[str], None] | None = None):
        self.cache = cache
        self.on_stored = on_stored
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending))
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, name=f"dalda-cache-writer-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            variant, image = item
            try:
                key = self.cache.put(variant, image)
                if self.on_stored is not None:
                    self.on_stored(key)
            except BaseException as exc:  # reported to the generating thread
                self.error = exc

    def put(self, variant: Any, image: Any) -> None:
        self._raise()
        self.queue.put((variant, image))

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            if isinstance(self.error, DaldaError):  # full disk, read-only folder: one line naming it
                raise self.error
            raise RuntimeError(f"writing to the cache failed: {self.error}") from self.error


class _Leases:
    """This process's leases on the keys it is generating (see :meth:`SyntheticCache.claim`),
    renewed by a background thread every third of their lifetime until released."""

    def __init__(self, cache: SyntheticCache, seconds: float):
        self.cache = cache
        self.seconds = float(seconds)
        self.held: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="dalda-warm-leases", daemon=True)
        self.thread.start()

    def claim(self, keys: list[str]) -> list[str]:
        got = self.cache.claim(keys, self.seconds)
        with self.lock:
            self.held.update(got)
        return got

    def release(self, keys: list[str]) -> None:
        with self.lock:
            self.held.difference_update(keys)
        self.cache.release(keys)

    def _renew(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            with self.lock:
                keys = list(self.held)
            if keys:
                try:
                    self.cache.renew(keys, self.seconds)
                except Exception as exc:  # they expire: another process may then take them over
                    log.warning("could not renew the leases of %d keys: %s", len(keys), exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        with self.lock:
            keys = list(self.held)
        if keys:
            try:
                self.release(keys)
            except Exception as exc:  # a full disk (reported by the caller): they expire on their own
                log.debug("could not release the leases of %d keys: %s", len(keys), exc)


def check_dtype_on_device(dtype: str, device: str, what: str = "dtype float16") -> None:
    """float16 cannot generate on the CPU: an :class:`InputError` naming ``what`` (the option that
    asked for it) before anything is written; the one check ``warm`` and ``dalda-aug warm`` make."""
    if dtype == "float16" and device.startswith("cpu"):
        raise InputError(f"{what} cannot generate on the CPU (device {device!r}): use float32 or bfloat16 there, "
                         "or a CUDA device")


def warm(
    plan: Any,
    cache: SyntheticCache,
    *,
    generator: Any = None,
    device: Any = "cpu",
    batch_size: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    images: Any = None,
    verify: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    writer_threads: int = 2,
    lease_seconds: float = 60.0,
) -> WarmReport:
    """Generate the images of ``plan`` that ``cache`` lacks (this process's shard of them).

    Args:
        plan: an :class:`~dalda_aug.plan.AugmentationPlan` (or its folder).
        cache: the target cache; its spec decides the generation settings and keys (a cache
            without one uses the spec recorded in its folder). Pass one whose ``shard`` is this
            process's (the CLI uses ``<host>-<rank>``). The spec is recorded for the plan once
            its first image is stored.
        generator: an ``IPAdapterGenerator`` or a zero-argument factory; default
            ``cache.spec.make_generator(device)``. Only built if something is missing.
        batch_size: requests per generator call (default: the generator's automatic choice).
        process_index, num_processes: this process's share (``accelerate.PartialState``).
        images: for plans whose sources are dataset indices, the dataset they index.
        verify: first decode this shard's cached entries and remove corrupt ones (which are
            then regenerated).
        progress: show a progress bar (images/s, ETA).
        on_batch: called with the running count of generated images after each batch.
        writer_threads: threads encoding and storing images while the generator runs.
        lease_seconds: lifetime of the lease on a batch being generated (renewed while the
            batch runs): how long other processes wait before taking over the keys of a
            process that died; at most :data:`~dalda_aug.cache.leases.LEASE_CAP_SECONDS`.

    ``float16`` on a CPU device is refused (:class:`~dalda_aug.errors.InputError`) before anything
    is written: it cannot generate there. Raises :class:`~dalda_aug.cache.CacheFullError` or
    :class:`~dalda_aug.cache.CacheReadOnlyError` (one line naming the folder) when the cache
    cannot be written; a read-only cache holding every image of the shard warms fine.
    """
    from ..plan import AugmentationPlan

    started = time.perf_counter()
    if not isinstance(plan, AugmentationPlan):
        plan = AugmentationPlan.load(plan)
    spec = cache.resolve_spec(plan)  # once: the keys below, the generator and the record all use it
    if cache.spec is None:
        cache = cache.with_spec(spec)
    if int(num_processes) != num_processes or num_processes < 1 or not 0 <= process_index < num_processes:
        raise InputError(f"need 0 <= process_index < num_processes, got {process_index}/{num_processes}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    cap = _leases.LEASE_CAP_SECONDS
    if not 0 < lease_seconds <= cap:
        raise InputError(f"lease_seconds must be > 0 and at most {cap:g} (dalda_aug.cache.leases.LEASE_CAP_SECONDS), "
                         f"got {lease_seconds!r}")
    if generator is None:
        check_dtype_on_device(spec.dtype, str(device))
    if plan.data_root and images is None:
        if not Path(plan.data_root).is_dir():
            raise MissingFileError(f"the plan's image folder {plan.data_root} is missing; if the images moved, "
                                   "give their new folder: `dalda-aug warm --data-root DIR` (in Python: "
                                   "rebase_plan(plan, DIR)), which checks each source there by its content hash")
        for source in plan.sources():  # every row's path, before anything is generated or written
            if isinstance(source, str):
                source_path(plan.data_root, source)

    mine, planned = _share(plan, spec, process_index, num_processes)
    removed = 0
    if verify:
        before = cache.corrupt_removed
        for key in list(mine):
            cache.get(key)  # decodes; removes a corrupt entry
        removed = cache.corrupt_removed - before
    # What counts as cached must pass what can be checked without reading the image bytes (the
    # header, the metadata checksum, the row's, the file's and the header's sizes agree): a
    # garbage, truncated or missing entry is removed where the folder allows it and regenerated.
    # A changed image byte is left to `cache verify` and to the readers that decode.
    good, bad = cache.check_present(list(mine), remove=True)
    todo = [(key, v) for (key, v), here in zip(mine.items(), good) if not here]  # keys made once, above
    report = WarmReport(
        planned=planned, assigned=len(mine), already_cached=len(mine) - len(todo), generated=0, seconds=0.0,
        process_index=int(process_index), num_processes=int(num_processes), shard=cache.shard,
        verified_removed=removed, bad_entries=len(bad),
    )
    if not todo:
        if mine:  # every image of this share is there: record the spec they were made with (no-op if recorded)
            try:
                cache.record_spec(plan)
            except CacheReadOnlyError:
                log.warning("the cache folder %s is read-only and holds no spec record for this plan: readers "
                            "need the generation options", cache.directory)
        report.seconds = time.perf_counter() - started
        return report

    if not cache.writable():  # before any model loads (the spec is recorded with the first image stored)
        raise CacheReadOnlyError(f"the cache folder {cache.directory} is read-only: cannot store the {len(todo)} "
                                 "missing images")
    cache.check_shard()  # the shard it writes: a planted one (a symlink out of the cache, a schema that is code)

    from tqdm.auto import tqdm

    from ..generators.base import GenerationRequest

    # Group by source: each reference image is loaded (and embedded) once.
    order = {source: i for i, source in enumerate(plan.sources())}
    todo.sort(key=lambda kv: (order.get(kv[1].source, len(order)), kv[1].variant))
    from ..plan.sources import SourceImages

    load_source = SourceImages(plan, images, max_edge=FEATURE_EXTRACTOR_EDGE)
    if generator is None:
        from ..hub import require_hub_models

        require_hub_models(spec.models, spec.config.model_fields())  # one line in seconds, not a minute of retries
        generator = spec.make_generator(device)
    elif not hasattr(generator, "generate"):
        generator = generator()
    if batch_size is None:
        auto = getattr(generator, "auto_batch_size", None)
        batch_size = auto(len(todo)) if auto is not None else min(4, len(todo))

    leases = _Leases(cache, lease_seconds)
    recorded = threading.Event()
    record_lock = threading.Lock()

    written = [0]  # images stored by this run (the writer threads count them)

    def stored(key: str) -> None:
        written[0] += 1
        leases.release([key])
        if not recorded.is_set():  # the first image stored: from now on the spec holds images
            with record_lock:
                if not recorded.is_set():
                    cache.record_spec(plan)
                    recorded.set()

    writer = _Writer(cache, max_pending=2 * batch_size, threads=writer_threads, on_stored=stored)
    desc = f"warming [{process_index + 1}/{num_processes}]" if num_processes > 1 else "warming"
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
               position=process_index if num_processes > 1 else None)
    pending = collections.deque(todo)
    waiting: list[tuple[str, Any]] = []  # leased by another process: written by it, or retaken on expiry
    poll = min(0.5, lease_seconds / 4)
    said_waiting = False
    interrupted = False
    try:
        while pending or waiting:
            if not pending:
                if not said_waiting:  # once, in one line: why nothing moves for a while
                    said_waiting = True
                    longest = cache.leased_for(k for k, _ in waiting)
                    log.warning("warm: waiting for %d keys leased by another process writing the cache shard %s: "
                                "it writes them, or they are taken over when its leases expire (in at most "
                                "%d s unless it renews them)", len(waiting), cache.shard, math.ceil(max(longest, 0.0)))
                time.sleep(poll)
                pending.extend(waiting)
                waiting = []
            candidates = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            claimed = set(leases.claim([k for k, _ in candidates]))
            chunk = []
            for key, variant in candidates:
                if key not in claimed:
                    waiting.append((key, variant))
                elif key in cache:  # another process wrote it since the listing
                    leases.release([key])
                    report.generated_elsewhere += 1
                    bar.update(1)
                else:
                    chunk.append(variant)
            if not chunk:
                continue
            requests = [GenerationRequest.from_variant(v, load_source(v)) for v in chunk]
            for variant, image in zip(chunk, generator.generate(requests, batch_size=batch_size)):
                writer.put(variant, image)
            report.generated += len(chunk)
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(report.generated)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        bar.close()
        try:
            writer.close()  # what was generated before Ctrl-C is stored, then kept
        finally:
            leases.close()
        if interrupted:
            raise WarmInterrupted(report.already_cached + written[0], written[0], report.assigned) from None
    report.seconds = time.perf_counter() - started
    return report
