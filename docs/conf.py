"""Sphinx settings of the tutorial's website: the stored notebooks and the pages under docs/, as a book.

Build it with `.venv/bin/python tools/build_site.py` (it runs Sphinx with the repository as the source folder and this
folder as the configuration folder). Nothing here executes a notebook: the site shows the outputs stored in the
.ipynb files, the ones nbval checks. The math is typeset by a copy of MathJax that ships inside a Python package
(sphinx-mathjax-offline), so the pages need no other host; so does the "Open in Colab" badge image (see below).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
from tools import colab_cells  # noqa: E402  (the repository's GitHub address, one place for it)

GITHUB_REPO = colab_cells.repository()  # owner/name
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "../docs/_static/colab-badge.svg"  # relative to a notebook

project = "ViT from scratch"
html_title = "ViT from scratch, equation by equation"
author = "the ViT from scratch authors"
copyright = "the ViT from scratch authors"

extensions = ["myst_nb", "sphinx_copybutton", "sphinx-mathjax-offline"]

# The source folder is the repository: the README is the front page, then the notebooks and the pages in docs/.
root_doc = "README"
include_patterns = ["README.md", "notebooks/*.ipynb", "docs/*.md"]
exclude_patterns = ["_site", ".venv*", "data", "runs", "**/.ipynb_checkpoints"]

# The sidebar, in order. The README stays plain Markdown on GitHub, so its (hidden) tables of contents are added here.
GUIDES = ["docs/notebooks", "docs/faq", "docs/training", "docs/transfer_learning", "docs/vit_vs_cnn", "docs/speed",
          "docs/scaling", "docs/testing", "docs/glossary", "docs/further_reading", "docs/troubleshooting"]
GUIDES += sorted(f"docs/{page.stem}" for page in (REPO_DIR / "docs").glob("*.md") if f"docs/{page.stem}" not in GUIDES)
SIDEBAR = f"""

```{{toctree}}
:hidden:
:caption: Notebooks
:glob:

notebooks/*
```

```{{toctree}}
:hidden:
:caption: Guides

{chr(10).join(GUIDES)}
```
"""

# Notebooks: shown as stored, never run. tqdm's progress bars were stored as widgets whose state is stripped, so the
# page shows their text form instead of an empty widget.
nb_execution_mode = "off"
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True  # $$ ... $$ inside a paragraph, as Jupyter and GitHub render it
myst_heading_anchors = 3  # [text](page.md#a-heading) works as it does on GitHub

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_sourcelink_suffix = ""  # the .ipynb download is the notebook itself, not notebook.ipynb.txt
html_last_updated_fmt = None
html_context = {"default_mode": "light"}  # the stored figures are drawn on white; the theme's switch offers dark
html_theme_options = {
    "repository_url": f"https://github.com/{GITHUB_REPO}",
    "repository_branch": colab_cells.BRANCH,
    "path_to_docs": "",
    "use_repository_button": True,
    "use_source_button": True,      # "view source" on GitHub, per page
    "use_download_button": True,    # the .ipynb itself, served by this site
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "show_toc_level": 2,
}
copybutton_exclude = ".linenos, .gp, .go"

suppress_warnings = ["myst.header"]  # notebooks open with a badge line before their title, and some skip a level


# Inside $$ ... $$, a line that starts like a Markdown block ("+ x", "- x", "> x", "1. x") would end the paragraph in
# MyST's parser (Jupyter hides math from Markdown first, so the notebooks show it fine): it is joined to the line
# before, which TeX reads the same.
DISPLAY_MATH = re.compile(r"\$\$.+?\$\$", re.DOTALL)
BLOCK_START = re.compile(r"\n(?=[ ]{0,3}(?:[-+*>][ ]|\d+[.)][ ]))")


def _math_kept_whole(markdown: str) -> str:
    return DISPLAY_MATH.sub(lambda math: BLOCK_START.sub(" ", math[0]), markdown)


def _add_sidebar_and_local_badge(app, docname, source):
    """Give the front page its hidden tables of contents, and each notebook a badge image served by the site and its
    display math kept in one piece."""
    if docname == root_doc:
        source[0] += SIDEBAR
    elif docname.startswith("notebooks/"):
        notebook = json.loads(source[0].replace(COLAB_BADGE, LOCAL_BADGE))
        for cell in notebook["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"])
                cell["source"] = _math_kept_whole(text)
        source[0] = json.dumps(notebook)


def setup(app):
    app.connect("source-read", _add_sidebar_and_local_badge)
