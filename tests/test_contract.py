"""The input contract travels with the model: a .tflite or SavedModel copied alone is fed as its run was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, write_separable_folder
from PIL import Image

from classifier import contract, tflite_metadata
from classifier.errors import UserError
from classifier.evaluate import evaluate
from classifier.inference import load_predictor
from classifier.predict import main, predict
from classifier.run import Run

SIZE = 32
WIDE = (3 * SIZE, SIZE)  # width, height: the centre crop is exactly SIZE x SIZE, so no resize is involved in it


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory) -> Path:
    """One tiny run trained with `data.resize_mode=crop` and exported to a SavedModel and float32 TFLite."""
    from classifier.export import export_run
    from classifier.train import build_parser, config_from_args, train

    root = tmp_path_factory.mktemp("contract")
    images = write_separable_folder(root / "images", per_class=10)
    argv = ["--data-dir", str(images), "--output-dir", str(root / "runs"), "--name", "crop", *TINY]
    argv += ["--image-size", str(SIZE), "--batch-size", "4", "--augment", "none"]
    argv += ["--head-epochs", "3", "--finetune-epochs", "0", "--set", "data.resize_mode=crop"]
    run_dir = train(config_from_args(build_parser().parse_args(argv)))
    report = export_run(
        run_dir, formats=["saved_model", "float32"], metadata=True, latency_runs=1, calibration_images=8
    )
    assert report["passed"], report["failures"]
    return run_dir


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory) -> list[Path]:
    """Wide PNGs whose centre square differs from their sides, so cropping and stretching give other pixels."""
    folder = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(1)
    paths = []
    for index, (sides, centre) in enumerate([((200, 40, 40), (40, 60, 200)), ((40, 180, 60), (200, 40, 40))]):
        pixels = np.zeros((WIDE[1], WIDE[0], 3)) + sides + rng.normal(0, 15, (WIDE[1], WIDE[0], 3))
        pixels[:, SIZE : 2 * SIZE] = np.array(centre) + rng.normal(0, 15, (SIZE, SIZE, 3))
        pixels[::6, SIZE : 2 * SIZE] = 240  # stripes in the centre only
        paths.append(folder / f"wide_{index}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def alone(source: Path, folder: Path) -> Path:
    """A copy of a model file or SavedModel folder, alone in an empty folder: no run folder, no labels beside it."""
    folder.mkdir()
    target = folder / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    assert Run.of_model(target) is None and sorted(path.name for path in folder.iterdir()) == [source.name]
    return target


def oracle(model: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of the centre squares cut by hand, and of the whole images stretched (not via the contract)."""
    from classifier.data import load_and_resize

    predictor = load_predictor(model)
    crops = np.stack([np.asarray(Image.open(path).convert("RGB"))[:, SIZE : 2 * SIZE] for path in paths])
    stretched = np.stack([load_and_resize(path, SIZE, "stretch") for path in paths])
    return predictor.predict(crops), predictor.predict(stretched)


def probabilities(result: dict, labels: list[str]) -> np.ndarray:
    """The [N, C] probabilities of `predict`'s rows, in the order of `labels`."""
    rows = [{entry["label"]: entry["probability"] for entry in row["top_k"]} for row in result["predictions"]]
    return np.array([[row[name] for name in labels] for row in rows])


def test_training_writes_the_contract_beside_model_keras(crop_run):
    record = Run(crop_run).read_contract()
    assert record == contract.InputContract(SIZE, "crop", "auto", "first", tuple(Run(crop_run).read_labels()))
    export = Run(crop_run).export_dir
    assert Run(export).read_contract() == record
    assert contract.inside_model(export / "saved_model") == record
    assert contract.inside_model(export / "model_float32.tflite") == record
    # Declared in the metadata, where other readers of the file find it beside labels.txt.
    found = tflite_metadata.read_metadata((export / "model_float32.tflite").read_bytes())
    assert found["model_files"] == ["input_contract.json"] and found["labels"] == list(record.class_names)


def test_a_tflite_copied_alone_predicts_with_its_run_size_crop_and_labels(crop_run, wide_images, tmp_path):
    shipped = Run(crop_run).export_dir / "model_float32.tflite"
    lone = alone(shipped, tmp_path / "phone")
    class_names = Run(crop_run).read_labels()
    output = tmp_path / "predictions.json"
    assert main(["--model", str(lone), *map(str, wide_images), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert (result["labels"], result["image_size"], result["resize_mode"]) == (class_names, SIZE, "crop")
    assert result["decoding"] == {"dicom_window": "auto", "dicom_frames": "first"}

    cropped, stretched = oracle(shipped, wide_images)
    got = probabilities(result, class_names)
    np.testing.assert_allclose(got, cropped, atol=1e-5)
    assert np.abs(stretched - cropped).max() > 1e-3  # the oracle tells the two resize modes apart
    in_run = predict(shipped, [str(path) for path in wide_images])  # the run folder's own settings
    assert in_run["resize_mode"] == "crop" and in_run["predictions"] == result["predictions"]


def test_a_saved_model_copied_alone_predicts_with_its_run_size_crop_and_labels(crop_run, wide_images, tmp_path, capsys):
    shipped = Run(crop_run).export_dir / "saved_model"
    lone = alone(shipped, tmp_path / "server")
    class_names = Run(crop_run).read_labels()
    result = predict(lone, [str(path) for path in wide_images])
    assert (result["labels"], result["image_size"], result["resize_mode"]) == (class_names, SIZE, "crop")
    assert "no labels found" not in capsys.readouterr().err

    cropped, _ = oracle(shipped, wide_images)
    np.testing.assert_allclose(probabilities(result, class_names), cropped, atol=1e-5)
    assert predict(shipped, [str(path) for path in wide_images])["predictions"] == result["predictions"]


def test_evaluate_reads_a_lone_tflite_as_its_run_did(crop_run, tmp_path):
    lone = alone(Run(crop_run).export_dir / "model_float32.tflite", tmp_path / "device")
    report = evaluate(lone, data_dir=crop_run.parent.parent / "images")
    assert report["model"]["resize_mode"] == "crop" and report["model"]["image_size"] == SIZE


def test_a_contract_newer_than_this_version_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not read")
    (tmp_path / "input_contract.json").write_text(json.dumps({"schema": contract.SCHEMA + 1}))
    with pytest.raises(UserError, match="newer than this version reads.*--resize-mode"):
        contract.of_model(path)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"size"])
def test_a_contract_that_is_not_text_or_has_no_size_is_refused(tmp_path, content):
    """Found by bench/hostile_sweep.py: bytes that are not UTF-8 ended in UnicodeDecodeError; image_size -5 was read."""
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not read")
    if content == b"size":
        record = json.loads(contract.InputContract(32, "crop", "auto", "first", ("ok", "defect")).to_json())
        record["image_size"] = -5
        content = json.dumps(record).encode()
    (tmp_path / "input_contract.json").write_bytes(content)
    with pytest.raises(UserError, match="input contract") as caught:
        contract.of_model(path)
    assert str(tmp_path / "input_contract.json") in str(caught.value)
