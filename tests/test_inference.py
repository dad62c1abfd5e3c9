"""One predictor for .keras, SavedModel and .tflite: each kind agrees with Keras and finds its labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import IMAGE_SIZE, copy_run, held_out_images

from classifier.errors import UserError
from classifier.inference import load_predictor, measure_latency


@pytest.fixture(scope="module")
def exported(exported_run, tmp_path_factory) -> Path:
    """A copy of the session's trained run, exported to every format under run/export/."""
    run_dir, _ = exported_run
    return copy_run(run_dir, tmp_path_factory.mktemp("inference"))


def test_every_kind_agrees_with_keras_and_knows_the_class_names(exported):
    images, labels = held_out_images(exported)
    class_names = (exported / "labels.txt").read_text().split()
    keras_probs = keras.models.load_model(exported / "model.keras").predict(images, verbose=0)
    assert np.mean(keras_probs.argmax(-1) == labels) >= 0.9  # the trained model is far above chance (1/3)

    cases = {
        "keras": (exported / "model.keras", np.float32, 1e-6),
        "saved_model": (exported / "export" / "saved_model", np.float32, 1e-5),
        "tflite": (exported / "export" / "model_float32.tflite", np.float32, 1e-4),
    }
    for kind, (path, dtype, tolerance) in cases.items():
        predictor = load_predictor(path)
        assert (predictor.kind, predictor.image_size, predictor.input_dtype) == (kind, IMAGE_SIZE, np.dtype(dtype))
        assert predictor.labels == class_names
        probs = predictor.predict(images, batch_size=8)
        assert probs.dtype == np.float32 and probs.shape == keras_probs.shape
        np.testing.assert_allclose(probs, keras_probs, atol=tolerance, err_msg=kind)

    int8 = load_predictor(exported / "export" / "model_int8.tflite", num_threads=1)
    assert int8.input_dtype == np.uint8 and int8.labels == class_names
    int8_probs = int8.predict(images)
    np.testing.assert_allclose(int8_probs.sum(-1), 1.0, atol=0.05)  # dequantized probabilities, not raw bytes
    assert np.mean(int8_probs.argmax(-1) == keras_probs.argmax(-1)) >= 0.9


def test_uint8_and_float_pixels_and_batch_sizes_give_the_same_result(exported):
    images, _ = held_out_images(exported)
    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    for name in ("model_float32.tflite", "model_int8.tflite"):
        predictor = load_predictor(exported / "export" / name)
        reference = predictor.predict(pixels, batch_size=len(pixels))
        np.testing.assert_allclose(predictor.predict(pixels.astype(np.float32), batch_size=4), reference, atol=1e-6)
        np.testing.assert_allclose(predictor.predict(pixels, batch_size=1), reference, atol=1e-6)


def test_tflite_labels_travel_inside_the_file(exported, tmp_path):
    lone = tmp_path / "phone" / "model.tflite"
    lone.parent.mkdir()
    shutil.copy(exported / "export" / "model_int8.tflite", lone)
    assert load_predictor(lone).labels == (exported / "labels.txt").read_text().split()


def test_latency_is_measured_at_batch_one(exported):
    predictor = load_predictor(exported / "export" / "model_int8.tflite")
    seen = []  # the batches the model was actually given
    predict = predictor.predict
    predictor.predict = lambda images, batch_size=32: seen.append(images.shape) or predict(images, batch_size)
    latency = measure_latency(predictor, runs=5, warmup=1)
    assert seen == [(1, predictor.image_size, predictor.image_size, 3)] * 6  # one warm-up, five timed: one image each
    assert latency["runs"] == 5 and 0 < latency["median_ms"] <= latency["p90_ms"]


def test_bad_paths_and_inputs_are_named(exported, tmp_path):
    with pytest.raises(UserError, match="missing.tflite.*does not exist.*SavedModel"):
        load_predictor(tmp_path / "missing.tflite")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(UserError, match="notes.txt.*model.keras.*saved_model.pb.*tflite"):
        load_predictor(notes)
    with pytest.raises(UserError, match=r"\[N, 48, 48, 3\]"):
        load_predictor(exported / "export" / "model_float32.tflite").predict(np.zeros((2, 32, 32, 3), np.uint8))

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(exported / "model.keras", wrong / "model.keras")
    (wrong / "labels.txt").write_text("only\ntwo\n")
    with pytest.raises(UserError, match="labels.txt' has 2 names but model .* has 3 outputs"):
        load_predictor(wrong / "model.keras")


def test_files_that_are_not_models_or_not_safe_get_one_line_that_names_them(tmp_path):
    from classifier.inference import load_predictor

    text = tmp_path / "notes.keras"
    text.write_text("not a zip archive")
    garbage = tmp_path / "model.tflite"
    garbage.write_bytes(b"\x00garbage" * 64)
    lambda_model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2)])
    lambda_model.save(tmp_path / "lambda.keras")
    for path, expected in ((text, "damaged or is not a model"), (garbage, "damaged or is not a model")):
        with pytest.raises(UserError, match=expected) as caught:
            load_predictor(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="Lambda layer"):
        load_predictor(tmp_path / "lambda.keras")


def test_a_model_that_is_not_an_image_classifier_is_refused_with_its_shapes(tmp_path):
    """Found by bench/hostile_sweep.py: predict, evaluate, benchmark and export ended in Keras' or LiteRT's shape
    errors deep inside the first prediction."""
    import tensorflow as tf

    dense = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, activation="softmax")])
    dense.save(tmp_path / "dense.keras")
    (tmp_path / "dense.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(dense).convert())
    for name in ("dense.keras", "dense.tflite"):
        with pytest.raises(UserError, match="is not an image classifier: it takes .*10") as caught:
            load_predictor(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
