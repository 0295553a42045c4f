"""benchmarks/screen_recipes.py: its levers (random erasing, stochastic depth, hard distillation) and one tiny run."""
import json

import torch
from torch import nn

from benchmarks import screen_recipes as screen


def test_random_erasing_sets_whole_rectangles_to_the_background_and_nothing_else():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28) + 1  # background (the smallest value) would be 1
    erased = screen.random_erasing(images, p=1.0)
    changed = erased != images
    assert erased.shape == images.shape and changed.any(dim=(1, 2, 3)).float().mean() > 0.9
    assert torch.all(erased[changed] == images.amin())
    rows, cols = changed[:, 0].any(2), changed[:, 0].any(1)  # a rectangle: its row and column extents fill it
    assert torch.equal(changed[:, 0].sum((1, 2)), rows.sum(1) * cols.sum(1))
    assert torch.equal(screen.random_erasing(images, p=0.0), images)


def test_drop_block_is_the_block_in_eval_and_skips_or_scales_it_in_training():
    block = nn.Linear(4, 4)
    wrapped = screen.DropBlock(block, rate=0.5)
    x = torch.randn(256, 3, 4)
    assert torch.equal(wrapped.eval()(x), block(x))
    out = wrapped.train()(x)
    skipped = torch.isclose(out, x).all(dim=(1, 2))
    assert 0.3 < skipped.float().mean() < 0.7  # about half the images skip the block
    torch.testing.assert_close(out[~skipped], x[~skipped] + 2 * (block(x[~skipped]) - x[~skipped]))


def test_hard_distillation_mixes_true_and_teacher_labels_only_in_training_steps():
    teacher = nn.Linear(3, 2)
    loss = screen.HardDistillation(nn.CrossEntropyLoss(), teacher, augment=lambda x: x)
    x, labels, logits = torch.randn(8, 3), torch.zeros(8, dtype=torch.long), torch.randn(8, 2)
    loss.augment(x)
    expected = 0.5 * nn.functional.cross_entropy(logits, labels) + 0.5 * nn.functional.cross_entropy(
        logits, teacher(x).argmax(1))
    torch.testing.assert_close(loss(logits, labels), expected)
    torch.testing.assert_close(loss(logits, labels), nn.functional.cross_entropy(logits, labels))  # labels used up


def test_a_tiny_worker_run_writes_validation_curves_ema_and_tta_never_the_test_set(tmp_path):
    out = tmp_path / "run.json"
    screen.main(["--worker", "base30", "--seed", "0", "--subset", "128", "--epochs", "1", "--out", str(out)])
    run = json.loads(out.read_text())
    assert run["done"] and run["epochs_done"] == 1 and len(run["val_acc"]) == 1
    assert set(run["final"]) == {"val_acc", "val_acc_tta", "ema0.999", "ema0.9997", "ema0.999_tta", "ema0.9997_tta"}
    assert not [key for key in json.dumps(run).split('"') if key.startswith("test")]
