"""Grad-CAM: the heatmap lands where the class is decided, on every backbone; `classifier explain` and
`predict --explain` write an overlay per image and a contact sheet; TFLite and SavedModel files are refused.
Also the calibration that training fitted on the same run (the corner run is trained once per pytest-xdist
worker, and the workers take whole files: with its readers in one file it is trained once)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import CORNER_SIZE
from PIL import Image
from sklearn.metrics import accuracy_score, roc_auc_score
from tensorboard.backend.event_processing import event_accumulator

from classifier import calibration, data, evaluate, gradcam, operating_point
from classifier.backbones import BACKBONES
from classifier.explain import main
from classifier.metrics import expected_calibration_error
from classifier.model import build_classifier
from classifier.predict import main as predict_main

# The deciding quadrant is a quarter of the image: a heatmap spread evenly would put 0.25 of its mass there.
MIN_MEAN_FRACTION = 0.4


def held_out(run_dir: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Validation and test images of the run as the model sees them, their paths, and their true shapes (from the
    file names: the folder label is wrong for the images filed under the other class on purpose)."""
    split = data.read_split(run_dir / "split.json")
    paths = [str(Path(split.root) / rel) for rel, _ in split.val + split.test]
    images = np.stack([data.load_and_resize(path, CORNER_SIZE) for path in paths])
    return images, paths, [Path(path).name.split("_")[0] for path in paths]


def quadrant_masses(heatmap: np.ndarray) -> dict[str, float]:
    half = heatmap.shape[0] // 2
    parts = {
        "top_left": heatmap[:half, :half],
        "top_right": heatmap[:half, half:],
        "bottom_left": heatmap[half:, :half],
        "bottom_right": heatmap[half:, half:],
    }
    return {name: float(part.sum()) for name, part in parts.items()}


def test_gradcam_of_correct_predictions_falls_in_the_deciding_corner(corner_run):
    model = keras.models.load_model(corner_run / "model.keras")
    images, _, shapes = held_out(corner_run)
    class_names = (corner_run / "labels.txt").read_text().split()
    maps, probabilities, explained, predicted = gradcam.GradCam(model).heatmaps(images)
    assert maps.shape == (len(images), CORNER_SIZE, CORNER_SIZE) and np.array_equal(explained, predicted)
    correct = [i for i, shape in enumerate(shapes) if class_names[predicted[i]] == shape]
    assert len(correct) >= 0.9 * len(images)  # the model learned the shapes (it is right about the noisy ones too)

    fractions, heaviest = [], []
    for i in correct:
        masses = quadrant_masses(maps[i])
        assert sum(masses.values()) > 0, f"no evidence at all for the predicted class of image {i}"
        fractions.append(masses["top_right"] / sum(masses.values()))
        heaviest.append(max(masses, key=masses.get))
    mean = float(np.mean(fractions))
    print(f"Grad-CAM mass in the deciding quadrant: mean {mean:.3f}, min {min(fractions):.3f}, n {len(fractions)}")
    assert mean >= MIN_MEAN_FRACTION, fractions
    assert heaviest.count("top_right") >= 0.9 * len(correct), heaviest  # and it is the heaviest quadrant


# One backbone of each family of the registry: within a family only the width and depth differ, and every
# backbone reaches the classifier the same way (its last feature map, pooled by "pool"; test_backbones checks that
# each one's output is a 2 x 2 map at 64 px). A gradient through every one of them took 80 s here.
FAMILIES = {
    "efficientnet_lite0": ("efficientnet_lite1", "efficientnet_lite2"),
    "mobilenet_v2": (),
    "mobilenet_v3_small": ("mobilenet_v3_large",),
    "efficientnet_b0": ("efficientnet_b1", "efficientnet_b2", "efficientnet_b3"),
    "efficientnetv2_b0": ("efficientnetv2_b1", "efficientnetv2_b2", "efficientnetv2_b3"),
    "resnet50_v2": (),
    "convnext_tiny": (),
    "tiny": (),
}


def test_the_families_cover_the_registry():
    assert sorted([*FAMILIES, *(name for members in FAMILIES.values() for name in members)]) == sorted(BACKBONES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_backbone_family_gives_a_heatmap_from_its_last_feature_map(name):
    model = build_classifier(name, num_classes=2, image_size=64, weights="none")
    cam = gradcam.GradCam(model, traced=False)  # one call: tracing would cost more than it saves
    # The map the classifier pools: the backbone's output, 1/32 of the input (test_backbones checks the channels).
    channels = model.get_layer("backbone").output.shape[-1]
    assert cam.feature_map_shape == (2, 2, channels)
    image = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    maps, _, explained, _ = cam.heatmaps(np.concatenate([image, image]), classes=[0, 1])
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and list(explained) == [0, 1]
    assert maps.min() >= 0 and all(m.max() == pytest.approx(1.0) or m.max() == 0 for m in maps)
    # With two classes, evidence for one class is evidence against the other: one of the two maps is lit.
    assert maps[0].max() > 0 or maps[1].max() > 0


def test_explain_writes_one_overlay_per_image_and_a_contact_sheet(corner_run, tmp_path, capsys):
    _, paths, shapes = held_out(corner_run)
    output = tmp_path / "heatmaps"
    assert main(["--model", str(corner_run / "model.keras"), *paths[:6], "--output", str(output)]) == 0
    overlays = sorted(output.glob("*.gradcam.png"))
    assert len(overlays) == 6
    assert {p.name for p in output.iterdir()} == {p.name for p in overlays} | {"contact_sheet.png", "gradcam.csv"}
    for path in [*overlays, output / "contact_sheet.png"]:
        with Image.open(path) as image:
            assert image.format == "PNG"
    with Image.open(overlays[0]) as image:
        assert image.size == (2 * gradcam.DISPLAY_SIZE + 4, gradcam.DISPLAY_SIZE)  # the image | its heatmap
    with open(output / "gradcam.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == paths[:6]
    assert all(row["explained"] == row["predicted"] for row in rows)
    assert sum(row["predicted"] == shape for row, shape in zip(rows, shapes, strict=False)) >= 5
    assert "wrote 6 Grad-CAM overlay(s), 1 contact sheet(s)" in capsys.readouterr().err

    named = tmp_path / "ring"
    model = ["--model", str(corner_run / "model.keras")]
    truth = dict(zip(paths, shapes, strict=True))
    pair = [next(path for path in paths if truth[path] == name) for name in ("square", "ring")]
    assert main([*model, *pair, "--output", str(named), "--class", "ring"]) == 0  # whatever each is predicted
    with open(named / "gradcam.csv") as handle:
        assert {row["explained"] for row in csv.DictReader(handle)} == {"ring"}
    assert main([*model, paths[0], "--output", str(named), "--class", "cat"]) == 2
    assert "--class 'cat' is not a class of this model: use one of ring, square" in capsys.readouterr().err


def test_tflite_and_saved_model_are_refused_naming_the_runs_keras_model(corner_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "export" / "saved_model").mkdir(parents=True)
    (run / "model.keras").write_bytes((corner_run / "model.keras").read_bytes())
    (run / "export" / "model_int8.tflite").write_bytes(b"never opened")
    (run / "export" / "saved_model" / "saved_model.pb").write_bytes(b"never opened")
    image = str(next((corner_run.parent.parent / "images" / "val" / "ring").iterdir()))
    for model in (run / "export" / "model_int8.tflite", run / "export" / "saved_model"):
        assert main(["--model", str(model), image, "--output", str(tmp_path / "out")]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and "cannot be explained" in message
        assert f"--model {(run / 'model.keras').resolve()}" in message
        assert predict_main(["--model", str(model), image, "--explain", str(tmp_path / "out")]) == 2
        assert "cannot be explained" in capsys.readouterr().err
    lone = tmp_path / "phone" / "model.tflite"
    lone.parent.mkdir()
    lone.write_bytes(b"never opened")
    assert main(["--model", str(lone), image, "--output", str(tmp_path / "out")]) == 2
    assert "pass the model.keras of the run that made it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_predict_explain_writes_the_heatmap_of_each_reported_label(corner_run, tmp_path):
    _, paths, _ = held_out(corner_run)
    predictions, heatmaps = tmp_path / "predictions.json", tmp_path / "heatmaps"
    argv = ["--model", str(corner_run / "model.keras"), *paths[:4], "--output", str(predictions)]
    assert predict_main([*argv, "--explain", str(heatmaps)]) == 0
    result = json.loads(predictions.read_text())
    assert result["decision"] is not None  # two classes: labels are decisions at the operating point
    with open(heatmaps / "gradcam.csv") as handle:
        explained = {row["path"]: row["explained"] for row in csv.DictReader(handle)}
    assert explained == {row["path"]: row["label"] for row in result["predictions"]}
    assert len(list(heatmaps.glob("*.gradcam.png"))) == 4 and (heatmaps / "contact_sheet.png").is_file()


def test_training_writes_a_gradcam_grid_of_validation_images_to_tensorboard(corner_run):
    folder = corner_run / "logs" / "validation"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # every summary of the run in one file
    logs = event_accumulator.EventAccumulator(str(folder), size_guidance={})
    logs.Reload()
    (event,) = logs.Tensors("gradcam")
    best_epoch = json.loads((corner_run / "metrics.json").read_text())["best"]["epoch"]
    assert event.step == best_epoch - 1  # on the scalars' 0-based epoch axis
    description = logs.summary_metadata["gradcam"].summary_description
    assert f"weights of epoch {best_epoch}" in description and "wrong" in description and "right" in description


def tiny_cnn(size: int = 32) -> keras.Model:
    """A small untrained CNN with the toolkit's head layers: enough for the file handling of explain."""
    from classifier.model import probabilities_from

    inputs = keras.Input((size, size, 3))
    features = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    logits = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D(name="pool")(features))
    return keras.Model(inputs, probabilities_from(logits, 1.0))


@pytest.mark.parametrize("count, sheets", [(2, [""]), (4, ["_01", "_02"]), (5, ["_01", "_02", "_03"])])
def test_contact_sheets_are_pages_numbered_only_when_there_are_several(count, sheets, tmp_path, monkeypatch):
    monkeypatch.setattr(gradcam, "SHEET_PAGE", 2)
    (tmp_path / "in").mkdir()
    paths = []
    for index in range(count):
        paths.append(str(tmp_path / "in" / f"{index}.png"))
        Image.fromarray(np.full((32, 32, 3), 40 * index, np.uint8)).save(paths[-1])
    broken = tmp_path / "in" / "broken.png"
    broken.write_text("not a PNG")  # listed as an error, and no page of its own
    result = gradcam.explain_files(tiny_cnn(), [*paths, str(broken)], tmp_path / "out", ["a", "b"])
    expected = [f"contact_sheet{suffix}.png" for suffix in sheets]
    assert [Path(path).name for path in result["contact_sheets"]] == expected
    assert sorted(p.name for p in (tmp_path / "out").glob("contact_sheet*")) == expected
    assert len(list((tmp_path / "out").glob("*.gradcam.png"))) == count
    assert result["rows"][-1]["overlay"] is None and "cannot read image" in result["rows"][-1]["error"]


# Calibration of the corner run by training (temperature scaling itself: test_calibration.py).


def test_training_fits_the_temperature_on_validation_and_bakes_it_into_the_model(corner_run):
    """The corner run: two validation images are filed under the wrong class, so it makes confident mistakes."""
    record = calibration.read_calibration(corner_run)
    metrics = json.loads((corner_run / "metrics.json").read_text())
    model = keras.models.load_model(corner_run / "model.keras")  # safe mode, no custom objects
    temperature = record["temperature"]
    assert temperature != 1.0 and record["note"] is None and record["subset"] == "val"
    assert metrics["calibration"]["temperature"] == temperature == calibration.model_temperature(model)
    assert record["nll_after"] < record["nll_before"]  # what the fit minimises, on the images it was fitted on

    split = data.read_split(corner_run / "split.json")
    images = data.make_dataset(split, "val", image_size=model.input_shape[1], batch_size=16)
    labels = np.array([label for _, label in split.val])
    logits = calibration.logits_model(model).predict(images, verbose=0)
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities, calibration.softmax(logits, temperature), atol=1e-6)
    assert record["ece_before"] == pytest.approx(expected_calibration_error(labels, calibration.softmax(logits)))

    # The operating point was chosen on the calibrated probabilities, which predict and evaluate see.
    point = operating_point.read_operating_point(corner_run)
    on_calibrated = operating_point.operating_point_for(labels, probabilities, split.class_names)
    on_raw = operating_point.operating_point_for(labels, calibration.softmax(logits), split.class_names)
    assert point["threshold"] == pytest.approx(on_calibrated["threshold"], abs=1e-6)
    assert abs(on_raw["threshold"] - on_calibrated["threshold"]) > 1e-3
    # Two classes: accuracy and AUC are those of the uncalibrated model (scikit-learn on the raw logits).
    raw = calibration.softmax(logits)
    assert metrics["val"]["accuracy"] == accuracy_score(labels, raw.argmax(1))
    assert metrics["val"]["auc"] == pytest.approx(roc_auc_score(labels, raw[:, 1]), abs=1e-12)


def test_evaluate_reports_ece_before_and_after(corner_run, tmp_path):
    report = evaluate.evaluate(run_dir=corner_run, output_dir=tmp_path)
    split = data.read_split(corner_run / "split.json")
    model = keras.models.load_model(corner_run / "model.keras")
    images = data.make_dataset(split, "test", image_size=model.input_shape[1], batch_size=16)
    raw = calibration.softmax(calibration.logits_model(model).predict(images, verbose=0))  # exact, from the logits
    labels = np.array([label for _, label in split.test])
    summary = report["calibration"]
    assert summary is not None, "evaluate found no calibration.json for the run's model"
    assert summary["temperature"] == calibration.model_temperature(model)
    assert summary["ece_before"] == pytest.approx(expected_calibration_error(labels, raw), abs=1e-4)
    assert summary["ece_after"] == pytest.approx(report["ece"])
    assert "calibrated with temperature" in evaluate.format_report(report)
    assert (tmp_path / "reliability_diagram.png").is_file()
