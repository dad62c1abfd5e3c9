"""Data larger than memory: epoch-1 and epoch-2 images/s of the training pipeline with the disk cache and without.

    python bench/large_data.py                        # 600 PNGs of 1024 x 1024, 224 px, cache budget 16 MB
    python bench/large_data.py --count 300 --side 2048

A generated folder of large PNGs (noise on gradients, so they compress poorly and decode slowly, like scans) is
read at `--image-size` through `data.make_dataset(training=True)` with a memory cache budget far below the decoded
size, so the memory cache is off. Two passes (epochs) are timed over every batch:
- disk cache on: epoch 1 decodes every file and writes the resized pixels to the cache; epoch 2 reads them back.
- disk cache off: both epochs decode every file.
The pass times exclude the model, so the figures are the pipeline's ceiling. Target (issue 12): epoch 2 with the
disk cache at least 3x epoch 1. Results are printed and written to bench/results/large_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # TensorFlow's start-up noise kept from the report

from classifier import data  # noqa: E402


def generate_pngs(root: Path, count: int, side: int, seed: int = 0) -> None:
    """`count` RGB PNGs of `side` x `side` pixels in two class folders."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    for index in range(count):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        base = ramp[None, :, None] if index % 2 else ramp[:, None, None]
        pixels = base + rng.normal(0, 25, (side, side, 3)).astype(np.float32)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.png", compress_level=1)


def time_epochs(split: data.Split, args, disk_cache: Path | None) -> list[float]:
    """Images/s of each of two full passes over the training subset; epoch 1 includes building the pipeline,
    where the disk cache is filled (every file decoded once)."""
    built = time.perf_counter()
    dataset = data.make_dataset(
        split,
        "train",
        image_size=args.image_size,
        batch_size=32,
        training=True,
        cache_budget_mb=args.cache_budget_mb,
        disk_cache=disk_cache,
    )
    rates = []
    for epoch in range(2):
        started, seen = built if epoch == 0 else time.perf_counter(), 0
        for images, _ in dataset:
            seen += int(images.shape[0])
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=600, help="images to generate (default 600)")
    parser.add_argument("--side", type=int, default=1024, help="side of each PNG in pixels (default 1024)")
    parser.add_argument("--image-size", type=int, default=224, help="training input size (default 224)")
    parser.add_argument("--cache-budget-mb", type=int, default=16, help="memory cache budget (default 16 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        generate_pngs(root / "images", args.count, args.side)
        print(f"generated {args.count} PNGs of {args.side}x{args.side} in {time.perf_counter() - started:.0f} s")
        split = data.prepare_split(root / "images", root / "run", val_fraction=0.1, test_fraction=0.1, seed=0)
        decoded_mb = len(split.train) * args.image_size**2 * 3 / 2**20
        print(
            f"{len(split.train)} training images: {decoded_mb:.0f} MB decoded at {args.image_size} px, "
            f"memory cache budget {args.cache_budget_mb} MB (so the memory cache is off)"
        )
        if data.fits_cache(len(split.train), args.image_size, args.cache_budget_mb):
            parser.error("the decoded images fit in the memory cache budget: raise --count or lower --cache-budget-mb")
        with_cache = time_epochs(split, args, root / "cache")
        without = time_epochs(split, args, None)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "images": args.count,
        "side": args.side,
        "image_size": args.image_size,
        "cache_budget_mb": args.cache_budget_mb,
        "disk_cache": {"epoch1_images_per_s": round(with_cache[0], 1), "epoch2_images_per_s": round(with_cache[1], 1)},
        "no_cache": {"epoch1_images_per_s": round(without[0], 1), "epoch2_images_per_s": round(without[1], 1)},
        "disk_cache_epoch2_over_epoch1": round(with_cache[1] / with_cache[0], 2),
    }
    print(
        f"disk cache on : epoch 1 {with_cache[0]:7.1f} images/s, epoch 2 {with_cache[1]:7.1f} images/s "
        f"({result['disk_cache_epoch2_over_epoch1']:.1f}x; target >= 3x)"
    )
    print(f"disk cache off: epoch 1 {without[0]:7.1f} images/s, epoch 2 {without[1]:7.1f} images/s")
    out = Path(__file__).resolve().parent / "results" / "large_data.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
