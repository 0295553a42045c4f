"""Train the from-scratch Vision Transformer on MNIST or Fashion-MNIST from the command line.

    python train.py                                              # notebook 07's recipe (hf.MNIST_RECIPE)
    python train.py --dataset fashion-mnist
    python train.py --overwrite                                  # again, replacing the run saved as vit_mnist
    python train.py --epochs 30 --stop-after 10 --name long       # train 10 of 30 planned epochs, then stop
    python train.py --name long --resume                          # ... and continue from the last saved epoch
    torchrun --nproc_per_node=2 train.py                          # data-parallel: 2 processes (GPUs, or CPU shares)
    python train.py --amp --compile                               # bfloat16 autocast, torch.compile
    python train.py --val-split 0 --name all_60k                   # no validation set: train on all 60,000

torch.compile is on by default for runs of machinery.COMPILE_FROM_STEPS optimizer steps or more (where it pays back its
compile time) and off for shorter ones; --compile / --no-compile decide.

5,000 training images (--val-split) are held out, the same ones in every run (a fixed, seeded permutation): each
epoch is measured on them, and the test set is read once, after the last epoch (the results' test_loss and test_acc).
With --val-split 0 every epoch is measured on the test set instead, as before validation sets existed.

A run writes <out-dir>/<name>.pth (weights, config, optimizer and schedule state), <name>.json and <name>.pkl (the
results) and <name>_loss_curves.png, after every epoch. A name that already holds a run is refused: continue it with
--resume, choose another --name, or replace it with --overwrite. While a run trains, <name>.lock (holding its process
id) stops a second run of the same name. The training itself is helper_functions' engine, the same one notebook 07
uses (``TrainingSetup``, ``train``, ``save_run``): there is no second training loop here.

Every flag is checked before the data is loaded. A setting that cannot work ends the script with one line and exit
code 2; a failure (no data, a damaged checkpoint, a full disk, another run of the same name) with one line and exit
code 1; Ctrl-C with exit code 130 (SIGTERM: 143) and a line saying which epoch the checkpoint holds (continue with
--resume). An interruption waits until the files of a finished epoch are all written.

Under torchrun every process runs this script: each trains on its share of every batch-sized slice of the data
(DistributedDataParallel averages the gradients, so all keep the same weights), metrics are summed across processes,
and only process 0 prints, shows progress and writes files. --batch-size is per process.
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

MODEL = hf.VIT_CONFIGS["vit_mnist"]
IMAGE_SIZE = MODEL["image_size"]  # MNIST and Fashion-MNIST: 28x28
TRAINING_IMAGES = 60_000  # in MNIST's and in Fashion-MNIST's training set (validation set included)
# Defaults of every setting that defines a run: notebook 07's recipe and model. A resumed run takes the saved values.
DEFAULTS = {**{k: v for k, v in hf.MNIST_RECIPE.items() if k != "config"}, "subset": None,
            "patch_size": MODEL["patch_size"], "num_layers": MODEL["num_layers"], "num_heads": MODEL["num_heads"],
            "embedding_dim": MODEL["embedding_dim"], "mlp_size": MODEL["mlp_size"], "dropout": MODEL["dropout"]}


def build_parser() -> machinery.ArgumentParser:
    parser = machinery.ArgumentParser(description="Train the from-scratch ViT on 28x28 digits or clothes.",
                                     epilog="Settings left out take notebook 07's values (shown in brackets), or, "
                                            "with --resume, the saved run's values. Exit codes: 0 done, 1 failed, "
                                            "2 bad settings, 130 interrupted.")
    d = DEFAULTS
    run = parser.add_argument_group("recipe")
    run.add_argument("--dataset", help=f"mnist or fashion-mnist [{d['dataset']}]")
    run.add_argument("--epochs", type=machinery.positive_int, help=f"epochs the schedule is planned for [{d['epochs']}]")
    run.add_argument("--batch-size", dest="batch_size", type=machinery.positive_int, help=f"[{d['batch_size']}]")
    run.add_argument("--lr", type=machinery.finite_float, help=f"peak learning rate of AdamW [{d['lr']}]")
    run.add_argument("--weight-decay", dest="weight_decay", type=machinery.finite_float,
                     help=f"AdamW's weight decay [{d['weight_decay']}]")
    run.add_argument("--warmup-epochs", dest="warmup_epochs", type=machinery.finite_float,
                     help=f"linear warm-up before the cosine decay, in epochs (fractions allowed) "
                          f"[{d['warmup_epochs']}]")
    run.add_argument("--label-smoothing", dest="label_smoothing", type=machinery.finite_float,
                     help=f"[{d['label_smoothing']}]")
    run.add_argument("--augment", action=argparse.BooleanOptionalAction,
                     help="random rotation (+-10 deg), shift (+-2 px) and zoom (+-10%%) of each training image "
                          f"[{d['augment']}]")
    run.add_argument("--seed", type=machinery.seed_int, help=f"0 to 2**32 - 1 [{d['seed']}]")
    run.add_argument("--val-split", dest="val_split", type=machinery.non_negative_int,
                     help="training images held out as a validation set, measured after every epoch; the test set is "
                          f"then read once, at the end (0: none, every epoch is tested) [{d['val_split']}]")
    run.add_argument("--subset", type=machinery.positive_int, help="use only the first N training, N validation and N test "
                                                            "images (quick checks) [all]")
    model = parser.add_argument_group("model (Table 1's columns, scaled down)")
    model.add_argument("--patch-size", dest="patch_size", type=machinery.positive_int,
                       help=f"P, must divide {IMAGE_SIZE} [{d['patch_size']}]")
    model.add_argument("--depth", dest="num_layers", metavar="L", type=machinery.positive_int,
                       help=f"encoder blocks [{d['num_layers']}]")
    model.add_argument("--heads", dest="num_heads", metavar="K", type=machinery.positive_int,
                       help=f"attention heads [{d['num_heads']}]")
    model.add_argument("--embedding-dim", dest="embedding_dim", type=machinery.positive_int,
                       help=f"D, divisible by --heads [{d['embedding_dim']}]")
    model.add_argument("--mlp-size", dest="mlp_size", type=machinery.positive_int, help=f"[{d['mlp_size']}]")
    model.add_argument("--dropout", type=machinery.finite_float, help=f"[{d['dropout']}]")
    out = machinery.add_output_arguments(parser, default_name="vit_<dataset>")
    out.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir/--name from its last "
                                                           "saved epoch (model, optimizer, schedule, random state)")
    out.add_argument("--stop-after", dest="stop_after", type=machinery.positive_int,
                     help="stop after this epoch (the run stays resumable) [--epochs]")
    return parser


def flag(key: str) -> str:
    return {"num_layers": "--depth", "num_heads": "--heads"}.get(key, f"--{key.replace('_', '-')}")


def new_recipe(given: dict) -> dict:
    """A new run's settings: the command line over the defaults."""
    recipe = {**DEFAULTS, **given}
    if "warmup_epochs" not in given and recipe["warmup_epochs"] >= recipe["epochs"]:
        recipe["warmup_epochs"] = recipe["epochs"] / 10  # a run shorter than the default warm-up: warm up 10% of it
    return recipe


def check_recipe(recipe: dict, stop_after: int | None) -> None:
    """Refuse (machinery.UsageError, naming the flag) any setting that cannot work, before any data is loaded."""
    if recipe["dataset"] not in hf.TRAINING_DATASETS:
        raise machinery.UsageError(f"--dataset: unknown dataset {recipe['dataset']!r}; choose one of "
                            f"{', '.join(sorted(hf.TRAINING_DATASETS))}")
    if IMAGE_SIZE % recipe["patch_size"]:
        divisors = [p for p in range(1, IMAGE_SIZE + 1) if IMAGE_SIZE % p == 0]
        raise machinery.UsageError(f"--patch-size {recipe['patch_size']} does not divide the {IMAGE_SIZE}x{IMAGE_SIZE} "
                            f"images; choose one of {divisors}")
    if recipe["embedding_dim"] % recipe["num_heads"]:
        raise machinery.UsageError(f"--embedding-dim {recipe['embedding_dim']} is not divisible by --heads "
                            f"{recipe['num_heads']}; each head gets embedding_dim / heads values")
    for key, ok, rule in (("lr", recipe["lr"] > 0, "> 0"), ("weight_decay", recipe["weight_decay"] >= 0, ">= 0"),
                          ("label_smoothing", 0 <= recipe["label_smoothing"] < 1, "at least 0 and less than 1"),
                          ("dropout", 0 <= recipe["dropout"] < 1, "at least 0 and less than 1")):
        if not ok:
            raise machinery.UsageError(f"{flag(key)} {recipe[key]} must be {rule}")
    if recipe["val_split"] >= TRAINING_IMAGES:
        raise machinery.UsageError(f"--val-split {recipe['val_split']} leaves no training images (there are "
                            f"{TRAINING_IMAGES}); hold out fewer, e.g. 5000, or 0 for no validation set")
    training_images = TRAINING_IMAGES - recipe["val_split"]
    steps = hf.steps_per_epoch(min(recipe["subset"] or training_images, training_images), recipe["batch_size"],
                               machinery.launched_processes())
    machinery.check_warmup(recipe["warmup_epochs"], recipe["epochs"], steps)
    if stop_after is not None and stop_after > recipe["epochs"]:
        raise machinery.UsageError(f"--stop-after {stop_after} is beyond --epochs {recipe['epochs']}")


def saved_run(path: Path, given: dict) -> dict:
    """The checkpoint --resume continues; flags that clash with its saved settings are refused."""
    try:
        checkpoint = hf.load_checkpoint(path)
    except machinery.CheckpointError as error:
        fix = str(error).replace("restore a copy or train again", "restore a copy, or start it again with --overwrite")
        raise machinery.CheckpointError(f"--resume: {fix}", error.reason) from None
    if "train_state" not in checkpoint or "recipe" not in checkpoint:
        raise machinery.UsageError(f"--resume: {path} holds weights but no training state (it was not written by train.py); "
                            f"choose another --name for a new run")
    clashes = [f"{flag(k)} {v} (saved: {checkpoint['recipe'].get(k)})" for k, v in given.items()
               if checkpoint["recipe"].get(k) != v]
    if clashes:
        raise machinery.UsageError(f"--resume continues the saved run with its own settings, but these differ: "
                            f"{', '.join(clashes)}. Leave them out, or start a new run with another --name")
    saved = checkpoint.get("processes", 1)
    if saved != machinery.launched_processes():
        raise machinery.UsageError(f"--resume: {path} was trained by {saved} process(es) and this is "
                            f"{machinery.launched_processes()}; the schedule and the random states are per process, so resume "
                            f"it with " + ("plain python" if saved == 1 else f"torchrun --nproc_per_node={saved}"))
    return checkpoint


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.name if args.name is not None else f"vit_{(args.dataset or DEFAULTS['dataset']).replace('-', '_')}"
    path = args.out_dir / f"{name}.pth"
    given = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}

    with machinery.command_line_errors(parser, interrupted=lambda: machinery.interrupted_run(path, resumable=True)):
        # 1. Check every flag before anything is loaded or written
        machinery.check_run_name(name)
        machinery.device_from_flag(args.device)
        if args.resume and args.overwrite:
            raise machinery.UsageError("--resume continues the saved run and --overwrite replaces it; choose one")
        if args.resume and not path.exists():
            raise machinery.UsageError(f"--resume: no run saved at {path}; check --out-dir and --name, or leave out --resume")
        if not args.resume:
            check_recipe(new_recipe(given), args.stop_after)
        machinery.check_output_folder(args.out_dir)

        # 2. One writer per run name; a new run never replaces a saved one unless asked; --resume takes its settings
        with machinery.run_lock(path), machinery.training_device(args.device) as device:
            checkpoint = saved_run(path, given) if args.resume else None
            if not args.resume:
                machinery.refuse_to_overwrite(path, args.overwrite, resumable=True)
            recipe = checkpoint["recipe"] if checkpoint else new_recipe(given)
            done = checkpoint["epoch"] if checkpoint else 0
            stop = args.stop_after or recipe["epochs"]
            if args.stop_after is not None and args.stop_after > recipe["epochs"]:
                raise machinery.UsageError(f"--stop-after {args.stop_after} is beyond the saved --epochs {recipe['epochs']}")
            if done >= stop:
                raise machinery.UsageError(f"{path} has already trained {done} of {recipe['epochs']} epochs; nothing to do "
                                    f"(a longer run needs another --name)")

            # 3. Data, model, loss, AdamW and the warm-up + cosine schedule: the same setup notebook 07 uses
            # a resumed run holds out the validation images it saved (a run from before validation sets: none)
            setup = hf.TrainingSetup(config="vit_mnist", **recipe, device=device,
                                     val_indices=checkpoint.get("val_indices") if checkpoint else None)
            history: dict[str, list[float]] = {}  # the engine appends each epoch's metrics
            if checkpoint:
                setup.model.load_state_dict(checkpoint["state_dict"])
                setup.load_training_state(checkpoint["train_state"])
                history = checkpoint["history"]
                machinery.print_main(f"Resuming {path} after epoch {done} of {recipe['epochs']}")
            processes = machinery.world_size()
            compile = machinery.use_compile(args.compile, recipe["epochs"] * len(setup.train_loader))
            validation = f"{len(setup.val_data)} validation, " if setup.val_data is not None else ""
            machinery.print_main(f"{recipe['dataset']}: {len(setup.train_data)} training, {validation}{len(setup.test_data)} test "
                      f"images | "
                      f"{hf.count_parameters(setup.model):,} parameters | device {device}"
                      + (f" | {processes} processes ({torch.distributed.get_backend()})" if processes > 1 else "")
                      + (" | bfloat16 autocast" if args.amp else "") + (" | torch.compile" if compile else ""))
            machinery.print_main("recipe:", " ".join(f"{k}={v}" for k, v in recipe.items()))

            # 4. Train with the shared engine, saving everything after every epoch (process 0 writes)
            start = time.perf_counter()

            held_out = "val" if setup.val_loader is not None else "test"
            results: dict = {}

            def save(epoch: int, history: dict[str, list[float]]) -> None:
                so_far = dict(history)
                if held_out == "val" and epoch == recipe["epochs"]:  # the run is finished: read the test set, once
                    so_far.update(setup.test(amp=args.amp))
                train_state = setup.training_state()  # every process takes part: it gathers their random states
                if machinery.is_main_process():
                    hf.save_run(setup.model, so_far, args.out_dir, name=name, dataset=recipe["dataset"],
                                mean=setup.mean, std=setup.std, recipe=recipe, epoch=epoch, train_state=train_state,
                                processes=processes, val_indices=setup.val_indices)
                machinery.print_main(f"epoch {epoch}/{recipe['epochs']}: {held_out}_acc {so_far[f'{held_out}_acc'][-1]:.4f} | "
                          f"{time.perf_counter() - start:.0f} s | saved {path}")
                results.clear()
                results.update(so_far)

            setup.train(stop, history, compile=compile, amp=args.amp,
                        progress=args.progress and machinery.is_main_process(), on_epoch_end=save)
            if processes > 1:
                digest = machinery.check_processes_agree(setup.model)
                machinery.print_main(f"weights identical in all {processes} processes (sha256 {digest[:16]})")
            epochs_done = len(results[f"{held_out}_acc"])
            if held_out == "test":
                summary = f"test accuracy {results['test_acc'][-1]:.4f} after {epochs_done} epochs (no validation set)"
            elif "test_acc" in results:
                summary = (f"validation accuracy {results['val_acc'][-1]:.4f} after {epochs_done} epochs; test "
                           f"accuracy {results['test_acc']:.4f} (the test set, read once, at the end)")
            else:
                summary = (f"validation accuracy {results['val_acc'][-1]:.4f} after {epochs_done} of "
                           f"{recipe['epochs']} epochs (the test set is read when the run finishes)")
            machinery.print_main(f"Done: {summary}; {time.perf_counter() - start:.0f} s of training in this session. Files in "
                      f"{args.out_dir}/: {name}.pth, {name}.json, {name}.pkl, {name}_loss_curves.png")
    return results


if __name__ == "__main__":
    main()
