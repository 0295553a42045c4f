"""The validation split: 5,000 training digits held out by one fixed, seeded permutation; every epoch is measured on
them, and the test set is read once, at the end. A resumed run keeps its split; val_split=0 is the old behaviour."""
import json

import pytest
import torch

import helper_functions as hf
import train
from conftest import TINY_RUN as _TINY_RUN

TINY_RUN = [*_TINY_RUN, "--subset", "128", "--no-augment"]  # the shared flags, on half the digits, unaugmented


def test_the_validation_and_training_parts_are_disjoint_and_cover_the_training_set():
    train_idx, val_idx = hf.validation_indices(60_000, 5_000)
    assert (len(train_idx), len(val_idx)) == (55_000, 5_000)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(60_000))


def test_the_split_is_the_same_whatever_the_global_random_state():
    # Its own generator: the same digits in every run, whatever its --seed, and in every torchrun process
    torch.manual_seed(1)
    first = hf.validation_indices(60_000, 5_000)
    torch.manual_seed(2)
    torch.rand(10)
    second = hf.validation_indices(60_000, 5_000)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    state = torch.get_rng_state()
    hf.validation_indices(60_000, 5_000)
    assert torch.equal(state, torch.get_rng_state()), "the split draws nothing from the global generator"


def test_validation_split_returns_the_examples_at_those_indices():
    data = torch.utils.data.TensorDataset(torch.arange(100).float(), torch.arange(100) % 10)
    train_part, val_part = hf.validation_split(data, 20)
    train_idx, val_idx = hf.validation_indices(100, 20)
    assert isinstance(val_part, torch.utils.data.TensorDataset)
    assert torch.equal(val_part.tensors[0], val_idx.float()) and torch.equal(train_part.tensors[0], train_idx.float())
    assert hf.validation_split(data, 0) == (data, None), "val_split=0 holds out nothing"


@pytest.mark.parametrize("bad", [-1, 100, 2.5, True])
def test_a_val_split_that_cannot_work_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match="val_split"):
        hf.validation_indices(100, bad)


def test_training_setup_holds_out_the_validation_digits_and_val_split_0_keeps_all_of_them(tiny_sizes):
    setup = hf.TrainingSetup(val_split=5000, **tiny_sizes)
    assert (len(setup.train_data), len(setup.val_data), len(setup.test_data)) == (55_000, 5_000, 10_000)
    full, _ = hf.get_tensor_datasets("mnist")
    assert torch.equal(setup.val_data.tensors[0], full.tensors[0][setup.val_indices])
    old = hf.TrainingSetup(val_split=0, **tiny_sizes)
    assert old.val_data is None and old.val_loader is None
    assert torch.equal(old.train_data.tensors[0], full.tensors[0]), "no split: all 60,000, in their order"


def test_val_split_0_measures_every_epoch_on_the_test_set_as_before(tiny_sizes):
    results = hf.TrainingSetup(val_split=0, subset=64, epochs=1, warmup_epochs=0, **tiny_sizes).train(progress=False)
    assert set(results) == {"train_loss", "train_acc", "test_loss", "test_acc"} and len(results["test_acc"]) == 1


def test_train_py_reads_the_test_set_once_at_the_end_and_validates_every_epoch(tmp_path, monkeypatch):
    reads, setups = [], []
    original = hf.test_step

    def counting_test_step(model, dataloader, *args, **kwargs):
        reads.append(dataloader.dataset)
        return original(model, dataloader, *args, **kwargs)

    class RecordingSetup(hf.TrainingSetup):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            setups.append(self)

    monkeypatch.setattr(hf, "test_step", counting_test_step)
    monkeypatch.setattr(hf, "TrainingSetup", RecordingSetup)
    results = train.main(["--epochs", "3", "--out-dir", str(tmp_path), *TINY_RUN])
    setup = setups[0]
    assert sum(d is setup.test_data for d in reads) == 1, "the test set is read once"
    assert sum(d is setup.val_data for d in reads) == 3, "the validation set after every epoch"
    assert len(results["val_acc"]) == 3 and isinstance(results["final_test_acc"], float)
    saved = json.loads((tmp_path / "vit_mnist.json").read_text())
    assert saved["final_test_acc"] == results["final_test_acc"] and saved["val_acc"] == results["val_acc"]


def test_a_resumed_run_holds_out_the_digits_its_checkpoint_saved(tiny_sizes):
    # Whatever computes splits today, the indices a checkpoint saved are the ones held out
    saved = torch.arange(0, 200, 2)  # not the split validation_indices would draw
    setup = hf.TrainingSetup(val_split=100, val_indices=saved, **tiny_sizes)
    assert torch.equal(setup.val_indices, saved) and len(setup.train_data) == 59_900
    full, _ = hf.get_tensor_datasets("mnist")
    assert torch.equal(setup.val_data.tensors[0], full.tensors[0][saved])
    with pytest.raises(ValueError, match="val_indices"):
        hf.TrainingSetup(val_split=5000, val_indices=saved, **tiny_sizes)


def test_train_py_resume_continues_with_the_saved_split(tmp_path, monkeypatch):
    train.main(["--epochs", "2", "--stop-after", "1", "--out-dir", str(tmp_path), *TINY_RUN])
    checkpoint = hf.load_checkpoint(tmp_path / "vit_mnist.pth")
    assert len(checkpoint["val_indices"]) == hf.MNIST_RECIPE["val_split"]
    used = []
    original = hf.TrainingSetup.__init__

    def recording_init(self, *args, **kwargs):
        used.append(kwargs.get("val_indices"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(hf.TrainingSetup, "__init__", recording_init)
    resumed = train.main(["--resume", "--out-dir", str(tmp_path), "--no-progress"])
    assert torch.equal(used[0], checkpoint["val_indices"]), "--resume passes the saved split to TrainingSetup"
    assert len(resumed["val_acc"]) == 2 and "final_test_acc" in resumed


@pytest.mark.parametrize("argv, message", [
    (["--val-split", "-1"], "must be a whole number >= 0"),
    (["--val-split", "60000"], "--val-split 60000 leaves no training images"),
])
def test_a_bad_val_split_flag_stops_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_results_saved_before_final_test_acc_had_its_name_load_in_todays_format(tmp_path):
    old = {"train_loss": [1.0, 0.5], "train_acc": [0.5, 0.8], "val_loss": [0.9, 0.4], "val_acc": [0.6, 0.9],
           "test_loss": 0.3, "test_acc": 0.95}  # the test set, read once, under the per-epoch names
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = hf.load_results(tmp_path / "old.json")
    assert loaded["final_test_acc"] == 0.95 and loaded["final_test_loss"] == 0.3 and "test_acc" not in loaded
    _, acc_ax = hf.plot_loss_curves(old).axes
    assert list(acc_ax.lines[-1].get_ydata()) == [0.95], "drawn as the test set read once, at the end"


def test_old_results_with_a_test_set_per_epoch_still_load_and_plot(tmp_path):
    old = {"train_loss": [1.0, 0.5], "train_acc": [0.5, 0.8], "test_loss": [0.9, 0.4], "test_acc": [0.6, 0.9]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert hf.load_results(tmp_path / "old.json") == old
    _, acc_ax = hf.plot_loss_curves(tmp_path / "old.json").axes
    assert [list(line.get_ydata()) for line in acc_ax.lines] == [old["train_acc"], old["test_acc"]]


def test_fine_tune_with_a_validation_set_reads_the_test_set_once(tiny_vit):
    data = hf.get_tensor_datasets("mnist", limit=60)[0]
    train_part, val_part = hf.validation_split(data, 20)
    model = tiny_vit()
    results = hf.fine_tune(model, train_part, data, epochs=2, batch_size=20, warmup_epochs=0, device="cpu",
                           progress=False, val_data=val_part)
    assert len(results["val_acc"]) == 2 and isinstance(results["final_test_acc"], float)
    train_images, _ = hf.validation_split(hf.get_mnist()[0], 5000)  # a Subset of the torchvision dataset
    labelled = hf.balanced_subset(train_images, 20)
    originals = {train_images.indices[i] for i in labelled.indices}
    assert not originals & set(hf.validation_indices(60_000, 5000)[1].tolist()), "no labelled digit is held out"
