"""The classifier: raw pixels -> preprocessing -> pretrained backbone -> pooling -> dropout -> softmax head.

Follows the keras-io transfer-learning guide: preprocessing lives inside the model (exported models take raw
0..255 pixels), the backbone is called with `training=False` so its BatchNorm layers stay in inference mode even
after unfreezing, and fine-tuning unfreezes the top layers with BatchNorm kept frozen. Only standard Keras layers
are used, so `model.keras` reloads with `keras.saving.load_model(path)` and no custom objects.
"""

from __future__ import annotations

import keras

from classifier.backbones import build_backbone, get_backbone_spec
from classifier.errors import UserError

BACKBONE_LAYER = "backbone"


def build_classifier(
    backbone: str,
    num_classes: int,
    image_size: int | None = None,
    weights: str = "imagenet",
    dropout: float = 0.2,
) -> keras.Model:
    """Builds the transfer-learning classifier; call it inside `strategy.scope()` when distributing.

    Args:
        backbone: Registry name (see `classifier.backbones.BACKBONES`).
        num_classes: Number of classes, at least 2.
        image_size: Square input size; None takes the backbone's native size (224 for EfficientNet-Lite0).
        weights: "imagenet", "none" or the path of a Keras weights file for the backbone.
        dropout: Dropout rate before the head, in [0, 1).

    Returns:
        A functional keras.Model named "<backbone>_classifier": input "image" float32 [None, S, S, 3] with raw
        pixels 0..255; layers "preprocess", "backbone" (nested model, called with training=False), "pool",
        "dropout", "head" (Dense softmax in float32, also under mixed precision); output [None, num_classes].

    Raises:
        UserError: Unknown backbone, unsupported size, bad weights value, too few classes or a bad dropout rate.
    """
    spec = get_backbone_spec(backbone)
    size = spec.default_size if image_size is None else image_size
    spec.check_size(size)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes is {num_classes!r}: a classifier needs at least 2 classes (one folder each).")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout is {dropout!r}: use a rate in [0, 1), such as 0.2.")

    base = build_backbone(backbone, size, weights, model_name=BACKBONE_LAYER)
    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    x = spec.preprocessing_layer("preprocess")(inputs)
    # training=False keeps BatchNorm on its ImageNet statistics in every phase, including fine-tuning.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 softmax: under mixed_float16, a float16 softmax loses small probabilities and destabilises the loss.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def backbone_of(model: keras.Model) -> keras.Model:
    """Returns the nested backbone model of a classifier from `build_classifier` (also after reloading).

    Raises:
        UserError: The model has no "backbone" layer (it was not built by this toolkit).
    """
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        raise UserError(
            f"model '{model.name}' has no '{BACKBONE_LAYER}' layer: "
            "use a model.keras written by this toolkit's training."
        ) from None


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: freezes the whole backbone, so only the head trains. Recompile the model afterwards.

    Args:
        model: A classifier from `build_classifier`.
    """
    backbone_of(model).trainable = False


def unfreeze_backbone(model: keras.Model, top_n: int | None) -> None:
    """Phase 2: makes the top `top_n` backbone layers trainable, keeping every BatchNorm layer frozen.

    `top_n` counts the backbone's layers from its output end, all of them (activations, adds and the input
    included), as in the keras-io fine-tuning guide (`model.layers[-20:]`). EfficientNet-Lite0's backbone has
    141 layers; 40 reaches back to `block6a_project_conv` and trains 14 of its kernels (2.55 M parameters with
    the head). BatchNorm layers stay frozen because their moving statistics would be re-estimated from small,
    domain-shifted batches (keras-io transfer-learning guide). Recompile the model afterwards.

    Args:
        model: A classifier from `build_classifier`.
        top_n: Number of layers to unfreeze from the top, or None for all of them.

    Raises:
        UserError: `top_n` is not a positive whole number or None.
    """
    if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
        raise UserError(f"top_n is {top_n!r}: use a positive number of layers, or None (all).")
    backbone = backbone_of(model)
    backbone.trainable = True
    layers = backbone.layers
    first_trainable = 0 if top_n is None else max(0, len(layers) - top_n)
    for index, layer in enumerate(layers):
        layer.trainable = index >= first_trainable and not isinstance(layer, keras.layers.BatchNormalization)
