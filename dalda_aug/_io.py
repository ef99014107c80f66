"""Small file helpers shared by the modules that write user-facing files."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from .errors import InputError, MissingFileError

# Bounds on the JSON files read here (plan.json, spec records, prompt banks, token manifests, ...):
# none of them comes near, and a file that does was not written by this library.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Host and pid in the name: processes on several machines may write one file on a shared disk.
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return path


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply ``obj`` (parsed JSON) nests lists and objects; counting stops past ``limit``.
    Iterative, so any depth is measured without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads_bounded(text: str | bytes, where: str) -> Any:
    """``json.loads`` with nesting bounded by :data:`MAX_JSON_DEPTH`; errors are an
    :class:`InputError` naming ``where`` (a file, or ``file:line``)."""
    try:
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the interpreter's recursion limit
        raise InputError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels; refusing to read it") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise InputError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels; refusing to read it")
    return data


def read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a UTF-8 JSON file holding an object; errors name ``what`` and the path.

    The file may hold at most :data:`MAX_JSON_BYTES` bytes nested at most :data:`MAX_JSON_DEPTH`
    levels deep; beyond either it is an :class:`InputError`, not a ``MemoryError`` or ``RecursionError``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{what} {path} is larger than {MAX_JSON_BYTES >> 20} MiB; refusing to read it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text: {exc}") from None
    data = loads_bounded(text, f"{what} {path}")
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data
