"""Runs the benchmarks in bench/ in turn (`make bench`); each prints its own figures and ratios.

The other scripts there are tools run on demand with their own arguments: `tensorboard_screenshots.py` (needs a
run's logs and Chromium), `hostile_sweep.py` (the reliability tally of issue 11, about half an hour),
`demo_seeds.py` (`make demo` over seeds on a fresh clone against an older commit's, about an hour), `ablation.py`
(settings variants over seeds) and the feature probes `pooling_probe.py` and `multilevel_probe.py`.
`accuracy.py` (ELPV and PneumoniaMNIST over three seeds against the anchors and a plain keras-io recipe) takes
about an hour and a half of the whole.
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
    "accuracy.py",
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
