"""Reading source images: image folders, generic datasets, few-shot splits, content hashes.

The folder layout is torchvision's ``ImageFolder`` (``root/<class>/<image>``) with the same
class and sample order, so dataset index ``i`` here is index ``i`` there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError, InputError, MissingFileError

__all__ = [
    "IMG_EXTENSIONS",
    "SourceItem",
    "ImageSource",
    "check_scaled_size",
    "load_image",
    "to_rgb",
    "image_sha256",
    "readable_class_name",
    "find_classes",
    "few_shot_indices",
    "source_path",
    "class_folder_name",
    "class_folder_names",
]

# Same extensions as torchvision.datasets.folder.IMG_EXTENSIONS.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def readable_class_name(folder_name: str) -> str:
    """``"american_bulldog"`` -> ``"american bulldog"``; ``"001.ak47"`` -> ``"ak47"``."""
    name = re.sub(r"^\d+[._-]", "", folder_name)  # Caltech-256 style "001.name" prefixes
    name = re.sub(r"[_]+", " ", name)
    name = re.sub(r"\s+", " ", name).strip()
    return name or folder_name


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """Convert any PIL image to 8-bit RGB, or raise :class:`ImageError` naming ``source``.

    CMYK, palette, grey and 16/32-bit images are converted; transparency is composited on
    white (not dropped, which would show whatever colour lies under transparent pixels) and
    16-bit values are scaled to 8 bits (not clipped, as ``convert("RGB")`` does). This is the
    one conversion of the library: content hashes, the generator's reference images and the
    real images :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` serves all go through it.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            arr = arr * (255.0 / top)
        else:  # float images: assume [0, 1] when they fit, otherwise min-max
            lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
            arr = arr * 255.0 if lo >= 0.0 and hi <= 1.0 else (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"cannot convert image {source} from mode {mode!r} to RGB: {exc}") from exc


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file fully and return it as RGB; errors name the file.

    Pillow's decompression-bomb limit is kept: an image of more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 179 million by default; a small file can claim
    30000x30000) is an :class:`ImageError` naming the file, raised before its pixels are decoded.
    Raise ``PIL.Image.MAX_IMAGE_PIXELS`` (in every process that reads images) to accept it.
    """
    path = Path(path)
    if not path.is_file():
        if _is_symlink_loop(path):
            raise ImageError(f"cannot read image {path}: it is a symlink loop (the link points, directly or "
                             "through other links, back to itself)")
        raise MissingFileError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, str(path))
    except UnidentifiedImageError as exc:
        raise ImageError(f"cannot read image {path}: not a recognised image file") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"cannot read image {path}: {exc} Raise PIL.Image.MAX_IMAGE_PIXELS to accept "
                         "images this large") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"cannot read image {path}: {exc} (truncated or corrupt file?)") from exc


def check_scaled_size(size: tuple[int, int], edge: int, what: str) -> None:
    """Refuse an image of ``size`` (width, height) whose shorter side scaled to ``edge`` pixels, as
    CLIP's eval transform and IP-Adapter's feature extractor resize it, would hold more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels: an :class:`ImageError` naming ``what``, raised before
    the resize. A 669-byte PNG of 100000x2 pixels is far below Pillow's own limit, but scaled to a
    224-pixel shorter side it is 11,200,000x224 pixels (7.5 GB). Raise ``PIL.Image.MAX_IMAGE_PIXELS``
    to accept such an image (``None`` turns both checks off)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = int(size[0]), int(size[1])
    short, long = min(width, height), max(width, height)
    if limit is None or short <= 0:
        return
    scaled = edge * -(-long * edge // short)  # the longer side rounded up, times the shorter
    if scaled > limit:
        raise ImageError(f"cannot read image {what}: its {width}x{height} pixels, resized to a {edge}-pixel shorter "
                         f"side (as CLIP's image preprocessing does), would be {scaled} pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit}); "
                         "crop or remove the image, or raise PIL.Image.MAX_IMAGE_PIXELS to accept it")


def image_sha256(img: Image.Image) -> str:
    """SHA-256 of an image's decoded RGB pixels and size.

    Pixels, not file bytes, so a folder image and the same image from an in-memory dataset
    hash alike; any pixel change gives a new hash (and so new seeds and cache keys).
    """
    rgb = to_rgb(img)
    h = hashlib.sha256()
    h.update(f"RGB:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def source_path(root: str | os.PathLike[str], source: str) -> Path:
    """``root / source`` for a plan row's ``source``, refusing a path that leaves ``root``.

    A plan file is text anyone can edit: a source that is absolute (or names a drive), or climbs out
    with ``..`` (``"../../../etc/passwd"``) raises :class:`InputError` naming it, before anything
    is opened. The check is on the path as written, not on where symbolic links lead: links that
    already live inside the data folder (a symlinked class folder, which torchvision's
    ``ImageFolder`` and :meth:`ImageSource.from_folder` follow) were put there by whoever owns the
    folder and keep working; a plan cannot create one.
    """
    text = str(source)
    parts = text.replace("\\", "/").split("/")
    if (not text or "\0" in text or os.path.isabs(text) or text.startswith(("/", "\\"))
            or (os.name == "nt" and re.match(r"^[A-Za-z]:", text)) or ".." in parts):
        raise InputError(f"plan source {source!r} is not a path inside the plan's data root {os.fspath(root)}: "
                         "sources are relative paths without '..'; is the plan file edited or from elsewhere?")
    return Path(root) / text


def _folder_name(name: str) -> str:
    """``name`` with what a folder name cannot safely hold replaced by ``_``: path separators,
    control characters, leading dots (``.`` / ``..`` / a hidden folder, which the plan's folder
    scan refuses), surrounding spaces, and the empty name. Unicode letters stay."""
    text = "".join("_" if ch in "/\\" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name).strip()
    stripped = text.lstrip(".")
    return "_" * (len(text) - len(stripped)) + stripped or "_"


def _name_hash(name: str, n: int) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def class_folder_name(name: str) -> str:
    """A safe folder name for class ``name``, the same whatever other classes exist.

    A name that needs no change is its own folder (``"猫"`` stays ``"猫"``). Otherwise path
    separators, control characters, leading dots (``.``, ``..``, hidden folders) and surrounding
    spaces become ``_`` and a suffix of the name's own hash is added (``"../escaped"`` ->
    ``"___escaped-<8 hex>"``), so two distinct names never share a folder.
    """
    folder = _folder_name(name)
    return folder if folder == name else f"{folder}-{_name_hash(name, 8)}"


def class_folder_names(names: Sequence[str]) -> dict[str, str]:
    """:func:`class_folder_name` of each distinct name, with names alike but for letter case
    (one folder on case-insensitive disks) told apart too: in such a group every name but the
    first in sorted order gets its hash suffix. Deterministic, whatever order the names come in."""
    unique = sorted(set(names))
    result: dict[str, str] = {}
    taken: set[str] = set()
    for name in unique:
        folder = class_folder_name(name)
        if folder.casefold() in taken:
            folder = f"{_folder_name(name)}-{_name_hash(name, 16)}"
        taken.add(folder.casefold())
        result[name] = folder
    return result


def _is_symlink_loop(path: Path) -> bool:
    """True when ``path`` is a symbolic link that never resolves (it leads back to itself)."""
    if not path.is_symlink():
        return False
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _has_image(folder: Path) -> bool:
    for _, _, filenames in os.walk(folder):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in filenames):
            return True
    return False


def find_classes(root: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted class folders of ``root`` (torchvision's rule: every sub-folder is a class).

    A hidden sub-folder (``.ipynb_checkpoints``) that holds images is an :class:`InputError`:
    torchvision's ``ImageFolder`` counts it as a class, which shifts the labels of every class
    after it, while a plan should not augment it. Remove or move it. Hidden folders without
    images are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"dataset folder not found: {root}")
    entries = [e for e in os.scandir(root) if e.is_dir()]
    hidden = sorted(e.name for e in entries if e.name.startswith(".") and _has_image(Path(e.path)))
    if hidden:
        raise InputError(
            f"hidden folder {root / hidden[0]} holds images: torchvision's ImageFolder counts it as a class "
            "(shifting the labels of the classes after it) while it is not one; remove or move it"
        )
    classes = sorted(e.name for e in entries if not e.name.startswith("."))
    if not classes:
        raise MissingFileError(f"Couldn't find any class folder in {root}: expected ROOT/<class>/<image>.")
    return classes, {c: i for i, c in enumerate(classes)}


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` in torchvision's order (``sorted(os.walk(followlinks=True))``).

    Symlinked folders are followed, as torchvision does, but a link back to a folder that contains
    it (``cat/loop -> .``) would list the same images again and again: it is an
    :class:`InputError` naming the link. A file link that points back to itself is one too.
    """
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath)
        for d in dirnames:
            link = os.path.join(dirpath, d)
            if os.path.islink(link):
                target = os.path.realpath(link)
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    raise InputError(f"symlink loop: {link} points to {target}, a folder that contains it; "
                                     "remove the link")
        walked.append((dirpath, filenames))
    files = []
    for dirpath, filenames in sorted(walked):
        for fname in sorted(filenames):
            if fname.lower().endswith(IMG_EXTENSIONS):
                path = Path(dirpath) / fname
                if _is_symlink_loop(path):
                    raise InputError(f"symlink loop: {path} points back to itself; remove the link")
                files.append(path)
    return files


def few_shot_indices(targets: Sequence[int], n_shot: int, seed: int) -> list[int]:
    """Indices of ``n_shot`` items per class, chosen by a seeded per-class permutation.

    Nested: the first ``n`` of the permutation are taken, so the 1-shot set is contained in
    the 2-shot set for the same seed. Returned in ascending index order.
    """
    if int(n_shot) != n_shot or n_shot < 1:
        raise InputError(f"n_shot must be an integer >= 1, got {n_shot!r}")
    labels = np.asarray(targets)
    chosen: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < n_shot:
            raise InputError(f"class {int(label)} has only {members.size} image(s), fewer than the {n_shot} shots "
                             f"asked for (--shots {n_shot})")
        perm = np.random.default_rng([int(seed), int(label)]).permutation(members.size)
        chosen.extend(int(i) for i in members[perm[: int(n_shot)]])
    return sorted(chosen)


@dataclass(frozen=True)
class SourceItem:
    """One real source image: its key in the plan, label and how to load it."""

    source: str | int  # relative POSIX path in the folder, or the dataset index
    label: int
    load: Callable[[], Image.Image]


class ImageSource:
    """Real images to augment: an image folder, or any dataset of ``(PIL image, label)``.

    ``classes`` are the raw class identifiers (folder names); ``class_names`` the readable
    names used in prompts.
    """

    def __init__(self, items: list[SourceItem], classes: Sequence[str], class_names: Sequence[str] | None = None,
                 root: str | None = None):
        self.items = list(items)
        self.classes = list(classes)
        self.class_names = list(class_names) if class_names is not None else [readable_class_name(c) for c in classes]
        self.root = root
        if len(self.class_names) != len(self.classes):
            raise InputError(f"{len(self.class_names)} class names given for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> list[int]:
        return [it.label for it in self.items]

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str]) -> "ImageSource":
        """Scan ``root/<class>/<image>`` in torchvision ImageFolder order."""
        root = Path(root)
        classes, class_to_idx = find_classes(root)
        for name in classes:  # a class name is text (prompts, cache keys); file names below may be any bytes
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"class folder {os.fsencode(root / name)!r} has a name that is not UTF-8 text: "
                                 "a class name goes into prompts and cache keys; rename the folder") from None
        items: list[SourceItem] = []
        for cls_name in classes:
            folder = root / cls_name
            files = _walk_images(folder)
            if not files:
                raise MissingFileError(
                    f"class folder {folder} holds no image file (looked for {', '.join(IMG_EXTENSIONS)})"
                )
            for path in files:
                rel = path.relative_to(root).as_posix()
                items.append(SourceItem(rel, class_to_idx[cls_name], _PathLoader(str(path))))
        return cls(items, classes, root=str(root.resolve()))

    @classmethod
    def from_dataset(cls, dataset: Any, class_names: Sequence[str] | None = None) -> "ImageSource":
        """Wrap any indexable dataset whose items are ``(PIL image, label)``.

        Class names come from ``class_names`` or the dataset's ``classes`` attribute.
        """
        classes = class_names if class_names is not None else getattr(dataset, "classes", None)
        if classes is None:
            raise InputError("class_names are required: the dataset has no `classes` attribute")
        items = [SourceItem(i, _dataset_label(dataset, i), _DatasetLoader(dataset, i)) for i in range(len(dataset))]
        bad = [it.label for it in items if not 0 <= it.label < len(classes)]
        if bad:
            raise InputError(f"label {bad[0]} is outside the {len(classes)} classes given")
        return cls(items, list(classes), class_names=[readable_class_name(str(c)) for c in classes])

    def subset(self, indices: Sequence[int]) -> "ImageSource":
        return ImageSource([self.items[i] for i in indices], self.classes, self.class_names, self.root)

    def few_shot(self, n_shot: int, seed: int) -> "ImageSource":
        """The seeded few-shot subset (see :func:`few_shot_indices`)."""
        try:
            idx = few_shot_indices(self.targets, n_shot, seed)
        except InputError as exc:
            # name the class rather than its index
            m = re.match(r"class (\d+) ", str(exc))
            if m:
                raise InputError(str(exc).replace(f"class {m.group(1)}", f"class {self.classes[int(m.group(1))]!r}", 1)) from None
            raise
        return self.subset(idx)


def _dataset_label(dataset: Any, index: int) -> int:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return int(targets[index])
    return int(dataset[index][1])


class _PathLoader:
    """Picklable loader of one image file."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self) -> Image.Image:
        return load_image(self.path)


class _DatasetLoader:
    def __init__(self, dataset: Any, index: int):
        self.dataset = dataset
        self.index = index

    def __call__(self) -> Image.Image:
        item = self.dataset[self.index]
        img = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(img, Image.Image):
            raise InputError(
                f"dataset item {self.index} is a {type(img).__name__}, expected a PIL image "
                "(wrap the dataset without its tensor transform)"
            )
        return to_rgb(img, f"dataset item {self.index}")
