"""Scan and decode throughput of the data pipeline, against a tf.io.decode_image baseline measured in the same run.

    python bench/data_throughput.py                 # 10,000 generated JPEGs (64..128 px) and ELPV
    python bench/data_throughput.py --count 2000 --no-elpv

For each dataset it prints images/s for
- scan: `data.scan_folder` (every file opened and fully decoded once, in threads);
- make_dataset: a full pass (best of --repeats) of `data.make_dataset` (Pillow decode via tf.numpy_function,
  resize, batch; no cache, so every image is decoded);
- baseline: the same pipeline with `tf.io.decode_image` instead of Pillow (fast, but not the same pixels for
  16-bit PNGs, CMYK JPEGs and EXIF-rotated photos), and the ratio make_dataset / baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # TensorFlow's start-up noise kept from the report

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from classifier import data, demo_data  # noqa: E402


def generate_jpegs(root: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs of 64..128 px per side (smooth gradients plus noise, like photos), in two class folders."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    for index in range(count):
        height, width = rng.integers(64, 129, size=2)
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        pixels = ramp * rng.random(3, dtype=np.float32) + rng.normal(0, 20, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(root / ("a", "b")[index % 2] / f"{index:05d}.jpg", quality=90)


def baseline_dataset(split: data.Split, image_size: int, batch_size: int) -> tf.data.Dataset:
    """make_dataset's pipeline with TensorFlow's own decoder."""
    paths = [str(Path(split.root) / rel) for rel, _ in split.train]
    labels = [label for _, label in split.train]

    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return data.resize_image(image, image_size), label

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
    return dataset.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(tf.data.AUTOTUNE)


def images_per_second(dataset: tf.data.Dataset) -> tuple[float, int]:
    started, count = time.perf_counter(), 0
    for images, _ in dataset:
        count += int(images.shape[0])
    return count / (time.perf_counter() - started), count


def measure(title: str, root: Path, image_size: int, batch_size: int, repeats: int) -> None:
    started = time.perf_counter()
    scan = data.scan_folder(root)
    scan_rate = len(scan.images["all"]) / (time.perf_counter() - started)
    # Everything in "train" so one pass reads every image; the split itself is not what is measured here.
    split = data.Split(scan.root, scan.class_names, scan.images["all"], [], [], [], 0, {})
    ours_dataset = data.make_dataset(split, "train", image_size=image_size, batch_size=batch_size, cache_budget_mb=0)
    base_dataset = baseline_dataset(split, image_size, batch_size)
    # Alternate and keep the best of `repeats`: the cores are shared, so single passes are noisy.
    ours = baseline = 0.0
    for _ in range(repeats):
        rate, count = images_per_second(ours_dataset)
        ours = max(ours, rate)
        baseline = max(baseline, images_per_second(base_dataset)[0])
    print(f"{title}: {count} images, {image_size}px")
    print(f"  scan (validate every file)   {scan_rate:8.0f} images/s")
    print(f"  make_dataset (Pillow decode) {ours:8.0f} images/s")
    print(f"  baseline (tf.io.decode_image){baseline:8.0f} images/s   ratio {ours / baseline:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="generated JPEGs (default 10000)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="passes per pipeline; the best is reported")
    parser.add_argument("--no-elpv", action="store_true", help="skip the ELPV demo dataset")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="data-bench-") as scratch:
        root = Path(scratch) / "jpegs"
        started = time.perf_counter()
        generate_jpegs(root, args.count)
        print(f"generated {args.count} JPEGs in {time.perf_counter() - started:.1f} s")
        measure("generated JPEGs (64..128 px)", root, args.image_size, args.batch_size, args.repeats)
    if not args.no_elpv:
        measure(
            "ELPV (300x300 grayscale PNG)", demo_data.materialize_elpv(), args.image_size, args.batch_size, args.repeats
        )


if __name__ == "__main__":
    main()
