"""Every notebook opens in Colab: a badge pointing at its own file in this repository, and a first code cell that, only
in Colab, fetches the repository and the one package a learner needs that Colab lacks (never torch). Outside Colab that
cell changes nothing and prints nothing, so nbval compares it like any other cell. In Colab, whose torch is not the
pinned one, notebook 00 reports the difference instead of stopping, and the fallback training uses Colab's GPU."""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import helper_functions as hf
from conftest import NOTEBOOKS, REPO
from tools import colab_cells


def _cells(path: Path) -> tuple[dict, dict]:
    cells = json.loads(path.read_text())["cells"]
    return cells[0], next(cell for cell in cells if cell["cell_type"] == "code")


@pytest.fixture
def no_origin(monkeypatch):
    """A clone of a fork or a renamed copy still passes: these tests check the files agree with GITHUB_REPO.
    (``tools/colab_cells.py --check`` also compares the setting with git's origin, for maintainers.)"""
    monkeypatch.setattr(colab_cells, "origin_repo", lambda repo_dir=None: None)


def test_every_notebook_carries_the_current_badge_and_setup_cell(no_origin):
    assert colab_cells.main(["--check"]) == 0, "run python tools/colab_cells.py"


def test_badges_clone_urls_and_the_setting_name_one_repository(no_origin):
    repo = colab_cells.setting()
    badges, clones = set(), set()
    for path in NOTEBOOKS:
        title, setup = _cells(path)
        badge = r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/"
        badges |= set(re.findall(badge, "".join(title["source"])))
        clones |= set(re.findall(r'url = "https://github\.com/([\w.-]+/[\w.-]+)"', "".join(setup["source"])))
    assert badges == clones == {repo}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_badge_opens_this_notebook_and_the_setup_cell_runs_first(path):
    title, setup = _cells(path)
    url = f"https://colab.research.google.com/github/{colab_cells.repository()}/blob/main/notebooks/{path.name}"
    assert "".join(title["source"]).startswith(f"{colab_cells.BADGE}({url})")
    assert "".join(setup["source"]) == colab_cells.setup_cell()
    assert setup["execution_count"] == 1 and setup["outputs"] == [], "a stored, compared run of the cell: no output"


@pytest.mark.parametrize("url, repo", [
    ("https://github.com/someone/vit.git", "someone/vit"),
    ("https://github.com/someone/vit", "someone/vit"),
    ("https://x-access-token:abc@github.com/someone/vit.git", "someone/vit"),
    ("git@github.com:someone/vit.git", "someone/vit"),
    ("ssh://git@github.com/someone/vit.git", "someone/vit"),
    ("https://gitlab.com/someone/vit.git", None),
    ("/some/local/path", None),
    ("", None),  # no origin
])
def test_the_address_comes_from_a_github_origin_else_from_the_setting(url, repo, monkeypatch):
    monkeypatch.setattr(colab_cells.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 0 if url else 2, url + "\n"))
    assert colab_cells.origin_repo() == repo
    assert colab_cells.repository() == (repo or colab_cells.setting())


def test_colab_installs_only_what_a_learner_needs_at_requirements_txt_versions():
    pins = colab_cells.pinned()
    assert [pin.split("==")[0] for pin in pins] == ["einops"], "never torch (Colab's own), never test tools"
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
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if einops were not installed
    content = tmp_path / "content"
    repo = colab_cells.repository()
    source = colab_cells.setup_cell().replace('"/content/', f'"{content}/')
    recorded: list = []
    _run_setup_cell(source, recorded, monkeypatch)
    clone, install = recorded
    assert clone == ["git", "clone", "--depth", "1", f"https://github.com/{repo}", str(content / repo.split("/")[1])]
    assert install[1:5] == ["-m", "pip", "install", "--quiet"] and install[5:] == colab_cells.pinned()
    assert not any(arg.startswith("torch") for arg in install), "never a second torch"
    assert Path.cwd() == Path(clone[-1]) / "notebooks" and sys.path[0] == clone[-1]

    recorded.clear()  # run again (a second notebook in the same Colab session): the clone is there, nothing to fetch
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    _run_setup_cell(source, recorded, monkeypatch)
    assert recorded == []


def _notebook_cell(notebook: str, first_line: str) -> str:
    cells = json.loads((REPO / "notebooks" / notebook).read_text())["cells"]
    return next("".join(cell["source"]) for cell in cells
                if cell["cell_type"] == "code" and "".join(cell["source"]).startswith(first_line))


def test_in_a_runtime_whose_torch_differs_from_the_pin_notebook_00_reports_it_and_goes_on():
    source = _notebook_cell("00_setup_and_data.ipynb", "# 1. Installed versions against requirements.txt")
    colab = {name: types.SimpleNamespace(__name__=name, __version__=version) for name, version in
             [("torch", "2.9.0+cu126"), ("torchvision", "0.24.0+cu126"), ("einops", "0.8.2"), ("matplotlib", "3.10.0")]}
    pinned = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<notebook 00>", "exec"), {"hf": hf, **colab})  # no AssertionError
    assert printed.getvalue().splitlines() == [
        f"differs from requirements.txt: torch 2.9.0+cu126 (pinned {pinned['torch']}), "
        f"torchvision 0.24.0+cu126 (pinned {pinned['torchvision']}), matplotlib 3.10.0 (pinned {pinned['matplotlib']})",
        "the notebooks still run; the last digits of some stored numbers may differ from yours"]

    what_matters = _notebook_cell("00_setup_and_data.ipynb", "# 1. What the notebooks depend on")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(what_matters, "<notebook 00>", "exec"), {"torch": torch})  # passes on this torch
        with pytest.raises(AssertionError, match="need torch 2 or newer"):
            exec(compile(what_matters, "<notebook 00>", "exec"),
                 {"torch": types.SimpleNamespace(__version__="1.13.1+cu117")})


def test_on_a_gpu_runtime_the_fallback_training_uses_best_device(monkeypatch, tmp_path, history):
    gpu = torch.device("meta")  # stands in for Colab's cuda: anything but the CPU
    monkeypatch.setattr(hf, "best_device", lambda: gpu)
    used = []
    monkeypatch.setattr(hf, "parallelize", lambda model, device, compile=False: used.append(device) or model)
    monkeypatch.setattr(hf, "train", lambda model, *args, **kwargs: history)
    model = hf.replace_head(hf.vit_from_config("vit_mnist"), num_classes=10)
    digits = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.arange(8) % 10)
    hf.fine_tune(model, digits, digits, epochs=1, warmup_epochs=0, progress=False)

    class FakeSetup:  # TrainingSetup without the data and the hours
        def __init__(self, device="cpu", **recipe):
            self.model, self.mean, self.std = hf.vit_from_config("vit_mnist"), 0.5, 0.5
            self.val_loader, self.val_indices = None, None  # no validation set: nothing to test at the end
            used.append(device)

        def train(self, **kwargs):
            return dict(history)

        def add_final_test(self, results):
            return results

    monkeypatch.setattr(hf, "TrainingSetup", FakeSetup)
    model, _ = hf.get_trained_vit(hf.PRETRAIN_RECIPE, tmp_path / "pretrained.pth", progress=False)
    hf.get_trained_vit(path=tmp_path / "mnist.pth", progress=False)
    assert used == [gpu, gpu, gpu], "fine_tune and get_trained_vit (twice) all train on best_device()"
    assert not model.training, "returned in eval mode, ready for the notebook's plots"


def _copy_of_the_repository(tmp_path: Path, monkeypatch) -> Path:
    """The notebooks, requirements.txt and the tool itself in ``tmp_path`` (not a git checkout: no origin)."""
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "colab_cells.py", tmp_path / "tools" / "colab_cells.py")
    shutil.copy(REPO / "requirements.txt", tmp_path / "requirements.txt")
    monkeypatch.setattr(colab_cells, "REPO_DIR", tmp_path)
    monkeypatch.setattr(colab_cells, "origin_repo", lambda repo_dir=None: None)
    return tmp_path


def test_check_only_reads_even_when_everything_is_out_of_date(tmp_path, monkeypatch, capsys):
    copy = _copy_of_the_repository(tmp_path, monkeypatch)
    (copy / "tools" / "colab_cells.py").write_text(
        colab_cells.SETTING.sub('GITHUB_REPO = "someone/fork"', (copy / "tools" / "colab_cells.py").read_text()))
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in copy.rglob("*") if path.is_file()}
    assert colab_cells.main(["--check"]) == 1, "every notebook names the other repository"
    assert "run python tools/colab_cells.py" in capsys.readouterr().err
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in copy.rglob("*") if path.is_file()} == before


def test_repo_rewrites_the_setting_badges_and_clone_url_but_never_an_output(tmp_path, monkeypatch, capsys):
    copy = _copy_of_the_repository(tmp_path, monkeypatch)
    outputs = {path.name: [cell.get("outputs") for cell in json.loads(path.read_text())["cells"]]
               for path in (copy / "notebooks").glob("*.ipynb")}
    assert colab_cells.main(["--repo", "someone/fork"]) == 0
    assert colab_cells.setting() == "someone/fork" == colab_cells.repository()
    for path in (copy / "notebooks").glob("*.ipynb"):
        title, setup = _cells(path)
        assert f"github/someone/fork/blob/main/notebooks/{path.name}" in title["source"][0]
        assert 'url = "https://github.com/someone/fork"' in "".join(setup["source"])
        assert [cell.get("outputs") for cell in json.loads(path.read_text())["cells"]] == outputs[path.name]
    assert colab_cells.main(["--check"]) == 0, "the setting now says where the notebooks point"
    with pytest.raises(SystemExit):
        colab_cells.main(["--repo", "not a repo"])
    assert "not of the form owner/name" in capsys.readouterr().err
