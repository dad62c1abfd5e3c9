"""Would another pooling of the backbone's last feature map beat global average pooling? A linear probe on ELPV.

The classifier pools the backbone's last map with `GlobalAveragePooling2D`. This computes that map once for every
ELPV cell (plain images, pretrained frozen backbone), pools it five ways (average, max, average and max
concatenated, generalised mean with p = 3, log-sum-exp), and fits a logistic regression (scikit-learn; C chosen
on validation AUC) per pooling on 70/15/15 stratified splits of each seed. Test accuracy and ROC-AUC are printed
as mean ± sd over the seeds. A probe, not the product: no augmentation, no fine-tuning, its own splits.

    python bench/pooling_probe.py [--image-size 224] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from classifier import data, demo_data, features, model  # noqa: E402

BACKBONE = "efficientnet_lite0"
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def feature_maps(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's last map [N, h, w, c] for every ELPV cell, and 1 for `defective`, 0 for `functional`."""
    folder = demo_data.materialize_elpv()
    files = sorted(folder.glob("*/*.png"))
    labels = np.array([path.parent.name == "defective" for path in files], dtype=int)
    classifier = model.build_classifier(BACKBONE, 2, image_size=image_size)
    extractor = keras.Model(classifier.input, classifier.get_layer(features.POOL_LAYER).input)
    started, maps = time.perf_counter(), []
    for start in range(0, len(files), 64):
        images = [np.asarray(data.resize_image(data.load_image(f), image_size)) for f in files[start : start + 64]]
        maps.append(extractor.predict(np.stack(images).astype("float32"), verbose=0))
    print(f"last maps of {len(files)} cells at {image_size} px in {time.perf_counter() - started:.0f} s", flush=True)
    return np.concatenate(maps), labels


def poolings(maps: np.ndarray) -> dict[str, np.ndarray]:
    flat = maps.reshape(len(maps), -1, maps.shape[-1])
    average, maximum = flat.mean(axis=1), flat.max(axis=1)
    return {
        "average": average,
        "max": maximum,
        "average+max": np.concatenate([average, maximum], axis=1),
        "GeM p=3": np.mean(np.maximum(flat, 1e-6) ** 3, axis=1) ** (1 / 3),
        "log-sum-exp": np.log(np.mean(np.exp(np.clip(flat, -20, 20)), axis=1)),
    }


def probe_splits(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the probes' split: 70 % train, the rest halved into validation and test, stratified by label."""
    train, rest = train_test_split(np.arange(len(y)), test_size=0.30, stratify=y, random_state=seed)
    val, test = train_test_split(rest, test_size=0.50, stratify=y[rest], random_state=seed)
    return train, val, test


def probe(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    """Test accuracy and AUC of a logistic regression whose C is chosen on the validation split."""
    train, val, test = probe_splits(y, seed)
    scaler = StandardScaler().fit(x[train])
    fits = [LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x[train]), y[train]) for c in C_GRID]
    best = max(fits, key=lambda fit: roc_auc_score(y[val], fit.predict_proba(scaler.transform(x[val]))[:, 1]))
    p = best.predict_proba(scaler.transform(x[test]))[:, 1]
    return accuracy_score(y[test], p >= 0.5), roc_auc_score(y[test], p)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    maps, y = feature_maps(args.image_size)
    print(f"\nELPV, {BACKBONE} at {args.image_size} px, linear probe, seeds {args.seeds}: test accuracy / AUC")
    for name, x in poolings(maps).items():
        results = [probe(x, y, seed) for seed in args.seeds]
        accuracy = [r[0] for r in results]
        auc = [r[1] for r in results]
        print(
            f"{name:12s} {statistics.mean(accuracy):.3f} ± {statistics.stdev(accuracy):.3f}   "
            f"{statistics.mean(auc):.3f} ± {statistics.stdev(auc):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
