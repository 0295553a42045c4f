"""The README and the pages under docs/ as a reader meets them on GitHub: a front door of at most 200 lines that links
every page, links and images that resolve (with their #anchors), and an FAQ whose every answer points to a notebook and
to the public thread the question came from. Fast: it reads Markdown, nothing more (tests/test_site.py checks the
built website in a browser)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code taken out (a link inside them is an example, not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (MyST's myst_heading_anchors makes the same): lower case, markup and punctuation
    dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(match[1].strip()) for match in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the detail to a page under docs/"


def test_the_readme_links_every_page_under_docs():
    linked = {(README.parent / target.split("#")[0]).resolve()
              for target in LINK.findall(_without_code(README.read_text())) if not target.startswith("http")}
    assert not [page.name for page in PAGES[1:] if page.resolve() not in linked]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves_with_its_anchor(page):
    broken = []
    for target in LINK.findall(_without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: ... (the browser test refuses them; GitHub serves them)
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_the_faq_answers_at_least_ten_questions_each_with_its_notebook_and_its_public_thread():
    text = (REPO / "docs" / "faq.md").read_text()
    questions = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert len(questions) >= 10
    for question in questions:
        title = question.splitlines()[0]
        shown = re.search(r"^- Shown in: (.+?)(?=^- |\Z)", question, flags=re.MULTILINE | re.DOTALL)
        asked = re.search(r"^- Asked in: (.+?)(?=^- |\Z)", question, flags=re.MULTILINE | re.DOTALL)
        assert title.endswith("?"), title
        assert shown and "../notebooks/" in shown[1], f"{title}: no notebook that shows the answer"
        assert asked and re.search(r"https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+", asked[1]), \
            f"{title}: no public thread"
