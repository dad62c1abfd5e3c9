"""Export a trained run for serving and phones, and prove each file still predicts what the Keras model predicts.

`python export.py --run-dir saved_models/<run>` reads the run folder (`model.keras`, `split.json`, `labels.txt`,
`config.yaml`) and writes `saved_models/<run>/export/`:

- `saved_model/`: TensorFlow SavedModel. Signature `serving_default` takes `images` float32 [N, S, S, 3] pixels
  0..255; `serving_uint8` takes the same as uint8. Both return {"probabilities": float32 [N, C],
  "top_class": int32 [N]}. Only the inference graph is saved (augmentation never is part of the model).
  `assets.extra/input_contract.json` holds its input contract (`classifier.contract`).
- `model_float32.tflite`: float32 weights and input (raw pixels 0..255); the reference for parity.
- `model_float16.tflite`: float16 weights (half the size), float32 input and compute.
- `model_dynamic.tflite`: int8 weights, activations quantized on the fly (dynamic range); float32 input. When it
  fails the gate, its layers that lose most keep float weights (classifier/selective.py).
- `model_int8.tflite`: full integer, calibrated on real images of the run's training split. Input uint8 pixels
  0..255 (quantization scale 1, zero point 0, so a phone feeds camera bytes directly); output uint8
  probabilities (scale 1/256, zero point 0). Not int8: MediaPipe Tasks ImageClassifier (1.2.2) accepts uint8 or
  float32 score tensors and rejects int8 ("Expected output tensor at index 0 to have type UINT8 or FLOAT32 or
  BOOL, found INT8 instead", checked here).
- `calibration.json` and `operating_point.json`, copied from the run: the temperature every file applies (it is
  inside the model: `model.keras`'s "temperature" layer divides the logits before the softmax, so the SavedModel
  and every .tflite give calibrated probabilities, and the parity gate compares calibrated with calibrated) and
  the two-class decision threshold chosen on those calibrated probabilities.
- `labels.txt` (class names in output order) and, inside every .tflite, TFLite Model Metadata with the labels
  and the input description MediaPipe needs (classifier/tflite_metadata.py), so the files run unchanged in
  MediaPipe Tasks ImageClassifier and report category names.
- `input_contract.json`: image size, resize mode, DICOM decoding and class names (`classifier.contract`), also
  inside the SavedModel and every .tflite, so a file copied away from its run is still fed as in training.
- `export_report.json`: per format the size, parity with Keras on the held-out test split (top-1 agreement, max
  absolute probability difference, accuracy and its drop) and the median LiteRT latency (batch 1); the input
  contract (image size, resize mode, DICOM decoding settings).

Calibration and parity images are read with the run's own settings (`data.run_decoding`), as training read them.

The parity gate (DESIGN.md "a parity gate against the Keras model on held-out images that fails loudly"): every
file is run through `classifier.inference` on the test split and compared with the Keras model. A format that
misses its threshold is renamed `*.FAILED*` and the command exits 1 naming the format and its numbers.
Every file is written under a temporary name and moved into place (`os.replace`), so an interrupted export never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier import atomic, runlock, selective
from classifier import calibration as calibration_lib  # temperature scaling, not the int8 calibration sample
from classifier.budget import StepTimes
from classifier.contract import InputContract
from classifier.errors import UserError, run_cli
from classifier.log import STDERR
from classifier.run import EXPORT_REPORT_FILE, LABELS_FILE, MODEL_FILE, SPLIT_FILE, Run

if TYPE_CHECKING:  # TensorFlow and Keras load only when an export runs
    import keras
    import tensorflow as tf

    from classifier import data

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "float32", "float16", "dynamic", "int8")
TFLITE_FORMATS = ("float32", "float16", "dynamic", "int8")
SAVED_MODEL_DIR = "saved_model"
REPORT_FILE = EXPORT_REPORT_FILE


def tflite_file_name(fmt: str) -> str:
    """Returns the file name of a TFLite format, e.g. `model_int8.tflite`."""
    return f"model_{fmt}.tflite"


def failed_name(name: str) -> str:
    """Returns the name a failing export is renamed to: `model_int8.FAILED.tflite`, `saved_model.FAILED`."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.FAILED{dot}{suffix}"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What each format must reach on the test split to pass the parity gate.

    Attributes:
        min_agreement_float32: top-1 agreement with Keras for the SavedModel and float32 TFLite (same maths,
            only kernel rounding differs).
        max_diff_float32: largest absolute probability difference allowed for the SavedModel and float32 TFLite.
        min_agreement_float16: top-1 agreement for float16 weights (half-precision rounding flips only near-ties).
        max_accuracy_drop: accuracy the quantized formats (dynamic, int8) may lose, as a fraction (0.01 = one
            percentage point); quantized probabilities differ by design, so accuracy is what is gated. A format
            fails only when its drop is above this AND the drop is real: the 95 % interval of the paired
            difference (bootstrap over the parity images) lies above zero. On a few hundred images one point is a
            handful of images, so a drop inside the noise does not fail a file, and a real one always does.
    """

    min_agreement_float32: float = 0.995
    max_diff_float32: float = 1e-4
    min_agreement_float16: float = 0.99
    max_accuracy_drop: float = 0.01

    def __post_init__(self):
        flags = {
            "min_agreement_float32": "--min-agreement-float32",
            "max_diff_float32": "--max-diff-float32",
            "min_agreement_float16": "--min-agreement-float16",
            "max_accuracy_drop": "--max-accuracy-drop",
        }
        for name, flag in flags.items():
            value = getattr(self, name)
            if not 0 <= value <= 1:  # agreements and drops are fractions, probability differences too
                default = getattr(Thresholds, name)
                raise UserError(f"{flag} {value:g} is outside 0..1: give a fraction such as {default:g} (the default).")


@dataclasses.dataclass(frozen=True)
class _Options:
    """The caller's choices for one export (see `export_run`), checked before any slow work.

    Attributes:
        formats: The formats to write, checked, in the order given.
        calibration_images: Training images to calibrate int8 on (and rank a failing format's layers on).
        thresholds: The parity gate's limits.
        num_threads: LiteRT threads for the parity run and the latency measurement.
        latency_runs: Timed batch-1 predictions per TFLite file.
        batch_size: Images per batch in the parity run.
        metadata: Whether every .tflite carries TFLite Model Metadata.
        seed: Seed for picking the calibration images.
        keep_float_layers: Layers left in float when dynamic or int8 fails the gate; 0 never retries.
    """

    formats: list[str]
    calibration_images: int
    thresholds: Thresholds
    num_threads: int
    latency_runs: int
    batch_size: int
    metadata: bool
    seed: int
    keep_float_layers: int

    def __post_init__(self):
        if self.calibration_images < 1:
            raise UserError(
                f"--calibration-images {self.calibration_images}: give at least 1 (a few hundred is typical)"
            )
        if self.num_threads < 1 or self.latency_runs < 1:  # checked now, not after minutes of conversion
            raise UserError(
                f"--threads {self.num_threads} / --latency-runs {self.latency_runs}: give 1 or more of each "
                "(defaults 2 and 50)"
            )


@dataclasses.dataclass(frozen=True)
class _Export:
    """What every step of one export reads: the run, its model and input contract, and the options.

    Attributes:
        run_dir: The run folder as given.
        run: The run folder's files.
        out_dir: Where the exported files go (created).
        model: The trained Keras model, the reference every file is checked against.
        split: The run's split; parity runs on `subset`, int8 calibration on its training images.
        subset: "test", or "val" when the split has no test images.
        labels: Class names in output order.
        image_size: The model's input side in pixels.
        num_classes: The model's number of outputs.
        resize_mode: How images are resized, as in training.
        decoding: How image files are decoded (DICOM window), as in training.
        options: The caller's choices.
        times: Seconds of each step, for the report and the line printed under the table.
    """

    run_dir: Path
    run: Run
    out_dir: Path
    model: keras.Model
    split: data.Split
    subset: str
    labels: list[str]
    image_size: int
    num_classes: int
    resize_mode: str
    decoding: data.Decoding
    options: _Options
    times: StepTimes

    @property
    def contract(self) -> InputContract:
        """The input contract every exported file carries: how it is fed, as the model was trained."""
        return InputContract(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            dicom_window=self.decoding.dicom_window,
            dicom_frames=self.decoding.dicom_frames,
            class_names=tuple(self.labels),
        )


@dataclasses.dataclass
class _Converted:
    """The files written so far, under their staging names, and what a second, selective conversion needs.

    Attributes:
        files: format -> staged path, the SavedModel first, then the TFLite formats in the order asked.
        tflite: format -> the converter's .tflite bytes, before metadata.
        scratch: Conversion scratch folder; lives until the gate is done.
        source: The SavedModel the TFLite files are converted from; None when no TFLite format is wanted.
        calibration: The calibration sample (a split) int8 is calibrated on and the layers of a failing quantized
            format are ranked on; None when neither int8 nor dynamic is wanted.
        representative_dataset: The calibration sample's images, one per batch.
    """

    files: dict[str, Path]
    tflite: dict[str, bytes]
    scratch: Path
    source: Path | None
    calibration: data.Split | None
    representative_dataset: Callable[[], Iterator[list[np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class _HeldOut:
    """The held-out images the files are checked on, and what the Keras model predicts for them.

    Attributes:
        dataset: The batches, read as training read them.
        keras_probs: The Keras model's probabilities, [N, C].
        y_true: The true class of each image, [N].
    """

    dataset: tf.data.Dataset
    keras_probs: np.ndarray
    y_true: np.ndarray


@dataclasses.dataclass
class _Parity:
    """What the parity gate found: one report entry per file (Keras first) and a message per failing format.

    Attributes:
        formats: format -> report entry, "keras" first.
        failures: One message per format that failed the gate.
        images: Number of held-out images compared.
    """

    formats: dict[str, dict]
    failures: list[str]
    images: int


@runlock.holding("export")
def export_run(
    run_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    out_dir: str | Path | None = None,
    calibration_images: int = 400,
    thresholds: Thresholds = Thresholds(),  # noqa: B008 - frozen dataclass, safe as a default
    num_threads: int = 2,
    latency_runs: int = 50,
    batch_size: int = 32,
    metadata: bool = True,
    seed: int = 42,
    keep_float_layers: int = 10,
) -> dict:
    """Exports a trained run and checks every exported file against the Keras model.

    Args:
        run_dir: run folder written by training (`model.keras`, `split.json`, `labels.txt`).
        formats: any of `FORMATS`; default all.
        out_dir: where to write; default `run_dir/export`.
        calibration_images: training images used to calibrate the int8 model (fewer if the split has fewer); the
            first 64 (or all, if fewer) also rank the layers of a failing quantized format.
        thresholds: the parity gate's limits.
        num_threads: LiteRT threads for the parity run and the latency measurement.
        latency_runs: timed batch-1 predictions per TFLite file.
        batch_size: images per batch in the parity run.
        metadata: embed TFLite Model Metadata (labels, input description) in every .tflite; needs mediapipe.
        seed: seed for picking the calibration images.
        keep_float_layers: when the dynamic or int8 file fails the gate, the layers with the largest quantization
            error (classifier/selective.py) that are left in float for a second try; 0 never retries.

    Returns:
        The report also written to `export_report.json`: {"passed": bool, "failures": [message, ...],
        "formats": {format: {size_bytes, agreement, max_abs_diff, accuracy, keras_accuracy, accuracy_drop,
        latency_ms, passed, ...}}, ...}.

    Raises:
        UserError: the run folder or one of its files is missing, a format name is unknown, the labels do not
            match the model, there are no held-out images to check against, or metadata was requested and
            mediapipe is not installed.
    """
    options = _Options(
        formats=_check_formats(formats),
        calibration_images=calibration_images,
        thresholds=thresholds,
        num_threads=num_threads,
        latency_runs=latency_runs,
        batch_size=batch_size,
        metadata=metadata,
        seed=seed,
        keep_float_layers=keep_float_layers,
    )
    times = StepTimes()
    with times.step("loading"):
        export = _open_run(Path(run_dir), out_dir, options, times)
    _ship_contract(export)
    # Each format is written under a hidden staging name and gets its final name only once it passes the gate,
    # so a re-export that fails never replaces a file that passed before.
    # The conversion scratch folder lives until the gate is done: a failing int8 is converted again from it.
    for leftover in export.out_dir.glob(".convert-*"):  # scratch of an export that was killed (this one holds the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    atomic.remove_leftovers(export.out_dir)  # and the files it was writing
    with tempfile.TemporaryDirectory(dir=export.out_dir, prefix=".convert-") as scratch:
        converted = _convert_formats(export, Path(scratch))
        parity = _check_parity(export, converted)
    return _write_report(export, converted, parity)


def _open_run(run_dir: Path, out_dir: str | Path | None, options: _Options, times: StepTimes) -> _Export:
    """Checks the run folder before any slow work, loads the model and its input contract, creates the export folder."""
    from classifier import data, inference, tflite_metadata

    run = Run(run_dir)
    for required in (run.model_path, run.split_path):
        if not required.is_file():
            raise UserError(
                f"'{required}' does not exist: --run-dir must be a run folder written by `python train.py` "
                f"(with {MODEL_FILE} and {SPLIT_FILE})"
            )
    if options.metadata and any(f in TFLITE_FORMATS for f in options.formats):
        tflite_metadata.load_schema()  # fail now, before minutes of conversion, if mediapipe is missing
    out_dir = atomic.writable_folder(out_dir if out_dir is not None else run.export_dir, "--out-dir")
    model = inference.load_keras_classifier(run.model_path)
    image_size, num_classes = int(model.input_shape[1]), int(model.output_shape[-1])
    split = data.read_split(run.split_path)
    labels = _read_labels(run, split.class_names, num_classes)
    resize_mode = run.setting("data", "resize_mode") or "stretch"  # test images resized as in training
    decoding = data.run_decoding(run)  # DICOM window: calibration and parity read pixels as training did
    subset = "test" if split.test else "val"
    if not getattr(split, subset):
        raise UserError(
            f"split '{run.split_path}' has no test or validation images, so the exported files cannot be checked "
            "against the Keras model: train with --set data.test_fraction=0.15 (the default) on more images"
        )
    return _Export(
        run_dir=run_dir,
        run=run,
        out_dir=out_dir,
        model=model,
        split=split,
        subset=subset,
        labels=labels,
        image_size=image_size,
        num_classes=num_classes,
        resize_mode=resize_mode,
        decoding=decoding,
        options=options,
        times=times,
    )


def _ship_contract(export: _Export) -> None:
    """Writes the labels and the input contract, and copies the run's temperature and decision threshold into the
    export folder."""
    shipped = Run(export.out_dir)  # laid out like the run folder, so a model there finds its labels and records
    shipped.write_labels(export.labels)
    shipped.write_contract(export.contract)
    # The temperature and the two-class decision threshold travel with the files (evaluate and predict read them).
    for source, copy in (
        (export.run.calibration_path, shipped.calibration_path),
        (export.run.operating_point_path, shipped.operating_point_path),
    ):
        if source.exists():
            with atomic.replacing(copy) as temporary:
                shutil.copyfile(source, temporary)


def _convert_formats(export: _Export, scratch: Path) -> _Converted:
    """Writes every format under its staging name: the SavedModel, then each TFLite file converted from one source."""
    from classifier import data

    files: dict[str, Path] = {}
    if "saved_model" in export.options.formats:
        with export.times.step("SavedModel"):
            files["saved_model"] = _export_saved_model(
                export.model, export.contract, export.out_dir / _staged(SAVED_MODEL_DIR)
            )
    options = export.options
    # int8 is calibrated on the sample; a failing dynamic file's layers are ranked on it.
    wanted = "int8" in options.formats or ("dynamic" in options.formats and options.keep_float_layers > 0)
    calibration = _calibration_sample(export.split, options.calibration_images, options.seed) if wanted else None
    wanted_tflite = [f for f in export.options.formats if f in TFLITE_FORMATS]
    representative_dataset = _calibration_batches(
        data, calibration, export.image_size, export.resize_mode, export.decoding
    )
    source, tflite = None, {}
    if wanted_tflite:
        with export.times.step("TFLite source"):
            source = _write_conversion_model(export.model, export.image_size, scratch / "saved_model")
        for fmt in wanted_tflite:
            log.info(f"converting {fmt} ...")
            files[fmt] = export.out_dir / _staged(tflite_file_name(fmt))
            with export.times.step(fmt):
                tflite[fmt] = _convert(source, fmt, representative_dataset)
                _write_atomic(files[fmt], _with_metadata(export, tflite[fmt], fmt))
    return _Converted(files, tflite, scratch, source, calibration, representative_dataset)


def _with_metadata(export: _Export, tflite: bytes, fmt: str) -> bytes:
    """Embeds the labels, the input description and the input contract in a .tflite, unless metadata is off."""
    from classifier import tflite_metadata

    if not export.options.metadata:
        return tflite
    size = export.image_size
    return tflite_metadata.add_image_classifier_metadata(
        tflite,
        export.labels,
        name=f"{export.run_dir.resolve().name} ({fmt})",
        description=f"Image classifier, {export.num_classes} classes, {size}x{size} RGB, {fmt}.",
        float_input=fmt != "int8",
        contract=export.contract,
    )


def _check_parity(export: _Export, converted: _Converted) -> _Parity:
    """Runs Keras and every staged file on the held-out images, gates each file and moves it to its final name."""
    from classifier import data, inference
    from classifier.inference import model_size

    dataset = data.make_dataset(
        export.split,
        export.subset,
        image_size=export.image_size,
        batch_size=export.options.batch_size,
        resize_mode=export.resize_mode,
        decoding=export.decoding,
    )
    with export.times.step("parity"):  # loading each file included (the SavedModel's takes seconds)
        predictors = {
            fmt: inference.load_predictor(path, num_threads=export.options.num_threads)
            for fmt, path in converted.files.items()
        }
        probs, keras_probs, y_true, signature_check = _run_all(
            export.model, predictors, dataset, export.options.batch_size
        )
    held_out = _HeldOut(dataset, keras_probs, y_true)
    model_path = export.run.model_path
    keras_accuracy = float(np.mean(keras_probs.argmax(-1) == y_true))
    parity = _Parity(
        formats={
            "keras": {"file": model_path.name, "size_bytes": model_path.stat().st_size, "accuracy": keras_accuracy}
        },
        failures=[],
        images=len(y_true),
    )
    for fmt, path in converted.files.items():
        final = path.with_name(path.name.removeprefix(STAGING_PREFIX))
        entry = {"file": final.name, "size_bytes": model_size(path), **_parity(probs[fmt], keras_probs, y_true)}
        if fmt == "saved_model":
            entry.update(signature_check)
        else:
            with export.times.step("latency"):
                entry.update(_tflite_details(predictors[fmt], export.options.latency_runs))
        problems = _gate(fmt, entry, export.options.thresholds)
        if fmt in ("dynamic", "int8") and problems and export.options.keep_float_layers > 0:
            with export.times.step(f"{fmt} retry"):
                problems = _retry_selective(fmt, export, converted, held_out, entry, problems)
        parity.formats[fmt] = _settle(fmt, path, final, entry, problems, parity.failures)
    return parity


def _retry_selective(
    fmt: str, export: _Export, converted: _Converted, held_out: _HeldOut, entry: dict, problems: list[str]
) -> list[str]:
    """Converts a failing quantized format again with its worst layers in float (classifier/selective.py), updates
    `entry` in place and returns the new problems."""
    from classifier import inference
    from classifier.inference import model_size

    options, path = export.options, converted.files[fmt]
    log.info(f"{fmt}: {'; '.join(problems)}; keeping the {options.keep_float_layers} worst layers in float ...")
    if fmt == "int8":
        tflite, kept = selective.int8(
            converted.source,
            _int8_converter,
            converted.representative_dataset,
            options.keep_float_layers,
            converted.scratch,
        )
    else:
        reference = converted.tflite.get("float32") or _convert(converted.source, "float32", None)
        images = np.concatenate([batch[0] for batch in selective.first(converted.representative_dataset, 64)()])
        tflite, kept = selective.dynamic(
            converted.tflite[fmt], reference, images, options.keep_float_layers, converted.scratch, options.num_threads
        )
    if not kept:
        log.info(f"{fmt}: no quantized layer to keep in float")
        return problems
    _write_atomic(path, _with_metadata(export, tflite, fmt))
    predictor = inference.load_predictor(path, num_threads=options.num_threads)
    retried, _, _, _ = _run_all(export.model, {fmt: predictor}, held_out.dataset, options.batch_size)
    first = {key: entry[key] for key in ("accuracy", "accuracy_drop", "accuracy_drop_ci95")}
    entry.update(_parity(retried[fmt], held_out.keras_probs, held_out.y_true), size_bytes=model_size(path))
    entry.update(_tflite_details(predictor, options.latency_runs), float_layers=kept)
    entry[f"full_{fmt}"] = first
    return _gate(fmt, entry, options.thresholds)


def _settle(fmt: str, path: Path, final: Path, entry: dict, problems: list[str], failures: list[str]) -> dict:
    """Moves a staged file to its final name if it passed, else to its FAILED name (adding to `failures`)."""
    entry["passed"] = not problems
    failed = final.with_name(failed_name(final.name))
    if problems:
        _move(path, failed)
        entry["file"] = failed.name
        kept = f"; the earlier {final.name} is kept" if final.exists() else ""
        failures.append(f"{fmt}: {'; '.join(problems)} (written as {failed.name}{kept})")
    else:
        _move(path, final)
        _remove(failed)  # a FAILED file left by an earlier export would contradict this one
    return entry


def _write_report(export: _Export, converted: _Converted, parity: _Parity) -> dict:
    """Writes `export_report.json` and returns the report."""
    report = {
        "run_dir": str(export.run_dir),
        "export_dir": str(export.out_dir),
        "image_size": export.image_size,
        "num_classes": export.num_classes,
        "labels": export.labels,
        # Inside every exported graph; None: an older model.
        "temperature": calibration_lib.model_temperature(export.model),
        "resize_mode": export.resize_mode,
        "decoding": dataclasses.asdict(export.decoding),
        "parity_subset": export.subset,
        "parity_images": parity.images,
        "calibration_images": len(converted.calibration.train) if converted.calibration else None,
        "num_threads": export.options.num_threads,
        "metadata": export.options.metadata,
        "thresholds": dataclasses.asdict(export.options.thresholds),
        "formats": parity.formats,
        "passed": not parity.failures,
        "failures": parity.failures,
        "seconds": dict(export.times.seconds),  # of each step, in order (the report's own writing is not in it)
    }
    atomic.write_text(export.out_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


STAGING_PREFIX = ".pending-"


def _staged(name: str) -> str:
    return f"{STAGING_PREFIX}{name}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _move(source: Path, target: Path) -> None:
    """Renames a staged file or SavedModel folder onto its final name, replacing what was there."""
    if source.is_dir():
        _replace_dir(source, target)
    else:
        os.replace(source, target)


def _parity(probs: np.ndarray, keras_probs: np.ndarray, y_true: np.ndarray) -> dict:
    """Top-1 agreement and largest probability difference with Keras, accuracy and its paired drop, of one format."""
    top = probs.argmax(-1)
    keras_correct, correct = keras_probs.argmax(-1) == y_true, top == y_true
    keras_accuracy, accuracy = float(np.mean(keras_correct)), float(np.mean(correct))
    return {
        "agreement": float(np.mean(top == keras_probs.argmax(-1))),
        "max_abs_diff": float(np.max(np.abs(probs - keras_probs))),
        "accuracy": accuracy,
        "keras_accuracy": keras_accuracy,
        "accuracy_drop": keras_accuracy - accuracy,
        "accuracy_drop_ci95": paired_drop_interval(keras_correct, correct),
        "only_keras_right": int(np.sum(keras_correct & ~correct)),
        "only_format_right": int(np.sum(~keras_correct & correct)),
        "parity_images": len(y_true),
    }


def paired_drop_interval(reference_correct: np.ndarray, candidate_correct: np.ndarray, seed: int = 0) -> list[float]:
    """95 % interval of the accuracy drop (reference minus candidate) on the same images, by paired bootstrap.

    scipy's bootstrap resamples the images, keeping each image's pair of outcomes together. Where the two never
    disagree, the drop is exactly 0 and so is its interval (the bootstrap of a constant is undefined).
    """
    from scipy.stats import bootstrap

    reference = np.asarray(reference_correct, dtype=float)
    candidate = np.asarray(candidate_correct, dtype=float)
    if np.array_equal(reference, candidate):
        return [0.0, 0.0]
    result = bootstrap(
        (reference, candidate),
        lambda a, b, axis=-1: np.mean(a, axis=axis) - np.mean(b, axis=axis),
        paired=True,
        confidence_level=0.95,
        n_resamples=2000,
        method="percentile",
        random_state=seed,
    )
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def _tflite_details(predictor, latency_runs: int) -> dict:
    """Input/output types and quantization of a .tflite file, and its batch-1 LiteRT latency."""
    from classifier.inference import measure_latency

    latency = measure_latency(predictor, runs=latency_runs)
    return {
        "input_dtype": predictor.input_dtype.name,
        "output_dtype": np.dtype(predictor.output["dtype"]).name,
        "input_quantization": [float(q) for q in predictor.input["quantization"]],
        "output_quantization": [float(q) for q in predictor.output["quantization"]],
        "latency_ms": latency["median_ms"],
        "latency_p90_ms": latency["p90_ms"],
    }


def _check_formats(formats: Sequence[str]) -> list[str]:
    """Validates format names, keeping FORMATS order."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown export format(s) {unknown or formats!r}: choose from {','.join(FORMATS)}")
    return [f for f in FORMATS if f in formats]


def _read_labels(run: Run, class_names: list[str], num_classes: int) -> list[str]:
    """Class names from the run's labels.txt (else split.json), checked against the model's outputs."""
    labels = run.read_labels()
    if labels is None:
        labels = list(class_names)
    if len(labels) != num_classes:
        raise UserError(
            f"{run.labels_path if run.labels_path.is_file() else SPLIT_FILE} names {len(labels)} classes but "
            f"{run.model_path} has {num_classes} outputs: the run folder mixes files of different runs; "
            f"train again or restore the run's own {LABELS_FILE}"
        )
    return labels


def _write_atomic(path: Path, payload: bytes) -> None:
    """Writes a file under a temporary name in the same folder, then renames it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished folder into place; an older one is moved aside first (os.replace cannot overwrite one)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _export_saved_model(model, contract: InputContract, final: Path) -> Path:
    """Writes the SavedModel with a float32 and a uint8 serving signature, and its input contract inside it."""
    import keras
    import tensorflow as tf

    from classifier import contract as contract_lib

    def serve(images):
        probabilities = model(images, training=False)
        return {"probabilities": probabilities, "top_class": tf.argmax(probabilities, axis=-1, output_type=tf.int32)}

    shape = [None, contract.image_size, contract.image_size, 3]
    # No archive.track(model): the archive saves the variables its endpoints use by itself, and tracking the
    # model as well stores every weight twice (Keras variables and their tf.Variables; 2x the folder size).
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", serve, input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    archive.add_endpoint(
        "serving_uint8",
        lambda images: serve(tf.cast(images, tf.float32)),
        input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")],
    )
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        archive.write_out(str(tmp), verbose=False)
        contract_lib.write_into_saved_model(tmp, contract)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_conversion_model(model, image_size: int, path: Path) -> Path:
    """Writes the model's plain call (one image input, one probability output) as a SavedModel to convert.

    This is Keras 3's own LiteRT route (ExportArchive -> SavedModel -> TFLiteConverter.from_saved_model); a
    concrete function converted directly keeps resource variables that int8 calibration cannot read.
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()  # not tracking the model: see _export_saved_model
    archive.add_endpoint(
        "serve",
        lambda image: model(image, training=False),
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")],
    )
    archive.write_out(str(path), verbose=False)
    return path


def _calibration_sample(split, count: int, seed: int):
    """A split whose train list is a seeded, class-balanced sample of the training images.

    Each class gets an equal share of `count` (a small class gives all it has, the others fill its gap), so the
    int8 ranges are set by every class's images, not mostly by the majority class's.
    """
    if not split.train:
        raise UserError("the run's split has no training images to calibrate the int8 model on")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(split.train):
        by_class.setdefault(label, []).append(index)
    pools = [list(rng.permutation(indices)) for _, indices in sorted(by_class.items())]
    chosen: list[int] = []
    while len(chosen) < min(count, len(split.train)):  # round robin over the classes until the sample is full
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    order = rng.permutation(chosen)  # mixed classes: the calibrator sees them interleaved
    return dataclasses.replace(split, train=[split.train[i] for i in order])


def _calibration_batches(data, sample, image_size: int, resize_mode: str, decoding):
    """Returns the converter's representative_dataset: real training images, one per step, 0..255 float32."""

    def batches() -> Iterator[list[np.ndarray]]:
        dataset = data.make_dataset(
            sample, "train", image_size=image_size, batch_size=1, resize_mode=resize_mode, decoding=decoding
        )
        for index, (images, _) in enumerate(dataset):
            images = images.numpy()
            if index == 0:
                # The uint8 input's quantization comes from the smallest and largest calibration pixel. One black
                # and one white pixel make it exactly 0..255 (scale 1, zero point 0), so a phone can feed camera
                # bytes unchanged even when the training images never reach pure black or white.
                images[0, 0, 0], images[0, 0, 1] = 0.0, 255.0
            yield [images]

    return batches


def _convert(source: Path, fmt: str, representative_dataset) -> bytes:
    """Converts the SavedModel at `source` to one TFLite format."""
    import tensorflow as tf

    if fmt == "int8":
        return _int8_converter(source, representative_dataset).convert()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(source))
    # Builtin ops only: a phone's LiteRT / MediaPipe has no TensorFlow (Flex) ops.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if fmt != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def _int8_converter(source: Path, representative_dataset):
    """The full-integer converter: uint8 pixels in, uint8 scores out, calibrated on `representative_dataset`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(source))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8  # MediaPipe rejects int8 scores; see the module docstring
    return converter


def _run_all(model, predictors: dict, dataset, batch_size: int):
    """One pass over the held-out images: Keras and every exported file on the same batches."""
    keras_probs, labels = [], []
    probs: dict[str, list[np.ndarray]] = {fmt: [] for fmt in predictors}
    uint8_check: dict = {}
    for images, batch_labels in dataset:
        images = images.numpy()
        keras_probs.append(np.asarray(model.predict_on_batch(images)))
        labels.append(batch_labels.numpy())
        for fmt, predictor in predictors.items():
            probs[fmt].append(predictor.predict(images, batch_size=batch_size))
        if "saved_model" in predictors and not uint8_check:
            uint8_check = _check_saved_model_signatures(predictors["saved_model"], images)
    return (
        {fmt: np.concatenate(p) for fmt, p in probs.items()},
        np.concatenate(keras_probs),
        np.concatenate(labels),
        uint8_check,
    )


def _check_saved_model_signatures(predictor, images: np.ndarray) -> dict:
    """Checks the uint8 signature against the float32 one on the same pixels, and top_class against argmax."""
    import tensorflow as tf

    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    signatures = predictor.loaded.signatures
    as_float = signatures["serving_default"](images=tf.constant(pixels.astype(np.float32)))
    as_uint8 = signatures["serving_uint8"](images=tf.constant(pixels))
    return {
        "uint8_signature_max_abs_diff": float(
            np.max(np.abs(as_uint8["probabilities"].numpy() - as_float["probabilities"].numpy()))
        ),
        "top_class_matches": bool(
            np.array_equal(as_float["top_class"].numpy(), as_float["probabilities"].numpy().argmax(-1))
        ),
    }


def _gate(fmt: str, entry: dict, limits: Thresholds) -> list[str]:
    """Returns the parity problems of one format (empty when it passes)."""
    problems = []
    if fmt in ("saved_model", "float32", "float16"):
        min_agreement = limits.min_agreement_float16 if fmt == "float16" else limits.min_agreement_float32
        if entry["agreement"] < min_agreement:
            problems.append(f"top-1 agreement with Keras {entry['agreement']:.2%} < {min_agreement:.2%}")
    if fmt in ("saved_model", "float32") and entry["max_abs_diff"] > limits.max_diff_float32:
        problems.append(f"max probability difference {entry['max_abs_diff']:.3g} > {limits.max_diff_float32:.3g}")
    low, high = entry["accuracy_drop_ci95"]
    if fmt in ("dynamic", "int8") and entry["accuracy_drop"] > limits.max_accuracy_drop and low > 0:
        problems.append(
            f"accuracy {entry['accuracy']:.2%} vs Keras {entry['keras_accuracy']:.2%}: drop "
            f"{entry['accuracy_drop'] * 100:.2f} points (95 % interval {low * 100:.2f} to {high * 100:.2f}) > "
            f"{limits.max_accuracy_drop * 100:.2f}, and above zero beyond the noise of {entry['parity_images']} images"
        )
    if fmt == "saved_model":
        if entry["uint8_signature_max_abs_diff"] > limits.max_diff_float32:
            problems.append(f"serving_uint8 differs from serving_default by {entry['uint8_signature_max_abs_diff']}")
        if not entry["top_class_matches"]:
            problems.append("top_class is not the argmax of probabilities")
    if fmt == "int8":
        scale, zero_point = entry["input_quantization"]
        if abs(scale - 1.0) > 1e-3 or zero_point != 0:
            problems.append(
                f"uint8 input quantization (scale {scale:.4g}, zero point {zero_point:g}) is not (1, 0): "
                "a phone feeding camera bytes would see distorted pixels"
            )
    return problems


def format_report(report: dict) -> str:
    """Renders the report as a table: format, file, size MB, agreement, max diff, accuracy, latency ms, pass."""
    header = f"{'format':12s} {'file':28s} {'size MB':>8s} {'agree':>8s} {'max diff':>9s} {'accuracy':>9s} "
    header += f"{'lat. ms':>8s}  pass"
    lines = [header, "-" * len(header)]
    for fmt, entry in report["formats"].items():

        def cell(key, spec, width, entry=entry):
            value = entry.get(key)
            return f"{'-':>{width}s}" if value is None else f"{value:>{width}{spec}}"

        passed = {True: "yes", False: "NO", None: "-"}[entry.get("passed")]
        lines.append(
            f"{fmt:12s} {entry['file']:28s} {entry['size_bytes'] / 1e6:8.2f} {cell('agreement', '.2%', 8)} "
            f"{cell('max_abs_diff', '.2e', 9)} {cell('accuracy', '.2%', 9)} {cell('latency_ms', '.2f', 8)}  {passed}"
        )
    for fmt, entry in report["formats"].items():
        if "accuracy_drop_ci95" in entry and fmt in ("dynamic", "int8"):
            low, high = entry["accuracy_drop_ci95"]
            kept = f"; {len(entry['float_layers'])} layers kept in float" if entry.get("float_layers") else ""
            lines.append(
                f"{fmt}: accuracy drop {entry['accuracy_drop'] * 100:+.2f} points, 95 % interval {low * 100:+.2f} to "
                f"{high * 100:+.2f} ({entry['only_keras_right']} images only Keras got right, "
                f"{entry['only_format_right']} only {fmt}){kept}"
            )
    lines.append(
        f"parity on {report['parity_images']} {report['parity_subset']} images; LiteRT latency at batch 1, "
        f"{report['num_threads']} threads; files in {report['export_dir']}"
    )
    if report.get("seconds"):  # absent from reports of older exports
        lines.append(f"export steps: {StepTimes(report['seconds']).describe()}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    defaults = Thresholds()
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export a trained run to SavedModel and TFLite, checked against the Keras model on the test split.",
    )
    parser.add_argument("--run-dir", required=True, help="run folder written by train.py (saved_models/<run>)")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)} (default: all)"
    )
    parser.add_argument("--out-dir", default=None, help="output folder (default: RUN_DIR/export)")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=400,
        help="training images to calibrate int8 on, class-balanced (default 400)",
    )
    parser.add_argument(
        "--min-agreement-float32",
        type=float,
        default=defaults.min_agreement_float32,
        help="SavedModel/float32: minimum top-1 agreement with Keras, 0..1 (default %(default)s)",
    )
    parser.add_argument(
        "--max-diff-float32",
        type=float,
        default=defaults.max_diff_float32,
        help="SavedModel/float32: maximum absolute probability difference (default %(default)s)",
    )
    parser.add_argument(
        "--min-agreement-float16",
        type=float,
        default=defaults.min_agreement_float16,
        help="float16: minimum top-1 agreement with Keras, 0..1 (default %(default)s)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=defaults.max_accuracy_drop,
        help="dynamic/int8: maximum test-accuracy loss as a fraction, 0.01 = 1 point (default %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads for parity and latency (default 2)")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 runs per TFLite file (default 50)")
    parser.add_argument(
        "--no-metadata",
        action="store_true",
        help="write .tflite files without embedded labels/metadata (when mediapipe is not installed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: `python export.py --run-dir saved_models/<run>`; exit 1 when a format fails parity."""
    args = _parser().parse_args(argv)

    def run() -> int:
        report = export_run(
            args.run_dir,
            formats=[f.strip() for f in args.formats.split(",") if f.strip()],
            out_dir=args.out_dir,
            calibration_images=args.calibration_images,
            thresholds=Thresholds(
                min_agreement_float32=args.min_agreement_float32,
                max_diff_float32=args.max_diff_float32,
                min_agreement_float16=args.min_agreement_float16,
                max_accuracy_drop=args.max_accuracy_drop,
            ),
            num_threads=args.threads,
            latency_runs=args.latency_runs,
            metadata=not args.no_metadata,
        )
        log.info(format_report(report))
        if report["failures"]:
            log.error("parity gate FAILED:\n  " + "\n  ".join(report["failures"]), extra=STDERR)
            return 1
        return 0

    return run_cli(run, "files that passed before keep their names; run the same command again.")


if __name__ == "__main__":
    sys.exit(main())
