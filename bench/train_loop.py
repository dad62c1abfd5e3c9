"""Training speed of the product's loop against a plain Keras loop on the same model, measured in one run.

    python bench/train_loop.py                  # 640 ELPV training images at 224 px (generated images without ELPV)
    python bench/train_loop.py --images 320 --size 160
    python bench/train_loop.py --repeats 3          # alternating plain / product, and the median of the ratios

Baseline, the plain loop a Keras user would write: `build_classifier`, the images decoded into memory once, a
tf.data pipeline (shuffle, batch 32, the same augmentation layers), `compile` with AdamW and `fit` with no
validation and no callbacks. Phase 1 freezes the backbone, phase 2 unfreezes the same top blocks as the product.
Its images/s is the median over epochs after the first (the first pays for tracing).

Product: `classifier.train.train` on the same images (as a class folder) with its defaults, except the epochs.
- Phase 1: the product computes backbone features once and trains the head on them; the figure compared is the
  time to a trained head: the plain loop's time for 5 head epochs (the product's phase 1 before features) against
  the product's whole phase 1 (feature passes + 30 head epochs). Reported as images/s = 5 x images / seconds.
- Phase 2: the product's steady training images/s (its ThroughputMeter: validation and checkpoints left out)
  against the plain loop's.
Ratios above 1.0 mean the product is faster. On a shared machine the speed can drift between the two measurements
(the plain loop's phase 2 was measured at 29 and 43 images/s in two runs of one hour): `--repeats N` measures the
pair N times, alternating which goes first, and reports each pair's ratios and their median.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # TensorFlow's cuInit / CUDA-probe lines on a machine without a GPU are not shown

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from classifier import augment, data, demo_data  # noqa: E402
from classifier.config import AugmentConfig, Config  # noqa: E402
from classifier.model import build_classifier, freeze_backbone, unfreeze_backbone  # noqa: E402
from classifier.run import Run  # noqa: E402
from classifier.train import train  # noqa: E402

OLD_HEAD_EPOCHS = 5  # the product's phase 1 before it trained on cached features


def make_folder(root: Path, count: int, seed: int) -> Path:
    """`count` ELPV images (class-stratified) as a class folder, or generated ones when ELPV is not installed."""
    folder = root / "images"
    try:
        elpv = demo_data.resolve_data_dir(None, None)
    except Exception:  # noqa: BLE001 - any reason ELPV is unavailable means: use generated images
        elpv = None
    rng = np.random.default_rng(seed)
    if elpv is not None:
        for class_dir in sorted(p for p in Path(elpv).iterdir() if p.is_dir()):
            files = sorted(class_dir.glob("*.png"))
            (folder / class_dir.name).mkdir(parents=True)
            for path in rng.permutation(files)[: count // 2]:
                shutil.copy(path, folder / class_dir.name / path.name)
        return folder
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for index in range(count // 2):
            pixels = rng.normal(120 + 30 * (label == "b"), 40, (128, 128, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / label / f"{index}.png")
    return folder


def plain_loop(split: data.Split, size: int, epochs: int, blocks: int, seed: int) -> tuple[float, float]:
    """The baseline: images/s of phase 1 and phase 2 of a plain `fit` on images held in memory."""
    keras.utils.set_random_seed(seed)
    items = split.train
    images = np.stack([data.load_and_resize(Path(split.root) / rel, size) for rel, _ in items])
    labels = np.eye(len(split.class_names), dtype=np.float32)[[label for _, label in items]]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(len(items), seed=seed).batch(32)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y))
    dataset = augment.augment_dataset(dataset, AugmentConfig(), len(split.class_names), seed)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    model = build_classifier("efficientnet_lite0", len(split.class_names), size)
    rates = []
    for phase in (1, 2):
        if phase == 1:
            freeze_backbone(model)
        else:
            unfreeze_backbone(model, blocks)
        model.compile(keras.optimizers.AdamW(1e-4), keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
        seconds = []
        for _ in range(epochs):
            started = time.perf_counter()
            model.fit(dataset, epochs=1, verbose=0)
            seconds.append(time.perf_counter() - started)
        rates.append(len(items) / float(np.median(seconds[1:] or seconds)))
    return rates[0], rates[1]


def product_loop(folder: Path, root: Path, size: int, epochs: int, seed: int) -> tuple[dict, int]:
    """The product's `train` on the folder; returns its throughput figures and the number of training images."""
    config = Config().replace(
        {
            "data": {"data_dir": str(folder), "image_size": size, "seed": seed},
            "train": {"finetune_epochs": epochs, "early_stopping_patience": 0},
            "run": {"output_dir": str(root / "runs"), "name": "bench"},
        }
    )
    run = Run(train(config))
    metrics = run.read_metrics()
    split = data.read_split(run.split_path)
    return metrics["throughput"], len(split.train)


def measure(folder: Path, root: Path, args, split: data.Split | None) -> tuple[dict, data.Split]:
    """One pair of measurements: the product's run and the plain loop on the product's training split. With the
    split of an earlier pair given, the plain loop goes first; returns the figures and the split."""
    runs = root / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    blocks = Config().train.unfreeze_blocks
    plain = plain_loop(split, args.size, args.epochs, blocks, args.seed) if split is not None else None
    product, n_train = product_loop(folder, root, args.size, args.epochs, args.seed)
    split = data.read_split(Run(runs / "bench").split_path)
    if plain is None:
        plain = plain_loop(split, args.size, args.epochs, blocks, args.seed)
    product1 = OLD_HEAD_EPOCHS * n_train / product["phase1_seconds"]
    figures = {
        "n_train": n_train,
        "plain": plain,
        "product": (product1, product["phase2_images_per_second"]),
        "phase1_seconds": product["phase1_seconds"],
    }
    return figures, split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640, help="images in the folder (70 %% are trained on)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each measured phase (the first is not timed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of measurements, alternating which goes first")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="train-loop-"))
    try:
        folder = make_folder(root, args.images, args.seed)
        pairs, split = [], None
        for index in range(args.repeats):  # the first pair makes the split; odd pairs then run the plain loop first
            pair, split = measure(folder, root, args, split if index % 2 == 1 else None)
            pairs.append(pair)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_train = pairs[0]["n_train"]
    print(f"\n{n_train} training images at {args.size} px, EfficientNet-Lite0, batch 32, 2 CPU threads by default")
    print(f"{'':34s} {'plain Keras':>12s} {'product':>10s} {'ratio':>7s}")
    for index, pair in enumerate(pairs):
        if len(pairs) > 1:
            print(f"pair {index + 1} ({'plain' if index % 2 else 'product'} first)")
        (plain1, plain2), (product1, product2) = pair["plain"], pair["product"]
        print(
            f"{'phase 1 (5 head epochs), images/s':34s} {plain1:12.1f} {product1:10.1f} {product1 / plain1:7.2f}"
            f"   (product: features + head in {pair['phase1_seconds']:.1f} s)"
        )
        print(f"{'phase 2 (fine-tuning), images/s':34s} {plain2:12.1f} {product2:10.1f} {product2 / plain2:7.2f}")
    if len(pairs) > 1:
        for phase in (0, 1):
            ratios = [pair["product"][phase] / pair["plain"][phase] for pair in pairs]
            print(
                f"phase {phase + 1}: median ratio {np.median(ratios):.2f} "
                f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
