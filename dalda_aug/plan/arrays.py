"""Array helpers of a plan's columns (:mod:`dalda_aug.plan.columns`): string tables, ``.npy``
bytes written and memory-mapped (never unpickled), the per-source grouping, the check of integer
text, the spill folder's clean-up and the CRLF-as-LF digest of ``plan.jsonl``."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import open_regular, write_atomic
from ..errors import InputError

__all__ = ["StringTable", "string_blob", "not_int_text", "npy_bytes", "write_bytes_atomic", "mapped", "grouping",
           "flock_shared", "remove_spill", "lf_sha256"]


def npy_bytes(array: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data)


class StringTable:
    """Distinct strings, numbered in order of first appearance."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def add(self, text: str) -> int:
        found = self.index.get(text)
        if found is None:
            found = self.index[text] = len(self.index)
        return found

    def arrays(self, errors: str = "strict", what: str = "string") -> tuple[Any, Any]:
        return string_blob(list(self.index), errors, what)


def string_blob(texts: list[str], errors: str, what: str) -> tuple[Any, Any]:
    """``(blob, offsets)`` of ``texts`` encoded as UTF-8 (``errors``: the codec's error handler)."""
    encoded = []
    for text in texts:
        try:
            encoded.append(text.encode("utf-8", errors))
        except UnicodeEncodeError as exc:
            raise InputError(f"{what} {text!r} cannot be stored as UTF-8 (it holds {exc.reason}: "
                             f"{text[exc.start:exc.end]!r})") from None
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def not_int_text(blob: Any, offsets: Any, flagged: Any) -> int | None:
    """The first entry marked in ``flagged`` whose bytes are not a decimal integer as ``str(int)``
    writes it (digits after an optional ``-``, no leading zero), or None; vectorised."""
    if not flagged.any():
        return None
    starts, lengths = offsets[:-1], np.diff(offsets)
    padded = np.concatenate([blob, np.zeros(2, dtype=np.uint8)])  # a first and second byte for every entry
    first, second = padded[starts], padded[starts + 1]
    negative = (lengths > 0) & (first == ord("-"))
    lead = np.where(negative, second, first)  # the first digit
    digits = lengths - negative
    bad = flagged & ((digits < 1) | ((lead == ord("0")) & ((digits > 1) | negative)))
    entry = np.repeat(np.arange(flagged.size), lengths)  # each byte's entry
    digit = (blob >= ord("0")) & (blob <= ord("9"))
    sign = (blob == ord("-")) & (np.arange(blob.size) == np.repeat(starts, lengths))
    bad[entry[flagged[entry] & ~(digit | sign)]] = True
    found = np.flatnonzero(bad)
    return int(found[0]) if found.size else None


def flock_shared(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no sweep either
        return
    fcntl.flock(fd, fcntl.LOCK_SH)


def remove_spill(folder: str, lock: int, owner: int) -> None:
    """Remove a spilled folder, in the process that made it only (a forked child that collects its
    copy of the columns leaves the folder to its parent)."""
    import shutil

    if os.getpid() != owner:
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.close(lock)
    except OSError:
        pass


def lf_sha256(path: Path) -> str | None:
    """SHA-256 of a text file read in chunks with CRLF as LF (as the JSONL reader hashes
    ``plan.jsonl``; plan.json's digests are of LF text), or None where it cannot be read; one that
    is not a regular file is an :class:`~dalda_aug.errors.UnsafeFileError`."""
    digest = hashlib.sha256()
    try:
        fd, _ = open_regular(path, "plan rows", follow_symlinks=True)  # a FIFO or device: one line, no hang
        with os.fdopen(fd, "rb") as fh:
            carry = b""
            while chunk := fh.read(1 << 22):
                chunk = carry + chunk
                carry = b"\r" if chunk.endswith(b"\r") else b""
                digest.update(chunk[: len(chunk) - len(carry)].replace(b"\r\n", b"\n"))
            digest.update(carry)
    except OSError:
        return None
    return digest.hexdigest()


def mapped(file: Path | io.BufferedReader) -> Any:
    """The ``.npy`` array in ``file`` (a path, or a binary file open at its start), memory-mapped
    read-only, as a plain ndarray view (``np.memmap``'s own indexing costs microseconds per element).
    Only the header is parsed (no pickle: an object dtype is refused); an empty array is made in memory."""
    if not isinstance(file, io.BufferedReader):
        with open(file, "rb") as fh:
            return mapped(fh)
    version = np.lib.format.read_magic(file)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(file)
    if dtype.hasobject:
        raise ValueError("an object array (pickled data) is not a plan column")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=dtype)
    array = np.memmap(file, dtype=dtype, mode="r", offset=file.tell(), shape=shape, order="F" if fortran else "C")
    return array.view(np.ndarray)


def grouping(source: Sequence[int] | Any, variant: Any, n_sources: int) -> tuple[Any, Any]:
    order = np.lexsort((np.asarray(variant), np.asarray(source))).astype(np.int32)
    counts = np.bincount(np.asarray(source, dtype=np.int64), minlength=n_sources)
    group_start = np.zeros(n_sources + 1, dtype=np.int64)
    np.cumsum(counts, out=group_start[1:])
    return order, group_start
