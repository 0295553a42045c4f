"""Time to accuracy: how many minutes a named recipe needs to reach 99.0% and 99.5% MNIST test accuracy.

Run from the repository root, on an otherwise idle machine (a second job on the same cores makes the times
meaningless; the accuracies do not depend on it):

    python benchmarks/time_to_accuracy.py --recipe notebook07 --seeds 0,1,2     # about 3 minutes a seed on 2 cores
    python benchmarks/time_to_accuracy.py --recipe best --seeds 0,1,2           # about 30 minutes a seed
    python benchmarks/time_to_accuracy.py --recipe notebook07 --batch-size 256 --lr 3e-3 --out benchmarks/results/b256.json

Each seed trains the recipe with the engine ``train.py`` and notebook 07 use (``hf.TrainingSetup`` and ``hf.train``)
and records, after every epoch, the wall-clock seconds of training so far (the recipe's own validation pass included,
this benchmark's test pass not) and the test accuracy. Each run also gives its median epoch time: epochs x median epoch is the run's time without
the slow spells that other jobs on the same CPU cause (the wall time is reported as measured, beside it). The test
accuracy of every epoch is only observed, never used
to choose anything: the headline is the last epoch of the fixed recipe, averaged over the seeds, with its spread.
``reached`` gives the training minutes at which 99.0% and 99.5% were first seen (None: never).

Results go to one JSON file (default ``benchmarks/results/time_to_accuracy_<recipe>.json``, written again after every
seed, so an interrupted benchmark keeps the seeds it finished) and a plot of test accuracy against minutes beside it.
An existing file is never replaced unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
import helper_functions as hf  # noqa: E402
import machinery  # noqa: E402

# The recipes the README quotes, train.py's --recipe (hf.RECIPES): "best" is notebook 07's model with 4x4 patches (49
# tokens instead of 16), label smoothing and a longer schedule, on all 60,000 digits (measured, never chosen on).
RECIPES: dict[str, dict[str, Any]] = hf.RECIPES
TARGETS = (0.99, 0.995)


def reached(minutes: list[float], accuracies: list[float], target: float) -> float | None:
    """The first of ``minutes`` at which ``accuracies`` reached ``target`` (None if it never did)."""
    return next((m for m, a in zip(minutes, accuracies) if a >= target), None)


def run_seed(recipe: dict[str, Any], seed: int, compile: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train ``recipe`` with ``seed``; per epoch: training minutes so far, test accuracy (and validation's)."""
    setup = hf.TrainingSetup(**{**recipe, "seed": seed})
    minutes: list[float] = []
    test_acc: list[float] = []
    clock = {"training": 0.0, "since": time.perf_counter()}

    def observe(epoch: int, results: dict[str, list[float]]) -> None:
        clock["training"] += time.perf_counter() - clock["since"]
        minutes.append(round(clock["training"] / 60, 4))
        test_acc.append(setup.test()[1])  # observed only; not timed
        print(f"  seed {seed} epoch {epoch}/{recipe['epochs']}: {minutes[-1]:.2f} min, test_acc {test_acc[-1]:.4f}",
              flush=True)
        clock["since"] = time.perf_counter()

    results = setup.train(compile=compile, progress=progress, on_epoch_end=observe)
    held_out = "val_acc" if "val_acc" in results else None
    epoch_minutes = [b - a for a, b in zip([0.0] + minutes, minutes)]
    return dict(seed=seed, minutes=minutes, test_acc=test_acc, val_acc=results.get("val_acc") if held_out else None,
                train_loss=results["train_loss"], final_test_acc=test_acc[-1], training_minutes=minutes[-1],
                median_epoch_minutes=round(statistics.median(epoch_minutes), 4),
                reached={str(t): reached(minutes, test_acc, t) for t in TARGETS})


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, smallest and largest last-epoch test accuracy and training minutes over the seeds."""
    final = [r["final_test_acc"] for r in runs]
    wall = [r["training_minutes"] for r in runs]
    return dict(seeds=len(runs), final_test_acc_mean=round(statistics.fmean(final), 5),
                final_test_acc_min=min(final), final_test_acc_max=max(final),
                training_minutes_mean=round(statistics.fmean(wall), 2), training_minutes_max=max(wall),
                # epochs x the median epoch: the run's time without the slow spells another job on the CPU causes
                median_epoch_estimate_minutes=round(len(runs[0]["minutes"]) * statistics.median(
                    [r["median_epoch_minutes"] for r in runs]), 2),
                reached={str(t): [r["reached"][str(t)] for r in runs] for t in TARGETS})


def plot(report: dict[str, Any], path: Path) -> Path:
    """Test accuracy against training minutes, one line per seed, the targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in report["runs"]:
        ax.plot(run["minutes"], [100 * a for a in run["test_acc"]], marker=".", label=f"seed {run['seed']}")
    for target in TARGETS:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel=f"training minutes ({report['threads']} threads)", ylabel="MNIST test accuracy (%)",
           title=f"recipe {report['recipe_name']}: last epoch {100 * report['summary']['final_test_acc_mean']:.2f}% "
                 f"(mean of {report['summary']['seeds']} seeds)", ylim=(97, 100))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="notebook07", choices=sorted(RECIPES))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=machinery.positive_int, help="override the recipe's epochs")
    parser.add_argument("--batch-size", dest="batch_size", type=machinery.positive_int, help="override the batch size")
    parser.add_argument("--lr", type=machinery.finite_float, help="override the peak learning rate")
    parser.add_argument("--warmup-epochs", dest="warmup_epochs", type=machinery.finite_float, help="override the warm-up")
    parser.add_argument("--patch-size", dest="patch_size", type=machinery.positive_int, help="override the patch size")
    parser.add_argument("--subset", type=machinery.positive_int, help="first N images of each set (quick checks)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file [benchmarks/results/time_to_accuracy_<recipe>.json]; the plot goes beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated whole numbers such as 0,1,2, got {args.seeds!r}")
    recipe = {**RECIPES[args.recipe], **{k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "warmup_epochs",
                                                                        "patch_size", "subset")
                                          if getattr(args, k) is not None}}
    out = args.out or REPO_DIR / "benchmarks" / "results" / f"time_to_accuracy_{args.recipe}.json"
    if out.exists() and not args.overwrite:
        parser.error(f"{out} already holds results; choose another --out, or replace it with --overwrite")
    try:  # a recipe that cannot work ends in one line, naming the value (e.g. a warm-up longer than the run)
        machinery.check_training_arguments(**{k: recipe[k] for k in ("epochs", "batch_size", "lr", "warmup_epochs", "seed")})
    except ValueError as error:
        parser.error(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = dict(recipe_name=args.recipe, recipe=recipe, compile=args.compile,
                                  threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                                  command="python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:] if argv is None
                                                                                              else argv),
                                  runs=[])
    print(f"recipe {args.recipe}: {recipe} | {report['threads']} threads", flush=True)
    for seed in seeds:
        report["runs"].append(run_seed(recipe, seed, args.compile))
        report["summary"] = summarise(report["runs"])
        machinery.atomic_write_bytes((json.dumps(report, indent=1) + "\n").encode(), out)
    plot(report, out.with_suffix(".png"))
    s = report["summary"]
    print(f"last epoch test accuracy {100 * s['final_test_acc_mean']:.2f}% (mean of {s['seeds']} seeds, "
          f"{100 * s['final_test_acc_min']:.2f}-{100 * s['final_test_acc_max']:.2f}) after "
          f"{s['training_minutes_mean']:.1f} min of training; 99.0% first reached at {s['reached']['0.99']} min, "
          f"99.5% at {s['reached']['0.995']} min | wrote {out} and {out.with_suffix('.png').name}")
    return report


if __name__ == "__main__":
    main()
