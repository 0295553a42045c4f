"""pytest's settings for the whole repository, notebooks included (tests/conftest.py holds what the unit tests share).

pytest.ini runs the tests on every core (pytest-xdist's ``-n auto``). Here: each worker gets its
share of the cores as threads, and so do the notebook kernels and scripts it starts, which inherit OMP_NUM_THREADS
(two jobs with two threads each on two cores slow each other many times over, and our small ViTs train as fast on one
thread as on two); each notebook's cells run together and in order on one worker, after the notebook whose saved run
it reads; and every notebook is marked ``slow``, so ``pytest -m "not slow"`` leaves them out.
"""
import os
import sys

import pytest

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    if "torch" in sys.modules:  # too late for the variable: torch read it when it was imported
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A notebook that loads the run another one saves in runs/ (without it, it would train that run itself)
READS_RUN_OF = {"08_what_the_vit_learned": "07_training_on_mnist"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist's work units: a notebook's cells together and in order (08's after 07's, on 07's worker); every
    other test alone. xdist sends the units with the most tests (the notebooks with the most cells) first."""
    from xdist.scheduler import LoadScopeScheduling

    class NotebooksWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]  # "notebooks/07_training_on_mnist.ipynb::Cell 3" for a notebook's cell
            if not path.endswith(".ipynb"):
                return nodeid
            stem = path.rsplit("/", 1)[-1].removesuffix(".ipynb")
            return READS_RUN_OF.get(stem, stem)

    return NotebooksWhole(config, log)
