"""The classic ViT bugs of notebook 06: each detector must flag the buggy variant and pass the correct one.

Every test here would fail if its detector stopped detecting (the buggy side) or started crying wolf (the fixed side).
Tiny models and random data keep the whole file to a few seconds.
"""
import math

import pytest
import torch
from torch import nn

import helper_functions as hf


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, embedding_dim=32, mlp_size=64)  # 16 patches


def tiny_vit(bug=None, seed=0, **overrides):
    """A seeded ViT for 16x16 images with ``bug`` injected (``None``: the correct model)."""
    hf.set_seeds(seed)
    return hf.vit_with_bugs(*([bug] if bug else []), **{**TINY, **overrides})


def tiny_batch(size=16, seed=0):
    """``size`` random 16x16 images and labels, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return images, labels


# --- bugs 1 and 2: LayerNorm, caught by comparing with nn.LayerNorm -------------------------------------------------

def off_centre_tokens():
    return torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(0)) * 2 + 3  # mean far from 0


def test_layer_norm_without_bug_equals_torch_layer_norm():
    ours, reference = hf.LayerNormWithBugs(32, eps=1e-6), nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():  # non-trivial weights, the same in both
        reference.weight.uniform_(0.5, 1.5), reference.bias.uniform_(-1, 1)
    ours.load_state_dict(reference.state_dict())
    assert hf.max_abs_difference(ours, reference, off_centre_tokens()) < 1e-5


@pytest.mark.parametrize("bug", ["mean_over_std", "parentheses", "no_centring"])
def test_layer_norm_bug_is_caught(bug):
    buggy = hf.LayerNormWithBugs(32, eps=1e-6, bug=bug)
    assert hf.max_abs_difference(buggy, nn.LayerNorm(32, eps=1e-6), off_centre_tokens()) > 0.5


def test_blog_layer_norm_bug_1_makes_every_token_constant_across_its_features():
    tokens = off_centre_tokens()  # (4, 5, 32)
    with torch.no_grad():
        out = hf.LayerNormWithBugs(32, eps=1e-6, bug="mean_over_std")(tokens)
    assert out.std(dim=-1).max() < 1e-6  # one number per token, repeated 32 times
    assert torch.allclose(out[..., 0], tokens.mean(-1) / (tokens.std(-1) + 1e-6))  # mean / unbiased std, as written
    assert out[..., 0].std() > 0.1  # and that number differs from token to token


def test_blog_layer_norm_bug_2_is_written_as_the_blog_wrote_it_and_caught():
    tokens = off_centre_tokens()
    with torch.no_grad():
        out = hf.LayerNormWithBugs(32, eps=1e-6, bug="parentheses")(tokens)
    expected = tokens - tokens.mean(-1, keepdim=True) / (tokens.std(-1, keepdim=True) + 1e-6)
    assert torch.allclose(out, expected)
    assert hf.max_abs_difference(hf.LayerNormWithBugs(32, bug="parentheses"), nn.LayerNorm(32), tokens) > 0.5
    assert out.std(dim=-1, unbiased=False).mean() > 1.5  # the tokens keep their spread (about 2): not normalised


@pytest.mark.parametrize("bug", ["layer_norm_mean_over_std", "layer_norm_parentheses", "layer_norm_no_centring"])
def test_layer_norm_bug_reaches_every_layer_norm_of_the_vit(bug):
    correct, buggy = tiny_vit(), tiny_vit(bug)
    norms = [m for m in buggy.modules() if isinstance(m, hf.LayerNormWithBugs)]
    assert len(norms) == 2 * TINY["num_layers"] + 1 and all(m.bug for m in norms)
    assert not any(isinstance(m, nn.LayerNorm) for m in buggy.modules())
    images, _ = tiny_batch()
    assert hf.max_abs_difference(buggy, correct, images) > 1e-2


def test_replacing_layer_norms_without_a_bug_changes_nothing():
    correct, replaced = tiny_vit(), hf.replace_layer_norms(tiny_vit(), bug=None)
    images, _ = tiny_batch()
    assert hf.max_abs_difference(replaced.eval(), correct.eval(), images) < 1e-5


def test_layer_norm_rejects_an_unknown_bug():
    with pytest.raises(ValueError, match="bug must be one of"):
        hf.LayerNormWithBugs(8, bug="typo")


# --- bug 3: nn.MultiheadAttention without batch_first=True, caught by the batch-independence check ---------------

def test_torch_attention_with_batch_first_equals_ours():
    hf.set_seeds(0)
    ours = hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4)
    tokens = torch.randn(3, 7, 32)  # (batch, seq, embedding_dim)
    assert hf.max_abs_difference(hf.TorchSelfAttention.from_ours(ours, batch_first=True), ours, tokens) < 1e-5
    assert hf.max_abs_difference(hf.TorchSelfAttention.from_ours(ours, batch_first=False), ours, tokens) > 1e-2


def test_batch_first_false_attention_is_caught():
    images, _ = tiny_batch()
    assert hf.encoder_batch_dependence(tiny_vit("attention_batch_first_false"), images) > 1e-2
    assert hf.encoder_batch_dependence(hf.use_torch_attention(tiny_vit(), batch_first=True), images) < 1e-5
    assert hf.encoder_batch_dependence(tiny_vit(), images) < 1e-5


def test_batch_first_false_attention_is_caught_at_the_output_with_mean_pooling():
    images, _ = tiny_batch()
    assert hf.batch_dependence(tiny_vit("attention_batch_first_false", pool="mean"), images) > 1e-2
    assert hf.batch_dependence(tiny_vit(pool="mean"), images) < 1e-5


def test_batch_first_false_attention_gives_every_image_the_same_class_token_output():
    logits = tiny_vit("attention_batch_first_false").eval()(tiny_batch()[0])  # (batch, num_classes)
    assert (logits - logits[0]).abs().max() < 1e-5  # the class token attends only to other class tokens


def test_batch_first_false_attention_cuts_the_class_token_off_the_image():
    images, labels = tiny_batch()
    buggy = hf.gradient_norms(tiny_vit("attention_batch_first_false"), images, labels)
    correct = hf.gradient_norms(tiny_vit(), images, labels)
    assert buggy["patch_embedding.projection.weight"] == 0.0  # no path from the pixels to the loss
    assert correct["patch_embedding.projection.weight"] > 1e-3


def test_overfitting_one_batch_fails_with_batch_first_false_attention():
    images, labels = tiny_batch()
    buggy = hf.overfit_one_batch(tiny_vit("attention_batch_first_false"), images, labels, steps=40)
    correct = hf.overfit_one_batch(tiny_vit(), images, labels, steps=40)
    assert buggy[-1] > 1.5  # the labels' entropy: it can only learn which classes are common
    assert correct[-1] < 0.5


# --- bug 4: no position embeddings, caught by shuffling the patches ---------------------------------------------

def test_missing_position_embeddings_are_caught():
    images, _ = tiny_batch()
    buggy = tiny_vit("no_position_embeddings")
    assert hf.patch_order_sensitivity(buggy, images) < 1e-5
    assert hf.patch_order_sensitivity(tiny_vit(), images) > 1e-3
    assert not buggy.position_embedding.requires_grad and buggy.position_embedding.abs().max() == 0


def test_missing_position_embeddings_are_caught_with_mean_pooling_too():
    images, _ = tiny_batch()
    assert hf.patch_order_sensitivity(tiny_vit("no_position_embeddings", pool="mean"), images) < 1e-5
    assert hf.patch_order_sensitivity(tiny_vit(pool="mean"), images) > 1e-3


def test_shuffle_patches_moves_whole_patches():
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    identity = torch.arange(16)
    assert torch.equal(hf.shuffle_patches(images, 4, identity), images)
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = hf.shuffle_patches(images, 4, permutation)
    for i, j in enumerate(permutation.tolist()):  # grid position i now holds what was at position j
        row, col, src_row, src_col = i // 4, i % 4, j // 4, j % 4
        assert torch.equal(shuffled[..., 4 * row:4 * row + 4, 4 * col:4 * col + 4],
                           images[..., 4 * src_row:4 * src_row + 4, 4 * src_col:4 * src_col + 4])


# --- bug 5: no activation in the MLP, caught by the midpoint (affinity) test ------------------------------------

def test_missing_mlp_activation_is_caught():
    hf.set_seeds(0)
    x, y = torch.randn(2, 5, 32).unbind(0)
    correct = hf.MLPBlock(embedding_dim=32, mlp_size=64, dropout=0.0)
    buggy = hf.remove_mlp_activations(hf.MLPBlock(embedding_dim=32, mlp_size=64, dropout=0.0))
    assert hf.nonlinearity(buggy, x, y) < 1e-5
    assert hf.nonlinearity(correct, x, y) > 1e-2


def test_mlp_without_activation_collapses_to_one_linear_layer():
    hf.set_seeds(0)
    buggy = hf.remove_mlp_activations(hf.MLPBlock(embedding_dim=32, mlp_size=64, dropout=0.0)).eval()
    merged = hf.collapse_linear_stack(buggy[0], buggy[3])
    assert hf.max_abs_difference(merged, buggy, torch.randn(5, 32)) < 1e-5


def test_remove_mlp_activations_reaches_every_block():
    buggy = tiny_vit("mlp_without_activation")
    assert not any(isinstance(m, nn.GELU) for m in buggy.modules())
    assert sum(isinstance(m, hf.MLPBlock) for m in buggy.modules()) == TINY["num_layers"]


# --- bug 6: class token drawn from N(0, 1) + plain SGD, caught by gradient norms per layer -----------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randn_class_token_starves_the_patch_embedding_of_gradient(seed):
    images, labels = tiny_batch(seed=seed)
    assert hf.gradient_reaching_patches(tiny_vit("randn_class_token", seed=seed), images, labels) < 0.15
    assert hf.gradient_reaching_patches(tiny_vit(seed=seed), images, labels) > 0.25


def test_randn_class_token_learns_with_adamw_or_our_init_but_not_with_sgd():
    images, labels = tiny_batch()
    sgd = lambda params: torch.optim.SGD(params, lr=0.03)  # noqa: E731
    stuck = hf.overfit_one_batch(tiny_vit("randn_class_token"), images, labels, steps=40, optimizer=sgd)
    sgd_with_our_init = hf.overfit_one_batch(tiny_vit(), images, labels, steps=40, optimizer=sgd)
    adamw = hf.overfit_one_batch(tiny_vit("randn_class_token"), images, labels, steps=40,
                                 optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    assert stuck[-1] > 1.5  # about the entropy of the batch's labels: no use made of the images
    assert sgd_with_our_init[-1] < 0.5
    assert adamw[-1] < 0.5


def test_randn_class_token_leaves_removed_position_embeddings_removed():
    model = tiny_vit(bug=None)
    model = hf.reinitialise_with_randn(hf.remove_position_embeddings(model))
    assert model.position_embedding.abs().max() == 0 and model.class_token.std() > 0.5


# --- the blog's head: a tanh before the classifier, caught saturating by counting outputs near +-1 --------------------

def test_saturated_tanh_head_is_caught():
    images, _ = tiny_batch()
    healthy = tiny_vit(representation_size=32)
    saturated = tiny_vit(representation_size=32)
    with torch.no_grad():
        saturated.pre_logits[0].weight.normal_()  # N(0, 1) weights: pre-activations of size sqrt(D) ~ 6
    assert hf.tanh_saturation(saturated, images) > 0.5
    assert hf.tanh_saturation(healthy, images) < 0.05


def test_tanh_saturation_needs_a_tanh_head():
    with pytest.raises(ValueError, match="representation_size"):
        hf.tanh_saturation(tiny_vit(), tiny_batch()[0])


# --- the blog's mean pooling: every output token, the class token included ------------------------------------------

def test_blog_mean_pooling_averages_the_class_token_too():
    images, _ = tiny_batch()
    model = hf.mean_of_all_tokens(tiny_vit()).eval()
    with torch.no_grad():
        tokens = model.encoder(model.embed(images))  # (batch, num_patches + 1, embedding_dim)
        blog = model.features(images)
        assert torch.allclose(blog, model.norm(tokens.mean(dim=1)), atol=1e-6)
        assert (blog - model.norm(tokens[:, 1:].mean(dim=1))).abs().max() > 1e-2  # ours drops the class token
        assert (blog - model.norm(tokens[:, 0])).abs().max() > 1e-2  # and is not the class token either


def test_blog_mean_pooling_keeps_weights_and_injected_bugs():
    model = hf.mean_of_all_tokens(tiny_vit("mlp_without_activation"))
    assert list(model.state_dict()) == list(tiny_vit().state_dict())
    assert not any(isinstance(m, nn.GELU) for m in model.modules())


def test_blog_mean_pooling_needs_a_class_token():
    with pytest.raises(ValueError, match="pool='cls'"):
        hf.mean_of_all_tokens(tiny_vit(pool="mean"))


# --- the blog's replay: several bugs at once ---------------------------------------------------------------------

def test_vit_with_bugs_injects_every_bug_and_none_gives_the_correct_model():
    images, _ = tiny_batch()
    everything = ["randn_class_token", *hf.BLOG_FIX_ORDER]
    hf.set_seeds(0)
    model = hf.vit_with_bugs(*everything, **TINY)
    assert any(isinstance(m, hf.TorchSelfAttention) for m in model.modules())
    assert not any(isinstance(m, (nn.GELU, nn.LayerNorm)) for m in model.modules())
    assert model.position_embedding.abs().max() == 0 and model.class_token.std() > 0.5
    hf.set_seeds(0)
    none = hf.vit_with_bugs(**TINY)
    assert hf.max_abs_difference(none.eval(), tiny_vit().eval(), images) < 1e-6


def test_the_blog_fix_order_is_position_embeddings_activations_layer_norms_batch_first():
    assert hf.BLOG_FIX_ORDER == ("no_position_embeddings", "mlp_without_activation", "layer_norm_mean_over_std",
                                 "attention_batch_first_false")


def test_vit_with_bugs_rejects_an_unknown_bug():
    with pytest.raises(ValueError, match="unknown bug 'typo'"):
        hf.vit_with_bugs("no_position_embeddings", "typo")


# --- the general toolkit --------------------------------------------------------------------------------------------

def test_initial_loss_is_about_ln_num_classes():
    images, labels = tiny_batch(size=64)
    assert abs(hf.initial_loss(tiny_vit(), images, labels) - math.log(10)) < 0.3


def test_initial_loss_leaves_the_training_mode_alone():
    model = tiny_vit().train()
    hf.initial_loss(model, *tiny_batch())
    assert model.training


def test_gradient_norms_cover_every_trainable_parameter_and_leave_no_gradients():
    model = tiny_vit()
    norms = hf.gradient_norms(model, *tiny_batch())
    assert list(norms) == [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(value > 0 for value in norms.values())
    assert all(p.grad is None for p in model.parameters())


def test_gradient_norms_skip_frozen_parameters():
    norms = hf.gradient_norms(tiny_vit("no_position_embeddings"), *tiny_batch())
    assert "position_embedding" not in norms


def test_vit_with_bugs_rejects_a_single_unknown_bug():
    with pytest.raises(ValueError, match="unknown bug"):
        hf.vit_with_bugs("off_by_one")


@pytest.mark.parametrize("bug", ["layer_norm_mean_over_std", "no_position_embeddings", "mlp_without_activation",
                                 "randn_class_token"])
def test_bugs_keep_the_state_dict_keys(bug):
    assert list(tiny_vit(bug).state_dict()) == list(tiny_vit().state_dict())


def test_plot_bug_vs_fix_draws_loss_and_accuracy(history):
    import matplotlib.pyplot as plt

    fig = hf.plot_bug_vs_fix({"bug": history, "fix": history}, title="test")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3  # two runs and the ln(10) line
    plt.close(fig)


def test_plot_fix_sequences_draws_one_line_per_sequence_on_each_panel(history):
    import matplotlib.pyplot as plt

    steps = {"all bugs": history, "+ fix": history, "+ other fix": history}
    fig = hf.plot_fix_sequences({"blog's order": steps, "reversed": steps}, title="test")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3 and len(fig.axes[1].lines) == 2  # + the ln(10) line
    plt.close(fig)
