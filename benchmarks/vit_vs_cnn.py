"""Our MNIST ViT against a CNN of about the same size: test accuracy against the number of training digits, on MNIST
and on pixel-shuffled MNIST (one fixed permutation of the 784 pixels). The full version of notebook 10's sweep.

Run from the repository root (about 40 minutes on one idle CPU core with the defaults):

    OMP_NUM_THREADS=1 python benchmarks/vit_vs_cnn.py                  # 1k / 5k / 20k / 60k digits, 3 seeds
    python benchmarks/vit_vs_cnn.py --sizes 1000 5000 --seeds 0        # a smaller sweep
    python benchmarks/vit_vs_cnn.py --quick                            # a smoke test (seconds)

Every run trains a fresh model (``hf.vit_from_config("vit_mnist")`` or ``hf.SmallCNN()``) with
``hf.train_classifier``: notebook 07's AdamW and warm-up + cosine schedule, no augmentation, batches of 128. Smaller
training sets get more epochs (``--epochs``: 1k digits 40, 5k 12, 20k 5, 60k 3), so that no run stops long before it
has learnt what it can. Accuracy is measured once, at the end, on all 10,000 test digits (during training ``train``
checks 1,000 of them after each epoch, only to show progress).

It writes ``benchmarks/results/vit_vs_cnn.json`` (every run, appended as it finishes: an interrupted sweep resumes
where it stopped, reusing runs made with the same settings) and ``vit_vs_cnn.png`` (mean and spread over the seeds).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # helper_functions.py lives at the repository's top level
import helper_functions as hf  # noqa: E402
import machinery  # noqa: E402

EPOCHS = {1000: 40, 5000: 12, 20000: 5, 60000: 3}  # fewer epochs for more digits
MODELS = {"ViT": lambda: hf.vit_from_config("vit_mnist"), "CNN": hf.SmallCNN}
VARIANTS = ("MNIST", "shuffled pixels")
PERMUTATION_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = machinery.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=machinery.positive_int, nargs="+", default=list(EPOCHS),
                        help="numbers of training digits")
    parser.add_argument("--epochs", type=machinery.positive_int, nargs="+", default=None,
                        help="epochs for each size, in the same order (default: 40 12 5 3 for 1k 5k 20k 60k)")
    parser.add_argument("--seeds", type=machinery.seed_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO_DIR / "benchmarks" / "results",
                        help="folder for vit_vs_cnn.json and vit_vs_cnn.png (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 500 digits, 1 epoch, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.epochs, args.seeds = [500], [1], [0]
    if args.epochs is None:
        missing = [size for size in args.sizes if size not in EPOCHS]
        if missing:
            parser.error(f"no default number of epochs for --sizes {missing}; give --epochs, one per size")
        args.epochs = [EPOCHS[size] for size in args.sizes]
    if len(args.epochs) != len(args.sizes):
        parser.error(f"--epochs needs one number per size: {len(args.sizes)} sizes, {len(args.epochs)} epochs")
    if max(args.sizes) > 60000:
        parser.error(f"--sizes {max(args.sizes)} is more than MNIST's 60000 training digits")
    return args


def run_key(run: dict[str, Any]) -> tuple:
    return run["model"], run["variant"], run["size"], run["epochs"], run["seed"]


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against training digits: one line per (model, variant), mean over seeds, min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"ViT": "tab:blue", "CNN": "tab:orange"}
    for (model, variant) in sorted({(r["model"], r["variant"]) for r in runs}):
        sizes = sorted({r["size"] for r in runs if (r["model"], r["variant"]) == (model, variant)})
        accs = [[r["test_acc"] for r in runs if (r["model"], r["variant"], r["size"]) == (model, variant, s)]
                for s in sizes]
        means = [sum(a) / len(a) for a in accs]
        ax.plot(sizes, means, marker="o", color=styles[model], ls="-" if variant == "MNIST" else "--",
                label=f"{model}, {variant}")
        ax.fill_between(sizes, [min(a) for a in accs], [max(a) for a in accs], color=styles[model], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("training digits")
    ax.set_ylabel("test accuracy (10,000 digits)")
    ax.set_title("ViT vs CNN of the same size: mean over seeds, band = min to max")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vit_vs_cnn.json"
    report: dict[str, Any] = {"runs": []}
    if path.exists():
        report = json.loads(path.read_text())
        print(f"{path} exists: reusing its {len(report['runs'])} runs, adding the missing ones")
    report.update(command="python benchmarks/vit_vs_cnn.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine={"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
                  recipe="hf.train_classifier defaults: AdamW lr 2e-3, weight decay 0.05, 10% warm-up + cosine, "
                         "batch 128, no augmentation", permutation_seed=PERMUTATION_SEED)
    done = {run_key(run) for run in report["runs"]}
    train_all, test_all = hf.get_tensor_datasets("mnist")
    permutation = hf.pixel_permutation(28 * 28, seed=PERMUTATION_SEED)
    data = {"MNIST": (train_all, test_all),
            "shuffled pixels": (hf.shuffled_dataset(train_all, permutation),
                                hf.shuffled_dataset(test_all, permutation))}
    loss_fn = torch.nn.CrossEntropyLoss()
    for seed in args.seeds:
        for size, epochs in zip(args.sizes, args.epochs):
            for variant in args.variants:
                for model_name in args.models:
                    run = dict(model=model_name, variant=variant, size=size, epochs=epochs, seed=seed)
                    if run_key(run) in done:
                        continue
                    train_data, test_data = data[variant]
                    hf.set_seeds(seed)
                    model = MODELS[model_name]()
                    start = time.perf_counter()
                    hf.train_classifier(model, Subset(train_data, range(size)), Subset(test_data, range(1000)), epochs,
                                        seed=seed)
                    _, test_acc = hf.test_step(model, DataLoader(test_data, batch_size=500), loss_fn)
                    run.update(test_acc=round(test_acc, 4), seconds=round(time.perf_counter() - start, 1),
                               parameters=hf.count_parameters(model))
                    report["runs"].append(run)
                    machinery.atomic_write_bytes(json.dumps(report, indent=1).encode(), path)  # kept after every run
                    print(f"{model_name:<3} {variant:<15} {size:>6} digits {epochs:>3} epochs seed {seed}: "
                          f"test accuracy {test_acc:.4f} ({run['seconds']:.0f} s)", flush=True)
    wanted = {(m, v, s, e, seed) for seed in args.seeds for s, e in zip(args.sizes, args.epochs)
              for v in args.variants for m in args.models}
    runs = [run for run in report["runs"] if run_key(run) in wanted]
    plot(runs, args.out / "vit_vs_cnn.png")
    print(summary(runs))
    print(f"wrote {path} and {args.out / 'vit_vs_cnn.png'}")
    return report


def summary(runs: list[dict[str, Any]]) -> str:
    """A Markdown table: mean (min-max) test accuracy per size, model and variant."""
    columns = sorted({(r["model"], r["variant"]) for r in runs}, key=lambda c: (c[1] != "MNIST", c[0] != "ViT"))
    lines = ["| training digits (epochs) | " + " | ".join(f"{m}, {v}" for m, v in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for size, epochs in sorted({(r["size"], r["epochs"]) for r in runs}):
        cells = []
        for model, variant in columns:
            accs = [r["test_acc"] for r in runs if (r["model"], r["variant"], r["size"]) == (model, variant, size)]
            cells.append(f"{100 * sum(accs) / len(accs):.1f}% ({100 * min(accs):.1f}-{100 * max(accs):.1f})"
                         if accs else "")
        lines.append(f"| {size:,} ({epochs}) | " + " | ".join(cells) + " |")
    seeds = len({r["seed"] for r in runs})
    return "\n".join(lines) + f"\n\n(mean over {seeds} seed{'s' * (seeds > 1)}, min-max in brackets)"


if __name__ == "__main__":
    main()
