"""Keep every notebook's "Open in Colab" badge and Colab setup cell in one form, written from this file.

    python tools/colab_cells.py                       # rewrite the badge and setup cell of every notebook
    python tools/colab_cells.py --repo owner/name     # ... pointing at another GitHub repository (a fork)
    python tools/colab_cells.py --check               # only read: exit 1 if anything is out of date (tests do this)

The repository's GitHub address comes from one place: git's remote ``origin`` when it points at GitHub, otherwise the
setting ``GITHUB_REPO`` below (for a copy without git). Both commands that write also set ``GITHUB_REPO`` to the
address they used, so the two never disagree; ``--check`` reports it if they do.

The badge opens the notebook's own file in Colab. The setup cell is each notebook's first code cell: in Colab it clones
the repository and installs the one package a learner needs that Colab lacks, at requirements.txt's version (never
torch: Colab has its own, built for its GPU); anywhere else it only puts the repository's top level on ``sys.path``
and prints nothing, so nbval compares it like any other cell. Only that cell's source and the badge are rewritten,
never an output: the stored ones stay valid.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
GITHUB_REPO = "vit-from-scratch/vit-from-scratch"  # owner/name on GitHub, used when git's origin does not say
SETTING = re.compile(r'^GITHUB_REPO = "([^"]*)"', re.MULTILINE)
BRANCH = "main"
COLAB_PACKAGES = ("einops",)  # what a learner needs and Colab lacks; it has torch, torchvision, numpy, matplotlib, tqdm
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
BADGE_LINE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n\n")


def origin_repo(repo_dir: Path | None = None) -> str | None:
    """``owner/name`` of git's remote ``origin`` if it points at GitHub (https or ssh), else None."""
    try:
        url = subprocess.run(["git", "-C", str(repo_dir or REPO_DIR), "remote", "get-url", "origin"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # no git here
    github = r"(?:https://(?:[^@/]+@)?|ssh://git@|git@)github\.com[/:]"  # https, with a token or not, and ssh
    match = re.fullmatch(github + r"([\w.-]+)/([\w.-]+?)(?:\.git)?/?", url)
    return f"{match[1]}/{match[2]}" if match else None


def setting(repo_dir: Path | None = None) -> str:
    """The value of ``GITHUB_REPO`` as written in ``tools/colab_cells.py``."""
    return SETTING.search(((repo_dir or REPO_DIR) / "tools" / "colab_cells.py").read_text())[1]


def repository(repo_dir: Path | None = None) -> str:
    """The repository's GitHub ``owner/name``: git's origin when it is on GitHub, else the ``GITHUB_REPO`` setting."""
    return origin_repo(repo_dir) or setting(repo_dir)


def pinned(packages: tuple[str, ...] = COLAB_PACKAGES, requirements: Path = REPO_DIR / "requirements.txt") -> list[str]:
    """``name==version`` of each package, as requirements.txt pins it."""
    pins = dict(line.strip().split("==") for line in requirements.read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    return [f"{name}=={pins[name]}" for name in packages]


def badge(notebook: str, repo: str | None = None) -> str:
    """The markdown badge that opens ``notebooks/<notebook>`` of ``repo`` (default ``repository()``) in Colab."""
    repo = repo or repository()
    return f"{BADGE}(https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook})"


def setup_cell(repo: str | None = None) -> str:
    """The first code cell of every notebook, cloning ``repo`` (default ``repository()``) in Colab."""
    repo = repo or repository()
    name = repo.split("/")[1]
    return f'''\
# Setup. In Colab: fetch this repository and the packages Colab lacks. Anywhere else: only find helper_functions.py.
import importlib.util
import os
import pathlib
import subprocess
import sys

if "google.colab" in sys.modules and not pathlib.Path("../helper_functions.py").exists():
    repo = pathlib.Path("/content/{name}")
    if not repo.exists():
        url = "https://github.com/{repo}"
        subprocess.run(["git", "clone", "--depth", "1", url, str(repo)], check=True)
    pins = {json.dumps(pinned())}
    missing = [pin for pin in pins if importlib.util.find_spec(pin.split("==")[0]) is None]
    if missing:  # never torch: Colab's own is built for its GPU
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    os.chdir(repo / "notebooks")
sys.path.insert(0, str(pathlib.Path.cwd().parent))  # helper_functions.py lives at the repository's top level'''


def _source_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def rewrite(path: Path, repo: str | None = None, write: bool = True) -> bool:
    """Put the badge on top of the notebook's first (title) cell and the setup cell first among its code cells;
    returns whether anything changed. The file is written only then, and only if ``write``."""
    repo = repo or repository()
    notebook = json.loads(path.read_text())
    cells = notebook["cells"]
    title = cells[0]
    if title["cell_type"] != "markdown":
        raise ValueError(f"{path.name}: the first cell should be the markdown title, where the badge goes")
    text = BADGE_LINE.sub("", "".join(title["source"]))
    new_title = _source_lines(f"{badge(path.name, repo)}\n\n{text}")
    first_code = next(cell for cell in cells if cell["cell_type"] == "code")
    new_setup = _source_lines(setup_cell(repo))
    if title["source"] == new_title and first_code["source"] == new_setup:
        return False
    title["source"], first_code["source"] = new_title, new_setup
    if write:
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return True


def set_setting(repo: str) -> bool:
    """Write ``repo`` as the ``GITHUB_REPO`` setting in ``tools/colab_cells.py``; returns whether it changed."""
    tool = REPO_DIR / "tools" / "colab_cells.py"
    text = tool.read_text()
    if SETTING.search(text)[1] == repo:
        return False
    tool.write_text(SETTING.sub(f'GITHUB_REPO = "{repo}"', text, count=1))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", help="GitHub owner/name [git's origin if it is on GitHub, else GITHUB_REPO]")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is out of date")
    args = parser.parse_args(argv)
    if args.repo is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo):
        parser.error(f"--repo {args.repo!r} is not of the form owner/name")
    repo = args.repo or repository()
    notebooks = sorted((REPO_DIR / "notebooks").glob("*.ipynb"))
    if args.check:
        stale = [path.name for path in notebooks if rewrite(path, repo, write=False)]
        if setting() != repo:
            stale.insert(0, f"tools/colab_cells.py (GITHUB_REPO = {setting()!r}, the repository is {repo!r})")
        if stale:
            print(f"out of date for {repo}: {', '.join(stale)}; run python tools/colab_cells.py", file=sys.stderr)
            return 1
        return 0
    if set_setting(repo):
        print(f"GITHUB_REPO = {repo!r} in tools/colab_cells.py")
    for path in notebooks:
        if rewrite(path, repo):
            print(f"rewrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
