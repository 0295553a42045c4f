"""The training engine: a model learns, results are plain floats that round-trip through JSON and pickle, and
checkpoints save atomically and refuse missing, foreign or mismatched files with a clear message."""
import json
import os
import pickle

import pytest
import torch
from torch import nn

import helper_functions as hf
import machinery


def test_a_tiny_vit_loss_falls_over_a_few_epochs(toy_vit, toy_loaders):
    hf.set_seeds(0)
    model = toy_vit()
    train_loader, test_loader = toy_loaders()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    results = hf.train(model, train_loader, test_loader, optimizer, nn.CrossEntropyLoss(), epochs=5, progress=False)
    assert results["train_loss"][-1] < 0.5 * results["train_loss"][0]
    assert results["test_acc"][-1] > 0.9


def test_train_returns_one_plain_float_per_epoch_for_each_metric(toy_vit, toy_loaders):
    model = toy_vit()
    train_loader, test_loader = toy_loaders(64)
    results = hf.train(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1),
                       nn.CrossEntropyLoss(), epochs=2, progress=False)
    assert list(results) == ["train_loss", "train_acc", "test_loss", "test_acc"]
    assert all(len(v) == 2 and all(type(x) is float for x in v) for v in results.values())
    assert all(0.0 <= acc <= 1.0 for acc in results["train_acc"] + results["test_acc"])


def test_scheduler_is_stepped_once_per_batch(toy_vit, toy_loaders):
    model = toy_vit()
    train_loader, test_loader = toy_loaders(64)  # 2 batches of 32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    hf.train(model, train_loader, test_loader, optimizer, nn.CrossEntropyLoss(), epochs=3, scheduler=scheduler,
             progress=False)
    assert scheduler.last_epoch == 3 * len(train_loader)


def test_a_diverging_loss_stops_training_with_the_usual_causes(toy_vit, toy_loaders):
    model = toy_vit()
    train_loader, test_loader = toy_loaders(64)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    expected = r"epoch 1: the training loss became nan at batch 1 of 2; .*learning rate"
    with pytest.raises(FloatingPointError, match=expected):
        hf.train(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1),
                 nn.CrossEntropyLoss(), epochs=1, progress=False)


def test_test_step_does_not_change_the_model_or_track_gradients(toy_vit, toy_loaders):
    model = toy_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, test_loader = toy_loaders(64)
    hf.test_step(model, test_loader, nn.CrossEntropyLoss())
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_save_and_load_model_round_trip_keeps_weights_and_config(tmp_path, toy_vit):
    model = toy_vit()
    path = hf.save_model(model, tmp_path / "tiny.pth", dataset="toy", mean=0.5, std=0.25)
    checkpoint = hf.load_checkpoint(path)
    assert checkpoint["config"] == model.config and checkpoint["dataset"] == "toy" and checkpoint["mean"] == 0.5
    rebuilt = hf.load_model(path)
    other = hf.load_model(path, toy_vit())
    x = torch.randn(3, 1, 4, 4)
    model.eval(), rebuilt.eval(), other.eval()
    assert torch.equal(model(x), rebuilt(x)) and torch.equal(model(x), other(x))


def test_save_is_atomic_a_failed_write_leaves_no_file(tmp_path, monkeypatch, toy_vit):
    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        hf.save_model(toy_vit(), tmp_path / "tiny.pth")
    assert list(tmp_path.iterdir()) == [], "neither the checkpoint nor a temporary file is left"


def test_loading_a_missing_file_says_how_to_get_one(tmp_path, toy_vit):
    with pytest.raises(FileNotFoundError, match="no model file at .*missing.pth; train one first"):
        hf.load_model(tmp_path / "missing.pth", toy_vit())


def test_loading_a_foreign_state_dict_is_refused_with_a_pointer(tmp_path, toy_vit):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not written by helper_functions.save_model"):
        hf.load_model(tmp_path / "foreign.pth", toy_vit())


def test_loading_a_corrupt_file_is_refused(tmp_path, toy_vit):
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        hf.load_model(tmp_path / "garbage.pth", toy_vit())


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_a_checkpoint_with_pickled_code_does_not_run_it(tmp_path, capsys, toy_vit):
    torch.save({"format": machinery.CHECKPOINT_FORMAT, "state_dict": {}, "evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        hf.load_model(tmp_path / "evil.pth", toy_vit())
    assert "this must never run" not in capsys.readouterr().out


def test_loading_weights_of_another_shape_names_the_missing_keys_and_the_shapes(tmp_path, tiny_vit):
    hf.save_model(tiny_vit(), tmp_path / "p7.pth")
    with pytest.raises(ValueError) as error:
        hf.load_model(tmp_path / "p7.pth", tiny_vit(patch_size=4, num_layers=2))
    message = str(error.value)
    assert "missing keys: ['encoder.1.ln_1.bias'" in message
    assert ("shape mismatch patch_embedding.projection.weight: checkpoint (16, 1, 7, 7) vs model (16, 1, 4, 4)"
            in message)
    assert "shape mismatch position_embedding: checkpoint (1, 17, 16) vs model (1, 50, 16)" in message


def test_results_round_trip_through_json_and_pickle(tmp_path, history):
    results = history
    path = machinery.save_results(results, tmp_path / "run")
    assert path.suffix == ".json" and json.loads(path.read_text()) == results
    assert hf.load_results(path) == results
    with open(path.with_suffix(".pkl"), "rb") as f:
        assert pickle.load(f) == results  # what pd.read_pickle(...) reads in the seed's usage
    assert hf.load_results(path.with_suffix(".pkl")) == results


def test_results_pickle_with_code_is_refused(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        hf.load_results(tmp_path / "evil.pkl")


def test_plot_loss_curves_draws_from_a_dict_or_a_saved_file_without_a_display(tmp_path, history):
    results = history
    path = machinery.save_results(results, tmp_path / "run")
    for source in (results, path, path.with_suffix(".pkl"), str(path)):
        fig = hf.plot_loss_curves(source)
        loss_ax, acc_ax = fig.axes
        assert [line.get_label() for line in loss_ax.lines] == ["train", "test"]
        assert list(acc_ax.lines[1].get_ydata()) == results["test_acc"]


def test_save_run_writes_weights_results_and_curves(tmp_path, toy_vit, history):
    paths = hf.save_run(toy_vit(), history, tmp_path, name="tiny", dataset="toy")
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.pth", "tiny.json", "tiny.pkl", "tiny_loss_curves.png"}
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_continues_a_history_it_is_given_and_numbers_epochs_from_it(toy_vit, toy_loaders):
    model = toy_vit()
    train_loader, test_loader = toy_loaders(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    history = hf.train(model, train_loader, test_loader, optimizer, nn.CrossEntropyLoss(), epochs=2, progress=False)
    same = hf.train(model, train_loader, test_loader, optimizer, nn.CrossEntropyLoss(), epochs=3, results=history,
                    progress=False, on_epoch_end=lambda epoch, results: seen.append(epoch))
    assert same is history and seen == [3]  # epoch 3 only: 1 and 2 were in the history
    assert all(len(values) == 3 for values in history.values())
    with pytest.raises(ValueError, match="above the 3 epochs already in results"):
        hf.train(model, train_loader, test_loader, optimizer, nn.CrossEntropyLoss(), epochs=3, results=history,
                 progress=False)


def test_train_applies_augment_to_every_training_batch_and_never_to_the_evaluation(toy_vit, toy_loaders):
    model = toy_vit()
    train_loader, test_loader = toy_loaders(64)  # 2 training batches
    augmented = []

    def augment(images):
        augmented.append(images.shape[0])
        return images.flip(-1)

    hf.train(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
             epochs=2, augment=augment, progress=False)
    assert augmented == [32, 32, 32, 32]


def test_training_setup_builds_its_model_on_its_device_with_fused_adamw(tiny_sizes):
    setup = hf.TrainingSetup(subset=64, epochs=1, warmup_epochs=0, device="cpu", **tiny_sizes)
    assert setup.optimizer.defaults["fused"] is True
    assert all(p.device.type == "cpu" for p in setup.model.parameters())
    assert setup.augment is hf.random_affine


def test_compile_is_used_as_asked_or_by_default_only_for_long_runs():
    assert machinery.use_compile(True, 10) and not machinery.use_compile(False, 10 * machinery.COMPILE_FROM_STEPS)
    assert not machinery.use_compile(None, machinery.COMPILE_FROM_STEPS - 1)
    assert machinery.use_compile(None, machinery.COMPILE_FROM_STEPS)


def test_progress_bars_do_not_change_the_training(tiny_sizes):
    # tqdm.auto calls iter() on what it wraps when it is built; wrapping a shuffling DataLoader directly would draw
    # one more order from its generator, so a run with progress bars would train on another order than one without
    losses = []
    for progress in (False, True):
        setup = hf.TrainingSetup(subset=256, epochs=2, warmup_epochs=0, batch_size=32, **tiny_sizes)
        losses.append(setup.train(progress=progress)["train_loss"])
    assert losses[0] == losses[1]
