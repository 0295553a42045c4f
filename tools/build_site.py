"""Build the tutorial's website into _site/: the stored notebooks and the pages under docs/, as a book.

    .venv/bin/pip install -r requirements-docs.txt    # once: Sphinx, MyST-NB and the theme (torch is not needed)
    .venv/bin/python tools/build_site.py               # then open _site/index.html
    .venv/bin/python tools/build_site.py --strict      # a warning (a broken link, a missing image) fails the build

Nothing is executed: each notebook page shows the outputs stored in its .ipynb, the ones nbval checks. The build
needs no network (the math is typeset by a MathJax copy that ships in a Python package). Sphinx reads the repository
with the settings in docs/conf.py; the front page is the README (also served as index.html).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
SITE_DIR = REPO_DIR / "_site"
INSTALL = ".venv/bin/pip install -r requirements-docs.txt"


def build(out: Path = SITE_DIR, strict: bool = False, quiet: bool = True) -> list[str]:
    """Build the site into ``out`` (replacing an earlier build there) and return Sphinx's warnings."""
    from sphinx.cmd.build import build_main

    if out.exists():
        if any(out.iterdir()) and not (out / ".buildinfo").exists():
            raise SystemExit(f"{out} holds something other than an earlier build of the site; "
                             "choose another --out or empty it")
        shutil.rmtree(out)
    # Sphinx writes into a scratch folder first: MyST-NB also puts a jupyter_execute/ folder beside its output folder,
    # which would otherwise land next to --out (in the repository, for _site/).
    with tempfile.TemporaryDirectory() as scratch:
        warnings_file = Path(scratch) / "warnings.txt"
        argv = ["-b", "html", "-c", str(REPO_DIR / "docs"), "-d", str(Path(scratch) / "doctrees"),
                "-w", str(warnings_file), "--jobs", "1", *(["-q"] if quiet else []),
                *(["-W", "--keep-going"] if strict else []), str(REPO_DIR), str(Path(scratch) / "html")]
        status = build_main(argv)
        warnings = [line for line in warnings_file.read_text().splitlines() if "WARNING" in line or "ERROR" in line]
        if status:
            raise SystemExit(f"the site did not build (Sphinx exit code {status}); its messages are above")
        shutil.move(Path(scratch) / "html", out)
    shutil.copyfile(out / "README.html", out / "index.html")  # the front door at the site's address
    (out / ".nojekyll").touch()  # GitHub Pages: serve _static/ and _images/ as they are
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SITE_DIR, help="where to write the site (default _site/)")
    parser.add_argument("--strict", action="store_true", help="fail on any warning (a broken link, a missing image)")
    parser.add_argument("--verbose", action="store_true", help="show Sphinx's progress")
    args = parser.parse_args(argv)
    try:
        import myst_nb  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError as error:
        print(f"the site's packages are not installed ({error.name} is missing): {INSTALL}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    warnings = build(args.out.resolve(), strict=args.strict, quiet=not args.verbose)
    for line in warnings:
        print(line, file=sys.stderr)
    pages = len(list(args.out.rglob("*.html")))
    print(f"built {pages} pages into {args.out} in {time.perf_counter() - start:.0f} s, {len(warnings)} warnings; "
          f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
