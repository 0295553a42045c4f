"""Every notebook opens in Colab: a badge pointing at its own file, and a first code cell that, only in Colab, fetches
the repository and the packages Colab lacks (never torch). Outside Colab that cell changes nothing and prints nothing,
so nbval compares it like any other cell."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tools import colab_cells

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _cells(path: Path) -> tuple[dict, dict]:
    cells = json.loads(path.read_text())["cells"]
    return cells[0], next(cell for cell in cells if cell["cell_type"] == "code")


def test_every_notebook_carries_the_current_badge_and_setup_cell():
    assert len(NOTEBOOKS) == 10
    assert colab_cells.main(["--check"]) == 0, "run python tools/colab_cells.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_badge_opens_this_notebook_and_the_setup_cell_runs_first(path):
    title, setup = _cells(path)
    url = f"https://colab.research.google.com/github/{colab_cells.GITHUB_REPO}/blob/main/notebooks/{path.name}"
    assert "".join(title["source"]).startswith(f"{colab_cells.BADGE}({url})")
    assert "".join(setup["source"]) == colab_cells.setup_cell()
    assert setup["execution_count"] == 1 and setup["outputs"] == [], "a stored, compared run of the cell: no output"


def test_colab_pins_are_requirements_txt_versions_and_never_torch():
    pins = colab_cells.pinned()
    assert [pin.split("==")[0] for pin in pins] == ["einops", "nbval"]
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert all(pin in requirements for pin in pins)


def _run_setup_cell(source: str, recorded: list, monkeypatch) -> None:
    """Execute the cell the way a kernel would, with subprocess.run recorded instead of run."""
    def fake_run(command, **kwargs):
        recorded.append(command)
        if command[:2] == ["git", "clone"]:
            (Path(command[-1]) / "notebooks").mkdir(parents=True)  # what the clone would leave
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards
    exec(compile(source, "<setup cell>", "exec"), {})


def test_outside_colab_the_setup_cell_only_finds_helper_functions(monkeypatch, capfd):
    monkeypatch.chdir(REPO / "notebooks")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    recorded: list = []
    _run_setup_cell(colab_cells.setup_cell(), recorded, monkeypatch)
    assert recorded == [], "nothing is cloned or installed"
    assert Path.cwd() == REPO / "notebooks"
    assert sys.path[0] == str(REPO)
    assert capfd.readouterr() == ("", ""), "no output, so nbval compares the cell"


def test_in_colab_the_setup_cell_clones_installs_what_is_missing_and_moves_into_the_notebooks(monkeypatch, tmp_path,
                                                                                                 capfd):
    monkeypatch.chdir(tmp_path)  # Colab starts in /content, with no repository around
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if neither package were installed
    content = tmp_path / "content"
    source = colab_cells.setup_cell().replace('"/content/', f'"{content}/')
    recorded: list = []
    _run_setup_cell(source, recorded, monkeypatch)
    clone, install = recorded
    assert clone == ["git", "clone", "--depth", "1", f"https://github.com/{colab_cells.GITHUB_REPO}",
                     str(content / colab_cells.GITHUB_REPO.split("/")[1])]
    assert install[1:5] == ["-m", "pip", "install", "--quiet"] and install[5:] == colab_cells.pinned()
    assert not any(arg.startswith("torch") for arg in install), "never a second torch"
    assert Path.cwd() == Path(clone[-1]) / "notebooks" and sys.path[0] == clone[-1]

    recorded.clear()  # run again (a second notebook in the same Colab session): the clone is there, nothing to fetch
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    _run_setup_cell(source, recorded, monkeypatch)
    assert recorded == []


def test_the_tool_rewrites_a_fork_and_refuses_a_malformed_name(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "notebooks"
    copy.mkdir()
    (copy / NOTEBOOKS[0].name).write_text(NOTEBOOKS[0].read_text())
    (tmp_path / "requirements.txt").write_text((REPO / "requirements.txt").read_text())
    monkeypatch.setattr(colab_cells, "REPO_DIR", tmp_path)
    assert colab_cells.main(["--repo", "someone/fork"]) == 0
    title, setup = _cells(copy / NOTEBOOKS[0].name)
    assert "github/someone/fork/blob/main/notebooks/" in title["source"][0]
    assert "https://github.com/someone/fork" in "".join(setup["source"])
    assert colab_cells.main(["--check"]) == 1, "the fork's notebook differs from the default"
    with pytest.raises(SystemExit):
        colab_cells.main(["--repo", "not a repo"])
    assert "not of the form owner/name" in capsys.readouterr().err
