"""Shared fixtures: small generated image folders whose classes a model can tell apart, and one trained run
exported to every format that the test modules which only read it share (each takes its own copy)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

IMAGE_SIZE = 48  # of the shared trained run

# Training flags of the tests that do not need pretrained features: the `tiny` backbone (random weights; see
# classifier.efficientnet_lite.build_tiny) goes through the same code at a fraction of Lite0's cost.
TINY = ["--backbone", "tiny", "--weights", "none"]

# Each class is a colour with a shape on it; noise and jitter keep the images from being identical.
CLASS_COLOURS = {"circle_red": (200, 40, 40), "square_green": (40, 180, 60), "stripes_blue": (40, 60, 200)}


def write_separable_folder(root: Path, per_class: int = 20, size: int = 48, seed: int = 0, classes=None) -> Path:
    """Writes `per_class` JPEG/PNG images per class into `root/<class>/` and returns `root`."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or CLASS_COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = np.array(colour) * rng.uniform(0.7, 1.0) + rng.normal(0, 20, (size, size, 3))
            image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230 + rng.normal(0, 10, 3)
            if name.startswith("stripes"):
                image[::6] = 240
            pixels = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
            pixels.save(folder / f"{index:03d}.{'png' if index % 2 else 'jpg'}")
    return root


@pytest.fixture
def separable_folder(tmp_path: Path) -> Path:
    """Three visually separable classes, 20 images each."""
    return write_separable_folder(tmp_path / "images")


def make_trained_run(root: Path, image_size: int = IMAGE_SIZE) -> Path:
    """Trains a small classifier on generated separable images and writes a run folder like train.py does.

    The `tiny` backbone (random weights, frozen) has the layer kinds of the real ones (depthwise convolutions,
    ReLU6, BatchNorm, residual adds), which is what exporting and quantizing is about, at a fraction of Lite0's
    cost to build, trace and convert; its random features still separate these colours (test accuracy about 0.9
    after 20 epochs).
    """
    import keras

    from classifier import data
    from classifier.model import build_classifier, freeze_backbone

    images = write_separable_folder(root / "images", per_class=30)
    run_dir = root / "run"
    split = data.prepare_split(images, run_dir)
    keras.utils.set_random_seed(0)  # the same random backbone and head in every session
    model = build_classifier("tiny", len(split.class_names), image_size, weights="none")
    freeze_backbone(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    train = data.make_dataset(split, "train", image_size=image_size, batch_size=16, training=True)
    model.fit(train, epochs=20, verbose=0, shuffle=False)  # make_dataset(training=True) already shuffles
    model.save(run_dir / "model.keras")
    (run_dir / "labels.txt").write_text("".join(f"{name}\n" for name in split.class_names))
    return run_dir


def held_out_images(run_dir: Path, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The run's test split as float32 pixels 0..255 and labels."""
    from classifier import data

    split = data.read_split(run_dir / "split.json")
    batches = list(data.make_dataset(split, "test", image_size=image_size, batch_size=64))
    return np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])


def copy_run(run_dir: Path, folder: Path) -> Path:
    """A copy of `run_dir` inside `folder`, for a test module that changes what it is given."""
    return Path(shutil.copytree(run_dir, folder / run_dir.name, symlinks=True))


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """One trained run exported to every format (the default), and the export's report. Read-only: modules copy
    it with `copy_run` before exporting into it again.

    Made once per `make test`, not once per pytest-xdist worker: the first worker to need it builds it in the
    session's shared temporary folder under a lock, and the other reads it from there (xdist's documented recipe;
    `fcntl.flock` rather than the filelock package, which is not otherwise needed).
    """
    from classifier.export import export_run

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # under xdist: the session's folder, not this worker's
        root = root.parent
    shared = root / "shared-exported-run"
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "report.json"
        if not done.is_file():
            shutil.rmtree(shared, ignore_errors=True)  # what a failed build of another worker left
            run_dir = make_trained_run(shared)
            report = export_run(run_dir, calibration_images=40, latency_runs=5)
            assert report["passed"], report["failures"]
            done.write_text(json.dumps({"run_dir": str(run_dir), "report": report}))
        record = json.loads(done.read_text())
    return Path(record["run_dir"]), record["report"]


# Seconds of each test module, summed from `pytest --durations=0 -n 2` on the 2-core development machine (2026-12-03):
# only their order matters. `make test` hands whole modules to its two workers in this order, heaviest first, so
# that the last module to start is a short one and neither worker idles while the other finishes a long one
# (xdist's own order, most tests first, put the heaviest modules last). A module missing here is placed as a
# 10-second one.
MODULE_SECONDS = {
    "test_distribute": 93,
    "test_reliability": 84,
    "test_explain": 62,
    "test_export": 52,
    "test_train": 48,
    "test_backbones": 38,
    "test_evaluate": 23,
    "test_contract": 17,
    "test_dicom": 17,
    "test_model": 15,
    "test_calibration": 14,
    "test_quiet": 8,
    "test_data": 5,
    "test_inference": 4,
    "test_optimizer": 4,
    "test_selective": 3,
    "test_metrics": 2,
    "test_benchmark": 1,
    "test_predict": 1,
    "test_run": 1,
    "test_errors": 1,
    "test_log": 1,
}


# Every process that runs tests splits its CPU into this many logical devices, so that a MirroredStrategy of two
# replicas (`--devices cpu:0,cpu:1`) trains in the test's own process: logical devices can only be set before
# TensorFlow starts its runtime, which a child process with its own TensorFlow import (7 s) did before. Training on
# `auto` or `cpu` still uses one, cpu:0.
LOGICAL_CPUS = 2


def pytest_configure(config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: it need not import TensorFlow
    from classifier.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS)


def pytest_collection_modifyitems(items) -> None:
    items.sort(key=lambda item: -MODULE_SECONDS.get(Path(str(item.fspath)).stem, 10.0))


CORNER_SIZE = 128  # Lite0's last feature map is 4 x 4 here: coarse, but finer than the 2 x 2 quadrants


def write_corner_folder(root: Path, per_class: int = 30, size: int = CORNER_SIZE, seed: int = 0) -> Path:
    """Pre-split `train/ val/ test/` folders of noise images whose class is decided only by a bright shape in the
    top-right quadrant: a filled square (`square`) or a hollow one (`ring`), of random size and place inside it.

    Two thirds of each class go to train, a sixth each to val and test; in val and in test, one image of each class
    is filed under the other class (label noise), so the model makes confident mistakes there and temperature
    scaling has something to correct.
    """
    rng = np.random.default_rng(seed)
    half = size // 2
    for name in ("ring", "square"):
        for index in range(per_class):
            image = rng.normal(110, 35, (size, size, 3))
            side = int(rng.integers(half * 5 // 8, half * 7 // 8 + 1))
            top, left = int(rng.integers(0, half - side + 1)), half + int(rng.integers(0, half - side + 1))
            image[top : top + side, left : left + side] = 235 + rng.normal(0, 8, 3)
            if name == "ring":
                edge = side // 5
                inner = side - 2 * edge
                image[top + edge : top + side - edge, left + edge : left + side - edge] = rng.normal(
                    110, 35, (inner, inner, 3)
                )
            subset = "train" if index < per_class * 2 // 3 else "val" if index < per_class * 5 // 6 else "test"
            swapped = index in (per_class * 2 // 3, per_class * 5 // 6)  # the first of val and of test
            folder = root / subset / ({"ring": "square", "square": "ring"}[name] if swapped else name)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{name}_{index:03d}.png")
    return root


@pytest.fixture(scope="session")
def corner_run(tmp_path_factory) -> Path:
    """One run trained by `train` on `write_corner_folder` images (head only, on cached Lite0 ImageNet features):
    the Grad-CAM tests and the calibration tests of training read it; none may change it."""
    from classifier.train import build_parser, config_from_args, train

    root = tmp_path_factory.mktemp("corner")
    images = write_corner_folder(root / "images")
    argv = ["--data-dir", str(images), "--output-dir", str(root / "runs"), "--name", "corner"]
    argv += ["--image-size", str(CORNER_SIZE), "--batch-size", "8", "--augment", "none"]  # a flip moves the corner
    argv += ["--head-epochs", "15", "--finetune-epochs", "0"]
    return train(config_from_args(build_parser().parse_args(argv)))
