"""Your own digit: hf.read_digit_image prepares any image file the way MNIST's digits were (inverted when the paper is
light, cropped, 20 pixels on its longer side, centred by mass in 28x28), hf.class_probabilities returns probabilities,
and predict.py reports user errors in one line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import helper_functions as hf
import predict
from conftest import REPO


def draw_seven(path: Path, size=(200, 150), ink=(20, 20, 20), paper=(255, 255, 255), mode="RGB", width=12):
    """A hand-drawn-looking 7 off-centre on a canvas: a top bar and a slanted stroke."""
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    draw.line([(40, 30), (110, 30)], fill=ink, width=width)  # the bar
    draw.line([(110, 30), (70, 130)], fill=ink, width=width)  # the stroke
    image.save(path)
    return path


def pixels(tensor):
    """Undo MNIST's normalisation: values in [0, 1], ink light."""
    return tensor[0] * hf.MNIST_STD + hf.MNIST_MEAN  # (28, 28)


def centre_of_mass(image):
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    return (ys * image).sum() / image.sum(), (xs * image).sum() / image.sum()


def test_dark_ink_on_white_paper_is_inverted_cropped_scaled_and_centred_by_mass(tmp_path):
    prepared = hf.read_digit_image(draw_seven(tmp_path / "seven.png"))
    assert prepared.shape == (1, 28, 28) and prepared.dtype == torch.float32
    image = pixels(prepared)
    assert image[0, 0] < 0.01 and image.max() > 0.9  # black background, light ink: inverted like MNIST
    rows, cols = torch.nonzero(image > 0.05, as_tuple=True)
    assert max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) in (20, 21)  # longer side 20 (+ blur)
    cy, cx = centre_of_mass(image)
    assert abs(cy - 14) < 1 and abs(cx - 14) < 1, (cy, cx)


@pytest.mark.parametrize("kind", ["light ink on black", "colour JPEG", "grey PNG", "dark ink on transparency",
                                  "light ink on transparency"])
def test_every_kind_of_image_gives_the_same_light_on_black_digit(tmp_path, kind):
    reference = pixels(hf.read_digit_image(draw_seven(tmp_path / "seven.png")))
    path = {
        "light ink on black": lambda: draw_seven(tmp_path / "a.png", ink=(250, 250, 250), paper=(0, 0, 0)),
        "colour JPEG": lambda: draw_seven(tmp_path / "b.jpg", ink=(30, 30, 160), paper=(250, 240, 200)),
        "grey PNG": lambda: draw_seven(tmp_path / "c.png", ink=40, paper=230, mode="L"),
        "dark ink on transparency": lambda: draw_seven(tmp_path / "d.png", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0),
                                                       mode="RGBA"),
        "light ink on transparency": lambda: draw_seven(tmp_path / "e.png", ink=(255, 255, 255, 255),
                                                        paper=(255, 255, 255, 0), mode="RGBA"),
    }[kind]()
    image = pixels(hf.read_digit_image(path))
    assert image[0, 0] < 0.05 and image.max() > 0.8
    cy, cx = centre_of_mass(image)
    assert abs(cy - 14) < 1 and abs(cx - 14) < 1, (kind, cy, cx)
    # the same digit, whatever the file looked like (JPEG's blur may move it by a pixel); a 1 scores about 0.34
    assert torch.cosine_similarity(image.flatten(), reference.flatten(), dim=0) > 0.75, kind


def test_class_probabilities_of_a_model_or_of_one_loaded_from_its_checkpoint(tmp_path, tiny_vit):
    tiny = tiny_vit()
    path = draw_seven(tmp_path / "seven.png")
    probabilities = hf.class_probabilities(tiny, path)
    assert probabilities.shape == (10,) and torch.all(probabilities >= 0)
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)
    checkpoint = hf.load_checkpoint(hf.save_model(tiny, tmp_path / "tiny.pth", mean=hf.MNIST_MEAN, std=hf.MNIST_STD))
    loaded = hf.class_probabilities(hf.load_model(checkpoint), path, checkpoint["mean"], checkpoint["std"])
    torch.testing.assert_close(loaded, probabilities)
    with pytest.raises(TypeError, match="load a saved one with hf.load_model"):
        hf.class_probabilities(tmp_path / "tiny.pth", path)


def test_a_missing_file_or_a_non_image_names_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no image file at .*missing\.png.*PNG or JPEG"):
        hf.read_digit_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png is not an image .*PNG or JPEG"):
        hf.read_digit_image(tmp_path / "notes.png")
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    with pytest.raises(ValueError, match="found no digit"):
        hf.read_digit_image(tmp_path / "blank.png")


def run_predict(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_predict_py_prints_the_top_classes(tmp_path, tiny_vit):
    tiny = tiny_vit()
    model = hf.save_model(tiny, tmp_path / "tiny.pth", mean=hf.MNIST_MEAN, std=hf.MNIST_STD, dataset="mnist")
    done = run_predict(draw_seven(tmp_path / "seven.png"), "--model", model, "--top", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.strip().endswith("%") for line in lines[1:])


def test_predict_py_prints_the_class_names_the_run_saved(tmp_path, tiny_vit, capsys):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    model = hf.save_model(tiny_vit(), tmp_path / "named.pth", mean=hf.MNIST_MEAN, std=hf.MNIST_STD, classes=names)
    pairs = predict.main([str(draw_seven(tmp_path / "seven.png")), "--model", str(model), "--top", "10"])
    printed = [line.strip().split(":")[0] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert printed == [names[c] for c, _ in pairs], "each class by the name the run saved, most likely first"


def test_predict_py_without_a_model_says_how_to_train_one_in_one_line(tmp_path):
    done = run_predict(draw_seven(tmp_path / "seven.png"), "--model", tmp_path / "none.pth", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "python train.py" in done.stderr and "Traceback" not in done.stderr


def test_predict_py_with_a_bad_image_names_it_in_one_line(tmp_path, tiny_vit):
    model = hf.save_model(tiny_vit(), tmp_path / "m.pth")
    (tmp_path / "photo.jpg").write_bytes(b"\x00" * 100)
    done = run_predict(tmp_path / "photo.jpg", "--model", model, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "photo.jpg" in done.stderr
    assert "Traceback" not in done.stderr
