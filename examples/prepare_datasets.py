"""Download the paper's three datasets with torchvision and write them as image folders.

    python examples/prepare_datasets.py --out data                      # all three
    python examples/prepare_datasets.py --out data --datasets pets flowers102

writes ``OUT/<dataset>/{train,test}/<class>/<index>.jpg`` (torchvision's ``ImageFolder``
layout, which ``dalda-aug`` and ``ImageSource.from_folder`` read) plus ``OUT/<dataset>/classes.json``
(folder name -> readable class name). Class folders are readable names in lower case with
``_`` for spaces (``american_bulldog``, ``pink_primrose``); ``<index>`` is the image's index in
the torchvision dataset. Images are re-encoded as RGB JPEG (quality 95). Needs internet.

Splits:

* ``pets`` (Oxford-IIIT Pet, 37 classes): the official ``trainval`` -> train, ``test`` -> test.
* ``flowers102`` (Oxford Flowers-102): official ``train`` + ``val`` -> train (20 images per
  class, enough for 16-shot), ``test`` -> test. torchvision has no class names for it: the
  standard 102 names (Nilsback & Zisserman's order, as in the DALDA/DA-Fusion code) are below.
* ``caltech101`` (101 classes, ``BACKGROUND_Google`` left out): there is no official split;
  each class is split in halves by a seeded permutation (``--seed``), as the reference code does.

The reference code (kkyuhun94/dalda, ``semantic_aug/datasets/``) splits every class in halves by
one seeded permutation per dataset: Pets trains on the first half of ``trainval`` and validates
on the second half of ``test``; Flowers-102 pools all 8,189 images (ignoring the official
splits) and Caltech-101 its 101 classes, each split in halves; validation draws 6,400 images
with replacement from the validation half every epoch. We keep the official Pets and Flowers
splits and evaluate on the whole test split; only Caltech-101, which has no official split, is
halved the reference's way (one seeded permutation per class in turn; the reference lists files
in ``glob`` order, so its halves themselves are not reproducible). Few-shot subsets are drawn
later (``dalda-aug plan --shots N``, or ``benchmarks/fewshot.py --shots``), not here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

DATASETS = ("pets", "caltech101", "flowers102")

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


def write_split(dataset, indices: Sequence[int], labels: Sequence[int], names: Sequence[str],
                out_dir: Path, desc: str) -> int:
    """Save ``dataset[i]`` for every ``i`` in ``indices`` as ``out_dir/<class>/<i>.jpg``."""
    from tqdm.auto import tqdm

    for name in names:
        (out_dir / folder_name(name)).mkdir(parents=True, exist_ok=True)
    for i in tqdm(indices, desc=desc, unit="img"):
        img, _ = dataset[i]
        img.convert("RGB").save(out_dir / folder_name(names[labels[i]]) / f"{i:05d}.jpg", quality=95)
    return len(indices)


def prepare_pets(root: Path, out: Path) -> dict:
    from torchvision.datasets import OxfordIIITPet

    counts = {}
    for split, target in (("trainval", "train"), ("test", "test")):
        ds = OxfordIIITPet(str(root), split=split, target_types="category", download=True)
        labels = ds._labels  # noqa: SLF001 - avoids decoding every image
        counts[target] = write_split(ds, range(len(ds)), labels, ds.classes, out / target, f"pets/{target}")
    return {"classes": ds.classes, "counts": counts}


def prepare_flowers102(root: Path, out: Path) -> dict:
    from torchvision.datasets import Flowers102

    counts = {"train": 0}
    for split, target in (("train", "train"), ("val", "train"), ("test", "test")):
        ds = Flowers102(str(root), split=split, download=True)
        labels = ds._labels  # noqa: SLF001 - avoids decoding every image
        n = write_split(ds, range(len(ds)), labels, FLOWERS102_CLASSES, out / target, f"flowers102/{split}")
        counts[target] = counts.get(target, 0) + n
    return {"classes": FLOWERS102_CLASSES, "counts": counts}


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
    counts = {
        "train": write_split(ds, train, labels, names, out / "train", "caltech101/train"),
        "test": write_split(ds, test, labels, names, out / "test", "caltech101/test"),
    }
    return {"classes": names, "counts": counts, "split_seed": seed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Download Pets / Caltech-101 / Flowers-102 with torchvision and write "
                    "OUT/<dataset>/{train,test}/<class>/<index>.jpg image folders (needs internet).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="which datasets to prepare (default: all)")
    parser.add_argument("--download-root", type=Path, default=None,
                        help="where torchvision downloads the archives (default: OUT/_downloads)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Caltech-101 train/test split")
    parser.add_argument("--overwrite", action="store_true", help="rewrite a dataset folder that already exists")
    args = parser.parse_args(argv)

    root = args.download_root or args.out / "_downloads"
    root.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        out = args.out / name
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            print(f"{out} exists; skipping {name} (use --overwrite to rewrite it)")
            continue
        if name == "pets":
            info = prepare_pets(root, out)
        elif name == "flowers102":
            info = prepare_flowers102(root, out)
        else:
            info = prepare_caltech101(root, out, args.seed)
        classes = {folder_name(c): c for c in info.pop("classes")}
        (out / "classes.json").write_text(
            json.dumps({"dataset": name, "classes": classes, **info}, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8")
        print(f"{name}: {info['counts']} images written under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
