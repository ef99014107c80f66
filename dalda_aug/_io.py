"""Small file helpers shared by the modules that write user-facing files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputError, MissingFileError, UnsafeFileError

# Bounds on the JSON files read here (plan.json, spec records, prompt banks, token manifests, ...):
# none of them comes near, and a file that does was not written by this library.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = 0o666) -> Iterator[BinaryIO]:
    """The one atomic write of the package: yields a binary file; on a clean exit its bytes replace
    ``path`` in one step (a reader sees the old file or the new one, never half).

    The temporary is made by :func:`tempfile.mkstemp` in the target folder, so it is created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``: a symlink or file planted at any name it could take is never
    followed or overwritten. Its name carries the host and pid (several machines may write one file
    on a shared disk). It is fsynced, ``os.replace``d over ``path`` (which replaces a symlink at
    ``path`` itself rather than writing through it) and removed on any failure. ``mode`` is applied
    less this process's umask, as ``open`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-")
    try:
        os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, mode: int = 0o666) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` through :func:`atomic_writer`."""
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str], what: str) -> Path:
    """``path`` resolved, after checking that it (following any symlinks) stays under ``root``;
    an :class:`UnsafeFileError` naming ``what`` otherwise (a planted symlink to a folder elsewhere)."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise UnsafeFileError(f"{what} {path} leads outside {root} (to {real}); refusing to use it")
    return real


def open_regular(path: str | os.PathLike[str], what: str, *,
                 follow_symlinks: bool = False) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading as data someone else may have written: ``O_NOFOLLOW | O_NONBLOCK``
    (a symlink, e.g. to ``/dev/zero``, is refused; a FIFO never blocks), and it must be a regular
    file. Returns the descriptor (the caller closes it) and its ``fstat``. A missing file raises
    :class:`MissingFileError`; anything else :class:`UnsafeFileError` naming ``what`` and the path.
    ``follow_symlinks=True`` is for a file the user named themselves (a ``models.json``): its link is
    followed, and the target must still be a regular file."""
    nofollow = 0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)
    flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MissingFileError(f"{what} not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{what} {path} is a symbolic link; refusing to follow it") from None
        raise UnsafeFileError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise UnsafeFileError(f"{what} {path} is {kind}, not a regular file; refusing to read it")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: str | os.PathLike[str], max_bytes: int, what: str, *,
                 follow_symlinks: bool = False) -> bytes:
    """The bytes of ``path``, opened by :func:`open_regular` and read up to ``max_bytes``; a larger
    file (by its size, or by what a read returns) is an :class:`UnsafeFileError` naming ``what``."""
    fd, st = open_regular(path, what, follow_symlinks=follow_symlinks)
    try:
        if st.st_size > max_bytes:
            raise UnsafeFileError(f"{what} {path} holds {st.st_size} bytes, more than the {max_bytes} allowed; "
                                  "refusing to read it")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise UnsafeFileError(f"{what} {path} holds more than the {max_bytes} bytes allowed; "
                                      "refusing to read it")
        return b"".join(chunks)
    finally:
        os.close(fd)


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


def read_json_object(path: str | os.PathLike[str], what: str, *,
                     follow_symlinks: bool = False) -> dict[str, Any]:
    """Read a UTF-8 JSON file holding an object; errors name ``what`` and the path.

    The file may hold at most :data:`MAX_JSON_BYTES` bytes nested at most :data:`MAX_JSON_DEPTH`
    levels deep; beyond either it is an :class:`InputError`, not a ``MemoryError`` or ``RecursionError``.
    It is opened by :func:`read_regular` (no symlink unless ``follow_symlinks``, no FIFO, no device).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise MissingFileError(f"{what} not found: {path}")
    raw = read_regular(path, MAX_JSON_BYTES, what, follow_symlinks=follow_symlinks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text: {exc}") from None
    data = loads_bounded(text, f"{what} {path}")
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists on this machine (a zombie, or one of another user, exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, as another user's
        return False
    return False


def sweep_orphans(prefix: str, directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove what processes that are gone left in ``directory`` (the temporary folder by default):
    the entries named ``<prefix><pid>-...`` that this user owns, whose process ``pid`` no longer
    exists and that no process holds an ``flock`` on (the owner of a spill folder holds a shared
    one on it, and so do the processes it forked; a lock file is held while it is used). Folders
    are removed with what they hold, files unlinked; nothing is followed (an entry that is a symlink
    is unlinked). Returns what was removed; anything that cannot be removed is left, silently: the
    sweep is housekeeping, run where such entries are made (:meth:`PlanColumns.spill
    <dalda_aug.plan.columns.PlanColumns.spill>`, :class:`~dalda_aug.dataset.draws.DrawCounter`)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: nothing is swept
        return []

    folder = Path(directory if directory is not None else tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"([0-9]+)-")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        found = pattern.match(entry.name)
        if not found:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != os.getuid() or not process_gone(int(found.group(1))):
                continue
            path = Path(entry.path)
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                path.unlink()
                removed.append(path)
                continue
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a process (perhaps in another pid namespace) still uses it
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
