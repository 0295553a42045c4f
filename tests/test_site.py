"""The website, opened in a real browser: tools/build_site.py builds it once per test session, a local server serves it
on 127.0.0.1, and headless Chromium loads every page with any request to another host refused (the site must work
offline). Every page loads with no console error and no failed request, every image loads, no math is left as raw TeX,
every internal link (and its #anchor) resolves, every notebook has its page in the sidebar in order, with its Colab
badge and its .ipynb, and the search finds a word. Screenshots of a few pages are kept in test_artifacts/site/.

Needs the site's packages (`.venv/bin/pip install -r requirements-docs.txt`) and Debian's Chromium
(`apt-get install -y chromium`); where either is missing the tests are skipped with that line, except in CI
(CI=true), where .ci/run installs both and a skip would hide a failure.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from tools import build_site, colab_cells

# Sphinx 9 warns that the theme and MyST use APIs it will remove in Sphinx 11: their business, not this test's.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*Check CHANGES for Sphinx API modifications")]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
ARTIFACTS = REPO / "test_artifacts" / "site"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]
# Pages to keep a screenshot of: file name, and what to scroll to first (None: the top of the page)
SCREENSHOTS = {"index.html": ("front_page", None),
               "notebooks/02_multi_head_self_attention.html": ("notebook_02_math", 'mjx-container[display="true"]'),
               "notebooks/08_what_the_vit_learned.html": ("notebook_08_figures", ".cell_output img"),
               "docs/faq.html": ("faq", None)}
# Raw TeX that MathJax did not typeset, in a page's text outside code: $...$, $$, \( \[ or a \command{.
RAW_TEX = r"\$\$|\$[^$\s][^$\n]*?[^$\s\\]\$|\\\(|\\\[|\\(?:frac|mathbf|mathrm|operatorname|sqrt|top|times|boldsymbol)\b"


def _missing(what: str, fix: str):
    if os.environ.get("CI"):
        pytest.fail(f"missing in CI: {what}; .ci/run should have installed it ({fix})")
    pytest.skip(f"missing: {what}; to run these tests: {fix}")


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site, built once per session into a temporary folder (an _site/ of your own is left alone)."""
    try:
        import myst_nb  # noqa: F401
    except ImportError:
        _missing("the site's packages", build_site.INSTALL)
    out = tmp_path_factory.mktemp("site") / "_site"
    warnings = build_site.build(out)
    assert not warnings, "\n".join(warnings)
    return out


@pytest.fixture(scope="session")
def server(site):
    """An HTTP server for the site on 127.0.0.1 (a free port), quiet; yields its base address."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        _missing("Chromium", "apt-get install -y chromium (as root), or set CHROMIUM=/path/to/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright", build_site.INSTALL)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                              else shutil.which("chromium"), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _pages(site: Path) -> list[str]:
    return sorted(str(p.relative_to(site)) for p in site.rglob("*.html")
                  if not str(p.relative_to(site)).startswith(("_static", "_sources", "_downloads")))


@pytest.fixture(scope="session")
def visits(site, server, browser) -> dict[str, dict]:
    """Every page, loaded once: what went wrong while it loaded, its images, math and links."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    problems: list[str] = []

    def refuse_other_hosts(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith("data:"):
            route.continue_()
        else:
            problems.append(f"a request to another host: {route.request.url}")
            route.abort()

    context.route("**/*", refuse_other_hosts)
    page = context.new_page()
    page.set_default_timeout(120_000)  # generous: on a shared, busy CPU a page with MathJax can take tens of seconds
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"a JavaScript error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} ({r.failure})")
            if urlsplit(r.url).hostname == "127.0.0.1" else None)
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    results = {}
    for name in _pages(site):
        problems.clear()
        page.goto(server + name, wait_until="load")
        page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
        page.evaluate("""() => Promise.all([...document.images].map(img => img.complete ? null :
                             new Promise(done => { img.onload = img.onerror = done; })))""")
        # MathJax's fonts load once the typeset math is laid out; leaving the page before they arrive aborts them, and
        # the abort would count against the next page
        page.evaluate("() => { document.body.getBoundingClientRect(); return document.fonts.ready.then(() => null); }")
        page.wait_for_load_state("networkidle")
        facts = page.evaluate(f"""() => {{
            const main = document.querySelector('main') || document.body;
            const copy = main.cloneNode(true);
            copy.querySelectorAll('pre, code, mjx-container, script, style, .output').forEach(n => n.remove());
            const text = copy.textContent;
            return {{
                broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
                                                   .map(i => i.getAttribute('src')),
                images: document.images.length,
                math: main.querySelectorAll('mjx-container').length,
                math_errors: main.querySelectorAll('mjx-merror').length,
                raw_tex: [...text.matchAll(/{RAW_TEX}/g)].map(m => text.slice(Math.max(0, m.index - 30), m.index + 40)),
                links: [...document.querySelectorAll('a[href]')].map(a => a.href),
                copy_buttons: document.querySelectorAll('button.copybtn').length,
                sidebar: [...document.querySelectorAll('.bd-sidebar-primary a.reference.internal')]
                            .map(a => a.getAttribute('href')),
            }};
        }}""")
        facts["problems"] = list(problems)
        results[name] = facts
        if name in SCREENSHOTS:
            file_name, scroll_to = SCREENSHOTS[name]
            if scroll_to:
                page.locator(scroll_to).first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / f"{file_name}.png"))
    # The search page, asked for a word every notebook uses.
    page.goto(server + "search.html?q=attention", wait_until="load")
    page.wait_for_selector("#search-results li")
    results["search?q=attention"] = {"hits": page.locator("#search-results li").count(), "problems": list(problems)}
    page.screenshot(path=str(ARTIFACTS / "search_attention.png"))
    context.close()
    return results


def test_every_page_loads_with_no_console_error_and_no_request_to_another_host(visits):
    bad = {name: facts["problems"] for name, facts in visits.items() if facts["problems"]}
    assert not bad, bad


def test_every_image_loads(visits):
    assert not {name: facts["broken_images"] for name, facts in visits.items() if facts.get("broken_images")}
    assert visits["notebooks/08_what_the_vit_learned.html"]["images"] >= 4, "its figures are on the page"


def test_the_math_is_typeset_and_none_is_left_as_raw_tex(visits):
    assert not {name: facts["raw_tex"] for name, facts in visits.items() if facts.get("raw_tex")}
    assert not {name: facts["math_errors"] for name, facts in visits.items() if facts.get("math_errors")}
    for name in ("notebooks/01_patch_embedding.html", "notebooks/02_multi_head_self_attention.html",
                 "docs/glossary.html"):
        assert visits[name]["math"] > 5, f"{name}: its equations were not typeset"


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for key, value in attrs if key in ("id", "name") and value)


@functools.cache
def _ids(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.ids)


def test_every_internal_link_and_its_anchor_resolves(visits, site, server):
    broken = set()
    for name, facts in visits.items():
        for link in facts.get("links", []):
            if not link.startswith(server):
                continue
            parts = urlsplit(link)
            target = site / unquote(parts.path[len(urlsplit(server).path):])
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.add(f"{name} -> {link[len(server):]}")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _ids(target):
                broken.add(f"{name} -> {link[len(server):]} (no such anchor)")
    assert not broken, sorted(broken)


def test_every_notebook_has_its_page_in_order_in_the_sidebar_with_its_colab_badge_and_its_ipynb(visits, server):
    sidebar = [href for href in visits["index.html"]["sidebar"] if href.startswith("notebooks/")]
    assert sidebar == [f"notebooks/{path.stem}.html" for path in NOTEBOOKS]
    repo = colab_cells.repository()
    for path in NOTEBOOKS:
        links = visits[f"notebooks/{path.stem}.html"]["links"]
        colab = f"https://colab.research.google.com/github/{repo}/blob/{colab_cells.BRANCH}/notebooks/{path.name}"
        assert colab in links, f"{path.name}: no Colab badge"
        assert urljoin(server, f"_sources/notebooks/{path.name}") in links, f"{path.name}: no link to its .ipynb"
        assert visits[f"notebooks/{path.stem}.html"]["copy_buttons"] > 0, f"{path.name}: no copy buttons"


def test_the_search_finds_a_word_of_the_notebooks(visits):
    assert visits["search?q=attention"]["hits"] >= 3
    assert not visits["search?q=attention"]["problems"]
