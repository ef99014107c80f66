"""The synthetic-image cache: generated images on disk, keyed by what fixes their pixels.

:class:`SyntheticCache` is an embedded store (no server) built on `diskcache`_ (SQLite plus
files). It holds one entry per generated image:

* the **key** is a SHA-256 over the generation fingerprint (model locations and revisions,
  dtype, scheduler, steps, CFG weight, size, prompt prefix and negative prompt — see
  :func:`~dalda_aug.generation.generation_fingerprint`) and the variant's prompt, λ, seed and
  source-image content hash. Changing any of them gives a new key, so nothing stale is ever
  served; the n-shot setting and dataset indices are not part of it, so the images of a
  1-shot run are reused by the 2-shot run.
* the **value** is the image, encoded losslessly (by default LZ4-compressed raw RGB, the
  fastest to decode; PNG, WebP or uncompressed raw RGB on request) behind a small header
  with JSON metadata (λ, prompt, seed, CLIPScore, model fingerprint, size, a CRC-32 of the
  encoded bytes). Entries of every format stay readable whatever the cache's current format.

The cache describes itself: :func:`~dalda_aug.warm.warm` records in ``CACHE/specs/`` the
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
  (:class:`_ShardReader`), so a read-only cache (a read-only mount, a published copy) and a
  full disk serve every reader; a write there raises :class:`CacheReadOnlyError` or
  :class:`CacheFullError`, one line naming the folder (and the free space).
* **Checksummed metadata.** Entries carry a CRC-32 of their image bytes and one of their
  metadata (:func:`check_entry`); :meth:`SyntheticCache.stats` and ``warm`` count only entries
  that pass them.
* **Shards are data, not code.** A shard may come from anyone (a shipped cache, a folder named
  like this process's own shard). Every read and write of one accepts only the rows this library
  writes — text keys, values of raw bytes, text or numbers — and treats a row whose key or value
  is pickled as a corrupt entry, counted by :meth:`SyntheticCache.verify` and never unpickled
  (:func:`row_refusal`, applied by :class:`_ShardReader` and by the writing handles' ``Disk``).
  Spec records name their config class, which is looked up in the generator registry, never
  imported; leases last at most :data:`LEASE_CAP_SECONDS` unless renewed.
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

.. _diskcache: https://grantjenks.com/docs/diskcache/
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import struct
import threading
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ._io import read_json_object, write_atomic
from .config import ModelConfig
from .data import class_folder_names
from .errors import (  # the cache's errors live in errors.py; importable from here too
    CacheFullError,
    CacheReadOnlyError,
    CacheStorageError,
    CorruptEntryError,
    DaldaError,
    InputError,
    MissingFileError,
    require,
)

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
    "is_network_filesystem",
    "open_cache_dir",
    "IMAGE_FORMATS",
    "DEFAULT_IMAGE_FORMAT",
    "plan_fingerprint",
    "export_folder_names",
    "row_refusal",
    "LEASE_CAP_SECONDS",
]

log = logging.getLogger(__name__)

KEY_FORMAT = "dalda_aug.cache/1"
IMAGE_FORMATS = ("lz4", "png", "webp", "raw")
# The format new entries are written in unless told otherwise: LZ4-compressed raw RGB decodes
# in ~0.2 ms at 512x512 (PNG: ~10 ms), so a training epoch at p = 0.5 costs about as much as
# one on the real JPEGs (benchmarks/bench_dataset.py), still lossless.
DEFAULT_IMAGE_FORMAT = "lz4"
# Spec records written by warm: CACHE/specs/<spec fingerprint>-<plan fingerprint>.json.
SPECS_DIR = "specs"
SPEC_RECORD_FORMAT = "dalda_aug.cache-spec/1"
SHARD_PREFIX = "shard-"
# Entry layout: magic (8 bytes), layout version (1 byte), metadata length (4 bytes, big
# endian), metadata (UTF-8 JSON), encoded image.
_MAGIC = b"DALDAIMG"
_HEADER = struct.Struct(">8sBI")
_LAYOUT_VERSION = 1
# Persistent counter of corrupt entries removed, kept in each shard under this text key (entry
# keys are 64 hex characters). Before it, the counter's key was a pickled tuple: such a row is
# still recognised, by comparing its bytes, never by unpickling them (_legacy_counter_keys).
_CORRUPT_COUNTER = "dalda_aug:corrupt_removed"
_LEGACY_CORRUPT_COUNTER = ("dalda_aug", "corrupt_removed")
# Leases (warm: "this process is generating that key"), kept in the writer's shard under the text
# key "dalda_aug:lease:<key>", valued with the owner's text, with a diskcache expiry time.
_LEASE_PREFIX = "dalda_aug:lease:"
#: The longest a lease lasts without being renewed (seconds). A lease found with a later expiry
#: (or none), e.g. planted in a shipped shard, counts as expiring this long after it is seen: it is
#: rewritten to do so. ``warm``'s ``lease_seconds`` may not exceed it.
LEASE_CAP_SECONDS = 60.0
# The metadata field holding a CRC-32 of the rest of the metadata (see encode_entry).
_META_CRC = "meta_crc32"
# diskcache's value modes (diskcache.core.MODE_*): bytes/text/number in the row, bytes in a file,
# text in a file, a pickle. This library writes the first three only and never reads the fourth.
_MODE_RAW, _MODE_BINARY, _MODE_TEXT, _MODE_PICKLE = 1, 2, 3, 4
# The value files diskcache names (Disk.filename): two levels of 2 hex digits, 28 hex digits, .val.
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
# Network filesystems on which SQLite's WAL mode and mmap are unsafe.
_NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.juicefs", "9p", "afs", "panfs", "wekafs",
}
# A miss rescans the cache folder for shards created since, at most this often (seconds).
_RESCAN_INTERVAL = 0.5
# Handles inherited through fork() are parked here instead of being closed or garbage-
# collected in the child: SQLite connections must not be used or closed across a fork.
_ABANDONED: list[Any] = []










# ------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSpec:
    """Everything that fixes a generated image's pixels apart from the variant itself.

    ``models`` and ``config`` (a :class:`~dalda_aug.generation.GenerationConfig`, the paper's
    settings when ``None``) and ``dtype`` ("float32", "bfloat16", "float16" or a torch dtype).
    :meth:`key` gives the cache key of a plan variant; :meth:`make_generator` builds the
    generator that produces exactly those images. Small and picklable.
    """

    models: ModelConfig
    config: Any = None
    dtype: Any = "float32"

    def __post_init__(self) -> None:
        from .generators import GenerationConfig, GeneratorConfig, dtype_name as _dtype_name

        if not isinstance(self.models, ModelConfig):
            raise InputError(f"GenerationSpec.models must be a ModelConfig, got {type(self.models).__name__}")
        config = self.config if self.config is not None else GenerationConfig()
        if not isinstance(config, GeneratorConfig):
            raise InputError(f"GenerationSpec.config must be a generator config (GenerationConfig, "
                             f"RealGuidanceConfig, DAFusionConfig, ...), got {type(config).__name__}")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))

    @classmethod
    def of(cls, generator: Any) -> "GenerationSpec":
        """The spec of an :class:`~dalda_aug.generation.IPAdapterGenerator`."""
        return cls(generator.models, generator.config, generator.dtype)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`~dalda_aug.generation.generation_fingerprint` of models, config and dtype."""
        from .generation import generation_fingerprint

        return generation_fingerprint(self.models, self.config, self.dtype)

    def key(self, variant: Any) -> str:
        """The cache key (64 hex characters) of a :class:`~dalda_aug.plan.Variant`."""
        return variant_key(self.fingerprint, variant.prompt, variant.lam, variant.seed, variant.source_sha256)

    def make_generator(self, device: Any = "cpu") -> Any:
        """A (not yet loaded) generator for this spec: the one registered for the config's class
        (:func:`~dalda_aug.generators.register_generator`; e.g. ``GenerationConfig`` ->
        :class:`~dalda_aug.generation.IPAdapterGenerator`)."""
        from .generators import generator_class_for

        cls = generator_class_for(self.config)
        return cls(self.models, self.config, device=device, dtype=self.dtype)

    def describe(self) -> str:
        c = self.config
        return (f"{c.width}x{c.height}, {c.num_inference_steps} {c.scheduler} steps, CFG {c.guidance_scale:g}, "
                f"{self.dtype}, fingerprint {self.fingerprint}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (models, config class and fields, dtype, fingerprint)."""
        import dataclasses

        config_cls = type(self.config)
        return {
            "fingerprint": self.fingerprint,
            "models": self.models.to_dict(),
            "config_class": f"{config_cls.__module__}:{config_cls.__qualname__}",
            "config": dataclasses.asdict(self.config),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> "GenerationSpec":
        """Rebuild a spec written by :meth:`to_dict` (``where`` names the source in errors).

        The record names its config class; it is looked up among the registered generator
        configs (:func:`~dalda_aug.generators.register_generator`), never imported: a name that
        is not registered is an :class:`~dalda_aug.errors.InputError` naming ``where``.
        """
        import dataclasses

        try:
            if not isinstance(data, dict):
                raise InputError(f"a generation spec is a JSON object, got {type(data).__name__}")
            config_cls = _registered_config_class(data.get("config_class", "dalda_aug.generation:GenerationConfig"))
            known = {f.name for f in dataclasses.fields(config_cls)}
            fields = data.get("config") or {}
            if not isinstance(fields, dict):
                raise InputError(f"config must be a JSON object, got {type(fields).__name__}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
            config = config_cls(**values)
            return cls(ModelConfig.from_dict(data["models"]), config, data.get("dtype", "float32"))
        except DaldaError as exc:
            raise InputError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where}: not a readable generation spec ({type(exc).__name__}: {exc})") from None


# The import paths under which the built-in configs were (and are) also reachable; a spec record
# may name a registered config class by any of them (``dalda_aug.generation:GenerationConfig``).
_CONFIG_ALIAS_MODULES = ("dalda_aug.generation", "dalda_aug.real_guidance", "dalda_aug.generators", "dalda_aug")


def _registered_config_class(name: Any) -> Any:
    """The registered generator config class a spec record's ``config_class`` names
    (``"module:Qualname"``), found in the generator registry; nothing is imported by name.
    :class:`~dalda_aug.errors.InputError` for any other name."""
    from .generators import registered_configs

    configs = list(registered_configs().values())
    if isinstance(name, str):
        module, _, qualname = name.partition(":")
        for config_cls in configs:
            if qualname == config_cls.__qualname__ and (
                    module == config_cls.__module__ or module in _CONFIG_ALIAS_MODULES):
                return config_cls
    known = sorted(f"{c.__module__}:{c.__qualname__}" for c in configs)
    raise InputError(f"config class {str(name)[:200]!r} is not a registered generator config (known: {known}); "
                     "nothing is imported by a name a record gives")


def plan_fingerprint(plan: Any) -> str:
    """A short hash of what a plan asks to generate (each variant's source hash, prompt, λ,
    seed), independent of generation settings: names the plan in a cache's spec records."""
    rows = sorted(json.dumps([v.source_sha256, v.prompt, float(v.lam), int(v.seed)], ensure_ascii=False)
                  for v in plan)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]


def variant_key(fingerprint: str, prompt: str, lam: float, seed: int, source_sha256: str) -> str:
    """SHA-256 key of one image: generation fingerprint + prompt + λ + seed + source hash."""
    blob = json.dumps([KEY_FORMAT, fingerprint, prompt, float(lam), int(seed), source_sha256], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _is_entry_key(key: Any) -> bool:
    return isinstance(key, str) and len(key) == 64


class GeneratorFactory:
    """A picklable zero-argument callable that builds the generator of a spec on a device.

    Give it to :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` (``generator=``) so each
    DataLoader worker builds its own generator on first need instead of receiving a model.
    """

    def __init__(self, spec: GenerationSpec, device: Any = "cpu"):
        if not isinstance(spec, GenerationSpec):
            raise InputError(f"spec must be a GenerationSpec, got {type(spec).__name__}")
        self.spec = spec
        self.device = str(device)

    def __call__(self) -> Any:
        return self.spec.make_generator(self.device)

    def __repr__(self) -> str:
        return f"GeneratorFactory(device={self.device!r}, fingerprint={self.spec.fingerprint!r})"


# ------------------------------------------------------------------------------------------
# entry encoding
# ------------------------------------------------------------------------------------------
def encode_entry(image: Any, metadata: dict[str, Any], image_format: str = DEFAULT_IMAGE_FORMAT, *,
                 png_compress_level: int = 1) -> bytes:
    """Encode ``image`` losslessly behind a header holding ``metadata``.

    ``image_format``: ``"lz4"`` (default: the 8-bit RGB pixels compressed with LZ4's block
    format; ~0.8 of the raw bytes on photos, decoded in well under 1 ms per 512x512 image), ``"png"``,
    ``"webp"`` (lossless; the smallest, slowest to decode) or ``"raw"`` (the pixels,
    uncompressed: decoding is a copy instead of ~9 ms of PNG inflating and unfiltering).
    ``width``, ``height``, ``format``, ``nbytes`` and ``crc32`` (of the encoded image) are
    added to the metadata.
    """
    from .data import to_rgb

    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    rgb = to_rgb(image)
    buf = io.BytesIO()
    if image_format == "png":
        rgb.save(buf, "PNG", compress_level=png_compress_level)
        payload = buf.getvalue()
    elif image_format == "webp":  # lossless; quality/method are the compression effort (least: ~5x faster
        rgb.save(buf, "WEBP", lossless=True, quality=0, method=0, exact=True)  # than the default, ~10 % bigger)
        payload = buf.getvalue()
    elif image_format == "lz4":
        lz4_block = require("lz4.block", "generate", "lz4")
        # LZ4HC level 3: ~0.8 of the raw bytes on photos (the default mode: ~0.87) at ~45 ms per
        # 512x512 encode on one core (writer threads, GIL released); decoding is as fast either way.
        payload = lz4_block.compress(rgb.tobytes(), mode="high_compression", compression=3, store_size=False)
    else:
        payload = rgb.tobytes()
    meta = dict(metadata)
    meta.update(format=image_format, width=rgb.width, height=rgb.height, nbytes=len(payload),
                crc32=zlib.crc32(payload))
    meta.pop(_META_CRC, None)
    meta[_META_CRC] = _meta_checksum(meta)
    meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return _HEADER.pack(_MAGIC, _LAYOUT_VERSION, len(meta_bytes)) + meta_bytes + payload


def _meta_checksum(meta: dict[str, Any]) -> int:
    """CRC-32 of the metadata without its own checksum field, in a canonical JSON form (sorted
    keys, after a JSON round trip so that what was written and what is read hash alike)."""
    rest = json.loads(json.dumps({k: v for k, v in meta.items() if k != _META_CRC}, ensure_ascii=False))
    return zlib.crc32(json.dumps(rest, ensure_ascii=False, sort_keys=True).encode("utf-8"))


def check_entry(blob: Any, key: str | None = None) -> dict[str, Any]:
    """The metadata of an encoded entry after checking its header and checksums, without
    decoding the image (fast: one CRC-32 pass); :class:`CorruptEntryError` if it fails.

    Entries written since the metadata checksum exists carry ``meta_crc32``, a CRC-32 of the
    rest of the metadata: a changed label, class, prompt... is caught like a changed pixel.
    Older entries (no ``meta_crc32``) stay readable because what can be checked still is: the
    image bytes have their CRC-32, and the fields the key is made of (generation fingerprint,
    prompt, λ, seed, source hash) must hash to the key the entry is stored under. Their other
    fields (label, class name, score) are not covered; rewarm to cover them (``cache verify``
    counts such entries as ``unchecked_metadata``).
    """
    meta, _ = _checked_parts(blob, key)
    return meta


def _checked_parts(blob: Any, key: str | None) -> tuple[dict[str, Any], bytes]:
    if isinstance(blob, _Refused):
        raise CorruptEntryError(f"entry refused: {blob.reason}")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptEntryError(f"entry holds a {type(blob).__name__}, not encoded bytes")
    blob = bytes(blob)
    if len(blob) < _HEADER.size:
        raise CorruptEntryError(f"entry is truncated ({len(blob)} bytes)")
    magic, version, meta_len = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _LAYOUT_VERSION:
        raise CorruptEntryError("entry has a bad header")
    start = _HEADER.size + meta_len
    try:
        meta = json.loads(blob[_HEADER.size:start].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntryError(f"entry metadata is unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise CorruptEntryError("entry metadata is not an object")
    payload = blob[start:]
    if len(payload) != meta.get("nbytes") or zlib.crc32(payload) != meta.get("crc32"):
        raise CorruptEntryError(f"entry image bytes fail their checksum ({len(payload)} bytes, "
                                f"expected {meta.get('nbytes')})")
    if key is not None and meta.get("key") not in (None, key):
        raise CorruptEntryError(f"entry is stored under {key} but belongs to {meta.get('key')}")
    if _META_CRC in meta:
        if meta[_META_CRC] != _meta_checksum(meta):
            raise CorruptEntryError("entry metadata fails its checksum (a changed label, class or prompt?)")
    elif key is not None and all(f in meta for f in ("generation_fingerprint", "prompt", "lambda", "seed",
                                                     "source_sha256")):
        try:
            expected = variant_key(str(meta["generation_fingerprint"]), str(meta["prompt"]), float(meta["lambda"]),
                                   int(meta["seed"]), str(meta["source_sha256"]))
        except (TypeError, ValueError):
            expected = None
        if expected != key:
            raise CorruptEntryError("entry metadata (an entry without metadata checksum) does not match its key")
    return meta, payload


def decode_entry(blob: Any, key: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(PIL RGB image, metadata)`` of an encoded entry, or :class:`CorruptEntryError`
    (header, checksums as :func:`check_entry`, then the image itself)."""
    from PIL import Image

    meta, payload = _checked_parts(blob, key)
    if meta.get("format") == "raw":
        width, height = meta.get("width"), meta.get("height")
        if not isinstance(width, int) or not isinstance(height, int) or len(payload) != 3 * width * height:
            raise CorruptEntryError(f"raw entry holds {len(payload)} bytes, not 3 x {width} x {height}")
        return Image.frombytes("RGB", (width, height), payload), meta
    if meta.get("format") == "lz4":
        width, height = meta.get("width"), meta.get("height")
        if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
            raise CorruptEntryError(f"lz4 entry has a bad size {width} x {height}")
        lz4_block = require("lz4.block", "generate", "lz4")
        try:
            pixels = lz4_block.decompress(payload, uncompressed_size=3 * width * height)
        except Exception as exc:  # lz4.block.LZ4BlockError
            raise CorruptEntryError(f"lz4 entry does not decompress: {exc}") from None
        if len(pixels) != 3 * width * height:
            raise CorruptEntryError(f"lz4 entry holds {len(pixels)} pixel bytes, not 3 x {width} x {height}")
        return Image.frombytes("RGB", (width, height), pixels), meta
    try:
        with Image.open(io.BytesIO(payload)) as img:
            img.load()
            image = img if img.mode == "RGB" else img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad data
        raise CorruptEntryError(f"entry image does not decode: {type(exc).__name__}: {exc}") from None
    if image.size != (meta.get("width"), meta.get("height")):
        raise CorruptEntryError(f"entry image is {image.size}, metadata says {meta.get('width')}x{meta.get('height')}")
    return image, meta


@dataclass
class CachedImage:
    """A decoded cache entry."""

    key: str
    image: Any  # PIL.Image.Image (RGB)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def lam(self) -> float:
        return float(self.metadata["lambda"])

    @property
    def prompt(self) -> str:
        return str(self.metadata["prompt"])


# ------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------
def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def default_shard_name(rank: int | None = None) -> str:
    """``<host>-<rank>``: the shard this process writes to (rank: argument, ``$RANK`` or 0)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    return f"{_sanitize(socket.gethostname())}-{int(rank)}"


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


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_lease_seconds(seconds: float) -> float:
    if not 0 < seconds <= LEASE_CAP_SECONDS:
        raise InputError(f"a lease lasts more than 0 and at most {LEASE_CAP_SECONDS:g} s (LEASE_CAP_SECONDS), "
                         f"got {seconds!r}")
    return float(seconds)


# ------------------------------------------------------------------------------------------
# what a shard row may be: the one rule every read and write of a shard applies
# ------------------------------------------------------------------------------------------
class _Refused:
    """What a read gives for a row this library refuses to deserialise: decoding it raises
    :class:`CorruptEntryError` with :attr:`reason` (see :func:`_checked_parts`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<refused cache row: {self.reason}>"


def row_refusal(raw: Any, mode: Any, filename: Any) -> str | None:
    """Why a diskcache row (its ``raw``, ``mode`` and ``filename`` columns) is refused, or None.

    A shard is data written by whoever made it: a cache shipped by someone else, or one whose
    folder is named like this process's own shard. This library writes keys raw (text) and values
    raw (bytes, text, numbers in the row) or as bytes/text in a value file named by diskcache; a
    row that says its key (``raw = 0``) or value (mode 4) is pickled would run code when loaded,
    so it is never deserialised: reads treat it as a corrupt entry. A value file whose name is
    not one diskcache gives (an absolute path, ``..``) is refused too: it would be read, and on
    removal deleted, outside the shard.
    """
    if not raw:
        return "its key is stored pickled (diskcache raw = 0): refused, never unpickled"
    if mode == _MODE_PICKLE:
        return "its value is stored pickled (diskcache mode 4): refused, never unpickled"
    if mode not in (_MODE_RAW, _MODE_BINARY, _MODE_TEXT):
        return f"its value has an unknown storage mode {mode!r}"
    if mode != _MODE_RAW and not (isinstance(filename, str) and _VALUE_FILE.fullmatch(filename)):
        return f"its value file name {str(filename)[:80]!r} is not one diskcache writes"
    return None


@functools.lru_cache(maxsize=None)
def _legacy_counter_keys() -> frozenset[bytes]:
    """The bytes older versions stored as the corrupt-entry counter's key (a pickled tuple,
    as diskcache's ``Disk.put`` writes it for any protocol): recognised by comparison only."""
    import pickle  # pickle.dumps of a constant tuple of strings: nothing is ever loaded
    import pickletools

    return frozenset(pickletools.optimize(pickle.dumps(_LEGACY_CORRUPT_COUNTER, protocol=p))
                     for p in range(pickle.HIGHEST_PROTOCOL + 1))


@functools.lru_cache(maxsize=None)
def _safe_disk() -> Any:
    """A ``diskcache.Disk`` that never pickles or unpickles (the writing handles use it).

    Keys and values this library writes are text, bytes and numbers, which diskcache stores raw;
    anything it would pickle is refused on writing (``TypeError``) and a pickled row met while
    reading (diskcache's own get, incr, cull paths) raises :class:`CorruptEntryError` instead
    of being loaded. Value files are removed only under the names diskcache gives them.
    """
    diskcache = require("diskcache", "generate")

    class SafeDisk(diskcache.Disk):  # type: ignore[misc,name-defined]
        def put(self, key: Any) -> tuple[Any, bool]:
            db_key, raw = super().put(key)  # pickle.dumps only: a key it cannot store raw is refused
            if not raw:
                raise TypeError(f"dalda_aug.cache stores text, bytes and number keys only, not "
                                f"{type(key).__name__} (it never pickles)")
            return db_key, raw

        def get(self, key: Any, raw: Any) -> Any:
            reason = row_refusal(raw, _MODE_RAW, None)
            if reason is not None:
                raise CorruptEntryError(f"a cache row: {reason}")
            return super().get(key, raw)

        def store(self, value: Any, read: Any, key: Any = diskcache.core.UNKNOWN) -> Any:
            kind = type(value)
            if not read and not (kind in (bytes, str, float)
                                 or (kind is int and -(2**63) <= value < 2**63)):
                raise TypeError(f"dalda_aug.cache stores bytes, text and numbers only, not {kind.__name__} "
                                "(it never pickles)")
            return super().store(value, read, key=key)

        def fetch(self, mode: Any, filename: Any, value: Any, read: Any) -> Any:
            reason = row_refusal(True, mode, filename)
            if reason is not None:
                raise CorruptEntryError(f"a cache value: {reason}")
            return super().fetch(mode, filename, value, read)

        def remove(self, file_path: Any) -> Any:
            if not (isinstance(file_path, str) and _VALUE_FILE.fullmatch(file_path)):
                log.warning("not removing %r: not a value file name diskcache writes", str(file_path)[:80])
                return None
            return super().remove(file_path)

    return SafeDisk


class _ShardReader:
    """Read-only access to one shard (its SQLite file and value files) that never writes.

    Opening a ``diskcache.Cache`` writes (tables, settings, journal mode), which fails on a
    read-only folder and on a full disk; every read goes through this instead. The database is
    opened with SQLite's ``mode=ro``, which sees what live writers commit (through the WAL).
    Where that cannot open — a read-only folder without the WAL's ``-shm`` file, which a
    reader may not create — it is opened ``immutable=1``: nobody can write there anyway.
    It reads diskcache's table layout directly: a row (key, raw=1) holds the entry's bytes in
    ``value`` (mode raw) or names the file holding them (mode binary); any other row is refused
    (:func:`row_refusal`), never deserialised.
    """

    def __init__(self, path: Path, timeout: float, mmap: bool) -> None:
        self.path = path
        self.timeout = timeout
        self.mmap = mmap
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def _connect(self, uri: str) -> sqlite3.Connection:
        con = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False, isolation_level=None)
        try:
            if not self.mmap:
                con.execute("PRAGMA mmap_size = 0")
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()  # opens the file now
        except sqlite3.Error:
            con.close()
            raise
        return con

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            from urllib.request import pathname2url

            db = "file:" + pathname2url(str(self.path / "cache.db"))
            try:
                con = self._connect(db + "?mode=ro")
            except sqlite3.Error:
                try:
                    con = self._connect(db + "?immutable=1")
                except sqlite3.Error as exc:
                    raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._con().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a shard being created right now
                return []
            raise CacheStorageError(f"cache shard {self.path} cannot be read: {exc}") from None

    def keys(self) -> list[str]:
        return [k for (k,) in self._rows("SELECT key FROM Cache WHERE raw = 1 ORDER BY rowid") if _is_entry_key(k)]

    def __contains__(self, key: str) -> bool:
        return bool(self._rows("SELECT 1 FROM Cache WHERE key = ? AND raw = 1 LIMIT 1", (key,)))

    def get(self, key: str) -> Any:
        """The stored value (normally bytes), None if absent or its value file is gone, or a
        :class:`_Refused` for a row :func:`row_refusal` refuses (decoding reports it as corrupt)."""
        rows = self._rows("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1 "
                          "AND (expire_time IS NULL OR expire_time > ?)", (key, time.time()))
        if not rows:
            return None
        mode, filename, value = rows[0]
        reason = row_refusal(True, mode, filename)
        if reason is not None:
            return _Refused(reason)
        if mode == _MODE_RAW:
            return bytes(value) if isinstance(value, memoryview) else value
        if mode == _MODE_TEXT:
            return _Refused("its value is text, not an encoded image")
        path = self.path / filename
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheStorageError(f"cache file {path} cannot be read: {exc}") from None

    def head(self, key: str, limit: int = 1 << 20) -> dict[str, Any] | None:
        """An entry's metadata read from its header alone (no image bytes, no checksum: use it to
        count or name, never to trust), or None where there is none readable."""
        rows = self._rows("SELECT mode, filename, substr(value, 1, ?) FROM Cache WHERE key = ? AND raw = 1 "
                          "AND (expire_time IS NULL OR expire_time > ?)", (_HEADER.size + limit, key, time.time()))
        if not rows or row_refusal(True, rows[0][0], rows[0][1]) is not None:
            return None
        mode, filename, value = rows[0]
        try:
            if mode == _MODE_BINARY:
                with open(self.path / filename, "rb") as fh:
                    head = fh.read(_HEADER.size)
                    if len(head) < _HEADER.size:
                        return None
                    meta_len = _HEADER.unpack(head)[2]
                    if meta_len > limit:
                        return None
                    head += fh.read(meta_len)
            elif mode == _MODE_RAW and isinstance(value, (bytes, memoryview)):
                head = bytes(value)
            else:
                return None
            magic, version, meta_len = _HEADER.unpack_from(head)
            if magic != _MAGIC or len(head) < _HEADER.size + meta_len:
                return None
            meta = json.loads(head[_HEADER.size:_HEADER.size + meta_len].decode("utf-8"))
        except (OSError, ValueError, struct.error, RecursionError):
            return None
        return meta if isinstance(meta, dict) else None

    def refused_rows(self) -> list[tuple[int, str]]:
        """``(rowid, reason)`` of the live rows that are not entries and that :func:`row_refusal`
        refuses (a pickled key or value): corrupt entries, never deserialised. Entry rows
        (64-character text keys) are not listed: :meth:`get` reports them."""
        found = []
        rows = self._rows("SELECT rowid, key, raw, mode, filename FROM Cache "
                          "WHERE NOT (raw = 1 AND typeof(key) = 'text' AND length(key) = 64) "
                          "AND (raw = 0 OR mode NOT IN (1, 2, 3) OR filename IS NOT NULL) "
                          "AND (expire_time IS NULL OR expire_time > ?) ORDER BY rowid", (time.time(),))
        for rowid, key, raw, mode, filename in rows:
            if not raw and mode == _MODE_RAW and isinstance(key, (bytes, memoryview)) \
                    and bytes(key) in _legacy_counter_keys():
                continue  # an older version's counter: its key compared as bytes, its value a number
            reason = row_refusal(raw, mode, filename)
            if reason is not None:
                found.append((int(rowid), reason))
        return found

    def corrupt_counter(self) -> int:
        count = 0
        for key, mode, value in self._rows("SELECT key, mode, value FROM Cache WHERE (raw = 1 AND key = ?) OR "
                                           "(raw = 0 AND length(key) < 100)", (_CORRUPT_COUNTER,)):
            ours = key == _CORRUPT_COUNTER or (isinstance(key, (bytes, memoryview))
                                               and bytes(key) in _legacy_counter_keys())
            if ours and mode == _MODE_RAW and isinstance(value, int) and value > 0:
                count += value
        return count

    def volume(self) -> int:
        pages = self._rows("PRAGMA page_count")
        page_size = self._rows("PRAGMA page_size")
        size = self._rows("SELECT value FROM Settings WHERE key = 'size'")
        return int(pages[0][0] * page_size[0][0] if pages and page_size else 0) + int(size[0][0] if size else 0)

    def close(self) -> None:
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()
        self._local = threading.local()


class SyntheticCache:
    """Generated images on disk, keyed by :class:`GenerationSpec` + variant (see module doc).

    Args:
        directory: the cache folder (created on first write); holds ``shard-*/`` sub-folders.
        spec: the generation settings this cache serves; they turn plan variants into keys
            (:meth:`key`, ``variant`` arguments). ``None`` (default): the spec ``warm``
            recorded in the folder (:meth:`resolve_spec`) — the only one, or the one recorded
            for the plan in use. Low-level methods take keys and need no spec.
        image_format: ``"lz4"`` (default), ``"png"``, ``"webp"`` or ``"raw"``, all lossless (see
            :func:`encode_entry`); used for new entries, entries in any format are read.
            ``"lz4"`` is fast enough for a training epoch with p = 0.5 to cost about as much as
            one on the real JPEGs; ``"png"`` and ``"webp"`` take less disk.
        shard: name of the shard this process writes to (``CACHE/shard-<shard>/``); default
            :func:`default_shard_name` (``<host>-<rank>``).
        journal_mode: SQLite journal of the shards: ``"wal"`` (local disks), ``"delete"``
            (network filesystems) or ``None`` to pick from the filesystem type.
        timeout: seconds a writer waits for a SQLite lock before retrying.
        png_compress_level: zlib level of PNG entries (0-9; 1 encodes ~3x faster than 6 for
            ~10 % more bytes; decoding speed hardly depends on it).

    Example::

        cache = SyntheticCache("cache/")    # the spec warm recorded; or SyntheticCache("cache/", spec)
        for variant in plan:
            if variant not in cache: ...
        entry = cache.get(plan[0])          # CachedImage or None
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        spec: GenerationSpec | None = None,
        *,
        image_format: str = DEFAULT_IMAGE_FORMAT,
        shard: str | None = None,
        journal_mode: str | None = None,
        timeout: float = 60.0,
        png_compress_level: int = 1,
    ):
        if spec is not None and not isinstance(spec, GenerationSpec):
            raise InputError(f"spec must be a GenerationSpec or None, got {type(spec).__name__}")
        if image_format not in IMAGE_FORMATS:
            raise InputError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
        if journal_mode not in (None, "wal", "delete", "truncate", "persist"):
            raise InputError(
                f"journal_mode must be 'wal', 'delete', 'truncate', 'persist' or None, got {journal_mode!r}")
        if not 0 <= int(png_compress_level) <= 9:
            raise InputError(f"png_compress_level must be in 0..9, got {png_compress_level!r}")
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"cache directory {self.directory} exists and is not a folder")
        self.spec = spec
        self.image_format = image_format
        self.shard = _sanitize(shard) if shard is not None else default_shard_name()
        self.timeout = float(timeout)
        self.png_compress_level = int(png_compress_level)
        self._journal_mode = journal_mode
        #: Corrupt entries this process found and removed.
        self.corrupt_removed = 0
        self._recorded: list[tuple[GenerationSpec, str | None]] | None = None
        self._resolved: GenerationSpec | None = None  # resolve_spec() without a plan, once found
        self._reset_handles()

    # -- per-process state ------------------------------------------------------------------
    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[str, Any] = {}  # shard name -> diskcache.Cache (writing)
        self._shard_readers: dict[str, _ShardReader] = {}  # shard name -> reader (never writes)
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
        for name in ("_pid", "_handles", "_shard_readers", "_owner", "_known", "_scanned_at", "_network",
                     "_recorded", "_resolved"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._recorded = None
        self._resolved = None
        self._reset_handles()

    def __repr__(self) -> str:
        fp = self.spec.fingerprint if self.spec is not None else None
        return (f"SyntheticCache({str(self.directory)!r}, format={self.image_format!r}, shard={self.shard!r}, "
                f"fingerprint={fp!r})")

    def __enter__(self) -> "SyntheticCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's handles (they reopen on next use)."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
            for reader in self._shard_readers.values():
                reader.close()
        self._reset_handles()

    def _settings(self) -> dict[str, Any]:
        if self._network is None:
            self._network = is_network_filesystem(self.directory)
        journal = self._journal_mode or ("delete" if self._network else "wal")
        return dict(
            eviction_policy="none",  # never evict: a full disk is an error, not a silent loss
            size_limit=2**62,
            cull_limit=0,
            statistics=0,
            sqlite_journal_mode=journal,
            sqlite_mmap_size=0 if self._network else 2**26,
        )

    def writable(self) -> bool:
        """Whether this process may write in the cache folder (or where it would be created)."""
        return os.access(_existing(self.directory), os.W_OK)

    def free_bytes(self) -> int:
        """Free space on the cache folder's filesystem, in bytes."""
        return int(shutil.disk_usage(_existing(self.directory)).free)

    def _storage_error(self, exc: BaseException, doing: str) -> CacheStorageError:
        """One line naming the folder: read-only, full, or another write failure."""
        if isinstance(exc, CacheStorageError):
            return exc
        text = str(exc).lower()
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or "no space" in text:
            try:
                free = _human_bytes(self.free_bytes())
            except OSError:
                free = "unknown"
            return CacheFullError(
                f"the cache folder {self.directory} is full ({free} free on its filesystem): {doing} failed; "
                "free some space (or use another folder) and rerun: what was written is kept")
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text \
                or not self.writable():
            return CacheReadOnlyError(f"the cache folder {self.directory} is read-only: cannot {doing}")
        return CacheStorageError(f"cannot {doing} in the cache folder {self.directory}: {type(exc).__name__}: {exc}")

    def _open(self, name: str) -> Any:
        """The diskcache handle of shard ``name``, for writing (opening one writes)."""
        self._check_process()
        handle = self._handles.get(name)
        if handle is None:
            diskcache = require("diskcache", "generate")
            path = self.directory / f"{SHARD_PREFIX}{name}"
            try:
                # The SafeDisk never pickles nor unpickles: the shard may have been made by anyone.
                handle = diskcache.Cache(str(path), timeout=self.timeout, disk=_safe_disk(), **self._settings())
            except (OSError, sqlite3.Error) as exc:
                raise self._storage_error(exc, f"open the shard {path.name} for writing") from None
            self._handles[name] = handle
            if name not in self._known:  # e.g. our own shard, created by this write
                self._known = sorted([*self._known, name], key=lambda n: (n != self.shard, n))
        return handle

    def _scan(self, force: bool = False) -> list[str]:
        """Names of the shards on disk (rescanned at most every 0.5 s unless ``force``)."""
        self._check_process()
        now = time.monotonic()
        if force or now - self._scanned_at >= _RESCAN_INTERVAL:
            names = []
            if self.directory.is_dir():
                for entry in os.scandir(self.directory):
                    if entry.name.startswith(SHARD_PREFIX) and os.path.isfile(os.path.join(entry.path, "cache.db")):
                        names.append(entry.name[len(SHARD_PREFIX):])
            self._known = sorted(names, key=lambda n: (n != self.shard, n))
            self._scanned_at = now
        return self._known

    def shard_names(self) -> list[str]:
        """Every shard in the cache folder (this process's own first)."""
        return list(self._scan(force=True))

    def _reader(self, name: str) -> _ShardReader:
        self._check_process()
        reader = self._shard_readers.get(name)
        if reader is None:
            if self._network is None:
                self._network = is_network_filesystem(self.directory)
            reader = _ShardReader(self.directory / f"{SHARD_PREFIX}{name}", self.timeout, mmap=not self._network)
            self._shard_readers[name] = reader
        return reader

    def _readers(self, force_scan: bool = False) -> Iterator[tuple[str, _ShardReader]]:
        for name in self._scan(force_scan):
            yield name, self._reader(name)

    # -- the generation specs the cache describes itself with --------------------------------
    def record_spec(self, plan: Any = None, spec: GenerationSpec | None = None) -> Path:
        """Record in ``CACHE/specs/`` that images of ``plan`` are written with ``spec``
        (default: this cache's); :func:`~dalda_aug.warm.warm` calls it once its first image
        is stored, so a run that writes nothing leaves no record. One small JSON file
        per (spec, plan), written atomically: concurrent warmers writing the same record are
        safe, and copying ``specs/`` along with the shards merges caches."""
        spec = spec if spec is not None else self.spec
        if spec is None:
            raise InputError("record_spec needs a GenerationSpec (this cache has none)")
        record: dict[str, Any] = {"format": SPEC_RECORD_FORMAT, "spec": spec.to_dict(), "plan": None}
        plan_fp = "any"
        if plan is not None:
            plan_fp = plan_fingerprint(plan)
            record["plan"] = {"fingerprint": plan_fp, "images": len(plan),
                              "data_root": getattr(plan, "data_root", None)}
        folder = self.directory / SPECS_DIR
        path = folder / f"{spec.fingerprint}-{plan_fp}.json"
        text = json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        try:
            if path.read_text(encoding="utf-8") == text:
                return path  # already recorded: nothing to write (a read-only cache stays usable)
        except (OSError, UnicodeDecodeError):
            pass
        try:
            write_atomic(path, text)
        except OSError as exc:
            raise self._storage_error(exc, f"record the generation spec in {SPECS_DIR}/") from None
        self._recorded = None
        self._resolved = None
        return path

    def recorded_specs(self, plan: Any = None) -> list[GenerationSpec]:
        """The specs recorded in the cache folder (by fingerprint), or those recorded for ``plan``."""
        records = self._read_records()
        wanted = plan_fingerprint(plan) if plan is not None else None
        found: dict[str, GenerationSpec] = {}
        for spec, plan_fp in records:
            if wanted is None or plan_fp == wanted:
                found.setdefault(spec.fingerprint, spec)
        return list(found.values())

    def _read_records(self) -> list[tuple[GenerationSpec, str | None]]:
        if self._recorded is None:
            records = []
            folder = self.directory / SPECS_DIR
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    data = read_json_object(path, "spec record")
                except (OSError, DaldaError) as exc:
                    raise InputError(f"{exc}; delete it and rerun warm") from None
                if data.get("format") != SPEC_RECORD_FORMAT:
                    raise InputError(f"{path}: not a spec record of format {SPEC_RECORD_FORMAT!r}")
                spec = GenerationSpec.from_dict(data.get("spec") or {}, str(path))
                plan = data.get("plan") or {}
                records.append((spec, plan.get("fingerprint") if isinstance(plan, dict) else None))
            self._recorded = records
        return list(self._recorded)

    def resolve_spec(self, plan: Any = None) -> GenerationSpec:
        """The spec to read ``plan``'s images with.

        This cache's explicit spec; else the only one recorded in the folder; else, of the
        recorded specs, the only one that holds images (of ``plan``, when given: its keys for
        the plan are in the cache), so a spec recorded by a run that wrote nothing is passed
        over; else, among those (or all, when none holds any), the only one recorded for
        ``plan``; else an :class:`~dalda_aug.errors.InputError` listing what the folder holds.
        """
        if self.spec is not None:
            return self.spec
        specs = self.recorded_specs()
        if len(specs) == 1:
            return specs[0]
        if not specs:
            where = "does not exist" if not self.directory.is_dir() else "records no generation spec"
            raise InputError(
                f"the cache folder {self.directory} {where}: give the spec the images were made with "
                "(SyntheticCache(dir, GenerationSpec(...))) or fill the folder with `dalda-aug warm`")
        if plan is None:
            if self._resolved is None:
                counts = self._entries_per_fingerprint({s.fingerprint for s in specs}, stop_at_one=True)
                holding = [s for s in specs if counts.get(s.fingerprint)]
                if len(holding) != 1:
                    listing = "; ".join(s.describe() for s in specs)
                    held = "none holds images" if not holding else f"{len(holding)} of them hold images"
                    raise InputError(
                        f"the cache folder {self.directory} records {len(specs)} generation specs ({listing}), "
                        f"{held} and no plan says which one to use: pass the spec explicitly "
                        "(SyntheticCache(dir, spec)), or forget the ones not wanted (`dalda-aug cache specs --forget`)")
                self._resolved = holding[0]
            return self._resolved
        present = self.keys()
        cached = {s.fingerprint: len({s.key(v) for v in plan} & present) for s in specs}
        holding = [s for s in specs if cached[s.fingerprint]]
        if len(holding) == 1:
            return holding[0]
        mine = {s.fingerprint for s in self.recorded_specs(plan)}
        among = holding or specs
        chosen = [s for s in among if s.fingerprint in mine]
        if len(chosen) == 1:
            return chosen[0]
        listing = "; ".join(f"{s.describe()}: {cached[s.fingerprint]} images of this plan" for s in specs)
        if holding:
            why = f"{len(holding)} of them hold images of this plan, and {'several' if chosen else 'none'} of those " \
                  "are recorded for it"
        else:
            why = f"none holds images of this plan and {'several' if chosen else 'none'} of them are recorded for it"
        raise InputError(
            f"the cache folder {self.directory} records {len(specs)} generation specs ({listing}); {why}: "
            "pass the spec explicitly (SyntheticCache(dir, spec))")

    def _entries_per_fingerprint(self, wanted: set[str] | None = None, *, stop_at_one: bool = False
                                 ) -> dict[str, int]:
        """``{generation fingerprint: entries}`` read from the entries' headers (no image bytes;
        counts, not checks). With ``stop_at_one``, reading stops once each of ``wanted`` was seen."""
        counts: dict[str, int] = {}
        seen: set[str] = set()
        for _, reader in self._readers(force_scan=True):
            for key in reader.keys():
                if key in seen:
                    continue
                meta = reader.head(key)
                fingerprint = meta.get("generation_fingerprint") if meta is not None else None
                if not isinstance(fingerprint, str) or (wanted is not None and fingerprint not in wanted):
                    continue
                seen.add(key)
                counts[fingerprint] = counts.get(fingerprint, 0) + 1
                if stop_at_one and wanted is not None and wanted <= set(counts):
                    return counts
        return counts

    def spec_summary(self, plan: Any = None) -> list[dict[str, Any]]:
        """Each recorded spec: ``{"fingerprint", "description", "plans"`` (the plan
        fingerprints it is recorded for), ``"entries"`` (entries made with it, by their
        headers)``}``, with ``plan`` also ``"plan_images"`` and ``"plan_cached"`` (its keys for
        the plan, and how many of them the cache holds)."""
        records = self._read_records()
        counts = self._entries_per_fingerprint()
        present = self.keys() if plan is not None else set()
        summary: dict[str, dict[str, Any]] = {}
        for spec, plan_fp in records:
            row = summary.setdefault(spec.fingerprint, {
                "fingerprint": spec.fingerprint, "description": spec.describe(), "plans": [],
                "entries": counts.get(spec.fingerprint, 0)})
            if plan_fp is not None and plan_fp not in row["plans"]:
                row["plans"].append(plan_fp)
            if plan is not None and "plan_images" not in row:
                keys = {spec.key(v) for v in plan}
                row.update(plan_images=len(keys), plan_cached=len(keys & present))
        return list(summary.values())

    def forget_spec(self, fingerprint: str) -> list[Path]:
        """Delete the records of the spec with ``fingerprint`` from ``CACHE/specs/`` (its entries
        stay); returns the files removed. :class:`~dalda_aug.errors.InputError` when none is
        recorded under it."""
        if not (isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{16}", fingerprint)):
            raise InputError(f"a spec fingerprint is 16 hex digits, got {str(fingerprint)[:80]!r}")
        folder = self.directory / SPECS_DIR
        paths = sorted(folder.glob(f"{fingerprint}-*.json")) if folder.is_dir() else []
        if not paths:
            known = sorted({s.fingerprint for s in self.recorded_specs()}) if folder.is_dir() else []
            raise InputError(f"no spec with fingerprint {fingerprint} is recorded in {folder} (recorded: {known})")
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._storage_error(exc, f"remove the spec record {path.name}") from None
        self._recorded = None
        self._resolved = None
        return paths

    def with_spec(self, spec: GenerationSpec) -> "SyntheticCache":
        """The same cache folder and settings, serving ``spec``."""
        if not isinstance(spec, GenerationSpec):
            raise InputError(f"spec must be a GenerationSpec, got {type(spec).__name__}")
        return SyntheticCache(self.directory, spec, image_format=self.image_format, shard=self.shard,
                              journal_mode=self._journal_mode, timeout=self.timeout,
                              png_compress_level=self.png_compress_level)

    # -- keys -----------------------------------------------------------------------------
    def _require_spec(self) -> GenerationSpec:
        return self.resolve_spec()

    def key(self, variant: Any) -> str:
        """Cache key of a plan variant (needs :attr:`spec`); a ``str`` key is returned as is."""
        if isinstance(variant, str):
            return variant
        return self._require_spec().key(variant)

    def keys(self, shard: str | None = None) -> set[str]:
        """Every entry key in every shard (or in the one named ``shard``)."""
        found: set[str] = set()
        for name, reader in self._readers(force_scan=True):
            if shard is None or name == shard:
                found.update(reader.keys())
        return found

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, variant_or_key: Any) -> bool:
        key = self.key(variant_or_key)
        if any(key in reader for _, reader in self._readers()):
            return True
        return any(key in reader for _, reader in self._readers(force_scan=True))

    def missing(self, variants: Iterable[Any]) -> list[Any]:
        """The variants (or keys) without an entry, in order (one key listing, no decoding)."""
        present = self.keys()
        return [v for v in variants if self.key(v) not in present]

    # -- read ------------------------------------------------------------------------------
    def get(self, variant_or_key: Any) -> CachedImage | None:
        """The decoded entry, or ``None`` if absent; corrupt entries are removed and give ``None``."""
        # Shards created by other processes are picked up by the periodic rescan of _scan().
        return self._lookup(self.key(variant_or_key), force_scan=False)

    def get_image(self, variant_or_key: Any) -> Any:
        """The PIL image of an entry, or ``None``."""
        entry = self.get(variant_or_key)
        return None if entry is None else entry.image

    def _lookup(self, key: str, force_scan: bool) -> CachedImage | None:
        for name, reader in self._readers(force_scan):
            blob = reader.get(key)
            if blob is None:
                continue
            try:
                image, meta = decode_entry(blob, key)
            except CorruptEntryError as exc:
                self._remove_corrupt(name, key, str(exc))
                continue
            return CachedImage(key, image, meta)
        return None

    def get_raw(self, variant_or_key: Any) -> bytes | None:
        """The encoded entry bytes (header + image) as stored, without decoding."""
        key = self.key(variant_or_key)
        for _, reader in self._readers(force_scan=True):
            blob = reader.get(key)
            if blob is not None:
                return bytes(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else None
        return None

    def _remove_corrupt(self, shard: str, key: str, reason: str, *, strict: bool = False) -> bool:
        """Delete a corrupt entry; True if done. A read-only or full folder: a warning (the
        entry is still never returned), or with ``strict`` a :class:`CacheStorageError`."""
        log.warning("removing corrupt cache entry %s in shard %s: %s", key, shard, reason)
        return self._remove_rows(shard, f"the corrupt entry {key[:16]}",
                                 lambda handle: bool(handle.delete(key, retry=True)), strict=strict)

    def _remove_refused_row(self, shard: str, rowid: int, *, strict: bool = False) -> bool:
        """Delete a row :func:`row_refusal` refuses (by its rowid: its key is never unpickled)."""
        def delete(handle: Any) -> bool:
            with handle.transact(retry=True):
                rows = handle._sql("SELECT filename FROM Cache WHERE rowid = ?", (rowid,)).fetchall()
                handle._sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
            if rows and rows[0][0] is not None:
                handle._disk.remove(rows[0][0])  # SafeDisk: only a value file diskcache named
            return bool(rows)

        return self._remove_rows(shard, f"the refused row {rowid}", delete, strict=strict)

    def _remove_rows(self, shard: str, what: str, delete: Any, *, strict: bool) -> bool:
        try:
            handle = self._open(shard)
            delete(handle)
            self._count_corrupt(handle)
        except Exception as exc:
            error = self._storage_error(exc, f"remove {what}") \
                if isinstance(exc, (OSError, sqlite3.Error)) else exc
            if strict:
                raise error from None
            log.warning("%s", error)
            return False
        self.corrupt_removed += 1
        return True

    @staticmethod
    def _count_corrupt(handle: Any) -> None:
        """Add one to the shard's persistent counter of corrupt entries removed (a number under a
        text key; whatever else is found there is replaced, never loaded)."""
        with handle.transact(retry=True):
            rows = handle._sql("SELECT mode, value FROM Cache WHERE key = ? AND raw = 1",
                               (_CORRUPT_COUNTER,)).fetchall()
            count = rows[0][1] if rows and rows[0][0] == _MODE_RAW and isinstance(rows[0][1], int) else 0
            handle.set(_CORRUPT_COUNTER, max(count, 0) + 1, retry=True)

    # -- write -----------------------------------------------------------------------------
    def put(self, variant: Any, image: Any, *, metadata: dict[str, Any] | None = None) -> str:
        """Store the image generated for ``variant``; returns its key.

        The entry's metadata records the variant (λ, prompt, seed, score, class, source) and
        the generation and model fingerprints, plus ``metadata``.
        """
        spec = self._require_spec()
        key = spec.key(variant)
        meta = {
            "key": key,
            "lambda": float(variant.lam),
            "prompt": variant.prompt,
            "seed": int(variant.seed),
            "score": float(variant.score),
            "class_name": variant.class_name,
            "label": int(variant.label),
            "source": variant.source,
            "variant": int(variant.variant),
            "source_sha256": variant.source_sha256,
            "generation_fingerprint": spec.fingerprint,
            "model_fingerprint": spec.models.fingerprint(),
            "prompt_prefix": spec.config.prompt_prefix,
            "negative_prompt": spec.config.negative_prompt,
            "dtype": spec.dtype,
            "created": round(time.time(), 3),
        }
        if metadata:
            meta.update(metadata)
        self.put_encoded(key, encode_entry(image, meta, self.image_format, png_compress_level=self.png_compress_level))
        return key

    def put_encoded(self, key: str, blob: bytes) -> None:
        """Store an already encoded entry (from :func:`encode_entry`) under ``key``."""
        if not _is_entry_key(key):
            raise InputError(f"cache keys are 64 hex characters, got {key!r}")
        handle = self._open(self.shard)
        try:
            handle.set(key, blob, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error(exc, f"store entry {key[:16]}") from None

    # -- leases: which process is generating which key -----------------------------------------
    # Leases are read and written with SQL on this process's shard, never through diskcache's
    # get: a lease row is text (key) -> text (owner), and a row that is anything else is nobody's.
    def claim(self, keys: Iterable[str], seconds: float) -> list[str]:
        """Lease ``keys`` to this cache object for ``seconds``; returns those it got (in order).

        A key leased by another process (or another cache object) whose lease has not expired
        is left out; one leased by this object is renewed. Leases live in this process's shard,
        so processes writing the same shard skip each other's work (:func:`~dalda_aug.warm.warm`
        leases each batch before generating it); a killed process's leases simply expire. No
        lease lasts longer than :data:`LEASE_CAP_SECONDS` unless renewed: one found with a later
        expiry (or none) is cut down to expire that long from now.
        """
        seconds = _check_lease_seconds(seconds)
        keys = list(keys)
        handle = self._open(self.shard)
        got: list[str] = []
        try:
            with handle.transact(retry=True):
                now = time.time()
                for key in keys:
                    held = self._lease_row(handle, key, now)
                    if held is None or held[1]:
                        handle.set(_LEASE_PREFIX + key, self._owner, expire=seconds)
                        got.append(key)
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error(exc, "lease keys") from None
        return got

    def renew(self, keys: Iterable[str], seconds: float) -> None:
        """Extend this object's leases of ``keys`` by ``seconds`` from now."""
        self._own_leases(keys, _check_lease_seconds(seconds))

    def release(self, keys: Iterable[str]) -> None:
        """Give back this object's leases of ``keys``."""
        self._own_leases(keys, None)

    def leased_for(self, keys: Iterable[str]) -> float:
        """Seconds until the last of the other processes' live leases on ``keys`` (in this
        process's shard) expires unless renewed: at most :data:`LEASE_CAP_SECONDS`; 0 if none."""
        handle = self._open(self.shard)
        longest = 0.0
        try:
            with handle.transact(retry=True):
                now = time.time()
                for key in keys:
                    held = self._lease_row(handle, key, now)
                    if held is not None and not held[1]:
                        longest = max(longest, held[0] - now)
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error(exc, "read leases") from None
        return longest

    def _lease_row(self, handle: Any, key: str, now: float) -> tuple[float, bool] | None:
        """``(expiry, mine)`` of the live lease on ``key``, or None. Call inside a transaction.

        An expiry further than :data:`LEASE_CAP_SECONDS` from ``now`` (or none) is rewritten to
        ``now`` + the cap: a lease cannot hold a key longer than that without being renewed.
        """
        rows = handle._sql("SELECT rowid, expire_time, mode, value FROM Cache WHERE key = ? AND raw = 1",
                           (_LEASE_PREFIX + key,)).fetchall()
        if not rows:
            return None
        rowid, expire, mode, value = rows[0]
        if mode != _MODE_RAW or not isinstance(value, str):
            return None  # not a lease this library writes (a text owner): nobody's, overwritten
        cap = now + LEASE_CAP_SECONDS
        if not isinstance(expire, (int, float)) or expire > cap:
            handle._sql("UPDATE Cache SET expire_time = ? WHERE rowid = ?", (cap, rowid))
            expire = cap
        if expire <= now:
            return None
        return float(expire), mode == _MODE_RAW and value == self._owner

    def _own_leases(self, keys: Iterable[str], seconds: float | None) -> None:
        handle = self._open(self.shard)
        try:
            with handle.transact(retry=True):
                now = time.time()
                for key in keys:
                    held = self._lease_row(handle, key, now)
                    if held is not None and held[1]:
                        if seconds is None:
                            handle.delete(_LEASE_PREFIX + key)
                        else:
                            handle.set(_LEASE_PREFIX + key, self._owner, expire=seconds)
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error(exc, "update leases") from None

    def delete(self, variant_or_key: Any) -> bool:
        """Remove an entry from every shard; True if one was there."""
        key = self.key(variant_or_key)
        found = False
        for name, reader in list(self._readers(force_scan=True)):
            if key in reader:
                try:
                    found = bool(self._open(name).delete(key, retry=True)) or found
                except (OSError, sqlite3.Error) as exc:
                    raise self._storage_error(exc, f"delete entry {key[:16]}") from None
        return found

    # -- maintenance -------------------------------------------------------------------------
    def iter_entries(self, keys: Iterable[str] | None = None, *, remove_corrupt: bool = True) -> Iterator[CachedImage]:
        """Decode and yield every valid entry (or those of ``keys``), each key once."""
        seen: set[str] = set()
        wanted = set(keys) if keys is not None else None
        for name, reader in list(self._readers(force_scan=True)):
            for key in reader.keys():
                if key in seen or (wanted is not None and key not in wanted):
                    continue
                blob = reader.get(key)
                if blob is None:
                    continue
                try:
                    image, meta = decode_entry(blob, key)
                except CorruptEntryError as exc:
                    if remove_corrupt:
                        self._remove_corrupt(name, key, str(exc))
                    continue
                seen.add(key)
                yield CachedImage(key, image, meta)

    def verify(self, *, remove: bool = False, progress: bool = False) -> dict[str, Any]:
        """Decode every entry; report (and with ``remove`` delete) the bad ones.

        Returns ``{"checked", "ok", "bad": [{"shard", "key", "error"}], "removed"}``. An entry
        whose row exists but whose value file is gone counts as bad, and so does every row that
        is stored pickled (key or value; its ``key`` is given as ``<row N>``): it is never
        unpickled (:func:`row_refusal`).
        """
        from tqdm.auto import tqdm

        report: dict[str, Any] = {"checked": 0, "ok": 0, "bad": [], "removed": 0, "unchecked_metadata": 0}
        for name, reader in list(self._readers(force_scan=True)):
            keys = reader.keys()
            for key in tqdm(keys, desc=f"verifying {name}", unit="img", disable=not progress):
                report["checked"] += 1
                blob = reader.get(key)
                try:
                    if blob is None:
                        raise CorruptEntryError("the entry's value file is missing")
                    _, meta = decode_entry(blob, key)
                    report["unchecked_metadata"] += _META_CRC not in meta
                except CorruptEntryError as exc:
                    report["bad"].append({"shard": name, "key": key, "error": str(exc)})
                    if remove:
                        self._remove_corrupt(name, key, str(exc), strict=True)
                        report["removed"] += 1
                    continue
                report["ok"] += 1
            for rowid, reason in reader.refused_rows():  # pickled keys/values: corrupt, never loaded
                report["checked"] += 1
                report["bad"].append({"shard": name, "key": f"<row {rowid}>", "error": f"row refused: {reason}"})
                if remove:
                    self._remove_refused_row(name, rowid, strict=True)
                    report["removed"] += 1
        return report

    def check_entries(self, keys: Iterable[str] | None = None, *, remove: bool = False
                      ) -> tuple[set[str], list[dict[str, str]]]:
        """Check every entry's (or those of ``keys``) header and checksums without decoding
        images (:func:`check_entry`): ``(good keys, [{"shard", "key", "error"}, ...])``.

        With ``remove``, bad entries are deleted (and counted) where the folder allows it.
        A key with a good copy in some shard is good.
        """
        good: set[str] = set()
        bad: list[dict[str, str]] = []
        wanted = None if keys is None else set(keys)
        for name, reader in list(self._readers(force_scan=True)):
            listed = reader.keys() if wanted is None else [k for k in wanted if k in reader]
            for key in listed:
                if key in good:
                    continue
                blob = reader.get(key)
                try:
                    if blob is None:
                        raise CorruptEntryError("the entry's value file is missing")
                    check_entry(blob, key)
                except CorruptEntryError as exc:
                    bad.append({"shard": name, "key": key, "error": str(exc)})
                    if remove:
                        self._remove_corrupt(name, key, str(exc))
                    continue
                good.add(key)
        return good, [b for b in bad if b["key"] not in good]

    def stats(self, plan: Any = None) -> dict[str, Any]:
        """Entries, bytes on disk, shards, corrupt entries removed; with a plan, its coverage.

        Entries are counted after checking their checksums (no image decoding): ``entries``
        and the plan's ``cached`` count only good ones, ``bad`` the others, rows stored pickled
        included (``cache verify`` names them, ``warm`` regenerates them).
        """
        shards = []
        keys: set[str] = set()
        bad_keys: set[str] = set()
        corrupt = refused = 0
        for name, reader in self._readers(force_scan=True):
            shard_good = 0
            for key in reader.keys():
                blob = reader.get(key)
                try:
                    if blob is None:
                        raise CorruptEntryError("the entry's value file is missing")
                    check_entry(blob, key)
                except CorruptEntryError:
                    bad_keys.add(key)
                    continue
                keys.add(key)
                shard_good += 1
            refused += len(reader.refused_rows())
            corrupt += reader.corrupt_counter()
            shards.append({"name": name, "entries": shard_good, "bytes": reader.volume()})
        result: dict[str, Any] = {
            "directory": str(self.directory),
            "entries": len(keys),
            "bad": len(bad_keys - keys) + refused,
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
            "corrupt_removed": corrupt,
        }
        if plan is not None:
            spec = self.resolve_spec(plan)
            plan_keys = {spec.key(v) for v in plan}
            covered = len(plan_keys & keys)
            result["plan"] = {
                "images": len(plan_keys),
                "cached": covered,
                "missing": len(plan_keys) - covered,
                "coverage": covered / len(plan_keys) if plan_keys else 1.0,
                "fingerprint": spec.fingerprint,
            }
        return result

    def export(self, out: str | os.PathLike[str], plan: Any = None, *, progress: bool = False) -> dict[str, Any]:
        """Write cached images as an image folder ``OUT/<class>/<key16>.png`` + ``OUT/metadata.csv``.

        With a plan, only its images are exported and class folders are the plan's class
        folder names; otherwise every entry, in folders named after its class name.
        """
        from tqdm.auto import tqdm

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        classes = list(plan.config.get("classes") or []) if plan is not None else []
        wanted = None
        if plan is not None:
            spec = self.resolve_spec(plan)
            wanted = {spec.key(v) for v in plan}
        columns = ["path", "key", "class", "label", "class_name", "source", "variant", "prompt", "lambda",
                   "seed", "score", "width", "height", "generation_fingerprint", "model_fingerprint"]
        rows = []
        # Folder names come from files (plan.json, entry metadata) anyone could have written:
        # export_folder_names keeps Unicode, removes separators/".."/control characters and never
        # gives two classes one folder, even on a disk that ignores case or Unicode normalisation;
        # the resolved path must still lie inside OUT. Without a plan, the class names are first
        # read from the entries' headers, so the folders do not depend on the order of entries.
        if classes:
            names = [str(c) for c in classes]
        else:
            names = []
            for _, reader in self._readers(force_scan=True):
                for key in reader.keys() if wanted is None else [k for k in wanted if k in reader]:
                    meta = reader.head(key)
                    names.append(str((meta or {}).get("class_name") or "unknown"))
        folders = export_folder_names(names)
        out_real = os.path.realpath(out)
        for entry in tqdm(self.iter_entries(wanted), desc="exporting", unit="img", disable=not progress):
            meta = entry.metadata
            label = meta.get("label")
            if classes and isinstance(label, int) and 0 <= label < len(classes):
                name = str(classes[label])
            else:
                name = str(meta.get("class_name") or "unknown")
            if name not in folders:  # a class no header gave (written since): distinct from all others
                folders[name] = _distinct_folder(name, export_folder_names([name])[name],
                                                 {_folded(f) for f in folders.values()})
            folder = folders[name]
            rel = Path(folder) / f"{entry.key[:16]}.png"
            target = os.path.realpath(out / rel)
            if os.path.dirname(target) == out_real or not target.startswith(out_real + os.sep):
                raise InputError(f"refusing to export {entry.key[:16]} to {target}: class folder {folder!r} "
                                 f"leads outside {out} (a symbolic link in it?)")
            (out / folder).mkdir(parents=True, exist_ok=True)
            entry.image.save(out / rel, "PNG", compress_level=self.png_compress_level)
            row = {c: meta.get(c, "") for c in columns}
            row.update(path=rel.as_posix(), key=entry.key, **{"class": folder})
            rows.append(row)
        rows.sort(key=lambda r: r["path"])
        with (out / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        missing = len(wanted) - len(rows) if wanted is not None else 0
        return {"exported": len(rows), "out": str(out), "missing": missing}


def _folded(name: str) -> str:
    """``name`` as a disk that ignores case and Unicode normalisation compares it (macOS, Windows)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def export_folder_names(names: Iterable[str]) -> dict[str, str]:
    """``{class name: folder}`` for an export: :func:`~dalda_aug.data.class_folder_names`
    (safe names, Unicode kept, a hash suffix on names that had to change), then every folder
    distinct after Unicode NFC normalisation and case folding too, so that no two classes share a
    folder on a case- or normalisation-insensitive disk (``Cat``/``cat``, NFC/NFD ``café``): in
    such a group every name but the first in sorted order gets a suffix of its own hash.
    Deterministic whatever the order of ``names``."""
    base = class_folder_names(sorted(set(names)))
    result: dict[str, str] = {}
    taken: set[str] = set()
    for name in sorted(base):
        result[name] = _distinct_folder(name, base[name], taken)
    return result


def _distinct_folder(name: str, folder: str, taken: set[str]) -> str:
    """``folder``, or with a suffix of ``name``'s hash, whichever is first not in ``taken``
    (compared after :func:`_folded`); the result is added to ``taken``."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    candidates = [folder, f"{folder}-{digest[:16]}", f"{folder}-{digest}"]
    candidates += [f"{folder}-{digest}-{i}" for i in range(2, len(taken) + 3)]
    chosen = next(c for c in candidates if _folded(c) not in taken)
    taken.add(_folded(chosen))
    return chosen


def open_cache_dir(directory: str | os.PathLike[str]) -> Path:
    """Check that ``directory`` is an existing cache folder (for read-only commands)."""
    path = Path(directory)
    if not path.is_dir():
        raise MissingFileError(f"cache folder not found: {path}")
    return path
