"""Download the paper's three datasets with torchvision and write them as image folders.

    python examples/prepare_datasets.py --out data                      # all three
    python examples/prepare_datasets.py --out data --datasets pets flowers102
    python examples/prepare_datasets.py --out data --datasets toy       # offline: 2 classes, smoke runs

writes ``OUT/<dataset>/{train,test}/<class>/<index>.jpg`` (torchvision's ``ImageFolder``
layout, which ``dalda-aug`` and ``ImageSource.from_folder`` read) plus ``OUT/<dataset>/classes.json``
(folder name -> readable class name). Class folders are readable names in lower case with
``_`` for spaces (``american_bulldog``, ``pink_primrose``); ``<index>`` is the image's index in
the torchvision dataset. A source file that is a JPEG (by its first bytes) is copied byte for byte,
so the pixels are the original's, as the reference code reads them; any other file is decoded and
written as RGB JPEG (quality 95), and ``classes.json`` counts those (``reencoded``). Needs internet.

Splits (``--split``):

``official`` (default):

* ``pets`` (Oxford-IIIT Pet, 37 classes): the official ``trainval`` -> train, ``test`` -> test.
* ``flowers102`` (Oxford Flowers-102): official ``train`` + ``val`` -> train (20 images per
  class, enough for 16-shot), ``test`` -> test. torchvision has no class names for it: the
  standard 102 names (Nilsback & Zisserman's order, as in the DALDA/DA-Fusion code) are below.
* ``caltech101`` (101 classes, ``BACKGROUND_Google`` left out): there is no official split;
  each class is split in halves by a seeded permutation (``--seed``).

``reference``: the pools the reference code (kkyuhun94/dalda, ``semantic_aug/datasets/``)
halves, each class's files in the reference's order. The reference halves every class by
``np.random.default_rng(seed).permutation`` (one generator per dataset, classes in its class
order) with the *run's* seed, so its halves differ from seed to seed; they are therefore drawn
per seed by ``benchmarks/fewshot.py --protocol reference`` (its ``--eval-split reference`` and
few-shot draw), not fixed here:

* ``pets``: ``train/`` = all of ``trainval`` (the reference trains on the first half of each
  class's permutation), ``test/`` = all of ``test`` (it validates on the second half of a
  permutation of ``test``), both in the annotation files' order. The same files as ``official``.
* ``flowers102``: ``all/`` = all 8,189 images pooled, ignoring the official splits, in the
  order of their file names (``image_00001.jpg`` ...; the reference sorts its ``glob``); training
  and validation are the two halves of one permutation per class. Use ``fewshot.py --data
  OUT/flowers102/all``.
* ``caltech101``: ``all/`` = every image of the 101 classes in the order Python's ``glob``
  lists ``101_ObjectCategories/*/*.jpg`` on this machine, as the reference reads them (a
  filesystem's own order: the same extracted folder gives the same order, another filesystem may
  not); files are numbered in that order and ``classes.json`` records each one's original name.

``classes.json`` says whether the folder holds the pool the reference permutes (``reference_pool``:
true for ``--split reference`` and for Pets either way), which ``fewshot.py`` records per result
row (``pool``). It lists the classes in the reference's class order (the original label order;
for Flowers-102 not alphabetical), which ``fewshot.py`` reads for the reference draws. Few-shot
subsets are drawn later (``dalda-aug plan --shots N``, or ``benchmarks/fewshot.py --shots``),
not here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

DATASETS = ("pets", "caltech101", "flowers102")
# Offline and tiny, for smoke runs on a CPU (benchmarks/README.md); not in the default set.
TOY = "toy"
# toy: class folder -> the scikit-image photo it is cut from.
TOY_PHOTOS = {"cat": "chelsea", "coffee_cup": "coffee"}

# Oxford Flowers-102 class names, index = label in imagelabels.mat minus one.
FLOWERS102_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
]


def folder_name(readable: str) -> str:
    """``"American Bulldog"`` -> ``"american_bulldog"`` (``readable_class_name`` undoes it)."""
    return "_".join(readable.lower().replace("/", " ").split())


JPEG_MAGIC = b"\xff\xd8\xff"


def save_image(src: Path, dest: Path) -> bool:
    """Write ``src`` as the JPEG ``dest``: a JPEG file byte for byte; anything else decoded and
    saved as RGB JPEG quality 95. Returns whether it was copied."""
    import shutil

    from PIL import Image

    with open(src, "rb") as fh:
        is_jpeg = fh.read(len(JPEG_MAGIC)) == JPEG_MAGIC
    if is_jpeg:
        shutil.copyfile(src, dest)
        return True
    with Image.open(src) as img:
        img.convert("RGB").save(dest, quality=95)
    return False


def write_split(paths: Sequence[Path], indices: Sequence[int], labels: Sequence[int], names: Sequence[str],
                out_dir: Path, desc: str) -> tuple[int, int]:
    """Write the file ``paths[i]`` for every ``i`` in ``indices`` as ``out_dir/<class>/<i>.jpg``
    (:func:`save_image`); (files written, files re-encoded)."""
    from tqdm.auto import tqdm

    for name in names:
        (out_dir / folder_name(name)).mkdir(parents=True, exist_ok=True)
    copied = sum(save_image(Path(paths[i]), out_dir / folder_name(names[labels[i]]) / f"{i:05d}.jpg")
                 for i in tqdm(indices, desc=desc, unit="img"))
    return len(indices), len(indices) - copied


def prepare_pets(root: Path, out: Path) -> dict:
    from torchvision.datasets import OxfordIIITPet

    counts, reencoded = {}, 0
    for split, target in (("trainval", "train"), ("test", "test")):
        ds = OxfordIIITPet(str(root), split=split, target_types="category", download=True)
        labels = ds._labels  # noqa: SLF001 - avoids decoding every image
        counts[target], n_reencoded = write_split(ds._images, range(len(ds)), labels, ds.classes,  # noqa: SLF001
                                                  out / target, f"pets/{target}")
        reencoded += n_reencoded
    return {"classes": ds.classes, "counts": counts, "reencoded": reencoded}


def prepare_flowers102(root: Path, out: Path) -> dict:
    from torchvision.datasets import Flowers102

    counts, reencoded = {"train": 0}, 0
    for split, target in (("train", "train"), ("val", "train"), ("test", "test")):
        ds = Flowers102(str(root), split=split, download=True)
        labels = ds._labels  # noqa: SLF001 - avoids decoding every image
        n, n_reencoded = write_split(ds._image_files, range(len(ds)), labels, FLOWERS102_CLASSES,  # noqa: SLF001
                                     out / target, f"flowers102/{split}")
        counts[target] = counts.get(target, 0) + n
        reencoded += n_reencoded
    return {"classes": FLOWERS102_CLASSES, "counts": counts, "reencoded": reencoded}


def _copy_as_jpeg(files: Sequence[tuple[Path, str, str]], out_dir: Path, desc: str) -> tuple[int, int]:
    """Write each ``(source file, class folder, file stem)`` as ``out_dir/<class>/<stem>.jpg``
    (:func:`save_image`); (files written, files re-encoded)."""
    from tqdm.auto import tqdm

    copied = 0
    for src, folder, stem in tqdm(files, desc=desc, unit="img"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        copied += save_image(Path(src), out_dir / folder / f"{stem}.jpg")
    return len(files), len(files) - copied


def prepare_flowers102_reference(root: Path, out: Path) -> dict:
    """All 8,189 images in one pool ``out/all``, named by image id (the reference's sorted order)."""
    from torchvision.datasets import Flowers102

    pooled: dict[int, tuple[Path, int]] = {}
    for split in ("train", "val", "test"):
        ds = Flowers102(str(root), split=split, download=True)
        for path, label in zip(ds._image_files, ds._labels):  # noqa: SLF001 - file names, no decoding
            pooled[int(Path(path).stem.split("_")[-1])] = (Path(path), int(label))
    files = [(path, folder_name(FLOWERS102_CLASSES[label]), f"{image_id:05d}")
             for image_id, (path, label) in sorted(pooled.items())]
    count, reencoded = _copy_as_jpeg(files, out / "all", "flowers102/all")
    return {"classes": FLOWERS102_CLASSES, "counts": {"all": count}, "split": "reference", "reencoded": reencoded}


def caltech101_reference_files(categories_dir: Path) -> dict[str, list[Path]]:
    """The reference's file lists: ``glob(categories_dir/*/*.jpg)`` in glob's order, grouped by
    ``folder.lower().replace("_", " ")``, the background class left out."""
    import glob
    import os

    by_class: dict[str, list[Path]] = {}
    for path in glob.glob(os.path.join(str(categories_dir), "*/*.jpg")):
        name = Path(path).parent.name.lower().replace("_", " ")
        if name != "background google":
            by_class.setdefault(name, []).append(Path(path))
    return by_class


def prepare_caltech101_reference(root: Path, out: Path) -> dict:
    from torchvision.datasets import Caltech101

    ds = Caltech101(str(root), target_type="category", download=True)
    by_class = caltech101_reference_files(Path(ds.root) / "101_ObjectCategories")
    names = sorted(by_class)  # the reference's class list is these names in alphabetical order
    files, original = [], {}
    for name in names:
        for rank, path in enumerate(by_class[name]):
            files.append((path, folder_name(name), f"{rank:05d}"))
            original[f"{folder_name(name)}/{rank:05d}.jpg"] = f"{path.parent.name}/{path.name}"
    count, reencoded = _copy_as_jpeg(files, out / "all", "caltech101/all")
    return {"classes": names, "counts": {"all": count}, "split": "reference", "original_files": original,
            "reencoded": reencoded}


def prepare_caltech101(root: Path, out: Path, seed: int) -> dict:
    import numpy as np
    from torchvision.datasets import Caltech101

    ds = Caltech101(str(root), target_type="category", download=True)
    names = [c.replace("_", " ") for c in ds.categories]  # "car_side" -> "car side", "Faces_easy" -> ...
    labels = list(ds.y)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(len(names)):
        members = np.flatnonzero(np.asarray(labels) == c)
        halves = np.array_split(members[rng.permutation(members.size)], 2)
        train += sorted(halves[0].tolist())
        test += sorted(halves[1].tolist())
    paths = [Path(ds.root) / "101_ObjectCategories" / ds.categories[y] / f"image_{k:04d}.jpg"
             for y, k in zip(ds.y, ds.index)]  # as torchvision's Caltech101.__getitem__ opens them
    (n_train, r_train), (n_test, r_test) = (write_split(paths, train, labels, names, out / "train", "caltech101/train"),
                                            write_split(paths, test, labels, names, out / "test", "caltech101/test"))
    return {"classes": names, "counts": {"train": n_train, "test": n_test}, "split_seed": seed,
            "reencoded": r_train + r_test}


def prepare_toy(out: Path, per_split: int = 3) -> dict:
    """``toy``: two classes (cat, coffee cup), ``per_split`` crops per class and split of two photos
    that ship with scikit-image, 48x40 px; the test crops are other crops than the train ones.
    Offline, for smoke runs on a CPU."""
    from PIL import Image
    from skimage import data

    counts = {}
    for split, offset in (("train", 0), ("test", per_split)):
        for folder, photo in TOY_PHOTOS.items():
            img = Image.fromarray(getattr(data, photo)()).convert("RGB")
            w, h = img.size
            (out / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(per_split):
                k = offset + i
                box = (k * w // 12, k * h // 16, w // 2 + k * w // 12, h // 2 + k * h // 16)
                img.crop(box).resize((48, 40)).save(out / split / folder / f"{i}.jpg", quality=95)
        counts[split] = per_split * len(TOY_PHOTOS)
    return {"classes": [folder.replace("_", " ") for folder in TOY_PHOTOS], "counts": counts}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Download Pets / Caltech-101 / Flowers-102 with torchvision and write "
                    "OUT/<dataset>/{train,test}/<class>/<index>.jpg image folders (needs internet).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--datasets", nargs="+", choices=(*DATASETS, TOY), default=list(DATASETS),
                        help="which datasets to prepare (default: the paper's three); toy: two classes cut from "
                             "scikit-image's photos, offline, for smoke runs")
    parser.add_argument("--download-root", type=Path, default=None,
                        help="where torchvision downloads the archives (default: OUT/_downloads)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Caltech-101 train/test split (official)")
    parser.add_argument("--split", choices=("official", "reference"), default="official",
                        help="official: the official Pets/Flowers splits, Caltech-101 halved by --seed; reference: "
                             "the pools the reference code halves per seed, in its file order (see the docstring)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite a dataset folder that already exists")
    args = parser.parse_args(argv)

    root = args.download_root or args.out / "_downloads"
    if set(args.datasets) - {TOY}:
        root.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        out = args.out / name
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            print(f"{out} exists; skipping {name} (use --overwrite to rewrite it)")
            continue
        if name == TOY:
            info = prepare_toy(out)
        elif name == "pets":
            info = {**prepare_pets(root, out), "split": args.split}
        elif name == "flowers102":
            info = prepare_flowers102(root, out) if args.split == "official" else prepare_flowers102_reference(root, out)
        elif args.split == "official":
            info = prepare_caltech101(root, out, args.seed)
        else:
            info = prepare_caltech101_reference(root, out)
        info.setdefault("split", args.split)
        # Pets: --split official writes the same files as reference
        info["reference_pool"] = info["split"] == "reference" or name == "pets"
        classes = {folder_name(c): c for c in info.pop("classes")}
        (out / "classes.json").write_text(
            json.dumps({"dataset": name, "classes": classes, **info}, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8")
        print(f"{name}: {info['counts']} images written under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
