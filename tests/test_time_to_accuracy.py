"""benchmarks/time_to_accuracy.py: the fields of its JSON report, its plot, the idle timing, merging reports, and that
it never replaces results.

The times and accuracies themselves are not tested (they depend on the machine and take minutes): a tiny recipe
(a few hundred digits, one layer, two epochs) runs the whole benchmark end to end.
"""
import json

import pytest
import torch

import train
from benchmarks import time_to_accuracy as tta

TINY_BASE = ["--recipe", "notebook07", "--subset", "256", "--epochs", "2", "--warmup-epochs", "0.5"]
TINY = TINY_BASE + ["--seeds", "0,1"]
TINY_BEST = ["--recipe", "best", "--subset", "256", "--epochs", "2", "--warmup-epochs", "0.5"]


def test_reached_is_the_first_time_a_target_is_met_and_none_if_never():
    assert tta.reached([1.0, 2.0, 3.0], [0.98, 0.991, 0.989], 0.99) == 2.0
    assert tta.reached([1.0, 2.0], [0.98, 0.985], 0.99) is None


def test_a_tiny_recipe_writes_a_report_with_every_field_and_a_plot(tmp_path, monkeypatch):
    out = tmp_path / "tta.json"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    report = tta.main(TINY + ["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["command"].startswith(f"TORCHINDUCTOR_CACHE_DIR={tmp_path / 'inductor'} python benchmarks/")
    assert saved["cpu"] and "compile_cache_empty_at_start" not in saved, "only a compiled run says it"
    assert saved["recipe"]["subset"] == 256 and saved["recipe"]["epochs"] == 2 and saved["threads"] >= 1
    assert [run["seed"] for run in saved["runs"]] == [0, 1]
    for run in saved["runs"]:
        assert run["curve"] == "val_acc" and "test_acc" not in run  # per epoch: validation only
        assert len(run["minutes"]) == len(run["val_acc"]) == len(run["epoch_minutes"]) == 2
        assert run["minutes"] == sorted(run["minutes"]) and run["training_minutes"] == run["minutes"][-1]
        assert run["final_val_acc"] == run["val_acc"][-1]  # the last epoch, never the best
        assert 0 <= run["final_test_acc"] <= 1 and run["matmul_gflops"] > 0
        assert set(run["reached"]) == {"0.99", "0.995"}
    summary = saved["summary"]
    finals = [run["final_test_acc"] for run in saved["runs"]]
    assert summary["seeds"] == 2 and summary["final_test_acc_min"] == min(finals)
    assert summary["final_test_acc_mean"] == pytest.approx(sum(finals) / 2, abs=1e-5)
    assert saved["goal_met"] == {"seeds": False, "mean": False, "each": False, "minutes": None}  # no timing run
    assert "minutes_2_idle_cores" not in saved
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_best_recipe_reads_the_test_set_with_and_without_tta(tmp_path):
    saved = tta.main(TINY_BEST + ["--seeds", "0", "--out", str(tmp_path / "best.json")])
    run = saved["runs"][0]
    assert saved["recipe"]["tta"] is True
    assert {"final_test_acc", "final_test_acc_without_tta", "final_val_acc_tta"} <= set(run)
    without = run["final_test_acc_without_tta"]
    assert saved["summary"]["final_test_acc_without_tta_mean"] == pytest.approx(without, abs=1e-5)


def test_idle_timing_times_one_seed_on_2_threads_with_the_matmul_rate(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tta.main(TINY + ["--idle-timing", "--out", str(tmp_path / "x.json")])  # seeds 0,1: two runs
    assert stop.value.code == 2 and "one seed" in capsys.readouterr().err
    threads_before = torch.get_num_threads()
    saved = tta.main(TINY_BASE + ["--seeds", "0", "--idle-timing", "--out", str(tmp_path / "t.json")])
    assert saved["threads"] == 2 and saved["idle_timing"] is True
    assert torch.get_num_threads() == threads_before, "the timing's 2 threads do not leak into the caller"
    assert saved["minutes_2_idle_cores"] == saved["runs"][0]["training_minutes"] > 0
    assert saved["matmul_gflops"] > 0 and len(saved["load_average_at_start"]) == 3


def test_merge_folds_seeds_and_the_timing_run_into_one_report(tmp_path, capsys):
    paths = {}
    for name, extra in {"a": ["--seeds", "0,1"], "b": ["--seeds", "2"], "t": ["--seeds", "0", "--idle-timing"]}.items():
        paths[name] = tmp_path / f"{name}.json"
        tta.main(TINY_BASE + extra + ["--out", str(paths[name])])
    merged = tta.main(["--merge", *map(str, paths.values()), "--out", str(tmp_path / "m.json")])
    timed = json.loads(paths["t"].read_text())
    assert [run["seed"] for run in merged["runs"]] == [0, 1, 2] and merged["summary"]["seeds"] == 3
    assert merged["minutes_2_idle_cores"] == timed["minutes_2_idle_cores"]
    assert merged["matmul_gflops"] == timed["matmul_gflops"] and merged["timing_run"] == timed["runs"][0]
    assert merged["goal_met"]["seeds"] is True and merged["goal_met"]["minutes"] is True
    with pytest.raises(SystemExit) as stop:  # seed 0 twice
        tta.main(["--merge", str(paths["a"]), str(paths["a"]), "--out", str(tmp_path / "m2.json")])
    assert stop.value.code == 2 and "seed appears twice" in capsys.readouterr().err


def test_merge_counts_timed_runs_as_seeds_and_quotes_the_timing_it_is_told(tmp_path, capsys):
    paths = {}
    for name, seed in {"t0": "0", "t1": "1", "b": "2"}.items():  # two timed runs (on different days), one untimed
        paths[name] = tmp_path / f"{name}.json"
        tta.main(TINY_BASE + ["--seeds", seed, "--out", str(paths[name])] + (["--idle-timing"] if name != "b" else []))
    with pytest.raises(SystemExit) as stop:  # which of the two times to quote is not guessed
        tta.main(["--merge", *map(str, paths.values()), "--out", str(tmp_path / "m.json")])
    assert stop.value.code == 2 and "--timing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # --timing alone merges nothing
        tta.main(["--timing", str(paths["t1"]), "--out", str(tmp_path / "m.json")])
    assert stop.value.code == 2 and "use it with --merge" in capsys.readouterr().err
    spelled_otherwise = tmp_path / "." / "t1.json"  # the same file, named another way
    merged = tta.main(["--merge", *map(str, paths.values()), "--timing", str(spelled_otherwise),
                       "--out", str(tmp_path / "m.json")])
    timed = json.loads(paths["t1"].read_text())
    assert [run["seed"] for run in merged["runs"]] == [0, 1, 2] and merged["summary"]["seeds"] == 3
    assert merged["minutes_2_idle_cores"] == timed["minutes_2_idle_cores"] and merged["timing_run"] == timed["runs"][0]
    assert merged["matmul_gflops"] == timed["matmul_gflops"]


def test_a_compiled_report_says_whether_torch_compiles_cache_was_empty(tmp_path, monkeypatch):
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    assert tta.compile_cache_was_empty(), "no folder yet: a first run compiles everything"
    cache.mkdir(exist_ok=True)  # (torch makes the folder when asked where it is)
    assert tta.compile_cache_was_empty()
    (cache / "fxgraph").mkdir()
    assert not tta.compile_cache_was_empty(), "kernels on disk: a later run reuses them"


def test_train_py_recipe_best_reproduces_the_benchmarks_run_of_a_seed(tmp_path):
    # the same engine, seed and threads: train.py --recipe best ends where the benchmark's run of that seed ends
    report = tta.main(TINY_BEST + ["--seeds", "0", "--out", str(tmp_path / "t.json")])
    run = train.main(TINY_BEST + ["--seed", "0", "--no-compile", "--no-progress", "--out-dir", str(tmp_path / "r")])
    assert run["val_acc"] == report["runs"][0]["val_acc"] and run["train_loss"] == report["runs"][0]["train_loss"]
    assert run["final_test_acc"] == report["runs"][0]["final_test_acc"], "the test set read the same way (with TTA)"


def test_an_existing_report_is_never_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "tta.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        tta.main(TINY + ["--out", str(out)])
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"


@pytest.mark.parametrize("merging", [False, True])
def test_an_existing_plot_beside_out_is_never_replaced_without_overwrite(tmp_path, capsys, merging):
    plot = tmp_path / "tta.png"
    plot.write_bytes(b"a plot from an earlier run")
    argv = ["--merge", str(tmp_path / "a.json")] if merging else TINY
    with pytest.raises(SystemExit) as stop:
        tta.main(argv + ["--out", str(tmp_path / "tta.json")])
    assert stop.value.code == 2 and "tta.png already exists" in capsys.readouterr().err
    assert plot.read_bytes() == b"a plot from an earlier run" and not (tmp_path / "tta.json").exists()


def test_a_recipe_that_cannot_work_is_one_line_naming_the_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tta.main(["--epochs", "2", "--warmup-epochs", "5", "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and "warmup_epochs must be" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
