"""The cells that build the model are copyable and are the code in helper_functions.py.

1. Every cell of notebooks 01-05 and 07 that defines an ``nn.Module`` subclass or a training/testing function runs
   alone in a fresh interpreter, with only the standard imports and without helper_functions.py on the path, and each
   module it defines can be built from its defaults (so nothing it needs is missing).
2. No drift: a class or function that a notebook defines under a name that helper_functions.py also has is, character
   for character, the helper's source (``inspect.getsource``), and each notebook defines the parts it teaches.
3. Teaching variants that must differ from the helper (the loop over heads) compute the same numbers.
"""
import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import helper_functions as hf
from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
STANDARD_IMPORTS = ("import math\nimport torch\nfrom torch import nn\nimport torch.nn.functional as F\n"
                    "from einops import rearrange, repeat\nfrom einops.layers.torch import Rearrange\n")
MODEL_NOTEBOOKS = ["01_patch_embedding", "02_multi_head_self_attention", "03_mlp_block", "04_transformer_encoder",
                   "05_vision_transformer"]
# What each notebook builds for reuse: the same source as helper_functions.py.
TAUGHT = {
    "01_patch_embedding": ["PatchEmbedding", "ImagePatches"],
    "02_multi_head_self_attention": ["MultiHeadSelfAttention", "batch_dependence"],
    "03_mlp_block": ["MLPBlock"],
    "04_transformer_encoder": ["TransformerEncoderBlock", "shared_parameters"],
    "05_vision_transformer": ["ViT", "count_parameters"],
}


def code_cells(name: str) -> list[tuple[int, str, ast.Module]]:
    """(index, source, parsed) of every code cell, with IPython's %magics and !shell lines left out."""
    notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    cells = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
            cells.append((index, source, ast.parse("\n".join(lines))))
    return cells


def is_definition(node: ast.stmt) -> bool:
    """An nn.Module subclass, or a function whose name says it trains or tests."""
    if isinstance(node, ast.ClassDef):
        return any("Module" in ast.unparse(base) or "Sequential" in ast.unparse(base) for base in node.bases)
    return isinstance(node, ast.FunctionDef) and ("train" in node.name or "test" in node.name)


def definition_cells(name: str) -> list[tuple[int, str]]:
    return [(index, source) for index, source, tree in code_cells(name) if any(map(is_definition, tree.body))]


def source_of(node: ast.stmt, source: str) -> str:
    """The lines of a top-level definition, decorators included, as ``inspect.getsource`` returns them."""
    first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    return "\n".join(source.splitlines()[first - 1:node.end_lineno])


# Run in a fresh interpreter: each cell in a namespace of its own, then build every module class from its defaults
# (on the meta device: shapes only, so even ViT-Base costs nothing).
RUNNER = textwrap.dedent("""
    import inspect, json, sys, traceback
    import torch
    results = {}
    for index, source in json.load(sys.stdin):
        namespace = {"__name__": "__main__"}
        try:
            exec(compile(STANDARD_IMPORTS + source, f"cell {index}", "exec"), namespace)
            for value in list(namespace.values()):
                if isinstance(value, type) and issubclass(value, torch.nn.Module) and value.__module__ == "__main__":
                    parameters = list(inspect.signature(value).parameters.values())
                    if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                           for p in parameters):
                        with torch.device("meta"):
                            value()
            results[index] = "ok"
        except Exception:
            results[index] = traceback.format_exc(limit=-3)
    print(json.dumps(results))
""")


@pytest.mark.parametrize("name", [
    *MODEL_NOTEBOOKS,
    "07_training_on_mnist",
])
def test_every_definition_cell_runs_alone_with_only_the_standard_imports(name, tmp_path):
    cells = definition_cells(name)
    assert cells, f"{name} has no cell that defines an nn.Module or a train/test function"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", f"STANDARD_IMPORTS = {STANDARD_IMPORTS!r}\n{RUNNER}"],
                            input=json.dumps(cells), capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    failures = {index: error for index, error in json.loads(result.stdout).items() if error != "ok"}
    assert not failures, "\n".join(f"{name} cell {index}:\n{error}" for index, error in failures.items())


def test_helper_functions_is_not_importable_in_the_fresh_interpreter(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", "import helper_functions"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert "No module named 'helper_functions'" in result.stderr


@pytest.mark.parametrize("name", MODEL_NOTEBOOKS)
def test_notebook_definitions_are_the_helper_source_character_for_character(name):
    defined = {}
    for index, source, tree in code_cells(name):
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and hasattr(hf, node.name):
                in_notebook = source_of(node, "\n".join(line for line in source.splitlines()
                                                        if not line.lstrip().startswith(("%", "!"))))
                in_helper = inspect.getsource(getattr(hf, node.name)).rstrip("\n")
                assert in_notebook == in_helper, f"{name} cell {index}: {node.name} differs from helper_functions.py"
                defined[node.name] = index
    missing = [part for part in TAUGHT[name] if part not in defined]
    assert not missing, f"{name} does not define {missing}, which it teaches"


def _namespace_of_cell_defining(name: str, notebook: str) -> dict:
    for _, source, tree in code_cells(notebook):
        if any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body):
            namespace = {}
            exec(STANDARD_IMPORTS + source, namespace)
            return namespace
    raise AssertionError(f"{notebook} defines no class {name}")


def test_notebook_02s_loop_over_heads_equals_the_vectorised_attention():
    loop = _namespace_of_cell_defining("MultiHeadSelfAttentionLoop", "02_multi_head_self_attention")
    torch.manual_seed(0)
    teaching = loop["MultiHeadSelfAttentionLoop"](32, 4).eval()
    vectorised = hf.MultiHeadSelfAttention(embedding_dim=32, num_heads=4).eval()
    vectorised.load_state_dict(teaching.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(teaching(x), vectorised(x), atol=1e-5, rtol=1e-5)


def test_notebook_04s_clones_makes_independent_copies():
    annotated = _namespace_of_cell_defining("EncoderLayer", "04_transformer_encoder")
    block = hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64)
    assert hf.shared_parameters(annotated["clones"](block, 3)) == []


def test_notebook_04s_annotated_transformer_layer_equals_our_block():
    annotated = _namespace_of_cell_defining("EncoderLayer", "04_transformer_encoder")
    torch.manual_seed(0)
    block = hf.TransformerEncoderBlock(embedding_dim=32, num_heads=4, mlp_size=64).eval()
    attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    feed_forward = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(64, 32))
    layer = annotated["EncoderLayer"](32, attention, feed_forward, dropout=0.1).eval()
    with torch.no_grad():
        attention.in_proj_weight.copy_(block.self_attention.qkv.weight)
        attention.in_proj_bias.copy_(block.self_attention.qkv.bias)
    attention.out_proj.load_state_dict(block.self_attention.out_proj.state_dict())
    feed_forward[0].load_state_dict(block.mlp[0].state_dict())
    feed_forward[3].load_state_dict(block.mlp[3].state_dict())
    layer.sublayer[0].norm.load_state_dict(block.ln_1.state_dict())
    layer.sublayer[1].norm.load_state_dict(block.ln_2.state_dict())
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=1e-5)
