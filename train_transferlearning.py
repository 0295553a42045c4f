"""Transfer learning from the command line: a pretrained ViT, a new head, and only a few labelled MNIST digits.

    python train_transferlearning.py                               # notebook 09: the Fashion-MNIST ViT, fine-tuned
    python train_transferlearning.py --freeze                      # linear probe: only the new head learns
    python train_transferlearning.py --scratch                     # the baseline: the same labels, no pretraining
    python train_transferlearning.py --pretrained runs/vit_fashion_mnist.pth   # any checkpoint train.py wrote
    python train_transferlearning.py --imagenet --freeze --epochs 2 --subset 1000  # ViT-B/16, ImageNet weights
    python train_transferlearning.py --weights vit_b_16-c867db91.pth --freeze     # ... from a file you downloaded

Like train.py, it runs unchanged under ``torchrun --nproc_per_node=N`` (data-parallel; process 0 prints and writes).

The labelled digits are drawn from MNIST's training images minus a validation set of 5,000 (--val-split, the same
held-out digits as train.py's); every epoch is measured on it, so learning rates and epochs are chosen without the
test set, which is read once, at the end (the results' test_loss and test_acc). --val-split 0: every epoch is tested.

Without --pretrained, the Fashion-MNIST ViT of notebook 09 is loaded from runs/ (or trained there first, a few
minutes on a CPU). A run writes the same files as train.py: <out-dir>/<name>.pth (weights, config, dataset,
normalisation, recipe), <name>.json and <name>.pkl (results) and <name>_loss_curves.png. Training is
helper_functions' engine (``hf.fine_tune`` calls ``hf.train``): there is no second training loop here.

As in train.py, every flag and the output folder are checked before any data is loaded (the files are written at the
end, so an unwritable folder must not cost the run), a name that holds a run is never replaced without --overwrite,
and a user error or an expected failure ends in one line: exit code 2 (bad settings), 1 (failed) or 130 (interrupted).
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

MODES = ("finetune", "probe", "scratch")  # the learning rate of each: hf.TRANSFER_RECIPE["lr"]


def build_parser() -> machinery.ArgumentParser:
    parser = machinery.ArgumentParser(description="Fine-tune a pretrained ViT on a few labelled MNIST digits.",
                                     epilog="Settings left out take notebook 09's values (in brackets). Exit codes: "
                                            "0 done, 1 failed, 2 bad settings, 130 interrupted.")
    source = parser.add_argument_group("where the backbone comes from (choose one)").add_mutually_exclusive_group()
    source.add_argument("--pretrained", type=Path, metavar="PATH",
                        help="a checkpoint written by train.py or hf.save_run (28x28 greyscale ViT) "
                             f"[{hf.RUNS_DIR.name}/vit_fashion_mnist_pretrained.pth, trained first if missing]")
    source.add_argument("--imagenet", action="store_true",
                        help=f"torchvision's {hf.IMAGENET_WEIGHTS} in our ViT-B/16 (downloaded, or from "
                             "torchvision's cache); digits resized to 224x224 RGB")
    source.add_argument("--weights", type=Path, metavar="PATH",
                        help="like --imagenet, from a torchvision ViT-B/16 state dict file you downloaded")
    source.add_argument("--scratch", action="store_true", help="no pretraining: a fresh ViT (the baseline)")
    d = hf.TRANSFER_RECIPE  # notebook 09's settings
    run = parser.add_argument_group("recipe")
    run.add_argument("--freeze", action="store_true",
                     help="linear probe: freeze the backbone, train only the new head [full fine-tuning]")
    run.add_argument("--epochs", type=machinery.positive_int, default=d["epochs"], help=f"[{d['epochs']}]")
    run.add_argument("--num-labels", dest="num_labels", type=machinery.positive_int, default=d["num_labels"],
                     help=f"labelled training digits, the same number per class (a multiple of 10) [{d['num_labels']}]")
    rates = ", ".join(f"{mode} {d['lr'][mode]}" for mode in MODES)
    run.add_argument("--lr", type=machinery.finite_float, help=f"peak learning rate of AdamW [{rates}]")
    run.add_argument("--batch-size", dest="batch_size", type=machinery.positive_int, default=d["batch_size"],
                     help=f"[{d['batch_size']}]")
    run.add_argument("--weight-decay", dest="weight_decay", type=machinery.finite_float, default=d["weight_decay"],
                     help=f"[{d['weight_decay']}]")
    run.add_argument("--warmup-epochs", dest="warmup_epochs", type=machinery.finite_float,
                     help=f"[{d['warmup_epochs']}, or a tenth of a shorter run]")
    run.add_argument("--seed", type=machinery.seed_int, default=d["seed"], help=f"[{d['seed']}]")
    run.add_argument("--val-split", dest="val_split", type=machinery.non_negative_int, default=d["val_split"],
                     help="training digits held out (the labelled ones are drawn from the rest) and measured after "
                          "every epoch; the test set is then read once, at the end (0: none, every epoch is tested) "
                          f"[{d['val_split']}]")
    run.add_argument("--subset", type=machinery.positive_int,
                     help="validate and test on only the first N validation and N test digits (quick checks; "
                          "ViT-B/16 on a CPU) [all]")
    machinery.add_output_arguments(parser, default_name="vit_mnist_<num-labels>_labels_<mode>")
    return parser


def split_data(train_images: torch.utils.data.Dataset, test_images: torch.utils.data.Dataset, num_labels: int,
               seed: int, val_split: int, subset: int | None) -> tuple[torch.utils.data.Dataset | None, ...]:
    """(labelled digits drawn from the training part, validation set or None, test set), the last two cut to
    ``subset``."""
    train_part, val_data = hf.validation_split(train_images, val_split)
    if subset:
        test_images = torch.utils.data.Subset(test_images, range(min(subset, len(test_images))))
        if val_data is not None:
            val_data = torch.utils.data.Subset(val_data, range(min(subset, len(val_data))))
    return hf.balanced_subset(train_part, num_labels, seed=seed), val_data, test_images


def imagenet_data(num_labels: int, seed: int, val_split: int,
                  subset: int | None) -> tuple[torch.utils.data.Dataset | None, ...]:
    """MNIST as ViT-B/16's ImageNet input: each digit resized to 224x224 and copied to 3 channels, per image."""
    train_images, test_images = hf.get_mnist(transform=hf.imagenet_transform())
    return split_data(train_images, test_images, num_labels, seed, val_split, subset)


def mnist_data(num_labels: int, seed: int, val_split: int,
               subset: int | None) -> tuple[torch.utils.data.Dataset | None, ...]:
    """MNIST as our 28x28 ViT reads it: normalised tensors, computed once (hf.tensor_dataset)."""
    train_images, test_images = hf.get_mnist()
    return split_data(hf.tensor_dataset(train_images, hf.MNIST_MEAN, hf.MNIST_STD),
                      hf.tensor_dataset(test_images, hf.MNIST_MEAN, hf.MNIST_STD), num_labels, seed, val_split, subset)


MNIST_TRAINING_IMAGES_PER_DIGIT = 5421  # the fewest of any digit in MNIST's training set (the 5s)
MNIST_TRAINING_IMAGES = 60_000


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse (machinery.UsageError, naming the flag) any setting that cannot work, before any data is loaded."""
    if args.warmup_epochs is None:  # a run shorter than the default warm-up warms up for a tenth of it
        warmup = hf.TRANSFER_RECIPE["warmup_epochs"]
        args.warmup_epochs = warmup if warmup < args.epochs else args.epochs / 10
    if args.num_labels % 10 or args.num_labels > 10 * MNIST_TRAINING_IMAGES_PER_DIGIT:
        raise machinery.UsageError(f"--num-labels {args.num_labels} must be a multiple of 10 (every digit gets the same "
                            f"number) and at most {10 * MNIST_TRAINING_IMAGES_PER_DIGIT} (MNIST has "
                            f"{MNIST_TRAINING_IMAGES_PER_DIGIT} 5s)")
    if not args.val_split < MNIST_TRAINING_IMAGES:
        raise machinery.UsageError(f"--val-split {args.val_split} leaves no training digits (MNIST has "
                            f"{MNIST_TRAINING_IMAGES}); hold out fewer, e.g. 5000, or 0 for no validation set")
    if args.lr is not None and not args.lr > 0:
        raise machinery.UsageError(f"--lr {args.lr} must be > 0")
    if args.weight_decay < 0:
        raise machinery.UsageError(f"--weight-decay {args.weight_decay} must be >= 0")
    steps = hf.steps_per_epoch(args.num_labels, args.batch_size, machinery.launched_processes())
    machinery.check_warmup(args.warmup_epochs, args.epochs, steps)
    if args.scratch and args.freeze:
        raise machinery.UsageError("--freeze with --scratch would train a head on random features; leave one of them out")
    for option, path in (("--pretrained", args.pretrained), ("--weights", args.weights)):
        if path is not None and not path.exists():
            hint = ("train one (python train.py --dataset fashion-mnist --epochs 3) or leave out --pretrained to use "
                    "notebook 09's" if option == "--pretrained" else "download it first (see --imagenet's help) or "
                    "check the path")
            raise machinery.UsageError(f"{option}: no file at {path}; {hint}")
        if path is not None and path.is_dir():
            raise machinery.UsageError(f"{option}: {path} is a folder; pass the .pth file inside it")


def imagenet_backbone(weights: Path | None, freeze: bool) -> torch.nn.Module:
    """ViT-B/16 with torchvision's ImageNet weights (downloaded, cached, or --weights), a new head, frozen or not."""
    try:
        with machinery.main_process_first():  # under torchrun, one process downloads the weights
            return hf.imagenet_vit(weights, num_classes=10, freeze=freeze)
    except machinery.CheckpointError as error:  # damaged, or pickled objects: a failure of the file, not of the flags
        raise machinery.CheckpointError(f"--weights {weights}: {error}", error.reason) from None
    except (ValueError, KeyError) as error:  # not ViT-B/16's weights: the message names the differing keys
        if weights is None:
            raise
        try:
            ours = hf.load_checkpoint(weights, verify=False)
        except (machinery.CheckpointError, OSError):
            ours = None
        if ours is not None:
            raise machinery.UsageError(f"--weights {weights} is one of this repository's checkpoints (written by train.py or "
                                f"hf.save_model), not torchvision's ViT-B/16 weights; pass it as --pretrained "
                                f"{weights}") from None
        raise machinery.UsageError(f"--weights {weights}: {error}") from None


def pretrained_backbone(path: Path | None, freeze: bool, progress: bool) -> tuple[torch.nn.Module, str]:
    """Our 28x28 ViT pretrained on Fashion-MNIST (notebook 09's, or --pretrained), a new head, frozen or not."""
    if path is None:
        model, _ = hf.get_pretrained_vit(progress=progress)
        source = str(hf.RUNS_DIR / "vit_fashion_mnist_pretrained.pth")
    else:
        try:
            model, source = hf.load_vit(path), str(path)
        except machinery.CheckpointError as error:
            if error.reason == "torchvision":
                raise machinery.UsageError(f"--pretrained {path} holds torchvision's ViT weights, not one of this "
                                    f"repository's checkpoints; pass it as --weights {path}") from None
            if error.reason in {"foreign", "pickled", "folder"}:
                raise machinery.UsageError(f"--pretrained {path}: {error}") from None
            raise machinery.CheckpointError(f"--pretrained {path}: {error}", error.reason) from None  # damaged: a failure
        except ValueError as error:  # no config, or weights that do not fit it
            raise machinery.UsageError(f"--pretrained {path}: {error}") from None
    if (model.config["image_size"], model.config["in_channels"]) != (28, 1):
        raise machinery.UsageError(f"--pretrained {source} is a {model.config['image_size']}px, "
                            f"{model.config['in_channels']}-channel model; it needs a 28x28 greyscale one (use "
                            f"--weights for ViT-B/16)")
    hf.new_head(model, num_classes=10)
    return (hf.freeze_backbone(model) if freeze else model), source


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    imagenet = args.imagenet or args.weights is not None
    mode = "scratch" if args.scratch else "probe" if args.freeze else "finetune"
    lr = args.lr if args.lr is not None else hf.TRANSFER_RECIPE["lr"][mode]
    name = args.name if args.name is not None else \
        f"vit_{'b_16_imagenet_' if imagenet else ''}mnist_{args.num_labels}_labels_{mode}"
    path = args.out_dir / f"{name}.pth"

    with machinery.command_line_errors(parser, interrupted=lambda: machinery.interrupted_run(path, resumable=False)):
        # 1. Check every flag and the output folder before anything is loaded: the files are written at the end
        machinery.check_run_name(name)
        machinery.device_from_flag(args.device)
        check_arguments(args)
        machinery.check_output_folder(args.out_dir)

        with machinery.run_lock(path), machinery.training_device(args.device) as device:
            machinery.refuse_to_overwrite(path, args.overwrite, resumable=False)

            # 2. The backbone: ImageNet ViT-B/16, our pretrained ViT, or a fresh one; then a new head
            if imagenet:
                model = imagenet_backbone(args.weights, args.freeze)
                source = f"{hf.IMAGENET_WEIGHTS} from {args.weights}" if args.weights else hf.IMAGENET_WEIGHTS
                mean, std = hf.imagenet_normalisation()
                train_data, val_data, test_data = imagenet_data(args.num_labels, args.seed, args.val_split,
                                                                args.subset)
            else:
                if args.scratch:
                    hf.set_seeds(args.seed)
                    model, source = hf.vit_from_config("vit_mnist"), None
                else:
                    model, source = pretrained_backbone(args.pretrained, args.freeze,
                                                        args.progress and machinery.is_main_process())
                mean, std = hf.MNIST_MEAN, hf.MNIST_STD
                train_data, val_data, test_data = mnist_data(args.num_labels, args.seed, args.val_split, args.subset)
            trainable = hf.count_parameters(model, trainable_only=True)
            machinery.print_main(f"{mode} from {source or 'random initialisation'}: {trainable:,} of "
                      f"{hf.count_parameters(model):,} parameters learn | {len(train_data)} labelled "
                      f"training digits, " + (f"{len(val_data)} validation digits, " if val_data is not None else "")
                      + f"{len(test_data)} test digits | device {device}")

            # 3. Train with the shared engine, then save what train.py saves
            recipe = dict(mode=mode, source=source, epochs=args.epochs, num_labels=args.num_labels, lr=lr,
                          batch_size=args.batch_size, weight_decay=args.weight_decay,
                          warmup_epochs=args.warmup_epochs, seed=args.seed, subset=args.subset,
                          val_split=args.val_split)
            start = time.perf_counter()
            results = hf.fine_tune(model, train_data, test_data, args.epochs, lr=lr, batch_size=args.batch_size,
                                   weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                                   device=device, progress=args.progress and machinery.is_main_process(), amp=args.amp,
                                   compile=machinery.use_compile(args.compile, args.epochs * hf.steps_per_epoch(
                                       len(train_data), args.batch_size, machinery.launched_processes())),
                                   val_data=val_data)
            model.requires_grad_(True)  # a loaded model should train like any other; the recipe records the freezing
            if machinery.is_main_process():
                hf.save_run(model.cpu(), results, args.out_dir, name=name, dataset="mnist", mean=mean, std=std,
                            recipe=recipe)
            if val_data is not None:
                best = max(range(len(results["val_acc"])), key=results["val_acc"].__getitem__)
                summary = (f"validation accuracy {results['val_acc'][-1]:.4f} after {args.epochs} epochs (best "
                           f"{results['val_acc'][best]:.4f}, epoch {best + 1}); test accuracy "
                           f"{results['test_acc']:.4f} (the test set, read once, at the end)")
            else:
                summary = f"test accuracy {results['test_acc'][-1]:.4f} after {args.epochs} epochs (no validation set)"
            machinery.print_main(f"Done: {summary} ({time.perf_counter() - start:.0f} s). Files in {args.out_dir}/: {name}.pth, "
                      f"{name}.json, {name}.pkl, {name}_loss_curves.png")
    return results


if __name__ == "__main__":
    main()
