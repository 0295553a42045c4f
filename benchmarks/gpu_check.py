"""GPU check: what our training code does on one CUDA GPU, in about 5 minutes, as one JSON.

    python benchmarks/gpu_check.py                       # prints the JSON
    python benchmarks/gpu_check.py --out gpu_check.json  # ... and writes it (after every part)

On one CUDA GPU it measures, each part timed on its own, in this order (the most wanted first):

1. notebook 07's recipe (``hf.MNIST_RECIPE``) trained to its accuracy four ways: plain, ``--compile``
   (``torch.compile``), ``--amp`` (bfloat16 autocast) and both (the last after parts 2 and 3); per way the
   validation accuracy of every epoch, the test accuracy read once at the end, and the seconds of training (compile
   time included in the first epoch);
2. the same recipe under ``torchrun`` with one process, which must join an ``nccl`` process group;
3. ViT-B/16 (224 px, batch 64) training images per second, ours against torchvision's ``VisionTransformer`` built
   with the same numbers, in float32 and with autocast, repeats interleaved;
4. the best recipe's (``hf.BEST_MNIST_RECIPE``) seconds per epoch, compiled as ``train.py --recipe best`` runs it.

A part is skipped once ``--budget-s`` (300) is spent; a part that fails records its error and the others go on. On a
machine without CUDA it says so in one line and runs the same code on a CPU at toy sizes (a few hundred digits, a
tiny ViT, compiling left out), then exits 0: a test of the code, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
import helper_functions as hf  # noqa: E402
from benchmarks import throughput  # noqa: E402

NO_DROPOUT = dict(dropout=0.0, attn_dropout=0.0, embedding_dropout=0.0)  # torchvision's default; the same work
SIZES: dict[str, dict[str, Any]] = {  # the GPU's sizes, and toy ones for the CPU pass
    "cuda": dict(recipe={}, best={}, best_epochs=2, vit={**hf.VIT_CONFIGS["vit_b_16"], **NO_DROPOUT}, vit_batch=64,
                 vit_steps=10, vit_repeats=3, compile=True),
    "cpu": dict(recipe=dict(subset=256, epochs=2, warmup_epochs=0.5),
                best=dict(subset=256, epochs=2, warmup_epochs=0.5), best_epochs=1,
                vit=dict(image_size=32, patch_size=16, num_layers=2, num_heads=2, embedding_dim=32, mlp_size=64,
                         num_classes=10, **NO_DROPOUT),
                vit_batch=4, vit_steps=2, vit_repeats=1, compile=False),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(report: dict[str, Any], path: Path) -> None:
    """``report`` as JSON at ``path``, written whole or not at all (a temporary file, then a rename)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(temporary, path)


def test_accuracy(setup: hf.TrainingSetup, amp: bool) -> float:
    """The test accuracy, read once (``TrainingSetup.test`` returns a dict, or a (loss, accuracy) pair)."""
    result = setup.test(amp=amp)
    return float(result["test_acc"] if isinstance(result, dict) else result[1])


def train_recipe(recipe: dict[str, Any], device: torch.device, amp: bool = False, compile: bool = False,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Train ``recipe`` with the engine (``hf.TrainingSetup``): per-epoch seconds and validation accuracy, and the
    test accuracy once at the end (only when the whole schedule ran)."""
    setup = hf.TrainingSetup(**recipe, device=device)
    seconds: list[float] = []
    clock = {"since": time.perf_counter()}

    def on_epoch_end(epoch: int, results: dict[str, list[float]]) -> None:
        synchronize(device)
        seconds.append(round(time.perf_counter() - clock["since"], 2))
        clock["since"] = time.perf_counter()

    synchronize(device)
    clock["since"] = time.perf_counter()
    results = setup.train(stop_after=stop_after, compile=compile, amp=amp, progress=False, on_epoch_end=on_epoch_end)
    held_out = "val_acc" if "val_acc" in results else "test_acc"
    out = dict(amp=amp, compile=compile, epochs=len(seconds), epoch_seconds=seconds,
               training_seconds=round(sum(seconds), 2), per_epoch_seconds_after_first=(
                   round(sum(seconds[1:]) / len(seconds[1:]), 2) if len(seconds) > 1 else None),
               **{f"{held_out}_per_epoch": [round(a, 4) for a in results[held_out]]})
    if stop_after is None:
        out["test_acc"] = round(test_accuracy(setup, amp), 4)
    return out


def vit_images_per_second(config: dict[str, Any], device: torch.device, batch: int, steps: int,
                          repeats: int) -> dict[str, Any]:
    """Training images per second (forward, backward, AdamW) of our ViT and torchvision's, built from ``config``,
    in float32 and with bfloat16 autocast; repeats interleaved (ours, torchvision, ours, ...), the best repeat kept."""
    full = throughput.full_config(config)
    images = torch.randn(batch, full["in_channels"], full["image_size"], full["image_size"], device=device)
    labels = torch.randint(0, full["num_classes"], (batch,), device=device)
    report: dict[str, Any] = dict(config=config, batch_size=batch, steps=steps, repeats=repeats)
    for amp in (False, True):
        runners: dict[str, Callable[[], None]] = {}
        for name in ("ours", "torchvision"):
            hf.set_seeds(0)
            model = throughput.BUILDERS[name](config).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, amp: bool = amp) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            for _ in range(2):  # warm-up: kernels chosen, memory allocated
                step()
            runners[name] = step
        best = {name: 0.0 for name in runners}
        for _ in range(repeats):
            for name, step in runners.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                synchronize(device)
                best[name] = max(best[name], batch * steps / (time.perf_counter() - start))
        report["amp" if amp else "float32"] = dict(
            **{f"{name}_images_per_second": round(v, 1) for name, v in best.items()},
            ours_over_torchvision=round(best["ours"] / best["torchvision"], 3))
        del runners
    return report


def torchrun_one_process(recipe: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Notebook 07's recipe under ``torchrun --nproc_per_node=1``: the backend it joined and what it trained."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "worker.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
                   "--ddp-worker", "--out", str(out), "--recipe-json", json.dumps(recipe)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"torchrun exited {done.returncode}: {' | '.join(tail)}")
        return {**json.loads(out.read_text()), "wall_seconds_with_start": round(time.perf_counter() - start, 1)}


def ddp_worker(out: Path, recipe: dict[str, Any]) -> None:
    """One torchrun process: join the group (nccl on a CUDA GPU, gloo on a CPU), train, write what it did."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        result = train_recipe(recipe, device)
        result.update(backend=torch.distributed.get_backend(), world_size=torch.distributed.get_world_size())
        if torch.distributed.get_rank() == 0:
            out.write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here, after every part")
    parser.add_argument("--budget-s", dest="budget_s", type=float, default=300.0,
                        help="skip the parts left once this many seconds are spent [300]")
    parser.add_argument("--ddp-worker", dest="ddp_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-json", dest="recipe_json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.out, json.loads(args.recipe_json))
        return {}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = SIZES[device.type]
    if not cuda:
        print("gpu_check.py: no CUDA GPU here (torch.cuda.is_available() is False); running a tiny CPU pass of the "
              "same code instead, which measures nothing", flush=True)
    nb07 = {**hf.MNIST_RECIPE, **sizes["recipe"]}
    best = {**hf.BEST_MNIST_RECIPE, **sizes["best"]}
    start = time.perf_counter()
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()}), tiny pass", cuda=cuda,
        torch=torch.__version__, cuda_version=torch.version.cuda, budget_s=args.budget_s,
        notebook07_recipe=nb07, best_recipe=best, parts={})
    ways = [("plain", {}), ("compile", dict(compile=True)), ("amp", dict(amp=True)),
            ("amp+compile", dict(amp=True, compile=True))]
    nb07_parts = {f"notebook07_{name}": (lambda kw=kw: train_recipe(nb07, device, **kw)) for name, kw in ways
                  if sizes["compile"] or not kw.get("compile")}
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [  # the most wanted first: later ones may not fit
        *list(nb07_parts.items())[:3],
        ("torchrun_one_process",
         lambda: torchrun_one_process(nb07, max(60.0, args.budget_s - (time.perf_counter() - start)))),
        ("vit_b16_training_images_per_second",
         lambda: vit_images_per_second(sizes["vit"], device, sizes["vit_batch"], sizes["vit_steps"],
                                       sizes["vit_repeats"])),
        *list(nb07_parts.items())[3:],
        ("best_recipe_epochs", lambda: train_recipe(best, device, compile=sizes["compile"],
                                                    stop_after=sizes["best_epochs"])),
    ]
    def save() -> None:
        report["seconds"] = round(time.perf_counter() - start, 1)
        if args.out:
            write_json(report, args.out)

    if not sizes["compile"]:
        for name in ("notebook07_compile", "notebook07_amp+compile"):
            report["parts"][name] = {"skipped": "CPU pass: compiling takes minutes on a CPU"}
    for name, part in parts:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["parts"][name] = {"skipped": f"the {args.budget_s:.0f} s budget was spent ({elapsed:.0f} s)"}
            continue
        part_start = time.perf_counter()
        try:
            report["parts"][name] = part()
        except Exception as error:  # one part's failure is recorded; the others still run
            report["parts"][name] = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        report["parts"][name]["part_seconds"] = round(time.perf_counter() - part_start, 1)
        print(f"gpu_check: {name} done in {report['parts'][name]['part_seconds']} s", file=sys.stderr, flush=True)
        save()
    save()
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
