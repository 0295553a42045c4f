"""Classify your own digit: an image file (PNG or JPEG, any size, colour or grey, dark ink on light paper or the
other way round) prepared the way MNIST's digits were, through a trained ViT.

    python predict.py my_digit.png                           # the model train.py saves (runs/vit_mnist.pth)
    python predict.py my_digit.jpg --model runs/other.pth --top 5

Prints the most likely classes (by the names the run saved, if any) with their probabilities. The preparation
(``hf.read_digit_image``): greyscale, inverted if the background is light, cropped to the ink, the longer side scaled
to 20 pixels, centred by its centre of mass in 28x28, normalised with the mean and std saved in the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import helper_functions as hf
import machinery


def build_parser() -> machinery.ArgumentParser:
    parser = machinery.ArgumentParser(description="Classify a digit in an image file with a trained ViT.")
    parser.add_argument("image", type=Path, help="a PNG or JPEG file with one digit on a plain background")
    parser.add_argument("--model", type=Path, default=hf.RUNS_DIR / "vit_mnist.pth",
                        help="a checkpoint written by train.py (default: runs/vit_mnist.pth)")
    parser.add_argument("--top", type=machinery.positive_int, default=3, help="how many classes to print (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> list[tuple[int, float]]:
    """Print and return the ``--top`` (class, probability) pairs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model.exists():
        sys.exit(f"predict.py: no trained model at {args.model}; train one first with `python train.py` "
                 f"(about 5 minutes on 2 CPU cores), or pass --model PATH")
    # Ctrl-C, a damaged or unreadable checkpoint, a folder or a file we may not read: one line, never a traceback
    with machinery.command_line_errors(parser):
        try:
            checkpoint = hf.load_checkpoint(args.model)  # read once: the weights, their config and normalisation
            probabilities = hf.class_probabilities(hf.load_model(checkpoint), args.image,
                                                   checkpoint.get("mean", hf.MNIST_MEAN),
                                                   checkpoint.get("std", hf.MNIST_STD))
        except (ValueError, TypeError) as error:  # not an image, a blank image, weights that do not fit
            sys.exit(f"predict.py: {str(error).splitlines()[0].rstrip(': ')}")
    # The class names a run saved (train_transferlearning.py --data saves its folders'), else the dataset's
    names = checkpoint.get("classes") or {
        "fashion-mnist": machinery.TORCHVISION_DATASETS["FashionMNIST"].classes}.get(checkpoint.get("dataset"))
    if names is not None and len(names) != len(probabilities):
        names = None  # names that do not fit the model's outputs: print class indices instead
    top = probabilities.topk(min(args.top, len(probabilities)))
    pairs = [(int(c), float(p)) for p, c in zip(top.values, top.indices)]
    print(f"{args.image} ({args.model.name}):")
    for c, p in pairs:
        print(f"  {names[c] if names else c}: {p:.1%}")
    return pairs


if __name__ == "__main__":
    main()
