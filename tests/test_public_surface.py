"""helper_functions.py holds what the notebooks teach and nothing else: its ``__all__`` is a table of contents, in the
notebooks' order; the machinery (torchrun, downloads, unpicklers, the command line, locks, atomic writes, digests)
stays in machinery.py, which never imports helper_functions; and the model and the scripts stay short enough to read.
"""
import ast
import inspect
import json
from pathlib import Path

import pytest

import helper_functions as hf
import machinery

REPO = Path(__file__).resolve().parents[1]


def test_every_name_in_all_is_in_the_module_once_and_there_are_at_most_110():
    assert len(hf.__all__) == len(set(hf.__all__)) <= 110
    assert [name for name in hf.__all__ if not hasattr(hf, name)] == []


def test_every_public_function_and_class_defined_in_helper_functions_is_in_all():
    defined = [name for name, value in vars(hf).items() if not name.startswith("_")
               and (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == hf.__name__]
    assert [name for name in defined if name not in hf.__all__] == []


def test_all_is_in_the_order_the_module_defines_its_names():
    lines = {name: inspect.getsourcelines(value)[1] for name in hf.__all__
             if (inspect.isfunction(value := getattr(hf, name)) or inspect.isclass(value))
             and value.__module__ == hf.__name__}
    assert list(lines) == sorted(lines, key=lines.get)


def test_helper_functions_does_not_reexport_machinerys_private_names():
    private = {name: value for name, value in vars(machinery).items()
               if name.startswith("_") and not name.startswith("__")}
    assert [name for name in vars(hf) if name in private] == []
    assert [name for name, value in vars(hf).items()
            if callable(value) and any(value is other for other in private.values() if callable(other))] == []


def test_machinery_is_not_part_of_the_public_surface():
    assert [name for name, value in vars(hf).items() if not name.startswith("_") and value is machinery] == []
    from_machinery = [name for name in hf.__all__ if getattr(getattr(hf, name), "__module__", None) == "machinery"]
    assert from_machinery == []


@pytest.mark.parametrize("module", ["machinery.py", "figures.py"])
def test_the_modules_helper_functions_uses_never_import_it(module):
    tree = ast.parse((REPO / module).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "helper_functions" not in imported


def test_a_learner_opening_helper_functions_meets_no_argparse_lock_or_deb_parser():
    source = (REPO / "helper_functions.py").read_text()
    assert all(word not in source for word in ("import argparse", "fcntl", "ar magic", "def run_lock", "def deb_"))


@pytest.mark.parametrize("part, most", [("PatchEmbedding", 22), ("MultiHeadSelfAttention", 30), ("MLPBlock", 15),
                                        ("TransformerEncoderBlock", 20)])
def test_the_model_reads_like_the_equations_each_block_short(part, most):
    assert len(inspect.getsource(getattr(hf, part)).splitlines()) <= most


def test_notebook_05s_whole_vit_cell_and_the_scripts_stay_short():
    notebook = json.loads((REPO / "notebooks" / "05_vision_transformer.ipynb").read_text())
    cell = next(cell for cell in notebook["cells"] if "class ViT(nn.Module)" in "".join(cell["source"]))
    assert len("".join(cell["source"]).splitlines()) <= 135  # two screens; Eq. 6 got its own method in issue 27
    assert len((REPO / "train.py").read_text().splitlines()) <= 160
    assert len((REPO / "helper_functions.py").read_text().splitlines()) <= 2000
