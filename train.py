"""Train the from-scratch Vision Transformer on MNIST or Fashion-MNIST from the command line.

    python train.py --epochs 8                                   # notebook 07's recipe (hf.MNIST_RECIPE)
    python train.py --dataset fashion-mnist --epochs 8
    python train.py --epochs 30 --stop-after 10                   # train 10 of 30 planned epochs, then stop
    python train.py --resume                                      # ... and continue from the last saved epoch
    torchrun --nproc_per_node=2 train.py --epochs 8               # data-parallel: 2 processes (GPUs, or CPU shares)
    python train.py --epochs 8 --amp --compile                    # bfloat16 autocast, torch.compile

A run writes <out-dir>/<name>.pth (weights, config, optimizer and schedule state), <name>.json and <name>.pkl (the
results) and <name>_loss_curves.png, after every epoch. The training itself is helper_functions' engine, the same
one notebook 07 uses (``TrainingSetup``, ``train``, ``save_run``): there is no second training loop here.

Under torchrun every process runs this script: each trains on its share of every batch-sized slice of the data
(DistributedDataParallel averages the gradients, so all keep the same weights), metrics are summed across processes,
and only process 0 prints, shows progress and writes files. --batch-size is per process.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import helper_functions as hf

IMAGE_SIZE = 28  # MNIST and Fashion-MNIST
MODEL = hf.VIT_CONFIGS["vit_mnist"]
# Defaults of every setting that defines a run: notebook 07's recipe and model. A resumed run takes the saved values.
DEFAULTS = {**{k: v for k, v in hf.MNIST_RECIPE.items() if k != "config"}, "subset": None,
            "patch_size": MODEL["patch_size"], "num_layers": MODEL["num_layers"], "num_heads": MODEL["num_heads"],
            "embedding_dim": MODEL["embedding_dim"], "mlp_size": MODEL["mlp_size"], "dropout": MODEL["dropout"]}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the from-scratch ViT on 28x28 digits or clothes.",
                                     epilog="Settings left out take notebook 07's values (shown in brackets), or, "
                                            "with --resume, the saved run's values.")
    d = DEFAULTS
    run = parser.add_argument_group("recipe")
    run.add_argument("--dataset", help=f"mnist or fashion-mnist [{d['dataset']}]")
    run.add_argument("--epochs", type=positive_int, help=f"epochs the schedule is planned for [{d['epochs']}]")
    run.add_argument("--batch-size", dest="batch_size", type=positive_int, help=f"[{d['batch_size']}]")
    run.add_argument("--lr", type=float, help=f"peak learning rate of AdamW [{d['lr']}]")
    run.add_argument("--weight-decay", dest="weight_decay", type=float,
                     help=f"AdamW's weight decay [{d['weight_decay']}]")
    run.add_argument("--warmup-epochs", dest="warmup_epochs", type=float,
                     help=f"linear warm-up before the cosine decay, in epochs (fractions allowed) "
                          f"[{d['warmup_epochs']}]")
    run.add_argument("--label-smoothing", dest="label_smoothing", type=float, help=f"[{d['label_smoothing']}]")
    run.add_argument("--augment", action=argparse.BooleanOptionalAction,
                     help="random rotation (+-10 deg), shift (+-2 px) and zoom (+-10%%) of each training image "
                          f"[{d['augment']}]")
    run.add_argument("--seed", type=int, help=f"[{d['seed']}]")
    run.add_argument("--subset", type=positive_int, help="use only the first N training and N test images (quick "
                                                         "checks) [all]")
    model = parser.add_argument_group("model (Table 1's columns, scaled down)")
    model.add_argument("--patch-size", dest="patch_size", type=positive_int,
                       help=f"P, must divide {IMAGE_SIZE} [{d['patch_size']}]")
    model.add_argument("--depth", dest="num_layers", metavar="L", type=positive_int,
                       help=f"encoder blocks [{d['num_layers']}]")
    model.add_argument("--heads", dest="num_heads", metavar="K", type=positive_int,
                       help=f"attention heads [{d['num_heads']}]")
    model.add_argument("--embedding-dim", dest="embedding_dim", type=positive_int,
                       help=f"D, divisible by --heads [{d['embedding_dim']}]")
    model.add_argument("--mlp-size", dest="mlp_size", type=positive_int, help=f"[{d['mlp_size']}]")
    model.add_argument("--dropout", type=float, help=f"[{d['dropout']}]")
    out = add_output_arguments(parser, default_name="vit_<dataset>")
    out.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir/--name from its last "
                                                           "saved epoch (model, optimizer, schedule, random state)")
    out.add_argument("--stop-after", dest="stop_after", type=positive_int,
                     help="stop after this epoch (the run stays resumable) [--epochs]")
    return parser


def add_output_arguments(parser: argparse.ArgumentParser, default_name: str) -> argparse._ArgumentGroup:
    """--out-dir, --name, --device, --amp, --compile and --no-progress: where a run's files go and what it runs on
    (shared with train_transferlearning.py)."""
    out = parser.add_argument_group("output and hardware")
    out.add_argument("--out-dir", dest="out_dir", type=Path, default=Path("runs"), help="[runs]")
    out.add_argument("--name", help=f"file names in --out-dir [{default_name}]")
    out.add_argument("--device", default="auto", help="cpu, cuda, mps or auto; under torchrun each process takes "
                                                      "its own GPU [auto]")
    out.add_argument("--amp", action="store_true", help="mixed precision: bfloat16 autocast (fast on recent GPUs; "
                                                        "slower on CPUs without bfloat16 instructions)")
    out.add_argument("--compile", action="store_true", help="torch.compile the model (a minute of compiling first; "
                                                            "needs a C++ compiler on a CPU)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return out


def resolve_device(name: str) -> torch.device:
    """``--device auto`` -> the best available (hf.get_device), otherwise the named device; under torchrun, also join
    the process group (gloo on CPUs, nccl on GPUs, each process on its own GPU)."""
    return hf.init_distributed(hf.get_device() if name == "auto" else torch.device(name))


def say(*args: object) -> None:
    """print, in process 0 only (under torchrun every process runs this script)."""
    if hf.is_main_process():
        print(*args, flush=True)


def resolve_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser, saved: dict | None) -> dict:
    """The run's settings: command line over defaults, or, resuming, the saved ones (a clashing flag is an error)."""
    given = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}
    if saved is None:
        recipe = {**DEFAULTS, **given}
        if "warmup_epochs" not in given and recipe["warmup_epochs"] >= recipe["epochs"]:
            recipe["warmup_epochs"] = recipe["epochs"] / 10  # a run shorter than the default warm-up: warm up 10% of it
    else:
        clashes = [f"--{k.replace('_', '-')} {v} (saved: {saved[k]})" for k, v in given.items() if saved.get(k) != v]
        if clashes:
            parser.error(f"--resume continues the saved run with its own settings, but these differ: "
                         f"{', '.join(clashes)}. Leave them out, or start a new run with another --name")
        recipe = dict(saved)
    if recipe["dataset"] not in hf.TRAINING_DATASETS:
        parser.error(f"unknown dataset {recipe['dataset']!r}; choose one of {', '.join(sorted(hf.TRAINING_DATASETS))}")
    if IMAGE_SIZE % recipe["patch_size"]:
        divisors = [p for p in range(1, IMAGE_SIZE + 1) if IMAGE_SIZE % p == 0]
        parser.error(f"--patch-size {recipe['patch_size']} does not divide the {IMAGE_SIZE}x{IMAGE_SIZE} images; "
                     f"choose one of {divisors}")
    if recipe["embedding_dim"] % recipe["num_heads"]:
        parser.error(f"--embedding-dim {recipe['embedding_dim']} is not divisible by --heads {recipe['num_heads']}; "
                     f"each head gets embedding_dim / heads values")
    if not recipe["lr"] > 0 or recipe["weight_decay"] < 0 or not 0 <= recipe["label_smoothing"] < 1:
        parser.error("need --lr > 0, --weight-decay >= 0 and 0 <= --label-smoothing < 1")
    if not 0 <= recipe["warmup_epochs"] < recipe["epochs"] or not 0 <= recipe["dropout"] < 1:
        parser.error(f"need 0 <= --warmup-epochs < --epochs ({recipe['epochs']}) and 0 <= --dropout < 1")
    if args.stop_after is not None and args.stop_after > recipe["epochs"]:
        parser.error(f"--stop-after {args.stop_after} is beyond --epochs {recipe['epochs']}")
    return recipe


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.name or f"vit_{(args.dataset or DEFAULTS['dataset']).replace('-', '_')}"
    path = args.out_dir / f"{name}.pth"

    # 1. The run's settings, and its saved state if we resume
    checkpoint = None
    if args.resume:
        if not path.exists():
            parser.error(f"--resume: no run saved at {path}; check --out-dir and --name, or leave out --resume")
        checkpoint = hf.load_checkpoint(path)
        if "train_state" not in checkpoint:
            parser.error(f"--resume: {path} holds weights but no training state (it was not written by train.py)")
    recipe = resolve_recipe(args, parser, checkpoint and checkpoint["recipe"])
    done = checkpoint["epoch"] if checkpoint else 0
    stop = args.stop_after or recipe["epochs"]
    if done >= stop:
        parser.error(f"{path} has already trained {done} of {recipe['epochs']} epochs; nothing to do")

    # 2. Data, model, loss, AdamW and the warm-up + cosine schedule: the same setup notebook 07 uses
    device = resolve_device(args.device)
    processes = hf.process_rank()[1]
    if checkpoint and checkpoint.get("processes", 1) != processes:
        saved = checkpoint.get("processes", 1)
        parser.error(f"--resume: {path} was trained by {saved} process(es) and this is {processes}; the schedule and "
                     f"the random states are per process, so resume it with "
                     + ("plain python" if saved == 1 else f"torchrun --nproc_per_node={saved}"))
    try:
        return _train(args, recipe, checkpoint, path, name, done, stop, device)
    finally:
        hf.cleanup_distributed()


def _train(args: argparse.Namespace, recipe: dict, checkpoint: dict | None, path: Path, name: str, done: int,
           stop: int, device: torch.device) -> dict[str, list[float]]:
    setup = hf.TrainingSetup(config="vit_mnist", **recipe)
    setup.model.to(device)
    results = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    if checkpoint:
        setup.model.load_state_dict(checkpoint["state_dict"])
        setup.load_training_state(checkpoint["train_state"])
        results = checkpoint["history"]
        say(f"Resuming {path} after epoch {done} of {recipe['epochs']}")
    processes = hf.process_rank()[1]
    say(f"{recipe['dataset']}: {len(setup.train_data)} training, {len(setup.test_data)} test images | "
        f"{sum(p.numel() for p in setup.model.parameters()):,} parameters | device {device}"
        + (f" | {processes} processes ({torch.distributed.get_backend()})" if processes > 1 else "")
        + (" | bfloat16 autocast" if args.amp else "") + (" | torch.compile" if args.compile else ""))
    say("recipe:", " ".join(f"{k}={v}" for k, v in recipe.items()))

    # 3. Train with the shared engine, saving everything after every epoch (process 0 writes)
    start = time.perf_counter()

    def save(epoch: int, new_results: dict[str, list[float]]) -> None:
        so_far = {k: results[k] + new_results[k] for k in results}
        train_state = setup.training_state()  # every process takes part: it gathers their random states
        if hf.is_main_process():
            hf.save_run(setup.model, so_far, args.out_dir, name=name, dataset=recipe["dataset"], mean=setup.mean,
                        std=setup.std, recipe=recipe, epoch=epoch, history=so_far, train_state=train_state,
                        processes=processes)
        say(f"epoch {epoch}/{recipe['epochs']}: test_acc {so_far['test_acc'][-1]:.4f} | "
            f"{time.perf_counter() - start:.0f} s | saved {path}")

    new = setup.train(stop - done, device, compile=args.compile, amp=args.amp,
                      progress=args.progress and hf.is_main_process(), start_epoch=done, on_epoch_end=save)
    results = {k: results[k] + new[k] for k in results}
    if processes > 1:
        digest = hf.check_processes_agree(setup.model)
        say(f"weights identical in all {processes} processes (sha256 {digest[:16]})")
    say(f"Done: test accuracy {results['test_acc'][-1]:.4f} after {len(results['test_acc'])} epochs; "
        f"{time.perf_counter() - start:.0f} s of training in this session. Files in {args.out_dir}/: "
        f"{name}.pth, {name}.json, {name}.pkl, {name}_loss_curves.png")
    return results


if __name__ == "__main__":
    main()
