"""Position embeddings at a new resolution (the paper's Sec. 3.2) and the architecture figure."""
import pytest
import torch

import helper_functions as hf


def test_interpolated_position_embedding_has_one_row_per_new_patch_plus_the_class_token(tiny_vit):
    model = tiny_vit()  # 28 / 7 = 4 x 4 patches
    assert tuple(hf.interpolate_position_embedding(model, 42).shape) == (1, 1 + 6 * 6, 16)
    assert tuple(hf.interpolate_position_embedding(model, 14).shape) == (1, 1 + 2 * 2, 16)
    mean_pooled = tiny_vit(pool="mean")
    assert tuple(hf.interpolate_position_embedding(mean_pooled, 56).shape) == (1, 8 * 8, 16)


def test_interpolation_keeps_the_class_token_row_and_is_the_identity_at_the_same_size(tiny_vit):
    model = tiny_vit()
    old = model.position_embedding.detach()
    new = hf.interpolate_position_embedding(model, 56)
    assert torch.equal(new[:, 0], old[:, 0])  # the class token has no place in the image: untouched
    assert torch.equal(hf.interpolate_position_embedding(model, 28), old)


def test_interpolation_is_2d_and_keeps_a_smooth_grid_where_it_was():
    # A grid whose embedding is its column index: resized in 2-D it still grows from left to right in every row
    grid = torch.arange(4.0).repeat(4).view(1, 16, 1)  # (1, 16, 1): value = column
    new = hf.interpolate_position_embedding(grid, 56, patch_size=7, class_token=False).view(8, 8)
    assert torch.all(new[:, 1:] >= new[:, :-1] - 1e-5)  # left to right, in every row
    torch.testing.assert_close(new[:, 0], new[0, 0].expand(8))  # every row the same: nothing mixed across rows


def test_bicubic_matches_f_interpolate_on_the_grid(tiny_vit):
    model = tiny_vit()
    grid = model.position_embedding.detach()[:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    got = hf.interpolate_position_embedding(model, 42)[:, 1:].reshape(1, 6, 6, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected)


def test_a_size_that_the_patch_size_does_not_divide_is_refused_naming_the_argument(tiny_vit):
    with pytest.raises(ValueError, match=r"new_image_size=30 is not divisible by patch_size=7"):
        hf.interpolate_position_embedding(tiny_vit(), 30)
    with pytest.raises(ValueError, match="patch_size"):
        hf.interpolate_position_embedding(torch.zeros(1, 17, 16), 42)  # a bare tensor needs its patch size
    with pytest.raises(ValueError, match="new_image_size"):
        hf.resize_vit(tiny_vit(), 0)


def test_resize_vit_gives_a_model_for_the_new_size_with_the_same_weights(tiny_vit):
    model = tiny_vit().eval()
    resized = hf.resize_vit(model, 42)
    assert resized.config["image_size"] == 42 and model.config["image_size"] == 28  # the original is unchanged
    assert not resized.training
    with torch.no_grad():
        assert resized(torch.randn(2, 1, 42, 42)).shape == (2, 10)
    same = {k: v for k, v in resized.state_dict().items() if k != "position_embedding"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in same.items())
    # at the same size, the same function
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(hf.resize_vit(model, 28)(images), model(images))


def test_the_architecture_figure_draws_the_mnist_models_shapes():
    fig = hf.plot_vit_architecture("vit_mnist")
    texts = " ".join(text.get_text() for ax in fig.axes for text in ax.texts)
    for shape in ["(batch, 16, 49)", "(batch, 16, 64)", "(batch, 17, 64)", "(batch, 17, 128)", "(batch, 64)",
                  "(batch, 10)"]:
        assert shape in texts, shape
    for label in ["Eq. 1", "Eq. 2", "Eq. 3", "Eq. 4", "L = 6", "k = 4"]:
        assert label in texts, label
    shapes = hf.vit_shapes("vit_b_16")
    assert shapes["image"] == "(batch, 3, 224, 224)" and shapes["tokens"] == "(batch, 197, 768)"
    import matplotlib.pyplot as plt

    plt.close("all")
