"""Keep the notebooks clean to read and to diff: remove what a run leaves behind that is not the lesson, the same way
every time (running it twice changes nothing the second time).

    python tools/clean_notebooks.py                  # clean every notebook in notebooks/, in place
    python tools/clean_notebooks.py path.ipynb ...   # ... only these
    python tools/clean_notebooks.py --check          # write nothing; exit 1 naming each unclean notebook and why

Run it after executing a notebook and storing its outputs; CI runs ``--check``. Clean means, one function each below:

1. No volatile metadata: a cell's ``execution`` timestamps (and the ``ExecuteTime`` / ``papermill`` of other tools),
   the notebook's saved ``widgets`` state and ``signature``. They change on every run and say nothing.
2. No dead widget outputs: a progress bar stored as a widget shows nothing once the kernel is gone. The widget part
   of such an output goes; so does the whole output when its text fallback is only a frozen bar (``0%|   | 0/9``) or
   a widget's repr. A fallback with real text is kept as text.
3. nbval's markers as cell tags: a comment line ``# NBVAL_IGNORE_OUTPUT`` (or another nbval marker) becomes the cell
   tag nbval also reads (``nbval-ignore-output``), and the line goes, so a learner does not read past it.
4. Exercise solutions start collapsed, so a learner reads the question before the answer. The rule: in the section
   that starts with a markdown cell ``## Exercises``, every code cell after an ``### Exercise N`` heading, and every
   markdown cell that starts with ``**Solution.**``, is a solution. A solution cell gets JupyterLab's
   ``jupyter.source_hidden`` and the tag ``hide-input`` (what Jupyter Book / myst-nb read); its output stays shown.
5. Figures as palette PNGs: a PNG output is re-encoded with 256 colours when that is smaller (plots are flat colours
   and anti-aliased edges: about a quarter of the bytes, no visible change). A palette PNG is left as it is.

Nothing else changes: every other source line, every output's text, and nbformat's layout (indent=1, sorted keys).
"""
from __future__ import annotations

import argparse
import base64
import io
import re
import sys
from pathlib import Path

import nbformat

REPO_DIR = Path(__file__).resolve().parents[1]

VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "papermill")
VOLATILE_NOTEBOOK_METADATA = ("widgets", "signature", "papermill")

WIDGET = "application/vnd.jupyter.widget-view+json"
# A widget's text fallback that shows nothing: a progress bar frozen when the notebook was saved, or a widget's repr
DEAD_FALLBACK = re.compile(r"\s*(.*\d+%\|.*\|.*|(HBox|VBox|Box|FloatProgress|IntProgress|HTML|Label|Output)\(.*\))?\s*",
                           re.DOTALL)

# nbval's comment markers and the cell tags it reads for them (nbval/plugin.py: comment_markers, metadata_tags)
NBVAL_TAGS = {f"NBVAL_{name}": f"nbval-{name.lower().replace('_', '-')}"
              for name in ("IGNORE_OUTPUT", "CHECK_OUTPUT", "RAISES_EXCEPTION", "SKIP")}

EXERCISES = re.compile(r"## Exercises\b")
EXERCISE = re.compile(r"^### Exercise \d+", re.MULTILINE)
SOLUTION_TAG = "hide-input"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _tags(cell) -> list[str]:
    return cell.setdefault("metadata", {}).setdefault("tags", [])


def strip_volatile_metadata(notebook) -> list[str]:
    """Rule 1; returns what it removed, e.g. ``["execution metadata in 64 cells"]``."""
    done = []
    for key in VOLATILE_CELL_METADATA:
        cells = [cell for cell in notebook.cells if key in cell.get("metadata", {})]
        for cell in cells:
            del cell.metadata[key]
        if cells:
            done.append(f"{key} metadata in {_n(len(cells), 'cell')}")
    done += [f"the notebook's {key} metadata" for key in VOLATILE_NOTEBOOK_METADATA
             if notebook.metadata.pop(key, None) is not None]
    return done


def strip_dead_widgets(notebook) -> list[str]:
    """Rule 2; returns what it removed."""
    removed = 0
    for cell in notebook.cells:
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET in data:
                removed += 1
                del data[WIDGET]
                if set(data) <= {"text/plain"} and DEAD_FALLBACK.fullmatch(data.get("text/plain", "")):
                    continue
            kept.append(output)
        if "outputs" in cell:
            cell.outputs = kept
    return [_n(removed, "widget output")] if removed else []


def _comment(line: str) -> str:
    return line.strip().lstrip("#").strip()


def markers_to_tags(notebook) -> list[str]:
    """Rule 3; returns what it converted."""
    moved = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines(keepends=True)
        # nbval's own test for a marker: a comment line that is the marker alone (nbval/plugin.py, find_comment_markers)
        markers = [line for line in lines if line.strip().startswith("#") and _comment(line) in NBVAL_TAGS]
        for line in markers:
            tag = NBVAL_TAGS[_comment(line)]
            if tag not in _tags(cell):
                _tags(cell).append(tag)
        if markers:
            moved += len(markers)
            cell.source = "".join(line for line in lines if line not in markers).rstrip("\n")
    return [_n(moved, "nbval marker comment")] if moved else []


def solution_cells(notebook) -> list:
    """Rule 4's cells: in the ``## Exercises`` section, the code cells after an ``### Exercise N`` heading and the
    markdown cells that start with ``**Solution.**``."""
    solutions, in_exercises, after_heading = [], False, False
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            if EXERCISES.match(cell.source):
                in_exercises, after_heading = True, False
            elif cell.source.startswith("## ") or cell.source.startswith("# "):
                in_exercises = False  # a later section is not the exercises
            elif in_exercises and EXERCISE.search(cell.source):
                after_heading = True
            elif in_exercises and cell.source.startswith("**Solution.**"):
                solutions.append(cell)
        elif in_exercises and after_heading:
            solutions.append(cell)
    return solutions


def collapse_solutions(notebook) -> list[str]:
    """Rule 4; returns what it collapsed."""
    collapsed = 0
    for cell in solution_cells(notebook):
        jupyter = cell.metadata.setdefault("jupyter", {})
        if not jupyter.get("source_hidden") or SOLUTION_TAG not in _tags(cell):
            collapsed += 1
            jupyter["source_hidden"] = True
            if SOLUTION_TAG not in _tags(cell):
                _tags(cell).append(SOLUTION_TAG)
    return [f"{_n(collapsed, 'solution cell')} not collapsed"] if collapsed else []


def palette_png(png: bytes) -> bytes | None:
    """``png`` re-encoded with a 256-colour palette, or None if it already has one or that is not smaller."""
    from PIL import Image  # Pillow comes with torchvision and matplotlib

    image = Image.open(io.BytesIO(png))
    if image.mode in ("P", "L", "1"):
        return None
    smaller = io.BytesIO()
    image.convert("RGBA").quantize(256, method=Image.Quantize.FASTOCTREE).save(smaller, "PNG", optimize=True)
    return smaller.getvalue() if len(smaller.getvalue()) < len(png) else None


def shrink_figures(notebook) -> list[str]:
    """Rule 5; returns what it re-encoded, with the bytes before and after."""
    count, before, after = 0, 0, 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                png = base64.b64decode(data["image/png"])
                smaller = palette_png(png)
                if smaller is not None:
                    count, before, after = count + 1, before + len(png), after + len(smaller)
                    data["image/png"] = base64.b64encode(smaller).decode()
    if not count:
        return []
    return [f"{_n(count, 'figure')} to re-encode ({before // 1024} KB, {after // 1024} KB as palette PNGs)"]


RULES = (strip_volatile_metadata, strip_dead_widgets, markers_to_tags, collapse_solutions, shrink_figures)


def malformed_markers(notebook) -> list[str]:
    """Comment lines that look like nbval markers but that nbval does not read (``# NBVAL_IGNORE_OUTPUT (why)``):
    the tool cannot know what was meant, so the check names them and the author fixes them."""
    return [f"cell {index}: {line.strip()!r} is not a marker nbval reads (put the reason on its own line)"
            for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for line in cell.source.splitlines() if re.match(r"\s*#+\s*NBVAL_", line)]


def clean(path: Path, write: bool = True) -> tuple[list[str], list[str]]:
    """Apply every rule to the notebook at ``path``; returns (what was unclean and is now clean, what the author must
    fix). The file is written only if something changed, and only if ``write``."""
    notebook = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    cleaned = [problem for rule in RULES for problem in rule(notebook)]
    if cleaned and write:
        path.write_text(nbformat.writes(notebook) + "\n", encoding="utf-8")
    return cleaned, malformed_markers(notebook)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to clean [every one in notebooks/]")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any notebook is unclean")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((REPO_DIR / "notebooks").glob("*.ipynb"))
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    unclean = 0
    for path in paths:
        cleaned, to_fix = clean(path, write=not args.check)
        if cleaned and not args.check:
            print(f"cleaned {path.name}: {'; '.join(cleaned)}")
        if (cleaned and args.check) or to_fix:
            unclean += 1
            print(f"{path.name}: {'; '.join((cleaned if args.check else []) + to_fix)}", file=sys.stderr)
    if unclean:
        fix = "run python tools/clean_notebooks.py" if args.check else "fix the lines named above by hand"
        print(f"{unclean} notebook(s) unclean; {fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
