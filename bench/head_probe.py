"""Is the classifier's head trained as well as its features allow? Keras heads against a logistic regression.

Phase 1 trains the head (dropout -> Dense -> softmax, AdamW at 1e-2 with warmup and cosine decay, label smoothing
0.1, batch 256 capped at an eighth of the training set, early stopping on val_loss) on cached backbone features.
This fits that head, and variants of its settings, on the pooled top map of every ELPV cell (plain images, the
features `bench/multilevel_probe.py --cache` keeps), on the same seeded 70/15/15 splits as the logistic regression
of `bench/pooling_probe.py` (C chosen on validation AUC), and prints test accuracy (threshold 0.5) and ROC-AUC as
mean ± sd. A probe of the head alone: no augmented views, its own splits; the product's own runs are
`bench/ablation.py`.

    python bench/multilevel_probe.py --image-size 300 --cache /tmp/elpv300.npz   # features, once
    python bench/head_probe.py /tmp/elpv300.npz [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
from pooling_probe import probe, probe_splits  # noqa: E402
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402

from classifier import features  # noqa: E402
from classifier.config import Config  # noqa: E402
from classifier.train import _compile, _learning_rate  # noqa: E402  (phase 1's own schedule, optimizer and loss)

TOP = "block7a"  # the level the classifier pools (multilevel_probe.LEVELS)
# name: config overrides of the product's phase-1 defaults (and "standardize": features scaled to unit variance)
VARIANTS = {
    "product head (defaults)": {},
    "no label smoothing": {"train": {"label_smoothing": 0.0}},
    "learning rate 1e-3": {"train": {"head_lr": 1e-3}},
    "no early stopping": {"train": {"early_stopping_patience": 0}},
    "60 epochs, patience 10": {"train": {"head_epochs": 60, "early_stopping_patience": 10}},
    "100 epochs, patience 20": {"train": {"head_epochs": 100, "early_stopping_patience": 20}},
    "60 epochs, patience 10, learning rate 3e-2": {
        "train": {"head_epochs": 60, "early_stopping_patience": 10, "head_lr": 3e-2}
    },
    "60 epochs, patience 10, dropout 0": {
        "train": {"head_epochs": 60, "early_stopping_patience": 10},
        "model": {"dropout": 0.0},
    },
    "60 epochs, patience 10, dropout 0.5": {
        "train": {"head_epochs": 60, "early_stopping_patience": 10},
        "model": {"dropout": 0.5},
    },
    "standardized features": {"standardize": True},
}


def keras_head(x: np.ndarray, y: np.ndarray, seed: int, overrides: dict) -> tuple[float, float]:
    """Test accuracy and AUC of the phase-1 head trained with the product's defaults changed by `overrides`."""
    overrides = dict(overrides)
    standardize = overrides.pop("standardize", False)
    config = Config().replace(overrides)
    keras.utils.set_random_seed(seed)
    train, val, test = probe_splits(y, seed)
    if standardize:
        x = (x - x[train].mean(axis=0)) / (x[train].std(axis=0) + 1e-6)
    targets = np.eye(2, dtype="float32")[y]
    inputs = keras.Input((x.shape[1],))
    hidden = keras.layers.Dropout(config.model.dropout)(inputs)
    head = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
    # The batch rule of classifier.train._train_head, on one replica.
    batch = max(config.data.batch_size, min(features.HEAD_BATCH, len(train) // features.MIN_HEAD_STEPS))
    epochs, patience = config.train.head_epochs, config.train.early_stopping_patience
    steps = -(-len(train) // batch) * epochs
    _compile(head, config, _learning_rate(config.train.head_lr, steps, config.train.warmup_fraction), False)
    stop = [keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)] if patience else []
    head.fit(
        x[train], targets[train], batch_size=batch, epochs=epochs, validation_data=(x[val], targets[val]),
        callbacks=stop, verbose=0,
    )  # fmt: skip
    scores = head.predict(x[test], verbose=0)[:, 1]
    return accuracy_score(y[test], scores >= 0.5), roc_auc_score(y[test], scores)


def line(name: str, results: list[tuple[float, float]]) -> str:
    accuracy, auc = [r[0] for r in results], [r[1] for r in results]
    return (
        f"{name:45s} {statistics.mean(accuracy):.3f} ± {statistics.stdev(accuracy):.3f}   "
        f"{statistics.mean(auc):.3f} ± {statistics.stdev(auc):.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="the .npz bench/multilevel_probe.py --cache wrote")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    if not args.cache.exists():
        raise SystemExit(f"{args.cache} does not exist: make it with bench/multilevel_probe.py --cache {args.cache}")
    stored = np.load(args.cache)
    x, y = stored[TOP].astype("float32"), stored["labels"]
    print(f"ELPV pooled top map ({x.shape[1]} features, {args.cache.name}), seeds {args.seeds}: test accuracy / AUC")
    print(line("logistic regression, C on validation AUC", [probe(x, y, seed) for seed in args.seeds]), flush=True)
    for name, settings in VARIANTS.items():
        print(line(name, [keras_head(x, y, seed, settings) for seed in args.seeds]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
