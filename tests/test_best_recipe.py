"""Issue 27's levers in helper_functions: test-time augmentation over 1-pixel shifts (``ShiftAveraged``), the
``tta`` switch of ``TrainingSetup``, and ``BEST_MNIST_RECIPE``, which uses them."""
import pytest
import torch
import torch.nn.functional as F

import helper_functions as hf


def _test_accuracy(result) -> float:
    return result["test_acc"] if isinstance(result, dict) else result[1]  # a dict, or (loss, accuracy)


def test_shift_averaged_with_no_shift_is_the_models_own_log_softmax(tiny_vit):
    model, images = tiny_vit().eval(), torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(hf.ShiftAveraged(model, shifts=[(0, 0)])(images), F.log_softmax(model(images), -1))


def test_shift_averaged_is_the_log_of_the_mean_probability_over_the_shifted_images(tiny_vit):
    model, images = tiny_vit().eval(), torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        averaged = hf.ShiftAveraged(model)(images)  # (batch, num_classes)
        by_hand = torch.stack([F.softmax(model(torch.roll(images, s, dims=(2, 3))), -1)
                               for s in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]]).mean(0)
    torch.testing.assert_close(averaged.exp(), by_hand)
    torch.testing.assert_close(averaged.exp().sum(-1), torch.ones(3))  # probabilities: cross-entropy works on them


def test_training_setup_tests_through_shift_averaged_only_when_asked(tiny_sizes):
    setup = hf.TrainingSetup(subset=64, epochs=1, warmup_epochs=0, tta=True, **tiny_sizes)
    assert setup.tta is True
    plain = hf.test_step(setup.model, setup.test_loader, setup.loss_fn)[1]
    averaged = hf.test_step(hf.ShiftAveraged(setup.model), setup.test_loader, setup.loss_fn)[1]
    assert _test_accuracy(setup.test()) == averaged  # the setup's default: with TTA
    assert _test_accuracy(setup.test(tta=False)) == plain
    assert hf.TrainingSetup(subset=64, epochs=1, warmup_epochs=0, **tiny_sizes).tta is False  # off by default


def test_the_best_recipe_holds_out_the_validation_split_and_builds(tiny_sizes):
    recipe = hf.BEST_MNIST_RECIPE
    assert recipe["val_split"] == hf.MNIST_RECIPE["val_split"] == 5000  # chosen on validation, test read once
    assert recipe["tta"] is True and recipe["patch_size"] == 4
    hf.check_training_arguments(**{k: recipe[k] for k in ("epochs", "batch_size", "lr", "warmup_epochs", "seed")})
    setup = hf.TrainingSetup(**{**recipe, "subset": 512, **tiny_sizes})
    assert len(setup.train_loader) == 2 and setup.model.config["patch_size"] == 4  # 512 digits in batches of 256


@pytest.mark.parametrize("key", ["epochs", "batch_size", "lr", "warmup_epochs", "label_smoothing"])
def test_notebook07s_recipe_is_not_the_best_recipe(key):
    assert hf.MNIST_RECIPE[key] != hf.BEST_MNIST_RECIPE[key]  # a change to one must not silently change the other
