"""PneumoniaMNIST (pediatric chest X-rays) through the whole product: folder → train.py → test metrics.

The official MedMNIST file (../shared/data/medmnist, CC BY 4.0) is written out as the pre-split layout
`train/ val/ test/` (each with `normal/` and `pneumonia/`), trained on with the default backbone, and compared
with a baseline measured in the same run: logistic regression on the raw 28x28 pixels. Published figures from
the MedMNIST v2 paper are printed for context, not as the baseline.

Usage: python bench/medmnist.py [--image-size 128] [--epochs 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
CLASSES = ("normal", "pneumonia")  # label 0, 1 in the MedMNIST file
PUBLISHED = {"ResNet-18 (28 px)": (0.854, 0.944), "ResNet-50 (224 px)": (0.884, 0.962), "AutoML Vision": (0.946, 0.991)}


def write_folders(arrays: dict, root: Path) -> None:
    for subset in ("train", "val", "test"):
        labels = arrays[f"{subset}_labels"][:, 0]
        for index, (image, label) in enumerate(zip(arrays[f"{subset}_images"], labels, strict=True)):
            folder = root / subset / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}.png")


def pixel_baseline(arrays: dict) -> tuple[float, float]:
    """Logistic regression on raw pixels: what the images give without any network."""
    x_train = arrays["train_images"].reshape(len(arrays["train_images"]), -1) / 255.0
    x_test = arrays["test_images"].reshape(len(arrays["test_images"]), -1) / 255.0
    model = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x_train, arrays["train_labels"][:, 0])
    probabilities = model.predict_proba(x_test)[:, 1]
    y_test = arrays["test_labels"][:, 0]
    return accuracy_score(y_test, probabilities >= 0.5), roc_auc_score(y_test, probabilities)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each phase")
    parser.add_argument("--keep", help="folder to keep the images and the run in (default: a temporary folder)")
    args = parser.parse_args()
    if not NPZ.exists():
        print(f"skipped: {NPZ} is not here (it sits in ../shared/data beside the checkout)")
        return 0
    arrays = dict(np.load(NPZ))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medmnist-"))
    images = work / "pneumoniamnist"
    if not images.exists():
        write_folders(arrays, images)

    sys.path.insert(0, str(ROOT))
    from classifier.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # TensorFlow's start-up noise kept from the report
    from classifier.run import Run
    from classifier.train import build_parser, config_from_args, train

    argv = ["--data-dir", str(images), "--output-dir", str(work / "runs"), "--name", "pneumonia", "--overwrite"]
    argv += ["--image-size", str(args.image_size), "--epochs", str(args.epochs), "--augment", "medical"]
    started = time.perf_counter()
    run_dir = train(config_from_args(build_parser().parse_args(argv)), overwrite=True)
    seconds = time.perf_counter() - started
    test = Run(run_dir).read_metrics()["test"]

    base_accuracy, base_auc = pixel_baseline(arrays)
    print(f"\nPneumoniaMNIST test split ({test['count']} images), efficientnet_lite0 at {args.image_size} px, ")
    print(f"{args.epochs}+{args.epochs} epochs, {seconds / 60:.1f} min on this machine")
    print(f"{'model':34s} {'accuracy':>9s} {'AUC':>7s}")
    print(f"{'this toolkit':34s} {test['accuracy']:9.3f} {test['auc']:7.3f}")
    print(f"{'baseline: logistic reg. on pixels':34s} {base_accuracy:9.3f} {base_auc:7.3f}")
    print(f"{'ratio to the baseline':34s} {test['accuracy'] / base_accuracy:9.3f} {test['auc'] / base_auc:7.3f}")
    for name, (accuracy, auc) in PUBLISHED.items():
        print(f"{'published: ' + name:34s} {accuracy:9.3f} {auc:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
