"""A cache entry's bytes: the header, the checksums, and the image formats (a registry).

An entry is: magic (8 bytes), layout version (1 byte), metadata length (4 bytes, big endian),
metadata (UTF-8 JSON), encoded image. :data:`CODECS` maps each image format name to its
:class:`ImageCodec` (encoder, decoder, option); :func:`register_codec` adds one, and
:func:`image_formats` (the names, in order) is what every command-line choice and benchmark
reads, so a codec registered at run time is offered there too. Entries of every format stay
readable whatever a cache's current format.

A format's option travels in its name, as ``name:option``: ``jpeg:90`` (quality), ``webp:95``
(lossy WebP at quality 95; ``webp`` alone is lossless), ``png:6`` (zlib level). A name
without an option takes the codec's default (:func:`resolve_format`). ``lz4``, ``png`` and
``raw`` are lossless; ``jpeg`` is lossy (default quality :data:`DEFAULT_QUALITY`). A lossy
entry says so in its header (``"lossy": true, "quality": q``). The format is not part of an
entry's key: a key names the generated image, and its entry holds that image exactly or, where
lossy storage was asked for, its lossy encoding.

:func:`check_head` checks what can be checked without the image bytes (the header, the
metadata checksum, the total size the metadata implies); :func:`check_entry` adds the image
bytes' CRC-32 and :func:`decode_entry` the decoding.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, cast

from ..errors import CorruptEntryError, InputError, require
from .spec import variant_key

__all__ = [
    "ImageCodec",
    "CODECS",
    "IMAGE_FORMATS",
    "image_formats",
    "register_codec",
    "resolve_format",
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
    "format_name",
    "FormatNames",
    "DEFAULT_PNG_LEVEL",
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

    #: The format's name: letters, digits, ``-`` or ``_`` (no ``:``, which starts an option).
    name: str
    #: ``(RGB PIL image, option or None) -> payload bytes``.
    encode: Callable[[Any, "int | None"], bytes]
    #: ``(payload bytes, entry metadata) -> RGB PIL image``; :class:`CorruptEntryError` if it fails.
    decode: Callable[[bytes, dict[str, Any]], Any]
    #: What ``--format``'s help says of it.
    note: str = ""
    #: What the integer after ``name:`` means (``"quality"``, ``"level"``); ``""``: the codec
    #: takes no option. A ``"quality"`` option is what the ``quality`` arguments set.
    option: str = ""
    #: The option's smallest and largest value.
    option_range: tuple[int, int] = (1, 100)
    #: The option when the name gives none (None: the codec's own behaviour without one).
    default_option: int | None = None
    #: ``option -> whether the encoding loses information`` (``option`` None: not given). A
    #: lossy encoding's option is written to the entry's header as its ``quality``.
    lossy: Callable[["int | None"], bool] = lambda option: False


def _encode_png(rgb: Any, level: int | None) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, "PNG", compress_level=DEFAULT_PNG_LEVEL if level is None else int(level))
    return buf.getvalue()


def _encode_webp(rgb: Any, quality: int | None) -> bytes:
    buf = io.BytesIO()
    if quality is None:
        # Lossless; quality/method are the compression effort (least: ~5x faster than the default, ~10 % bigger).
        rgb.save(buf, "WEBP", lossless=True, quality=0, method=0, exact=True)
    else:  # lossy, at this quality (method 4: PIL's default effort)
        rgb.save(buf, "WEBP", lossless=False, quality=int(quality), method=4)
    return buf.getvalue()


def _encode_jpeg(rgb: Any, quality: int | None) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=DEFAULT_QUALITY if quality is None else int(quality))
    return buf.getvalue()


def _encode_lz4(rgb: Any, option: int | None) -> bytes:
    lz4_block = require("lz4.block", "generate", "lz4")
    # LZ4HC level 3: ~0.8 of the raw bytes on photos (the default mode: ~0.87) at ~45 ms per
    # 512x512 encode on one core (writer threads, GIL released); decoding is as fast either way.
    return cast(bytes, lz4_block.compress(rgb.tobytes(), mode="high_compression", compression=3, store_size=False))


def _encode_raw(rgb: Any, option: int | None) -> bytes:
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


# The JPEG quality of jpeg entries when none is given (``jpeg`` is ``jpeg:95``).
DEFAULT_QUALITY = 95
# The zlib level of png entries when none is given (``png`` is ``png:1``; 1 encodes ~3x faster
# than 6 for ~10 % more bytes; decoding speed hardly depends on it).
DEFAULT_PNG_LEVEL = 1

#: Image format name -> codec, in the order the formats are offered (:func:`register_codec` adds).
CODECS: dict[str, ImageCodec] = {
    "lz4": ImageCodec("lz4", _encode_lz4, _decode_lz4, "fastest to read in training"),
    "png": ImageCodec("png", _encode_png, _decode_with_pil, f"png:LEVEL sets the zlib level (default {DEFAULT_PNG_LEVEL})",
                      option="level", option_range=(0, 9), default_option=DEFAULT_PNG_LEVEL),
    "webp": ImageCodec("webp", _encode_webp, _decode_with_pil, "smallest lossless; lossy as webp:QUALITY",
                       option="quality", lossy=lambda quality: quality is not None),
    "raw": ImageCodec("raw", _encode_raw, _decode_raw, "uncompressed"),
    "jpeg": ImageCodec("jpeg", _encode_jpeg, _decode_with_pil, f"lossy, jpeg:QUALITY (default {DEFAULT_QUALITY})",
                       option="quality", default_option=DEFAULT_QUALITY, lossy=lambda quality: True),
}
# The format new entries are written in unless told otherwise: LZ4-compressed raw RGB decodes
# in ~0.2 ms at 512x512 (PNG: ~10 ms), so a training epoch at p = 0.5 costs about as much as
# one on the real JPEGs (benchmarks/bench_dataset.py), still lossless.
DEFAULT_IMAGE_FORMAT = "lz4"


class FormatNames(tuple[str, ...]):
    """The registered format names, in order; ``in`` also accepts a name with a valid option
    (``"jpeg:90" in image_formats()``), so the names serve as a command line's choices."""

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            return False
        try:
            resolve_format(item)
        except InputError:
            return False
        return True


def image_formats() -> FormatNames:
    """The names of the registered image formats, in the order they are offered (the built-ins,
    then those :func:`register_codec` added). A name takes its option as ``name:option``."""
    return FormatNames(CODECS)


def register_codec(codec: ImageCodec, *, replace: bool = False) -> ImageCodec:
    """Add ``codec`` to :data:`CODECS`, so that caches write and read its format and
    :func:`image_formats` (every ``--format`` choice) offers it. A name already registered is
    an :class:`InputError` unless ``replace``. Register before the command line or the cache
    that should use it is built; entries name their format, so readers need it registered too."""
    if not isinstance(codec, ImageCodec):
        raise InputError(f"register_codec takes an ImageCodec, got {type(codec).__name__}")
    name = codec.name
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise InputError(f"codec name must be letters, digits, '-' or '_', got {name!r}")
    low, high = codec.option_range
    if codec.default_option is not None and not low <= codec.default_option <= high:
        raise InputError(f"codec {name}: default option {codec.default_option} is outside {low}..{high}")
    if name in CODECS and not replace:
        raise InputError(f"image format {name!r} is registered already (replace=True to replace it)")
    CODECS[name] = codec
    return codec


def _parse_format(image_format: Any) -> tuple[ImageCodec, int | None]:
    if not isinstance(image_format, str):
        raise InputError(f"image_format must be one of {list(CODECS)}, got {image_format!r}")
    name, sep, option_text = image_format.partition(":")
    codec = CODECS.get(name)
    if codec is None:
        raise InputError(f"image_format must be one of {list(CODECS)} (with an option as name:N), got {image_format!r}")
    if not sep:
        return codec, None
    if not codec.option:
        raise InputError(f"image format {name} takes no option, got {image_format!r}")
    low, high = codec.option_range
    try:
        option = int(option_text, 10)
    except ValueError:
        option = None
    if option is None or not option_text.isdigit() or not low <= option <= high:
        raise InputError(f"{image_format!r}: the {codec.option} of {name} must be an integer in {low}..{high}")
    return codec, option


def resolve_format(image_format: Any, quality: Any = None) -> tuple[ImageCodec, int | None]:
    """``(codec, option)`` of a format name, ``"name"`` or ``"name:option"`` (``jpeg:90``,
    ``webp:95``, ``png:6``), the option being the codec's default where the name gives none;
    :class:`InputError` for an unknown name or a bad option. ``quality`` (the older spelling,
    ``"jpeg"`` with ``quality=90``) sets a ``"quality"`` option, and is refused for a format
    that takes none or where the name gives another."""
    codec, option = _parse_format(image_format)
    if quality is not None:
        quality = _quality_value(quality)
        if codec.option != "quality" or not codec.lossy(quality):
            lossy = [n for n, c in CODECS.items() if c.option == "quality" and c.lossy(quality)]
            raise InputError(f"quality applies to the lossy formats ({', '.join(lossy)}), not to {codec.name} "
                             "(lossless)")
        if option is not None and option != quality:
            raise InputError(f"image_format {image_format!r} and quality={quality} disagree")
        option = int(quality)
    return codec, codec.default_option if option is None else option


def format_name(codec: ImageCodec, option: int | None) -> str:
    """The spelling of ``(codec, option)``: ``"jpeg:95"``, ``"png:1"``, ``"lz4"``."""
    return codec.name if option is None else f"{codec.name}:{option}"


def check_image_format(image_format: Any) -> str:
    """``image_format`` if it names a registered format (with a valid option, if any), else an
    :class:`InputError`."""
    _parse_format(image_format)
    return str(image_format)


def _quality_value(quality: Any, what: str = "quality") -> int:
    """The one range rule of a quality: an integer in 1..100, else an :class:`InputError` naming ``what``."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"{what} must be an integer in 1..100, got {quality!r}")
    return int(quality)


def check_quality(quality: Any, image_format: str | None = None, *, what: str = "quality") -> int | None:
    """``quality`` (None, or an integer in 1..100) if valid for ``image_format``, else an
    :class:`InputError` (a value out of range names ``what``, e.g. ``"--quality"``): a quality is
    refused for a format it does not apply to (lz4, png, raw)."""
    if quality is None:
        return None
    value = _quality_value(quality, what)
    if image_format is not None:
        resolve_format(image_format, value)
    return value


def __getattr__(name: str) -> Any:
    # IMAGE_FORMATS: the registered names when read (a codec registered later is in it).
    if name == "IMAGE_FORMATS":
        return image_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


_UNSET: Any = object()


def encode_entry(image: Any, metadata: dict[str, Any], image_format: str = DEFAULT_IMAGE_FORMAT, *,
                 png_compress_level: Any = _UNSET, quality: Any = _UNSET) -> bytes:
    """Encode ``image`` behind a header holding ``metadata``.

    ``image_format``: a registered format name, with its option as ``name:option``
    (:func:`resolve_format`): ``"lz4"`` (default: the 8-bit RGB pixels compressed with LZ4's
    block format; ~0.8 of the raw bytes on photos, decoded in well under 1 ms per 512x512
    image), ``"png"`` / ``"png:LEVEL"`` (zlib level, default 1), ``"webp"`` (lossless: the
    smallest lossless, slowest to decode) / ``"webp:QUALITY"`` (lossy), ``"raw"`` (the pixels,
    uncompressed: decoding is a copy instead of ~9 ms of PNG inflating and unfiltering) or
    ``"jpeg"`` / ``"jpeg:QUALITY"`` (lossy, default :data:`DEFAULT_QUALITY`).
    ``png_compress_level`` and ``quality`` are the older spellings of those options: still
    read, with a :class:`DeprecationWarning`.
    ``width``, ``height``, ``format`` (the codec's name), ``nbytes`` and ``crc32`` (of the
    encoded image) are added to the metadata; for a lossy encoding also ``lossy`` (True) and
    ``quality``.
    """
    from ..data import to_rgb

    old_quality = None if quality is _UNSET else quality
    codec, option = resolve_format(image_format, old_quality)
    if quality is not _UNSET:
        warnings.warn(f"encode_entry(quality=...) is deprecated: name the format with its option, "
                      f"image_format={format_name(codec, option)!r}", DeprecationWarning, stacklevel=2)
    if png_compress_level is not _UNSET:
        if not isinstance(png_compress_level, int) or isinstance(png_compress_level, bool) \
                or not 0 <= png_compress_level <= 9:
            raise InputError(f"png_compress_level must be in 0..9, got {png_compress_level!r}")
        if codec.name == "png":
            if ":" in str(image_format) and option != png_compress_level:
                raise InputError(f"image_format {image_format!r} and png_compress_level={png_compress_level} disagree")
            option = png_compress_level
        warnings.warn(f"encode_entry(png_compress_level=...) is deprecated: name the format with its option, "
                      f"image_format='png:{png_compress_level}'", DeprecationWarning, stacklevel=2)
    rgb = to_rgb(image)
    payload = codec.encode(rgb, option)
    meta = dict(metadata)
    meta.pop("lossy", None)
    meta.pop("quality", None)
    if codec.lossy(option):
        meta.update(lossy=True, quality=option)
    meta.update(format=codec.name, width=rgb.width, height=rgb.height, nbytes=len(payload),
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
