"""How long building the default backbone with its ImageNet weights takes: cold (first use, the PyTorch weights
are verified, read and converted, then cached) and warm (cache present), against a random-init build as baseline.

Each measurement runs in a fresh Python process (imports excluded from the timing), with KERAS_HOME pointed at a
temporary folder so the user's own cache is neither used nor deleted.

    python bench/backbone_load.py [--backbone efficientnet_lite0] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child process: build once, print the seconds as JSON.
CHILD = """
import json, time
from classifier.quiet import import_tensorflow_quietly
import_tensorflow_quietly()
from classifier.backbones import build_backbone
started = time.perf_counter()
build_backbone({backbone!r}, {size}, weights={weights!r})
print(json.dumps(time.perf_counter() - started))
"""


def measure(backbone: str, size: int, weights: str, keras_home: str) -> float:
    """Seconds for one `build_backbone` call in a fresh interpreter."""
    env = dict(os.environ, KERAS_HOME=keras_home, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    code = CHILD.format(backbone=backbone, size=size, weights=weights)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    timings: dict[str, list[float]] = {"random init (baseline)": [], "imagenet cold": [], "imagenet warm": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as keras_home:
            timings["random init (baseline)"].append(measure(args.backbone, args.size, "none", keras_home))
            timings["imagenet cold"].append(measure(args.backbone, args.size, "imagenet", keras_home))
            cache = list(Path(keras_home, "classifier").glob("*.weights.h5"))
            assert len(cache) == 1, f"the cold build should write one cache file, found {cache}"
            timings["imagenet warm"].append(measure(args.backbone, args.size, "imagenet", keras_home))

    baseline = statistics.median(timings["random init (baseline)"])
    print(f"{args.backbone} at {args.size} px, build_backbone wall time, median of {args.repeats} fresh processes:")
    for label, values in timings.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {label:24s} {median:6.2f} s  ({runs})  ratio to random init {median / baseline:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
