"""Shared test setup: import helper_functions from the repository root; draw figures without a display; the tiny
models, data and training flags that several test files use, as fixtures."""
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

# Only this pytest process: nbval's notebook kernels are separate processes and keep their inline backend.
matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helper_functions as hf  # noqa: E402

# vit_mnist's 28x28 digits, 7x7 patches and 10 classes at a quarter of its width, with 2 heads (not 4) and
# 1 layer (not 6).
TINY_SIZES = dict(num_layers=1, embedding_dim=16, num_heads=2, mlp_size=32)


@pytest.fixture
def mnist_vit():
    """Build a seeded ``vit_mnist``, with any of its settings overridden: ``mnist_vit(num_layers=2)``."""
    def build(seed: int = 0, **overrides) -> hf.ViT:
        hf.set_seeds(seed)
        return hf.vit_from_config("vit_mnist", **overrides)

    return build


@pytest.fixture
def tiny_sizes() -> dict:
    """The tiny ViT's sizes, for the APIs that take them as keywords (``hf.TrainingSetup(**tiny_sizes)``)."""
    return dict(TINY_SIZES)


@pytest.fixture
def tiny_vit(mnist_vit):
    """Build a seeded one-layer ViT for 28x28 digits (no dropout): ``tiny_vit()``, ``tiny_vit(pool="mean")``."""
    def build(seed: int = 0, **overrides) -> hf.ViT:
        return mnist_vit(seed, **{**TINY_SIZES, **overrides})

    return build


@pytest.fixture
def tiny_run() -> list[str]:
    """train.py's flags for the tiny ViT on 256 digits: an epoch is 4 batches, a second or so."""
    return ["--subset", "256", "--batch-size", "64", "--depth", str(TINY_SIZES["num_layers"]),
            "--embedding-dim", str(TINY_SIZES["embedding_dim"]), "--heads", str(TINY_SIZES["num_heads"]),
            "--mlp-size", str(TINY_SIZES["mlp_size"]), "--augment", "--no-progress"]


@pytest.fixture
def toy_vit():
    """Build a ViT for the toy data below: 4x4 one-channel images in 2x2 patches, 3 classes."""
    def build() -> hf.ViT:
        return hf.ViT(image_size=4, in_channels=1, patch_size=2, num_layers=1, num_heads=2, embedding_dim=8,
                      mlp_size=16, num_classes=3)

    return build


@pytest.fixture
def toy_loaders():
    """Build (train, test) loaders of ``n`` toy images: one Gaussian blob per class in 1x4x4, easy and instant."""
    def build(n: int = 256, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (n,), generator=g)
        images = torch.randn(n, 1, 4, 4, generator=g) * 0.5 + labels.view(-1, 1, 1, 1).float()  # (n, 1, 4, 4)
        data = TensorDataset(images, labels)
        return DataLoader(data, batch_size=32, shuffle=True, generator=g), DataLoader(data, batch_size=64)

    return build


@pytest.fixture
def history() -> dict[str, list[float]]:
    """A made-up two-epoch run history, in the form ``hf.train`` returns."""
    return {"train_loss": [1.5, 0.5], "train_acc": [0.5, 0.9], "test_loss": [1.2, 0.6], "test_acc": [0.6, 0.85]}
