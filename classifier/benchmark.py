"""`classifier benchmark --model M`: how fast a model runs here, and how big it is.

Latency is what an app sees classifying one camera frame: batch 1, warm (after untimed warm-up runs), median and
90th percentile. Throughput is images per second at `--batch-size`, what a batch job over a folder sees. .tflite
files run on LiteRT, SavedModel folders on TensorFlow, .keras files on Keras (all through `classifier.inference`).
Inputs are random pixels: speed does not depend on the image content.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime

import numpy as np

from classifier import atomic
from classifier.errors import UserError, run_cli
from classifier.inference import check_report_path, model_size, open_model

log = logging.getLogger(__name__)

JSON_KEYS = (
    "model",  # path as given
    "kind",  # keras, saved_model or tflite
    "runtime",  # Keras, TensorFlow or LiteRT, with its version
    "size_bytes",  # file size, or the total of a SavedModel folder
    "size_mb",  # size_bytes / 1e6, as in the export report
    "image_size",  # S of the [N, S, S, 3] input
    "threads",  # as requested (None = the runtime's default)
    "latency_ms",  # {"median", "p90", "runs", "warmup"}: batch 1, warm
    "throughput",  # {"batch_size", "images_per_second", "runs"}
    "machine",  # {"cpu_count", "processor", "python"}
    "created",  # ISO 8601 UTC time
)


def _runtime(kind: str) -> str:
    if kind == "tflite":
        from importlib.metadata import version

        return f"LiteRT {version('ai-edge-litert')}"
    if kind == "keras":
        import keras

        return f"Keras {keras.__version__}"
    import tensorflow as tf

    return f"TensorFlow {tf.__version__}"


def benchmark(
    model: str | os.PathLike,
    *,
    threads: int | None = None,
    batch_size: int = 32,
    runs: int = 50,
    warmup: int = 5,
    throughput_runs: int = 5,
    seed: int = 0,
) -> dict:
    """Measures latency, throughput and size of one model.

    Args:
        model: model.keras, a SavedModel folder or a .tflite file.
        threads: CPU threads (LiteRT per model; TensorFlow per process, see `inference.open_model`).
        batch_size: Batch of the throughput measurement.
        runs: Timed batch-1 predictions.
        warmup: Untimed predictions before each measurement (allocation, graph tracing, caches).
        throughput_runs: Timed batches for the throughput.
        seed: Seed of the random input pixels.

    Returns:
        The result, with the keys of `JSON_KEYS`.

    Raises:
        UserError: the model cannot be loaded, or a count is below 1.
    """
    from classifier import inference

    for name, value in (("--runs", runs), ("--batch-size", batch_size), ("--throughput-runs", throughput_runs)):
        if value < 1:
            raise UserError(f"{name} {value}: give 1 or more")
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: give 0 or more")
    predictor = open_model(model, threads)
    latency = inference.measure_latency(predictor, runs=runs, warmup=warmup, seed=seed)
    size = predictor.image_size
    images = np.random.default_rng(seed).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    images = images.astype(predictor.input_dtype)
    for _ in range(max(1, warmup // 2)):  # the first batch resizes the LiteRT tensors / traces a new shape
        predictor.predict(images, batch_size=batch_size)
    times = []
    for _ in range(throughput_runs):
        start = time.perf_counter()
        predictor.predict(images, batch_size=batch_size)
        times.append(time.perf_counter() - start)
    size_bytes = model_size(model)
    return {
        "model": str(model),
        "kind": predictor.kind,
        "runtime": _runtime(predictor.kind),
        "size_bytes": size_bytes,
        "size_mb": round(size_bytes / 1e6, 3),
        "image_size": size,
        "threads": threads,
        "latency_ms": {
            "median": round(latency["median_ms"], 4),
            "p90": round(latency["p90_ms"], 4),
            "runs": runs,
            "warmup": warmup,
        },
        "throughput": {
            "batch_size": batch_size,
            # The median batch time: one slow batch (another process on the core) should not move the figure.
            "images_per_second": round(batch_size / float(np.median(times)), 2),
            "runs": throughput_runs,
        },
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def format_result(result: dict) -> str:
    """The benchmark as a few readable lines."""
    latency, throughput = result["latency_ms"], result["throughput"]
    threads = "runtime default" if result["threads"] is None else result["threads"]
    return "\n".join(
        [
            f"{result['model']} ({result['kind']}, {result['runtime']}, {result['image_size']} px, threads: {threads})",
            f"  size on disk      {result['size_mb']:.2f} MB ({result['size_bytes']:,} bytes)",
            f"  latency, batch 1  median {latency['median']:.2f} ms, p90 {latency['p90']:.2f} ms "
            f"({latency['runs']} runs after {latency['warmup']} warm-up)",
            f"  throughput        {throughput['images_per_second']:.1f} images/s at batch {throughput['batch_size']}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The `classifier benchmark` options."""
    parser = argparse.ArgumentParser(
        prog="classifier benchmark",
        description="Latency (batch 1, median and p90), throughput and size of model.keras, a SavedModel or a "
        ".tflite file on this machine.",
    )
    parser.add_argument("--model", required=True, help="model.keras, a SavedModel folder or a .tflite file")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the throughput measurement (default 32)")
    parser.add_argument("--runs", type=int, default=50, help="timed batch-1 runs (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--throughput-runs", type=int, default=5, help="timed batches (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--output", default=None, help="also write the JSON result to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`classifier benchmark`."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.output:
            check_report_path(args.output)  # before measuring, which a bad path would otherwise waste
        result = benchmark(
            args.model,
            threads=args.threads,
            batch_size=args.batch_size,
            runs=args.runs,
            warmup=args.warmup,
            throughput_runs=args.throughput_runs,
        )
        text = json.dumps(result, indent=2)
        if args.output:
            atomic.write_text(args.output, text + "\n")
        # The command's result, data rather than progress: written out directly (like predict's CSV/JSON), so a
        # program that routes the `classifier` logger elsewhere still gets clean JSON from `main([... '--json'])`.
        sys.stdout.write((text if args.json else format_result(result)) + "\n")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
