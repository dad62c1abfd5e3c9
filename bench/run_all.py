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
# Speed against a baseline measured in the same run first, then accuracy, then the code-structure checks. Each
# entry is a script and its arguments.
BENCHMARKS = [
    # Three pairs and their median ratio: one pair's ratio moved between 0.98 and 1.05 in one sitting
    # (bench/results/train_loop.txt).
    "train_loop.py --repeats 3",
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
    for entry in BENCHMARKS:
        name, *arguments = entry.split()
        print(f"\n=== {entry} ===", flush=True)
        started = time.perf_counter()
        if subprocess.run([sys.executable, str(HERE / name), *arguments]).returncode != 0:
            failed.append(name)
        print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
