"""nbval honours a marker comment only when the comment is the marker alone: ``# NBVAL_IGNORE_OUTPUT (why)`` is
silently ignored and the cell's volatile output is compared after all. Reasons go on the next line."""
import json
import re
from pathlib import Path

import pytest
from nbval.plugin import comment_markers

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_nbval_marker_is_a_comment_nbval_recognises(path):
    for cell in json.loads(path.read_text())["cells"]:
        for line in "".join(cell["source"]).splitlines():
            comment = line.strip().lstrip("#").strip() if line.strip().startswith("#") else ""
            if re.match(r"NBVAL_", comment):
                assert comment in comment_markers, f"{path.name}: {line.strip()!r} is not a marker nbval knows"
