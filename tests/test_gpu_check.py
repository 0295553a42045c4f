"""benchmarks/gpu_check.py without a GPU: one line saying so, a tiny CPU pass of the same code, exit 0, one JSON."""
import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU pass runs only where there is no CUDA GPU")
def test_without_cuda_it_says_so_in_one_line_and_runs_a_tiny_cpu_pass(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("gpu_check.py: no CUDA GPU here") and len(printed) == 2  # the line, then the JSON
    assert json.loads(printed[1]) == json.loads(out.read_text()) == json.loads(json.dumps(report))
    parts = report["parts"]
    assert report["cuda"] is False and not [name for name, part in parts.items() if "error" in part]
    for name in ("notebook07_plain", "notebook07_amp"):
        assert parts[name]["epochs"] == 2 and 0 <= parts[name]["test_acc"] <= 1
    assert parts["torchrun_one_process"]["backend"] == "gloo" and parts["torchrun_one_process"]["world_size"] == 1
    speeds = parts["vit_b16_training_images_per_second"]
    assert speeds["float32"]["ours_images_per_second"] > 0 and speeds["amp"]["ours_over_torchvision"] > 0
    assert parts["best_recipe_epochs"]["epochs"] == 1
    assert "skipped" in parts["notebook07_compile"] and "skipped" in parts["notebook07_amp+compile"]


def test_parts_past_the_budget_are_skipped_and_said_so(tmp_path):
    report = gpu_check.main(["--budget-s", "0", "--out", str(tmp_path / "g.json")])
    assert report["parts"] and all("skipped" in part for part in report["parts"].values())
