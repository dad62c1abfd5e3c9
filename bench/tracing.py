"""Where a small training run's time goes to tracing: every TensorFlow function traced, and for how long.

Runs `train.main` on generated images with the `tiny` backbone (as the tests do: 16 images at 32 px, 4 head and 3
fine-tuning epochs) twice in one process, and reports the second run (the first pays one-time costs such as
imports): its wall time and each trace TensorFlow made (`tracing_compilation._create_concrete_function`, a private
function of TensorFlow 2.21 wrapped here to time it; nested traces are indented under the one that made them).

    python bench/tracing.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

from conftest import TINY, write_separable_folder  # noqa: E402  (the tests' generated images)
from tensorflow.python.eager.polymorphic_function import tracing_compilation  # noqa: E402

from classifier.train import main as train_main  # noqa: E402

TRACES: list[tuple[int, str, float]] = []  # (depth, function name, seconds), in the order traces finished
_depth = 0
_create = tracing_compilation._create_concrete_function


def _timed_create(*args, **kwargs):
    global _depth
    started = time.perf_counter()
    _depth += 1
    try:
        return _create(*args, **kwargs)
    finally:
        _depth -= 1
        options = args[3] if len(args) > 3 else kwargs.get("tracing_options")
        TRACES.append((_depth, getattr(options, "name", "?"), time.perf_counter() - started))


def main() -> int:
    tracing_compilation._create_concrete_function = _timed_create
    work = Path(tempfile.mkdtemp(prefix="tracing-"))
    try:
        images = write_separable_folder(work / "images", per_class=8, size=32)
        argv = ["--data-dir", str(images), "--output-dir", str(work / "runs"), "--image-size", "32"]
        argv += ["--batch-size", "4", "--augment", "none", *TINY, "--head-epochs", "4", "--finetune-epochs", "3"]
        if train_main([*argv, "--name", "first"]) != 0:
            return 1
        TRACES.clear()
        started = time.perf_counter()
        if train_main([*argv, "--name", "second"]) != 0:
            return 1
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\ntraces of the second run (tf.data map functions left out: milliseconds each):")
    for depth, name, spent in TRACES:
        if not name.startswith("Dataset_"):
            print(f"  {'  ' * depth}{name:<{40 - 2 * depth}} {spent:6.2f} s")
    top = sum(spent for depth, _, spent in TRACES if depth == 0)
    print(f"run {seconds:.1f} s, of which tracing {top:.1f} s ({len(TRACES)} traces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
