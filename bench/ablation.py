"""Which defaults earn their minutes: settings variants trained over several seeds, test metrics as mean ± sd.

Each (variant, seed) is the real command, `train.py --seed S ...` in a subprocess, so a variant is exactly what a
user would type, and its time is what a user would wait. The seed moves the split, the initialisation and the
shuffles; a variant's figures are the mean and sample standard deviation over its seeds (never one lucky run).

    python bench/ablation.py --dataset elpv --seeds 1 2 3 \\
        --variant 'default=' --variant '300px=--image-size 300' --variant 'head only=--finetune-epochs 0'
    python bench/ablation.py --dataset pneumoniamnist --seeds 1 2 3 --variant 'default=--image-size 128'

Datasets: `elpv` (the demo's, installed from PyPI), `pneumoniamnist` (../shared/data/medmnist, written out as its
official train/val/test split), `fashion-mnist` (10 classes; a fixed 1,500 / 500 / 1,000 subset of Debian's
`dataset-fashion-mnist` package, at 128 px), or any class folder (`--data-dir`). Results go to
bench/results/ablation-NAME.json and are re-used by a later call with the same variant text and seed (`--fresh`
to train them again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from classifier.run import Run  # noqa: E402  (the run folder's owner: no file name of it is spelled here)


def data_flags(dataset: str, work: Path) -> list[str]:
    """The train.py flags that point at the dataset (materialising it first when needed)."""
    if dataset == "elpv":
        return ["--set", "data.positive_class=defective"]
    if dataset == "pneumoniamnist":
        import numpy as np
        from medmnist import NPZ, write_folders  # bench/medmnist.py

        folder = work / "pneumoniamnist"
        if not (folder / "test").is_dir():
            write_folders(dict(np.load(NPZ)), folder)
        return ["--data-dir", str(folder), "--set", "data.positive_class=pneumonia", "--augment", "medical"]
    if dataset == "fashion-mnist":
        folder = work / "fashion-mnist"
        if not (folder / "test").is_dir():
            write_fashion_mnist(folder)
        return ["--data-dir", str(folder), "--image-size", "128"]
    return ["--data-dir", dataset]


# Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist): the official IDX files.
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FASHION_PER_CLASS = {"train": 150, "val": 50, "test": 100}  # a small-data subset: 1,500 / 500 / 1,000 images


def write_fashion_mnist(folder: Path) -> None:
    """A fixed, class-balanced subset of Fashion-MNIST written as the pre-split layout (10 classes, 28 px PNGs):
    train and val from its training file, test from its test file, the first images of each class in file order."""
    import gzip

    import numpy as np
    from PIL import Image

    if not FASHION.is_dir():
        raise SystemExit(f"{FASHION} is missing: install Debian's package (apt-get install dataset-fashion-mnist)")

    def read(kind: str) -> tuple[np.ndarray, np.ndarray]:
        with gzip.open(FASHION / f"{kind}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        with gzip.open(FASHION / f"{kind}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(len(labels), 28, 28)
        return images, labels

    sources = {"train": read("train"), "test": read("t10k")}
    for label, name in enumerate(FASHION_CLASSES):
        train_images, train_labels = sources["train"]
        test_images, test_labels = sources["test"]
        pool = np.flatnonzero(train_labels == label)
        picks = {
            "train": train_images[pool[: FASHION_PER_CLASS["train"]]],
            "val": train_images[
                pool[FASHION_PER_CLASS["train"] : FASHION_PER_CLASS["train"] + FASHION_PER_CLASS["val"]]
            ],
            "test": test_images[np.flatnonzero(test_labels == label)[: FASHION_PER_CLASS["test"]]],
        }
        for subset, images in picks.items():
            (folder / subset / name).mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(images):
                Image.fromarray(image).save(folder / subset / name / f"{index:04d}.png")


def run_one(flags: list[str], seed: int, work: Path, name: str) -> dict:
    """Trains one (variant, seed) and returns its test metrics and wall time."""
    argv = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(work / "runs"), "--name", name]
    argv += ["--overwrite", "--seed", str(seed), *flags]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        log = work / f"{name}-seed{seed}.log"  # the whole output: a native crash's stack is at the top of stderr
        log.write_text(result.stdout + result.stderr)
        raise SystemExit(
            f"{' '.join(argv)} failed (exit {result.returncode}; output in {log}):\n{result.stderr[-2000:]}"
        )
    metrics = Run(work / "runs" / name).read_metrics()
    test = metrics["test"]
    return {"accuracy": test["accuracy"], "auc": test.get("auc"), "seconds": round(seconds, 1)}


def summary(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="elpv", help="elpv, pneumoniamnist or a class folder")
    parser.add_argument("--variant", action="append", required=True, help="NAME=train.py flags (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--work", default="/tmp/ablation", help="scratch folder for images and runs")
    parser.add_argument("--fresh", action="store_true", help="train again the results already in the JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    label = Path(args.dataset).name if args.dataset not in ("elpv", "pneumoniamnist", "fashion-mnist") else args.dataset
    out = RESULTS / f"ablation-{label}.json"
    done = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    base = data_flags(args.dataset, work)
    variants = [text.partition("=") for text in args.variant]
    for name, _, flags in variants:
        for seed in args.seeds:
            key = f"{flags.strip()} | seed {seed}"
            if key in done:
                continue
            done[key] = {"variant": name, **run_one([*base, *shlex.split(flags)], seed, work, f"{label}-s{seed}")}
            print(f"{name:24s} seed {seed}: {json.dumps(done[key])}", flush=True)
            out.write_text(json.dumps(done, indent=1) + "\n")
    print(f"\n{label}: test metrics over seeds {args.seeds} (mean ± sd); train.py wall time per run")
    print(f"{'variant':24s} {'flags':44s} {'accuracy':>15s} {'AUC':>15s} {'minutes':>8s}")
    for name, _, flags in variants:
        rows = [done[f"{flags.strip()} | seed {seed}"] for seed in args.seeds]
        accuracy = summary([row["accuracy"] for row in rows])
        auc = summary([row["auc"] for row in rows if row["auc"] is not None])
        minutes = statistics.mean(row["seconds"] for row in rows) / 60
        print(f"{name:24s} {flags.strip()[:44]:44s} {accuracy:>15s} {auc:>15s} {minutes:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
