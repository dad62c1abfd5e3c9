"""Runs the benchmarks in bench/ in turn (`make bench`); each prints its own figures and ratios.

The other scripts there are tools run on demand with their own arguments: `tensorboard_screenshots.py` (needs a
run's logs and Chromium) and `hostile_sweep.py` (the reliability tally of issue 11, about half an hour).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# Speed against a baseline measured in the same run first, then accuracy, then the code-structure checks.
BENCHMARKS = [
    "train_loop.py",
    "data_throughput.py",
    "large_data.py",
    "backbone_load.py",
    "linear_probe.py",
    "medmnist.py",
    "import_graph.py",
    "longest_functions.py",
]


def main() -> int:
    failed = []
    for script in (HERE / name for name in BENCHMARKS):
        print(f"\n=== {script.name} ===", flush=True)
        started = time.perf_counter()
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
        print(f"({script.name}: {time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
