"""benchmarks/throughput.py: its FLOP count, that its models do the same work as ours, and its report.

The timings themselves are not tested (they depend on the machine); a two-step run checks that the benchmark works
end to end and writes a well-formed table, JSON file and chart.
"""
import json

import pytest
import torch

import helper_functions as hf
from benchmarks import throughput as tp

# The MNIST configuration as notebook 07 first chose it, written out so these tests do not move when it is re-tuned.
SMALL = dict(image_size=28, in_channels=1, patch_size=7, num_layers=6, num_heads=4, embedding_dim=64, mlp_size=128,
             dropout=0.0, embedding_dropout=0.0, num_classes=10)
needs_vit_pytorch = pytest.mark.skipif(not tp.vit_pytorch_available(),
                                       reason=f"vit-pytorch is not installed ({tp.VIT_PYTORCH_FIX})")


def test_flop_count_matches_hand_computation():
    # N = (28 / 7)^2 = 16 patches of 7 * 7 * 1 = 49 pixels, T = 17 tokens, D = 64, M = 128, L = 6.
    patch_embedding = 2 * 16 * 49 * 64  # 100,352
    per_layer = (2 * 17 * 64 * 192  # q, k, v: 417,792
                 + 2 * 17 * 17 * 64  # q k^T, all heads: 36,992
                 + 2 * 17 * 17 * 64  # softmax(...) v: 36,992
                 + 2 * 17 * 64 * 64  # W^O: 139,264
                 + 2 * 2 * 17 * 64 * 128)  # the MLP's two dense layers: 557,056
    head = 2 * 64 * 10
    flops = tp.vit_flops(**SMALL)
    assert flops["forward"] == patch_embedding + 6 * per_layer + head == 7_230_208
    assert flops["train"] == 3 * flops["forward"]


def test_flop_count_of_vit_b_16_is_the_published_17_6_billion_multiply_adds():
    # ViT-B/16 at 224 px: 17.6 G multiply-adds per image (DeiT, Touvron et al. 2021, Table 1 "FLOPs" column).
    flops = tp.vit_flops(**tp.full_config(hf.VIT_CONFIGS["vit_b_16"]))
    assert round(flops["forward"] / 2 / 1e9, 1) == 17.6


def test_torchvision_model_is_configured_like_ours_for_one_channel_images():
    hf.set_seeds(0)
    ours, theirs = tp.build_ours(SMALL).eval(), tp.build_torchvision(SMALL).eval()
    hf.load_torchvision_vit_weights(ours, theirs)  # every weight has a counterpart of the same shape...
    images = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():  # ...and with the same weights both compute the same function
        assert torch.allclose(ours(images), theirs(images), atol=1e-5)


@needs_vit_pytorch
def test_vit_pytorch_model_differs_from_ours_only_as_documented():
    ours, theirs = tp.build_ours(SMALL), tp.build_vit_pytorch(SMALL)
    count = hf.count_parameters
    patch_pixels, d, layers = 49, 64, 6
    extra_layer_norms = 2 * patch_pixels + 2 * d  # LayerNorm(patch_dim) before and LayerNorm(dim) after the projection
    no_qkv_bias = layers * 3 * d
    assert count(theirs) == count(ours) + extra_layer_norms - no_qkv_bias
    assert theirs(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_quick_benchmark_writes_table_json_and_chart(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    report = tp.main(["--quick", "--models", "ours,torchvision", "--repeats", "1", "--steps", "1", "--batch-size",
                      "16", "--threads", "1", "--matmul-size", "256", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert saved["configs"].keys() == {"vit_mnist"}
    assert saved["machine"]["cpu"].endswith(torch.backends.cpu.get_cpu_capability()), "the processor a figure is from"
    result = saved["configs"]["vit_mnist"]
    assert len(result["matmul_flops_per_s"]) == 1 and result["matmul_median_flops_per_s"] > 0
    assert result["config"] == hf.VIT_CONFIGS["vit_mnist"]  # read at run time
    assert result["flops_per_image"] == tp.vit_flops(**tp.full_config(hf.VIT_CONFIGS["vit_mnist"]))
    for model in ("ours", "torchvision"):
        entry = result["models"][model]
        assert len(entry["train_images_per_s"]) == len(entry["infer_images_per_s"]) == 1
        assert entry["train_median"] > 0 and entry["infer_median"] > 0
        assert entry["mfu_train"] == pytest.approx(
            result["flops_per_image"]["train"] * entry["train_median"] / result["matmul_median_flops_per_s"])
    assert set(result["ratios"]) == set(result["cpu_ratios"]) == {"ours/torchvision"}
    assert result["ratios"]["ours/torchvision"]["train"] == pytest.approx(
        result["models"]["ours"]["train_median"] / result["models"]["torchvision"]["train_median"])
    table = capsys.readouterr().out
    assert "ours/torchvision" in table and "train MFU" in table
    assert report["configs"].keys() == saved["configs"].keys() and saved["machine"]["threads"] == 1
    assert torch.get_num_threads() == threads_before  # --threads does not leak into the caller


@needs_vit_pytorch
def test_quick_benchmark_runs_all_three_models(tmp_path):
    report = tp.main(["--quick", "--repeats", "1", "--steps", "2", "--batch-size", "16", "--threads", "1",
                      "--matmul-size", "256", "--out", str(tmp_path)])
    assert set(report["configs"]["vit_mnist"]["ratios"]) == {"ours/torchvision", "ours/vit-pytorch"}
    assert report["skipped"] == {}


def test_unknown_configuration_or_model_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        tp.parse_args(["--configs", "vit_tiny_nonexistent"])
    assert f"unknown configuration 'vit_tiny_nonexistent'; choose from {sorted(hf.VIT_CONFIGS)}" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.parse_args(["--models", "timm"])
    assert f"unknown model 'timm'; choose from {', '.join(tp.MODELS)}" in capsys.readouterr().err


def test_compile_flag_takes_model_names_or_means_all(capsys):
    assert tp.parse_args([]).compile == ()
    assert tp.parse_args(["--compile"]).compile == tp.MODELS
    assert tp.parse_args(["--compile", "ours,vit-pytorch"]).compile == ("ours", "vit-pytorch")
    with pytest.raises(SystemExit):
        tp.parse_args(["--compile", "ours,timm"])
    assert "unknown model 'timm'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.parse_args(["--profile", "-1"])
    assert "--profile" in capsys.readouterr().err


def test_profile_splits_each_models_training_step_by_operator(tmp_path, capsys):
    report = tp.main(["--quick", "--models", "ours,torchvision", "--repeats", "1", "--steps", "1", "--batch-size",
                      "16", "--threads", "1", "--matmul-size", "256", "--profile", "2", "--out", str(tmp_path)])
    profile = report["configs"]["vit_mnist"]["profile_ms_per_train_step"]
    assert profile.keys() == {"ours", "torchvision"}
    for per_op in profile.values():
        assert "aten::addmm" in per_op and per_op["aten::addmm"] > 0, "the dense layers' matrix multiplies"
        assert "(outside operators)" in per_op and all(ms >= 0 for key, ms in per_op.items() if key[0] != "(")
    table = capsys.readouterr().out.split("where each model's training step goes")[1]
    # which operators make the top rows depends on the timings (ours and torchvision differ by many), so only that
    # the total and some of the profiled operators are printed
    assert "(total)" in table and any(op[:52] in table for op in profile["ours"])
    assert json.loads((tmp_path / "throughput.json").read_text())["configs"]["vit_mnist"]["profile_ms_per_train_step"]
