"""What an export folder's manifest owns: the one rule of every ``cache export`` format.

An export writes into a folder that is new, empty, or holds an earlier export of the same format;
there it replaces or removes only the files (and, for the image folder, class folders) its
manifest lists. A non-empty folder without this format's manifest is refused in one line, so the
user's own files (a ``shard-000000.tar`` of another dataset, say) are never overwritten or deleted.

The manifest is hidden from the readers pointed at the folder: Spark and pyarrow (and so pandas)
skip names starting with ``_`` or ``.``, Hugging Face ``datasets`` skips those starting with ``.``,
and DuckDB's ``read_parquet('OUT/*')`` matches hidden files too, but not folders. So the sharded
exports keep it in a hidden folder, ``OUT/.dalda-export/manifest-<format>.json``, and the image
folder, where torchvision's ``ImageFolder`` would take any sub-folder for a class, in a hidden
file, ``OUT/.manifest-imagefolder.json`` (:func:`manifest_name`). Exports written before it was
hidden have ``OUT/manifest-<format>.json``; it is still read, and removed once the new manifest is
written. A manifest is read as untrusted data: a regular file, bounded in size and nesting
(:func:`dalda_aug._io.read_json_object`), and it may name only files of its format's shape.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .._io import read_json_object, write_atomic
from ..errors import InputError, MissingFileError, UnsafeFileError

__all__ = ["MANIFEST_DIR", "MANIFEST_FORMAT", "ExportFolder", "claim_export_folder", "legacy_manifest_name",
           "manifest_name", "remove_owned"]

MANIFEST_FORMAT = "dalda_aug.export/1"
#: The hidden folder of the sharded exports' manifests.
MANIFEST_DIR = ".dalda-export"


def manifest_name(fmt: str) -> str:
    """The manifest of an export, relative to its folder: ``.dalda-export/manifest-webdataset.json``,
    ``.dalda-export/manifest-parquet.json``, ``.manifest-imagefolder.json``."""
    return ".manifest-imagefolder.json" if fmt == "imagefolder" else f"{MANIFEST_DIR}/manifest-{fmt}.json"


def legacy_manifest_name(fmt: str) -> str:
    """The manifest's name before it was hidden (``manifest-<format>.json``); read, then removed."""
    return f"manifest-{fmt}.json"


def _temporary(name: str) -> re.Match[str] | None:
    """A temporary of :func:`dalda_aug._io.atomic_writer` (``.<name>.tmp-<host>-<pid>-<random>``)
    or of older exports (``.<name>.partial-...``): group 1 is the name it was to become."""
    return re.match(r"^\.(.+?)\.(?:tmp|partial)-", name)


@dataclass
class ExportFolder:
    """An export folder as this format's manifest describes it, before anything is written."""

    path: Path
    fmt: str
    manifest: dict[str, Any] = field(default_factory=dict)  # the earlier manifest ({} if none)
    files: set[str] = field(default_factory=set)  # file names (relative paths) the manifest lists
    folders: set[str] = field(default_factory=set)  # sub-folders it lists (the image folder's classes)
    legacy: list[Path] = field(default_factory=list)  # old-name manifests, removed once migrated

    def owns(self, rel: str) -> bool:
        """Whether ``rel`` (a file the export is about to write) may be replaced: absent, listed,
        or inside a sub-folder the export created."""
        return (rel in self.files or rel.split("/", 1)[0] in self.folders
                or not os.path.lexists(self.path / rel))

    def check_writable(self, names: list[str]) -> None:
        """Refuse, before anything is written, when a file to be written exists and is not the
        export's own."""
        for rel in names:
            if not self.owns(rel):
                raise InputError(f"{self.path / rel} exists and {manifest_name(self.fmt)} does not list it "
                                 "(not written by this export); refusing to replace it: export to another folder")

    def write(self, body: dict[str, Any]) -> None:
        """Write the manifest (atomically), then remove the old-name manifests it replaces."""
        target = self.path / manifest_name(self.fmt)
        if target.parent != self.path:
            _check_manifest_dir(target.parent)
            target.parent.mkdir(exist_ok=True)
        write_atomic(target, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        for old in self.legacy:
            remove_owned(old)
        self.legacy = []

    def remove_temporaries(self, valid_name: Callable[[str], bool]) -> None:
        """Remove temporaries that a killed export left (names of the shape this format writes)."""
        manifest = self.path / manifest_name(self.fmt)
        for folder in dict.fromkeys((self.path, manifest.parent)):
            for entry in os.scandir(folder):
                match = _temporary(entry.name)
                if match and (valid_name(match.group(1)) or match.group(1) == manifest.name):
                    remove_owned(Path(entry.path))


def _check_manifest_dir(path: Path) -> None:
    """The manifests' folder must be a folder of its own, not a link to one elsewhere."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise UnsafeFileError(f"{path} is not a plain folder (a symbolic link?); refusing to keep an export "
                              "manifest there")


def remove_owned(path: Path) -> None:
    """Remove a file an export owns: a regular file or a symlink (the link, never its target);
    anything else (a folder planted at its name) is left alone."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        path.unlink(missing_ok=True)


def _read(path: Path, fmt: str, valid_name: Callable[[str], bool]) -> tuple[dict[str, Any], set[str], set[str]]:
    """A manifest's body, the files and the sub-folders it lists; an :class:`InputError` naming it
    when it is not a readable manifest of a ``fmt`` export (too deep, too large, a FIFO, a link...)."""
    body = read_json_object(path, "export manifest")
    if body.get("format") != MANIFEST_FORMAT or body.get("as") != fmt:
        raise InputError(f"export manifest {path} is not the manifest of a {fmt} export "
                         f"(format {body.get('format')!r}, as {body.get('as')!r}); refusing to write there")
    listed = body.get("files")
    if listed is None:  # written before the manifest listed its files: the shards it records
        shards = body.get("shards")
        listed = [r.get("name") for r in shards if isinstance(r, dict)] if isinstance(shards, list) else []
    folders = body.get("folders", [])
    if not isinstance(listed, list) or not isinstance(folders, list):
        raise InputError(f"export manifest {path}: 'files' and 'folders' must be lists")
    for name in listed:
        if not isinstance(name, str) or not valid_name(name):
            raise InputError(f"export manifest {path} lists {name!r}, not a file a {fmt} export writes; "
                             "refusing to write there")
    for name in folders:
        if not isinstance(name, str) or not _plain_folder(name):
            raise InputError(f"export manifest {path} lists the folder {name!r}, not a class folder; "
                             "refusing to write there")
    return body, set(listed), set(folders)


def _plain_folder(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".")


def claim_export_folder(folder: Path, fmt: str, valid_name: Callable[[str], bool]) -> ExportFolder:
    """``folder`` (which need not exist) as an :class:`ExportFolder` of ``fmt``: its manifest (and
    any old-name one) read and checked. A folder holding anything but temporaries and no manifest
    of ``fmt`` is an :class:`InputError`; nothing is written or removed here."""
    result = ExportFolder(folder, fmt)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise InputError(f"cannot read the export folder {folder}: {exc.strerror or exc}") from None
    found = False
    if fmt != "imagefolder":
        _check_manifest_dir(folder / MANIFEST_DIR)
    for name in (manifest_name(fmt), legacy_manifest_name(fmt)):
        if not os.path.lexists(folder / name):
            continue
        try:
            body, files, folders = _read(folder / name, fmt, valid_name)
        except MissingFileError:  # removed meanwhile
            continue
        if not found:
            result.manifest = body
        found = True
        result.files |= files
        result.folders |= folders
        if name == legacy_manifest_name(fmt):
            result.legacy.append(folder / name)
    if not found and any(_temporary(n) is None and n != MANIFEST_DIR for n in names):
        raise InputError(f"the export folder {folder} is not empty and holds no {manifest_name(fmt)} "
                         f"(no earlier {fmt} export); an export writes only into a new or empty folder or over "
                         "its own earlier export, so that no file of yours is replaced or removed: choose another "
                         "folder")
    return result
