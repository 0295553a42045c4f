"""Notebook 11's bugs from the wild: each shipped in public code (its thread is named in each test), and each test
checks that the detector flags the buggy variant and passes the fixed one. Tiny models and random images keep the
whole file to a few seconds."""
import pytest
import torch
import torchvision
from torch import nn

import helper_functions as hf


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    """16 random 28x28 one-channel images, the same every time."""
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_attention_across_the_batch_is_caught(tiny_vit, images):
    """pytorch/examples #1184: nn.MultiheadAttention without batch_first=True gave every image the same output."""
    buggy = hf.use_torch_attention(tiny_vit(), batch_first=False).eval()
    with torch.no_grad():
        logits = buggy(images)
    assert (logits - logits[0]).abs().max() < 1e-5  # the reporter's symptom
    assert hf.encoder_batch_dependence(buggy, images) > 1e-2
    assert hf.encoder_batch_dependence(hf.use_torch_attention(tiny_vit(), batch_first=True).eval(), images) < 1e-5


def test_position_embedding_sized_by_the_batch_is_caught(tiny_vit, images):
    """pytorch/examples #1178: E_pos and the class token of shape (batch_size, 1, D)."""
    buggy = hf.plant_wild_bug(tiny_vit(), "batch_sized_embeddings", batch_size=len(images))
    assert tuple(buggy.position_embedding.shape) == (len(images), 1, 16)
    assert hf.patch_order_sensitivity(buggy, images) < 1e-5  # one vector for every token: blind to where a patch was
    assert hf.patch_order_sensitivity(tiny_vit(), images) > 1e-3
    with pytest.raises(RuntimeError):
        buggy(images[:1])  # and a batch of any other size fails
    tiny_vit()(images[:1])


@pytest.mark.parametrize("pool, unregistered", [("cls", ["class_token", "position_embedding"]),
                                                ("mean", ["position_embedding"])])
def test_parameters_copied_by_to_device_are_caught(tiny_vit, images, pool, unregistered):
    """pytorch/examples PR #1204: nn.Parameter(t).to(device) left plain tensors, neither trained nor saved."""
    buggy = hf.plant_wild_bug(tiny_vit(pool=pool), "unregistered_embeddings")
    assert hf.unregistered_tensors(buggy) == unregistered
    assert not set(unregistered) & set(buggy.state_dict())
    assert not any(p is buggy.position_embedding for p in buggy.parameters())
    buggy(images)  # it still runs: nothing but the check says so
    assert hf.unregistered_tensors(tiny_vit(pool=pool)) == []


def test_unregistered_tensors_names_them_by_their_module_path():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].scale = torch.ones(2)  # a plain tensor attribute
    model[0].register_buffer("mask", torch.ones(2))  # a buffer is registered: fine
    assert hf.unregistered_tensors(model) == ["0.scale"]


@pytest.mark.parametrize("bug", ["normalised_residual",  # d2l-ai/d2l-en PR #2283
                                 "norm_in_stream"])  # SHI-Labs/Compact-Transformers #25
def test_layer_norm_in_the_residual_stream_is_caught(tiny_vit, images, bug):
    """d2l's ViTBlock normalised its input and added the residuals to the copy; CCT's bad merge normalised the stream
    between the sub-layers. With the sub-layers silenced, Eqs. 2-3 are the identity and these are not."""
    assert hf.residual_identity_gap(hf.plant_wild_bug(tiny_vit(num_layers=2), bug), images) > 0.1
    assert hf.residual_identity_gap(tiny_vit(num_layers=2), images) == 0


def test_the_block_bugs_compute_what_the_public_code_computed(tiny_vit):
    tokens = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(0))
    correct = tiny_vit().encoder[0].eval()
    ln_1, ln_2, msa, mlp = correct.ln_1, correct.ln_2, correct.self_attention, correct.mlp
    with torch.no_grad():
        d2l = hf.plant_wild_bug(tiny_vit(), "normalised_residual").encoder[0].eval()(tokens)
        cct = hf.plant_wild_bug(tiny_vit(), "norm_in_stream").encoder[0].eval()(tokens)
        x = ln_1(tokens)
        assert torch.allclose(d2l, x + mlp(ln_2(x + msa(x))), atol=1e-6)
        z = ln_2(tokens + msa(ln_1(tokens)))
        assert torch.allclose(cct, z + mlp(z), atol=1e-6)


@pytest.mark.parametrize("bug", ["scaled_by_width",  # lucidrains/vit-pytorch #65
                                 "softmax_over_queries"])  # nerminnuraydogan/vision-transformer #1
def test_attention_slips_are_caught_by_the_reference(tiny_vit, images, bug):
    """Scores divided by sqrt(D) instead of sqrt(D_h), or a softmax over the queries: both differ from
    nn.MultiheadAttention holding the same weights."""
    assert hf.attention_reference_gap(hf.plant_wild_bug(tiny_vit(), bug), images) > 1e-3
    assert hf.attention_reference_gap(tiny_vit(), images) < 1e-5


def test_softmax_over_queries_normalises_columns_not_rows(tiny_vit):
    tokens = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        A = hf.plant_wild_bug(tiny_vit(), "softmax_over_queries").encoder[0].self_attention.attention_weights(tokens)
        scaled = hf.plant_wild_bug(tiny_vit(), "scaled_by_width").encoder[0].self_attention
        q, k, _ = scaled.queries_keys_values(tokens)
    assert torch.allclose(A.sum(dim=-2), torch.ones(1)) and not torch.allclose(A.sum(dim=-1), torch.ones(1))
    expected = torch.softmax(q @ k.transpose(-2, -1) / 16 ** 0.5, dim=-1)  # sqrt(D) = 4, not sqrt(D_h) = sqrt(8)
    assert torch.allclose(scaled.attention_weights(tokens), expected, atol=1e-6)


def test_vit_pytorch_0_2_7_layout_counts_the_threads_91_million():
    """lucidrains/vit-pytorch #39: 91,206,376 parameters for ViT-B against Table 1's 86M."""
    with torch.device("meta"):  # shapes only
        ours = hf.vit_from_config("vit_b_16")
        theirs = hf.plant_wild_bug(hf.vit_from_config("vit_b_16"), "vit_pytorch_0_2_7_layout")
    paper = hf.PAPER_PARAMS["vit_b_16"]
    assert hf.count_parameters(theirs) == 91_206_376
    assert abs(hf.count_parameters(theirs) / paper - 1) > 0.05
    assert abs(hf.count_parameters(ours) / paper - 1) < 0.01


def _torchvision_vit(num_classes=1000):
    return torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=num_classes)


def test_a_replaced_torchvision_head_is_caught_before_loading():
    """mrdbourke/pytorch-deep-learning #1221: model.heads = nn.Linear(...) saves heads.* where vit_b_16 has
    heads.head.*."""
    fine_tuned = _torchvision_vit()
    fine_tuned.heads = nn.Linear(16, 3)
    saved = fine_tuned.state_dict()
    with pytest.raises(ValueError, match=r"missing keys: \['heads.head.bias', 'heads.head.weight'\]"):
        hf.check_state_dict_fits(_torchvision_vit(num_classes=3), saved)
    rebuilt = _torchvision_vit()
    rebuilt.heads = nn.Linear(16, 3)  # fix 1: the structure it was saved with
    hf.check_state_dict_fits(rebuilt, saved)
    kept = _torchvision_vit()
    kept.heads.head = nn.Linear(16, 3)  # fix 2: keep torchvision's module paths
    hf.check_state_dict_fits(_torchvision_vit(num_classes=3), kept.state_dict())


def test_layer_norm_after_mean_pooling_differs_from_the_papers_order(tiny_vit, images):
    """lucidrains/vit-pytorch PR #274: LN(mean of tokens) is not mean(LN(tokens)); for the class token they agree."""
    for pool, differs in [("mean", True), ("cls", False)]:
        paper_order = hf.plant_wild_bug(tiny_vit(pool=pool), "norm_then_pool").eval()
        gap = hf.max_abs_difference(tiny_vit(pool=pool).eval(), paper_order, images)
        assert (gap > 1e-3) == differs
    reference = hf.plant_wild_bug(tiny_vit(pool="mean"), "norm_then_pool").eval()
    with torch.no_grad():
        tokens = reference.norm(reference.encoder(reference.embed(images)))
        assert torch.allclose(reference.features(images), tokens.mean(dim=1))


@pytest.mark.parametrize("inject", [
    lambda model: hf.plant_wild_bug(model, "normalised_residual"),
    lambda model: hf.plant_wild_bug(model, "softmax_over_queries"),
    lambda model: hf.plant_wild_bug(model, "norm_then_pool"),
])
def test_the_injectors_keep_the_weights_and_their_names(tiny_vit, inject):
    correct = tiny_vit().state_dict()
    buggy = inject(tiny_vit()).state_dict()
    assert list(buggy) == list(correct) and all(torch.equal(buggy[key], correct[key]) for key in correct)


def test_an_unknown_bug_is_named_with_the_choices(tiny_vit):
    with pytest.raises(ValueError, match="bug must be one of"):
        hf.plant_wild_bug(tiny_vit(), "softmax_over_keys")
    with pytest.raises(ValueError, match="bug must be one of"):
        hf.plant_wild_bug(tiny_vit(), "post_norm")
    with pytest.raises(ValueError, match="needs batch_size="):
        hf.plant_wild_bug(tiny_vit(), "batch_sized_embeddings")
