"""The synthetic-image cache: generated images on disk, keyed by what fixes their pixels.

:class:`SyntheticCache` is an embedded store (no server) built on `diskcache`_ (SQLite plus
files). It holds one entry per generated image:

* the **key** is a SHA-256 over the generation fingerprint (model locations and revisions,
  dtype, scheduler, steps, CFG weight, size, prompt prefix and negative prompt — see
  :func:`~dalda_aug.generators.base.generation_fingerprint`) and the variant's prompt, λ, seed and
  source-image content hash. Changing any of them gives a new key, so nothing stale is ever
  served; the n-shot setting and dataset indices are not part of it, so the images of a
  1-shot run are reused by the 2-shot run.
* the **value** is the image, encoded losslessly (by default LZ4-compressed raw RGB, the
  fastest to decode; PNG, WebP or uncompressed raw RGB on request) behind a small header
  with JSON metadata (λ, prompt, seed, CLIPScore, model fingerprint, size, a CRC-32 of the
  encoded bytes). Entries of every format stay readable whatever the cache's current format.

The cache describes itself: :func:`~dalda_aug.cache.warm.warm` records in ``CACHE/specs/`` the
:class:`GenerationSpec` it wrote with and for which plan (:meth:`SyntheticCache.record_spec`),
once its first image is stored, so ``SyntheticCache(directory)`` with no spec finds the plan's
images (:meth:`SyntheticCache.resolve_spec`: a recorded spec that holds none of them is passed
over); an explicit spec still wins. ``dalda-aug cache specs`` lists the records and forgets one.

Guarantees:

* **No silent eviction.** Shards are opened with ``eviction_policy="none"``: diskcache's
  default 1 GB limit with least-recently-stored eviction never applies.
* **Atomic entries.** diskcache writes a large value's file completely before the SQLite row
  that points at it is committed (small values live in the row itself), so a reader sees a
  whole entry or none; a process killed mid-write leaves at most an orphan file, no entry.
* **Corruption is detected, never returned.** An entry whose header, checksum or image fails
  to decode is removed, counted (:attr:`SyntheticCache.corrupt_removed`, and a persistent
  counter reported by :meth:`SyntheticCache.stats`) and reported as a miss, so the caller
  regenerates it.
* **Reads never write.** Shards are read through read-only SQLite connections
  (:class:`~dalda_aug.cache.shards.ShardReader`), so a read-only cache (a read-only mount, a published copy) and a
  full disk serve every reader; a write there raises :class:`CacheReadOnlyError` or
  :class:`CacheFullError`, one line naming the folder (and the free space).
* **Checksummed metadata.** Entries carry a CRC-32 of their image bytes and one of their
  metadata (:func:`check_entry`); :meth:`SyntheticCache.stats` and ``warm`` count only entries
  that pass them.
* **Shards are data, not code.** A shard may come from anyone (a shipped cache, a folder named
  like this process's own shard). Before SQLite or diskcache runs a query on one, its files and
  schema are checked (:func:`~dalda_aug.cache.schema.shard_refusal`: diskcache's tables, indexes,
  triggers and settings only; no view); a shard that fails is refused by name and the others
  serve. Every read and write accepts only the rows this library writes — keys of 64 lowercase
  hex digits, values of raw bytes, text or numbers — and treats any other key, or a row whose key
  or value is pickled, as a corrupt entry, counted by :meth:`SyntheticCache.verify` and never
  unpickled (:func:`row_refusal`, applied by :class:`~dalda_aug.cache.shards.ShardReader` and by
  the writing handles' ``Disk``). Value files are read as data (no symlink, FIFO or device,
  bounded by their row's size), and nothing is written through a symlinked folder.
  Spec records name their config class, which is looked up in the generator registry, never
  imported; leases last at most :data:`~dalda_aug.cache.leases.LEASE_CAP_SECONDS` unless renewed.
* **Process safety.** SQLite locking makes one shard safe for concurrent readers and writers
  on one machine (DataLoader workers, several warmers). Handles are opened lazily in each
  process and reopened after a fork (pid check); a pickled cache carries only its settings.

Sharding and shared filesystems
-------------------------------
SQLite must not be written from several machines through a network filesystem (NFS, Lustre,
GPFS...): its file locks are unreliable there and its WAL mode needs shared memory. So the
cache directory holds *shards*: ``CACHE/shard-<name>/``, each an independent diskcache. A
process writes only to its own shard (by default ``shard-<host>-<rank>``, rank from the
``RANK`` environment variable that ``accelerate``/``torchrun`` set, else 0), and reads all of
them as one cache. ``dalda-aug warm`` under ``accelerate launch`` gives each process its own
shard, so on a shared filesystem no SQLite file is ever written by two machines. Shards on a
network filesystem are opened with a rollback journal instead of WAL and without mmap
(detected from ``/proc/mounts``, or forced with ``journal_mode``). Because keys are content
hashes, shards never conflict: copying ``shard-*`` folders from several caches into one
folder merges them (e.g. warm on node-local disks, then ``rsync`` the shards together).

Layout
------
The package's modules import each other in one direction, bottom first:

* :mod:`~dalda_aug.cache.spec`: :class:`GenerationSpec`, keys (:func:`variant_key`),
  :func:`plan_fingerprint`, :class:`GeneratorFactory`.
* :mod:`~dalda_aug.cache.codecs`: an entry's header and checksums, and the image formats
  (:data:`~dalda_aug.cache.codecs.CODECS`, a registry: :func:`register_codec` adds to it,
  :func:`image_formats` lists its names; a format's option is part of its name, ``jpeg:90``).
* :mod:`~dalda_aug.cache.schema`: what a shard's files and SQLite schema may be, checked before
  any query runs on it.
* :mod:`~dalda_aug.cache.disks`: the disk under the shards (shard names, network filesystems,
  byte counts in words).
* :mod:`~dalda_aug.cache.shards`: every read and write of a shard's SQLite rows (the row rule,
  the never-pickling ``Disk``, the read-only reader).
* :mod:`~dalda_aug.cache.leases`: which process is generating which key.
* :mod:`~dalda_aug.cache.shardset`: the shards of a folder as one store of encoded entries.
* :mod:`~dalda_aug.cache.imagefolder`: the image-folder export (class folder names, writing).
* :mod:`~dalda_aug.cache.specs`: the spec records in ``CACHE/specs/`` (record, list, resolve,
  forget: :class:`SyntheticCache`'s spec methods delegate to its :class:`~dalda_aug.cache.specs.SpecRecords`).
* :mod:`~dalda_aug.cache.store`: :class:`SyntheticCache`.
* :mod:`~dalda_aug.cache.export`: the ``cache export`` formats (image folder, WebDataset, Parquet).

This ``__init__`` only re-exports them, lazily: importing :mod:`dalda_aug.cache` (or one light
module of it, as the command line does for :func:`image_formats`) loads nothing else.

.. _diskcache: https://grantjenks.com/docs/diskcache/
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from ..errors import (  # the cache's errors live in errors.py; importable from here too
    CacheFullError,
    CacheReadOnlyError,
    CacheStorageError,
    CorruptEntryError,
    DaldaError,
    InputError,
    MissingFileError,
    require,
)

if TYPE_CHECKING:
    # Static imports for type checkers (the runtime ones are lazy, below).
    from .codecs import (
        DEFAULT_IMAGE_FORMAT as DEFAULT_IMAGE_FORMAT, IMAGE_FORMATS as IMAGE_FORMATS, check_entry as check_entry,
        decode_entry as decode_entry, encode_entry as encode_entry, image_formats as image_formats,
        register_codec as register_codec,
    )
    from .imagefolder import export_folder_names as export_folder_names
    from .disks import default_shard_name as default_shard_name, is_network_filesystem as is_network_filesystem
    from .shards import SHARD_PREFIX as SHARD_PREFIX, row_refusal as row_refusal
    from .spec import (
        KEY_FORMAT as KEY_FORMAT, GenerationSpec as GenerationSpec, GeneratorFactory as GeneratorFactory, log as log,
        plan_fingerprint as plan_fingerprint, variant_key as variant_key,
    )
    from .specs import SPEC_RECORD_FORMAT as SPEC_RECORD_FORMAT, SPECS_DIR as SPECS_DIR
    from .store import CachedImage as CachedImage, SyntheticCache as SyntheticCache, open_cache_dir as open_cache_dir

__all__ = [
    "SyntheticCache",
    "GenerationSpec",
    "GeneratorFactory",
    "CachedImage",
    "CorruptEntryError",
    "CacheStorageError",
    "CacheReadOnlyError",
    "CacheFullError",
    "check_entry",
    "encode_entry",
    "decode_entry",
    "default_shard_name",
    "variant_key",
    "variant_keys",
    "is_network_filesystem",
    "open_cache_dir",
    "IMAGE_FORMATS",
    "image_formats",
    "register_codec",
    "DEFAULT_IMAGE_FORMAT",
    "plan_fingerprint",
    "export_folder_names",
    "row_refusal",
]

# Public name -> the module (of this package) that defines it.
_EXPORTS = {
    "SyntheticCache": "store",
    "CachedImage": "store",
    "open_cache_dir": "store",
    "GenerationSpec": "spec",
    "GeneratorFactory": "spec",
    "plan_fingerprint": "spec",
    "variant_key": "spec",
    "variant_keys": "spec",
    "KEY_FORMAT": "spec",
    "SPECS_DIR": "specs",
    "SPEC_RECORD_FORMAT": "specs",
    "check_entry": "codecs",
    "encode_entry": "codecs",
    "decode_entry": "codecs",
    "IMAGE_FORMATS": "codecs",
    "image_formats": "codecs",
    "register_codec": "codecs",
    "DEFAULT_IMAGE_FORMAT": "codecs",
    "default_shard_name": "disks",
    "is_network_filesystem": "disks",
    "row_refusal": "shards",
    "SHARD_PREFIX": "shards",
    "log": "spec",
    "export_folder_names": "imagefolder",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
