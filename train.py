"""Train the from-scratch ViT on MNIST or Fashion-MNIST from the command line: notebook 07's run, with its engine.

    python train.py                                          # notebook 07's recipe (hf.MNIST_RECIPE)
    python train.py --recipe best --epochs 3 --name short    # the best recipe (hf.RECIPES), flags override it
    python train.py --epochs 30 --stop-after 10 --name long  # train 10 of 30 planned epochs, then stop ...
    python train.py --name long --resume                     # ... and continue from the last saved epoch
    torchrun --nproc_per_node=2 train.py                     # data-parallel: 2 processes (GPUs, or CPU shares)

Every epoch is measured on the validation set (--val-split), the test set once, after the last. The run is saved after
every epoch (<out-dir>/<name>.pth, .json, .pkl, _loss_curves.png) and never replaces a saved run without --overwrite.
Errors take one line: exit code 2 for a setting that cannot work, 1 for a failure, 130 for Ctrl-C, 143 for SIGTERM.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import torch

    import helper_functions as hf
    import machinery
except KeyboardInterrupt:  # Ctrl-C while PyTorch loads: one line, not an import traceback
    print(f"{Path(sys.argv[0]).name}: interrupted while starting; nothing was written", file=sys.stderr)
    raise SystemExit(130) from None

MODEL = hf.VIT_CONFIGS["vit_mnist"]  # the model every recipe trains; its sizes are settings too
DEFAULTS = {**{k: v for k, v in hf.MNIST_RECIPE.items() if k != "config"}, "subset": None,
            **{k: MODEL[k] for k in ("patch_size", "num_layers", "num_heads", "embedding_dim", "mlp_size", "dropout")}}
TRAINING_IMAGES, IMAGE_SIZE = 60_000, MODEL["image_size"]  # MNIST's and Fashion-MNIST's, validation set included
whole, number = machinery.positive_int, machinery.finite_float
FLAGS = {  # setting: (flag, type, help); the default in brackets is notebook 07's
    "dataset": ("--dataset", str, "mnist or fashion-mnist"),
    "epochs": ("--epochs", whole, "epochs the schedule is planned for"),
    "batch_size": ("--batch-size", whole, "per process"), "lr": ("--lr", number, "peak learning rate of AdamW"),
    "weight_decay": ("--weight-decay", number, "AdamW's"),
    "warmup_epochs": ("--warmup-epochs", number, "linear warm-up before the cosine decay, or a tenth of a shorter run"),
    "augment": ("--augment", argparse.BooleanOptionalAction, "random rotation, shift and zoom of each training image"),
    "label_smoothing": ("--label-smoothing", number, ""), "seed": ("--seed", machinery.seed_int, "0 to 2**32 - 1"),
    "val_split": ("--val-split", machinery.non_negative_int, "training images held out, tested every epoch (0: none)"),
    "subset": ("--subset", whole, "only the first N training, validation and test images (quick checks)"),
    "patch_size": ("--patch-size", whole, f"P, divides {IMAGE_SIZE}"), "num_layers": ("--depth", whole, "L, layers"),
    "num_heads": ("--heads", whole, "k, heads"), "embedding_dim": ("--embedding-dim", whole, "D, a multiple of k"),
    "mlp_size": ("--mlp-size", whole, ""), "dropout": ("--dropout", number, "")}


def build_parser() -> machinery.ArgumentParser:
    parser = machinery.ArgumentParser(description="Train the from-scratch ViT on 28x28 digits or clothes.",
                                      epilog="Settings left out take the recipe's values, or the saved run's.")
    parser.add_argument("--recipe", choices=sorted(hf.RECIPES), help="a named recipe (hf.RECIPES) [notebook07]")
    for key, (flag, kind, text) in FLAGS.items():
        kind = {"type": kind} if kind is not argparse.BooleanOptionalAction else {"action": kind}
        parser.add_argument(flag, dest=key, **kind, help=f"{text} [{DEFAULTS[key]}]".lstrip())
    out = machinery.add_output_arguments(parser, default_name="vit_<dataset>")
    out.add_argument("--resume", action="store_true", help="continue the run saved under --name")
    out.add_argument("--stop-after", dest="stop_after", type=whole, help="stop after this epoch (resumable) [--epochs]")
    return parser


def given(args: argparse.Namespace) -> dict:
    """The settings given on the command line: a named recipe's, then the flags'."""
    named = {k: v for k, v in hf.RECIPES[args.recipe].items() if k != "config"} if args.recipe else {}
    return {**named, **{k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}}


def new_recipe(args: argparse.Namespace) -> dict:
    """A new run's settings: those given, over notebook 07's recipe and model."""
    recipe = {**DEFAULTS, **given(args)}
    if args.warmup_epochs is None and recipe["warmup_epochs"] >= recipe["epochs"]:
        recipe["warmup_epochs"] = recipe["epochs"] / 10  # a run shorter than the warm-up warms up for a tenth of it
    return recipe


def check_flags(args: argparse.Namespace, path: Path) -> None:
    """Refuse, naming the flag, any setting of a new run that cannot work, before anything is loaded (a resumed run's
    are checked against its checkpoint)."""
    if args.resume:
        return
    recipe = new_recipe(args)
    if recipe["dataset"] not in hf.TRAINING_DATASETS:
        raise machinery.UsageError(f"--dataset: unknown dataset {recipe['dataset']!r}; choose one of "
                                   f"{', '.join(sorted(hf.TRAINING_DATASETS))}")
    if IMAGE_SIZE % recipe["patch_size"]:
        raise machinery.UsageError(f"--patch-size {recipe['patch_size']} does not divide the {IMAGE_SIZE}x{IMAGE_SIZE} "
                                   f"images; choose one of {[p for p in range(1, 29) if IMAGE_SIZE % p == 0]}")
    if recipe["embedding_dim"] % recipe["num_heads"]:
        raise machinery.UsageError(f"--embedding-dim {recipe['embedding_dim']} is not divisible by --heads "
                                   f"{recipe['num_heads']}; each head gets embedding_dim / heads values")
    for key, ok, rule in (("lr", recipe["lr"] > 0, "> 0"), ("weight_decay", recipe["weight_decay"] >= 0, ">= 0"),
                          ("label_smoothing", 0 <= recipe["label_smoothing"] < 1, "at least 0 and less than 1"),
                          ("dropout", 0 <= recipe["dropout"] < 1, "at least 0 and less than 1")):
        if not ok:
            raise machinery.UsageError(f"{FLAGS[key][0]} {recipe[key]} must be {rule}")
    if recipe["val_split"] >= TRAINING_IMAGES:
        raise machinery.UsageError(f"--val-split {recipe['val_split']} leaves no training images (there are "
                                   f"{TRAINING_IMAGES}); hold out fewer, e.g. 5000, or 0 for no validation set")
    images = min(recipe["subset"] or TRAINING_IMAGES, TRAINING_IMAGES - recipe["val_split"])
    steps = machinery.steps_per_epoch(images, recipe["batch_size"], machinery.launched_processes())
    machinery.check_warmup(recipe["warmup_epochs"], recipe["epochs"], steps)
    machinery.check_stop_after(args.stop_after, recipe["epochs"], 0, path)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.name or f"vit_{(args.dataset or DEFAULTS['dataset']).replace('-', '_')}"
    path = args.out_dir / f"{name}.pth"
    say = machinery.print_main  # under torchrun, process 0 prints
    with machinery.script_run(parser, args.out_dir, name, args.device, args.overwrite, args.resume,
                              check=lambda: check_flags(args, path)) as device:
        # 1. The recipe, or a resumed run's own; then data, model, loss, AdamW and schedule: notebook 07's setup
        checkpoint = machinery.checkpoint_to_resume(path, given(args), lambda key: FLAGS[key][0],
                                                    args.stop_after) if args.resume else {}
        recipe, done = (checkpoint["recipe"], checkpoint["epoch"]) if checkpoint else (new_recipe(args), 0)
        setup = hf.TrainingSetup(config="vit_mnist", **recipe, device=device, val_indices=checkpoint.get("val_indices"))
        results = checkpoint.get("history", {})
        if checkpoint:  # resumed where the run stopped: its weights, optimizer, schedule and random states
            setup.model.load_state_dict(checkpoint["state_dict"])
            setup.load_training_state(checkpoint["train_state"])
        compile = machinery.use_compile(args.compile, recipe["epochs"] * len(setup.train_loader))
        held_out, processes = "val" if setup.val_loader is not None else "test", machinery.world_size()
        say(f"{recipe['dataset']}: {len(setup.train_data)} training, {len(setup.val_data or [])} validation, "
            f"{len(setup.test_data)} test images | {hf.count_parameters(setup.model):,} parameters | device {device}"
            + (f" | {processes} processes ({torch.distributed.get_backend()})" if processes > 1 else "")
            + " | bfloat16 autocast" * args.amp + " | torch.compile" * compile)
        say(f"recipe{f' (resuming {path} after epoch {done})' * bool(done)}:",
            " ".join(f"{k}={v}" for k, v in recipe.items()))

        # 2. The loop: an epoch of the shared engine, then the whole run saved; the test set after the last epoch
        start = time.perf_counter()
        for epoch in range(done + 1, (args.stop_after or recipe["epochs"]) + 1):
            results = setup.train(epoch, results, compile=compile, amp=args.amp,
                                  progress=args.progress and machinery.is_main_process())
            if epoch == recipe["epochs"]:
                results = setup.add_final_test(results, amp=args.amp)
            train_state = setup.training_state()  # every process takes part: it gathers their random states
            if machinery.is_main_process():
                hf.save_run(setup.model, results, args.out_dir, name=name, dataset=recipe["dataset"], mean=setup.mean,
                            std=setup.std, recipe=recipe, epoch=epoch, train_state=train_state, processes=processes,
                            val_indices=setup.val_indices)
            say(f"epoch {epoch}/{recipe['epochs']}: {held_out}_acc {results[f'{held_out}_acc'][-1]:.4f} | "
                f"{time.perf_counter() - start:.0f} s | saved {path}")

        # 3. The summary
        if processes > 1:  # DistributedDataParallel's promise, checked
            digest = machinery.check_processes_agree(setup.model)
            say(f"weights identical in all {processes} processes (sha256 {digest[:16]})")
        finished = f"test accuracy {results['final_test_acc']:.4f} (the test set, read once, at the end)" if \
            "final_test_acc" in results else "the test set is read when the run finishes"
        say(f"Done: {'validation' if held_out == 'val' else 'test'} accuracy {results[f'{held_out}_acc'][-1]:.4f} "
            f"after {epoch} of {recipe['epochs']} epochs; {finished}. {time.perf_counter() - start:.0f} s of training "
            f"in this session; files in {args.out_dir}/: {name}.pth, {name}.json, {name}.pkl, {name}_loss_curves.png")
    return results


if __name__ == "__main__":
    main()
