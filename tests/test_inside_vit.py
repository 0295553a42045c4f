"""Section 8's tools for looking inside a trained ViT (notebook 08): each checked on a case whose answer is known."""
import torch

import helper_functions as hf


def _small_vit() -> hf.ViT:
    torch.manual_seed(0)
    return hf.vit_from_config("vit_mnist", num_layers=2).eval()


def test_attention_maps_are_what_each_block_computes_from_its_layernorm_output_and_leave_no_hooks():
    model = _small_vit().train()
    images = torch.randn(2, 1, 28, 28)
    maps = hf.attention_maps(model, images)
    assert maps.shape == (2, 2, 4, 17, 17)  # (layers, batch, heads, 1 + 16 patches, 1 + 16 patches)
    with torch.no_grad():
        z, expected = model.embed(images), []
        model.eval()
        for block in model.encoder:
            expected.append(block.self_attention.attention_weights(block.ln_1(z)))
            z = block(z)
    assert torch.allclose(maps, torch.stack(expected), atol=1e-6)
    model.train()
    hf.attention_maps(model, images)
    assert model.training, "the model's mode is restored"
    assert all(not block.ln_1._forward_hooks for block in model.encoder), "hooks are removed"


def test_attention_rollout_of_tokens_attending_only_to_themselves_is_the_identity():
    attentions = torch.eye(5).expand(3, 2, 4, 5, 5)  # (layers, batch, heads, seq, seq)
    assert torch.allclose(hf.attention_rollout(attentions), torch.eye(5).expand(2, 5, 5))


def test_attention_rollout_mixes_through_the_layers_and_keeps_rows_summing_to_one():
    attentions = torch.softmax(torch.randn(3, 2, 4, 5, 5), dim=-1)
    rollout = hf.attention_rollout(attentions)
    assert torch.allclose(rollout.sum(dim=-1), torch.ones(2, 5))
    mixed = (0.5 * attentions.mean(2) + 0.5 * torch.eye(5))  # one layer by hand: heads averaged, residual added
    assert torch.allclose(hf.attention_rollout(attentions[:1]), mixed[0])


def test_mean_attention_distance_is_zero_for_self_attention_and_the_mean_pairwise_distance_for_uniform():
    eye = torch.eye(17).expand(1, 1, 2, 17, 17)  # a 4x4 grid of patches plus the class token
    assert torch.allclose(hf.mean_attention_distance(eye, patch_size=7), torch.zeros(1, 2))
    uniform = torch.full((1, 1, 1, 17, 17), 1 / 17)
    centres = torch.cartesian_prod(torch.arange(4.0), torch.arange(4.0)) * 7
    expected = torch.cdist(centres, centres).mean()
    assert torch.allclose(hf.mean_attention_distance(uniform, patch_size=7), expected.view(1, 1))


def test_position_embedding_similarity_is_one_on_the_diagonal_of_the_patch_grid():
    similarity = hf.position_embedding_similarity(_small_vit())
    assert similarity.shape == (4, 4, 4, 4)
    assert torch.allclose(torch.einsum("ijij->ij", similarity), torch.ones(4, 4))


def test_patch_embedding_components_find_the_direction_the_filters_vary_along():
    model = _small_vit()
    direction = torch.randn(49)
    with torch.no_grad():  # every filter = 1 + (its own multiple of one direction)
        model.patch_embedding.projection.weight.copy_((1 + torch.randn(64, 1) * direction).view(64, 1, 7, 7))
    components, explained = hf.patch_embedding_components(model, k=3)
    assert components.shape == (3, 1, 7, 7) and explained[0] > 0.999
    cosine = torch.nn.functional.cosine_similarity(components[0].flatten(), direction, dim=0)
    assert torch.isclose(cosine.abs(), torch.tensor(1.0), atol=1e-4)
