"""The input contract: what a reader needs to feed a model correctly, in a small JSON record that travels with it.

A model file alone says its input size and nothing else; how the training images were resized, how DICOM files
were decoded and what the classes are called live in the run folder. So every model carries this record:

- beside `model.keras` in the run folder (training writes it) and in `export/` (export writes it);
- inside the SavedModel folder, in `assets.extra/` (export);
- inside every .tflite, as an associated file of its TFLite Model Metadata (`classifier.tflite_metadata`).

Evaluate, predict and explain prefer the run folder's own settings when it is there; for a model copied away
from its run they read this record (`of_model`) instead of guessing.

    {"schema": 1, "image_size": 224, "channels": "RGB", "pixel_range": [0, 255], "resize_mode": "crop",
     "dicom_window": "auto", "dicom_frames": "first", "class_names": ["defective", "functional"]}

A reader ignores fields it does not know (a later version may add some within schema 1) and refuses a higher
schema. Nothing here imports TensorFlow: a LiteRT-only runtime reads the record too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from classifier import atomic
from classifier.errors import UserError
from classifier.run import CONTRACT_FILE, Run, find_beside_model

SCHEMA = 1
CHANNELS = "RGB"
PIXEL_RANGE = (0, 255)  # raw pixels: every model normalises inside its graph (DESIGN.md, data flow)
# The SavedModel format's folder for files that travel with a model but are not loaded by its graph ("where
# higher-level libraries and users can add their own assets ... not managed by the SavedModel libraries";
# `assets/` is for files the graph itself reads, copied there by tf.saved_model.Asset):
# https://github.com/tensorflow/tensorflow/blob/master/tensorflow/python/saved_model/README.md
SAVED_MODEL_EXTRA_FOLDER = "assets.extra"
_REQUIRED = ("image_size", "resize_mode", "dicom_window", "dicom_frames", "class_names")


@dataclasses.dataclass(frozen=True)
class InputContract:
    """How images are fed to one model: RGB pixels 0..255, resized and decoded as in training.

    Attributes:
        image_size: Side S of the square [S, S, 3] input.
        resize_mode: `stretch` or `crop` (`data.resize_image`).
        dicom_window: `data.dicom_window` the model was trained with.
        dicom_frames: `data.dicom_frames` the model was trained with.
        class_names: Class names in output order.
    """

    image_size: int
    resize_mode: str
    dicom_window: str
    dicom_frames: str
    class_names: tuple[str, ...]

    @classmethod
    def of_training(cls, data_settings: Any, class_names: Sequence[str]) -> InputContract:
        """The contract of a run being trained, from its resolved `DataConfig` and its classes."""
        return cls(
            image_size=int(data_settings.image_size),
            resize_mode=data_settings.resize_mode,
            dicom_window=data_settings.dicom_window,
            dicom_frames=data_settings.dicom_frames,
            class_names=tuple(class_names),
        )

    def to_json(self) -> str:
        """The record's text (what is written beside, into and inside every model)."""
        record = {
            "schema": SCHEMA,
            "image_size": self.image_size,
            "channels": CHANNELS,
            "pixel_range": list(PIXEL_RANGE),
            "resize_mode": self.resize_mode,
            "dicom_window": self.dicom_window,
            "dicom_frames": self.dicom_frames,
            "class_names": list(self.class_names),
        }
        return json.dumps(record, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> InputContract:
        """Parses a record written by `to_json`.

        Args:
            text: The record's text.
            source: Where it was read, for messages (a file, or a model and the place inside it).

        Raises:
            UserError: not a record of this kind, a schema newer than this version reads, or an input this
                toolkit cannot feed (not RGB pixels 0..255).
        """
        try:
            record = json.loads(text)
        except ValueError as error:
            raise UserError(f"input contract {source} is not valid JSON ({error}): export the model again") from None
        if not isinstance(record, Mapping) or not isinstance(record.get("schema"), int):
            raise UserError(f"input contract {source} has no schema number: export the model again")
        if record["schema"] > SCHEMA:
            raise UserError(
                f"input contract {source} has schema {record['schema']}, newer than this version reads ({SCHEMA}): "
                "update the toolkit, or pass --resize-mode and --dicom-window yourself"
            )
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise UserError(f"input contract {source} lacks {', '.join(missing)}: export the model again")
        if record.get("channels", CHANNELS) != CHANNELS or record.get("pixel_range", list(PIXEL_RANGE)) != list(
            PIXEL_RANGE
        ):
            raise UserError(
                f"input contract {source} asks for {record.get('channels')} pixels in {record.get('pixel_range')}: "
                f"this toolkit feeds {CHANNELS} pixels {PIXEL_RANGE[0]}..{PIXEL_RANGE[1]} only"
            )
        names = record["class_names"]
        size = record["image_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or not isinstance(names, list) or not names:
            raise UserError(
                f"input contract {source} has image_size {record['image_size']!r} and class_names {names!r}: "
                "expected a number of pixels and a list of names; export the model again"
            )
        return cls(
            image_size=record["image_size"],
            resize_mode=str(record["resize_mode"]),
            dicom_window=str(record["dicom_window"]),
            dicom_frames=str(record["dicom_frames"]),
            class_names=tuple(str(name) for name in names),
        )


def read(path: str | os.PathLike) -> InputContract | None:
    """The record in a file, or None when there is no such file.

    Raises:
        UserError: see `InputContract.from_json`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    # Bytes that are not UTF-8 become U+FFFD, which from_json then refuses as not a record, naming the file.
    return InputContract.from_json(path.read_bytes().decode("utf-8", errors="replace"), f"'{path}'")


def write(path: str | os.PathLike, contract: InputContract) -> Path:
    """Writes the record to `path`, atomically; returns the path."""
    path = Path(path)
    with atomic.replacing(path) as temporary:
        temporary.write_text(contract.to_json(), encoding="utf-8")
    return path


def saved_model_path(saved_model_dir: str | os.PathLike) -> Path:
    """Where the record lives inside a SavedModel folder."""
    return Path(saved_model_dir) / SAVED_MODEL_EXTRA_FOLDER / CONTRACT_FILE


def write_into_saved_model(saved_model_dir: str | os.PathLike, contract: InputContract) -> Path:
    """Writes the record into a SavedModel folder; returns its path."""
    path = saved_model_path(saved_model_dir)
    path.parent.mkdir(exist_ok=True)
    return write(path, contract)


def inside_model(model_path: str | os.PathLike) -> InputContract | None:
    """The record a model file carries itself (a .tflite's metadata, a SavedModel's assets.extra/), or None.

    Raises:
        UserError: see `InputContract.from_json`.
    """
    path = Path(model_path)
    if path.is_file() and path.suffix == ".tflite":
        from classifier import tflite_metadata

        return tflite_metadata.read_contract(path.read_bytes(), source=f"in the metadata of '{path}'")
    if path.is_dir():
        return read(saved_model_path(path))
    return None


def of_model(model_path: str | os.PathLike) -> InputContract | None:
    """The record of a model: the one inside it, else the one beside it (`Run.beside_model`), else None.

    Raises:
        UserError: see `InputContract.from_json`.
    """
    return inside_model(model_path) or find_beside_model(model_path, Run.read_contract)
