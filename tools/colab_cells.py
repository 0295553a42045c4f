"""Keep every notebook's "Open in Colab" badge and Colab setup cell in one form, written from this file.

    python tools/colab_cells.py                       # rewrite the badge and setup cell of every notebook
    python tools/colab_cells.py --repo owner/name     # ... pointing at another GitHub repository (a fork)
    python tools/colab_cells.py --check               # exit 1 if any notebook differs (tests/test_colab.py checks it)

The badge opens the notebook's own file in Colab. The setup cell is each notebook's first code cell: in Colab it clones
the repository and installs the two packages Colab lacks, at requirements.txt's versions (never torch: Colab has its
own, built for its GPU); anywhere else it only puts the repository's top level on ``sys.path`` and prints nothing, so
nbval compares it like any other cell. Rewriting changes no outputs: the stored ones stay valid.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
GITHUB_REPO = "vit-from-scratch/vit-from-scratch"  # owner/name on GitHub; --repo rewrites every notebook for a fork
BRANCH = "main"
COLAB_PACKAGES = ("einops", "nbval")  # what Colab lacks; it has torch, torchvision, numpy, matplotlib, tqdm, jupyter
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
BADGE_LINE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n\n")


def pinned(packages: tuple[str, ...] = COLAB_PACKAGES, requirements: Path = REPO_DIR / "requirements.txt") -> list[str]:
    """``name==version`` of each package, as requirements.txt pins it."""
    pins = dict(line.strip().split("==") for line in requirements.read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    return [f"{name}=={pins[name]}" for name in packages]


def badge(notebook: str, repo: str = GITHUB_REPO) -> str:
    """The markdown badge that opens ``notebooks/<notebook>`` of ``repo`` in Colab."""
    return f"{BADGE}(https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook})"


def setup_cell(repo: str = GITHUB_REPO) -> str:
    """The first code cell of every notebook."""
    name = repo.split("/")[1]
    return f'''# Setup. In Colab: fetch this repository and the packages Colab lacks. Anywhere else: only find helper_functions.py.
import importlib.util, os, pathlib, subprocess, sys

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


def rewrite(path: Path, repo: str = GITHUB_REPO) -> bool:
    """Put the badge on top of the notebook's first (title) cell and the setup cell first among its code cells;
    returns whether anything changed (the file is written only then)."""
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
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=GITHUB_REPO, help=f"GitHub owner/name [{GITHUB_REPO}]")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo):
        parser.error(f"--repo {args.repo!r} is not of the form owner/name")
    stale = []
    for path in sorted((REPO_DIR / "notebooks").glob("*.ipynb")):
        if args.check:
            original = path.read_text()
            changed = rewrite(path, args.repo)
            if changed:
                path.write_text(original)
                stale.append(path.name)
        elif rewrite(path, args.repo):
            print(f"rewrote {path.name}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tools/colab_cells.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
