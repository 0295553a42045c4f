"""The code style, as CI enforces it: ruff (configured in pyproject.toml: 120 columns, pycodestyle, pyflakes, isort,
bugbear, pyupgrade) finds nothing in the code or in the notebooks' code cells."""
import importlib.util
import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing_in_the_code_or_the_notebooks():
    assert importlib.util.find_spec("ruff"), "ruff is not installed: .venv/bin/pip install -r requirements.txt"
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}fix these, or run: .venv/bin/ruff check --fix"
