"""Beyond one process: train.py, train_transferlearning.py and the engine under torchrun (2 CPU processes, gloo), a
run killed mid-way and resumed, bfloat16 autocast and torch.compile."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import helper_functions as hf
import machinery
import train
from conftest import REPO
from ddp_worker import TINY as WORKER_RECIPE

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_two_processes_keep_identical_weights_and_share_the_data_and_the_metrics(tmp_path):
    _run([*TORCHRUN, "-m", "tests.ddp_worker", str(tmp_path)])
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "DDP keeps the copies identical"
    assert reports[0]["world"] == 2 and reports[0]["results"] == reports[1]["results"], "metrics reduced across ranks"
    shards = [set(report["test_indices"]) for report in reports]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(WORKER_RECIPE["subset"]))
    losses = reports[0]["results"]["train_loss"]
    assert losses[-1] < losses[0], losses

    # The reduced test accuracy is the trained model's accuracy on the whole test subset, counted in one process
    setup = hf.TrainingSetup(**WORKER_RECIPE)
    assert not torch.equal(setup.model.position_embedding, weights[0]["position_embedding"]), "the weights were trained"
    setup.model.load_state_dict(weights[0])
    _, accuracy = hf.test_step(setup.model, setup.test_loader, setup.loss_fn)
    assert accuracy == reports[0]["results"]["test_acc"][-1]


def test_train_py_under_torchrun_trains_writes_once_and_resumes_exactly(tmp_path, capsys, tiny_run):
    train_py = str(REPO / "train.py")
    straight = _run([*TORCHRUN, train_py, "--epochs", "3", "--out-dir", str(tmp_path / "a"), *tiny_run]).stdout
    assert "2 processes (gloo)" in straight
    assert [line.split(":")[0] for line in straight.splitlines() if line.startswith("epoch")] == \
        ["epoch 1/3", "epoch 2/3", "epoch 3/3"], "only process 0 prints"
    run = hf.load_checkpoint(tmp_path / "a" / "vit_mnist.pth")
    assert run["processes"] == 2 and run["epoch"] == 3
    assert run["history"]["train_loss"][-1] < run["history"]["train_loss"][0]
    digest = machinery.weights_digest(hf.load_model(tmp_path / "a" / "vit_mnist.pth"))
    assert f"weights identical in all 2 processes (sha256 {digest[:16]})" in straight, "the saved weights are theirs"

    # Stopped after epoch 1 and resumed, still with 2 processes: the same weights, bit for bit
    _run([*TORCHRUN, train_py, "--epochs", "3", "--stop-after", "1", "--out-dir", str(tmp_path / "b"), *tiny_run])
    with pytest.raises(SystemExit):  # one process cannot continue two processes' schedule and random states
        train.main(["--resume", "--out-dir", str(tmp_path / "b")])
    assert "trained by 2 process(es) and this is 1" in capsys.readouterr().err
    _run([*TORCHRUN, train_py, "--resume", "--out-dir", str(tmp_path / "b"), "--no-progress"])
    resumed = hf.load_checkpoint(tmp_path / "b" / "vit_mnist.pth")
    assert resumed["history"] == run["history"]
    assert all(torch.equal(run["state_dict"][k], v) for k, v in resumed["state_dict"].items())


def test_train_transferlearning_py_runs_under_torchrun(tmp_path):
    out = _run([*TORCHRUN, str(REPO / "train_transferlearning.py"), "--scratch", "--epochs", "2", "--num-labels",
                "100", "--batch-size", "10", "--subset", "200", "--no-progress", "--out-dir", str(tmp_path)]).stdout
    assert out.count("Done: validation accuracy") == 1 and "(the test set, read once, at the end)" in out
    assert {p.name for p in tmp_path.iterdir()} == {f"vit_mnist_100_labels_scratch{suffix}" for suffix in
                                                    (".pth", ".json", ".pkl", "_loss_curves.png")}


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, tiny_run):
    # 1. Kill train.py (SIGKILL: no chance to clean up) as soon as its first checkpoint is on disk
    argv = [sys.executable, str(REPO / "train.py"), "--epochs", "8", *tiny_run, "--subset", "1024"]
    path = tmp_path / "killed" / "vit_mnist.pth"
    process = subprocess.Popen([*argv, "--out-dir", str(path.parent)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = hf.load_checkpoint(path)  # the save is atomic: whatever is there is whole
    assert 1 <= saved["epoch"] < 8, "killed mid-run"

    # 2. Resume it, and run the same recipe without interruption
    _run([sys.executable, str(REPO / "train.py"), "--resume", "--out-dir", str(path.parent), "--no-progress"])
    _run([*argv, "--out-dir", str(tmp_path / "straight")])
    resumed, straight = (hf.load_checkpoint(p / "vit_mnist.pth") for p in (path.parent, tmp_path / "straight"))
    assert resumed["epoch"] == straight["epoch"] == 8
    assert resumed["history"] == straight["history"]
    assert all(torch.equal(straight["state_dict"][k], v) for k, v in resumed["state_dict"].items())


def test_amp_runs_the_matrix_multiplies_in_bfloat16_and_still_learns(toy_vit, toy_loaders):
    with machinery.mixed_precision("cpu", enabled=True):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with machinery.mixed_precision("cpu", enabled=False):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    hf.set_seeds(0)
    model = toy_vit()
    train_loader, test_loader = toy_loaders()
    results = hf.train(model, train_loader, test_loader, torch.optim.AdamW(model.parameters(), lr=1e-2),
                       nn.CrossEntropyLoss(), epochs=5, progress=False, amp=True)
    assert results["train_loss"][-1] < 0.5 * results["train_loss"][0]
    assert next(model.parameters()).dtype == torch.float32, "the weights stay float32"


def test_compiled_model_trains_like_the_eager_one_and_saves_the_same_keys(toy_vit):
    hf.set_seeds(0)
    eager = toy_vit()
    compiled_copy = toy_vit()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = machinery.parallelize(compiled_copy, "cpu", compile=True)
    assert machinery.unwrap(compiled) is compiled_copy
    images, labels = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    for model in (eager, compiled):
        model.eval()  # no dropout: the two runs must see the same network
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    assert torch.allclose(compiled(images), eager(images), atol=1e-5)
    assert list(machinery.unwrap(compiled).state_dict()) == list(eager.state_dict()), "no _orig_mod. prefixes"
