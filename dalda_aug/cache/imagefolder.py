"""The image-folder export: ``OUT/<class>/<key16>.png`` + ``OUT/samples.csv``.

:meth:`SyntheticCache.export <dalda_aug.cache.SyntheticCache.export>` chooses the entries and the
class names; this module names the class folders (:func:`export_folder_names`: distinct even on a
disk that ignores case or Unicode normalisation) and writes them (:func:`write_image_folder`).
The sharded exports (WebDataset, Parquet) are in :mod:`dalda_aug.cache.export`.

The folder reads as torchvision's ``ImageFolder`` and as Hugging Face's
``load_dataset("imagefolder", data_dir=OUT)`` read it: the labels are the class folders (a
``ClassLabel`` of their names in HF). The per-image metadata is ``samples.csv`` (:data:`METADATA_FILE`),
a name HF does not take for its own ``metadata.csv`` convention, which would replace the folder
labels by the CSV's plain integers. ``OUT/.manifest-imagefolder.json`` lists the class folders
the export created and the files it wrote; only those are ever replaced or removed
(:mod:`~dalda_aug.cache.export_manifest`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._io import atomic_writer, write_atomic
from ..data import class_folder_names
from ..errors import InputError
from .export_manifest import MANIFEST_FORMAT, ExportFolder, claim_export_folder, remove_owned

__all__ = ["METADATA_COLUMNS", "METADATA_FILE", "claim_image_folder", "export_folder_names", "write_image_folder"]

#: The per-image metadata of an image-folder export, ``OUT/samples.csv`` (not ``metadata.csv``,
#: which Hugging Face's imagefolder loader would read in place of the folder labels).
METADATA_FILE = "samples.csv"
#: Its columns, one row per exported image (``lam`` is λ, as in the WebDataset and Parquet exports).
METADATA_COLUMNS = ["path", "key", "class", "label", "class_name", "source", "variant", "prompt", "lam",
                    "seed", "score", "width", "height", "generation_fingerprint", "model_fingerprint"]
#: Cache metadata field -> column, where they differ.
_FROM_METADATA = {"lam": "lambda"}
_IMAGE = re.compile(r"[^/\\\0]+/[0-9a-f]{16}\.png")


def _exported_file(name: str) -> bool:
    """A file an image-folder export writes: ``samples.csv`` or ``<class folder>/<key16>.png``."""
    return name == METADATA_FILE or (_IMAGE.fullmatch(name) is not None and not name.startswith("."))


def _png_name(name: str) -> bool:
    """An image's name inside its class folder: ``<key16>.png``."""
    return _IMAGE.fullmatch(f"x/{name}") is not None


def claim_image_folder(out: Path) -> ExportFolder:
    """``out`` as an image-folder export: new, empty or an earlier image-folder export (its
    manifest read, bounded); anything else is an :class:`~dalda_aug.errors.InputError`."""
    return claim_export_folder(out, "imagefolder", _exported_file)


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



def write_image_folder(out: Path, entries: Iterable[Any], classes: Sequence[Any], folders: dict[str, str], *,
                       png_compress_level: int, progress: bool = False) -> int:
    """Write ``entries`` (:class:`~dalda_aug.cache.CachedImage`) into ``out`` as PNGs in their
    class folders (``folders``: :func:`export_folder_names`; a class it lacks gets a folder distinct
    from all of them), and ``out/samples.csv``; the images written.

    ``out`` must be new, empty or an earlier image-folder export (:func:`claim_image_folder`); a
    class folder that exists and that its manifest does not list is refused, as is one whose
    resolved path leads outside ``out`` (a symbolic link in it?): an
    :class:`~dalda_aug.errors.InputError`. Images and files of the earlier export that this one
    does not write are removed. An entry's class is ``classes[label]`` when ``classes`` (a plan's)
    has it, else its metadata's ``class_name``.
    """
    from tqdm.auto import tqdm

    own = claim_image_folder(out)
    owned_folders = set(own.folders)
    for folder in sorted(set(folders.values()) - owned_folders):  # before anything is written
        _check_folder_free(out, folder)
    out.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {"format": MANIFEST_FORMAT, "as": "imagefolder", "complete": False,
                            "folders": sorted(owned_folders), "files": sorted(own.files | {METADATA_FILE})}
    own.write(body)
    own.remove_temporaries(_exported_file)
    for folder in sorted(owned_folders):  # the PNG temporaries a killed export left in its class folders
        if (out / folder).is_dir() and not (out / folder).is_symlink():
            ExportFolder(out / folder, "imagefolder").remove_temporaries(_png_name)
    rows = []
    out_real = os.path.realpath(out)
    for entry in tqdm(entries, desc="exporting", unit="img", disable=not progress):
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
        if folder not in owned_folders:
            _check_folder_free(out, folder)
            owned_folders.add(folder)
            body["folders"] = sorted(owned_folders)
            own.write(body)  # listed before it is created
        rel = Path(folder) / f"{entry.key[:16]}.png"
        target = os.path.realpath(out / rel)
        if os.path.dirname(target) == out_real or not target.startswith(out_real + os.sep):
            raise InputError(f"refusing to export {entry.key[:16]} to {target}: class folder {folder!r} "
                             f"leads outside {out} (a symbolic link in it?)")
        (out / folder).mkdir(parents=True, exist_ok=True)
        with atomic_writer(out / rel) as fh:
            entry.image.save(fh, "PNG", compress_level=png_compress_level)
        row = {c: meta.get(_FROM_METADATA.get(c, c), "") for c in METADATA_COLUMNS}
        row.update(path=rel.as_posix(), key=entry.key, **{"class": folder})
        rows.append(row)
    rows.sort(key=lambda r: r["path"])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METADATA_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / METADATA_FILE, text.getvalue())
    written = {r["path"] for r in rows} | {METADATA_FILE}
    _remove_stale(out, own.files - written, owned_folders, {r["path"].split("/", 1)[0] for r in rows})
    body.update(complete=True, folders=sorted(owned_folders), files=sorted(written))
    own.write(body)
    return len(rows)


def _check_folder_free(out: Path, folder: str) -> None:
    """A class folder the manifest does not list must not exist yet (it would be the user's)."""
    if os.path.lexists(out / folder):
        raise InputError(f"{out / folder} exists and .manifest-imagefolder.json does not list it (not written by "
                         "this export); refusing to write into it: export to another folder")


def _remove_stale(out: Path, stale: set[str], owned_folders: set[str], used: set[str]) -> None:
    """Remove the earlier export's files this one did not write, and the class folders it
    created that are now empty (dropped from ``owned_folders``)."""
    for rel in sorted(stale):
        parent = out / rel.split("/", 1)[0] if "/" in rel else out
        if parent == out or (parent.is_dir() and not parent.is_symlink()):  # never through a planted link
            remove_owned(out / rel)
    for folder in sorted(owned_folders - used):
        try:
            (out / folder).rmdir()  # only when empty: a file of the user's keeps it
        except FileNotFoundError:
            owned_folders.discard(folder)
        except OSError:
            continue
        else:
            owned_folders.discard(folder)
