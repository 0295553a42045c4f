"""The model of notebooks 01-05: shapes, equality with PyTorch's reference layers and torchvision's ViT-B/16, parameter
counts against the paper's Table 1, the batch-independence property, and a clear error for each kind of bad input."""
import copy
import inspect
import math

import pytest
import torch
import torchvision
from einops import rearrange
from torch import nn

import helper_functions as hf

# A tiny configuration that keeps every test fast.
TINY = dict(image_size=28, in_channels=1, patch_size=7, num_layers=2, num_heads=4, embedding_dim=32, mlp_size=64,
            num_classes=10)


@pytest.fixture(autouse=True)
def _seed():
    hf.set_seeds(0)


def _copy_mha_weights(ours: hf.MultiHeadSelfAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.load_state_dict(ours.out_proj.state_dict())


# --- 1. patch embedding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, size, patch, dim, num_patches", [(3, 224, 16, 768, 196), (1, 28, 7, 32, 16),
                                                                      (1, 28, 4, 8, 49)])
def test_patch_embedding_gives_one_token_per_patch(channels, size, patch, dim, num_patches):
    embed = hf.PatchEmbedding(in_channels=channels, patch_size=patch, embedding_dim=dim)
    out = embed(torch.randn(2, channels, size, size))
    assert out.shape == (2, num_patches, dim)


def test_patch_embedding_equals_unfold_and_einops_with_the_same_weights():
    layer = hf.PatchEmbedding(in_channels=3, patch_size=7, embedding_dim=16)
    images = torch.randn(2, 3, 28, 28)
    weight, bias = layer.projection.weight, layer.projection.bias  # (D, C, P, P), (D,)
    unfold = nn.Unfold(kernel_size=7, stride=7)(images).transpose(1, 2)  # (batch, N, C*P*P), order (c, p1, p2)
    einops = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=7, p2=7)  # order (p1, p2, c)
    with torch.no_grad():
        expected = layer(images)
        by_unfold = unfold @ rearrange(weight, "d c p1 p2 -> (c p1 p2) d") + bias
        by_einops = einops @ rearrange(weight, "d c p1 p2 -> (p1 p2 c) d") + bias
    torch.testing.assert_close(by_unfold, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_einops, expected, atol=1e-5, rtol=1e-5)


def test_patch_embedding_orders_patches_row_by_row():
    layer = hf.PatchEmbedding(in_channels=1, patch_size=7, embedding_dim=4)
    images = torch.zeros(1, 1, 28, 28)
    images[0, 0, 7:14, 21:28] = 1.0  # the patch in grid row 1, column 3 -> sequence index 1 * 4 + 3 = 7
    with torch.no_grad():
        tokens = layer(images) - layer.projection.bias  # (1, 16, 4); only the lit patch is non-zero
    lit = tokens.abs().sum(dim=-1)[0].nonzero().flatten().tolist()
    assert lit == [7]


def test_patch_embedding_rejects_image_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="not divisible by patch size 7"):
        hf.PatchEmbedding(in_channels=1, patch_size=7, embedding_dim=8)(torch.randn(1, 1, 30, 30))


def test_patch_embedding_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 3 channel"):
        hf.PatchEmbedding(in_channels=3, patch_size=7, embedding_dim=8)(torch.randn(1, 1, 28, 28))


def test_patch_embedding_rejects_an_image_without_batch_dimension():
    with pytest.raises(ValueError, match="unsqueeze"):
        hf.PatchEmbedding(in_channels=1, patch_size=7, embedding_dim=8)(torch.randn(1, 28, 28))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_a_channels_last_batch_is_told_to_permute(in_channels):
    model = hf.ViT(**TINY | dict(in_channels=in_channels))
    with pytest.raises(ValueError, match=r"looks channels-last.*x\.permute\(0, 3, 1, 2\)"):
        model(torch.randn(2, 28, 28, in_channels))


def test_a_uint8_batch_is_told_to_scale_to_float_and_normalise():
    with pytest.raises(ValueError, match=r"expected float images, got torch.uint8; scale them to float and normalise"):
        hf.ViT(**TINY)(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))


def test_the_blogs_unfold_patcher_equals_ours_where_the_patch_divides_the_image():
    ours = hf.PatchEmbedding(in_channels=3, patch_size=7, embedding_dim=16)
    blog = hf.ImagePatches(patch_size=7, in_channels=3, stride=7, embedding_dim=16)
    with torch.no_grad():
        blog.patch_embedding.weight.copy_(rearrange(ours.projection.weight, "d c p1 p2 -> d (c p1 p2)"))
        blog.patch_embedding.bias.copy_(ours.projection.bias)
        images = torch.randn(2, 3, 28, 28)
        embeddings, patches = blog(images)
        torch.testing.assert_close(embeddings, ours(images), atol=1e-5, rtol=1e-5)
    assert patches.shape == (2, 16, 3 * 7 * 7)


def test_unfold_cropping_is_silent_in_the_blogs_patcher_and_caught_by_ours():
    blog = hf.ImagePatches(patch_size=8, in_channels=1, stride=8, embedding_dim=16)
    images = torch.randn(2, 1, 28, 28)
    _, patches = blog(images)
    assert patches.shape == (2, 9, 64)  # 3 x 3 patches of 8 x 8: only the top-left 24 x 24 pixels
    cropped = images.clone()
    cropped[..., 24:, :] = 0.0  # change every pixel outside the 24 x 24 corner ...
    cropped[..., :, 24:] = 0.0
    torch.testing.assert_close(blog(cropped)[1], patches)  # ... and the blog's patcher does not notice
    with pytest.raises(ValueError, match="28x28 is not divisible by patch size 8"):
        hf.PatchEmbedding(in_channels=1, patch_size=8, embedding_dim=16)(images)


def test_stride_smaller_than_the_patch_makes_overlapping_patches():
    _, patches = hf.ImagePatches(patch_size=8, in_channels=1, stride=4, embedding_dim=16)(torch.randn(1, 1, 28, 28))
    assert patches.shape == (1, 36, 64)  # 6 x 6 patches, each sharing pixels with its neighbours


def test_the_blogs_patcher_takes_its_patch_size_as_a_tuple_too():
    """The blog calls imagePatches(patch_size=(8, 8), ...): a tuple gives the same layer as the int."""
    images = torch.randn(2, 3, 32, 32)
    hf.set_seeds(0)
    from_int = hf.ImagePatches(patch_size=8, in_channels=3, stride=8, embedding_dim=16)
    hf.set_seeds(0)
    from_tuple = hf.ImagePatches(patch_size=(8, 8), in_channels=3, stride=8, embedding_dim=16)
    for a, b in zip(from_int(images), from_tuple(images)):
        assert torch.equal(a, b)  # (2, 16, 16) embeddings, then (2, 16, 192) patches
    embeddings, patches = hf.ImagePatches(patch_size=(4, 8), in_channels=1, stride=4, embedding_dim=16)(images[:, :1])
    assert patches.shape == (2, 8 * 7, 4 * 8) and embeddings.shape == (2, 56, 16)  # 8 rows and 7 columns of patches


# --- 2. multi-head self-attention ----------------------------------------------------------------------------------


def test_msa_keeps_the_shape():
    assert hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4)(torch.randn(3, 17, 32)).shape == (3, 17, 32)


def test_msa_equals_nn_multiheadattention_batch_first_with_the_same_weights():
    ours = hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4).eval()
    theirs = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    _copy_mha_weights(ours, theirs)
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        out, weights = theirs(x, x, x, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(ours(x), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.attention_weights(x), weights, atol=1e-6, rtol=1e-5)


def test_msa_equals_scaled_dot_product_attention_per_head_written_out():
    msa = hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        q, k, v = msa.qkv(x).chunk(3, dim=-1)  # each (batch, N, D)
        heads = []
        for i in range(4):
            part = slice(i * 8, (i + 1) * 8)
            A = torch.softmax(q[..., part] @ k[..., part].transpose(-2, -1) / math.sqrt(8), dim=-1)  # (batch, N, N)
            heads.append(A @ v[..., part])  # (batch, N, D_h)
        torch.testing.assert_close(msa(x), msa.out_proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-5)


def test_attention_weights_are_rows_that_sum_to_one():
    A = hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4).attention_weights(torch.randn(2, 9, 32))
    assert A.shape == (2, 4, 9, 9)
    torch.testing.assert_close(A.sum(dim=-1), torch.ones(2, 4, 9))


def test_msa_attention_dropout_is_used_in_training_only():
    msa = hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4, attn_dropout=0.5)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert not torch.allclose(msa(x), msa(x))  # training mode: random attention dropout
        msa.eval()
        assert torch.equal(msa(x), msa(x))


@pytest.mark.parametrize("build, argument", [
    (lambda: hf.PatchEmbedding(patch_size=0), "patch_size"),
    (lambda: hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=0), "num_heads"),
    (lambda: hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=-4), "num_heads"),
    (lambda: hf.MLPBlock(embedding_dim=32, mlp_size=0), "mlp_size"),
    (lambda: hf.TransformerEncoderBlock(embedding_dim=-8), "embedding_dim"),
], ids=["patch_size=0", "num_heads=0", "num_heads=-4", "mlp_size=0", "embedding_dim=-8"])
def test_every_part_rejects_sizes_below_one_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=f"{argument} must be a positive integer"):
        build()


def test_msa_rejects_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=5)


# --- batch independence --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_layer", [
    lambda: hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4),
    lambda: hf.MLPBlock(embedding_dim=32, mlp_size=64),
    lambda: hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64),
], ids=["msa", "mlp", "block"])
def test_every_part_keeps_samples_independent(make_layer):
    assert hf.batch_dependence(make_layer().eval(), torch.randn(4, 17, 32)) < 1e-5


def test_whole_vit_keeps_samples_independent():
    for pool in ("cls", "mean"):
        assert hf.batch_dependence(hf.ViT(**TINY, pool=pool).eval(), torch.randn(4, 1, 28, 28)) < 1e-5


def test_batch_dependence_catches_multiheadattention_without_batch_first():
    trap = nn.MultiheadAttention(32, 4).eval()  # batch_first=False, fed (batch, seq, dim): attends across the batch
    fixed = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    fixed.load_state_dict(trap.state_dict())
    x = torch.randn(4, 17, 32)
    assert hf.batch_dependence(lambda t: trap(t, t, t, need_weights=False)[0], x) > 1e-2
    assert hf.batch_dependence(lambda t: fixed(t, t, t, need_weights=False)[0], x) < 1e-5


def test_batch_dependence_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        hf.batch_dependence(nn.Identity(), torch.randn(1, 3, 8))


# --- 3. MLP block ---------------------------------------------------------------------------------------------------


def test_mlp_block_equals_torchvision_ops_mlp_in_both_modes():
    ours = hf.MLPBlock(embedding_dim=32, mlp_size=64, dropout=0.3)
    theirs = torchvision.ops.MLP(32, [64, 32], activation_layer=nn.GELU, dropout=0.3)
    theirs.load_state_dict(ours.state_dict())  # the same names: 0.* and 3.*
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        for training in (False, True):
            ours.train(training)
            theirs.train(training)
            hf.set_seeds(1)  # the same dropout masks, which also proves the dropouts sit in the same places
            expected = theirs(x)
            hf.set_seeds(1)
            torch.testing.assert_close(ours(x), expected)


def test_mlp_block_parameter_names_match_torchvision():
    assert list(hf.MLPBlock(embedding_dim=32, mlp_size=64).state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]


def test_dropout_sits_where_appendix_b1_puts_it():
    model = hf.ViT(**TINY | dict(num_layers=1))
    dropouts = [name for name, module in model.named_modules() if isinstance(module, nn.Dropout)]
    assert dropouts == ["embedding_dropout", "encoder.0.dropout", "encoder.0.mlp.2", "encoder.0.mlp.4"]


# --- 4. LayerNorm and the encoder block -----------------------------------------------------------------------------


def test_encoder_block_is_eq_2_and_3_with_layernorm_written_as_its_formula():
    block = hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64).eval()
    with torch.no_grad():
        for ln in (block.ln_1, block.ln_2):  # non-trivial scales and shifts, so that they are tested too
            ln.weight.normal_()
            ln.bias.normal_()

        def layer_norm(x, ln):  # over each token's features, biased variance, eps = 1e-6 inside the square root
            mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
            return ln.weight * (x - mean) / torch.sqrt(var + 1e-6) + ln.bias

        z = torch.randn(2, 9, 32) * 3 + 1  # (batch, N, D), far from zero mean and unit variance
        z_prime = block.self_attention(layer_norm(z, block.ln_1)) + z  # Eq. 2
        expected = block.mlp(layer_norm(z_prime, block.ln_2)) + z_prime  # Eq. 3
        torch.testing.assert_close(block(z), expected, atol=1e-5, rtol=1e-5)


def test_every_layernorm_uses_the_configured_eps():
    model = hf.ViT(**TINY, layer_norm_eps=1e-3)
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-3}
    assert {m.eps for m in hf.ViT(**TINY).modules() if isinstance(m, nn.LayerNorm)} == {1e-6}


def _torch_encoder_layer(block: hf.TransformerEncoderBlock, **changes) -> nn.TransformerEncoderLayer:
    names = {"ln_1.": "norm1.", "ln_2.": "norm2.", "self_attention.qkv.weight": "self_attn.in_proj_weight",
             "self_attention.qkv.bias": "self_attn.in_proj_bias", "self_attention.out_proj.": "self_attn.out_proj.",
             "mlp.0.": "linear1.", "mlp.3.": "linear2."}
    state_dict = {}
    for key, value in block.state_dict().items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        state_dict[key] = value
    settings = dict(norm_first=True, activation="gelu", batch_first=True, layer_norm_eps=1e-6) | changes
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, **settings)
    layer.load_state_dict(state_dict)
    return layer.eval()


def test_encoder_block_equals_nn_transformer_encoder_layer_pre_norm_gelu():
    block = hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _torch_encoder_layer(block)(x), atol=1e-5, rtol=1e-5)
        # The defaults compute something else: post-norm (the 2017 Transformer) and ReLU.
        assert not torch.allclose(block(x), _torch_encoder_layer(block, norm_first=False)(x), atol=1e-3)
        assert not torch.allclose(block(x), _torch_encoder_layer(block, activation="relu")(x), atol=1e-3)


def test_shared_weights_from_layer_times_n_are_detected():
    layer = hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64)
    shared = nn.ModuleList([layer] * 3)  # three references to one layer: one set of weights, updated three times
    cloned = nn.ModuleList([copy.deepcopy(layer) for _ in range(3)])  # the harvardnlp clones(): three layers
    groups = hf.shared_parameters(shared)
    assert len(groups) == len(list(layer.parameters()))
    assert groups[0] == ["0.ln_1.weight", "1.ln_1.weight", "2.ln_1.weight"]
    assert hf.shared_parameters(cloned) == []
    assert hf.shared_parameters(hf.ViT(**TINY)) == []


def test_encoder_block_state_dict_names_are_stable():
    assert list(hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64).state_dict()) == [
        "ln_1.weight", "ln_1.bias", "self_attention.qkv.weight", "self_attention.qkv.bias",
        "self_attention.out_proj.weight", "self_attention.out_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"]


# --- 5. the whole ViT -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes(pool):
    model = hf.ViT(**TINY, pool=pool).eval()
    images = torch.randn(3, 1, 28, 28)
    tokens = 16 + (pool == "cls")
    assert model.embed(images).shape == (3, tokens, 32)
    assert model.features(images).shape == (3, 32)
    assert model(images).shape == (3, 10)


def test_cls_model_classifies_from_the_class_token():
    model = hf.ViT(**TINY).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z_L = model.encoder(model.embed(images))
        torch.testing.assert_close(model(images), model.head(model.norm(z_L[:, 0])))


def test_mean_pool_model_has_no_class_token_and_averages_the_tokens():
    model = hf.ViT(**TINY, pool="mean").eval()
    assert model.class_token is None
    assert "class_token" not in model.state_dict()
    assert model.position_embedding.shape == (1, 16, 32)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z_L = model.encoder(model.embed(images))
        torch.testing.assert_close(model(images), model.head(model.norm(z_L.mean(dim=1))))


def test_vit_state_dict_names_are_stable():
    keys = list(hf.ViT(**TINY).state_dict())
    assert keys[:4] == ["class_token", "position_embedding", "patch_embedding.projection.weight",
                        "patch_embedding.projection.bias"]
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert "encoder.1.mlp.3.bias" in keys


def test_vit_config_names_every_constructor_argument_and_rebuilds_the_same_model():
    model = hf.ViT(**TINY, pool="mean", dropout=0.2, attn_dropout=0.1, layer_norm_eps=1e-5).eval()
    assert set(model.config) == set(inspect.signature(hf.ViT).parameters), "a setting left out would be lost on load"
    rebuilt = hf.ViT(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert repr(rebuilt) == repr(model)  # every layer's sizes, dropout rates and eps
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


@pytest.mark.parametrize("bad", [dict(num_heads=0), dict(patch_size=0), dict(embedding_dim=0), dict(num_layers=-1),
                                 dict(num_layers=0), dict(image_size=-28), dict(num_classes=0), dict(num_heads=-4),
                                 dict(representation_size=0), dict(embedding_dim=64.0)],
                         ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items()))
def test_vit_rejects_sizes_that_are_not_positive_integers_naming_the_argument(bad):
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got {value!r}$"):
        hf.ViT(**TINY | bad)


def test_vit_rejects_unknown_pool():
    with pytest.raises(ValueError, match="pool must be 'cls'"):
        hf.ViT(**TINY, pool="max")


def test_vit_rejects_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by patch_size=7"):
        hf.ViT(**TINY | dict(image_size=30))


def test_vit_rejects_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        hf.ViT(**TINY | dict(num_heads=5))


def test_vit_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="expected 28x28 images, got 32x32"):
        hf.ViT(**TINY)(torch.randn(1, 1, 32, 32))


def test_vit_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 1 channel"):
        hf.ViT(**TINY)(torch.randn(1, 3, 28, 28))


def test_vit_from_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown configuration 'vit_b_32'"):
        hf.vit_from_config("vit_b_32")


def test_vit_from_config_applies_overrides():
    with torch.device("meta"):
        model = hf.vit_from_config("vit_b_16", num_classes=10)
    assert model.head.out_features == 10
    assert model.config["embedding_dim"] == 768


@pytest.mark.parametrize("name", ["vit_b_16", "vit_l_16", "vit_h_14"])
def test_parameter_counts_match_table_1(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        count = hf.count_parameters(hf.vit_from_config(name))
    assert abs(count - hf.PAPER_PARAMS[name]) / hf.PAPER_PARAMS[name] < 0.02


def test_vit_b_16_parameter_count_equals_torchvisions():
    with torch.device("meta"):
        ours = hf.count_parameters(hf.vit_from_config("vit_b_16"))
    assert ours == torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1.meta["num_params"] == 86_567_656


# --- torchvision's weights ------------------------------------------------------------------------------------------


def test_torchvision_vit_b_16_weights_give_identical_outputs():
    reference = torchvision.models.vit_b_16()  # random weights, nothing downloaded
    with torch.no_grad():  # torchvision starts these at zero, which would leave them untested
        reference.class_token.normal_(std=0.02)
        reference.heads.head.weight.normal_(std=0.02)
        reference.heads.head.bias.normal_(std=0.02)
    model = hf.load_torchvision_vit_weights(hf.vit_from_config("vit_b_16"), reference).eval()
    reference.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        gap = (model(images) - reference(images)).abs().max().item()
    assert gap <= 1e-5


def test_torchvision_weights_load_from_a_saved_file(tmp_path):
    reference = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=4,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    with torch.no_grad():
        reference.class_token.normal_(std=0.02)
        reference.heads.head.weight.normal_(std=0.02)
    path = tmp_path / "tiny_vit.pth"
    torch.save(reference.state_dict(), path)
    model = hf.load_torchvision_vit_weights(hf.ViT(**TINY | dict(in_channels=3)), path).eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


def test_mismatched_state_dict_error_names_the_keys():
    model = hf.ViT(**TINY)
    state_dict = dict(model.state_dict())
    del state_dict["encoder.0.ln_1.weight"]
    state_dict["encoder.0.ln_3.weight"] = torch.zeros(32)
    state_dict["head.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError) as error:
        hf.check_state_dict_fits(model, state_dict)
    message = str(error.value)
    assert "missing keys: ['encoder.0.ln_1.weight']" in message
    assert "unexpected keys: ['encoder.0.ln_3.weight']" in message
    assert "head.weight: checkpoint (5, 32) vs model (10, 32)" in message


def test_torchvision_weights_for_another_head_size_are_refused_with_the_key_names():
    reference = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=4,
                                                     hidden_dim=32, mlp_dim=64, num_classes=1000)
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(1000, 32\) vs model \(10, 32\)"):
        hf.load_torchvision_vit_weights(hf.ViT(**TINY | dict(in_channels=3, num_layers=1)), reference)


def test_torchvision_pre_logits_head_loads_exactly_with_representation_size():
    torch.manual_seed(0)
    reference = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=4,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10,
                                                     representation_size=48).eval()
    ours = hf.ViT(**TINY | dict(in_channels=3, num_layers=1, representation_size=48)).eval()
    hf.load_torchvision_vit_weights(ours, reference)
    images = torch.randn(2, 3, 28, 28)
    assert torch.allclose(ours(images), reference(images), atol=1e-5)
    with pytest.raises(ValueError, match="unexpected keys: .*pre_logits"):
        hf.load_torchvision_vit_weights(hf.ViT(**TINY | dict(in_channels=3, num_layers=1)), reference)


def test_torchvision_vit_b_16_with_the_pre_training_head_loads_exactly():
    torch.manual_seed(0)
    reference = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=12,
                                                     hidden_dim=768, mlp_dim=3072, representation_size=768).eval()
    with torch.no_grad():  # torchvision starts these at zero, which would leave them untested
        reference.class_token.normal_(std=0.02)
        reference.heads.head.weight.normal_(std=0.02)
    model = hf.load_torchvision_vit_weights(hf.vit_from_config("vit_b_16", representation_size=768), reference).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(images) - reference(images)).abs().max().item() <= 1e-5


def test_torchvision_checkpoint_uses_the_cached_file_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    cached = tmp_path / "checkpoints" / "vit_b_16-c867db91.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert hf.torchvision_vit_checkpoint("ViT_B_16_Weights.IMAGENET1K_V1") == cached


def test_torchvision_checkpoint_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def no_network(url, dst, hash_prefix=None, progress=True):
        assert hash_prefix == "c867db91"  # the download is checked against the hash in the file name
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match="copy it to .*vit_b_16-c867db91.pth"):
        hf.torchvision_vit_checkpoint(torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1)
