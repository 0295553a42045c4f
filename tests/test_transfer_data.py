"""train_transferlearning.py --data: your own images in torchvision's ImageFolder layout. A small folder of three
shapes trains end to end and saves a three-class model with its class names; the test images are its test/ folder or
a fixed, stratified fifth of each class; and every folder that cannot train a classifier is refused in one line,
before anything is trained or written."""
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

import helper_functions as hf
import machinery
import train_transferlearning
from conftest import REPO

SHAPES = ("circle", "cross", "square")  # sorted, as ImageFolder numbers its classes


def draw(shape: str, path, seed: int) -> None:
    """A 20x20 PNG of one shape in its own colour, at a random place and size (seeded)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (20, 20), "black")
    pen = ImageDraw.Draw(image)
    x, y, size = rng.randint(1, 6), rng.randint(1, 6), rng.randint(9, 12)
    if shape == "circle":
        pen.ellipse((x, y, x + size, y + size), fill=(255, 60, 60))
    elif shape == "square":
        pen.rectangle((x, y, x + size, y + size), fill=(60, 255, 60))
    else:
        pen.line((x, y, x + size, y + size), fill=(90, 90, 255), width=3)
        pen.line((x, y + size, x + size, y), fill=(90, 90, 255), width=3)
    image.save(path)


def shapes_folder(root, per_class: int = 12, shapes=SHAPES):
    """``root``/<shape>/<n>.png: ``per_class`` images of each shape."""
    for label, shape in enumerate(shapes):
        (root / shape).mkdir(parents=True)
        for n in range(per_class):
            draw(shape, root / shape / f"{n}.png", seed=100 * label + n)
    return root


def test_a_folder_of_three_shapes_trains_end_to_end_and_saves_three_classes_with_their_names(tmp_path, tiny_vit):
    data = shapes_folder(tmp_path / "shapes")
    hf.save_model(tiny_vit(), tmp_path / "tiny.pth", dataset="fashion-mnist")
    argv = ["--data", str(data), "--pretrained", str(tmp_path / "tiny.pth"), "--epochs", "2", "--batch-size", "8",
            "--out-dir", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run([sys.executable, str(REPO / "train_transferlearning.py"), *argv], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "27 labelled training images, 3 validation images, 6 test images, 3 classes" in done.stdout

    name = "vit_shapes_finetune"
    checkpoint = hf.load_checkpoint(tmp_path / "out" / f"{name}.pth")
    assert checkpoint["classes"] == list(SHAPES) and checkpoint["config"]["num_classes"] == 3
    assert (checkpoint["dataset"], checkpoint["mean"], checkpoint["std"]) == (str(data), hf.MNIST_MEAN, hf.MNIST_STD)
    assert (checkpoint["recipe"]["num_labels"], checkpoint["recipe"]["val_split"]) == (27, 3)
    assert len(checkpoint["history"]["val_acc"]) == 2 and isinstance(checkpoint["history"]["final_test_acc"], float)
    assert hf.load_model(checkpoint)(torch.zeros(1, 1, 28, 28)).shape == (1, 3)

    # A second run under the same name is refused before it trains, and leaves the first run's files as they were
    saved = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        train_transferlearning.main(argv)
    assert exit_info.value.code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == saved


def test_without_train_and_test_a_fixed_fifth_of_each_class_is_the_test_set(tmp_path):
    data = shapes_folder(tmp_path / "shapes", per_class=10)
    assert machinery.check_image_folder(data) == 3 * 8
    train, test, classes = machinery.image_folder_splits(data, 28, 1, hf.MNIST_MEAN, hf.MNIST_STD)
    assert classes == list(SHAPES) and (len(train), len(test)) == (24, 6)
    assert sorted(test.dataset.targets[i] for i in test.indices) == [0, 0, 1, 1, 2, 2], "two of each class"
    assert not set(train.indices) & set(test.indices)
    again, _, _ = machinery.image_folder_splits(data, 224, 3, [0.5] * 3, [0.5] * 3)
    assert again.indices == train.indices, "the same split every run"
    assert train[0][0].shape == (1, 28, 28) and again[0][0].shape == (3, 224, 224)


def test_a_folder_with_train_and_test_uses_them(tmp_path):
    shapes_folder(tmp_path / "shapes" / "train", per_class=4)
    shapes_folder(tmp_path / "shapes" / "test", per_class=2)
    assert machinery.check_image_folder(tmp_path / "shapes") == 12
    train, test, classes = machinery.image_folder_splits(tmp_path / "shapes", 28, 1, 0.5, 0.5)
    assert classes == list(SHAPES) and (len(train), len(test)) == (12, 6)
    assert str(test.dataset.root).endswith("test")


# Folders that cannot train a classifier: one line naming the problem and the fix, exit code 2, nothing trained --------
def missing(root):
    return root / "nowhere"


def a_file(root):
    (root / "images.zip").write_bytes(b"PK")
    return root / "images.zip"


def empty(root):
    (root / "empty").mkdir()
    return root / "empty"


def one_class(root):
    return shapes_folder(root / "shapes", shapes=("circle",))


def a_class_without_images(root):
    shapes_folder(root / "shapes")
    (root / "shapes" / "triangle").mkdir()
    (root / "shapes" / "triangle" / "notes.txt").write_text("to do: draw triangles")
    return root / "shapes"


def a_damaged_image(root):
    shapes_folder(root / "shapes")
    (root / "shapes" / "square" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return root / "shapes"


def train_without_test(root):
    shapes_folder(root / "shapes" / "train")
    return root / "shapes"


def train_and_test_with_other_classes(root):
    shapes_folder(root / "shapes" / "train")
    shapes_folder(root / "shapes" / "test", shapes=("circle", "square"))
    return root / "shapes"


def a_class_of_one_image(root):
    shapes_folder(root / "shapes")
    shapes_folder(root / "shapes", per_class=1, shapes=("star",))
    return root / "shapes"


@pytest.mark.parametrize("folder, message", [
    (missing, "nowhere: no such folder; pass a folder with one sub-folder of images per class"),
    (a_file, "images.zip is a file, not a folder; pass a folder with"),
    (empty, "empty has no class sub-folders; a classifier needs at least two classes"),
    (one_class, "shapes has only one class sub-folder (circle); a classifier needs at least two classes"),
    (a_class_without_images, "triangle holds no images (ImageFolder reads .jpg, .jpeg, .png"),
    (a_damaged_image, "3.png is not an image Pillow can read (UnidentifiedImageError"),
    (train_without_test, "shapes has a train/ folder but no test/; add test/ with the same class sub-folders"),
    (train_and_test_with_other_classes, "train/ has the classes ['circle', 'cross', 'square'] but test/ has"),
    (a_class_of_one_image, "star has only 1 image, and a fifth of each class"),
])
def test_a_folder_that_cannot_train_a_classifier_is_refused_in_one_line_before_training(folder, message, tmp_path,
                                                                                        capsys, monkeypatch):
    monkeypatch.setattr(machinery, "image_folder_splits", lambda *a, **k: pytest.fail("images were loaded"))
    with pytest.raises(SystemExit) as exit_info:
        train_transferlearning.main(["--data", str(folder(tmp_path)), "--scratch", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists(), "nothing was written"


def test_num_labels_with_data_is_refused_as_a_contradiction(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_transferlearning.main(["--data", str(tmp_path), "--num-labels", "500", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --num-labels: not allowed with argument --data" in err
