"""Shared test setup: draw figures without a display; the constants, tiny models, data and training flags that several
test files use; and which tests are slow (``pytest -m "not slow"`` leaves them out). pytest.ini's ``pythonpath`` puts
the repository's top level on ``sys.path``, so tests import helper_functions, train and the tools directly."""
from pathlib import Path

import matplotlib
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

# Only this pytest process: nbval's notebook kernels are separate processes and keep their inline backend.
matplotlib.use("Agg")

import helper_functions as hf  # noqa: E402  (after the backend is chosen)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# vit_mnist's 28x28 digits, 7x7 patches and 10 classes at a quarter of its width, with 2 heads (not 4) and
# 1 layer (not 6).
TINY_SIZES = dict(num_layers=1, embedding_dim=16, num_heads=2, mlp_size=32)

# train.py's flags for the tiny ViT on 256 digits: an epoch is 4 batches, a second or so.
TINY_RUN = ["--subset", "256", "--batch-size", "64", "--depth", str(TINY_SIZES["num_layers"]),
            "--embedding-dim", str(TINY_SIZES["embedding_dim"]), "--heads", str(TINY_SIZES["num_heads"]),
            "--mlp-size", str(TINY_SIZES["mlp_size"]), "--augment", "--no-progress"]


@pytest.fixture
def mnist_vit():
    """Build a seeded ``vit_mnist``, with any of its settings overridden: ``mnist_vit(num_layers=2)``."""
    def build(seed: int = 0, **overrides) -> hf.ViT:
        hf.set_seeds(seed)
        return hf.vit_from_config("vit_mnist", **overrides)

    return build


@pytest.fixture
def tiny_sizes() -> dict:
    """The tiny ViT's sizes, for the APIs that take them as keywords (``hf.TrainingSetup(**tiny_sizes)``)."""
    return dict(TINY_SIZES)


@pytest.fixture
def tiny_vit(mnist_vit):
    """Build a seeded one-layer ViT for 28x28 digits (no dropout): ``tiny_vit()``, ``tiny_vit(pool="mean")``."""
    def build(seed: int = 0, **overrides) -> hf.ViT:
        return mnist_vit(seed, **{**TINY_SIZES, **overrides})

    return build


@pytest.fixture
def tiny_run() -> list[str]:
    """``TINY_RUN``: train.py's flags for the tiny ViT on 256 digits (a fresh list, free to extend)."""
    return list(TINY_RUN)


@pytest.fixture
def toy_vit():
    """Build a ViT for the toy data below: 4x4 one-channel images in 2x2 patches, 3 classes."""
    def build() -> hf.ViT:
        return hf.ViT(image_size=4, in_channels=1, patch_size=2, num_layers=1, num_heads=2, embedding_dim=8,
                      mlp_size=16, num_classes=3)

    return build


@pytest.fixture
def toy_loaders():
    """Build (train, test) loaders of ``n`` toy images: one Gaussian blob per class in 1x4x4, easy and instant."""
    def build(n: int = 256, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (n,), generator=g)
        images = torch.randn(n, 1, 4, 4, generator=g) * 0.5 + labels.view(-1, 1, 1, 1).float()  # (n, 1, 4, 4)
        data = TensorDataset(images, labels)
        return DataLoader(data, batch_size=32, shuffle=True, generator=g), DataLoader(data, batch_size=64)

    return build


@pytest.fixture
def history() -> dict[str, list[float]]:
    """A made-up two-epoch run history, in the form ``hf.train`` returns."""
    return {"train_loss": [1.5, 0.5], "train_acc": [0.5, 0.9], "test_loss": [1.2, 0.6], "test_acc": [0.6, 0.85]}


# The slow tests, by file and name (every parametrization of a name): `pytest -m "not slow"` leaves them out, and with
# them every notebook (marked by the top-level conftest.py). tests/test_suite.py checks that each entry still names a
# test.
SLOW = {
    # torchrun: two processes, each importing torch
    "test_scaling.py::test_two_processes_keep_identical_weights_and_share_the_data_and_the_metrics",
    "test_scaling.py::test_train_py_under_torchrun_trains_writes_once_and_resumes_exactly",
    "test_scaling.py::test_train_transferlearning_py_runs_under_torchrun",
    # a subprocess that imports torch, or trains
    "test_scaling.py::test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one",
    "test_train.py::test_train_py_trains_writes_its_files_and_resume_continues_exactly",
    "test_reliability.py::test_two_runs_with_one_name_the_second_is_refused_and_ctrl_c_says_what_is_saved",
    "test_reliability.py::test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint",
    "test_predict.py::test_predict_py_prints_the_top_classes",
    "test_predict.py::test_predict_py_without_a_model_says_how_to_train_one_in_one_line",
    "test_predict.py::test_predict_py_with_a_bad_image_names_it_in_one_line",
    "test_transfer.py::test_train_transferlearning_py_writes_train_pys_files_and_a_linear_probe_keeps_the_backbone",
    "test_transfer_data.py::test_a_folder_of_three_shapes_trains_end_to_end_and_saves_three_classes_with_their_names",
    "test_notebook_cells.py::test_every_definition_cell_runs_alone_with_only_the_standard_imports",
    "test_vit_vs_cnn.py::test_notebook_10s_cnn_cell_is_the_helper_source_and_runs_alone_with_standard_imports",
    "test_notebooks_alone.py::test_notebook_runs_alone_from_an_empty_runs_folder",
    "test_notebooks_alone.py::test_in_colab_the_setup_cell_clones_the_repository_and_the_notebook_runs_in_the_clone",
    # a script's main() end to end: data, model, training, files
    "test_train.py::test_the_readme_first_command_trains_one_epoch_and_can_be_run_twice",
    "test_validation_split.py::test_train_py_reads_the_test_set_once_at_the_end_and_validates_every_epoch",
    "test_validation_split.py::test_train_py_resume_continues_with_the_saved_split",
    "test_reliability.py::test_a_new_run_refuses_to_overwrite_a_saved_one_until_asked",
    "test_reliability.py::test_train_transferlearning_py_refuses_to_overwrite_too",
    "test_reliability.py::test_a_lock_left_by_a_dead_process_is_taken_over",
    "test_reliability.py::test_resuming_a_damaged_checkpoint_says_so_in_one_line",
    "test_vit_vs_cnn.py::test_the_benchmark_smoke_run_writes_json_and_a_plot_and_reuses_finished_runs",
    "test_time_to_accuracy.py::test_a_tiny_recipe_writes_a_report_with_every_field_and_a_plot",
    "test_time_to_accuracy.py::test_an_existing_report_is_never_replaced_without_overwrite",
    "test_benchmark.py::test_quick_benchmark_writes_table_json_and_chart",
    "test_benchmark.py::test_quick_benchmark_runs_all_three_models",
    # over 10 s each on one loaded core (a few seconds on an idle one): compiling, ViT-B/16, rebuilding the data files,
    # training until a bug shows
    "test_scaling.py::test_compiled_model_trains_like_the_eager_one_and_saves_the_same_keys",
    "test_model.py::test_torchvision_vit_b_16_weights_give_identical_outputs",
    "test_model.py::test_torchvision_vit_b_16_with_the_pre_training_head_loads_exactly",
    "test_data.py::test_offline_mnist_fallback_writes_files_torchvision_loads",
    "test_data.py::test_corrupted_byte_is_detected_and_refetched",
    "test_data.py::test_fashion_mnist_from_an_empty_folder_without_the_installed_package",
    "test_data.py::test_the_installed_package_folder_is_still_a_source",
    "test_bugs.py::test_randn_class_token_learns_with_adamw_or_our_init_but_not_with_sgd",
    "test_bugs.py::test_overfitting_one_batch_fails_with_batch_first_false_attention",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in SLOW as ``slow`` (the top-level conftest.py marks the notebooks)."""
    for item in items:
        name = getattr(item, "originalname", item.name)  # a test's name without its parameters
        if f"{item.path.name}::{name}" in SLOW:
            item.add_marker(pytest.mark.slow)
