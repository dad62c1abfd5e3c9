"""`classifier predict` on files, folders and globs, with unreadable files among them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from classifier import data, inference, operating_point
from classifier.predict import main, predict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_model(folder: Path, classes: list[str], size: int = 32) -> Path:
    """A model whose answer is known: the mean colour of the image picks the class (red, green, blue channel)."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((size, size, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    head = keras.layers.Dense(len(classes), activation="softmax", name="head")
    model = keras.Model(inputs, head(pooled))
    kernel = (12 * np.eye(3) - 6)[:, : len(classes)]
    head.set_weights([kernel.astype(np.float32), np.zeros(len(classes), np.float32)])
    model.save(folder / "model.keras")
    (folder / "labels.txt").write_text("".join(f"{name}\n" for name in classes))
    return folder / "model.keras"


def write_image(path: Path, colour, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return colour_model(tmp_path_factory.mktemp("model"), list(COLOURS))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    write_image(root / "red" / "r1.png", COLOURS["red"])
    write_image(root / "nested" / "deeper" / "g1.jpg", COLOURS["green"])
    write_image(root / "b1.bmp", COLOURS["blue"])
    write_image(root / "r2.png", COLOURS["red"])
    write_image(root / ".hidden.png", COLOURS["red"])  # hidden: ignored
    (root / "notes.txt").write_text("not an image, and not named like one: ignored")
    (root / "corrupt.png").write_text("this is not a PNG")
    (root / "empty.jpg").write_bytes(b"")
    return root


def test_folder_with_bad_files_gives_a_row_for_every_good_file_and_names_the_bad_ones(
    model_path, image_folder, tmp_path, capsys
):
    output = tmp_path / "out" / "predictions.json"
    argv = ["--model", str(model_path), str(image_folder), "--output", str(output), "--batch-size", "2"]
    assert main(argv) == 0
    result = json.loads(output.read_text())
    rows = {Path(row["path"]).name: row for row in result["predictions"]}
    assert set(rows) == {"r1.png", "g1.jpg", "b1.bmp", "r2.png", "corrupt.png", "empty.jpg"}
    expected = {"r1.png": "red", "r2.png": "red", "g1.jpg": "green", "b1.bmp": "blue"}
    for name, label in expected.items():
        assert rows[name]["label"] == label and rows[name]["error"] is None
        assert rows[name]["top_k"][0]["label"] == label and rows[name]["top_k"][0]["probability"] > 0.9
        assert len(rows[name]["top_k"]) == 3
    for bad in ("corrupt.png", "empty.jpg"):
        assert rows[bad]["label"] is None and rows[bad]["error"]
    assert result["errors"] == 2
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "empty.jpg" in err


def test_csv_to_stdout_from_files_and_globs(model_path, image_folder, capsys):
    pattern = str(image_folder / "**" / "*.jpg")
    assert main(["--model", str(model_path), "--top-k", "2", str(image_folder / "b1.bmp"), pattern]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [Path(row["path"]).name for row in rows] == ["b1.bmp", "empty.jpg", "g1.jpg"]  # glob results sorted
    assert list(rows[0]) == ["path", "label", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert rows[0]["label"] == "blue" and rows[2]["label"] == "green"
    assert rows[1]["label"] == "" and "empty" in rows[1]["error"]


def test_pixels_are_read_as_in_training(model_path, tmp_path):
    # A run config beside the model asks for centre crops: predict must resize the same way.
    (model_path.parent / "config.yaml").write_text("data:\n  resize_mode: crop\n  image_size: 32\n")
    try:
        image = np.zeros((30, 90, 3), np.uint8)
        image[:, :30] = COLOURS["green"]  # the sides are cropped away...
        image[:, 30:60] = COLOURS["blue"]  # ...and the centre square is blue
        image[:, 60:] = COLOURS["green"]
        path = tmp_path / "wide.png"
        Image.fromarray(image).save(path)
        result = predict(model_path, [str(path)])
        assert result["resize_mode"] == "crop" and result["predictions"][0]["label"] == "blue"
        expected = inference.load_predictor(model_path).predict(data.load_and_resize(path, 32, "crop")[None])[0]
        got = {entry["label"]: entry["probability"] for entry in result["predictions"][0]["top_k"]}
        assert got["blue"] == pytest.approx(float(expected[2]), abs=1e-6)
        assert predict(model_path, [str(path)], resize_mode="stretch")["predictions"][0]["label"] == "green"
    finally:
        (model_path.parent / "config.yaml").unlink()


def test_two_class_model_uses_the_stored_operating_point(tmp_path, capsys):
    model = colour_model(tmp_path / "binary", ["red", "green"])
    # Mostly red with some green: P(green) is small but above a low threshold.
    path = write_image(tmp_path / "reddish.png", (200, 120, 30))
    p_green = predict(model, [str(path)])["predictions"][0]["top_k"]
    p_green = {entry["label"]: entry["probability"] for entry in p_green}["green"]
    assert 0.01 < p_green < 0.5
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.99, 0.01]])
    point = operating_point.operating_point_for(np.array([0, 1, 0, 0]), probabilities, ["red", "green"])
    point["threshold"] = p_green / 2  # as if the validation split had asked for a very sensitive threshold
    operating_point.write_operating_point(model.parent, point)
    assert main(["--model", str(model), str(path)]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["label"] == "green" and row["class_1"] == "red"  # thresholded decision vs most probable class
    assert float(row["threshold"]) == pytest.approx(p_green / 2)
    assert main(["--model", str(model), str(path), "--no-operating-point"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["label"] == "red" and "threshold" not in row


@pytest.mark.parametrize(
    "inputs, words",
    [
        ([], ["no input images"]),
        (["does/not/exist.png", "nothing/*.jpg"], ["no image files found", "does/not/exist.png"]),
    ],
)
def test_user_errors_name_the_problem(model_path, inputs, words, capsys):
    assert main(["--model", str(model_path), *inputs]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_missing_model_is_a_clear_error(tmp_path, image_folder, capsys):
    assert main(["--model", str(tmp_path / "nope.keras"), str(image_folder)]) == 2
    assert "nope.keras" in capsys.readouterr().err


def test_a_bad_output_path_is_refused_before_predicting_and_a_good_one_gets_the_rows(
    model_path, image_folder, tmp_path, capsys
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for output, words in ((tmp_path, "is a folder"), (blocker / "out.csv", "is a file, not a folder")):
        assert main(["--model", str(model_path), str(image_folder), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    target = tmp_path / "new" / "deeper" / "predictions.csv"  # a missing folder is created
    assert main(["--model", str(model_path), str(image_folder), "--output", str(target)]) == 0
    assert target.read_text().count("\n") > 1 and not list(target.parent.glob(".*partial"))
