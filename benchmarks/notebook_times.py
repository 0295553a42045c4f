"""How long each notebook takes to run top to bottom, measured on one thread: the times in the README's notebook table.

Run from the repository root, pinned to one core, with nothing else on it if you can:

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/notebook_times.py            # every notebook, in order
    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/notebook_times.py 00 07      # some of them

Each notebook is executed by ``jupyter nbconvert --execute`` into a temporary folder (the stored notebook is never
written), in order, so that notebooks 08 and 09 find notebook 07's model in ``runs/`` as they do in a fresh clone after
07 has run (without it they train it). Recorded per notebook: the wall time of the whole command (kernel start
included) and the CPU seconds of the processes it ran (the kernel's work, which a second job on the same core slows
less than the wall time). The machine's matrix-multiply rate on one thread, measured before and after, says how fast
the core was; the load average says how busy the machine was. JSON goes to ``benchmarks/results/notebook_times.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
from machinery import matmul_gflops  # noqa: E402  (the machine's speed, as every benchmark records it)

NOTEBOOKS_DIR = REPO_DIR / "notebooks"
OUT = REPO_DIR / "benchmarks" / "results" / "notebook_times.json"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_notebook(path: Path, out_dir: Path, timeout: int) -> dict:
    """Execute one notebook into ``out_dir``; its wall and CPU seconds, and whether it ran to the end."""
    command = [str(Path(sys.executable).parent / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
               f"--ExecutePreprocessor.timeout={timeout}", "--output-dir", str(out_dir), "--output", path.stem,
               str(path)]
    cpu, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    result = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "ok": done.returncode == 0,
              "loadavg_after": os.getloadavg()[0]}
    if done.returncode:
        result["error"] = done.stderr.strip().splitlines()[-1:]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="notebook numbers to run (default: every notebook, in order)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a cell may take (default 3600)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help=f"the JSON to write (default {OUT.relative_to(REPO_DIR)})")
    args = parser.parse_args(argv)
    notebooks = [p for p in sorted(NOTEBOOKS_DIR.glob("*.ipynb")) if not args.only or p.name[:2] in args.only]
    if not notebooks:
        parser.error(f"no notebook numbered {' or '.join(args.only)} in notebooks/")
    import torch
    report = {"what": "seconds to execute each notebook top to bottom with jupyter nbconvert --execute, "
                      "OMP_NUM_THREADS=1, in order, from no saved run in runs/",
              "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
              "affinity": sorted(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
              "commit": subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "matmul_gflops_1_thread_before": round(matmul_gflops(), 1), "loadavg_before": os.getloadavg()[0],
              "notebooks": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as out_dir:
        for path in notebooks:
            result = time_notebook(path, Path(out_dir), args.timeout)
            report["notebooks"][path.name] = result
            print(f"{path.name}: {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU"
                  f"{'' if result['ok'] else ', FAILED: ' + ' '.join(result['error'])}", flush=True)
            # after each notebook: a long run stopped keeps its part
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    report["matmul_gflops_1_thread_after"] = round(matmul_gflops(), 1)
    report["total_wall_s"] = round(sum(r["wall_s"] for r in report["notebooks"].values()), 1)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"total {report['total_wall_s']:.0f} s; written to {args.out}")
    return report


if __name__ == "__main__":
    main()
