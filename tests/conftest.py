"""Shared fixtures: small generated image folders whose classes a model can tell apart."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# Each class is a colour with a shape on it; noise and jitter keep the images from being identical.
CLASS_COLOURS = {"circle_red": (200, 40, 40), "square_green": (40, 180, 60), "stripes_blue": (40, 60, 200)}


def write_separable_folder(root: Path, per_class: int = 20, size: int = 48, seed: int = 0, classes=None) -> Path:
    """Writes `per_class` JPEG/PNG images per class into `root/<class>/` and returns `root`."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or CLASS_COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = np.array(colour) * rng.uniform(0.7, 1.0) + rng.normal(0, 20, (size, size, 3))
            image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230 + rng.normal(0, 10, 3)
            if name.startswith("stripes"):
                image[::6] = 240
            pixels = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
            pixels.save(folder / f"{index:03d}.{'png' if index % 2 else 'jpg'}")
    return root


@pytest.fixture
def separable_folder(tmp_path: Path) -> Path:
    """Three visually separable classes, 20 images each."""
    return write_separable_folder(tmp_path / "images")
