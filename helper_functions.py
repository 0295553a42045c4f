"""Everything the notebooks build, in the order the notebooks build it (``__all__`` below is the table of contents).

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
11. Notebook 11: bugs that shipped in public ViT code, as importable variants, and the detectors new to them.

What no notebook teaches (several processes under torchrun, the offline download sources and their checksums, safe
unpicklers, the scripts' command-line pieces, run locks, atomic writes, digests) is in machinery.py, and the drawing
code of two figures in figures.py: this module calls them, and learners never need to open them.

A notebook builds a piece from scratch in a cell that is, character for character, its definition here (a test
checks), and from then on imports it.
"""
from __future__ import annotations

import copy
import functools
import inspect
import io
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from figures import draw_vit_architecture, plot_bug_vs_fix, plot_fix_sequences  # noqa: F401

# isort: off
from machinery import (TORCHVISION_DATASETS, RunExistsError, WeightsNotAvailableError, atomic_write_bytes,
                       check_training_arguments, current_results_format, describe_run, download_torchvision_weights,
                       ensure_raw_files, hub_checkpoint_path, imagenet_weights_help, interrupts_deferred,
                       is_main_process, main_process_first, mixed_precision, parallelize, plain_results, progress_bar,
                       rank, read_checkpoint, read_image, read_results_file, rng_states, run_lock, save_results,
                       sealed_checkpoint, seed_per_process, set_rng_states, sum_across_processes, torch_load_checked,
                       torchvision_weights, unwrap, verify_raw_files, world_size)  # noqa: F401
# isort: on

__all__ = [
    # 0. Setup and data (notebook 00)
    "REPO_DIR", "DATA_DIR", "RUNS_DIR", "set_seeds", "best_device", "MNIST_MEAN", "MNIST_STD", "get_mnist",
    "get_fashion_mnist", "make_dataloaders",
    # 1-4. The parts of the model (notebooks 01-04)
    "PatchEmbedding", "ImagePatches", "MultiHeadSelfAttention", "batch_dependence", "MLPBlock",
    "TransformerEncoderBlock", "shared_parameters",
    # 5. The Vision Transformer, its configurations and torchvision's weights (notebook 05)
    "ViT", "add_checks", "VIT_CONFIGS", "PAPER_PARAMS", "vit_from_config", "count_parameters",
    "rename_torchvision_keys", "load_torchvision_vit_weights", "IMAGENET_WEIGHTS", "torchvision_vit_checkpoint",
    "check_state_dict_fits", "interpolate_position_embedding", "resize_vit", "vit_shapes", "plot_vit_architecture",
    # 6. The classic bugs and their detectors (notebook 06)
    "LayerNormWithBugs", "TorchSelfAttention", "replace_layer_norms", "use_torch_attention",
    "remove_position_embeddings", "remove_mlp_activations", "reinitialise_with_randn", "ViTMeanOfAllTokens",
    "mean_of_all_tokens", "BUGS", "BLOG_FIX_ORDER", "vit_with_bugs", "initial_loss", "overfit_one_batch",
    "gradient_norms", "gradient_reaching_patches", "max_abs_difference", "encoder_batch_dependence", "shuffle_patches",
    "random_patch_permutation", "patch_order_sensitivity", "nonlinearity", "collapse_linear_stack", "tanh_saturation",
    "plot_bug_vs_fix", "plot_fix_sequences",
    # 7. Training on MNIST (notebook 07)
    "tensor_dataset", "TRAINING_DATASETS", "get_tensor_datasets", "validation_indices", "validation_split",
    "warmup_cosine_schedule", "adamw_with_schedule", "random_affine", "ShiftAveraged", "MNIST_RECIPE",
    "BEST_MNIST_RECIPE", "RECIPES", "train_step", "test_step", "train", "TrainingSetup", "plot_loss_curves",
    "predictions_and_labels", "confusion_matrix", "load_results", "save_run", "save_model", "load_checkpoint",
    "load_model", "get_trained_vit", "read_digit_image", "class_probabilities",
    # 8. Inside a trained ViT (notebook 08)
    "patch_embedding_components", "position_embedding_similarity", "attention_maps", "attention_rollout",
    "class_token_attention_map", "mean_attention_distance",
    # 9. Transfer learning (notebook 09)
    "PRETRAIN_RECIPE", "TRANSFER_RECIPE", "balanced_subset", "replace_head", "freeze_backbone", "trainable_parameters",
    "fine_tune", "imagenet_vit", "imagenet_normalisation", "imagenet_transform",
    # 10. ViT against a CNN (notebook 10)
    "SmallCNN", "pixel_permutation", "shuffle_pixels", "shuffled_dataset", "train_classifier",
    # 11. Bugs from the wild (notebook 11)
    "unregistered_tensors", "residual_identity_gap", "attention_reference_gap", "plant_wild_bug",
]

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"  # datasets land here (git-ignored), wherever a notebook or script runs from
RUNS_DIR = REPO_DIR / "runs"  # the one folder for trained models and their results (git-ignored)


# 0. Setup and data: seeds, device, MNIST and Fashion-MNIST, DataLoaders (notebook 00) ---------------------------------
# The downloads behind get_mnist and get_fashion_mnist (offline sources, checksums) are in machinery.py.


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


def best_device() -> torch.device:
    """The best device available: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Mean and standard deviation of all 60,000 training images' pixels scaled to [0, 1]; notebook 00 recomputes them
# and tests/test_data.py checks them against the data.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = 0.2860, 0.3530  # the same, for Fashion-MNIST


def _normalise_transform(mean: float = MNIST_MEAN, std: float = MNIST_STD) -> transforms.Compose:
    """Greyscale PIL image -> (1, height, width) float tensor, normalised with a training set's mean and std (MNIST's
    by default; Fashion-MNIST passes its own)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])


def get_mnist(root: str | Path = DATA_DIR, transform: Callable | None = None,
              test_transform: Callable | None = None) -> tuple[Dataset, Dataset]:
    """MNIST's 60,000 training and 10,000 test digits as ``torchvision.datasets.MNIST`` (offline-safe).

    ``transform`` defaults to ToTensor + Normalize(MNIST_MEAN, MNIST_STD); ``test_transform`` defaults to ``transform``.
    """
    return _get_dataset("MNIST", root, transform or _normalise_transform(MNIST_MEAN, MNIST_STD), test_transform)


def get_fashion_mnist(root: str | Path = DATA_DIR, transform: Callable | None = None,
                      test_transform: Callable | None = None) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST's 60,000 training and 10,000 test images as ``torchvision.datasets.FashionMNIST``."""
    transform = transform or _normalise_transform(_FASHION_MNIST_MEAN, _FASHION_MNIST_STD)
    return _get_dataset("FashionMNIST", root, transform, test_transform)


def _get_dataset(dataset: str, root: str | Path, transform: Callable,
                 test_transform: Callable | None) -> tuple[Dataset, Dataset]:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"root={str(root)!r} is a file, not a folder; pass the folder that holds (or will "
                                 f"hold) the data, such as the default {DATA_DIR}")
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
    return train_loader, _evaluation_loader(test_data, batch_size, num_workers)


def _evaluation_loader(data: Dataset, batch_size: int = 128, num_workers: int = 0) -> DataLoader:
    """An ordered loader for evaluating on ``data`` (a validation or a test set); under torchrun each process gets every
    N-th example, so that metrics summed across processes count each example once."""
    if world_size() > 1:
        data = torch.utils.data.Subset(data, range(rank(), len(data), world_size()))
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


# 1. Patch embedding, Eq. 1 (notebook 01) ------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """The x_p E of Eq. 1: a Conv2d with kernel = stride = P applies the same (P*P*C -> D) matrix E to every P x P
    patch; the einops pattern then lays the grid of patches out as a sequence, row by row."""

    def __init__(self, *, in_channels: int = 3, patch_size: int = 16, embedding_dim: int = 768) -> None:  # P, D
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.projection = nn.Conv2d(in_channels, embedding_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, channels, height, width)
        x = self.projection(x)  # (batch, embedding_dim, height / P, width / P)
        return rearrange(x, "b d h w -> b (h w) d")  # (batch, num_patches, embedding_dim)


class ImagePatches(nn.Module):
    """The blog's patcher: ``nn.Unfold`` cuts P x P patches every ``stride`` pixels, a Linear embeds each one.

    Returns (embeddings, patches). Unfold keeps only the patches that fit whole, so where P does not divide the image
    the pixels at the right and bottom edges are silently dropped; with stride < P the patches overlap.
    """

    def __init__(self, patch_size: int | tuple[int, int] = 8, in_channels: int = 3, stride: int = 8,
                 embedding_dim: int = 768) -> None:
        super().__init__()
        height, width = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size  # the blog's (8, 8)
        self.unfold = nn.Unfold(kernel_size=(height, width), stride=stride)
        self.patch_embedding = nn.Linear(height * width * in_channels, embedding_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = rearrange(self.unfold(images), "b cpp n -> b n cpp")  # (batch, num_patches, C*P*P)
        return self.patch_embedding(patches), patches  # (batch, num_patches, embedding_dim), the patches


# 2. Multi-head self-attention, Eq. 2 (notebook 02) --------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    """MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa with SA_i(z) = softmax(q_i k_i^T / sqrt(D_h)) v_i (Appendix A).
    One linear layer computes q, k and v for all heads at once (its weight is laid out [W_q; W_k; W_v], as in
    ``nn.MultiheadAttention.in_proj_weight``), and the heads ride along as a batch axis of every matmul."""

    def __init__(self, *, embedding_dim: int = 768, num_heads: int = 12, attn_dropout: float = 0.0) -> None:  # Table 1
        super().__init__()
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim)  # U_qkv of all heads: [W_q; W_k; W_v]
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)  # U_msa

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv(x)  # (batch, seq, 3 * embedding_dim)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return q, k, v  # each (batch, heads, seq, head_dim)

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """A = softmax(q k^T / sqrt(D_h)) (Eq. 6): row i weighs every key against query i, each row sums to 1."""
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (batch, heads, seq, seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.queries_keys_values(x)
        A = F.dropout(self.attention(q, k), self.attn_dropout, self.training)  # torchvision's dropout, 0 by default
        return self.out_proj(rearrange(A @ v, "b h n d -> b n (h d)"))  # Eq. 7 per head: (batch, seq, embedding_dim)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention matrices A that ``forward`` uses (before dropout): (batch, heads, seq, seq)."""
        q, k, _ = self.queries_keys_values(x)
        return self.attention(q, k)


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


# 3. MLP block, Eq. 3 (notebook 03) ------------------------------------------------------------------------------------


class MLPBlock(nn.Sequential):
    """Two dense layers with a GELU between them (Sec. 3.1), dropout after each dense layer (Appendix B.1); a
    Sequential, so its parameters are named 0.* and 3.* exactly as in torchvision's ViT."""

    def __init__(self, *, embedding_dim: int = 768, mlp_size: int = 3072, dropout: float = 0.1) -> None:  # Tables 1, 3
        super().__init__(
            nn.Linear(embedding_dim, mlp_size),  # 1. D -> MLP size
            nn.GELU(),  # 2.
            nn.Dropout(dropout),  # 3.
            nn.Linear(mlp_size, embedding_dim),  # 4. MLP size -> D
            nn.Dropout(dropout),  # 5.
        )


# 4. Transformer encoder block (notebook 04) ---------------------------------------------------------------------------


class TransformerEncoderBlock(nn.Module):
    """One pre-norm encoder layer: z' = MSA(LN(z)) + z (Eq. 2), then z = MLP(LN(z')) + z' (Eq. 3)."""

    def __init__(self, *, embedding_dim: int = 768, num_heads: int = 12, mlp_size: int = 3072,  # Table 1 (ViT-Base)
                 dropout: float = 0.1, attn_dropout: float = 0.0, layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
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


# 5. The Vision Transformer, Eq. 4, its configurations and torchvision's weights (notebook 05) -------------------------


class ViT(nn.Module):
    """The Vision Transformer: Eq. 1's tokens z_0, L encoder blocks (Eqs. 2-3), y = LN(z_L^0) (Eq. 4) and the head:
    one linear layer (the fine-tuning head) or, with ``representation_size=R``, ``Linear(D, R)`` + tanh before it (the
    pre-training head, Sec. 3.1). ``pool="mean"`` averages the tokens instead of using a class token (Appendix D.3).
    Defaults: ViT-Base/16 (Table 1), ImageNet dropout (Table 3). ``self.config`` holds every argument, to rebuild it."""

    def __init__(self, image_size: int = 224, in_channels: int = 3, patch_size: int = 16,  # 224 px, RGB, P = 16
                 num_layers: int = 12, num_heads: int = 12, embedding_dim: int = 768,  # L, k, D: Table 1 (Base)
                 mlp_size: int = 3072, dropout: float = 0.1, attn_dropout: float = 0.0,  # MLP size: Table 1; Table 3
                 embedding_dropout: float = 0.1, num_classes: int = 1000, pool: str = "cls",  # Appendix B.1
                 layer_norm_eps: float = 1e-6, representation_size: int | None = None) -> None:
        super().__init__()
        self.config = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size,
                           num_layers=num_layers, num_heads=num_heads, embedding_dim=embedding_dim, mlp_size=mlp_size,
                           dropout=dropout, attn_dropout=attn_dropout, embedding_dropout=embedding_dropout,
                           num_classes=num_classes, pool=pool, layer_norm_eps=layer_norm_eps,
                           representation_size=representation_size)
        self.image_size, self.pool = image_size, pool
        num_tokens = (image_size // patch_size) ** 2 + (pool == "cls")  # N = HW / P^2 patches (+ the class token)
        self.patch_embedding = PatchEmbedding(in_channels=in_channels, patch_size=patch_size,  # notebook 01
                                              embedding_dim=embedding_dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, embedding_dim)) if pool == "cls" else None  # x_class
        self.position_embedding = nn.Parameter(torch.empty(1, num_tokens, embedding_dim).normal_(std=0.02))  # E_pos
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.encoder = nn.Sequential(*[TransformerEncoderBlock(  # notebook 04: L blocks, each with its own weights
            embedding_dim=embedding_dim, num_heads=num_heads, mlp_size=mlp_size, dropout=dropout,
            attn_dropout=attn_dropout, layer_norm_eps=layer_norm_eps) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)  # the LN of Eq. 4
        self.pre_logits = (nn.Identity() if representation_size is None  # pre-training head: Linear + tanh
                           else nn.Sequential(nn.Linear(embedding_dim, representation_size), nn.Tanh()))
        self.head = nn.Linear(representation_size or embedding_dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: (batch, channels, height, width) -> (batch, num_tokens, embedding_dim)."""
        x = self.patch_embedding(images)  # (batch, num_patches, embedding_dim)
        if self.class_token is not None:  # [x_class; x_p E]: (batch, num_patches + 1, embedding_dim)
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.embedding_dropout(x + self.position_embedding)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The image representation y of Eq. 4, before the head: (batch, embedding_dim)."""
        z = self.encoder(self.embed(images))  # (batch, num_tokens, embedding_dim)
        z = z[:, 0] if self.pool == "cls" else z.mean(dim=1)  # (batch, embedding_dim)
        return self.norm(z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.features(images)))  # (batch, num_classes)


# Checks, in one place: every block checks its sizes when it is built, and the patch embedding and the ViT their images
# when called, with errors that name the argument and the fix. Kept out of the classes, so that they read like the
# equations; a notebook adds them to its own copies of the classes with add_checks.
_SIZES = ("image_size", "in_channels", "patch_size", "num_layers", "num_heads", "embedding_dim", "mlp_size",
          "num_classes", "representation_size")


def _check_vit_arguments(**arguments: Any) -> None:
    """Raise a ValueError naming the first argument of a ViT, or of one of its blocks, that cannot work."""
    for name, size in arguments.items():
        if name in _SIZES and not (name == "representation_size" and size is None) and \
                (not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if arguments.get("pool", "cls") not in {"cls", "mean"}:
        raise ValueError(f"pool must be 'cls' (class token) or 'mean' (average of the tokens), got "
                         f"{arguments['pool']!r}")
    if "image_size" in arguments and arguments["image_size"] % arguments["patch_size"]:
        raise ValueError(f"image_size={arguments['image_size']} is not divisible by patch_size="
                         f"{arguments['patch_size']}; choose a patch size that divides the image size (e.g. 4, 7 or 14 "
                         f"for 28x28 MNIST)")
    if "num_heads" in arguments and arguments["embedding_dim"] % arguments["num_heads"]:
        raise ValueError(f"embedding_dim={arguments['embedding_dim']} is not divisible by num_heads="
                         f"{arguments['num_heads']}; each head gets embedding_dim / num_heads values, so choose "
                         f"numbers that divide")


def _check_images(patch_embedding: nn.Module, x: torch.Tensor) -> None:
    """The patch embedding's input: a batch of float, channels-first images whose sides the patch size divides."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (batch, channels, height, width), got shape "
                         f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
    if not x.is_floating_point():
        raise ValueError(f"expected float images, got {x.dtype}; scale them to float and normalise, e.g. "
                         "(x.float() / 255 - mean) / std (transforms.ToTensor() and transforms.Normalize do both)")
    _, channels, height, width = x.shape
    in_channels, patch_size = patch_embedding.in_channels, patch_embedding.patch_size
    if channels != in_channels and x.shape[-1] == in_channels:
        raise ValueError(f"expected (batch, channels, height, width), got {tuple(x.shape)}, which looks "
                         "channels-last; move the channels first with x.permute(0, 3, 1, 2)")
    if channels != in_channels:
        raise ValueError(f"expected {in_channels} channel(s), got {channels}; convert the images (e.g. "
                         f"x.repeat(1, 3, 1, 1) for greyscale -> RGB) or build the model with in_channels={channels}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}; "
                         f"resize the images or choose a patch size that divides both sides")


def _check_image_size(vit: nn.Module, images: torch.Tensor) -> None:
    """The ViT's input: images of the size it was built for."""
    if images.ndim == 4 and images.shape[1] == vit.patch_embedding.in_channels and \
            images.shape[-2:] != (vit.image_size, vit.image_size):
        raise ValueError(f"expected {vit.image_size}x{vit.image_size} images, got "
                         f"{images.shape[-2]}x{images.shape[-1]}; resize them (e.g. transforms.Resize"
                         f"({vit.image_size})) or build the model with image_size={images.shape[-1]}")


_INPUT_CHECKS = {"PatchEmbedding": ("forward", _check_images), "ViT": ("embed", _check_image_size)}


def _checked(method: Callable, check: Callable) -> Callable:
    """``method``, calling ``check`` with the same arguments first."""
    @functools.wraps(method)
    def checked(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        check(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    checked.checked = True
    return checked


def add_checks(*classes: type) -> None:
    """Make each class check its sizes when it is built, and ``PatchEmbedding`` and ``ViT`` their images when called,
    with the errors of ``_check_vit_arguments`` and ``_check_images``; the class bodies stay as they are."""
    for cls in classes:
        if getattr(cls.__init__, "checked", False):  # checked already (or a subclass of a checked class)
            continue
        signature = inspect.signature(cls.__init__)

        def check_arguments(self: nn.Module, *args: Any, _signature: inspect.Signature = signature, **kwargs: Any):
            try:
                bound = _signature.bind(self, *args, **kwargs)
            except TypeError:
                return  # a wrong call: __init__ itself says what is wrong with it
            bound.apply_defaults()
            _check_vit_arguments(**{name: value for name, value in bound.arguments.items() if name != "self"})

        cls.__init__ = _checked(cls.__init__, check_arguments)
        if cls.__name__ in _INPUT_CHECKS:
            name, check = _INPUT_CHECKS[cls.__name__]
            setattr(cls, name, _checked(getattr(cls, name), check))


add_checks(PatchEmbedding, MultiHeadSelfAttention, MLPBlock, TransformerEncoderBlock, ViT)


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


def rename_torchvision_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        state_dict = torch_load_checked(source)
    else:
        state_dict = source
    check_state_dict_fits(model, renamed := rename_torchvision_keys(state_dict))
    model.load_state_dict(renamed)
    return model


IMAGENET_WEIGHTS = "ViT_B_16_Weights.IMAGENET1K_V1"  # torchvision's name; 81.1% top-1 on ImageNet-1k


def torchvision_vit_checkpoint(weights: str | torchvision.models.WeightsEnum = IMAGENET_WEIGHTS,
                               download: bool = True) -> Path:
    """The file of a torchvision ViT checkpoint in the ``torch.hub`` cache, downloaded (hash-checked, time-limited) if
    missing and ``download`` is set: pass it to ``load_torchvision_vit_weights``. Raises ``WeightsNotAvailableError``,
    naming the URL and where to put the file, when it is missing and cannot (or may not) be downloaded."""
    path = hub_checkpoint_path(weights)
    if not path.exists() and not download:
        raise WeightsNotAvailableError(f"{path} is not there yet; fetch it once with hf.torchvision_vit_checkpoint() "
                                       f"(about 330 MB for ViT-B/16) or download {torchvision_weights(weights).url} "
                                       f"elsewhere and copy it there")
    return path if path.exists() else download_torchvision_weights(weights)


def check_state_dict_fits(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError that names every missing, unexpected or differently shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"missing keys: {missing[:8]}{' ...' * (len(missing) > 8)}"] * bool(missing) + \
                [f"unexpected keys: {unexpected[:8]}{' ...' * (len(unexpected) > 8)}"] * bool(unexpected) + \
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
    stage for ``config`` (a ``VIT_CONFIGS`` name, a dict of ``ViT`` arguments, or a model). Returns the figure; the
    drawing itself is in figures.py."""
    name = f" ({config!r})" if isinstance(config, str) else ""
    return draw_vit_architecture(_vit_arguments(config), vit_shapes(config, batch), name)


# 6. The classic bugs and the detectors that catch them (notebook 06) --------------------------------------------------


# Each bug is a small function that takes a correct model and swaps one part for its buggy twin, keeping the
# weights (and the state-dict keys) it can; ``vit_with_bugs`` builds a model with any of them injected. The detectors
# after them are the checks a learner can run on any model of their own.
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


def reinitialise_with_randn(model: ViT) -> ViT:
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
    "randn_class_token": reinitialise_with_randn,  # bug 6 (together with plain SGD)
}


# The blog's model bugs in the order its author fixed them (then came the switch from SGD to Adam).
BLOG_FIX_ORDER = ("no_position_embeddings", "mlp_without_activation", "layer_norm_mean_over_std",
                  "attention_batch_first_false")


def vit_with_bugs(*bugs: str, config: str = "vit_mnist", **overrides: Any) -> ViT:
    """``vit_from_config(config, **overrides)`` with each of ``bugs`` (names from ``BUGS``) injected, in order; none
    gives the correct model."""
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


# 7. Training on MNIST (notebook 07): the data, the validation split, the schedule, the loop, results, checkpoints ---
# (several processes under torchrun, mixed precision and random-state capture are in machinery.py)


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
    "fashion-mnist": (get_fashion_mnist, _FASHION_MNIST_MEAN, _FASHION_MNIST_STD),
}


@functools.lru_cache(maxsize=4)  # normalised once per process: a second TrainingSetup (or a subset of one) only slices
def get_tensor_datasets(name: str = "mnist", limit: int | None = None) -> tuple[Dataset, Dataset]:
    """Training and test sets of ``name`` ("mnist" or "fashion-mnist") as normalised TensorDatasets (first ``limit``
    examples of each, if given). Every call with the same arguments returns the same tensors: do not change them in
    place (indexing with a tensor of indices copies)."""
    if name not in TRAINING_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(TRAINING_DATASETS)}")
    get, mean, std = TRAINING_DATASETS[name]
    train_data, test_data = get()
    return tensor_dataset(train_data, mean, std, limit), tensor_dataset(test_data, mean, std, limit)


# A validation set held out of the training set: what every per-epoch look and every choice is made on --------------
_VALIDATION_SEED = 0  # the split's own seed, apart from a run's: runs with different seeds hold out the same digits


def validation_indices(num_examples: int, val_split: int,
                       seed: int = _VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (training part, validation part) of a set of ``num_examples``: one fixed permutation, seeded, whose
    first ``val_split`` entries are held out; both parts sorted. The permutation has its own generator, so it is the
    same in every torchrun process and leaves the global random state alone. ``val_split=0`` holds out nothing."""
    if isinstance(val_split, bool) or not isinstance(val_split, (int, np.integer)) or not 0 <= val_split < num_examples:
        raise ValueError(f"val_split must be a whole number from 0 (no validation set) to {num_examples - 1} (the "
                         f"training set has {num_examples} examples), got {val_split!r}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))  # (num_examples,)
    return order[val_split:].sort().values, order[:val_split].sort().values


def _select(dataset: Dataset, indices: torch.Tensor | Sequence[int]) -> Dataset:
    """The examples of ``dataset`` at ``indices``: a ``Subset``, or for a TensorDataset a TensorDataset of them, so that
    a loader over it still slices tensors."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*(tensor[indices] for tensor in dataset.tensors))
    return torch.utils.data.Subset(dataset, indices.tolist())


def validation_split(dataset: Dataset, val_split: int,
                     seed: int = _VALIDATION_SEED) -> tuple[Dataset, Dataset | None]:
    """``dataset`` split into (training part, validation part) by ``validation_indices``; with ``val_split=0``,
    ``(dataset, None)``. The training part keeps the original order (a training loader shuffles it anyway)."""
    train_idx, val_idx = validation_indices(len(dataset), val_split, seed)
    return (dataset, None) if val_split == 0 else (_select(dataset, train_idx), _select(dataset, val_idx))


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


# The best recipe (issue 27): notebook 07's model with 4x4 patches (49 tokens instead of 16), label smoothing,
# batches of 256 at a higher peak rate, and the test set read once with ShiftAveraged (test-time augmentation). Chosen
# on the validation split among the candidates of benchmarks/screen_recipes.py; 28 epochs because that is what fits in
# 30 minutes on our 2-core machine on a slow day (34 did not); measured in benchmarks/time_to_accuracy.py.
BEST_MNIST_RECIPE: dict[str, Any] = {**MNIST_RECIPE, "epochs": 28, "batch_size": 256, "lr": 3e-3, "warmup_epochs": 3,
                                     "patch_size": 4, "label_smoothing": 0.1, "tta": True}


RECIPES: dict[str, dict[str, Any]] = {"notebook07": MNIST_RECIPE, "best": BEST_MNIST_RECIPE}  # train.py --recipe


def train_step(model: nn.Module, dataloader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device | str = "cpu", scheduler: Any | None = None,
               augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
               progress: bool | str = False, amp: bool = False) -> tuple[float, float]:
    """One pass over ``dataloader`` in training mode; returns (mean loss, accuracy in [0, 1]), over all processes
    under torchrun.

    ``scheduler``, if given, is stepped after every batch (warm-up and cosine schedules are per step); ``augment``, if
    given, transforms each batch of images on the device before the forward pass (e.g. ``random_affine``); ``amp`` runs
    the forward pass in bfloat16 (``mixed_precision``). A loss that is NaN or infinite stops the pass before it reaches
    the weights, with a ``FloatingPointError`` naming the batch.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch, (images, labels) in enumerate(progress_bar(dataloader, progress, leave=False), start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        with mixed_precision(device, amp):
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
        with mixed_precision(device, amp):
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
    called after each epoch with its 1-based number and the results so far.
    ``model`` goes to ``device`` (nothing moves if it is there already, as a ``TrainingSetup``'s is) and may be
    wrapped by ``parallelize``; testing uses the model inside. ``amp``: see ``mixed_precision``.
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
    for epoch in progress_bar(range(done, epochs), progress and epochs - done > 1, desc="epochs"):  # bar: 2+ epochs
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


class TrainingSetup:
    """Everything one training run needs, built from a recipe: datasets, loaders, model, loss, AdamW and schedule.
    ``TrainingSetup(**MNIST_RECIPE)`` is notebook 07's run; extra keyword arguments override the model configuration
    (e.g. ``patch_size=4``). ``val_split`` training examples are held out (``validation_split``; 0 holds out none):
    ``train`` evaluates on them after each epoch, ``add_final_test`` reads the test set once, at the end.
    ``val_indices`` (the held-out indices a checkpoint saved) rebuilds that split for a resumed run. ``subset`` keeps
    the first N examples of each set. The model is built on ``device`` and stays there. ``tta=True``
    makes ``test`` average each test image's prediction over 1-pixel shifts (``ShiftAveraged``)."""

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
        self.train_data = _select(full_train, train_idx[:subset])
        self.val_data = _select(full_train, self.val_indices[:subset]) if val_split else None
        self.test_data = _select(self.test_data, torch.arange(len(self.test_data))[:subset])
        self.dataset, self.epochs = dataset, epochs
        _, self.mean, self.std = TRAINING_DATASETS[dataset]
        self.train_loader, self.test_loader = make_dataloaders(self.train_data, self.test_data, batch_size, seed=seed)
        self.val_loader = _evaluation_loader(self.val_data, batch_size) if self.val_data is not None else None
        self.augment = random_affine if augment else None  # applied to each training batch
        self.device, self.tta = torch.device(device), tta
        self.model = vit_from_config(config, **model_overrides).to(self.device)
        seed_per_process(seed)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        steps = len(self.train_loader)
        self.optimizer, self.scheduler = adamw_with_schedule(self.model.parameters(), lr, weight_decay,
                                                             epochs * steps, round(warmup_epochs * steps))
        self._wrapped: dict[bool, nn.Module] = {}  # the model as it trains, by whether it is compiled

    def train(self, stop_after: int | None = None, results: dict[str, list[float]] | None = None,
              compile: bool = False, **kwargs: Any) -> dict[str, list[float]]:
        """``hf.train`` on this setup, until epoch ``stop_after`` of the ``epochs`` the schedule is planned for (all of
        them by default), continuing ``results`` if given (a run's history so far, e.g. a resumed run's); the model
        ``parallelize``d once (DistributedDataParallel under torchrun, ``torch.compile`` if asked). Each epoch is
        evaluated on the validation set (``val_loss``, ``val_acc``), or, without one, on the test set."""
        if compile not in self._wrapped:
            self._wrapped[compile] = parallelize(self.model, self.device, compile)
        held_out = ("val", self.val_loader) if self.val_loader is not None else ("test", self.test_loader)
        return train(self._wrapped[compile], self.train_loader, held_out[1], self.optimizer, self.loss_fn,
                     stop_after or self.epochs, self.device, self.scheduler, self.augment, results,
                     split=held_out[0], **kwargs)

    def test(self, amp: bool = False, tta: bool | None = None) -> tuple[float, float]:
        """(loss, accuracy) of the model on the test set, now (a collective call under torchrun); with ``tta``
        (default: the setup's) through ``ShiftAveraged``."""
        model = ShiftAveraged(unwrap(self.model)) if (self.tta if tta is None else tta) else unwrap(self.model)
        return test_step(model, self.test_loader, self.loss_fn, self.device, amp=amp)

    def add_final_test(self, results: dict[str, Any], amp: bool = False) -> dict[str, Any]:
        """A finished run's ``results`` with the test set's score after the last epoch, ``final_test_loss`` and
        ``final_test_acc``: read once now, or, in a run without a validation set, the last epoch's own test."""
        return _add_final_test(results, lambda: self.test(amp))

    def _shuffle_generator(self) -> torch.Generator | None:
        return self.train_loader.generator  # None under torchrun

    def training_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: optimizer and schedule state, and the random number
        generators (PyTorch's, which augmentation and dropout draw from, and the loader's shuffling one), so that
        resuming continues exactly where the run stopped. Under torchrun every process must call it (it gathers each
        process's generator state); a DistributedSampler's shuffle needs no state (it is seeded by the epoch)."""
        generator = self._shuffle_generator()
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **rng_states(), "shuffle_rng": generator.get_state() if generator is not None else None}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore ``training_state()``; move the model to its device first, so the optimizer state lands there too."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state)
        generator = self._shuffle_generator()
        if generator is not None and state.get("shuffle_rng") is not None:
            generator.set_state(state["shuffle_rng"])


def plot_loss_curves(results: dict[str, list[float]] | str | Path, title: str | None = None):
    """Loss and accuracy per epoch, train vs validation (or test, in runs without a validation set), side by side;
    a test set read once at the end is one marker at the last epoch. ``results`` is the dict ``train`` returns or
    the path of a saved results file (.json or .pkl). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    results = load_results(results) if isinstance(results, (str, Path)) else current_results_format(results)
    epochs = range(1, len(results["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split in ("train", "val", "test"):
            if f"{split}_{metric}" in results:
                ax.plot(epochs, results[f"{split}_{metric}"], marker="o", label={"val": "validation"}.get(split, split))
        if f"final_test_{metric}" in results and "test_acc" not in results:  # the test set, read once at the end
            ax.plot([len(epochs)], [results[f"final_test_{metric}"]], marker="*", markersize=12, ls="",
                    label="test (once, at the end)")
        ax.set_xlabel("epoch")
        ax.set_title({"loss": "loss", "acc": "accuracy"}[metric])
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.inference_mode()
def predictions_and_labels(model: nn.Module, dataloader: DataLoader,
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


# A run's results: per epoch, lists named by what was measured (train_*, val_* or test_*); once a run is finished,
# final_test_loss and final_test_acc, two numbers: the test set's score after the last epoch.
def _add_final_test(results: dict[str, Any], test: Callable[[], tuple[float, float]]) -> dict[str, Any]:
    """``results`` with ``final_test_*`` added: the last epoch's test numbers where every epoch was tested, else
    ``test()`` (the test set, read once)."""
    if "final_test_acc" not in results:
        loss, accuracy = (results["test_loss"][-1], results["test_acc"][-1]) if "test_acc" in results else test()
        results.update(final_test_loss=float(loss), final_test_acc=float(accuracy))
    return results


def load_results(path: str | Path) -> dict[str, Any]:
    """Read results saved by ``save_results``: the JSON file, or a .pkl (read without running any code); results saved
    before ``final_test_acc`` had its name come in today's format."""
    path = Path(path)
    results = read_results_file(path)
    if not isinstance(results, dict) or "train_loss" not in results or not {"test_loss", "val_loss"} & set(results):
        raise ValueError(f"{path} is not a results file: expected a dict with train_loss, train_acc and val_loss, "
                         f"val_acc or test_loss, test_acc")
    return current_results_format(results)


def save_run(model: nn.Module, results: dict[str, list[float]], out_dir: str | Path, name: str = "vit",
             **extra: Any) -> dict[str, Path]:
    """Everything a training run leaves behind, in ``out_dir``: ``name``.pth (weights + config + ``extra``, and
    ``results`` as its ``history``), ``name``.json and ``name``.pkl (that same history) and ``name``_loss_curves.png.
    Returns the paths by kind. Ctrl-C waits until all four are written, so they always describe one moment of one
    run."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = plain_results(results)
    with interrupts_deferred():
        paths = {"model": save_model(model, out_dir / f"{name}.pth", **{**extra, "history": history}),
                 "results": save_results(history, out_dir / f"{name}.json"),
                 "curves": out_dir / f"{name}_loss_curves.png"}
        fig = plot_loss_curves(history, title=name)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(buffer.getvalue(), paths["curves"])
    return paths


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save the model's state dict (and its ``config``, if it has one, plus any ``extra`` plain data such as the
    dataset or normalisation) to ``path`` (.pth or .pt), atomically: a crash mid-write never leaves a broken file.
    SHA-256 digests go with it (of the weights, as ``weights_digest``, and of everything); ``load_checkpoint``
    checks them."""
    path = Path(path)
    if path.suffix not in {".pth", ".pt"}:
        raise ValueError(f"model files end in .pth or .pt, got {path.name!r}")
    checkpoint = sealed_checkpoint(getattr(model, "config", None), model.state_dict(), **extra)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a file written by ``save_model``: a dict with ``state_dict``, ``config`` and any extras. With ``verify``,
    the weights must match the digest saved with them (a single changed byte is caught)."""
    return read_checkpoint(path, verify)


def load_model(source: str | Path | dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """The model ``save_model`` saved, from its file ``source`` (or the dict ``load_checkpoint`` read from it): a ViT
    rebuilt from the saved config, or, given ``model``, the weights loaded into it. Clear errors if the file is
    missing, foreign or damaged, or if the weights do not fit (every differing key and shape is named)."""
    if isinstance(source, nn.Module):
        raise TypeError("load_model(path, model=None) takes the path first, then the model to load it into")
    checkpoint = source if isinstance(source, dict) else load_checkpoint(source)
    if model is None:
        if not checkpoint.get("config"):
            raise ValueError(f"{source if not isinstance(source, dict) else 'the checkpoint'} holds no model config; "
                             f"build the model yourself and call load_model(path, model)")
        model = ViT(**checkpoint["config"])
    check_state_dict_fits(model, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


def get_trained_vit(recipe: dict[str, Any] = MNIST_RECIPE, path: str | Path | None = None, retrain: bool = False,
                    progress: bool = True, device: torch.device | str | None = None) -> tuple[ViT, dict[str, Any]]:
    """A ViT trained with ``recipe`` (``TrainingSetup``'s arguments; notebook 07's by default) and its results: loaded
    from ``path`` if it holds a finished run of exactly this recipe, otherwise trained on ``device`` (default
    ``best_device()``: a GPU if there is one, or a few minutes on a CPU) and saved there with ``save_run``. ``path``
    defaults to ``runs/notebook07_vit_mnist.pth`` for ``MNIST_RECIPE`` (where notebook 07 saves its run), else to
    ``runs/vit_<dataset>_pretrained.pth`` (notebook 09's ``PRETRAIN_RECIPE``). A different run already at ``path`` is
    never replaced unless ``retrain=True``. The model is returned in eval mode, on the CPU."""
    if path is None:
        dataset = recipe["dataset"].replace("-", "_")
        path = RUNS_DIR / ("notebook07_vit_mnist.pth" if recipe == MNIST_RECIPE else f"vit_{dataset}_pretrained.pth")
    path = Path(path)
    if path.exists() and not retrain:
        checkpoint = load_checkpoint(path)
        saved = checkpoint.get("recipe")
        finished = checkpoint.get("epoch", recipe.get("epochs")) == recipe.get("epochs")
        if saved == recipe and finished:
            results = current_results_format(checkpoint.get("history") or load_results(path.with_suffix(".json")))
            return load_model(checkpoint).eval(), _add_final_test(results, test=lambda: None)
        differ = sorted(k for k in {*(saved or {}), *recipe} if (saved or {}).get(k) != recipe.get(k))
        why = f"its recipe differs in {', '.join(differ)}" if saved and differ else \
            "it was stopped before its last epoch" if saved else "it saved no recipe"
        raise RunExistsError(f"{path} holds another run ({describe_run(path)}; {why}); pass retrain=True to replace it "
                             f"with a run of this recipe, or another path to keep both")
    path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(path):  # one writer: another process training the same path is refused
        setup = TrainingSetup(**recipe, device=best_device() if device is None else device)
        results = setup.add_final_test(setup.train(progress=progress and is_main_process()))  # all processes train
        model = setup.model.cpu()
        if is_main_process():
            save_run(model, results, path.parent, name=path.stem, dataset=recipe["dataset"], mean=setup.mean,
                     std=setup.std, recipe=recipe, val_indices=setup.val_indices)
    return model.eval(), results


# Your own digit: any image file prepared the way MNIST's digits were -------------------------------------------------
def read_digit_image(path: str | Path, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    """An image file (PNG or JPEG, any size, colour or grey, light or dark background, transparent or not) prepared
    the way MNIST's digits were: (1, 28, 28), light ink on black, normalised with ``mean`` and ``std``.

    The steps: greyscale; a transparent background made the opposite of the ink; inverted if the background (the
    border's median) is light; contrast stretched so the background is 0 and the darkest ink 1; cropped to the ink;
    the longer side scaled to 20 pixels, keeping the aspect ratio; placed in 28x28 with its centre of mass at the
    centre (LeCun et al.'s recipe for MNIST).
    """
    from PIL import Image

    picture = read_image(path)
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
def class_probabilities(model: nn.Module, path: str | Path, mean: float = MNIST_MEAN,
                        std: float = MNIST_STD) -> torch.Tensor:
    """The class probabilities, (num_classes,), that ``model`` gives the image file at ``path``, prepared by
    ``read_digit_image`` with the training set's ``mean`` and ``std`` (MNIST's by default; a checkpoint saves its own:
    ``load_checkpoint(path)["mean"]``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model (load a saved one with hf.load_model(path)), got "
                        f"{type(model).__name__}")
    image = read_digit_image(path, mean, std)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(image.unsqueeze(0).to(device))  # (1, num_classes)
    model.train(was_training)
    return logits.softmax(dim=-1)[0].cpu()  # (num_classes,)


# 8. Inside a trained ViT: filters, position embeddings, attention (notebook 08) ---------------------------------------


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


# 9. Transfer learning: pretrained backbones, a new head, frozen or fine-tuned (notebook 09) ---------------------------


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


def replace_head(model: ViT, num_classes: int) -> ViT:
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
    the last epoch; without, each epoch is evaluated on ``test_data``. Either way the results end with the test score
    after the last epoch, ``final_test_loss`` and ``final_test_acc`` (``test_data=None`` skips them).

    The same call trains a freshly initialised model, so from-scratch, linear-probe and fine-tuning runs differ only in
    the model they are given (and the learning rate). It trains on ``device`` (default ``best_device()``), where the
    model stays. Under torchrun it trains data-parallel (see ``parallelize``).
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters (everything is frozen); call replace_head(model, K) to "
                         "add a trainable head, or model.requires_grad_(True)")
    if val_data is None and test_data is None:
        raise ValueError("fine_tune needs test_data or val_data to evaluate on; pass at least one")
    set_seeds(seed)
    held_out = val_data if val_data is not None else test_data
    train_loader, held_out_loader = make_dataloaders(train_data, held_out, batch_size, seed=seed)
    steps_per_epoch = len(train_loader)
    optimizer, scheduler = adamw_with_schedule(params, lr, weight_decay, epochs * steps_per_epoch,
                                               round(warmup_epochs * steps_per_epoch))
    seed_per_process(seed)
    device = best_device() if device is None else device
    results = train(parallelize(model, device, compile), train_loader, held_out_loader, optimizer,
                    nn.CrossEntropyLoss(), epochs, device, scheduler, progress=progress, amp=amp,
                    split="val" if val_data is not None else "test")
    if test_data is not None:  # the test set, read once, after the last epoch (or the last epoch's own test)
        _add_final_test(results, lambda: test_step(unwrap(model), _evaluation_loader(test_data, batch_size),
                                                   nn.CrossEntropyLoss(), device, amp=amp))
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
    replace_head(model, num_classes)
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


# 10. ViT against a CNN of the same size (notebook 10) -----------------------------------------------------------------


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


# 11. Bugs from the wild (notebook 11) ---------------------------------------------------------------------------------


# Bugs that shipped in public ViT code and were reported and fixed in public; notebook 11 links each thread. As in
# section 6, each takes a correct model and swaps one part for its buggy twin, keeping the weights it can;
# plant_wild_bug, at the end, is the one door to them.
def _batch_sized_embeddings(model: ViT, batch_size: int) -> ViT:
    """pytorch/examples #1178: the class token and E_pos of shape (batch_size, 1, D), drawn from N(0, 1), as the
    official example made them: one vector per slot of the batch, added to every token of the image in that slot. The
    model then runs only on batches of exactly ``batch_size`` and cannot tell where a patch was."""
    dim = model.position_embedding.shape[-1]
    if model.class_token is not None:
        model.class_token = nn.Parameter(torch.randn(batch_size, 1, dim))
    model.position_embedding = nn.Parameter(torch.randn(batch_size, 1, dim))
    return model


def _unregistered_embeddings(model: ViT) -> ViT:
    """pytorch/examples before PR #1204: ``nn.Parameter(torch.randn(...)).to(device)``. On a GPU ``.to`` returns a
    copy, a plain tensor, so the class token and E_pos were no parameters: no optimizer updated them, no state dict
    saved them. ``.clone()`` makes the same copy here, on any device."""
    for name in [name for name in ("class_token", "position_embedding") if getattr(model, name) is not None]:
        plain = getattr(model, name).clone()  # a tensor computed from the Parameter, as .to("cuda") returns
        delattr(model, name)  # a registered parameter cannot be overwritten by a plain tensor
        setattr(model, name, plain)
    return model


def unregistered_tensors(model: nn.Module) -> list[str]:
    """Tensors that the modules of ``model`` hold as plain attributes, neither parameters nor buffers: no optimizer
    sees them, no state dict saves them, ``model.to(device)`` leaves them behind. [] for a sound model."""
    return [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name, value in vars(module).items() if isinstance(value, torch.Tensor)]


class _EncoderBlockWithBugs(TransformerEncoderBlock):
    """``TransformerEncoderBlock`` with a LayerNorm in the residual stream, as two public codebases had it (weights and
    state-dict keys are the block's). ``"normalised_residual"`` (d2l-ai/d2l-en before PR #2283): the residuals start
    from the normalised input, LN1(x) + MLP(LN2(LN1(x) + MSA(LN1(x)))). ``"norm_in_stream"`` (SHI-Labs/
    Compact-Transformers #25, a bad merge): the stream is normalised between the sub-layers, z = LN2(x + MSA(LN1(x))),
    then z + MLP(z)."""

    BUGS = ("normalised_residual", "norm_in_stream")
    bug = "normalised_residual"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, embedding_dim) in and out
        if self.bug == "normalised_residual":  # d2l's ViTBlock.forward, in our names
            x = self.ln_1(x)
            return x + self.mlp(self.ln_2(x + self.dropout(self.self_attention(x))))
        x = x + self.dropout(self.self_attention(self.ln_1(x)))  # CCT's TransformerEncoderLayer.forward, in our names
        x = self.ln_2(x)
        return x + self.mlp(x)


class _AttentionWithBugs(MultiHeadSelfAttention):
    """``MultiHeadSelfAttention`` with a slip from the wild (weights and state-dict keys are the layer's).
    ``"scaled_by_width"`` (lucidrains/vit-pytorch #65): scores divided by sqrt(D), the model's width, not sqrt(D_h),
    the head's: sqrt(k) times too small. ``"softmax_over_queries"`` (nerminnuraydogan/vision-transformer #1):
    ``softmax(dim=1)`` of (batch, N, N) scores normalises each column of A (over the queries), not each row."""

    BUGS = ("scaled_by_width", "softmax_over_queries")
    bug = "scaled_by_width"

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        width = self.qkv.in_features if self.bug == "scaled_by_width" else q.shape[-1]  # D instead of D_h
        scores = q @ k.transpose(-2, -1) / math.sqrt(width)  # (batch, heads, queries, keys)
        return scores.softmax(dim=-2 if self.bug == "softmax_over_queries" else -1)


@torch.no_grad()
def residual_identity_gap(model: ViT, images: torch.Tensor) -> float:
    """Eqs. 2-3 add each sub-layer to its input, so with every sub-layer silenced (its last dense layer zeroed) the
    encoder must pass the tokens of ``images`` through unchanged. Returns max |encoder(z) - z| / max |z| for a silenced
    copy of ``model``: exactly 0 for Eqs. 2-3; a LayerNorm in the residual stream leaves a large fraction of 1."""
    silenced = copy.deepcopy(model).eval()
    for block in silenced.encoder:
        for layer in (block.self_attention.out_proj, block.mlp[3]):  # U_msa and the MLP's second dense layer
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    tokens = silenced.embed(images)  # (batch, num_tokens, embedding_dim)
    return _relative_change(tokens, silenced.encoder(tokens))


@torch.no_grad()
def attention_reference_gap(model: ViT, images: torch.Tensor) -> float:
    """Largest |ours - PyTorch's| over the encoder's attention layers, each compared with ``nn.MultiheadAttention``
    holding its weights (``TorchSelfAttention.from_ours``) on the tokens that reach it from ``images`` (eval mode).
    Float32 rounding leaves about 1e-6; a wrong scale or softmax axis leaves far more."""
    model.eval()
    x, gaps = model.embed(images), []
    for block in model.encoder:
        tokens = block.ln_1(x)  # what the attention layer sees
        reference = TorchSelfAttention.from_ours(block.self_attention)
        gaps.append(max_abs_difference(block.self_attention, reference, tokens))
        x = block(x)
    return max(gaps)


def _vit_pytorch_0_2_7_layout(model: ViT) -> ViT:
    """lucidrains/vit-pytorch #39: version 0.2.7's ViT-B counted 91M parameters against Table 1's 86M. Its head had a
    hidden layer of the MLP size (Linear(D, M), GELU, Linear(M, classes), where fine-tuning uses one Linear) and its
    qkv projection had no bias. Both applied to ``model``, in place."""
    width, hidden, classes = model.head.in_features, model.config["mlp_size"], model.head.out_features
    model.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(model.config["dropout"]),
                               nn.Linear(hidden, classes))
    for block in model.encoder:
        block.self_attention.qkv.register_parameter("bias", None)
    return model


class _ViTNormThenPool(ViT):
    """The final LayerNorm applied to every token before pooling, as the paper's code does (vit_jax: ``encoder_norm``,
    then ``gap``). ``ViT`` pools first, the order lucidrains/vit-pytorch had before PR #274; for the class token the
    two orders agree, for mean pooling they differ."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.encoder(self.embed(images)))  # (batch, num_tokens, embedding_dim), every token normalised
        return z[:, 0] if self.pool == "cls" else z.mean(dim=1)  # (batch, embedding_dim)


def _norm_then_pool(model: ViT) -> _ViTNormThenPool:
    """``model`` made to normalise its tokens before pooling (PR #274's order), in place: only ``features`` differs."""
    model.__class__ = _ViTNormThenPool
    return model


_WILD_BUGS = ("batch_sized_embeddings", "unregistered_embeddings", *_EncoderBlockWithBugs.BUGS,
              *_AttentionWithBugs.BUGS, "vit_pytorch_0_2_7_layout", "norm_then_pool")


def plant_wild_bug(model: ViT, bug: str, batch_size: int | None = None) -> ViT:
    """``model`` with one of notebook 11's bugs, in place: "batch_sized_embeddings" (give ``batch_size``),
    "unregistered_embeddings", "normalised_residual", "norm_in_stream" (in every encoder block), "scaled_by_width",
    "softmax_over_queries" (in every attention layer), "vit_pytorch_0_2_7_layout" or "norm_then_pool"."""
    if bug not in _WILD_BUGS:
        raise ValueError(f"bug must be one of {_WILD_BUGS}, got {bug!r}")
    if bug == "batch_sized_embeddings":
        if batch_size is None:
            raise ValueError('plant_wild_bug(model, "batch_sized_embeddings") needs batch_size=')
        return _batch_sized_embeddings(model, batch_size)
    for block in model.encoder:  # only forward differs: the weights and state-dict keys stay
        if bug in _EncoderBlockWithBugs.BUGS:
            block.__class__, block.bug = _EncoderBlockWithBugs, bug
        if bug in _AttentionWithBugs.BUGS:
            block.self_attention.__class__, block.self_attention.bug = _AttentionWithBugs, bug
    injectors = {"unregistered_embeddings": _unregistered_embeddings, "norm_then_pool": _norm_then_pool,
                 "vit_pytorch_0_2_7_layout": _vit_pytorch_0_2_7_layout}
    return injectors[bug](model) if bug in injectors else model
