"""The image-folder export: ``OUT/<class>/<key16>.png`` + ``OUT/metadata.csv``.

:meth:`SyntheticCache.export <dalda_aug.cache.SyntheticCache.export>` chooses the entries and the
class names; this module names the class folders (:func:`export_folder_names`: distinct even on a
disk that ignores case or Unicode normalisation) and writes them (:func:`write_image_folder`).
The sharded exports (WebDataset, Parquet) are in :mod:`dalda_aug.cache.export`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data import class_folder_names
from ..errors import InputError

__all__ = ["METADATA_COLUMNS", "export_folder_names", "write_image_folder"]

#: The columns of ``OUT/metadata.csv``, one row per exported image.
METADATA_COLUMNS = ["path", "key", "class", "label", "class_name", "source", "variant", "prompt", "lambda",
                    "seed", "score", "width", "height", "generation_fingerprint", "model_fingerprint"]


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
    """Write ``entries`` (:class:`~dalda_aug.cache.CachedImage`) into the existing folder ``out``
    as PNGs in their class folders (``folders``: :func:`export_folder_names`; a class it lacks
    gets a folder distinct from all of them), and ``out/metadata.csv``; the images written.

    An entry's class is ``classes[label]`` when ``classes`` (a plan's) has it, else its metadata's
    ``class_name``. A class folder whose resolved path leads outside ``out`` (a symbolic link
    in it?) is an :class:`~dalda_aug.errors.InputError`.
    """
    from tqdm.auto import tqdm

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
        rel = Path(folder) / f"{entry.key[:16]}.png"
        target = os.path.realpath(out / rel)
        if os.path.dirname(target) == out_real or not target.startswith(out_real + os.sep):
            raise InputError(f"refusing to export {entry.key[:16]} to {target}: class folder {folder!r} "
                             f"leads outside {out} (a symbolic link in it?)")
        (out / folder).mkdir(parents=True, exist_ok=True)
        entry.image.save(out / rel, "PNG", compress_level=png_compress_level)
        row = {c: meta.get(c, "") for c in METADATA_COLUMNS}
        row.update(path=rel.as_posix(), key=entry.key, **{"class": folder})
        rows.append(row)
    rows.sort(key=lambda r: r["path"])
    with (out / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)
