"""One predictor for every model file the toolkit writes: model.keras, a SavedModel folder, or a .tflite file.

Export's parity gate, evaluate, predict and benchmark all go through `load_predictor`, so a number measured on
one kind of file means the same thing on another: images in as [N, S, S, 3] pixels 0..255 (uint8 or float32),
class probabilities out as float32 [N, C].

.tflite files run on LiteRT (`ai-edge-litert`; `tf.lite.Interpreter` is deprecated, DESIGN.md decision 4).
Quantized inputs are fed in the model's own type (camera bytes for our uint8-input int8 model) and quantized
outputs are dequantized with the tensor's scale and zero point, as MediaPipe does on a phone.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier import contract
from classifier.errors import UserError
from classifier.log import STDERR
from classifier.run import LABELS_FILE, MODEL_FILE, Run

if TYPE_CHECKING:
    from classifier.data import Decoding

log = logging.getLogger(__name__)

KINDS = ("keras", "saved_model", "tflite")
_GLOB_CHARACTERS = frozenset("*?[")
# Decoding is Pillow (releases the GIL) plus a small TF resize: a few threads keep the model fed on 2+ cores.
_READ_WORKERS = max(1, min(4, os.cpu_count() or 1))
ACCEPTED = f"a Keras model file ({MODEL_FILE}), a SavedModel folder (with saved_model.pb inside) or a .tflite file"


class Predictor:
    """Runs one model file on batches of images.

    Attributes:
        kind: "keras", "saved_model" or "tflite".
        path: the model file or SavedModel folder.
        image_size: square input size S the model expects.
        input_dtype: dtype the model takes (float32, or uint8 for the int8 TFLite model); `predict` converts.
        num_classes: number of output probabilities.
        labels: class names in output order, or None when none were found.
    """

    def __init__(
        self, kind: str, path: str, image_size: int, input_dtype: np.dtype, num_classes: int, labels: list[str] | None
    ):
        self.kind = kind
        self.path = path
        self.image_size = image_size
        self.input_dtype = np.dtype(input_dtype)
        self.num_classes = num_classes
        self.labels = labels

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Returns class probabilities for a stack of images.

        Args:
            images: uint8 or float32 array [N, S, S, 3] of RGB pixels 0..255, S = `image_size`.
            batch_size: images per call to the model (a .tflite file with a fixed batch runs one at a time).

        Returns:
            float32 array [N, C] of probabilities.

        Raises:
            UserError: the images do not have the shape the model expects.
        """
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise UserError(
                f"images of shape {images.shape} do not fit {self.path}: it takes [N, {self.image_size}, "
                f"{self.image_size}, 3] RGB pixels 0..255; resize them to {self.image_size} px first"
            )
        if len(images) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        outputs = [self._predict_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for one batch; implemented per kind."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Predictor(kind={self.kind!r}, path={self.path!r}, image_size={self.image_size})"


def load_keras_classifier(path: str | os.PathLike):
    """A `model.keras` that is an image classifier, loaded (Keras safe mode: no Lambda code runs).

    Raises:
        UserError: the file cannot be loaded (damaged, not a model, a Lambda layer), or it is not an image
            classifier ([N, S, S, 3] pixels in, [N, C] probabilities out), naming the file.
    """
    import keras

    path = Path(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - zipfile, Keras and h5py each raise their own types; see load_predictor
        raise UserError(_unreadable(path, error)) from None
    _check_image_classifier(path, model.input_shape, model.output_shape)
    return model


def _check_image_classifier(path: Path, input_shape, output_shape) -> None:
    """Refuses a model that does not take [N, S, S, 3] images and return [N, C]: predicting would fail deep inside
    the runtime with a shape error."""
    shapes = [list(shape) if isinstance(shape, (list, tuple)) else shape for shape in (input_shape, output_shape)]
    image, out = shapes
    is_image = isinstance(image, list) and len(image) == 4 and image[1] and image[1] == image[2] and image[3] == 3
    if not is_image or not isinstance(out, list) or len(out) != 2 or not out[1]:
        raise UserError(
            f"'{path}' is not an image classifier: it takes {input_shape} and returns {output_shape}, not [N, S, S, 3] "
            f"pixels and [N, classes] probabilities; pass {ACCEPTED}"
        )


class _KerasPredictor(Predictor):
    def __init__(self, path: Path):
        self.model = load_keras_classifier(path)
        size = self.model.input_shape[1]
        super().__init__("keras", str(path), size, np.float32, self.model.output_shape[-1], None)

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images.astype(np.float32, copy=False)))


class _SavedModelPredictor(Predictor):
    def __init__(self, path: Path, signature: str = "serving_default"):
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(path))
        if signature not in self.loaded.signatures:
            raise UserError(
                f"SavedModel '{path}' has no signature '{signature}' (it has {sorted(self.loaded.signatures)}): "
                "export it again with `python export.py --run-dir RUN`"
            )
        self.function = self.loaded.signatures[signature]
        (self.input_name, spec), *others = self.function.structured_input_signature[1].items()
        outputs = self.function.structured_outputs
        self.output_name = "probabilities" if "probabilities" in outputs else next(iter(outputs))
        if others or spec.shape.rank != 4 or spec.shape[1] is None:
            raise UserError(
                f"SavedModel '{path}' signature '{signature}' takes {self.function.structured_input_signature}: "
                "expected one image input [N, S, S, 3] with a fixed size S, as export.py writes"
            )
        num_classes = int(outputs[self.output_name].shape[-1])
        super().__init__("saved_model", str(path), int(spec.shape[1]), spec.dtype.as_numpy_dtype, num_classes, None)

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        result = self.function(**{self.input_name: _to_input_type(images, self.input_dtype)})
        return result[self.output_name].numpy()


class _TFLitePredictor(Predictor):
    def __init__(self, path: Path, num_threads: int | None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        input_details = self.interpreter.get_input_details()
        output_details = self.interpreter.get_output_details()
        if len(input_details) != 1 or len(output_details) != 1:
            raise UserError(
                f"'{path}' has {len(input_details)} inputs and {len(output_details)} outputs: an image classifier "
                "takes one image and returns one probability vector"
            )
        self.input, self.output = input_details[0], output_details[0]
        batchless = [None, *(int(n) for n in self.input["shape_signature"][1:])]
        _check_image_classifier(path, batchless, [None, *(int(n) for n in self.output["shape"][1:])])
        # A dynamic batch (-1) can be resized to run whole batches; a fixed batch runs one image at a time.
        self.dynamic_batch = int(self.input["shape_signature"][0]) == -1
        self.batch = int(self.input["shape"][0])
        if not self.dynamic_batch and self.batch != 1:
            raise UserError(f"'{path}' has a fixed batch of {self.batch}: export it with batch 1 or a dynamic batch")
        super().__init__(
            "tflite", str(path), int(self.input["shape"][1]), self.input["dtype"], int(self.output["shape"][-1]), None
        )

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        if len(images) != self.batch:
            if not self.dynamic_batch:
                return np.concatenate([self._invoke(images[i : i + 1]) for i in range(len(images))])
            self.interpreter.resize_tensor_input(self.input["index"], [len(images), *self.input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self.batch = len(images)
        return self._invoke(images)

    def _invoke(self, images: np.ndarray) -> np.ndarray:
        scale, zero_point = self.input["quantization"]
        self.interpreter.set_tensor(self.input["index"], _to_input_type(images, self.input_dtype, scale, zero_point))
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self.output["index"])
        scale, zero_point = self.output["quantization"]
        if np.issubdtype(output.dtype, np.integer):
            return (output.astype(np.float32) - zero_point) * scale
        return output


def _to_input_type(images: np.ndarray, dtype: np.dtype, scale: float = 0.0, zero_point: int = 0) -> np.ndarray:
    """Converts 0..255 pixels to the model's input type; integer inputs are quantized with (scale, zero_point)."""
    # Pixels already in the model's type pass through when the quantization is the identity (scale 1, zero
    # point 0): that is how a phone feeds camera bytes to our uint8-input model.
    if images.dtype == dtype and (not scale or (abs(scale - 1.0) < 1e-3 and zero_point == 0)):
        return images
    if not np.issubdtype(dtype, np.integer):
        return images.astype(dtype)
    values = images.astype(np.float32)
    if scale:
        values = values / scale + zero_point
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


def load_predictor(path: str | Path, num_threads: int | None = None) -> Predictor:
    """Opens a model file of any kind the toolkit writes.

    Labels come from the model itself when it carries them (TFLite metadata), else from `labels.txt` in the
    model's folder or the folder above it (the run folder for `export/...` files), else from the input contract
    the model carries (a SavedModel's, or `input_contract.json` beside the model; `classifier.contract`).

    Args:
        path: `model.keras`, a SavedModel folder (with `saved_model.pb`), or a `.tflite` file.
        num_threads: CPU threads for LiteRT (None = LiteRT's default). TensorFlow sets its threads per process,
            so this does not apply to Keras or SavedModel files.

    Returns:
        A `Predictor`.

    Raises:
        UserError: the path does not exist or is not one of the accepted kinds, or its labels file or input
            contract does not match the model's number of outputs.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model '{path}' does not exist: pass {ACCEPTED}")
    try:
        if path.is_dir() and (path / "saved_model.pb").is_file():
            predictor: Predictor = _SavedModelPredictor(path)
        elif path.is_file() and path.suffix == ".keras":
            predictor = _KerasPredictor(path)
        elif path.is_file() and path.suffix == ".tflite":
            predictor = _TFLitePredictor(path, num_threads)
            from classifier import tflite_metadata

            predictor.labels = tflite_metadata.read_labels(path.read_bytes())
        else:
            raise UserError(f"'{path}' is not a model this toolkit can run: pass {ACCEPTED}")
    except UserError:
        raise
    # Keras, TensorFlow and LiteRT each raise their own types for a damaged or foreign file (zipfile.BadZipFile,
    # ValueError "not a valid Flatbuffer", OSError, tf.errors...): whatever it is, it is this file's problem.
    except Exception as error:  # noqa: BLE001
        raise UserError(_unreadable(path, error)) from None
    if predictor.labels is None:
        predictor.labels = _labels_beside(path, predictor.num_classes)
    if predictor.labels is None:
        predictor.labels = _labels_of_contract(path, predictor.num_classes)
    return predictor


def _unreadable(path: Path, error: Exception) -> str:
    """One line on why a model file could not be opened, and what to do."""
    text = " ".join(str(error).split())
    if "Lambda" in text or "safe_mode" in text:
        return (
            f"'{path}' contains a Lambda layer, which is arbitrary Python code: Keras' safe mode refuses to load it. "
            "Models written by this toolkit have none; open only a model you trust, in Python with "
            "keras.models.load_model(path, safe_mode=False)."
        )
    return (
        f"'{path}' cannot be opened as a {path.suffix or 'SavedModel'} model ({type(error).__name__}: {text[:200]}): "
        f"the file is damaged or is not a model; pass {ACCEPTED}"
    )


def _labels_beside(path: Path, num_classes: int) -> list[str] | None:
    """Reads labels.txt from the model's folder or its parent (the run folder), checking the class count."""
    for run in Run.beside_model(path):
        labels = run.read_labels()
        if labels is not None:
            if len(labels) != num_classes:
                raise UserError(
                    f"labels file '{run.labels_path}' has {len(labels)} names but model '{path}' has {num_classes} "
                    f"outputs: put the {LABELS_FILE} of the run that trained this model beside it"
                )
            return labels
    return None


def _labels_of_contract(path: Path, num_classes: int) -> list[str] | None:
    """The class names of the input contract inside or beside the model, checking the class count."""
    found = contract.of_model(path)
    if found is None:
        return None
    if len(found.class_names) != num_classes:
        raise UserError(
            f"the input contract of '{path}' names {len(found.class_names)} classes but the model has {num_classes} "
            f"outputs: export the model again, or put the {LABELS_FILE} of the run that trained it beside it"
        )
    return list(found.class_names)


def measure_latency(predictor: Predictor, runs: int = 50, warmup: int = 5, seed: int = 0) -> dict:
    """Times single-image predictions (batch 1), the way an app classifies one camera frame.

    Args:
        predictor: any predictor.
        runs: timed predictions.
        warmup: untimed predictions first (first calls allocate and compile).
        seed: seed of the random test image.

    Returns:
        {"median_ms", "p90_ms", "runs"}.
    """
    size = predictor.image_size
    image = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    image = image.astype(predictor.input_dtype)
    for _ in range(warmup):
        predictor.predict(image, batch_size=1)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.predict(image, batch_size=1)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": runs}


# The plumbing the commands share (predict, evaluate, explain, benchmark, export): opening a model of any kind,
# finding image files, reading them as training did and running the model on them.


def input_settings(
    model: str | os.PathLike,
    run: Run | None,
    *,
    resize_mode: str | None = None,
    dicom_window: str | None = None,
    dicom_frames: str | None = None,
) -> tuple[str, Decoding]:
    """How image files are read for a model: (resize mode, `data.Decoding`), as it was trained.

    The run's config.yaml when there is a run folder (as `Run.of_model` finds it, or the one given), else the input
    contract the model carries inside it or beside it (`classifier.contract`), else stretch and the default DICOM
    decoding; the values given (on the command line) replace those.

    Raises:
        UserError: a window or frames value that is not accepted, or an input contract that cannot be read.
    """
    from classifier import data

    if run is not None and run.config_path.is_file():
        trained_resize, decoding = run.setting("data", "resize_mode") or "stretch", data.run_decoding(run)
    elif (carried := contract.of_model(model)) is not None:
        trained_resize = carried.resize_mode
        decoding = data.Decoding(dicom_window=carried.dicom_window, dicom_frames=carried.dicom_frames)
    else:
        trained_resize, decoding = "stretch", data.Decoding()
    changes = {"dicom_window": dicom_window, "dicom_frames": dicom_frames}
    decoding = dataclasses.replace(decoding, **{key: value for key, value in changes.items() if value is not None})
    return resize_mode or trained_resize, decoding


def open_model(path: str | os.PathLike, threads: int | None = None):
    """Loads any model kind through `classifier.inference`, with `threads` CPU threads.

    LiteRT takes the thread count per model; TensorFlow (Keras and SavedModel files) only per process, and only
    before it has run anything, so in a process that already used TensorFlow the setting is left as it is.

    Returns:
        An `inference.Predictor`.

    Raises:
        UserError: see `inference.load_predictor`; also threads < 1.
    """
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: give 1 or more CPU threads")
    path = Path(path)
    if threads is not None and path.suffix != ".tflite":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            log.info(f"note: TensorFlow is already running; --threads {threads} does not apply to it", extra=STDERR)
    return load_predictor(path, num_threads=threads)


# Files a command reads; a report written under one of these names overwrites an input (`--output` typed before one).
_READ_SUFFIXES = frozenset({".keras", ".tflite", ".h5", ".pb"})


def check_report_path(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Makes sure a command's report file can be written (creating its folder) before any work is done.

    Raises:
        UserError: the path is a folder, has the name of a model or image file (a slip that would overwrite an
            input), or its folder cannot be created or written.
    """
    from classifier import atomic, dicom
    from classifier.data import IMAGE_EXTENSIONS

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} '{path}' is a folder: give a file name inside it, e.g. '{path / 'report.csv'}'")
    if path.suffix.lower() in _READ_SUFFIXES | IMAGE_EXTENSIONS | dicom.EXTENSIONS:
        raise UserError(
            f"{flag} '{path}' has the name of a model or image file, which the report would overwrite: give a .csv "
            "or .json name"
        )
    atomic.writable_folder(path.parent, flag, given=path)
    return path


def collect_inputs(inputs: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Expands files, folders and glob patterns into a list of image files.

    Folders are searched recursively for image files (`data.is_image_file`: an image suffix, or DICOM; hidden files
    and folders skipped); a file named explicitly is used whatever its suffix. Order: as given, folders and globs
    sorted.

    Args:
        inputs: Paths or glob patterns.

    Returns:
        (files, problems): files without duplicates, and {"path", "error"} for inputs that match nothing.
    """
    from classifier.data import is_image_file

    files: list[str] = []
    problems: list[dict] = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for folder, subfolders, names in os.walk(item):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                found += [
                    os.path.join(folder, name) for name in sorted(names) if is_image_file(os.path.join(folder, name))
                ]
            if not found:
                problems.append({"path": item, "error": "folder holds no image files"})
            files += found
        elif os.path.exists(item):
            files.append(item)
        elif _GLOB_CHARACTERS & set(item):
            matches = sorted(path for path in glob.glob(item, recursive=True) if os.path.isfile(path))
            if not matches:
                problems.append({"path": item, "error": "pattern matches no file"})
            files += matches
        else:
            problems.append({"path": item, "error": "no such file or folder"})
    unique = list(dict.fromkeys(files))
    return unique, problems


def _read(path: str, image_size: int, resize_mode: str, decoding) -> tuple[np.ndarray | None, str | None]:
    """One file as model pixels, or the reason it cannot be read."""
    from classifier.data import load_and_resize, split_frame_ref

    try:
        if os.path.getsize(split_frame_ref(path)[0]) == 0:
            return None, "empty file (0 bytes)"
        return load_and_resize(path, image_size, resize_mode, decoding), None
    except Exception as error:  # Pillow raises many types: any unreadable file is reported and skipped, not fatal
        return None, f"cannot read image: {type(error).__name__}: {error}"


def predict_files(
    predictor,
    paths: Sequence[str],
    *,
    resize_mode: str = "stretch",
    batch_size: int = 32,
    description: str = "predicting",
    on_error: Callable[[str, str], None] | None = None,
    decoding=None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Runs a model on image files in batches, as training reads them.

    Args:
        predictor: An `inference.Predictor`.
        paths: Image files (or frames of DICOM files, `data.frame_ref`).
        resize_mode: "stretch" or "crop", as the model was trained.
        batch_size: Images per model call (and per read batch).
        description: Label of the progress bar (shown on stderr when it is a terminal).
        on_error: Called with (path, reason) for every unreadable file as it is found.
        decoding: A `data.Decoding` (DICOM window), as the model was trained; None takes the defaults.

    Returns:
        (probabilities float32 [N, C] with NaN rows for unreadable files, {index: reason} of those files).

    Raises:
        UserError: batch_size < 1.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more images per batch")
    probabilities = np.full((len(paths), predictor.num_classes), np.nan, np.float32)
    errors: dict[int, str] = {}
    progress = tqdm(total=len(paths), desc=description, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(_READ_WORKERS) as pool, progress:
        for start in range(0, len(paths), batch_size):
            chunk = list(range(start, min(start + batch_size, len(paths))))
            results = pool.map(lambda i: _read(paths[i], predictor.image_size, resize_mode, decoding), chunk)
            good, images = [], []
            for index, (image, error) in zip(chunk, results, strict=True):
                if error is None:
                    good.append(index)
                    images.append(image)
                else:
                    errors[index] = error
                    if on_error is not None:
                        on_error(paths[index], error)
            if images:
                probabilities[good] = predictor.predict(np.stack(images), batch_size=batch_size)
            progress.update(len(chunk))
    return probabilities, errors


def class_labels(predictor) -> list[str]:
    """The predictor's class names, or class_0, class_1, ... (with a note) when none were found beside the model."""
    if predictor.labels:
        return list(predictor.labels)
    log.info(
        f"note: no labels found for {predictor.path} (put the run's {LABELS_FILE} beside it); showing class indices",
        extra=STDERR,
    )
    return [f"class_{index}" for index in range(predictor.num_classes)]


def add_dicom_arguments(parser: argparse.ArgumentParser) -> None:
    """--dicom-window and --dicom-frames, shared by predict and evaluate."""
    parser.add_argument(
        "--dicom-window",
        default=None,
        metavar="WINDOW",
        help="DICOM window: auto, lung, mediastinum, bone, brain or C,W, with = before a negative centre "
        "(--dicom-window=-600,1500); default: the run's data.dicom_window",
    )
    parser.add_argument(
        "--dicom-frames",
        choices=("first", "all"),
        default=None,
        help="multi-frame DICOM: first frame, or every frame (default: the run's data.dicom_frames)",
    )


def model_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file, or of every file in a SavedModel folder."""
    path = Path(path)
    if path.is_dir():
        return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
    return path.stat().st_size
