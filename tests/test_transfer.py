"""Transfer learning (notebook 09, train_transferlearning.py): the script writes train.py's files, a frozen backbone
really stays frozen, a transferred model's checkpoint rebuilds it, weights that do not fit are named, and a machine
without the ImageNet weights is told quickly how to get them."""
import subprocess
import sys
import time
import urllib.error

import pytest
import torch
import torchvision

import helper_functions as hf
import machinery
import train_transferlearning
from conftest import REPO


def tiny_digits(n: int = 40):
    train_data, _ = hf.get_mnist()
    return hf.tensor_dataset(train_data, hf.MNIST_MEAN, hf.MNIST_STD, limit=n)


def test_train_transferlearning_py_writes_train_pys_files_and_a_linear_probe_keeps_the_backbone(tmp_path, tiny_vit):
    pretrained = tiny_vit()
    hf.save_model(pretrained, tmp_path / "tiny.pth", dataset="fashion-mnist")
    done = subprocess.run([sys.executable, str(REPO / "train_transferlearning.py"), "--pretrained",
                           str(tmp_path / "tiny.pth"), "--freeze", "--epochs", "2", "--num-labels", "20",
                           "--batch-size", "10", "--subset", "50", "--out-dir", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    name = "vit_mnist_20_labels_probe"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {f"{name}.pth", f"{name}.json", f"{name}.pkl",
                                                               f"{name}_loss_curves.png"}
    saved = hf.load_results(tmp_path / "out" / f"{name}.pkl")
    assert len(saved["val_acc"]) == 2 and isinstance(saved["final_test_acc"], float), "epochs validated, tested once"

    # The checkpoint carries what rebuilds and feeds the model: config, dataset, normalisation, recipe
    checkpoint = hf.load_checkpoint(tmp_path / "out" / f"{name}.pth")
    assert checkpoint["config"] == {**pretrained.config, "num_classes": 10}
    assert (checkpoint["dataset"], checkpoint["mean"], checkpoint["std"]) == ("mnist", hf.MNIST_MEAN, hf.MNIST_STD)
    assert checkpoint["recipe"]["mode"] == "probe" and checkpoint["recipe"]["num_labels"] == 20
    tuned = hf.load_model(tmp_path / "out" / f"{name}.pth")

    # Only the head learned
    before, after = pretrained.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))
    assert not torch.equal(after["head.weight"], torch.zeros_like(after["head.weight"]))


def test_freeze_backbone_keeps_frozen_parameters_fixed_while_the_head_learns(tiny_vit):
    model = hf.freeze_backbone(hf.replace_head(tiny_vit(num_classes=7), num_classes=10))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert hf.count_parameters(model, trainable_only=True) == 16 * 10 + 10 < hf.count_parameters(model)  # D * K + K
    assert torch.count_nonzero(model.head.weight) == 0, "the new head starts at zero (Sec. 3.2)"
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # Even an optimizer handed every parameter, with weight decay and momentum, leaves frozen ones alone
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    images, labels = tiny_digits(20).tensors
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    hf.fine_tune(model, tiny_digits(20), tiny_digits(10), epochs=2, batch_size=10, progress=False)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["head.bias"], after["head.bias"])


def test_fine_tune_refuses_a_model_with_nothing_to_train(tiny_vit):
    model = tiny_vit().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hf.fine_tune(model, tiny_digits(10), tiny_digits(10), epochs=1, progress=False)


def test_a_new_heads_checkpoint_rebuilds_the_model_without_guessing(tmp_path, tiny_vit):
    model = hf.replace_head(tiny_vit(), num_classes=5)
    torch.nn.init.normal_(model.head.weight)
    hf.save_model(model, tmp_path / "five.pth", dataset="mnist", mean=hf.MNIST_MEAN, std=hf.MNIST_STD)
    rebuilt = hf.load_model(tmp_path / "five.pth").eval()
    images = tiny_digits(4).tensors[0]
    assert rebuilt.head.out_features == 5
    assert torch.equal(rebuilt(images), model.eval()(images))


def test_the_script_names_the_mismatch_when_weights_are_not_vit_b_16(tmp_path, capsys):
    small = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(SystemExit) as exit_info:
        train_transferlearning.main(["--weights", str(tmp_path / "small.pth"), "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing keys: ['encoder.1.ln_1.bias'" in err
    assert "shape mismatch class_token: checkpoint (1, 1, 16) vs model (1, 1, 768)" in err


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No ImageNet weights in torchvision's cache, and every download fails as it does without internet."""
    def no_internet(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_internet)


def test_without_the_imagenet_weights_a_quick_message_says_how_to_get_them(offline, capsys, tmp_path):
    start = time.perf_counter()
    with pytest.raises(machinery.WeightsNotAvailableError) as error:
        hf.imagenet_vit()
    message = str(error.value)
    assert "https://download.pytorch.org/models/vit_b_16-c867db91.pth" in message
    assert "--weights vit_b_16-c867db91.pth" in message and "Name or service not known" in message

    with pytest.raises(SystemExit) as exit_info:
        train_transferlearning.main(["--imagenet", "--freeze", "--out-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 1
    assert "https://download.pytorch.org/models/vit_b_16-c867db91.pth" in capsys.readouterr().err
    assert time.perf_counter() - start < 10, "the offline path must fail fast, not wait for a download"


def test_a_missing_weights_file_says_how_to_get_one(tmp_path):
    with pytest.raises(machinery.WeightsNotAvailableError, match="no weights file at .*nowhere.pth"):
        hf.imagenet_vit(tmp_path / "nowhere.pth")


def test_imagenet_transform_gives_224_rgb_with_the_weights_normalisation():
    train_data, _ = hf.get_mnist(transform=hf.imagenet_transform())
    image, _ = train_data[0]
    mean, std = hf.imagenet_normalisation()
    assert tuple(image.shape) == (3, 224, 224)
    background = torch.tensor([(0 - m) / s for m, s in zip(mean, std)])  # black pixels, per channel
    assert torch.allclose(image[:, 0, 0], background)
    assert torch.allclose((image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).diff(dim=0),
                          torch.zeros(2, 224, 224), atol=1e-6), "R, G and B carry the same grey"


def test_balanced_subset_draws_the_same_number_of_each_digit_reproducibly():
    train_data, _ = hf.get_mnist()
    subset = hf.balanced_subset(train_data, 50, seed=3)
    labels = train_data.targets[subset.indices]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 5))
    assert subset.indices == hf.balanced_subset(train_data, 50, seed=3).indices
    assert subset.indices != hf.balanced_subset(train_data, 50, seed=4).indices
    with pytest.raises(ValueError, match="multiple of num_classes=10"):
        hf.balanced_subset(train_data, 55)
