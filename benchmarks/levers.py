"""What each speed lever of issue 18 does to one training step of notebook 07's model, measured, not assumed.

Run from the repository root, on an otherwise idle machine (a second job on the same cores makes every figure
meaningless):

    python benchmarks/levers.py                 # every lever: about 5 minutes on 2 cores
    python benchmarks/levers.py --quick         # 2 levers, few steps: a smoke test
    python benchmarks/levers.py --only baseline,fused_adamw

Each lever is one change to the baseline (``hf.MNIST_RECIPE``: ``vit_mnist``, batch 128, AdamW, the augmentation, a
DataLoader over MNIST in memory, eager mode). A step is everything the engine does per batch: fetch the batch, augment
it, forward, loss, backward, optimizer step, schedule step. Repeats are interleaved (A, B, C, A, B, C, ...) so a slow
spell hits every lever alike; we report the median time per step and images per second, and the speed-up over the
baseline. ``torch.compile``'s own compile time is reported apart (it is paid once per run).

What this cannot tell: whether a lever keeps the accuracy (a larger batch, a shorter schedule, EMA); that is
``benchmarks/time_to_accuracy.py``'s job.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
import helper_functions as hf  # noqa: E402
import machinery  # noqa: E402


def sdpa_attention(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiHeadSelfAttention.forward`` with PyTorch's fused kernel, ``F.scaled_dot_product_attention``, in place of
    the written-out softmax(q k^T / sqrt(D_h)) v (no attention dropout: vit_mnist has none)."""
    q, k, v = self.queries_keys_values(x)
    return self.out_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class SdpaAttention(hf.MultiHeadSelfAttention):
    forward = sdpa_attention


def linear_patch_projection(self, x: torch.Tensor) -> torch.Tensor:
    """``PatchEmbedding.forward`` as vit-pytorch computes it: cut patches with a reshape, then one Linear (the same
    weights as the Conv2d, flattened)."""
    p = self.patch_size
    patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)  # (batch, num_patches, C*P*P)
    return F.linear(patches, self.projection.weight.flatten(1), self.projection.bias)


class LinearPatchEmbedding(hf.PatchEmbedding):
    forward = linear_patch_projection


def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float = 0.999) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)


# One lever = changes to the baseline's settings
LEVERS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "no_augmentation": dict(augment=False),
    "model_only": dict(fixed_batch=True, augment=False),  # no DataLoader, no augmentation: the model and optimizer
    "fused_adamw": dict(fused=True),
    "foreach_off_adamw": dict(foreach=False),
    "compile": dict(compile=True),
    "batch_256": dict(batch_size=256),
    "batch_512": dict(batch_size=512),
    "sdpa_attention": dict(sdpa_attention=True),
    "linear_patch_projection": dict(linear_patch_projection=True),
    "no_qkv_bias": dict(no_qkv_bias=True),
    "ema": dict(ema=True),
    "bfloat16_autocast": dict(amp=True),
    "patch_4": dict(patch_size=4),
    "patch_4_fused_batch_256": dict(patch_size=4, fused=True, batch_size=256),
    "patch_4_sdpa_attention": dict(patch_size=4, sdpa_attention=True),
    "patch_4_compile": dict(patch_size=4, compile=True),
    "patch_4_fused_compile": dict(patch_size=4, fused=True, compile=True),
    "fused_batch_256": dict(fused=True, batch_size=256),
    "fused_compile": dict(fused=True, compile=True),
    "fused_compile_batch_256": dict(fused=True, compile=True, batch_size=256),
    # the best recipe's step (hf.BEST_MNIST_RECIPE: patch 4, batch 256; its engine's fused AdamW; run compiled)
    "best_recipe_step": dict(patch_size=4, batch_size=256, fused=True, compile=True),
    "best_recipe_step_sdpa_attention": dict(patch_size=4, batch_size=256, fused=True, compile=True,
                                            sdpa_attention=True),
}


def build(lever: dict[str, Any], train_data: torch.utils.data.Dataset) -> tuple[Callable[[], None], float]:
    """A function doing one training step with ``lever``'s settings, and the seconds spent compiling (0 if none)."""
    hf.set_seeds(0)
    batch_size = lever.get("batch_size", hf.MNIST_RECIPE["batch_size"])
    model = hf.vit_from_config("vit_mnist", patch_size=lever.get("patch_size", 7))
    if lever.get("sdpa_attention"):
        for block in model.encoder:
            block.self_attention.__class__ = SdpaAttention
    if lever.get("linear_patch_projection"):
        model.patch_embedding.__class__ = LinearPatchEmbedding
    if lever.get("no_qkv_bias"):
        for block in model.encoder:
            block.self_attention.qkv.bias = None
    average = hf.vit_from_config("vit_mnist", patch_size=lever.get("patch_size", 7)) if lever.get("ema") else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=hf.MNIST_RECIPE["lr"],
                                  weight_decay=hf.MNIST_RECIPE["weight_decay"], fused=lever.get("fused"),
                                  foreach=lever.get("foreach"))
    scheduler = hf.warmup_cosine_schedule(optimizer, 10_000, 100)
    loss_fn = torch.nn.CrossEntropyLoss()
    forward = torch.compile(model) if lever.get("compile") else model
    augment = lever.get("augment", hf.MNIST_RECIPE["augment"])
    loader = torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True)
    fixed = next(iter(loader))
    batches = iter(())

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal batches
        if lever.get("fixed_batch"):
            return fixed
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def step() -> None:
        images, labels = next_batch()
        if augment:
            images = hf.random_affine(images)
        with machinery.mixed_precision("cpu", lever.get("amp", False)):
            loss = loss_fn(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            ema_update(average, model)

    start = time.perf_counter()
    step()  # warm-up; with compile, this step compiles
    step()
    return step, (time.perf_counter() - start) if lever.get("compile") else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats of 3 steps (of baseline and fused_adamw, unless --only)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(LEVERS)}")
    parser.add_argument("--repeats", type=machinery.positive_int, default=5)
    parser.add_argument("--threads", type=machinery.positive_int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--images", type=machinery.positive_int, default=3840,
                        help="training images per measurement (default 3840)")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "benchmarks" / "results" / "levers.json")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else ["baseline", "fused_adamw"] if args.quick else list(LEVERS)
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"--only: unknown lever(s) {unknown}; choose from {', '.join(LEVERS)}")
    repeats, images = (2, 384) if args.quick else (args.repeats, args.images)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, _ = hf.get_tensor_datasets("mnist")
    steps_fns, compile_seconds = {}, {}
    for name in names:
        steps_fns[name], compile_seconds[name] = build(LEVERS[name], train_data)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            batch_size = LEVERS[name].get("batch_size", hf.MNIST_RECIPE["batch_size"])
            steps = max(1, images // batch_size)
            start = time.perf_counter()
            for _ in range(steps):
                steps_fns[name]()
            times[name].append((time.perf_counter() - start) / steps)
    base = statistics.median(times[names[0]]) / LEVERS[names[0]].get("batch_size", 128)
    rows = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machinery.cpu_description()}")
    print(f"{'lever':28s} {'ms/step':>8s} {'img/s':>8s} {'vs ' + names[0]:>12s} {'compile s':>9s}")
    for name in names:
        batch_size = LEVERS[name].get("batch_size", hf.MNIST_RECIPE["batch_size"])
        per_step = statistics.median(times[name])
        rows[name] = dict(settings=LEVERS[name], batch_size=batch_size, ms_per_step=round(1000 * per_step, 2),
                          images_per_second=round(batch_size / per_step, 1),
                          speedup=round(base / (per_step / batch_size), 3),
                          compile_seconds=round(compile_seconds[name], 1),
                          all_ms=[round(1000 * t, 2) for t in times[name]])
        r = rows[name]
        print(f"{name:28s} {r['ms_per_step']:8.1f} {r['images_per_second']:8.0f} {r['speedup']:11.2f}x "
              f"{r['compile_seconds']:9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                        machine=platform.machine(), cpu=machinery.cpu_description(), repeats=repeats,
                                        images=images, levers=rows),
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
