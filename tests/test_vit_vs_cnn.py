"""Notebook 10's pieces: a CNN the size of our MNIST ViT, copyable from the notebook; pixel shuffling that moves every
pixel and can be undone; the shared training call; and the benchmark script's smoke run."""
import ast
import inspect
import json
import subprocess
import sys

import pytest
import torch

import helper_functions as hf
from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "10_vit_vs_cnn.ipynb"


def test_the_cnn_has_about_as_many_parameters_as_the_mnist_vit():
    cnn, vit = hf.count_parameters(hf.SmallCNN()), hf.count_parameters(hf.vit_from_config("vit_mnist"))
    assert abs(cnn - vit) / vit < 0.05, (cnn, vit)
    assert hf.SmallCNN()(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_notebook_10s_cnn_cell_is_the_helper_source_and_runs_alone_with_standard_imports(tmp_path):
    cells = ["".join(cell["source"]) for cell in json.loads(NOTEBOOK.read_text())["cells"]
             if cell["cell_type"] == "code"]
    cell = next(source for source in cells if "class SmallCNN" in source)
    node = next(n for n in ast.parse(cell).body if isinstance(n, ast.ClassDef) and n.name == "SmallCNN")
    in_notebook = "\n".join(cell.splitlines()[node.lineno - 1:node.end_lineno])
    assert in_notebook == inspect.getsource(hf.SmallCNN).rstrip("\n")
    script = cell + "\nprint(tuple(SmallCNN()(torch.randn(2, 1, 28, 28)).shape))"
    env = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH: helper_functions.py is not importable
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"


def test_pixel_shuffling_moves_every_image_the_same_way_and_can_be_undone():
    permutation = hf.pixel_permutation(28 * 28, seed=0)
    assert torch.equal(permutation, hf.pixel_permutation(28 * 28, seed=0))  # seeded
    assert torch.equal(permutation.sort().values, torch.arange(784))  # a permutation
    images = torch.randn(5, 1, 28, 28)
    shuffled = hf.shuffle_pixels(images, permutation)
    assert shuffled.shape == images.shape and not torch.equal(shuffled, images)
    assert torch.equal(shuffled.flatten(-2)[..., 0], images.flatten(-2)[..., permutation[0]])
    assert torch.equal(hf.shuffle_pixels(shuffled, permutation.argsort()), images)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(5))
    assert torch.equal(hf.shuffled_dataset(dataset, permutation).tensors[1], torch.arange(5))


def test_a_permutation_of_the_wrong_length_is_refused_naming_it():
    with pytest.raises(ValueError, match="permutation has 100 entries"):
        hf.shuffle_pixels(torch.randn(2, 1, 28, 28), torch.arange(100))


def test_train_classifier_trains_any_model_with_the_shared_engine():
    hf.set_seeds(0)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    data = torch.utils.data.TensorDataset(images, labels)
    results = hf.train_classifier(hf.SmallCNN(), data, data, epochs=3, batch_size=32)
    assert set(results) == {"train_loss", "train_acc", "test_loss", "test_acc"} and len(results["test_acc"]) == 3
    assert results["train_loss"][-1] < results["train_loss"][0]


def test_the_benchmark_smoke_run_writes_json_and_a_plot_and_reuses_finished_runs(tmp_path, capsys):
    from benchmarks import vit_vs_cnn

    argv = ["--quick", "--models", "CNN", "--variants", "MNIST", "--out", str(tmp_path)]
    vit_vs_cnn.main(argv)
    report = json.loads((tmp_path / "vit_vs_cnn.json").read_text())
    assert [(r["model"], r["variant"], r["size"]) for r in report["runs"]] == [("CNN", "MNIST", 500)]
    assert (tmp_path / "vit_vs_cnn.png").exists()
    capsys.readouterr()
    vit_vs_cnn.main(argv)
    assert "reusing its 1 runs" in capsys.readouterr().out  # nothing is trained twice, nothing lost
    assert json.loads((tmp_path / "vit_vs_cnn.json").read_text())["runs"] == report["runs"]
