"""The test suite itself: every entry of conftest's SLOW list still names a test (a renamed test would otherwise drop
out of the slow set silently and make `pytest -m "not slow"` slow)."""
import ast

from conftest import REPO, SLOW


def test_every_slow_entry_names_a_test_that_exists():
    missing = []
    for entry in sorted(SLOW):
        file, name = entry.split("::")
        path = REPO / "tests" / file
        defined = {node.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef)} if path.exists() else set()
        if name not in defined:
            missing.append(entry)
    assert not missing, f"SLOW in tests/conftest.py names tests that do not exist (renamed?): {missing}"
