"""How long the README's test command takes, and where the time goes: the figures in the README and docs/testing.md.

Run from the repository root, alone on the machine (a second job on 2 cores slows both many times over):

    .venv/bin/python benchmarks/suite_times.py                 # the whole suite: `.venv/bin/pytest`
    .venv/bin/python benchmarks/suite_times.py --fast          # the fast subset: `.venv/bin/pytest -m "not slow"`

It runs pytest with a JUnit XML report in a temporary folder and writes one JSON: the wall time of the whole command,
the number of tests by outcome, each notebook's seconds (the sum of its cells under nbval, so the kernel's start is
included in its first cell) and the slowest other tests. The machine's matrix-multiply rate on one thread, measured
just before, says how fast the machine was that day. JSON goes to ``benchmarks/results/suite_times[_fast].json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
from machinery import matmul_gflops  # noqa: E402  (the machine's speed, as every benchmark records it)

RESULTS_DIR = REPO_DIR / "benchmarks" / "results"


def summarise(junit_xml: Path, slowest: int = 15) -> dict:
    """Outcomes, each notebook's seconds and the slowest other tests, from pytest's JUnit XML report."""
    outcomes = {"passed": 0, "failed": 0, "skipped": 0}
    notebooks: dict[str, float] = {}
    tests: list[tuple[float, str]] = []
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        seconds = float(case.get("time", 0))
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes["failed" if kind in ("failure", "error") else kind] += 1
        classname = case.get("classname", "")  # "notebooks.07_training_on_mnist.ipynb" for a cell under nbval
        if classname.endswith(".ipynb"):
            name = classname.split(".", 1)[1]
            notebooks[name] = notebooks.get(name, 0.0) + seconds
        else:
            tests.append((seconds, f"{classname}::{case.get('name')}"))
    tests.sort(reverse=True)
    return dict(tests=outcomes, notebook_seconds={k: round(v, 1) for k, v in sorted(notebooks.items())},
                notebooks_total_seconds=round(sum(notebooks.values()), 1),
                other_tests_total_seconds=round(sum(seconds for seconds, _ in tests), 1),
                slowest_other_tests={name: round(seconds, 1) for seconds, name in tests[:slowest]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--fast", action="store_true", help='only the fast subset: pytest -m "not slow"')
    parser.add_argument("--out", type=Path, help="the JSON to write (default benchmarks/results/suite_times.json, "
                                                 "or suite_times_fast.json with --fast)")
    args = parser.parse_args(argv)
    out = args.out or RESULTS_DIR / ("suite_times_fast.json" if args.fast else "suite_times.json")
    pytest = Path(sys.executable).parent / "pytest"
    command = [str(pytest), *(["-m", "not slow"] if args.fast else [])]
    rate = matmul_gflops()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        start = time.perf_counter()
        done = subprocess.run([*command, f"--junitxml={report}", "-o", "junit_family=xunit2"], cwd=REPO_DIR)
        wall = time.perf_counter() - start
        summary = summarise(report) if report.exists() else {}
    result = dict(what="the README's test command, timed whole, alone on the machine", command=" ".join(
        [".venv/bin/pytest", *(['-m "not slow"'] if args.fast else [])]), exit_code=done.returncode,
        wall_seconds=round(wall, 1), wall_minutes=round(wall / 60, 1), matmul_gflops_1_thread=round(rate, 1),
        cpu_count=os.cpu_count(), machine=platform.machine(), python=platform.python_version(),
        commit=subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True,
                              text=True).stdout.strip(), date=time.strftime("%Y-%m-%d"), **summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['command']}: {result['wall_minutes']} min, exit code {done.returncode}, {summary.get('tests')}; "
          f"matmul {result['matmul_gflops_1_thread']} GFLOP/s on one thread; written to {out}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
