"""Training-time augmentation from Keras core's image layers (the KerasCV family; DESIGN.md decision 2).

Augmentation runs in the tf.data training pipeline only. Random layers inside an exported model break TFLite
conversion (keras-team/keras#19108), and evaluation must see the images as they are.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from classifier.config import AugmentConfig

# Each preset sets every operation; a value given in the config overrides it. Magnitudes are the small ones the
# keras-io fine-tuning examples use: enough to regularise, not enough to change what the image shows.
_LIGHT = dict(
    horizontal_flip=True,
    vertical_flip=False,
    rotation=0.05,
    zoom=0.1,
    translation=0.1,
    contrast=0.2,
    brightness=0.0,
    randaugment=False,
    mixup=False,
    cutmix=False,
)
PRESETS: dict[str, dict] = {
    "none": dict(_LIGHT, horizontal_flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0),
    "light": _LIGHT,
    "medium": dict(_LIGHT, randaugment=True),
    "heavy": dict(_LIGHT, randaugment=True, mixup=True, cutmix=True),
    # Anatomy has a side (heart on the left; a flipped X-ray is a different, rare condition), so no left-right flip;
    # intensities vary between scanners, so a little brightness and contrast.
    "medical": dict(
        _LIGHT, horizontal_flip=False, rotation=0.02, zoom=0.05, translation=0.05, contrast=0.1, brightness=0.1
    ),
    # An inspected part can lie in any orientation.
    "inspection": dict(_LIGHT, vertical_flip=True, rotation=0.5),
}


def resolve(config: AugmentConfig) -> dict:
    """Returns the operations in effect: the preset's values with every non-null config field on top."""
    ops = dict(PRESETS[config.preset])
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name != "preset" and value is not None:
            ops[f.name] = value
    return ops


def build_image_augmenter(ops: dict, seed: int) -> keras.Sequential | None:
    """Builds the per-image part (geometry, intensity, RandAugment) as one Sequential, or None if it is empty."""
    layers = []
    flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal", (False, True): "vertical"}
    mode = flip.get((bool(ops["horizontal_flip"]), bool(ops["vertical_flip"])))
    if mode:
        layers.append(keras.layers.RandomFlip(mode, seed=seed, name="flip"))
    if ops["rotation"]:
        layers.append(keras.layers.RandomRotation(ops["rotation"], fill_mode="reflect", seed=seed, name="rotation"))
    if ops["zoom"]:
        layers.append(keras.layers.RandomZoom(ops["zoom"], fill_mode="reflect", seed=seed, name="zoom"))
    if ops["translation"]:
        t = ops["translation"]
        layers.append(keras.layers.RandomTranslation(t, t, fill_mode="reflect", seed=seed, name="translation"))
    if ops["contrast"]:
        layers.append(keras.layers.RandomContrast(ops["contrast"], value_range=(0, 255), seed=seed, name="contrast"))
    if ops["brightness"]:
        layers.append(
            keras.layers.RandomBrightness(ops["brightness"], value_range=(0, 255), seed=seed, name="brightness")
        )
    if ops["randaugment"]:
        layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed))
    return keras.Sequential(layers, name="augment") if layers else None


def augment_dataset(dataset: tf.data.Dataset, config: AugmentConfig, num_classes: int, seed: int) -> tf.data.Dataset:
    """Applies the configured augmentation to a batched `(images 0..255 float32, one-hot labels)` dataset.

    MixUp and CutMix mix whole batches and produce soft labels, which is why labels are one-hot here.
    """
    ops = resolve(config)
    augmenter = build_image_augmenter(ops, seed)
    if augmenter is not None:
        dataset = dataset.map(
            lambda x, y: (tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    mixers = []
    if ops["mixup"]:
        mixers.append(keras.layers.MixUp(alpha=0.2, seed=seed))
    if ops["cutmix"]:
        mixers.append(keras.layers.CutMix(factor=1.0, seed=seed))
    if mixers:

        def mix(x, y):
            def apply(layer):
                return lambda: _mixed(layer, x, y)

            if len(mixers) == 1:
                return _mixed(mixers[0], x, y)
            pick = tf.random.uniform((), 0, len(mixers), dtype=tf.int32, seed=seed)
            return tf.switch_case(pick, [apply(layer) for layer in mixers])

        dataset = dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset


def _mixed(layer: keras.layers.Layer, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Runs MixUp or CutMix on a batch dict and returns (images, soft labels)."""
    out = layer({"images": images, "labels": labels}, training=True)
    return out["images"], tf.cast(out["labels"], tf.float32)
