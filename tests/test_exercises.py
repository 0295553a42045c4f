"""Every notebook ends with exercises, easy to hard, and each exercise has a worked solution that ran.

The solutions are code cells, so nbval re-runs them with the notebook and compares their outputs; this file checks
the shape of the section: it is the notebook's last section, it holds 3-5 numbered exercises, and each exercise is
followed by at least one executed code cell without an error.
"""
import json
import re

import pytest

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
WITH_EXERCISES = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))  # every notebook ends with exercises
EXERCISE = re.compile(r"^### Exercise (\d+) \((easy|medium|harder)\)", re.MULTILINE)


def exercises_section(name: str) -> list[dict]:
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
    starts = [index for index, cell in enumerate(cells)
              if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith("## Exercises")]
    assert len(starts) == 1, f"{name}: expected one '## Exercises' section, found {len(starts)}"
    return cells[starts[0]:]


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_notebook_ends_with_three_to_five_numbered_exercises(name):
    section = exercises_section(name)
    later_sections = [cell for cell in section[1:] if cell["cell_type"] == "markdown"
                      and re.match(r"^##? ", "".join(cell["source"]))]
    assert not later_sections, f"{name}: the exercises must be the last section"
    numbers = [int(match.group(1)) for cell in section if cell["cell_type"] == "markdown"
               for match in EXERCISE.finditer("".join(cell["source"]))]
    assert 3 <= len(numbers) <= 5, f"{name}: {len(numbers)} exercises, expected 3 to 5"
    assert numbers == list(range(1, len(numbers) + 1)), f"{name}: exercises numbered {numbers}"


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_every_exercise_has_a_solution_that_ran_without_error(name):
    section = exercises_section(name)
    current, solutions = None, {}
    for cell in section:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and EXERCISE.search(source):
            current = int(EXERCISE.search(source).group(1))
            assert "**Solution.**" in source, f"{name} exercise {current}: no worked solution in its text"
            solutions[current] = []
        elif cell["cell_type"] == "code" and current is not None:
            solutions[current].append(cell)
    for number, cells in solutions.items():
        assert cells, f"{name} exercise {number}: no solution code cell"
        for cell in cells:
            assert cell["execution_count"] is not None, f"{name} exercise {number}: solution not executed"
            errors = [output for output in cell["outputs"] if output["output_type"] == "error"]
            assert not errors, f"{name} exercise {number}: the stored solution raised {errors[0]['ename']}"
        assert any(cell["outputs"] for cell in cells), f"{name} exercise {number}: the solution shows nothing"
