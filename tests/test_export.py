"""Export end to end: every format written, checked against Keras, readable by MediaPipe with class names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import IMAGE_SIZE, copy_run, held_out_images

from classifier import export, tflite_metadata
from classifier.data import Split
from classifier.errors import UserError
from classifier.export import export_run, main
from classifier.inference import load_predictor

TFLITE = ("float32", "float16", "dynamic", "int8")


@pytest.fixture(scope="module")
def exported(exported_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the session's run exported to every format (the default), and the export's report."""
    run_dir, report = exported_run
    return copy_run(run_dir, tmp_path_factory.mktemp("export")), report


def test_every_format_is_written_and_passes_the_gate(exported):
    run_dir, report = exported
    out = run_dir / "export"
    expected = {"saved_model", "labels.txt", "input_contract.json", "export_report.json"}
    expected |= {f"model_{fmt}.tflite" for fmt in TFLITE}
    assert {p.name for p in out.iterdir()} == expected  # nothing half-written or temporary left behind
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert (out / "labels.txt").read_text() == (run_dir / "labels.txt").read_text()
    assert report["passed"] and report["failures"] == []
    assert (report["image_size"], report["num_classes"]) == (IMAGE_SIZE, 3)  # read from model.input_shape
    assert report["calibration_images"] == 40
    assert json.loads((out / "export_report.json").read_text()) == report

    formats = report["formats"]
    assert set(formats) == {"keras", "saved_model", *TFLITE}
    for fmt in TFLITE:
        assert formats[fmt]["size_bytes"] == (out / f"model_{fmt}.tflite").stat().st_size
        assert formats[fmt]["latency_ms"] > 0
    # What each format is for: float16 stores the weights in half precision, dynamic and int8 in 8 bits. The
    # tiny test backbone has about 10 k weights, so the files' fixed part (graph, signatures, metadata) hides the
    # 1/2 and 1/4 of their sizes (the README's table shows them for Lite0); the order of the sizes stays.
    sizes = {fmt: formats[fmt]["size_bytes"] for fmt in TFLITE}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"] and sizes["dynamic"] < sizes["float16"]
    dtypes = {
        fmt: {detail["dtype"] for detail in tf.lite.Interpreter(str(out / f"model_{fmt}.tflite")).get_tensor_details()}
        for fmt in TFLITE
    }
    assert np.float16 in dtypes["float16"] and not {np.float16, np.int8} & dtypes["float32"]
    assert np.int8 in dtypes["dynamic"] and np.int8 in dtypes["int8"]
    # The int8 file takes camera bytes directly and returns uint8 scores MediaPipe can read.
    assert (formats["int8"]["input_dtype"], formats["int8"]["output_dtype"]) == ("uint8", "uint8")
    assert formats["int8"]["input_quantization"] == pytest.approx([1.0, 0.0], abs=1e-3)


def interpreter_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    """A .tflite file's probabilities through TensorFlow's own interpreter, fed and read by hand: another runtime
    and other code than the LiteRT path (`classifier.inference`) the export's parity gate uses."""
    interpreter = tf.lite.Interpreter(model_path=str(path))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    scale, zero = source["quantization"]
    pixels = images if not scale else np.round(images / scale + zero)
    interpreter.set_tensor(source["index"], pixels.astype(source["dtype"]))
    interpreter.invoke()
    output = interpreter.get_tensor(target["index"]).astype(np.float64)
    scale, zero = target["quantization"]
    return (output - zero) * scale if scale else output


def test_report_numbers_match_a_recomputation(exported):
    run_dir, report = exported
    images, labels = held_out_images(run_dir)
    keras_probs = keras.models.load_model(run_dir / "model.keras").predict(images, verbose=0)
    keras_accuracy = np.mean(keras_probs.argmax(-1) == labels)
    assert report["parity_images"] == len(labels)
    assert report["formats"]["keras"]["accuracy"] == pytest.approx(keras_accuracy)
    assert keras_accuracy >= 0.9  # far above chance (1/3): the comparison means something

    for fmt in TFLITE:
        probs = interpreter_probabilities(run_dir / "export" / f"model_{fmt}.tflite", images)
        entry = report["formats"][fmt]
        assert entry["agreement"] == pytest.approx(np.mean(probs.argmax(-1) == keras_probs.argmax(-1))), fmt
        assert entry["accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels)), fmt
        assert entry["max_abs_diff"] == pytest.approx(np.max(np.abs(probs - keras_probs)), abs=1e-6), fmt
    assert report["formats"]["float32"]["max_abs_diff"] <= 1e-4


def test_saved_model_signatures_match_keras(exported):
    run_dir, _ = exported
    images, _ = held_out_images(run_dir)
    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    keras_probs = keras.models.load_model(run_dir / "model.keras").predict(pixels.astype(np.float32), verbose=0)

    loaded = tf.saved_model.load(str(run_dir / "export" / "saved_model"))
    assert {"serving_default", "serving_uint8"} <= set(loaded.signatures)
    as_float = loaded.signatures["serving_default"](images=tf.constant(pixels.astype(np.float32)))
    as_uint8 = loaded.signatures["serving_uint8"](images=tf.constant(pixels))
    for result in (as_float, as_uint8):
        np.testing.assert_allclose(result["probabilities"].numpy(), keras_probs, atol=1e-5)
        np.testing.assert_array_equal(result["top_class"].numpy(), keras_probs.argmax(-1))


def test_every_tflite_file_carries_labels_and_input_metadata(exported):
    run_dir, _ = exported
    labels = (run_dir / "labels.txt").read_text().split()
    for fmt in TFLITE:
        found = tflite_metadata.read_metadata((run_dir / "export" / f"model_{fmt}.tflite").read_bytes())
        assert found["labels"] == labels and found["input_color_space"] == "RGB", fmt
        # Float inputs take raw 0..255 pixels: mean 0 / std 1 tells MediaPipe not to rescale them.
        if fmt == "int8":
            assert found["input_mean"] is None
        else:
            assert (found["input_mean"], found["input_std"]) == ([0.0], [1.0]), fmt


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_mediapipe_image_classifier_returns_class_names(exported, fmt):
    mp = pytest.importorskip("mediapipe")
    from mediapipe.tasks.python import BaseOptions, vision

    run_dir, _ = exported
    images, _ = held_out_images(run_dir)
    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    class_names = (run_dir / "labels.txt").read_text().split()
    path = run_dir / "export" / f"model_{fmt}.tflite"
    litert_probs = load_predictor(path).predict(pixels)

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for image, probs in zip(pixels, litert_probs, strict=True):
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
            top = result.classifications[0].categories[0]
            assert top.category_name == class_names[probs.argmax()]
            assert top.score == pytest.approx(probs.max(), abs=1e-3)  # same numbers as LiteRT, not rescaled input


def test_a_failing_format_is_renamed_and_the_command_fails(exported, tmp_path, capsys):
    run_dir, _ = exported
    out = tmp_path / "out"
    # No model can have a negative probability difference: the float32 gate must fail.
    quick = ["--run-dir", str(run_dir), "--out-dir", str(out), "--formats", "float32", "--latency-runs", "2"]
    code = main([*quick, "--max-diff-float32", "0"])
    assert code == 1
    message = capsys.readouterr().err
    assert "float32: max probability difference" in message and "> 0" in message
    assert not (out / "model_float32.tflite").exists()
    assert (out / "model_float32.FAILED.tflite").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert not report["passed"] and not report["formats"]["float32"]["passed"]
    # A passing export, then a failing one: the file that passed stays under its name.
    started = time.perf_counter()
    assert main(quick) == 0
    elapsed = time.perf_counter() - started
    assert not (out / "model_float32.FAILED.tflite").exists()
    # The printed steps are those of this export and account for most of its time, never more than all of it.
    steps = json.loads((out / "export_report.json").read_text())["seconds"]
    assert list(steps) == ["loading", "TFLite source", "float32", "parity", "latency"]
    assert 0.5 * elapsed <= sum(steps.values()) <= elapsed + 0.05 * len(steps)  # each is rounded to 0.1 s
    assert f"export steps: {sum(steps.values()):.0f} s (loading {steps['loading']:.0f} s, " in capsys.readouterr().out
    passed = (out / "model_float32.tflite").read_bytes()
    capsys.readouterr()
    assert main([*quick, "--max-diff-float32", "0"]) == 1
    assert "the earlier model_float32.tflite is kept" in capsys.readouterr().err
    assert (out / "model_float32.tflite").read_bytes() == passed
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging files left


def test_user_mistakes_are_named(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path / "nope")]) == 2
    assert "nope/model.keras' does not exist" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--formats", "float32,onnx"]) == 2
    assert "unknown export format(s) ['onnx']" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads 0" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_is_named_and_a_data_folder_gets_no_lock(tmp_path, capsys):
    """Found by bench/hostile_sweep.py: a Lambda layer or a text file as model.keras ended export in Keras'
    traceback (evaluate and predict named them); `--run-dir` a data folder left `.lock` in it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "split.json").write_text("{}")  # read after the model: only needs to be there
    lambda_model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Lambda(lambda x: x * 2)])
    lambda_model.add(keras.layers.GlobalAveragePooling2D())
    lambda_model.save(run_dir / "model.keras")
    argv = ["--run-dir", str(run_dir), "--formats", "float32", "--no-metadata"]
    assert main(argv) == 2
    assert "contains a Lambda layer" in capsys.readouterr().err
    (run_dir / "model.keras").write_text("not a model")
    assert main(argv) == 2
    assert "damaged or is not a model" in capsys.readouterr().err
    images = tmp_path / "images" / "cats"
    images.mkdir(parents=True)
    assert main(["--run-dir", str(images.parent)]) == 2
    assert "model.keras' does not exist" in capsys.readouterr().err
    assert not (images.parent / ".lock").exists()


def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "model_int8.tflite"
    target.write_bytes(b"previous export")

    def write_half_then_die(self, payload):
        with Path.open(self, "wb") as handle:
            handle.write(payload[: len(payload) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        export._write_atomic(target, b"new model bytes")
    monkeypatch.undo()
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model_int8.tflite"]


def test_without_mediapipe_export_says_what_to_install_or_skips_metadata(exported, tmp_path, monkeypatch):
    run_dir, _ = exported
    monkeypatch.setitem(sys.modules, "mediapipe.tasks.metadata", None)  # as if mediapipe were not installed
    with pytest.raises(UserError, match=r"pip install mediapipe==1.2.2.*--no-metadata"):
        export_run(run_dir, formats=["float32"], out_dir=tmp_path)

    report = export_run(run_dir, formats=["float32"], out_dir=tmp_path, metadata=False, latency_runs=1)
    assert report["passed"]
    predictor = load_predictor(tmp_path / "model_float32.tflite")
    assert predictor.labels == (run_dir / "labels.txt").read_text().split()  # from labels.txt beside the file


def _outcomes(n: int, keras_right: int, only_keras: int, only_format: int):
    """Two-class labels and probabilities where Keras is right on `keras_right` of `n` images and the format
    differs from Keras on `only_keras` (Keras right, format wrong) and `only_format` (the reverse) images."""
    y_true = np.zeros(n, dtype=int)
    keras_top = np.where(np.arange(n) < keras_right, 0, 1)
    format_top = keras_top.copy()
    format_top[:only_keras] = 1  # among Keras' right answers
    format_top[keras_right : keras_right + only_format] = 0  # among its wrong ones
    as_probs = lambda top: np.stack([1.0 - 0.9 * top, 0.1 + 0.8 * top], axis=1)  # noqa: E731
    return as_probs(format_top), as_probs(keras_top), y_true


def test_quantized_gate_fails_only_a_drop_beyond_the_noise():
    limits = export.Thresholds()
    # The case from the field: 393 test images, Keras 86.77 %, int8 85.50 %: a drop of 1.27 points made of
    # 12 images only Keras got right and 7 only int8 got right. Within the noise: passes, with its interval shown.
    entry = export._parity(*_outcomes(393, 341, 12, 7))
    assert entry["accuracy_drop"] == pytest.approx(5 / 393)
    assert (entry["only_keras_right"], entry["only_format_right"]) == (12, 7)
    low, high = entry["accuracy_drop_ci95"]
    assert low < 0 < 5 / 393 < high
    assert export._gate("int8", {**entry, "input_quantization": [1.0, 0.0]}, limits) == []
    # 40 images lost and none gained (10 points): a real drop, and the gate says so with the interval.
    entry = export._parity(*_outcomes(393, 341, 40, 0))
    (problem,) = export._gate("int8", {**entry, "input_quantization": [1.0, 0.0]}, limits)
    assert "drop 10.18 points (95 % interval" in problem
    # No disagreement at all: exactly zero, no bootstrap needed.
    assert export._parity(*_outcomes(50, 40, 0, 0))["accuracy_drop_ci95"] == [0.0, 0.0]


def test_calibration_sample_is_class_balanced():
    train = [(f"a{i}.png", 0) for i in range(90)] + [(f"b{i}.png", 1) for i in range(10)]
    split = Split(root="/data", class_names=["a", "b"], train=train, val=[], test=[], skipped=[], seed=0, fractions={})
    sample = export._calibration_sample(split, 20, seed=0)
    labels = [label for _, label in sample.train]
    assert (labels.count(0), labels.count(1)) == (10, 10)  # 90:10 in the data, 10:10 in the sample
    sample = export._calibration_sample(split, 40, seed=0)
    labels = [label for _, label in sample.train]
    assert (labels.count(0), labels.count(1)) == (30, 10)  # the small class gives all it has; the other fills in
    assert len(set(sample.train)) == 40


def failing_first(monkeypatch, failing: str) -> list[str]:
    """Makes the gate fail the first check of format `failing` (as a real accuracy loss would); returns the formats
    the gate was asked about, in order."""
    real_gate, calls = export._gate, []

    def gate(fmt, entry, limits):
        calls.append(fmt)
        if fmt == failing and calls.count(fmt) == 1:
            return [f"pretend the full {fmt} file lost accuracy"]
        return real_gate(fmt, entry, limits)

    monkeypatch.setattr(export, "_gate", gate)
    return calls


def test_failing_int8_is_retried_with_its_worst_layers_in_float(exported, tmp_path, monkeypatch):
    run_dir, _ = exported
    calls = failing_first(monkeypatch, "int8")
    report = export_run(
        run_dir, formats=["int8"], out_dir=tmp_path, calibration_images=20, latency_runs=2, keep_float_layers=3
    )
    entry = report["formats"]["int8"]
    assert report["passed"] and entry["passed"] and calls.count("int8") == 2
    assert len(entry["float_layers"]) == 3 and "accuracy" in entry["full_int8"]
    # Still what a phone expects: camera bytes in, uint8 scores out, and the same answers as Keras.
    predictor = load_predictor(tmp_path / "model_int8.tflite")
    assert predictor.input_dtype == np.uint8 and entry["input_quantization"] == pytest.approx([1.0, 0.0], abs=1e-3)
    images, _ = held_out_images(run_dir)
    keras_top = keras.models.load_model(run_dir / "model.keras").predict(images, verbose=0).argmax(-1)
    assert np.mean(predictor.predict(images).argmax(-1) == keras_top) >= 0.9


def test_failing_dynamic_is_retried_with_its_worst_layer_in_float(exported, tmp_path, monkeypatch):
    run_dir, _ = exported
    calls = failing_first(monkeypatch, "dynamic")
    ranked_on = []
    real_dynamic = export.selective.dynamic

    def recording_dynamic(quantized, reference, images, *args):
        ranked_on.append(images)
        return real_dynamic(quantized, reference, images, *args)

    monkeypatch.setattr(export.selective, "dynamic", recording_dynamic)
    report = export_run(
        run_dir, formats=["dynamic"], out_dir=tmp_path, calibration_images=20, latency_runs=2, keep_float_layers=1
    )
    entry = report["formats"]["dynamic"]
    assert report["passed"] and entry["passed"] and calls.count("dynamic") == 2
    assert len(entry["float_layers"]) == 1 and "accuracy" in entry["full_dynamic"]
    # The layers were ranked on the 20 calibration (training) images, not on the test images they are judged on.
    test_images, _ = held_out_images(run_dir)
    [images] = ranked_on
    assert len(images) == 20 != len(test_images)
    # One weight tensor fewer in int8, and still the Keras model's answers through another runtime.
    path = tmp_path / "model_dynamic.tflite"

    def int8_tensors(tflite: Path) -> int:
        return sum(d["dtype"] == np.int8 for d in tf.lite.Interpreter(str(tflite)).get_tensor_details())

    assert int8_tensors(path) == int8_tensors(run_dir / "export" / "model_dynamic.tflite") - 1
    assert tflite_metadata.read_labels(path.read_bytes()) == report["labels"]  # the retried file keeps its metadata
    keras_top = keras.models.load_model(run_dir / "model.keras").predict(test_images, verbose=0).argmax(-1)
    assert np.mean(interpreter_probabilities(path, test_images).argmax(-1) == keras_top) >= 0.9


def test_a_run_folder_in_use_is_refused_and_a_killed_exports_scratch_is_removed(exported, tmp_path, capsys):
    from classifier import runlock

    run_dir, _ = exported
    out = tmp_path / "out"
    command = ["--run-dir", str(run_dir), "--out-dir", str(out), "--formats", "float32", "--latency-runs", "2"]
    with runlock.hold(run_dir, "training"):
        assert main(command) == 2
        assert f"is in use by training (process {os.getpid()})" in capsys.readouterr().err
    stale = out / ".convert-killed"  # what an export killed mid-conversion leaves
    stale.mkdir(parents=True)
    (stale / "model.tflite").write_bytes(bytes(1000))
    half = out / ".partial-999999-labels.txt"  # and a file it was writing (bench/hostile_sweep.py)
    half.write_text("hal")
    assert main(command) == 0
    assert not stale.exists() and not half.exists()


def test_a_lock_whose_holder_was_killed_is_free(tmp_path):
    from classifier import runlock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from classifier import runlock\n"
            "with runlock.hold(sys.argv[1], 'training'):\n    time.sleep(600)",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    lock = tmp_path / runlock.LOCK_FILE
    deadline = time.monotonic() + 60
    while not (lock.exists() and "process" in lock.read_text()):  # the holder has written its name: it holds it
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    with pytest.raises(UserError, match="in use by training"), runlock.hold(tmp_path, "export"):
        pass
    holder.kill()
    holder.wait()
    with runlock.hold(tmp_path, "export"):
        assert "export" in lock.read_text()
