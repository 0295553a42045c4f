"""tools/clean_notebooks.py on a small made-up notebook: it removes timestamps, dead widget outputs and nbval's marker
comments (as tags nbval reads), collapses exercise solutions, shrinks figures, keeps everything else, changes nothing
the second time, and its --check names each unclean notebook and what is unclean without writing. Then the check over
the repository's own notebooks, as CI runs it."""
import base64
import io
import json

import matplotlib.pyplot as plt
import nbformat
import pytest
from nbval.plugin import find_comment_markers, find_metadata_tags

from conftest import NOTEBOOKS
from tools import clean_notebooks

TIMESTAMPS = {"iopub.execute_input": "2026-11-25T03:38:22.971660Z", "shell.execute_reply": "2026-11-25T03:38:22.98Z"}
FROZEN_BAR = "epoch 1:   0%|          | 0/430 [00:00<?, ?it/s]"


def _figure_png() -> str:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [2, 0, 1], marker="o", label="loss")
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _widget(text: str) -> dict:
    return nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "65633b09", "version_major": 2, "version_minor": 0},
        "text/plain": text})


def _notebook() -> nbformat.NotebookNode:
    """A title, a volatile cell behind a marker comment, a training cell with progress-bar widgets, a figure, and an
    exercises section with one exercise (its solution: a markdown cell and a code cell)."""
    cells = [
        nbformat.v4.new_markdown_cell("# 99 · A made-up notebook"),
        nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\n# the time varies from run to run\nprint(time.time())",
                                  execution_count=1, metadata={"execution": TIMESTAMPS},
                                  outputs=[nbformat.v4.new_output("stream", name="stdout", text="1764041902.9\n")]),
        nbformat.v4.new_code_cell("results = hf.train(model)", execution_count=2,
                                  outputs=[_widget(FROZEN_BAR), _widget("HBox(children=(FloatProgress(value=0.0),))"),
                                           _widget("trained 9 epochs"),
                                           nbformat.v4.new_output("stream", name="stdout", text="epoch 1/9: 0.98\n")]),
        nbformat.v4.new_code_cell("hf.plot_loss_curves(results)", execution_count=3, outputs=[
            nbformat.v4.new_output("display_data", data={"image/png": _figure_png(), "text/plain": "<Figure>"})]),
        nbformat.v4.new_markdown_cell("## Exercises\n\nTry each one before you read the solution under it."),
        nbformat.v4.new_markdown_cell("### Exercise 1 (easy): count the parameters\n\nHow many are there?"),
        nbformat.v4.new_markdown_cell("**Solution.** Two weight matrices and two biases."),
        nbformat.v4.new_code_cell("# Exercise 1\nprint(2 * 3)", execution_count=4,
                                  outputs=[nbformat.v4.new_output("stream", name="stdout", text="6\n")]),
        nbformat.v4.new_markdown_cell("Next, notebook 100."),
    ]
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={"widgets": {"application/vnd.jupyter.widget-state+json":
                                                                           {"state": {}}}})
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index}"
    return notebook


@pytest.fixture
def unclean(tmp_path):
    path = tmp_path / "99_made_up.ipynb"
    path.write_text(nbformat.writes(_notebook()) + "\n")
    return path


def test_cleaning_removes_what_a_run_leaves_behind_and_keeps_the_lesson(unclean):
    before = nbformat.read(unclean, as_version=4)
    assert clean_notebooks.main([str(unclean)]) == 0
    after = nbformat.read(unclean, as_version=4)
    title, volatile, training, figure, exercises, question, prose, code, outro = after.cells

    assert "execution" not in volatile.metadata and "widgets" not in after.metadata
    assert volatile.source == "# the time varies from run to run\nprint(time.time())", "only the marker line went"
    assert volatile.metadata.tags == ["nbval-ignore-output"]
    assert dict(find_metadata_tags(volatile.metadata)) == {"check": False}, "nbval ignores its output, as before"
    assert dict(find_comment_markers(before.cells[1].source)) == {"check": False}

    assert [output.get("data", {}).get("text/plain", output.get("text")) for output in training.outputs] == [
        "trained 9 epochs", "epoch 1/9: 0.98\n"], "frozen bars and widget reprs go; text with meaning stays, as text"
    assert all("application/vnd.jupyter.widget-view+json" not in output.get("data", {}) for output in training.outputs)

    png = base64.b64decode(figure.outputs[0].data["image/png"])
    assert png[25] == 3, "a palette PNG (colour type 3)"
    assert len(png) < len(base64.b64decode(before.cells[3].outputs[0].data["image/png"])), "and smaller"

    assert [clean_notebooks.solution_cells(after)] == [[prose, code]]
    for cell in (prose, code):
        assert cell.metadata.jupyter == {"source_hidden": True} and cell.metadata.tags == ["hide-input"]
    assert code.outputs == before.cells[7].outputs, "a solution's output stays shown"
    for kept in (title, exercises, question, outro):
        assert kept == before.cells[after.cells.index(kept)], "cells outside the rules are untouched"


def test_cleaning_twice_changes_nothing_and_keeps_nbformats_layout(unclean):
    clean_notebooks.main([str(unclean)])
    once = unclean.read_text()
    assert once == json.dumps(json.loads(once), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    assert clean_notebooks.main([str(unclean)]) == 0
    assert unclean.read_text() == once
    assert clean_notebooks.main(["--check", str(unclean)]) == 0


def test_check_names_the_notebook_and_what_is_unclean_and_writes_nothing(unclean, capsys):
    before = unclean.read_bytes()
    assert clean_notebooks.main(["--check", str(unclean)]) == 1
    err = capsys.readouterr().err
    assert unclean.read_bytes() == before
    assert err.startswith("99_made_up.ipynb: ")
    for problem in ("execution metadata in 1 cell", "the notebook's widgets metadata", "3 widget outputs",
                    "1 nbval marker comment", "2 solution cells not collapsed", "1 figure to re-encode"):
        assert problem in err
    assert "run python tools/clean_notebooks.py" in err


def test_a_marker_comment_nbval_does_not_read_is_named_not_guessed(tmp_path, capsys):
    notebook = _notebook()
    notebook.cells[1].source = "# NBVAL_IGNORE_OUTPUT (the time varies)\nprint(time.time())"
    path = tmp_path / "98_typo.ipynb"
    path.write_text(nbformat.writes(notebook) + "\n")
    assert clean_notebooks.main([str(path)]) == 1, "the other rules apply, but the author must fix that line"
    assert "cell 1: '# NBVAL_IGNORE_OUTPUT (the time varies)' is not a marker nbval reads" in capsys.readouterr().err
    assert nbformat.read(path, as_version=4).cells[1].source.startswith("# NBVAL_IGNORE_OUTPUT (the time varies)")


def test_every_nbval_marker_becomes_the_tag_nbval_reads_for_it():
    for marker, tag in clean_notebooks.NBVAL_TAGS.items():
        assert dict(find_metadata_tags({"tags": [tag]})) == dict(find_comment_markers(f"# {marker}")), marker


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_notebook_is_clean(path):
    cleaned, to_fix = clean_notebooks.clean(path, write=False)
    assert not cleaned + to_fix, f"{path.name}: {'; '.join(cleaned + to_fix)}; run python tools/clean_notebooks.py"
