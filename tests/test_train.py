"""train.py and the training recipe's pieces: a run writes its files, --resume continues exactly where a run stopped,
bad arguments are refused with a clear message, and the fast data path, augmentation and schedule do what they say."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helper_functions as hf
import train
from conftest import REPO


def test_train_py_trains_writes_its_files_and_resume_continues_exactly(tmp_path, capsys, tiny_run):
    # 1. A fresh run from the command line, stopped after 1 of 2 planned epochs, on this process's thread count (the
    # float sums, and so the weights compared bit for bit in 4., depend on it)
    same_threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--epochs", "2", "--stop-after", "1",
                           "--out-dir", str(tmp_path / "a"), *tiny_run], capture_output=True, text=True, timeout=300,
                          env=same_threads)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/2" in done.stdout
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"vit_mnist.pth", "vit_mnist.json", "vit_mnist.pkl", "vit_mnist_loss_curves.png"}
    first = hf.load_checkpoint(tmp_path / "a" / "vit_mnist.pth")
    assert first["epoch"] == 1 and first["dataset"] == "mnist" and first["mean"] == hf.MNIST_MEAN
    stopped = json.loads((tmp_path / "a" / "vit_mnist.json").read_text())
    assert len(stopped["val_acc"]) == 1
    assert "final_test_acc" not in stopped, "an unfinished run never reads the test set"

    # 2. --resume keeps the saved run's settings: a clashing flag is refused
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out-dir", str(tmp_path / "a"), "--lr", "0.1"])
    assert "--lr 0.1 (saved: 0.002)" in capsys.readouterr().err

    # 3. --resume trains epoch 2 from the saved weights, optimizer, schedule and random state
    resumed = train.main(["--resume", "--out-dir", str(tmp_path / "a"), "--no-progress"])
    second = hf.load_checkpoint(tmp_path / "a" / "vit_mnist.pth")
    assert second["epoch"] == 2 and len(resumed["val_acc"]) == 2 and isinstance(resumed["final_test_acc"], float)
    assert torch.equal(second["val_indices"], first["val_indices"]), "the resumed run holds out the same digits"
    assert resumed["train_loss"][0] == first["history"]["train_loss"][0], "epoch 1's results are kept"
    assert second["train_state"]["optimizer"]["state"][0]["step"] == 2 * 4, "the optimizer continued, not restarted"

    # 4. ... and ends exactly where an uninterrupted 2-epoch run ends: every piece of state was restored
    straight = train.main(["--epochs", "2", "--out-dir", str(tmp_path / "b"), *tiny_run])
    assert straight == resumed
    uninterrupted = hf.load_checkpoint(tmp_path / "b" / "vit_mnist.pth")["state_dict"]
    assert all(torch.equal(uninterrupted[k], v) for k, v in second["state_dict"].items())

    # 5. plot_loss_curves draws the run from the dict, the .json or the .pkl train.py wrote
    for source in (straight, tmp_path / "b" / "vit_mnist.json", tmp_path / "b" / "vit_mnist.pkl"):
        loss_ax, acc_ax = hf.plot_loss_curves(source).axes
        assert list(loss_ax.lines[0].get_ydata()) == straight["train_loss"]
        assert list(acc_ax.lines[1].get_ydata()) == straight["val_acc"]
        assert list(acc_ax.lines[2].get_ydata()) == [straight["final_test_acc"]], "the test set: one point, at the end"


def test_the_readme_first_command_trains_one_epoch_and_can_be_run_twice(tmp_path, tiny_run):
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith(".venv/bin/python train.py"))
    argv = first.split("#")[0].split(" train.py", 1)[1].split()
    assert argv[:2] == ["--epochs", "1"] and "--overwrite" in argv, first
    name = argv[argv.index("--name") + 1]
    for _ in range(2):  # the second run replaces the first instead of stopping on it
        results = train.main([*argv, "--out-dir", str(tmp_path), *tiny_run])
        assert len(results["val_acc"]) == 1 and isinstance(results["final_test_acc"], float)
    # The default warm-up (1 epoch) would fill a 1-epoch run; it shrinks to a tenth of the run instead.
    assert hf.load_checkpoint(tmp_path / f"{name}.pth")["recipe"]["warmup_epochs"] == 0.1


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'; choose one of fashion-mnist, mnist"),
    (["--patch-size", "5"], "--patch-size 5 does not divide the 28x28 images; choose one of [1, 2, 4, 7, 14, 28]"),
    (["--embedding-dim", "30", "--heads", "4"], "--embedding-dim 30 is not divisible by --heads 4"),
    (["--epochs", "0"], "must be a positive whole number"),
    (["--epochs", "2", "--stop-after", "3"], "--stop-after 3 is beyond --epochs 2"),
    (["--resume", "--out-dir", "nowhere"], "no run saved at nowhere/vit_mnist.pth"),
])
def test_bad_arguments_stop_with_a_clear_message_before_any_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tensor_dataset_equals_torchvisions_per_image_transform():
    train_data, _ = hf.get_mnist()
    fast = hf.tensor_dataset(train_data, hf.MNIST_MEAN, hf.MNIST_STD, limit=100)
    assert len(fast) == 100
    for i in (0, 7, 99):
        image, label = train_data[i]
        assert torch.equal(fast[i][0], image) and fast[i][1].item() == label


def test_random_affine_moves_digits_but_keeps_shape_and_background():
    images, _ = hf.get_tensor_datasets("mnist", limit=64)[0].tensors
    torch.manual_seed(0)
    moved = hf.random_affine(images)
    assert moved.shape == images.shape
    assert torch.allclose(moved.amin(), images.amin()), "new borders are filled with the black background"
    assert (moved - images).abs().amax() > 1, "the digits moved"
    assert torch.allclose(hf.random_affine(images, degrees=0, translate=0, scale=0), images, atol=1e-5)


def test_warmup_cosine_schedule_rises_linearly_then_decays_to_zero():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = hf.warmup_cosine_schedule(optimizer, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0]), "from lr / 4 to lr in 4 steps"
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        hf.warmup_cosine_schedule(optimizer, total_steps=4, warmup_steps=4)


def test_get_trained_vit_loads_a_saved_run_of_notebook_07s_recipe_without_training(tmp_path, tiny_vit, history):
    model = tiny_vit()
    results = history
    hf.save_run(model, results, tmp_path, name="vit_mnist", recipe=hf.MNIST_RECIPE)
    loaded, loaded_results = hf.get_trained_vit(path=tmp_path / "vit_mnist.pth")
    last = {"final_test_loss": results["test_loss"][-1], "final_test_acc": results["test_acc"][-1]}
    assert loaded_results == {**results, **last} and not loaded.training, "a finished run: its final test score too"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def _readme_train_commands() -> list[list[str]]:
    """The flags of every `train.py` command in the code blocks of README.md and the pages in docs/ (where the
    command-line guide, docs/training.md, moved), comments and the venv prefix left out."""
    repo = Path(__file__).resolve().parents[1]
    pages = "\n".join(path.read_text() for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))])
    commands = []
    for line in pages.splitlines():
        command = line.split("#")[0]
        if " train.py" in command and command.lstrip().startswith((".venv/bin/python", "python")):
            commands.append(command.split(" train.py", 1)[1].split())
    return commands


def test_every_train_py_command_in_the_readme_is_a_valid_recipe():
    commands = _readme_train_commands()
    assert len(commands) >= 8 and ["--recipe", "best"] in [c[:2] for c in commands], commands  # the best recipe
    for argv in (c for c in commands if "--help" not in c):
        train.check_flags(train.build_parser().parse_args(argv), Path("runs") / "vit_mnist.pth")


def test_the_readme_best_recipe_is_hf_best_mnist_recipe_and_flags_override_a_recipe():
    best = next(c for c in _readme_train_commands() if "--recipe" in c)
    recipe = train.new_recipe(train.build_parser().parse_args(best))
    assert all(recipe[key] == value for key, value in hf.BEST_MNIST_RECIPE.items() if key != "config")
    shorter = train.new_recipe(train.build_parser().parse_args(["--recipe", "best", "--epochs", "20"]))
    assert shorter == {**recipe, "epochs": 20}, "a flag given overrides the recipe's value, and only that one"


@pytest.mark.parametrize("argv", [["--epoch", "3"], ["--stop", "1"], ["--recipe", "fastest"]])
def test_abbreviated_flags_and_unknown_recipes_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and argv[0] in err
