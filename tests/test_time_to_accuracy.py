"""benchmarks/time_to_accuracy.py: the fields of its JSON report, its plot, and that it never replaces results.

The times and accuracies themselves are not tested (they depend on the machine and take minutes): a tiny recipe
(a few hundred digits, one layer, two epochs) runs the whole benchmark end to end.
"""
import json

import pytest

from benchmarks import time_to_accuracy as tta

TINY = ["--recipe", "notebook07", "--seeds", "0,1", "--subset", "256", "--epochs", "2", "--warmup-epochs", "0.5"]


def test_reached_is_the_first_time_a_target_is_met_and_none_if_never():
    assert tta.reached([1.0, 2.0, 3.0], [0.98, 0.991, 0.989], 0.99) == 2.0
    assert tta.reached([1.0, 2.0], [0.98, 0.985], 0.99) is None


def test_a_tiny_recipe_writes_a_report_with_every_field_and_a_plot(tmp_path):
    out = tmp_path / "tta.json"
    report = tta.main(TINY + ["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["recipe"]["subset"] == 256 and saved["recipe"]["epochs"] == 2 and saved["threads"] >= 1
    assert [run["seed"] for run in saved["runs"]] == [0, 1]
    for run in saved["runs"]:
        assert len(run["minutes"]) == len(run["test_acc"]) == len(run["val_acc"]) == 2
        assert run["minutes"] == sorted(run["minutes"]) and run["training_minutes"] == run["minutes"][-1]
        assert run["final_test_acc"] == run["test_acc"][-1]  # the last epoch, never the best
        assert set(run["reached"]) == {"0.99", "0.995"}
    summary = saved["summary"]
    finals = [run["final_test_acc"] for run in saved["runs"]]
    assert summary["seeds"] == 2 and summary["final_test_acc_min"] == min(finals)
    assert summary["final_test_acc_mean"] == pytest.approx(sum(finals) / 2, abs=1e-5)
    assert out.with_suffix(".png").stat().st_size > 0


def test_an_existing_report_is_never_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "tta.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        tta.main(TINY + ["--out", str(out)])
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_a_recipe_that_cannot_work_is_one_line_naming_the_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tta.main(["--epochs", "2", "--warmup-epochs", "5", "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and "warmup_epochs must be" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
