"""Section 8's tools for looking inside a trained ViT (notebook 08): each checked on a case whose answer is known, and
notebook 08's written-out copies checked to be the same code."""
import ast
import inspect
import json
from pathlib import Path

import torch

import helper_functions as hf


def test_attention_maps_are_what_each_block_computes_from_its_layernorm_output_and_leave_no_hooks(mnist_vit):
    model = mnist_vit(num_layers=2).train()
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


def test_position_embedding_similarity_is_one_on_the_diagonal_of_the_patch_grid(mnist_vit):
    similarity = hf.position_embedding_similarity(mnist_vit(num_layers=2).eval())
    assert similarity.shape == (4, 4, 4, 4)
    assert torch.allclose(torch.einsum("ijij->ij", similarity), torch.ones(4, 4))


def test_patch_embedding_components_find_the_direction_the_filters_vary_along(mnist_vit):
    model = mnist_vit(num_layers=2).eval()
    direction = torch.randn(49)
    with torch.no_grad():  # every filter = 1 + (its own multiple of one direction)
        model.patch_embedding.projection.weight.copy_((1 + torch.randn(64, 1) * direction).view(64, 1, 7, 7))
    components, explained = hf.patch_embedding_components(model, k=3)
    assert components.shape == (3, 1, 7, 7) and explained[0] > 0.999
    cosine = torch.nn.functional.cosine_similarity(components[0].flatten(), direction, dim=0)
    assert torch.isclose(cosine.abs(), torch.tensor(1.0), atol=1e-4)


# Notebook 08 writes each tool out in a definition cell; those cells are the helpers, character for character -------

NOTEBOOK_08 = Path(__file__).resolve().parents[1] / "notebooks" / "08_what_the_vit_learned.ipynb"
SECTION_8 = ("patch_embedding_components", "position_embedding_similarity", "attention_maps", "attention_rollout",
             "class_token_attention_map", "mean_attention_distance")
STANDARD_IMPORTS = ("import math, torch\nfrom torch import nn\nimport torch.nn.functional as F\n"
                    "from einops import rearrange, repeat\n")


def _definition_cells() -> dict[str, str]:
    """Notebook 08's code cells that define a section-8 tool: function name -> the cell's source."""
    cells = {}
    for cell in json.loads(NOTEBOOK_08.read_text())["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or source.startswith(("%", "!")):
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name in SECTION_8:
                cells[node.name] = source
    return cells


def test_notebook_08_shows_every_section_8_tool_with_the_helpers_exact_source():
    cells = _definition_cells()
    assert sorted(cells) == sorted(SECTION_8), "every tool of section 8 has its definition cell in notebook 08"
    for name, source in cells.items():
        tree = ast.parse(source)
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        lines = source.splitlines()
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        in_cell = "\n".join(lines[start:node.end_lineno])
        assert in_cell == inspect.getsource(getattr(hf, name)).rstrip("\n"), f"{name} drifted from helper_functions"


def test_notebook_08_definition_cells_run_alone_with_the_standard_imports_and_match_the_helpers(mnist_vit):
    model = mnist_vit(num_layers=2).eval()
    images = torch.randn(3, 1, 28, 28)
    for name, source in _definition_cells().items():
        assert "hf." not in source and "helper_functions" not in source, f"the cell defining {name} uses the helpers"
        namespace: dict = {}
        exec(STANDARD_IMPORTS + source, namespace)  # a fresh namespace: only the standard imports and the cell
        ours, theirs = namespace[name], getattr(hf, name)
        if name in ("attention_rollout", "mean_attention_distance"):
            attentions = hf.attention_maps(model, images)
            args = (attentions,) if name == "attention_rollout" else (attentions, 7)
        elif name in ("attention_maps", "class_token_attention_map"):
            args = (model, images)
        else:
            args = (model,)
        expected, got = theirs(*args), ours(*args)
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (expected, got))):
            assert torch.equal(a, b), name
