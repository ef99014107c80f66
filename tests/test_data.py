import numpy as np
import pytest
from PIL import Image

from dalda_aug.data import ImageSource, few_shot_indices, image_sha256, load_image, readable_class_name
from dalda_aug.errors import ImageError, InputError, MissingFileError


def _write_folder(root, layout, size=(24, 20)):
    rng = np.random.default_rng(0)
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / cls / name)
    return root


def test_folder_order_matches_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    _write_folder(tmp_path, {"b_dog": ["2.png", "10.png", "a.jpg"], "a_cat": ["x.png"], "c": ["z.bmp", "y.webp"]})
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    src = ImageSource.from_folder(tmp_path)
    ref = ImageFolder(tmp_path)
    assert src.classes == ref.classes
    assert [str(tmp_path / it.source) for it in src.items] == [p for p, _ in ref.samples]
    assert src.targets == ref.targets
    assert src.class_names == ["a cat", "b dog", "c"]


def test_readable_class_name():
    assert readable_class_name("american_bulldog") == "american bulldog"
    assert readable_class_name("001.ak47") == "ak47"
    assert readable_class_name("Great__Pyrenees") == "Great Pyrenees"


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        ImageSource.from_folder(tmp_path / "nope")
    with pytest.raises(MissingFileError, match="Couldn't find any class folder"):
        ImageSource.from_folder(tmp_path)
    _write_folder(tmp_path, {"cat": ["1.png"]})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("x")
    with pytest.raises(MissingFileError, match=r"dog.*holds no image"):
        ImageSource.from_folder(tmp_path)


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        load_image(bad)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageError, match="trunc.jpg"):
        load_image(trunc)
    with pytest.raises(MissingFileError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_modes_are_converted(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg")
    img = load_image(tmp_path / "cmyk.jpg")
    assert img.mode == "RGB" and img.getpixel((4, 4))[0] > 200 and img.getpixel((4, 4))[1] < 60

    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    arr16[:4] = 0
    Image.fromarray(arr16).save(tmp_path / "grey16.png")
    img = load_image(tmp_path / "grey16.png")
    assert img.mode == "RGB" and img.getpixel((0, 7)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 0)

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    img = load_image(tmp_path / "alpha.png")
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((7, 0)) == (255, 255, 255)


def test_image_sha256_is_pixel_based():
    a = Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8))
    assert image_sha256(a) == image_sha256(a.convert("RGBA"))
    b = a.copy()
    b.putpixel((0, 0), (1, 0, 0))
    assert image_sha256(a) != image_sha256(b)
    assert image_sha256(a) != image_sha256(Image.fromarray(np.zeros((5, 4, 3), dtype=np.uint8)))


def test_few_shot_is_seeded_nested_and_validated():
    targets = [0] * 5 + [1] * 7 + [2] * 3
    one = few_shot_indices(targets, 1, seed=0)
    two = few_shot_indices(targets, 2, seed=0)
    assert len(one) == 3 and len(two) == 6 and set(one) <= set(two)
    assert sorted(targets[i] for i in two) == [0, 0, 1, 1, 2, 2]
    assert few_shot_indices(targets, 2, seed=0) == two
    assert any(few_shot_indices(targets, 2, seed=s) != two for s in range(1, 6))
    with pytest.raises(InputError, match=r"fewer than the 4 shots asked for \(--shots 4\)"):
        few_shot_indices(targets, 4, seed=0)
    with pytest.raises(InputError, match="n_shot"):
        few_shot_indices(targets, 0, seed=0)


def test_few_shot_error_names_the_class(tmp_path):
    _write_folder(tmp_path, {"cat": ["1.png", "2.png"], "dog": ["1.png"]})
    with pytest.raises(InputError, match="'dog'"):
        ImageSource.from_folder(tmp_path).few_shot(2, seed=0)


def test_from_dataset():
    imgs = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(4)]

    class DS:
        classes = ["tabby_cat", "dog"]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return imgs[i], i % 2

    src = ImageSource.from_dataset(DS())
    assert src.targets == [0, 1, 0, 1] and src.class_names == ["tabby cat", "dog"]
    assert [it.source for it in src.items] == [0, 1, 2, 3]
    assert src.items[2].load().getpixel((0, 0)) == (2, 0, 0)
    with pytest.raises(InputError, match="class_names"):
        ImageSource.from_dataset([(imgs[0], 0)])


def test_symlinked_folders_are_followed_like_torchvision_but_loops_are_refused(tmp_path):
    """Issue 11.12: ``cat/loop -> .`` made ``plan`` list 84 rows for 6 images."""
    import os
    import subprocess
    import sys

    from torchvision.datasets import ImageFolder

    elsewhere = _write_folder(tmp_path / "elsewhere", {"more": ["m1.png", "m2.png"]})
    root = _write_folder(tmp_path / "data", {"cat": ["1.png", "2.png", "3.png"], "dog": ["4.png", "5.png", "6.png"]})
    os.symlink(elsewhere / "more", root / "dog" / "more")  # a link to another folder: followed, as torchvision does
    src = ImageSource.from_folder(root)
    assert [str(root / it.source) for it in src.items] == [p for p, _ in ImageFolder(root).samples]
    assert len(src) == 8

    os.symlink(".", root / "cat" / "loop")
    with pytest.raises(InputError, match=r"symlink loop: .*cat/loop"):
        ImageSource.from_folder(root)
    proc = subprocess.run([sys.executable, "-m", "dalda_aug", "plan", "--data", str(root), "--out",
                           str(tmp_path / "plan"), "--scaling", "fixed:0.5"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "symlink loop" in proc.stderr and "cat/loop" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "plan" / "plan.jsonl").exists()

    os.remove(root / "cat" / "loop")
    os.symlink(root.parent / "data" / "cat", root / "cat" / "up")  # a link to its own folder by absolute path
    with pytest.raises(InputError, match=r"symlink loop: .*cat/up"):
        ImageSource.from_folder(root)
    os.remove(root / "cat" / "up")

    selfie = root / "cat" / "self.png"
    os.symlink(selfie, selfie)
    with pytest.raises(InputError, match=r"symlink loop: .*self\.png points back to itself"):
        ImageSource.from_folder(root)
    with pytest.raises(ImageError, match=r"self\.png.*symlink loop"):
        load_image(selfie)


def test_hidden_class_folders(tmp_path):
    """Issue 11.13: torchvision counts ``.ipynb_checkpoints`` as a class; a plan that skips it would
    disagree with the dataset's labels, so a hidden folder holding images is named as the cause."""
    from torchvision.datasets import ImageFolder

    root = _write_folder(tmp_path, {"cat": ["1.png"], "dog": ["2.png"]})
    (root / ".cache").mkdir()  # hidden, no image: skipped
    (root / ".cache" / "notes.txt").write_text("x")
    assert ImageSource.from_folder(root).classes == ["cat", "dog"]
    (root / ".cache" / "notes.txt").unlink()
    (root / ".cache").rmdir()
    _write_folder(root, {".ipynb_checkpoints": ["1-checkpoint.png"]})
    assert ImageFolder(root).classes[0] == ".ipynb_checkpoints"  # why it matters: labels shift
    with pytest.raises(InputError, match=r"hidden folder .*\.ipynb_checkpoints holds images"):
        ImageSource.from_folder(root)
