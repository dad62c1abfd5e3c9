"""Temperature scaling: it recovers a known temperature, lowers ECE without touching accuracy or AUC, and every
exported file returns the calibrated probabilities. (That training bakes it into model.keras is checked on the
corner run, in test_explain.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import IMAGE_SIZE, copy_run, held_out_images
from sklearn.metrics import accuracy_score, roc_auc_score

from classifier import calibration, data
from classifier.export import export_run
from classifier.inference import load_predictor
from classifier.metrics import expected_calibration_error

TFLITE = ("float32", "float16", "dynamic", "int8")


def sample(num_classes: int, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): the oracle, calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (count, num_classes))
    probabilities = calibration.softmax(logits)
    labels = np.array([rng.choice(num_classes, p=row) for row in probabilities])
    return logits, labels


def test_fit_recovers_the_temperature_of_logits_made_ten_times_too_large():
    logits, labels = sample(num_classes=2, count=3000)
    overconfident = 10.0 * logits  # a network whose logits are 10x what the labels support (noisy labels)
    temperature, note = calibration.fit_temperature(overconfident, labels)
    assert note is None and temperature == pytest.approx(10.0, rel=0.1)

    before, after = calibration.softmax(overconfident), calibration.softmax(overconfident, temperature)
    ece_before, ece_after = expected_calibration_error(labels, before), expected_calibration_error(labels, after)
    assert ece_before > 0.15 and ece_after < ece_before / 4
    assert calibration.nll(overconfident, labels, temperature) < calibration.nll(overconfident, labels)
    # Confidence changes, the decisions and the ranking do not: scikit-learn on both sets of probabilities.
    assert accuracy_score(labels, after.argmax(1)) == accuracy_score(labels, before.argmax(1))
    margin = overconfident[:, 1] - overconfident[:, 0]  # what the ranking of both comes from
    assert roc_auc_score(labels, after[:, 1]) == roc_auc_score(labels, margin)
    # x10 logits push some probabilities to exactly 1.0 in float64: those ties cost the uncalibrated ranking a hair.
    assert roc_auc_score(labels, before[:, 1]) == pytest.approx(roc_auc_score(labels, margin), abs=1e-5)


def test_with_more_classes_the_top_class_stays_and_a_timid_model_is_sharpened():
    logits, labels = sample(num_classes=4, count=3000, seed=1)
    timid = logits / 3  # label smoothing makes networks like this: right as often, less sure
    temperature, _ = calibration.fit_temperature(timid, labels)
    assert temperature == pytest.approx(1 / 3, rel=0.1)
    after = calibration.softmax(timid, temperature)
    assert np.array_equal(after.argmax(1), timid.argmax(1))
    assert expected_calibration_error(labels, after) < expected_calibration_error(labels, calibration.softmax(timid))


def test_temperature_stays_1_without_a_finite_optimum_or_without_gain():
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    assert calibration.fit_temperature(logits, np.array([0, 1, 0])) == (
        1.0,
        "all 3 validation images are classified right, so the likelihood has no finite best temperature; kept at 1",
    )
    calibrated, labels = sample(num_classes=3, count=3000, seed=2)
    temperature, _ = calibration.fit_temperature(calibrated, labels)
    assert temperature == pytest.approx(1.0, abs=0.06)  # already calibrated: nothing (much) to correct


@pytest.fixture(scope="module")
def overconfident_export(exported_run, tmp_path_factory) -> tuple[Path, float]:
    """The shared run made over-confident (logits x 100) on noisy labels (every third label of its split moved to
    another class), calibrated on its validation split as training does, and exported to every TFLite format."""
    run_dir = copy_run(exported_run[0], tmp_path_factory.mktemp("calibration"))
    split_file = run_dir / "split.json"
    manifest = json.loads(split_file.read_text())
    for subset in ("train", "val", "test"):
        for index, entry in enumerate(manifest[subset]):
            if index % 3 == 0:
                entry[1] = (entry[1] + 1) % len(manifest["class_names"])
    split_file.write_text(json.dumps(manifest))
    # Logits x 100: the shared run's head on the tiny backbone's random features is timid (its own fitted
    # temperature is below 1), so x 10 would not yet be over-confident on these noisy labels.
    overconfident = calibration.with_temperature(keras.models.load_model(run_dir / "model.keras"), 0.01)
    split = data.read_split(split_file)
    logits = calibration.logits_model(overconfident).predict(
        data.make_dataset(split, "val", image_size=overconfident.input_shape[1], batch_size=32), verbose=0
    )
    labels = np.array([label for _, label in split.val])
    temperature, note = calibration.fit_temperature(logits, labels)
    record = calibration.calibration_record(logits, labels, temperature, note)
    calibration.write_calibration(run_dir, {**record, "subset": "val"})
    overconfident.save(run_dir / "model.uncalibrated.keras")
    calibration.with_temperature(overconfident, temperature).save(run_dir / "model.keras")
    report = export_run(run_dir, formats=TFLITE, calibration_images=20, latency_runs=1)
    assert report["passed"], report["failures"]
    assert report["temperature"] == temperature
    return run_dir, temperature


def test_temperature_lowers_the_ece_of_an_overconfident_network_on_images_it_was_not_fitted_on(overconfident_export):
    run_dir, temperature = overconfident_export
    split = data.read_split(run_dir / "split.json")
    images, labels = [], []
    for subset in ("train", "test"):  # the noisy labels of every image but the validation ones the fit saw
        for batch_images, batch_labels in data.make_dataset(split, subset, image_size=IMAGE_SIZE, batch_size=64):
            images.append(batch_images.numpy())
            labels.append(batch_labels.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    before = keras.models.load_model(run_dir / "model.uncalibrated.keras").predict(images, verbose=0)
    after = keras.models.load_model(run_dir / "model.keras").predict(images, verbose=0)
    ece_before, ece_after = expected_calibration_error(labels, before), expected_calibration_error(labels, after)
    print(f"T {temperature}: ECE {ece_before:.3f} -> {ece_after:.3f} on {len(labels)} images")
    assert temperature > 1.2  # softened (1 would mean the fit found nothing to correct)
    assert ece_after < ece_before / 2
    assert np.array_equal(after.argmax(1), before.argmax(1))
    assert accuracy_score(labels, after.argmax(1)) == accuracy_score(labels, before.argmax(1))


def test_every_tflite_file_returns_the_calibrated_probabilities(overconfident_export):
    run_dir, _ = overconfident_export
    images, _ = held_out_images(run_dir)
    calibrated = keras.models.load_model(run_dir / "model.keras").predict(images, verbose=0)
    uncalibrated = keras.models.load_model(run_dir / "model.uncalibrated.keras").predict(images, verbose=0)
    assert np.abs(calibrated - uncalibrated).max() > 0.1  # the two are far apart: parity tells them apart
    for fmt in TFLITE:
        probabilities = load_predictor(run_dir / "export" / f"model_{fmt}.tflite").predict(images)
        to_calibrated = np.abs(probabilities - calibrated).max()
        if fmt == "float32":
            assert to_calibrated <= 1e-4  # the parity gate's float32 limit
        assert to_calibrated < np.abs(probabilities - uncalibrated).max() / 3, fmt
        assert np.mean(probabilities.argmax(1) == calibrated.argmax(1)) >= 0.9, fmt
    exported = calibration.read_calibration(run_dir / "export")  # the record travels with the files
    assert exported["temperature"] == calibration.read_calibration(run_dir)["temperature"]
