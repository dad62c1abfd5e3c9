"""The classifier model: its named layers and input contract, save -> reload, and the two fine-tuning phases."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from classifier.backbones import build_backbone
from classifier.errors import UserError
from classifier.model import backbone_of, build_classifier, freeze_backbone, unfreeze_backbone

SIZE = 64  # small input: every test here is about structure, not accuracy


@pytest.fixture
def pixels():
    return np.random.default_rng(0).uniform(0, 255, size=(4, SIZE, SIZE, 3)).astype("float32")


def _is_backbone_variable(model, variable) -> bool:
    return any(variable is v for v in backbone_of(model).weights)


def test_classifier_takes_raw_pixels_and_returns_probabilities(pixels):
    model = build_classifier("efficientnet_lite0", num_classes=3, image_size=SIZE, weights="none")

    assert [layer.name for layer in model.layers] == [
        "image", "preprocess", "backbone", "pool", "dropout", "head", "temperature", "probabilities"
    ]  # fmt: skip
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.inputs[0].dtype == "float32"
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_preprocessing_and_imagenet_backbone_are_inside_the_model(pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    model = build_classifier("efficientnet_lite0", num_classes=2, image_size=SIZE, weights="imagenet")
    reference = build_backbone("efficientnet_lite0", SIZE, weights="imagenet")

    # The classifier's backbone holds the converted ImageNet weights and sees (x - 127) / 128 of the raw pixels.
    features = keras.Model(model.input, model.get_layer("pool").output)(pixels)
    expected = np.asarray(reference((pixels - 127.0) / 128.0, training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_head_logits_on_cached_features_equal_the_whole_models_logits(pixels):
    """The end of a run takes the validation logits from phase 1's features (classifier.features.head_logits) instead
    of running the backbone again: they must be the whole model's, dropout included (off at inference)."""
    from classifier import calibration, features

    model = build_classifier("efficientnet_lite0", num_classes=3, image_size=SIZE, weights="none", dropout=0.5)
    forward = features.forward_pass(features.feature_extractor(model))
    pooled = features.extract(forward, [[(pixels, np.eye(3)[[0, 1, 2, 0]])]])  # one batch of 4 images
    whole = calibration.logits_model(model).predict(pixels, verbose=0)
    np.testing.assert_allclose(features.head_logits(model, pooled.x, batch=3), whole, rtol=1e-4, atol=1e-4)
    assert features.head_logits(model, pooled.x[:0]).shape == (0, 3)


def test_head_stays_float32_under_mixed_precision(pixels):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_classifier("efficientnet_lite0", num_classes=2, image_size=SIZE, weights="none")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("head").dtype_policy.compute_dtype == "float32"
    assert backbone_of(model).get_layer("top_conv").dtype_policy.compute_dtype == "float16"
    assert model(pixels, training=False).dtype == "float32"


def test_saved_model_reloads_with_identical_outputs(pixels, tmp_path):
    model = build_classifier("efficientnet_lite0", num_classes=3, image_size=SIZE, weights="none")
    model.get_layer("head").set_weights([w + 0.1 for w in model.get_layer("head").get_weights()])
    path = tmp_path / "model.keras"
    model.save(path)

    reloaded = keras.saving.load_model(path)  # no custom_objects: standard layers only

    np.testing.assert_array_equal(model.predict(pixels, verbose=0), reloaded.predict(pixels, verbose=0))
    assert reloaded.input_shape[1] == SIZE
    assert backbone_of(reloaded).name == "backbone"


def test_freeze_leaves_only_the_head_trainable():
    model = build_classifier("efficientnet_lite0", num_classes=2, image_size=SIZE, weights="none")

    freeze_backbone(model)

    head = model.get_layer("head")
    assert {id(v) for v in model.trainable_weights} == {id(head.kernel), id(head.bias)}


def test_unfreeze_whole_top_blocks_keeps_batchnorm_frozen():
    model = build_classifier("efficientnet_lite0", num_classes=2, image_size=SIZE, weights="none")
    freeze_backbone(model)
    backbone = backbone_of(model)

    # EfficientNet-Lite0's last blocks are block6d and block7a; the head convolution goes with block7a.
    assert unfreeze_backbone(model, top_blocks=2) == ["block6d", "block7a"]

    trainable = [v for v in model.trainable_weights if _is_backbone_variable(model, v)]
    assert all(not layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    unfrozen = {layer.name for layer in backbone.layers if layer.trainable}
    assert unfrozen == {
        "block6d_expand_conv", "block6d_expand_activation", "block6d_dwconv", "block6d_activation",
        "block6d_project_conv", "block6d_add",
        "block7a_expand_conv", "block7a_expand_activation", "block7a_dwconv", "block7a_activation",
        "block7a_project_conv", "top_conv", "top_activation",
    }  # fmt: skip
    top_only = len(trainable)

    assert len(unfreeze_backbone(model, top_blocks=None)) == 16  # block1a ... block7a

    convolutions = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(layer.trainable for layer in convolutions)  # Conv2D and DepthwiseConv2D, stem included
    assert all(not layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert len([v for v in model.trainable_weights if _is_backbone_variable(model, v)]) > top_only


def test_blocks_of_keras_applications_backbones_are_whole():
    model = build_classifier("mobilenet_v2", num_classes=2, image_size=SIZE, weights="none")
    assert unfreeze_backbone(model, top_blocks=1) == ["block_16"]
    unfrozen = {layer.name for layer in backbone_of(model).layers if layer.trainable}
    assert unfrozen == {"block_16_expand", "block_16_expand_relu", "block_16_depthwise", "block_16_depthwise_relu",
                        "block_16_project", "Conv_1", "out_relu"}  # fmt: skip


def test_fine_tuning_step_leaves_batchnorm_statistics_alone(pixels):
    model = build_classifier("efficientnet_lite0", num_classes=2, image_size=SIZE, weights="none")
    unfreeze_backbone(model, top_blocks=None)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    bn = backbone_of(model).get_layer("top_bn")
    conv = backbone_of(model).get_layer("top_conv")
    before_bn = [w.copy() for w in bn.get_weights()]
    before_conv = conv.get_weights()[0].copy()

    model.train_on_batch(pixels, np.array([0, 1, 0, 1]))

    for before, after in zip(before_bn, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # gamma, beta and the moving statistics
    assert not np.array_equal(before_conv, conv.get_weights()[0])


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="at least 2 classes"):
        build_classifier("efficientnet_lite0", num_classes=1, image_size=SIZE, weights="none")
    with pytest.raises(UserError, match="image_size 8"):
        build_classifier("efficientnet_lite0", num_classes=2, image_size=8, weights="none")
    with pytest.raises(UserError, match="dropout"):
        build_classifier("efficientnet_lite0", num_classes=2, image_size=SIZE, weights="none", dropout=1.0)
    with pytest.raises(UserError, match="unknown backbone 'lite0'"):
        build_classifier("lite0", num_classes=2)
    with pytest.raises(UserError, match="no 'backbone' layer"):
        backbone_of(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
    model = build_classifier("mobilenet_v3_small", num_classes=2, image_size=SIZE, weights="none")
    with pytest.raises(UserError, match="unfreeze_blocks"):
        unfreeze_backbone(model, top_blocks=0)
