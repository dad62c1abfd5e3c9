"""`classifier evaluate` on a real (tiny) training run: Keras and TFLite agree, thresholds, report, figures."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, write_separable_folder
from PIL import Image

from classifier import data, evaluate, operating_point
from classifier.errors import UserError
from classifier.evaluate import BINARY_KEYS, THRESHOLD_KEYS, main
from classifier.export import export_run
from classifier.inference import load_predictor
from classifier.train import build_parser, config_from_args, train

# Alphabetical order makes "lesion" label 1, the default positive class.
CLASSES = {"clear": (40, 180, 60), "lesion": (200, 40, 40)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished binary run (tiny backbone, 64 px, 15 head epochs, no augmentation) with a float32 TFLite export."""
    root = tmp_path_factory.mktemp("evaluate")
    images = write_separable_folder(root / "images", per_class=30, classes=CLASSES)
    argv = ["--data-dir", str(images), "--output-dir", str(root / "runs"), "--name", "run", "--image-size", "64"]
    argv += ["--batch-size", "4", "--augment", "none", "--head-epochs", "15", "--finetune-epochs", "0", *TINY]
    run = train(config_from_args(build_parser().parse_args([*argv, "--set", "train.head_lr=0.01"])))
    export_run(run, formats=["float32"], metadata=False, latency_runs=2)
    return run


def assert_valid_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200


def read_predictions(folder: Path) -> dict[str, list[float]]:
    with open(folder / evaluate.PREDICTIONS_FILE) as handle:
        return {row["path"]: [float(row["p_clear"]), float(row["p_lesion"])] for row in csv.DictReader(handle)}


def test_training_stores_a_youden_threshold_and_export_ships_it(run_dir):
    point = operating_point.read_operating_point(run_dir)
    assert point["method"] == "youden" and point["positive_class"] == "lesion" and point["subset"] == "val"
    assert point["sensitivity"] + point["specificity"] - 1 == pytest.approx(point["youden_j"])
    shipped = operating_point.read_operating_point(run_dir / "export")
    assert {k: v for k, v in shipped.items() if k != "path"} == {k: v for k, v in point.items() if k != "path"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["operating_point"]["threshold"] == point["threshold"]


def test_keras_and_tflite_give_the_same_metrics(run_dir, capsys):
    keras_report = evaluate.evaluate(run_dir=run_dir)
    tflite_report = evaluate.evaluate(run_dir / "export" / "model_float32.tflite", run_dir=run_dir)
    assert keras_report["output_dir"] == str(run_dir / "evaluation" / "keras")
    assert tflite_report["output_dir"] == str(run_dir / "evaluation" / "model_float32")
    assert keras_report["model"]["kind"] == "keras" and tflite_report["model"]["kind"] == "tflite"
    test_count = len(data.read_split(run_dir / "split.json").test)
    assert keras_report["count"] == tflite_report["count"] == test_count
    assert keras_report["accuracy"] >= 0.9  # the run learned, so the comparison is about a working model
    for key in ("accuracy", "balanced_accuracy", "confusion_matrix", "per_class", "macro_avg", "binary"):
        assert keras_report[key] == tflite_report[key], key
    for key in ("loss", "auc", "ece"):
        assert keras_report[key] == pytest.approx(tflite_report[key], abs=1e-4), key
    keras_probabilities, tflite_probabilities = (
        read_predictions(Path(report["output_dir"])) for report in (keras_report, tflite_report)
    )
    assert set(keras_probabilities) == set(tflite_probabilities) and len(keras_probabilities) == test_count
    for path, values in keras_probabilities.items():
        np.testing.assert_allclose(values, tflite_probabilities[path], atol=1e-4)


def documented_schema() -> tuple[list[str], dict[str, set[str]]]:
    """The keys of evaluation.json as the README lists them, in order, and the fields it gives in braces."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = text.split("`evaluation.json` holds:", 1)[1].split("\n\n", 1)[0]
    paragraph = re.sub(r"\([^()]*\)", "", paragraph)  # remarks in parentheses
    fields = {name: set(re.findall(r"\w+", inner)) for name, inner in re.findall(r"`(\w+)` \{([^{}]*)\}", paragraph)}
    while "{" in paragraph:
        paragraph = re.sub(r"\{[^{}]*\}", "", paragraph)
    return re.findall(r"`(\w+)`", paragraph), fields


def test_report_json_follows_the_documented_schema_and_figures_open(run_dir):
    report = evaluate.evaluate(run_dir=run_dir, output_dir=run_dir / "schema-check")
    folder = Path(report["output_dir"])
    written = json.loads((folder / evaluate.REPORT_FILE).read_text())
    keys, fields = documented_schema()  # the README's description, not the module's own constants
    assert list(written) == keys
    for name in ("model", "data", "roc_auc"):
        assert set(written[name]) == fields[name], name
    assert set(written["binary"]) == set(BINARY_KEYS) and set(written["binary"]["default"]) == set(THRESHOLD_KEYS)
    assert written["binary"]["positive_class"] == "lesion"
    assert written["class_names"] == ["clear", "lesion"]
    assert written["data"]["subset"] == "test" and written["data"]["source"] == "run"
    assert set(written["files"]) == {"report", "predictions", *evaluate.FIGURES}
    for name in evaluate.FIGURES.values():
        assert_valid_png(folder / name)
    np.testing.assert_allclose(np.sum(written["confusion_matrix_normalized"], axis=1), 1.0)


def test_threshold_for_target_sensitivity_is_stored_and_reached_on_validation(run_dir, capsys):
    try:
        assert main(["--run-dir", str(run_dir), "--target-sensitivity", "0.95"]) == 0
        out = capsys.readouterr().out
        point = operating_point.read_operating_point(run_dir)
        assert point["method"] == "sensitivity" and point["target_sensitivity"] == 0.95
        assert point["positive_class"] == "lesion" and point["subset"] == "val"
        assert point["sensitivity"] >= 0.95
        # Recompute on the validation images independently of evaluate.
        split = data.read_split(run_dir / "split.json")
        images = np.stack([data.load_and_resize(Path(split.root) / rel, 64) for rel, _ in split.val])
        p_lesion = load_predictor(run_dir / "model.keras").predict(images)[:, 1]
        lesion = np.array([label for _, label in split.val]) == 1
        assert (p_lesion[lesion] >= point["threshold"]).mean() >= 0.95
        # The evaluation reports both thresholds, on the terminal and in the JSON.
        report = json.loads((run_dir / "evaluation" / "keras" / evaluate.REPORT_FILE).read_text())
        assert report["operating_point"]["threshold"] == point["threshold"]
        assert report["binary"]["operating_point"]["threshold"] == point["threshold"]
        assert report["binary"]["default"]["threshold"] == 0.5
        assert "default (0.5)" in out and "operating point (sensitivity 0.95)" in out and "specificity" in out
    finally:
        (run_dir / operating_point.FILE_NAME).unlink(missing_ok=True)


def test_evaluate_a_labelled_folder(run_dir, tmp_path):
    folder = write_separable_folder(tmp_path / "new", per_class=4, seed=7, classes=CLASSES)
    (folder / "lesion" / "broken.png").write_text("not a PNG")
    report = evaluate.evaluate(run_dir / "export" / "model_float32.tflite", data_dir=folder)
    assert report["data"]["source"] == "folder" and report["count"] == 8
    assert [entry["path"] for entry in report["data"]["skipped"]] == [str(Path("lesion") / "broken.png")]
    assert report["accuracy"] >= 0.75
    assert report["output_dir"] == str(run_dir / "evaluation" / "model_float32-new")
    # A class folder the model does not know is named, with the fix.
    write_separable_folder(folder, per_class=2, classes={"naevus": (40, 60, 200)})
    with pytest.raises(UserError, match="naevus"):
        evaluate.evaluate(run_dir / "model.keras", data_dir=folder)


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], ["--run-dir", "--data-dir"]),
        (["--run-dir", "{run}", "--model", "{run}/nope.tflite"], ["nope.tflite"]),
        (["--run-dir", "{run}", "--positive-class", "tumour"], ["tumour", "clear, lesion"]),
        (["--run-dir", "{run}", "--choose-threshold", "best"], ["best", "sensitivity:0.95"]),
        (["--run-dir", "{run}/missing"], ["missing", "--run-dir"]),
    ],
)
def test_user_errors_name_the_fix(run_dir, argv, words, capsys):
    assert main([arg.replace("{run}", str(run_dir)) for arg in argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
