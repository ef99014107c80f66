"""A cache entry's bytes: the header, the checksums, and the image formats (a registry).

An entry is: magic (8 bytes), layout version (1 byte), metadata length (4 bytes, big endian),
metadata (UTF-8 JSON), encoded image. :data:`CODECS` maps each image format name to its
encoder and decoder; :data:`IMAGE_FORMATS` (the names, in order) and every command-line choice
and benchmark read it. Entries of every format stay readable whatever a cache's current format.

``lz4``, ``png`` and ``raw`` are lossless; ``jpeg`` is lossy (``quality``, default
:data:`DEFAULT_QUALITY`); ``webp`` is lossless unless a ``quality`` is given. A lossy entry
says so in its header (``"lossy": true, "quality": q``). The format is not part of an entry's
key: a key names the generated image, and its entry holds that image exactly or, where lossy
storage was asked for, its lossy encoding.

:func:`check_head` checks what can be checked without the image bytes (the header, the
metadata checksum, the total size the metadata implies); :func:`check_entry` adds the image
bytes' CRC-32 and :func:`decode_entry` the decoding.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable, cast

from ..errors import CorruptEntryError, InputError, require
from .spec import variant_key

__all__ = [
    "ImageCodec",
    "CODECS",
    "IMAGE_FORMATS",
    "DEFAULT_IMAGE_FORMAT",
    "DEFAULT_QUALITY",
    "HEAD_READ",
    "MAGIC",
    "HEADER",
    "LAYOUT_VERSION",
    "META_CRC",
    "Refused",
    "check_image_format",
    "check_quality",
    "check_head",
    "head_length",
    "encode_entry",
    "check_entry",
    "decode_entry",
]

# Entry layout: magic (8 bytes), layout version (1 byte), metadata length (4 bytes, big
# endian), metadata (UTF-8 JSON), encoded image.
MAGIC = b"DALDAIMG"
HEADER = struct.Struct(">8sBI")
LAYOUT_VERSION = 1
# The metadata field holding a CRC-32 of the rest of the metadata (see encode_entry).
META_CRC = "meta_crc32"


# ------------------------------------------------------------------------------------------
# image formats: name -> encoder, decoder
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCodec:
    """One image format of the cache's entries."""

    name: str
    #: ``(RGB PIL image, PNG compression level, quality or None) -> payload bytes``.
    encode: Callable[[Any, int, "int | None"], bytes]
    #: ``(payload bytes, entry metadata) -> RGB PIL image``; :class:`CorruptEntryError` if it fails.
    decode: Callable[[bytes, dict[str, Any]], Any]
    #: What ``--format``'s help says of it.
    note: str = ""
    #: ``quality -> whether the encoding loses information`` (``quality`` None: not given).
    lossy: Callable[["int | None"], bool] = lambda quality: False


def _encode_png(rgb: Any, png_compress_level: int, quality: int | None) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, "PNG", compress_level=png_compress_level)
    return buf.getvalue()


def _encode_webp(rgb: Any, png_compress_level: int, quality: int | None) -> bytes:
    buf = io.BytesIO()
    if quality is None:
        # Lossless; quality/method are the compression effort (least: ~5x faster than the default, ~10 % bigger).
        rgb.save(buf, "WEBP", lossless=True, quality=0, method=0, exact=True)
    else:  # lossy, at this quality (method 4: PIL's default effort)
        rgb.save(buf, "WEBP", lossless=False, quality=int(quality), method=4)
    return buf.getvalue()


def _encode_jpeg(rgb: Any, png_compress_level: int, quality: int | None) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=DEFAULT_QUALITY if quality is None else int(quality))
    return buf.getvalue()


def _encode_lz4(rgb: Any, png_compress_level: int, quality: int | None) -> bytes:
    lz4_block = require("lz4.block", "generate", "lz4")
    # LZ4HC level 3: ~0.8 of the raw bytes on photos (the default mode: ~0.87) at ~45 ms per
    # 512x512 encode on one core (writer threads, GIL released); decoding is as fast either way.
    return cast(bytes, lz4_block.compress(rgb.tobytes(), mode="high_compression", compression=3, store_size=False))


def _encode_raw(rgb: Any, png_compress_level: int, quality: int | None) -> bytes:
    return cast(bytes, rgb.tobytes())


def _decode_raw(payload: bytes, meta: dict[str, Any]) -> Any:
    from PIL import Image

    width, height = meta.get("width"), meta.get("height")
    if not isinstance(width, int) or not isinstance(height, int) or len(payload) != 3 * width * height:
        raise CorruptEntryError(f"raw entry holds {len(payload)} bytes, not 3 x {width} x {height}")
    return Image.frombytes("RGB", (width, height), payload)


def _decode_lz4(payload: bytes, meta: dict[str, Any]) -> Any:
    from PIL import Image

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
    return Image.frombytes("RGB", (width, height), pixels)


def _decode_with_pil(payload: bytes, meta: dict[str, Any]) -> Any:
    """PNG, WebP, JPEG, and an entry whose format names no codec: whatever PIL recognises."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as img:
            img.load()
            image = img if img.mode == "RGB" else img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad data
        raise CorruptEntryError(f"entry image does not decode: {type(exc).__name__}: {exc}") from None
    if image.size != (meta.get("width"), meta.get("height")):
        raise CorruptEntryError(f"entry image is {image.size}, metadata says {meta.get('width')}x{meta.get('height')}")
    return image


# The JPEG quality of jpeg entries when none is given (--quality).
DEFAULT_QUALITY = 95

#: Image format name -> codec, in the order the formats are offered.
CODECS: dict[str, ImageCodec] = {
    "lz4": ImageCodec("lz4", _encode_lz4, _decode_lz4, "fastest to read in training"),
    "png": ImageCodec("png", _encode_png, _decode_with_pil),
    "webp": ImageCodec("webp", _encode_webp, _decode_with_pil, "smallest lossless; lossy with --quality",
                       lossy=lambda quality: quality is not None),
    "raw": ImageCodec("raw", _encode_raw, _decode_raw, "uncompressed"),
    "jpeg": ImageCodec("jpeg", _encode_jpeg, _decode_with_pil, f"lossy, --quality {DEFAULT_QUALITY} by default",
                       lossy=lambda quality: True),
}
IMAGE_FORMATS = tuple(CODECS)
# The format new entries are written in unless told otherwise: LZ4-compressed raw RGB decodes
# in ~0.2 ms at 512x512 (PNG: ~10 ms), so a training epoch at p = 0.5 costs about as much as
# one on the real JPEGs (benchmarks/bench_dataset.py), still lossless.
DEFAULT_IMAGE_FORMAT = "lz4"


def check_image_format(image_format: Any) -> str:
    """``image_format`` if it names one of :data:`IMAGE_FORMATS`, else an :class:`InputError`."""
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    return str(image_format)


def check_quality(quality: Any, image_format: str | None = None) -> int | None:
    """``quality`` (None, or an integer in 1..100) if valid for ``image_format``, else an
    :class:`InputError`: a quality is refused for a format it does not apply to (lz4, png, raw)."""
    if quality is None:
        return None
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"quality must be an integer in 1..100, got {quality!r}")
    if image_format is not None and not CODECS[check_image_format(image_format)].lossy(quality):
        lossy = [name for name, codec in CODECS.items() if codec.lossy(quality)]
        raise InputError(f"quality applies to the lossy formats ({', '.join(lossy)}), not to {image_format} "
                         "(lossless)")
    return int(quality)


# ------------------------------------------------------------------------------------------
# entries
# ------------------------------------------------------------------------------------------
class Refused:
    """What a shard read gives for a row this library refuses to deserialise: decoding it raises
    :class:`CorruptEntryError` with :attr:`reason` (see :func:`check_entry`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<refused cache row: {self.reason}>"


def encode_entry(image: Any, metadata: dict[str, Any], image_format: str = DEFAULT_IMAGE_FORMAT, *,
                 png_compress_level: int = 1, quality: int | None = None) -> bytes:
    """Encode ``image`` behind a header holding ``metadata``.

    ``image_format``: ``"lz4"`` (default: the 8-bit RGB pixels compressed with LZ4's block
    format; ~0.8 of the raw bytes on photos, decoded in well under 1 ms per 512x512 image), ``"png"``,
    ``"webp"`` (lossless without ``quality``: the smallest lossless, slowest to decode; lossy
    with one), ``"raw"`` (the pixels, uncompressed: decoding is a copy instead of ~9 ms of PNG
    inflating and unfiltering) or ``"jpeg"`` (lossy, ``quality`` default :data:`DEFAULT_QUALITY`).
    ``quality`` (1..100) is refused for the lossless formats.
    ``width``, ``height``, ``format``, ``nbytes`` and ``crc32`` (of the encoded image) are
    added to the metadata; for a lossy encoding also ``lossy`` (True) and ``quality``.
    """
    from ..data import to_rgb

    check_image_format(image_format)
    check_quality(quality, image_format)
    codec = CODECS[image_format]
    rgb = to_rgb(image)
    payload = codec.encode(rgb, png_compress_level, quality)
    meta = dict(metadata)
    meta.pop("lossy", None)
    meta.pop("quality", None)
    if codec.lossy(quality):
        meta.update(lossy=True, quality=DEFAULT_QUALITY if quality is None else int(quality))
    meta.update(format=image_format, width=rgb.width, height=rgb.height, nbytes=len(payload),
                crc32=zlib.crc32(payload))
    meta.pop(META_CRC, None)
    meta[META_CRC] = _meta_checksum(meta)
    meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return HEADER.pack(MAGIC, LAYOUT_VERSION, len(meta_bytes)) + meta_bytes + payload


def _meta_checksum(meta: dict[str, Any]) -> int:
    """CRC-32 of the metadata without its own checksum field, in a canonical JSON form (sorted
    keys, after a JSON round trip so that what was written and what is read hash alike)."""
    rest = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_CRC}, ensure_ascii=False))
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


# Bytes read first from the start of an entry to check its header (:func:`check_head`): the
# header and the metadata of a usual entry (~700 bytes); a longer metadata costs a second read.
HEAD_READ = 1024
# The longest metadata an entry may have (a header saying more is a corrupt entry).
_META_LIMIT = 1 << 20


def _parse_head(head: bytes) -> tuple[dict[str, Any], int]:
    """``(metadata, offset of the image bytes)`` of an entry's first bytes (at least its header
    and metadata), unchecked; :class:`CorruptEntryError` if they are not an entry's."""
    if len(head) < HEADER.size:
        raise CorruptEntryError(f"entry is truncated ({len(head)} bytes)")
    magic, version, meta_len = HEADER.unpack_from(head)
    if magic != MAGIC or version != LAYOUT_VERSION or meta_len > _META_LIMIT:
        raise CorruptEntryError("entry has a bad header")
    start = HEADER.size + meta_len
    if len(head) < start:
        raise CorruptEntryError(f"entry is truncated ({len(head)} bytes, its metadata ends at {start})")
    try:
        meta = json.loads(head[HEADER.size:start].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptEntryError(f"entry metadata is unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise CorruptEntryError("entry metadata is not an object")
    return meta, start


def _check_meta(meta: dict[str, Any], key: str | None) -> None:
    """The checks of an entry's metadata alone: its key, its checksum (or, for an older entry
    without one, the key fields hashing to its key)."""
    if key is not None and meta.get("key") not in (None, key):
        raise CorruptEntryError(f"entry is stored under {key} but belongs to {meta.get('key')}")
    if META_CRC in meta:
        if meta[META_CRC] != _meta_checksum(meta):
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


def head_length(head: bytes) -> int:
    """How many bytes from the start of an entry hold its header and metadata (at least
    ``HEADER.size``), read from its first ``HEADER.size`` bytes; 0 if they are not a header."""
    if len(head) < HEADER.size:
        return 0
    magic, version, meta_len = HEADER.unpack_from(head)
    if magic != MAGIC or version != LAYOUT_VERSION or meta_len > _META_LIMIT:
        return 0
    return int(HEADER.size + meta_len)


def check_head(head: Any, size: int, key: str | None = None) -> dict[str, Any]:
    """The metadata of an entry of ``size`` bytes from its first bytes ``head`` (at least its
    header and metadata), checked as far as can be without the image bytes: the header, the
    metadata (its checksum, its key) and the size the metadata implies (header + metadata +
    ``nbytes`` = ``size``: a truncated or padded entry fails). :class:`CorruptEntryError` if
    it fails. A changed image byte that keeps the size passes: :func:`check_entry` (the image
    bytes' CRC-32) and :func:`decode_entry` catch it."""
    if isinstance(head, Refused):
        raise CorruptEntryError(f"entry refused: {head.reason}")
    if not isinstance(head, (bytes, bytearray, memoryview)):
        raise CorruptEntryError(f"entry holds a {type(head).__name__}, not encoded bytes")
    meta, start = _parse_head(bytes(head))
    nbytes = meta.get("nbytes")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or start + nbytes != size:
        raise CorruptEntryError(f"entry holds {size} bytes, its header says {start} + {nbytes}")
    _check_meta(meta, key)
    return meta


def _checked_parts(blob: Any, key: str | None) -> tuple[dict[str, Any], bytes]:
    if isinstance(blob, Refused):
        raise CorruptEntryError(f"entry refused: {blob.reason}")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptEntryError(f"entry holds a {type(blob).__name__}, not encoded bytes")
    blob = bytes(blob)
    meta, start = _parse_head(blob)
    payload = blob[start:]
    if len(payload) != meta.get("nbytes") or zlib.crc32(payload) != meta.get("crc32"):
        raise CorruptEntryError(f"entry image bytes fail their checksum ({len(payload)} bytes, "
                                f"expected {meta.get('nbytes')})")
    _check_meta(meta, key)
    return meta, payload


def decode_entry(blob: Any, key: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(PIL RGB image, metadata)`` of an encoded entry, or :class:`CorruptEntryError`
    (header, checksums as :func:`check_entry`, then the image itself, by the codec of the
    entry's format; PIL's own detection for a format no codec names)."""
    meta, payload = _checked_parts(blob, key)
    name = meta.get("format")
    codec = CODECS.get(name) if isinstance(name, str) else None
    decode = codec.decode if codec is not None else _decode_with_pil
    return decode(payload, meta), meta
