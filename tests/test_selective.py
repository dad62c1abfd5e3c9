"""Selective dynamic-range quantization finds the layer that cannot be quantized and gives it its float weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from classifier import selective

SIZE = 8


def convert(model: keras.Model, dynamic: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if dynamic:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def probabilities(tflite: bytes, images: np.ndarray) -> np.ndarray:
    """TensorFlow's own interpreter, fed by hand: not the LiteRT path selective.dynamic measures with."""
    interpreter = tf.lite.Interpreter(model_content=tflite)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(target["index"])


@pytest.fixture(scope="module")
def known_answer():
    """Three dense layers; the middle one ("fragile") cannot survive int8 weights, the others can.

    Its weights from input unit 0 are 1000 while the rest are about 0.1 to 0.3, and unit 0 is always 0 (the layer before
    has a zero column and a ReLU), so in float the 1000s never matter. Per-channel int8 gives each output column
    the step 1000/127 ≈ 7.9: every other weight of the column rounds to 0 and the layer's output is lost.
    """
    rng = np.random.default_rng(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="benign_in")(x)
    x = keras.layers.Dense(64, activation="relu", name="fragile")(x)
    x = keras.layers.Dense(32, activation="relu", name="benign_out")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="scores")(x)  # 128 weights: too few to quantize
    model = keras.Model(inputs, outputs, name="classifier")
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            kernel = rng.normal(0, 1 / np.sqrt(kernel.shape[0]), kernel.shape).astype(np.float32)  # unit-scale outputs
            if layer.name == "benign_in":
                kernel[:, 0] = 0.0
            if layer.name == "fragile":
                kernel[0, :] = 1000.0
            layer.set_weights([kernel, np.zeros_like(bias)])
    images = rng.uniform(0, 255, (64, SIZE, SIZE, 3)).astype(np.float32)
    return convert(model, dynamic=True), convert(model, dynamic=False), images


def test_the_layer_that_loses_most_is_the_one_kept_in_float(known_answer, tmp_path):
    quantized, reference, images = known_answer
    expected = probabilities(reference, images)
    full_error = np.abs(probabilities(quantized, images) - expected).sum(-1).mean()

    tflite, kept = selective.dynamic(quantized, reference, images, keep_float=1, scratch=tmp_path, num_threads=1)

    assert kept == ["fragile"]
    error = np.abs(probabilities(tflite, images) - expected).sum(-1).mean()
    assert full_error > 0.1 and error < full_error / 10  # the fragile layer was the damage
    assert len(tflite) > len(quantized)  # 64 x 64 float weights instead of int8 ones
    details = tf.lite.Interpreter(model_content=tflite).get_tensor_details()
    int8_weights = sorted(d["name"].split("/")[1] for d in details if d["dtype"] == np.int8)
    assert int8_weights == ["benign_in_1", "benign_out_1"]  # the other two layers stay quantized


def test_keeping_every_layer_in_float_gives_the_float_model_back(known_answer, tmp_path):
    quantized, reference, images = known_answer
    tflite, kept = selective.dynamic(quantized, reference, images, keep_float=10, scratch=tmp_path, num_threads=1)
    assert sorted(kept) == ["benign_in", "benign_out", "fragile"]
    np.testing.assert_allclose(probabilities(tflite, images), probabilities(reference, images), atol=1e-6)
