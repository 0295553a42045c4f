"""Every notebook runs alone, as a learner opens it from its Colab badge: a fresh copy of the repository with an empty
runs/, the notebook executed from its first cell. Notebooks 08 and 09 load a model that an earlier notebook trains;
with runs/ empty, their own cell trains it through the module. That is the first path a Colab learner takes, and one
nbval never takes (notebook 07 has written the file by then). And the Colab setup cell as Colab runs it:
``google.colab`` imported, no repository around, the clone made from a local URL.

Each notebook runs up to and including its loading cell: the cells after it check the trained model's accuracy, which
nbval checks on the real run. The one cell the test adds, after the setup cell, links the datasets this machine
already has and shrinks the module's recipe to one epoch on 256 images; every other cell is the notebook's own.
"""
import re
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

import helper_functions as hf
from conftest import REPO

# notebook -> (the call that loads an earlier notebook's run, or trains it; the module's recipe that call trains; the
# file it saves in runs/).
LOADS = {
    "08_what_the_vit_learned": ("hf.get_trained_vit()", "MNIST_RECIPE", "notebook07_vit_mnist.pth"),
    "09_transfer_learning": ("hf.get_trained_vit(hf.PRETRAIN_RECIPE)", "PRETRAIN_RECIPE",
                             "vit_fashion_mnist_pretrained.pth"),
}
SMALLER = dict(epochs=1, subset=256, warmup_epochs=0)  # seconds instead of minutes; the code path is the same


def _fresh_copy(destination):
    """The repository as a fresh clone has it (files tracked, or new and not ignored): no runs/, no data."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a file deleted but not yet committed is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes((REPO / name).read_bytes())
    return destination


def _added_cell(recipe: str) -> nbformat.NotebookNode:
    datasets = {path.name: str(path.resolve()) for path in (REPO / "data").iterdir() if path.is_dir()}
    return nbformat.v4.new_code_cell(
        "# Added by tests/test_notebooks_alone.py: the datasets this machine has, and a smaller recipe\n"
        "import helper_functions as hf\n\n"
        f"for name, folder in {datasets!r}.items():\n"
        "    if not (hf.DATA_DIR / name).exists():\n"
        "        (hf.DATA_DIR / name).symlink_to(folder)\n"
        f"hf.{recipe}.update({SMALLER!r})")


def _run_up_to_the_loading_cell(name: str, start_in, in_colab_with_clone_url: str | None = None) -> list:
    """Execute notebook ``name`` with the kernel started in ``start_in``, from its first cell to its loading cell;
    returns the executed cells. In Colab mode a stand-in ``google.colab`` is imported first, and the setup cell clones
    from ``in_colab_with_clone_url`` into ``start_in`` (Colab's /content)."""
    call, recipe, _ = LOADS[name]
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    setup, loading = code[0], next(index for index in code if call in notebook.cells[index].source)
    cells = [*notebook.cells[:setup + 1], _added_cell(recipe), *notebook.cells[setup + 1:loading + 1]]
    if in_colab_with_clone_url:
        source = re.sub(r'"https://github\.com/[\w.-]+/[\w.-]+"', f'"{in_colab_with_clone_url}"', cells[setup].source)
        cells[setup] = nbformat.v4.new_code_cell(source.replace('"/content/', f'"{start_in}/'))
        cells.insert(setup, nbformat.v4.new_code_cell(
            "import sys, types\n\nsys.modules['google.colab'] = types.ModuleType('google.colab')  # as in Colab"))
    notebook.cells = cells
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(start_in)}}
                   ).execute()  # raises CellExecutionError, naming the cell, if one fails
    return notebook.cells


def _assert_the_loading_cell_trained_and_saved(name: str, repository) -> None:
    _, recipe, run_file = LOADS[name]
    saved = repository / "runs" / run_file
    assert saved.exists(), f"{name}: the loading cell saved no run at {saved}"
    assert hf.load_checkpoint(saved)["recipe"] == {**getattr(hf, recipe), **SMALLER}, "trained now, not loaded"


@pytest.mark.parametrize("name", sorted(LOADS))
def test_notebook_runs_alone_from_an_empty_runs_folder(name, tmp_path):
    clone = _fresh_copy(tmp_path / "clone")
    _run_up_to_the_loading_cell(name, clone / "notebooks")
    _assert_the_loading_cell_trained_and_saved(name, clone)


def test_in_colab_the_setup_cell_clones_the_repository_and_the_notebook_runs_in_the_clone(tmp_path):
    origin = _fresh_copy(tmp_path / "origin")  # a local stand-in for GitHub
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-C", str(origin)]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the repository"]):
        subprocess.run([*git, *command], check=True, capture_output=True)
    content = tmp_path / "content"  # where Colab starts: no repository around
    content.mkdir()
    cells = _run_up_to_the_loading_cell("08_what_the_vit_learned", content, in_colab_with_clone_url=f"file://{origin}")
    clone = content / re.search(r'repo = pathlib\.Path\("[^"]*/([\w.-]+)"\)', cells[2].source)[1]
    assert (clone / ".git").is_dir(), "the setup cell cloned the repository"
    _assert_the_loading_cell_trained_and_saved("08_what_the_vit_learned", clone)
