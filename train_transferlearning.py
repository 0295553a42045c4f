"""Transfer learning from the command line: a pretrained ViT, a new head, and only a few labelled MNIST digits.

    python train_transferlearning.py                               # notebook 09: the Fashion-MNIST ViT, fine-tuned
    python train_transferlearning.py --freeze                      # linear probe: only the new head learns
    python train_transferlearning.py --scratch                     # the baseline: the same labels, no pretraining
    python train_transferlearning.py --pretrained runs/vit_fashion_mnist.pth   # any checkpoint train.py wrote
    python train_transferlearning.py --imagenet --freeze --epochs 2 --subset 1000  # ViT-B/16, ImageNet weights
    python train_transferlearning.py --weights vit_b_16-c867db91.pth --freeze     # ... from a file you downloaded
    python train_transferlearning.py --data my_images --epochs 10    # your images: my_images/<class>/<image>.jpg

The labelled digits are drawn from MNIST's training images minus the validation set (--val-split, train.py's), which
is measured every epoch; the test set is read once, at the end (final_test_acc). With --data, a folder of your images
in torchvision's ImageFolder layout takes their place (its train/ and test/, or a fixed fifth of each class held out as
the test set), checked before training and resized to what the backbone takes; the run saves the class names.
Without --pretrained, notebook 09's Fashion-MNIST ViT is loaded from runs/ (or trained there first). The run is saved
at the end, as train.py saves one, and never replaces a saved run without --overwrite. Like train.py it runs under
torchrun, and its errors take one line: exit code 2 for a setting that cannot work, 1 for a failure, 130 for Ctrl-C,
143 for SIGTERM.
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
MNIST_TRAINING_IMAGES_PER_DIGIT = 5421  # the fewest of any digit in MNIST's training set (the 5s)
MNIST_TRAINING_IMAGES = 60_000


def build_parser() -> machinery.ArgumentParser:
    parser = machinery.ArgumentParser(description="Fine-tune a pretrained ViT on a few MNIST digits or your images.",
                                      epilog="Settings left out take notebook 09's values (in brackets).")
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
    d, whole, number = hf.TRANSFER_RECIPE, machinery.positive_int, machinery.finite_float
    images = parser.add_argument_group("the labelled images (choose one)").add_mutually_exclusive_group()
    images.add_argument("--num-labels", dest="num_labels", type=whole, default=d["num_labels"],
                        help=f"MNIST training digits, the same number per class (a multiple of 10) [{d['num_labels']}]")
    images.add_argument("--data", type=Path, metavar="PATH",
                        help=f"your own images, all labelled: a folder in torchvision's ImageFolder layout "
                             f"({machinery.IMAGE_FOLDER_LAYOUT}), or its train/ and test/ laid out so (else a "
                             f"seeded {machinery.TEST_FRACTION:g} of each class is the test set, the same every run); "
                             f"checked before training, resized to the backbone's input; the run saves the class names")
    run = parser.add_argument_group("recipe")
    run.add_argument("--freeze", action="store_true",
                     help="linear probe: freeze the backbone, train only the new head [full fine-tuning]")
    run.add_argument("--epochs", type=whole, default=d["epochs"], help=f"[{d['epochs']}]")
    rates = ", ".join(f"{mode} {d['lr'][mode]}" for mode in MODES)
    run.add_argument("--lr", type=number, help=f"peak learning rate of AdamW [{rates}]")
    run.add_argument("--batch-size", dest="batch_size", type=whole, default=d["batch_size"],
                     help=f"[{d['batch_size']}]")
    run.add_argument("--weight-decay", dest="weight_decay", type=number, default=d["weight_decay"],
                     help=f"[{d['weight_decay']}]")
    run.add_argument("--warmup-epochs", dest="warmup_epochs", type=number,
                     help=f"[{d['warmup_epochs']}, or a tenth of a shorter run]")
    run.add_argument("--seed", type=machinery.seed_int, default=d["seed"], help=f"[{d['seed']}]")
    run.add_argument("--val-split", dest="val_split", type=machinery.non_negative_int,
                     help="training images held out (the labelled ones are drawn from the rest) and measured after "
                          f"every epoch (0: none, every epoch is tested) [{d['val_split']}; with --data a tenth]")
    run.add_argument("--subset", type=whole, help="validate and test on only the first N validation and N test images "
                                                  "(quick checks; ViT-B/16 on a CPU) [all]")
    machinery.add_output_arguments(parser, default_name="vit_mnist_<num-labels>_labels_<mode>, or with --data "
                                                        "vit_<folder>_<mode>")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, naming the flag, any setting that cannot work, before anything is loaded. With --data, its folder is
    checked image by image, and sets --val-split's default (a tenth) and the labelled images (all the others)."""
    training = machinery.check_image_folder(args.data) if args.data else MNIST_TRAINING_IMAGES
    if args.val_split is None:
        args.val_split = training // 10 if args.data else hf.TRANSFER_RECIPE["val_split"]
    if not args.data and (args.num_labels % 10 or args.num_labels > 10 * MNIST_TRAINING_IMAGES_PER_DIGIT):
        raise machinery.UsageError(f"--num-labels {args.num_labels} must be a multiple of 10 (every digit gets the "
                                   f"same number) and at most {10 * MNIST_TRAINING_IMAGES_PER_DIGIT} (MNIST has "
                                   f"{MNIST_TRAINING_IMAGES_PER_DIGIT} 5s)")
    if not args.val_split < training:
        raise machinery.UsageError(f"--val-split {args.val_split} leaves no training images ({args.data or 'MNIST'} "
                                   f"has {training}); hold out fewer, or 0 for no validation set")
    if args.data:
        args.num_labels = training - args.val_split  # every training image is labelled
    if args.lr is not None and not args.lr > 0:
        raise machinery.UsageError(f"--lr {args.lr} must be > 0")
    if args.weight_decay < 0:
        raise machinery.UsageError(f"--weight-decay {args.weight_decay} must be >= 0")
    steps = machinery.steps_per_epoch(args.num_labels, args.batch_size, machinery.launched_processes())
    machinery.check_warmup(warmup_epochs(args), args.epochs, steps)
    if args.scratch and args.freeze:
        raise machinery.UsageError("--freeze with --scratch would train a head on random features; leave one out")
    for option, path in (("--pretrained", args.pretrained), ("--weights", args.weights)):
        if path is not None and not path.exists():
            hint = ("train one (python train.py --dataset fashion-mnist --epochs 3) or leave out --pretrained to use "
                    "notebook 09's" if option == "--pretrained" else "download it first (see --imagenet's help) or "
                    "check the path")
            raise machinery.UsageError(f"{option}: no file at {path}; {hint}")
        if path is not None and path.is_dir():
            raise machinery.UsageError(f"{option}: {path} is a folder; pass the .pth file inside it")


def warmup_epochs(args: argparse.Namespace) -> float:
    """--warmup-epochs, or the recipe's warm-up, or a tenth of a run shorter than that."""
    default = hf.TRANSFER_RECIPE["warmup_epochs"]
    return args.warmup_epochs if args.warmup_epochs is not None else default if default < args.epochs else \
        args.epochs / 10


def imagenet_backbone(weights: Path | None, freeze: bool, num_classes: int) -> torch.nn.Module:
    """ViT-B/16 with torchvision's ImageNet weights (downloaded, cached, or --weights), a new head, frozen or not."""
    try:
        with machinery.main_process_first():  # under torchrun, one process downloads the weights
            return hf.imagenet_vit(weights, num_classes=num_classes, freeze=freeze)
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
            raise machinery.UsageError(f"--weights {weights} is one of this repository's checkpoints (written by "
                                       f"train.py or hf.save_model), not torchvision's ViT-B/16 weights; pass it as "
                                       f"--pretrained {weights}") from None
        raise machinery.UsageError(f"--weights {weights}: {error}") from None


def pretrained_backbone(path: Path | None, freeze: bool, progress: bool,
                        num_classes: int) -> tuple[torch.nn.Module, str]:
    """Our 28x28 ViT pretrained on Fashion-MNIST (notebook 09's, or --pretrained), a new head, frozen or not."""
    if path is None:
        model, path = hf.get_trained_vit(hf.PRETRAIN_RECIPE, progress=progress)[0], hf.RUNS_DIR / \
            "vit_fashion_mnist_pretrained.pth"
    else:
        try:
            model = hf.load_model(path)
        except machinery.CheckpointError as error:
            if error.reason == "torchvision":
                raise machinery.UsageError(f"--pretrained {path} holds torchvision's ViT weights, not one of this "
                                           f"repository's checkpoints; pass it as --weights {path}") from None
            if error.reason in {"foreign", "pickled", "folder"}:
                raise machinery.UsageError(f"--pretrained {path}: {error}") from None
            raise machinery.CheckpointError(f"--pretrained {path}: {error}", error.reason) from None  # damaged
        except ValueError as error:  # no config, or weights that do not fit it
            raise machinery.UsageError(f"--pretrained {path}: {error}") from None
    if (model.config["image_size"], model.config["in_channels"]) != (28, 1):
        raise machinery.UsageError(f"--pretrained {path} is a {model.config['image_size']}px, "
                                   f"{model.config['in_channels']}-channel model; it needs a 28x28 greyscale one (use "
                                   f"--weights for ViT-B/16)")
    hf.replace_head(model, num_classes=num_classes)
    return (hf.freeze_backbone(model) if freeze else model), str(path)


def load_data(imagenet: bool, args: argparse.Namespace, mean: float | list[float],
              std: float | list[float]) -> tuple[torch.utils.data.Dataset | None | list[str], ...]:
    """(labelled examples drawn from the training part, validation set or None, test set, class names), the middle two
    cut to --subset: --data's images, or MNIST's digits; as ViT-B/16's ImageNet input (224x224 RGB, per image) or as
    our 28x28 ViT reads them (MNIST's as tensors, once)."""
    classes = [str(digit) for digit in range(10)]
    if args.data:
        size, channels = (224, 3) if imagenet else (28, 1)  # what ViT-B/16 and our 28x28 ViT take
        train_images, test_images, classes = machinery.image_folder_splits(args.data, size, channels, mean, std)
    elif imagenet:
        train_images, test_images = hf.get_mnist(transform=hf.imagenet_transform())
    else:
        train_images, test_images = (hf.tensor_dataset(data, hf.MNIST_MEAN, hf.MNIST_STD) for data in hf.get_mnist())
    train_part, val_data = hf.validation_split(train_images, args.val_split)
    if args.subset:
        test_images = torch.utils.data.Subset(test_images, range(min(args.subset, len(test_images))))
        if val_data is not None:
            val_data = torch.utils.data.Subset(val_data, range(min(args.subset, len(val_data))))
    labelled = train_part if args.data else hf.balanced_subset(train_part, args.num_labels, seed=args.seed)
    return labelled, val_data, test_images, classes


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    imagenet = args.imagenet or args.weights is not None
    mode = "scratch" if args.scratch else "probe" if args.freeze else "finetune"
    data = args.data.resolve().name if args.data else f"mnist_{args.num_labels}_labels"
    name = args.name or f"vit_{'b_16_imagenet_' if imagenet else ''}{data}_{mode}"
    say = machinery.print_main  # under torchrun, process 0 prints
    with machinery.script_run(parser, args.out_dir, name, args.device, args.overwrite, resumable=False,
                              check=lambda: check_flags(args)) as device:
        # 1. The recipe; the data, as the backbone takes it; the backbone (ImageNet ViT-B/16, our pretrained ViT or a
        # fresh one) with a new head, one output per class
        recipe = dict(mode=mode, source=None, epochs=args.epochs, num_labels=args.num_labels,
                      lr=args.lr or hf.TRANSFER_RECIPE["lr"][mode], batch_size=args.batch_size,
                      weight_decay=args.weight_decay, warmup_epochs=warmup_epochs(args), seed=args.seed,
                      subset=args.subset, val_split=args.val_split)
        progress = args.progress and machinery.is_main_process()
        mean, std = hf.imagenet_normalisation() if imagenet else (hf.MNIST_MEAN, hf.MNIST_STD)
        train_data, val_data, test_data, classes = load_data(imagenet, args, mean, std)
        if imagenet:
            model = imagenet_backbone(args.weights, args.freeze, len(classes))
            recipe["source"] = f"{hf.IMAGENET_WEIGHTS} from {args.weights}" if args.weights else hf.IMAGENET_WEIGHTS
        elif args.scratch:
            hf.set_seeds(args.seed)
            model = hf.vit_from_config("vit_mnist", num_classes=len(classes))
        else:
            model, recipe["source"] = pretrained_backbone(args.pretrained, args.freeze, progress, len(classes))
        say(f"{mode} from {recipe['source'] or 'random initialisation'}: "
            f"{hf.count_parameters(model, trainable_only=True):,} of {hf.count_parameters(model):,} parameters learn | "
            f"{len(train_data)} labelled training images, {len(val_data or [])} validation images, {len(test_data)} "
            f"test images, {len(classes)} classes | device {device}")

        # 2. Train with the shared engine (validating every epoch, the test set read once, at the end), then save
        start = time.perf_counter()
        compile = machinery.use_compile(args.compile, args.epochs * machinery.steps_per_epoch(
            len(train_data), args.batch_size, machinery.launched_processes()))
        results = hf.fine_tune(model, train_data, test_data, args.epochs, lr=recipe["lr"], batch_size=args.batch_size,
                               weight_decay=args.weight_decay, warmup_epochs=recipe["warmup_epochs"], seed=args.seed,
                               device=device, progress=progress, amp=args.amp, compile=compile, val_data=val_data)
        model.requires_grad_(True)  # a loaded model should train like any other; the recipe records the freezing
        if machinery.is_main_process():
            hf.save_run(model.cpu(), results, args.out_dir, name=name, dataset=str(args.data or "mnist"), mean=mean,
                        std=std, recipe=recipe, classes=classes)

        # 3. The summary
        measured = results["val_acc" if val_data is not None else "test_acc"]
        best = max(range(args.epochs), key=measured.__getitem__)
        say(f"Done: {'validation' if val_data is not None else 'test'} accuracy {measured[-1]:.4f} after {args.epochs} "
            f"epochs (best {measured[best]:.4f}, epoch {best + 1}); test accuracy {results['final_test_acc']:.4f} (the "
            f"test set, read once, at the end); {time.perf_counter() - start:.0f} s. Files in {args.out_dir}/: "
            f"{name}.pth, {name}.json, {name}.pkl, {name}_loss_curves.png")
    return results


if __name__ == "__main__":
    main()
