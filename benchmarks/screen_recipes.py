"""Screen candidate MNIST recipes at their full length on the validation split, many runs at once on one GPU.

The CPU time of issue 27 (99.5% in 30 minutes on 2 cores) is spent confirming one recipe, not searching: this
script trains every candidate below with a few seeds, side by side, on a GPU (or, tiny, on a CPU to test it), and
reports each run's validation accuracy after its last epoch. The test set is never read here.

    python benchmarks/screen_recipes.py --out /tmp/sweep.json --jobs 14 --deadline-s 280     # on one GPU
    python benchmarks/screen_recipes.py --out /tmp/s.json --subset 512 --epochs 2 --only base30,distill26  # tiny

Every run also follows, for free, two exponential moving averages of its weights (decay 0.999 and 0.9997 per step)
and reports test-time augmentation (the mean softmax over the image and its four 1-pixel shifts) on the validation
set after the last epoch, so those two levers need no runs of their own.

Levers are applied from outside the engine (``hf.TrainingSetup`` and ``hf.train`` run unchanged): the EMA steps with
the schedule, hard distillation swaps the loss and the augmentation, stochastic depth wraps the encoder blocks. The
levers a chosen recipe needs are then written into helper_functions.py; this file stays the record of the search.
On a GPU the training data sit on the GPU (``DeviceBatches``: the same shuffle-and-slice as a DataLoader), so that
the CPU that launches the kernels does not also copy every batch.

A driver starts one worker process per (recipe, seed), at most ``--jobs`` at a time, seed 0 of every recipe first,
and stops them all at ``--deadline-s``; it folds the workers' results into one JSON file every few seconds, so that
even a run stopped by an outer timeout leaves the epochs it finished.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
import helper_functions as hf  # noqa: E402

EMA_DECAYS = (0.999, 0.9997)
BASE: dict[str, Any] = {**hf.BEST_MNIST_RECIPE, "epochs": 30, "val_split": 5000}
# name -> recipe (TrainingSetup's arguments) and levers, in the order the sweep starts them. "cost": the run's training
# cost on a CPU in thousands of steps of the base model at batch 128 (teacher included), from per-step times measured
# on one core (patch 4: base 294 ms a step, width 80 x 4 layers 240 ms, SmallCNN 62 ms to train and 36 ms to label a
# batch) and, for larger batches, from benchmarks/measured/levers.json (1.15x and 1.19x per image on 2 threads).
CANDIDATES: dict[str, dict[str, Any]] = {
    "base30": dict(recipe=BASE, cost=12.9),
    "b256_e34": dict(recipe={**BASE, "batch_size": 256, "lr": 3e-3, "warmup_epochs": 3, "epochs": 34}, cost=12.7),
    "distill26": dict(recipe={**BASE, "epochs": 26}, teacher_epochs=8, cost=13.2),
    "d80l4_e36": dict(recipe={**BASE, "epochs": 36, "embedding_dim": 80, "mlp_size": 160, "num_layers": 4}, cost=12.6),
    "b256_distill30": dict(recipe={**BASE, "batch_size": 256, "lr": 3e-3, "warmup_epochs": 3, "epochs": 30},
                           teacher_epochs=8, cost=13.5),
    "erase30": dict(recipe=BASE, erase=0.5, cost=12.9),
    "b512_e36": dict(recipe={**BASE, "batch_size": 512, "lr": 4e-3, "warmup_epochs": 4, "epochs": 36}, cost=13.0),
    "base36": dict(recipe={**BASE, "epochs": 36}, cost=15.5),
    "sd30": dict(recipe=BASE, drop_path=0.1, cost=12.9),
    "warm5": dict(recipe={**BASE, "warmup_epochs": 5}, cost=12.9),
}


# Levers, applied from outside the engine ----------------------------------------------------------------------------
class DeviceBatches:
    """A training loader over tensors already on the device: a fresh seeded shuffle each epoch, then slices."""

    sampler = None  # what hf.train looks at for a DistributedSampler

    def __init__(self, dataset: torch.utils.data.TensorDataset, batch_size: int, seed: int,
                 device: torch.device) -> None:
        self.images, self.labels = (t.to(device) for t in dataset.tensors)
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.images[index], self.labels[index]


def write_json(report: dict[str, Any], path: Path) -> None:
    """``report`` as JSON at ``path``, written whole or not at all (a temporary file, then a rename)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(temporary, path)


def device_batches(dataset: torch.utils.data.TensorDataset, batch_size: int, device: torch.device) -> list:
    """An evaluation loader as a list of (images, labels) batches on the device, in order."""
    images, labels = (t.to(device) for t in dataset.tensors)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


class StepHook:
    """The schedule, stepped as before, calling ``hook()`` after each optimizer step (an EMA update)."""

    def __init__(self, scheduler: Any, hook: Callable[[], None]) -> None:
        self.scheduler, self.hook = scheduler, hook

    def step(self) -> None:
        self.scheduler.step()
        self.hook()


class WeightAverages:
    """Exponential moving averages of a model's weights, one per decay, with the usual short-run correction."""

    def __init__(self, model: nn.Module, decays: tuple[float, ...] = EMA_DECAYS) -> None:
        self.model, self.decays, self.steps = model, decays, 0
        self.copies = {d: copy.deepcopy(model).eval().requires_grad_(False) for d in decays}

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        params = list(self.model.parameters())
        for decay, average in self.copies.items():
            d = min(decay, (1 + self.steps) / (10 + self.steps))
            torch._foreach_lerp_(list(average.parameters()), params, 1 - d)


def random_erasing(images: torch.Tensor, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.2),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """With probability ``p`` per image, one rectangle of ``scale`` of the area (aspect ``ratio``) set to the
    background (Zhong et al. 2020), all in one batched pass."""
    n, _, height, width = images.shape
    dev = images.device
    area = height * width * torch.empty(n, device=dev).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    h = (area * aspect).sqrt().round().clamp(1, height)
    w = (area / aspect).sqrt().round().clamp(1, width)
    top = (torch.rand(n, device=dev) * (height - h + 1)).floor()
    left = (torch.rand(n, device=dev) * (width - w + 1)).floor()
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + h).view(n, 1, 1)) &
           (cols >= left.view(n, 1, 1)) & (cols < (left + w).view(n, 1, 1)))  # (batch, height, width)
    box &= (torch.rand(n, device=dev) < p).view(n, 1, 1)
    return torch.where(box.unsqueeze(1), images.amin(), images)


class DropBlock(nn.Module):
    """Stochastic depth (Huang et al. 2016) around one encoder block: in training, each image skips the block with
    probability ``rate`` (the survivors' update scaled by 1 / (1 - rate))."""

    def __init__(self, block: nn.Module, rate: float) -> None:
        super().__init__()
        self.block, self.rate = block, rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return self.block(x)
        keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= self.rate).to(x.dtype) / (1 - self.rate)
        return x + (self.block(x) - x) * keep


class HardDistillation(nn.Module):
    """DeiT's hard-label distillation (Touvron et al. 2021, Eq. 3, class token only): half the loss on the true label,
    half on the teacher's argmax for the same augmented image; the teacher's labels come from ``augment``."""

    def __init__(self, loss_fn: nn.Module, teacher: nn.Module, augment: Callable) -> None:
        super().__init__()
        self.loss_fn, self.teacher, self.base_augment = loss_fn, teacher.eval(), augment
        self.teacher_labels: torch.Tensor | None = None

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        images = self.base_augment(images)
        with torch.no_grad():
            self.teacher_labels = self.teacher(images).argmax(dim=1)
        return images

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.teacher_labels is None:  # evaluation: the plain loss
            return self.loss_fn(logits, labels)
        teacher_labels, self.teacher_labels = self.teacher_labels, None
        return 0.5 * self.loss_fn(logits, labels) + 0.5 * self.loss_fn(logits, teacher_labels)


@torch.inference_mode()
def accuracy(model: nn.Module, batches: list, tta: bool = False) -> float:
    """Accuracy on ``batches``; with ``tta``, of the mean softmax over the image and its 1-pixel shifts."""
    model.eval()
    correct = total = 0
    shifts = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)] if tta else [(0, 0)]
    for images, labels in batches:
        background = images.amin()
        probs = sum(F.softmax(model(torch.roll(images - background, s, dims=(2, 3)) + background), dim=1)
                    for s in shifts)
        correct += (probs.argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total


# One run ------------------------------------------------------------------------------------------------------------
def run_one(name: str, seed: int, out: Path, subset: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Train candidate ``name`` with ``seed``; write its validation curves to ``out`` after every epoch."""
    spec = CANDIDATES[name]
    recipe = {**spec["recipe"], "seed": seed, "subset": subset}
    if epochs is not None:
        recipe.update(epochs=epochs, warmup_epochs=min(recipe["warmup_epochs"], epochs / 4))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = False  # float32 throughout, as on a CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    setup = hf.TrainingSetup(**recipe, device=device)
    val = device_batches(setup.val_data, 500, device)
    if device.type == "cuda":
        setup.train_loader = DeviceBatches(setup.train_data, recipe["batch_size"], seed, device)
        setup.val_loader = val
    report: dict[str, Any] = dict(name=name, seed=seed, recipe={k: v for k, v in recipe.items()},
                                  levers={k: v for k, v in spec.items() if k not in ("recipe", "cost")},
                                  device=str(device), steps_per_epoch=len(setup.train_loader), epoch_seconds=[],
                                  val_acc=[], ema_val_acc={str(d): [] for d in EMA_DECAYS}, done=False)

    def save() -> None:
        write_json(report, out)

    if spec.get("drop_path"):  # linearly rising to the last block's rate, as in DeiT
        blocks = setup.model.encoder
        for i in range(len(blocks)):
            blocks[i] = DropBlock(blocks[i], spec["drop_path"] * (i + 1) / len(blocks))
    augment = setup.augment
    if spec.get("erase"):
        augment = lambda images, rate=spec["erase"]: random_erasing(hf.random_affine(images), p=rate)  # noqa: E731
    if spec.get("teacher_epochs"):
        t0 = time.perf_counter()
        hf.set_seeds(seed + 1000)
        teacher = hf.SmallCNN().to(device)
        loader = (DeviceBatches(setup.train_data, 128, seed + 1000, device) if device.type == "cuda"
                  else setup.train_loader)
        steps = spec["teacher_epochs"] * len(loader)
        optimizer, scheduler = hf.adamw_with_schedule(teacher.parameters(), 2e-3, 0.05, steps, round(0.1 * steps))
        hf.train(teacher, loader, val, optimizer, nn.CrossEntropyLoss(), spec["teacher_epochs"], device, scheduler,
                 hf.random_affine, progress=False, split="val")
        report["teacher_val_acc"] = accuracy(teacher, val)
        report["teacher_seconds"] = round(time.perf_counter() - t0, 1)
        distill = HardDistillation(setup.loss_fn, teacher, augment)
        setup.loss_fn, augment = distill, distill.augment
    setup.augment = augment
    averages = WeightAverages(setup.model)
    setup.scheduler = StepHook(setup.scheduler, averages.update)
    clock = {"since": time.perf_counter()}

    def on_epoch_end(epoch: int, results: dict[str, list[float]]) -> None:
        report["epoch_seconds"].append(round(time.perf_counter() - clock["since"], 2))
        report["val_acc"] = results["val_acc"]
        for decay, average in averages.copies.items():
            report["ema_val_acc"][str(decay)].append(accuracy(average, val))
        report["epochs_done"] = epoch
        save()
        clock["since"] = time.perf_counter()

    setup.train(progress=False, on_epoch_end=on_epoch_end)
    report["final"] = dict(val_acc=report["val_acc"][-1], val_acc_tta=accuracy(setup.model, val, tta=True),
                           **{f"ema{d}": report["ema_val_acc"][str(d)][-1] for d in EMA_DECAYS},
                           **{f"ema{d}_tta": accuracy(a, val, tta=True) for d, a in averages.copies.items()})
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["done"] = True
    save()
    return report


# The driver ---------------------------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per candidate: seeds finished, the last-epoch validation accuracy per seed (plain, EMA, TTA) and their means."""
    table: dict[str, Any] = {}
    for name, spec in CANDIDATES.items():
        done = [r for r in runs if r["name"] == name and r.get("done")]
        partial = [r for r in runs if r["name"] == name and not r.get("done")]
        row: dict[str, Any] = dict(cost_kilosteps=spec["cost"], seeds_done=[r["seed"] for r in done],
                                   partial=[(r["seed"], r.get("epochs_done", 0)) for r in partial])
        for key in ("val_acc", "val_acc_tta", *(f"ema{d}" for d in EMA_DECAYS), *(f"ema{d}_tta" for d in EMA_DECAYS)):
            values = [r["final"][key] for r in done]
            row[key] = values
            row[key + "_mean"] = round(statistics.fmean(values), 5) if values else None
        if done:
            row["gpu_seconds_per_epoch"] = round(statistics.median(
                s for r in done for s in r["epoch_seconds"][1:] or r["epoch_seconds"]), 2)
            row["gpu_seconds_total"] = round(statistics.fmean(r["total_seconds"] for r in done), 1)
            if "teacher_val_acc" in done[0]:
                row["teacher_val_acc"] = [r["teacher_val_acc"] for r in done]
        table[name] = row
    return table


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workers, at most ``args.jobs`` at a time, until done or ``args.deadline_s``; return the report."""
    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"screen_recipes.py: unknown candidate(s) {unknown}; choose from {sorted(CANDIDATES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    queue = [(name, seed) for seed in seeds for name in names]  # seed 0 of every candidate first
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    durations: list[float] = []
    start = time.perf_counter()
    report: dict[str, Any] = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                  torch=torch.__version__, jobs=args.jobs, deadline_s=args.deadline_s,
                                  candidates={n: CANDIDATES[n] for n in names}, ema_decays=EMA_DECAYS)

    def collect() -> None:
        runs = []
        for name, seed in [(n, s) for s in seeds for n in names]:
            path = work / f"{name}_seed{seed}.json"
            if path.exists():
                try:
                    runs.append(json.loads(path.read_text()))
                except json.JSONDecodeError:
                    pass
        report.update(elapsed_s=round(time.perf_counter() - start, 1), runs=runs, summary=summarise(runs),
                      not_started=[list(job) for job in queue])
        write_json(report, Path(args.out))

    last_collect = 0.0
    while queue or running:
        now = time.perf_counter() - start
        if now > args.deadline_s:
            for process, _ in running.values():
                process.send_signal(signal.SIGTERM)
            for process, _ in running.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            report["stopped_at_deadline"] = [list(job) for job in running]
            break
        estimate = max(durations) if durations else 0.0
        while queue and len(running) < args.jobs and now + estimate < args.deadline_s:
            name, seed = queue.pop(0)
            command = [sys.executable, __file__, "--worker", name, "--seed", str(seed),
                       "--out", str(work / f"{name}_seed{seed}.json")]
            command += ["--subset", str(args.subset)] if args.subset else []
            command += ["--epochs", str(args.epochs)] if args.epochs else []
            log = open(work / f"{name}_seed{seed}.log", "w")
            running[(name, seed)] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                      env={**os.environ, "OMP_NUM_THREADS": "1"}), now)
        for job, (process, started) in list(running.items()):
            if process.poll() is not None:
                durations.append(now - started)
                del running[job]
                print(f"[{now:6.1f} s] {job[0]} seed {job[1]} finished (exit {process.returncode}) after "
                      f"{now - started:.0f} s; {len(running)} running, {len(queue)} queued", flush=True)
        if not running and queue and now + estimate >= args.deadline_s:
            break  # nothing left that fits before the deadline
        if now - last_collect > 10:
            collect()
            last_collect = now
        time.sleep(0.5)
    collect()
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"{'candidate':16s} {'cost':>5s} {'seeds':>6s} {'val':>7s} {'val+TTA':>8s} "
          + " ".join(f"{'ema' + str(d):>9s}" for d in EMA_DECAYS) + f" {'s/epoch':>8s}  per seed (val)")
    for name, row in report["summary"].items():
        def pct(value: float | None) -> str:
            return f"{100 * value:.2f}" if value is not None else "-"
        print(f"{name:16s} {row['cost_kilosteps']:5.1f} {len(row['seeds_done']):6d} {pct(row['val_acc_mean']):>7s} "
              f"{pct(row['val_acc_tta_mean']):>8s} "
              + " ".join(f"{pct(row[f'ema{d}_mean']):>9s}" for d in EMA_DECAYS)
              + f" {row.get('gpu_seconds_per_epoch', '-')!s:>8s}  {[round(100 * v, 2) for v in row['val_acc']]}"
              + (f" partial {row['partial']}" if row["partial"] else ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON report (the worker's JSON with --worker)")
    parser.add_argument("--only", help="comma-separated candidates [all]")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="workers at a time [1]")
    parser.add_argument("--deadline-s", dest="deadline_s", type=float, default=3600.0,
                        help="stop every worker after this many seconds [3600]")
    parser.add_argument("--work-dir", dest="work_dir", default="/tmp/screen_recipes",
                        help="the workers' own JSON files and logs [/tmp/screen_recipes]")
    parser.add_argument("--subset", type=int, help="first N images of each set (tests)")
    parser.add_argument("--epochs", type=int, help="override every candidate's epochs (tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_one(args.worker, args.seed, Path(args.out), args.subset, args.epochs)
    report = drive(args)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
