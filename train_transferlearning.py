"""Transfer learning from the command line: a pretrained ViT, a new head, and only a few labelled MNIST digits.

    python train_transferlearning.py                               # notebook 09: the Fashion-MNIST ViT, fine-tuned
    python train_transferlearning.py --freeze                      # linear probe: only the new head learns
    python train_transferlearning.py --scratch                     # the baseline: the same labels, no pretraining
    python train_transferlearning.py --pretrained runs/vit_fashion_mnist.pth   # any checkpoint train.py wrote
    python train_transferlearning.py --imagenet --freeze --epochs 2 --subset 1000  # ViT-B/16, ImageNet weights
    python train_transferlearning.py --weights vit_b_16-c867db91.pth --freeze     # ... from a file you downloaded

Like train.py, it runs unchanged under ``torchrun --nproc_per_node=N`` (data-parallel; process 0 prints and writes).

Without --pretrained, the Fashion-MNIST ViT of notebook 09 is loaded from models/ (or trained there first, a few
minutes on a CPU). A run writes the same files as train.py: <out-dir>/<name>.pth (weights, config, dataset,
normalisation, recipe), <name>.json and <name>.pkl (results) and <name>_loss_curves.png. Training is
helper_functions' engine (``hf.fine_tune`` calls ``hf.train``): there is no second training loop here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import helper_functions as hf
from train import add_output_arguments, positive_int, resolve_device, say

DEFAULTS = dict(epochs=30, num_labels=500, batch_size=25, weight_decay=0.05, warmup_epochs=1, seed=42)  # notebook 09
LEARNING_RATES = {"finetune": 1e-3, "probe": 3e-2, "scratch": 1e-3}  # notebook 09, step 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune a pretrained ViT on a few labelled MNIST digits.",
                                     epilog="Settings left out take notebook 09's values (in brackets).")
    source = parser.add_argument_group("where the backbone comes from (choose one)").add_mutually_exclusive_group()
    source.add_argument("--pretrained", type=Path, metavar="PATH",
                        help="a checkpoint written by train.py or hf.save_run (28x28 greyscale ViT) "
                             f"[{hf.MODELS_DIR.name}/vit_fashion_mnist_pretrained.pth, trained first if missing]")
    source.add_argument("--imagenet", action="store_true",
                        help=f"torchvision's {hf.IMAGENET_WEIGHTS} in our ViT-B/16 (downloaded, or from "
                             "torchvision's cache); digits resized to 224x224 RGB")
    source.add_argument("--weights", type=Path, metavar="PATH",
                        help="like --imagenet, from a torchvision ViT-B/16 state dict file you downloaded")
    source.add_argument("--scratch", action="store_true", help="no pretraining: a fresh ViT (the baseline)")
    d = DEFAULTS
    run = parser.add_argument_group("recipe")
    run.add_argument("--freeze", action="store_true",
                     help="linear probe: freeze the backbone, train only the new head [full fine-tuning]")
    run.add_argument("--epochs", type=positive_int, default=d["epochs"], help=f"[{d['epochs']}]")
    run.add_argument("--num-labels", dest="num_labels", type=positive_int, default=d["num_labels"],
                     help=f"labelled training digits, the same number per class (a multiple of 10) [{d['num_labels']}]")
    run.add_argument("--lr", type=float, help="peak learning rate of AdamW "
                                              f"[{', '.join(f'{k} {v}' for k, v in LEARNING_RATES.items())}]")
    run.add_argument("--batch-size", dest="batch_size", type=positive_int, default=d["batch_size"],
                     help=f"[{d['batch_size']}]")
    run.add_argument("--weight-decay", dest="weight_decay", type=float, default=d["weight_decay"],
                     help=f"[{d['weight_decay']}]")
    run.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=d["warmup_epochs"],
                     help=f"[{d['warmup_epochs']}]")
    run.add_argument("--seed", type=int, default=d["seed"], help=f"[{d['seed']}]")
    run.add_argument("--subset", type=positive_int,
                     help="test on only the first N test digits (quick checks; ViT-B/16 on a CPU) [all 10,000]")
    add_output_arguments(parser, default_name="vit_mnist_<num-labels>_labels_<mode>")
    return parser


def imagenet_data(num_labels: int, seed: int, subset: int | None) -> tuple[torch.utils.data.Dataset, ...]:
    """MNIST as ViT-B/16's ImageNet input: each digit resized to 224x224 and copied to 3 channels, per image."""
    train_images, test_images = hf.get_mnist(transform=hf.imagenet_transform())
    test_data = torch.utils.data.Subset(test_images, range(subset)) if subset else test_images
    return hf.balanced_subset(train_images, num_labels, seed=seed), test_data


def mnist_data(num_labels: int, seed: int, subset: int | None) -> tuple[torch.utils.data.Dataset, ...]:
    """MNIST as our 28x28 ViT reads it: normalised tensors, computed once (hf.tensor_dataset)."""
    train_images, test_images = hf.get_mnist()
    train_data = hf.tensor_dataset(train_images, hf.MNIST_MEAN, hf.MNIST_STD)
    test_data = hf.tensor_dataset(test_images, hf.MNIST_MEAN, hf.MNIST_STD, limit=subset)
    return hf.balanced_subset(train_data, num_labels, seed=seed), test_data


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_labels % 10:
        parser.error(f"--num-labels {args.num_labels} is not a multiple of 10; every digit gets the same number")
    if not 0 <= args.warmup_epochs < args.epochs:
        parser.error(f"need 0 <= --warmup-epochs < --epochs, got --warmup-epochs {args.warmup_epochs} with --epochs "
                     f"{args.epochs}")
    if args.scratch and args.freeze:
        parser.error("--freeze with --scratch would train a head on random features; leave one of them out")
    if args.pretrained is not None and not args.pretrained.exists():
        parser.error(f"--pretrained: no checkpoint at {args.pretrained}; train one (python train.py --dataset "
                     f"fashion-mnist --epochs 3) or leave out --pretrained to use notebook 09's")
    imagenet = args.imagenet or args.weights is not None
    mode = "scratch" if args.scratch else "probe" if args.freeze else "finetune"
    lr = args.lr if args.lr is not None else LEARNING_RATES[mode]
    name = args.name or f"vit_{'b_16_imagenet_' if imagenet else ''}mnist_{args.num_labels}_labels_{mode}"
    device = resolve_device(args.device)
    try:
        return _transfer(args, parser, imagenet, mode, lr, name, device)
    finally:
        hf.cleanup_distributed()


def _transfer(args: argparse.Namespace, parser: argparse.ArgumentParser, imagenet: bool, mode: str, lr: float,
              name: str, device: torch.device) -> dict[str, list[float]]:
    # 1. The backbone: ImageNet ViT-B/16, our pretrained ViT, or a fresh one; then a new head, frozen backbone or not
    if imagenet:
        try:
            with hf.main_process_first():  # under torchrun, one process downloads the weights
                model = hf.imagenet_vit(args.weights, num_classes=10, freeze=args.freeze)
        except hf.WeightsNotAvailableError as error:
            print(error, file=sys.stderr)
            raise SystemExit(1) from None
        except ValueError as error:  # a file that is not ViT-B/16's weights: the message names the differing keys
            parser.error(f"--weights {args.weights}: {error}")
        source = f"{hf.IMAGENET_WEIGHTS} from {args.weights}" if args.weights else hf.IMAGENET_WEIGHTS
        mean, std = hf.imagenet_normalisation()
        train_data, test_data = imagenet_data(args.num_labels, args.seed, args.subset)
    else:
        if args.scratch:
            hf.set_seeds(args.seed)
            model, source = hf.vit_from_config("vit_mnist"), None
        else:
            if args.pretrained is None:
                model, _ = hf.get_pretrained_vit(progress=args.progress)
                source = str(hf.MODELS_DIR / "vit_fashion_mnist_pretrained.pth")
            else:
                try:
                    model, source = hf.load_vit(args.pretrained), str(args.pretrained)
                except ValueError as error:  # not our checkpoint, no config, or weights that do not fit it
                    parser.error(f"--pretrained {args.pretrained}: {error}")
            if (model.config["image_size"], model.config["in_channels"]) != (28, 1):
                parser.error(f"{source} is a {model.config['image_size']}px, {model.config['in_channels']}-channel "
                             f"model; --pretrained needs a 28x28 greyscale one (use --weights for ViT-B/16)")
            hf.new_head(model, num_classes=10)
            if args.freeze:
                hf.freeze_backbone(model)
        mean, std = hf.MNIST_MEAN, hf.MNIST_STD
        train_data, test_data = mnist_data(args.num_labels, args.seed, args.subset)
    trainable = sum(p.numel() for p in hf.trainable_parameters(model))
    say(f"{mode} from {source or 'random initialisation'}: {trainable:,} of "
          f"{sum(p.numel() for p in model.parameters()):,} parameters learn | {len(train_data)} labelled training "
          f"digits, {len(test_data)} test digits | device {device}")

    # 2. Train with the shared engine, then save what train.py saves
    recipe = dict(mode=mode, source=source, epochs=args.epochs, num_labels=args.num_labels, lr=lr,
                  batch_size=args.batch_size, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                  seed=args.seed, subset=args.subset)
    start = time.perf_counter()
    results = hf.fine_tune(model, train_data, test_data, args.epochs, lr=lr, batch_size=args.batch_size,
                           weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                           device=device, progress=args.progress and hf.is_main_process(), amp=args.amp,
                           compile=args.compile)
    model.requires_grad_(True)  # a loaded model should train like any other; the recipe records the freezing
    if hf.is_main_process():
        hf.save_run(model.cpu(), results, args.out_dir, name=name, dataset="mnist", mean=mean, std=std, recipe=recipe)
    say(f"Done: test accuracy {results['test_acc'][-1]:.4f} after {args.epochs} epochs "
          f"({time.perf_counter() - start:.0f} s). Files in {args.out_dir}/: {name}.pth, {name}.json, {name}.pkl, "
          f"{name}_loss_curves.png")
    return results


if __name__ == "__main__":
    main()
