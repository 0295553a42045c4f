"""Time to accuracy: a named recipe's MNIST test accuracy after its last epoch, over seeds, and its training minutes.

Run from the repository root:

    python benchmarks/time_to_accuracy.py --recipe notebook07 --seeds 0,1,2     # about 3 minutes a seed on 2 cores
    python benchmarks/time_to_accuracy.py --recipe best --seeds 0,1,2 --compile
    python benchmarks/time_to_accuracy.py --recipe best --seeds 0 --compile --idle-timing --out t.json  # the timing
    python benchmarks/time_to_accuracy.py --merge s0.json s1.json s2.json t.json --out benchmarks/measured/x.json

Each seed trains the recipe with the engine ``train.py`` and notebook 07 use (``hf.TrainingSetup`` and ``hf.train``)
and records, after every epoch, the wall-clock minutes of training so far (the recipe's own validation pass and the
compile time included) and the validation accuracy: the per-epoch curve. The test set is read once, after the last
epoch: ``final_test_acc`` follows the recipe (through ``hf.ShiftAveraged`` when it says ``tta``; then
``final_test_acc_without_tta`` is reported beside it). A recipe without a validation set is tested every epoch
instead (observed only, never used to choose anything). ``reached`` gives the training minutes at which the
per-epoch curve first met 99.0% and 99.5% (None: never).

Times. Accuracies can be measured on one thread beside other work; times cannot. ``--idle-timing`` runs one seed with
2 threads and records the top-level ``minutes_2_idle_cores`` (that run's training time, compile included) and
``matmul_gflops``, the machine's float32 matrix-multiply rate measured in the same run (before and after training),
so that a time can be scaled to another day; the load average at the start is recorded too (it should be near 0).
With ``--compile``, ``compile_cache_empty_at_start`` says whether torch.compile's on-disk cache was empty: a first run
compiles everything in its first epoch, a later one reuses the kernels on disk (an empty ``TORCHINDUCTOR_CACHE_DIR``
times a first run).
Every report also holds, per run, its per-epoch minutes and the matmul rate at its own thread count.
``--merge`` folds reports of one recipe (seeds run in separate processes, and ``--idle-timing`` reports, whose runs
count as seeds too) into one, quoting the time of one of them (``--timing``).

Results go to one JSON file (default ``benchmarks/results/time_to_accuracy_<recipe>.json``, written again after every
seed, so an interrupted benchmark keeps the seeds it finished) and a plot of the curves against minutes beside it.
An existing file is never replaced unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
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

# The recipes the README quotes, train.py's --recipe (hf.RECIPES): notebook 07's, and the best (issue 27: see
# hf.BEST_MNIST_RECIPE).
RECIPES: dict[str, dict[str, Any]] = hf.RECIPES
TARGETS = (0.99, 0.995)
GOAL = dict(mean=0.995, each=0.9945, minutes=30.0)  # issue 27: mean of 3 seeds, every seed, on 2 idle cores


def reached(minutes: list[float], accuracies: list[float], target: float) -> float | None:
    """The first of ``minutes`` at which ``accuracies`` reached ``target`` (None if it never did)."""
    return next((m for m, a in zip(minutes, accuracies) if a >= target), None)


def test_accuracy(setup: hf.TrainingSetup, tta: bool) -> float:
    """The setup's test accuracy, read once (``TrainingSetup.test`` returns a dict, or a (loss, accuracy) pair)."""
    result = setup.test(tta=tta)
    return float(result["test_acc"] if isinstance(result, dict) else result[1])


@torch.inference_mode()
def val_accuracy(setup: hf.TrainingSetup, tta: bool) -> float | None:
    """The trained model's validation accuracy (None without a validation set), through ShiftAveraged if ``tta``."""
    if setup.val_loader is None:
        return None
    model = hf.ShiftAveraged(hf.unwrap(setup.model)) if tta else hf.unwrap(setup.model)
    return float(hf.test_step(model, setup.val_loader, setup.loss_fn, setup.device)[1])


def compile_cache_was_empty() -> bool:
    """Whether torch.compile's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, else torch's default) is empty: a first run
    pays the whole compile in its first epoch; a later one reuses the compiled kernels and pays far less."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # (torch makes the folder if it is missing)
    return not any(Path(cache_dir()).iterdir())


def run_seed(recipe: dict[str, Any], seed: int, compile: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train ``recipe`` with ``seed``; per epoch the training minutes so far and the held-out accuracy; the test set
    once at the end."""
    setup = hf.TrainingSetup(**{**recipe, "seed": seed})
    minutes: list[float] = []
    clock = {"training": 0.0, "since": time.perf_counter()}

    def observe(epoch: int, results: dict[str, list[float]]) -> None:
        clock["training"] += time.perf_counter() - clock["since"]
        minutes.append(round(clock["training"] / 60, 4))
        held_out = "val_acc" if "val_acc" in results else "test_acc"
        print(f"  seed {seed} epoch {epoch}/{recipe['epochs']}: {minutes[-1]:.2f} min, {held_out} "
              f"{results[held_out][-1]:.4f}", flush=True)
        clock["since"] = time.perf_counter()

    results = setup.train(compile=compile, progress=progress, on_epoch_end=observe)
    held_out = "val_acc" if "val_acc" in results else "test_acc"
    curve = [float(a) for a in results[held_out]]
    tta = bool(recipe.get("tta", False))
    run: dict[str, Any] = dict(seed=seed, threads=torch.get_num_threads(), minutes=minutes,
                               epoch_minutes=[round(b - a, 4) for a, b in zip([0.0] + minutes, minutes)],
                               curve=held_out, train_loss=results["train_loss"], training_minutes=minutes[-1])
    run[held_out] = curve
    run["final_test_acc"] = test_accuracy(setup, tta)  # the test set, once, as the recipe says
    if tta:
        run["final_test_acc_without_tta"] = test_accuracy(setup, False)
        run["final_val_acc_tta"] = val_accuracy(setup, True)
    run["final_val_acc"] = curve[-1] if held_out == "val_acc" else None
    run["median_epoch_minutes"] = round(statistics.median(run["epoch_minutes"]), 4)
    run["reached"] = {str(t): reached(minutes, curve, t) for t in TARGETS}
    run["matmul_gflops"] = round(machinery.matmul_gflops(threads=None), 1)  # at this run's thread count, right after it
    print(f"  seed {seed}: final_test_acc {run['final_test_acc']:.4f}"
          + (f" (without TTA {run['final_test_acc_without_tta']:.4f})" if tta else "")
          + f", {minutes[-1]:.2f} min of training", flush=True)
    return run


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, smallest and largest last-epoch test accuracy and training minutes over the seeds."""
    final = [r["final_test_acc"] for r in runs]
    wall = [r["training_minutes"] for r in runs]
    summary = dict(seeds=len(runs), final_test_acc_mean=round(statistics.fmean(final), 5),
                   final_test_acc_min=min(final), final_test_acc_max=max(final),
                   training_minutes_mean=round(statistics.fmean(wall), 2), training_minutes_max=max(wall),
                   # epochs x the median epoch: the run's time without the slow spells another job on the CPU causes
                   median_epoch_estimate_minutes=round(len(runs[0]["minutes"]) * statistics.median(
                       [r["median_epoch_minutes"] for r in runs]), 2),
                   reached={str(t): [r["reached"][str(t)] for r in runs] for t in TARGETS})
    for key in ("final_test_acc_without_tta", "final_val_acc", "final_val_acc_tta"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if len(values) == len(runs):
            summary[key + "_mean"] = round(statistics.fmean(values), 5)
    return summary


def goal(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 27's goal against this report: 3 seeds, their mean and each seed's accuracy, the idle 2-core minutes."""
    s, minutes = report["summary"], report.get("minutes_2_idle_cores")
    return dict(seeds=s["seeds"] >= 3, mean=s["final_test_acc_mean"] >= GOAL["mean"],
                each=s["final_test_acc_min"] >= GOAL["each"],
                minutes=None if minutes is None else minutes <= GOAL["minutes"])


def plot(report: dict[str, Any], path: Path) -> Path:
    """The per-epoch held-out accuracy against training minutes, one line per seed, the final test accuracy as a
    marker at the end, the targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in report["runs"]:
        line, = ax.plot(run["minutes"], [100 * a for a in run[run["curve"]]], marker=".",
                        label=f"seed {run['seed']} ({run['curve'].replace('_acc', '')})")
        ax.plot(run["minutes"][-1], 100 * run["final_test_acc"], marker="*", markersize=12, color=line.get_color())
    for target in TARGETS:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel=f"training minutes ({report['threads']} thread(s))", ylabel="MNIST accuracy (%)",
           title=f"recipe {report['recipe_name']}: test {100 * report['summary']['final_test_acc_mean']:.2f}% "
                 f"(*, mean of {report['summary']['seeds']} seeds)", ylim=(97, 100))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: dict[str, Any], out: Path) -> None:
    report["summary"] = summarise(report["runs"])
    report["goal_met"] = goal(report)
    machinery.atomic_write_bytes((json.dumps(report, indent=1) + "\n").encode(), out)


def merge(paths: list[Path], out: Path, timing: Path | None = None) -> dict[str, Any]:
    """One report from several of the same recipe: the accuracy runs of all, and the timing of one ``--idle-timing``
    report (``timing``, needed when there are several). A timed run counts as a seed too, unless its seed is already
    among the accuracy runs; the timed run is also kept under ``timing_run``."""
    named = [(str(p), json.loads(Path(p).read_text())) for p in paths]
    recipes = {json.dumps(r["recipe"], sort_keys=True) for _, r in named}
    if len(recipes) > 1:
        raise ValueError(f"the reports hold different recipes; merge only reports of one recipe: {sorted(recipes)}")
    timed_paths = [p for p, r in named if r.get("idle_timing")]
    if timing is not None:  # the same file however it is spelled (./a.json, a.json)
        chosen = [p for p in timed_paths if Path(p).resolve() == Path(timing).resolve()]
        if not chosen:
            raise ValueError(f"--timing {timing} is not one of the --idle-timing reports given to --merge: "
                             f"{timed_paths}")
        timed_paths = chosen
    if len(timed_paths) > 1:
        raise ValueError(f"several --idle-timing reports ({', '.join(timed_paths)}); "
                         f"name the one to quote with --timing")
    timed = [dict(named)[timed_paths[0]]] if timed_paths else []
    runs = [run for _, r in named if not r.get("idle_timing") for run in r["runs"]]
    accuracy_seeds = {run["seed"] for run in runs}
    runs += [run for _, r in named if r.get("idle_timing") for run in r["runs"] if run["seed"] not in accuracy_seeds]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice among the runs: {sorted(seeds)}")
    reports = [r for _, r in named]
    merged = {k: v for k, v in reports[0].items() if k not in ("runs", "summary", "goal_met", "command")}
    merged.update(runs=sorted(runs, key=lambda run: run["seed"]), idle_timing=False,
                  merged_from=[str(p) for p in paths], commands=[r["command"] for r in reports],
                  threads=sorted({run["threads"] for run in runs}))
    merged["threads"] = merged["threads"][0] if len(merged["threads"]) == 1 else merged["threads"]
    for key in ("minutes_2_idle_cores", "matmul_gflops", "matmul_gflops_before", "matmul_gflops_after",
                "load_average_at_start", "compile_cache_empty_at_start", "timing_run"):
        merged.pop(key, None)
        if timed and key in timed[0]:
            merged[key] = timed[0][key]
    if timed and "timing_run" not in timed[0]:
        merged["timing_run"] = timed[0]["runs"][0]
    write(merged, out)
    plot(merged, out.with_suffix(".png"))
    return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="notebook07", choices=sorted(RECIPES))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=machinery.positive_int, help="override the recipe's epochs")
    parser.add_argument("--batch-size", dest="batch_size", type=machinery.positive_int, help="override the batch size")
    parser.add_argument("--lr", type=machinery.finite_float, help="override the peak learning rate")
    parser.add_argument("--warmup-epochs", dest="warmup_epochs", type=machinery.finite_float,
                        help="override the warm-up")
    parser.add_argument("--patch-size", dest="patch_size", type=machinery.positive_int, help="override the patch size")
    parser.add_argument("--subset", type=machinery.positive_int, help="first N images of each set (quick checks)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--idle-timing", dest="idle_timing", action="store_true",
                        help="time one seed with 2 threads on an idle machine: minutes_2_idle_cores, matmul_gflops")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="REPORT",
                        help="merge these reports of one recipe into --out (nothing is trained)")
    parser.add_argument("--timing", type=Path, metavar="REPORT",
                        help="with --merge: the --idle-timing report whose time the merged file quotes")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file [benchmarks/results/time_to_accuracy_<recipe>.json]; the plot goes beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    out = args.out or REPO_DIR / "benchmarks" / "results" / f"time_to_accuracy_{args.recipe}.json"
    if args.timing is not None and not args.merge:
        parser.error("--timing names the report whose time a --merge quotes; use it with --merge")
    for written in (out, out.with_suffix(".png")):  # the report and its plot
        if written.exists() and not args.overwrite:
            parser.error(f"{written} already exists; choose another --out, or replace it with --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            merged = merge(args.merge, out, args.timing)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--merge: {error}")
        print(f"merged {len(args.merge)} reports into {out}: {merged['summary']} | goal met: {merged['goal_met']}")
        return merged
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated whole numbers such as 0,1,2, got {args.seeds!r}")
    if args.idle_timing and len(seeds) != 1:
        parser.error(f"--idle-timing times one run: give one seed (e.g. --seeds 0), got {args.seeds!r}")
    recipe = {**RECIPES[args.recipe], **{k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "warmup_epochs",
                                                                        "patch_size", "subset")
                                          if getattr(args, k) is not None}}
    try:  # a recipe that cannot work ends in one line, naming the value (e.g. a warm-up longer than the run)
        checked = ("epochs", "batch_size", "lr", "warmup_epochs", "seed")
        machinery.check_training_arguments(**{k: recipe[k] for k in checked})
    except ValueError as error:
        parser.error(str(error))
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # in the command: it decides what compiling starts from
    command = [f"TORCHINDUCTOR_CACHE_DIR={cache}"] * bool(cache) + ["python benchmarks/time_to_accuracy.py"]
    report: dict[str, Any] = dict(recipe_name=args.recipe, recipe=recipe, compile=args.compile,
                                  idle_timing=args.idle_timing, torch=torch.__version__, machine=platform.machine(),
                                  cpu=machinery.cpu_description(),
                                  command=" ".join(command + (sys.argv[1:] if argv is None else argv)),
                                  runs=[])
    if args.compile:  # a time with compiling included depends on whether the compiled kernels were on disk already
        report["compile_cache_empty_at_start"] = compile_cache_was_empty()
    threads_before = torch.get_num_threads()
    try:
        if args.idle_timing:
            torch.set_num_threads(2)
            report["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
            report["matmul_gflops_before"] = round(machinery.matmul_gflops(threads=None), 1)
            if report["load_average_at_start"][0] > 0.5:
                print(f"warning: load average {report['load_average_at_start'][0]} at the start: the machine is not "
                      f"idle, so minutes_2_idle_cores will be too long", file=sys.stderr)
        report["threads"] = torch.get_num_threads()
        print(f"recipe {args.recipe}: {recipe} | {report['threads']} threads", flush=True)
        for seed in seeds:
            report["runs"].append(run_seed(recipe, seed, args.compile))
            if args.idle_timing:
                report["matmul_gflops_after"] = report["runs"][0]["matmul_gflops"]
                report["matmul_gflops"] = round((report["matmul_gflops_before"] + report["matmul_gflops_after"]) / 2, 1)
                report["minutes_2_idle_cores"] = report["runs"][0]["training_minutes"]
            write(report, out)
        plot(report, out.with_suffix(".png"))
        s = report["summary"]
        print(f"last epoch test accuracy {100 * s['final_test_acc_mean']:.2f}% (mean of {s['seeds']} seeds, "
              f"{100 * s['final_test_acc_min']:.2f}-{100 * s['final_test_acc_max']:.2f}) after "
              f"{s['training_minutes_mean']:.1f} min of training"
              + (f"; minutes_2_idle_cores {report['minutes_2_idle_cores']} at {report['matmul_gflops']} GFLOP/s"
                 if args.idle_timing else "")
              + f" | wrote {out} and {out.with_suffix('.png').name}")
        return report
    finally:  # --idle-timing's 2 threads do not leak into a caller of main()
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
