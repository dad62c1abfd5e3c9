"""The classifier: raw pixels -> preprocessing -> pretrained backbone -> pooling -> dropout -> softmax head.

Follows the keras-io transfer-learning guide: preprocessing lives inside the model (exported models take raw
0..255 pixels), the backbone is called with `training=False` so its BatchNorm layers stay in inference mode even
after unfreezing, and fine-tuning unfreezes the top layers with BatchNorm kept frozen. Only standard Keras layers
are used, so `model.keras` reloads with `keras.saving.load_model(path)` and no custom objects.

The head ends in three layers: "head" (Dense, the logits), "temperature" (a Rescaling by 1/T, T = 1 while
training) and "probabilities" (softmax). After training, `classifier.calibration` fits T on the validation split
and rebuilds the model with it, so every file made from `model.keras` gives calibrated probabilities, and Grad-CAM
(`classifier.gradcam`) reads the logits from "head".
"""

from __future__ import annotations

import re

import keras

from classifier.backbones import build_backbone, get_backbone_spec
from classifier.errors import UserError

BACKBONE_LAYER = "backbone"
LOGITS_LAYER = "head"
TEMPERATURE_LAYER = "temperature"
PROBABILITIES_LAYER = "probabilities"


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
        "dropout", "head" (Dense logits), "temperature" (Rescaling by 1/T, here T = 1), "probabilities"
        (softmax); the last three in float32, also under mixed precision. Output [None, num_classes].

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
    # float32 head: under mixed_float16, a float16 softmax loses small probabilities and destabilises the loss.
    logits = keras.layers.Dense(num_classes, dtype="float32", name=LOGITS_LAYER)(x)
    return keras.Model(inputs, probabilities_from(logits, 1.0), name=f"{backbone}_classifier")


def probabilities_from(logits, temperature: float):
    """softmax(logits / temperature) as the two named float32 layers every classifier ends in.

    Built-in layers only (a Rescaling, not a custom or Lambda layer), so the model still loads in Keras' safe mode
    and converts to TFLite builtin ops.
    """
    scaled = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name=TEMPERATURE_LAYER)(logits)
    return keras.layers.Activation("softmax", dtype="float32", name=PROBABILITIES_LAYER)(scaled)


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


# How keras.applications and the Lite backbones name the layers of one residual block. Layers that belong to no
# block (the stem, the head convolution "top_conv") join their neighbouring block (see `backbone_blocks`).
_BLOCK_NAME_PATTERNS = (
    re.compile(r"^(block\d+[a-z])_"),  # EfficientNet(-Lite, V2): block6a_expand_conv
    re.compile(r"^(block_\d+)_"),  # MobileNetV2: block_16_expand
    re.compile(r"^(conv\d+_block\d+)_"),  # ResNet50V2: conv5_block3_1_conv
    re.compile(r"^(expanded_conv(?:_\d+)?)_"),  # MobileNetV3: expanded_conv_10_expand
    re.compile(r"_(stage_\d+_block_\d+)_"),  # ConvNeXt: convnext_tiny_stage_3_block_2_depthwise_conv
)


def _block_name(layer_name: str) -> str | None:
    for pattern in _BLOCK_NAME_PATTERNS:
        match = pattern.search(layer_name)
        if match:
            return match.group(1)
    return None


def backbone_blocks(backbone: keras.Model) -> list[tuple[str, list[keras.layers.Layer]]]:
    """Groups a backbone's layers into its residual blocks, bottom to top.

    A block is the run of layers that share a block name (`block6a_*`). Layers outside any block join the block
    below them, so the head convolution (`top_conv`, `top_bn`) goes with the last block, and the stem, which has no
    block below it, with the first. A backbone whose layer names follow none of the known patterns gets one "block"
    per layer, which is the layer count of the keras-io guide.

    Args:
        backbone: The nested backbone model (`backbone_of(model)`).

    Returns:
        [(block name, [layers])] in the backbone's order.
    """
    blocks: list[tuple[str, list[keras.layers.Layer]]] = []
    leading: list[keras.layers.Layer] = []  # layers before the first named block (input, stem)
    for layer in backbone.layers:
        name = _block_name(layer.name)
        if name is not None and (not blocks or blocks[-1][0] != name):
            blocks.append((name, leading + [layer]))
            leading = []
        elif blocks:
            blocks[-1][1].append(layer)
        else:
            leading.append(layer)
    if not blocks:
        return [(layer.name, [layer]) for layer in backbone.layers]
    return blocks


def unfreeze_backbone(model: keras.Model, top_blocks: int | None) -> list[str]:
    """Phase 2: makes the top `top_blocks` residual blocks trainable, keeping every BatchNorm layer frozen.

    Whole blocks, never part of one (keras-io fine-tuning guide: a block cut in the middle trains a layer whose
    partner in the residual path stays fixed). EfficientNet-Lite0 has 16 blocks (block1a ... block7a, the head
    convolution counted with block7a); 5 unfreezes block6a to the top (2.9 M parameters). BatchNorm layers stay
    frozen because their moving statistics would be re-estimated from small, domain-shifted batches (keras-io
    transfer-learning guide). Recompile the model afterwards.

    Args:
        model: A classifier from `build_classifier`.
        top_blocks: Number of blocks to unfreeze from the top, or None for all of them.

    Returns:
        The names of the unfrozen blocks, bottom to top.

    Raises:
        UserError: `top_blocks` is not a positive whole number or None.
    """
    if top_blocks is not None and (not isinstance(top_blocks, int) or top_blocks < 1):
        raise UserError(f"unfreeze_blocks is {top_blocks!r}: use a positive number of blocks, or 'all'.")
    backbone = backbone_of(model)
    backbone.trainable = True
    blocks = backbone_blocks(backbone)
    chosen = blocks if top_blocks is None else blocks[-top_blocks:]
    unfrozen = {id(layer) for _, layers in chosen for layer in layers}
    for layer in backbone.layers:
        layer.trainable = id(layer) in unfrozen and not isinstance(layer, keras.layers.BatchNormalization)
    return [name for name, _ in chosen]
