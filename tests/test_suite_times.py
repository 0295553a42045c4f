"""benchmarks/suite_times.py reads pytest's JUnit XML: outcomes, each notebook's seconds, the slowest other tests."""
from benchmarks import suite_times

REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_model" name="test_a" time="2.5" />
<testcase classname="tests.test_model" name="test_b" time="0.5"><skipped message="no GPU" /></testcase>
<testcase classname="tests.test_train" name="test_c" time="4.0"><failure message="boom" /></testcase>
<testcase classname="notebooks.07_training_on_mnist.ipynb" name="Cell 0" time="1.25" />
<testcase classname="notebooks.07_training_on_mnist.ipynb" name="Cell 1" time="100.0" />
<testcase classname="notebooks.03_mlp_block.ipynb" name="Cell 0" time="3.0" />
</testsuite></testsuites>"""


def test_the_report_is_summed_per_notebook_and_the_slowest_tests_come_first(tmp_path):
    (tmp_path / "junit.xml").write_text(REPORT)
    summary = suite_times.summarise(tmp_path / "junit.xml", slowest=2)
    assert summary["tests"] == {"passed": 4, "failed": 1, "skipped": 1}
    assert summary["notebook_seconds"] == {"03_mlp_block.ipynb": 3.0, "07_training_on_mnist.ipynb": 101.2}
    assert summary["notebooks_total_seconds"] == 104.2 and summary["other_tests_total_seconds"] == 7.0
    assert list(summary["slowest_other_tests"]) == ["tests.test_train::test_c", "tests.test_model::test_a"]
