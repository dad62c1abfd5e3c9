"""`classifier evaluate`: how good a model is, in numbers and figures a clinician or a quality engineer can read.

One implementation for every model kind (model.keras, an exported SavedModel folder, any .tflite), through
`classifier.inference`, on the same pixels as training (`data.load_and_resize` with the run's resize mode and DICOM
window). The images are a run's held-out TEST split (`--run-dir`) or a folder with one subfolder per class
(`--data-dir`; DICOM files included).

Writes into the output folder (default `RUN/evaluation/<model>`, e.g. `evaluation/keras` or
`evaluation/model_int8`): `evaluation.json` (keys in `JSON_KEYS`), `predictions.csv` (one row per image: true
and predicted class, probabilities, correct or not), and the figures `confusion_matrix.png`,
`confusion_matrix_normalized.png`, `roc_curve.png`, `reliability_diagram.png`; a readable table is printed.

Two-class tasks also get sensitivity/specificity/PPV/NPV at the default 0.5 and at the run's operating point
(`operating_point.json`, see `classifier.operating_point`), which `--choose-threshold` (re)computes on the
validation split.

Probabilities are the model's own, calibrated by the temperature training fitted (`classifier.calibration`).
When the model's `calibration.json` is found (beside it, or in the run folder above it), the report and the
reliability diagram also show the probabilities before temperature scaling (softmax(T log p)): the ECE the
calibration removed. Accuracy, the confusion matrices and ROC-AUC are the same either way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier import atomic
from classifier import calibration as calibration_lib
from classifier import operating_point as op_lib
from classifier.errors import UserError, run_cli
from classifier.inference import (
    Predictor,
    add_dicom_arguments,
    input_settings,
    open_model,
    predict_files,
)
from classifier.log import STDERR
from classifier.run import CALIBRATION_FILE, EVALUATION_REPORT_FILE, MODEL_FILE, SPLIT_FILE, Run

if TYPE_CHECKING:
    from classifier.data import Decoding

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPORT_FILE = EVALUATION_REPORT_FILE
PREDICTIONS_FILE = "predictions.csv"
FIGURES = {
    "confusion_matrix": "confusion_matrix.png",
    "confusion_matrix_normalized": "confusion_matrix_normalized.png",
    "roc_curve": "roc_curve.png",
    "reliability_diagram": "reliability_diagram.png",
}
# The documented schema of evaluation.json (tests check reports against it).
JSON_KEYS = (
    "schema_version",  # 1
    "created",  # ISO 8601 UTC time
    "model",  # MODEL_KEYS
    "data",  # DATA_KEYS
    "class_names",  # names in label order
    "count",  # images evaluated
    "loss",  # cross-entropy (natural log)
    "accuracy",  # top-1, most probable class
    "balanced_accuracy",  # mean recall over classes
    "auc",  # ROC-AUC: binary on label 1, else macro one-vs-rest; None when a class has no image
    "per_class",  # {class: {precision, recall, f1, support}}
    "macro_avg",  # {precision, recall, f1, support}: unweighted mean over classes
    "weighted_avg",  # the same weighted by support
    "confusion_matrix",  # counts, rows = true class, columns = predicted class
    "confusion_matrix_normalized",  # each row divided by its total (recall on the diagonal)
    "roc_auc",  # {"average": as auc, "per_class": {class: one-vs-rest AUC or None}}
    "ece",  # expected calibration error, top-label, equal-width bins
    "ece_bins",  # number of bins of the ECE and of the reliability diagram
    "calibration",  # None (no calibration.json for this model), else CALIBRATION_KEYS
    "binary",  # None for more than two classes, else BINARY_KEYS
    "operating_point",  # the stored operating point used (operating_point.json content + "path"), or None
    "output_dir",  # folder holding the files below
    "files",  # {"report", "predictions", and each of FIGURES' keys: file name in output_dir}
)
# temperature: T the model applies; ece_before / loss_before: of its probabilities with T undone (ece and loss are
# after); source: the calibration.json read; note: why training kept T = 1, or None.
CALIBRATION_KEYS = ("temperature", "ece_before", "ece_after", "loss_before", "loss_after", "source", "note")
MODEL_KEYS = ("path", "kind", "image_size", "resize_mode", "decoding")  # decoding: {dicom_window, dicom_frames}
DATA_KEYS = ("source", "run_dir", "data_dir", "subset", "skipped")  # skipped: [{"path", "reason"}]
BINARY_KEYS = ("positive_class", "positive_index", "default", "operating_point")  # the last two: THRESHOLD_KEYS/None
THRESHOLD_KEYS = (
    "threshold",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "accuracy",
    "balanced_accuracy",
    "tp",
    "fp",
    "tn",
    "fn",
)


def _model_name(model: Path, kind: str) -> str:
    """Folder name for a model's evaluation: the kind, or the file name for .tflite (float32 vs int8 differ)."""
    return model.stem if kind == "tflite" else kind


def _images_from_folder(
    data_dir: str, subset: str | None, decoding
) -> tuple[str, list[tuple[str, int]], list[str], list]:
    """(root, [(relative path, label)], class names, skipped) of a class-folder or pre-split data folder."""
    from classifier import data

    scan = data.scan_folder(data_dir, decoding)
    if scan.presplit:
        wanted = subset or ("test" if "test" in scan.images else "val")
        if wanted not in scan.images:
            raise UserError(
                f"data folder '{scan.root}' has no {wanted} folder (it has {', '.join(sorted(scan.folders.values()))}):"
                f" pass --subset with one of {', '.join(sorted(scan.images))}"
            )
        return scan.root, scan.images[wanted], scan.class_names, scan.skipped
    if subset not in (None, "all"):
        raise UserError(
            f"--subset {subset} applies to a run's split or a pre-split folder; '{scan.root}' has one subfolder per "
            "class, all of which is evaluated: drop --subset"
        )
    return scan.root, scan.images["all"], scan.class_names, scan.skipped


def _run_image_size(run: Run | None) -> int | None:
    """data.image_size from a run's config.yaml, or None."""
    size = run.setting("data", "image_size") if run is not None else None
    return int(size) if size is not None else None


def _map_labels(items: list[tuple[str, int]], folder_classes: list[str], model_classes: list[str], source: str):
    """Relabels folder classes to the model's label indices by name."""
    unknown = [name for name in folder_classes if name not in model_classes]
    if unknown:
        raise UserError(
            f"class folder(s) {unknown} in '{source}' are not classes of the model ({', '.join(model_classes)}): "
            "rename or remove them, or evaluate a model trained on these classes"
        )
    index = [model_classes.index(name) for name in folder_classes]
    return [(path, index[label]) for path, label in items]


def _resolve_point(point: dict | None, class_names: list[str], positive_class: str | None) -> dict | None:
    """The stored operating point when it fits this model and positive class, else None (with a note why)."""
    if point is None or len(class_names) != 2:
        return None
    if list(point["class_names"]) != list(class_names):
        log.info(f"note: ignoring {point['path']}: made for classes {point['class_names']}", extra=STDERR)
        return None
    if positive_class is not None and positive_class != point["positive_class"]:
        log.info(
            f"note: ignoring {point['path']}: its positive class is '{point['positive_class']}', not "
            f"'{positive_class}'; choose a threshold for it with --choose-threshold",
            extra=STDERR,
        )
        return None
    return point


def choose_threshold(
    predictor,
    run: Run,
    method: str,
    *,
    positive_class: str | None = None,
    resize_mode: str = "stretch",
    batch_size: int = 32,
    destination: Path | None = None,
    decoding=None,
) -> dict:
    """(Re)computes the operating point of a two-class model on its run's VALIDATION split and stores it.

    Args:
        predictor: The model (an `inference.Predictor`).
        run: The run, with split.json.
        method: "youden" or "sensitivity:T" (`operating_point.parse_method`).
        positive_class: Name of the positive class; default the second class.
        resize_mode: As in training.
        batch_size: Images per model call.
        destination: Folder for operating_point.json; default the model's folder (the run folder for
            model.keras, export/ for exported files, so each file keeps the threshold measured on it).
        decoding: A `data.Decoding`, as in training; default the run's.

    Returns:
        The stored operating point, with "path".

    Raises:
        UserError: a bad method, not a two-class task, unreadable validation images, one class only in val.
    """
    from classifier import data

    name, target = op_lib.parse_method(method)
    split = data.read_split(run.split_path)
    op_lib.resolve_positive_class(split.class_names, positive_class)  # fail before predicting on a bad name
    paths = [str(Path(split.root) / rel) for rel, _ in split.val]
    probabilities, errors = predict_files(
        predictor,
        paths,
        resize_mode=resize_mode,
        batch_size=batch_size,
        description="validation",
        decoding=decoding or data.run_decoding(run),
    )
    if errors:
        first = next(iter(errors.items()))
        raise UserError(
            f"{len(errors)} validation image(s) cannot be read, e.g. '{paths[first[0]]}' ({first[1]}): restore the "
            f"data folder '{split.root}' the run was trained on"
        )
    point = op_lib.operating_point_for(
        np.array([label for _, label in split.val]),
        probabilities,
        split.class_names,
        method=name,
        target_sensitivity=target,
        positive_class=positive_class,
    )
    point["model"] = predictor.path
    model_path = Path(predictor.path)
    path = op_lib.write_operating_point(destination or model_path.parent, point)
    point["path"] = str(path)
    return point


@dataclasses.dataclass(frozen=True)
class _Setup:
    """The model under evaluation and how images are read for it, shared by every step of `evaluate`.

    Attributes:
        model: The model file or SavedModel folder.
        run_dir: The run folder given, or None.
        settings_run: The run whose settings apply (`run_dir`, else the model's own run), or None.
        predictor: The opened model.
        resize_mode: How images are resized.
        decoding: How image files are decoded (DICOM window and frames).
        batch_size: Images per model call.
        n_bins: Bins of the ECE and the reliability diagram.
    """

    model: Path
    run_dir: Path | None
    settings_run: Run | None
    predictor: Predictor
    resize_mode: str
    decoding: Decoding
    batch_size: int
    n_bins: int


@dataclasses.dataclass(frozen=True)
class _Images:
    """The labelled images to evaluate on.

    Attributes:
        root: The folder the paths are relative to.
        items: (relative path, label index in the model's classes) per image.
        class_names: The model's class names, in label order.
        skipped: Files left out while listing, as {"path", "reason"}.
        source: "run" (the run's split) or "folder" (`--data-dir`).
        subset: The subset evaluated ("test", "val", "train" or "all").
    """

    root: str
    items: list[tuple[str, int]]
    class_names: list[str]
    skipped: list[dict]
    source: str
    subset: str


@dataclasses.dataclass(frozen=True)
class _Predictions:
    """The model's probabilities on the images it could read.

    Attributes:
        paths: Relative path of each image read.
        y_true: True label of each, [N].
        probabilities: The model's probabilities, [N, C].
        skipped: Every file left out (listing and reading), as {"path", "reason"}.
    """

    paths: list[str]
    y_true: np.ndarray
    probabilities: np.ndarray
    skipped: list[dict]


def evaluate(
    model: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    subset: str | None = None,
    output_dir: str | Path | None = None,
    positive_class: str | None = None,
    threshold_method: str | None = None,
    batch_size: int = 32,
    threads: int | None = None,
    resize_mode: str | None = None,
    n_bins: int = 10,
    dicom_window: str | None = None,
    dicom_frames: str | None = None,
) -> dict:
    """Evaluates a model on a run's test split or on a folder of labelled images; writes the report and figures.

    Args:
        model: model.keras, a SavedModel folder or a .tflite file; default `run_dir/model.keras`.
        run_dir: A training run folder: its split (test subset unless `subset`), config and operating point.
        data_dir: A folder with one subfolder per class (or train/ val/ test/): evaluated instead of the run's
            split. With `run_dir` too, the run still supplies the settings, the default model and output folder.
        subset: "test" (default), "val" or "train" of the run's split or of a pre-split folder.
        output_dir: Where to write; default `<run or model folder>/evaluation/<model name>[-<subset or folder>]`.
        positive_class: Two-class tasks: the class that counts as positive; default the second in labels.txt.
        threshold_method: "youden" or "sensitivity:T": choose the operating point on the validation split first
            and store it beside the model (see `choose_threshold`).
        batch_size: Images per model call.
        threads: CPU threads (see `inference.open_model`).
        resize_mode: Override the run's data.resize_mode (without a run folder: the input contract the model carries,
            else "stretch").
        n_bins: Bins of the ECE and the reliability diagram.
        dicom_window: Override the run's data.dicom_window ("auto" when there is no run).
        dicom_frames: Override the run's data.dicom_frames ("first" when there is no run); used with --data-dir.

    Returns:
        The report written to evaluation.json (keys: `JSON_KEYS`).

    Raises:
        UserError: no data source, a missing model or run file, classes that do not match the model, no
            readable image, or an invalid option.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    _check_sources(run_dir, data_dir, subset)
    setup = _open(
        model,
        run_dir,
        threads=threads,
        resize_mode=resize_mode,
        dicom_window=dicom_window,
        dicom_frames=dicom_frames,
        batch_size=batch_size,
        n_bins=n_bins,
    )
    images = _images(setup, data_dir, subset)
    output_dir = _output_dir(setup, images, output_dir)  # before predicting: a bad path must not cost the predictions
    point, positive_index = _operating_point(setup, images.class_names, threshold_method, positive_class)
    predictions = _predict(setup, images)
    result, before = _metrics(setup, images, predictions, point, positive_index)
    _write_figures(setup, images, predictions, result, before, positive_index, output_dir)
    _write_predictions(output_dir / PREDICTIONS_FILE, predictions, images.class_names)
    return _write_report(setup, images, predictions, result, point, output_dir)


def _check_sources(run_dir: Path | None, data_dir: str | Path | None, subset: str | None) -> None:
    """Checks that there is something to evaluate on, before any model is loaded."""
    from classifier import data

    if run_dir is None and data_dir is None:
        raise UserError(
            "nothing to evaluate on: pass --run-dir RUN (its test split) or --data-dir DIR (one subfolder per class)"
        )
    if subset not in (None, "all", *data.SUBSETS):
        raise UserError(f"--subset {subset} is unknown: use one of {', '.join(data.SUBSETS)}")
    if run_dir is not None and not run_dir.is_dir():
        raise UserError(f"run folder '{run_dir}' does not exist: pass --run-dir saved_models/<run>")


def _open(
    model: str | Path | None,
    run_dir: Path | None,
    *,
    threads: int | None,
    resize_mode: str | None,
    dicom_window: str | None,
    dicom_frames: str | None,
    batch_size: int,
    n_bins: int,
) -> _Setup:
    """Finds and opens the model, and settles how images are read for it (the run's settings unless overridden)."""
    if model is None:
        if run_dir is None:
            raise UserError(f"no model: pass --model ({MODEL_FILE}, a SavedModel folder or a .tflite file)")
        model = Run(run_dir).model_path
        if not model.is_file():
            raise UserError(f"run folder '{run_dir}' has no {MODEL_FILE}: let training finish, or pass --model")
    model = Path(model)
    settings_run = Run(run_dir) if run_dir is not None else Run.of_model(model)
    resize_mode, decoding = input_settings(
        model, settings_run, resize_mode=resize_mode, dicom_window=dicom_window, dicom_frames=dicom_frames
    )
    predictor = open_model(model, threads)
    trained_size = _run_image_size(settings_run)
    if trained_size is not None and trained_size != predictor.image_size:
        log.info(
            f"note: {model} takes {predictor.image_size} px images but its run trained at {trained_size} px; "
            f"evaluating at {predictor.image_size} px",
            extra=STDERR,
        )
    return _Setup(model, run_dir, settings_run, predictor, resize_mode, decoding, batch_size, n_bins)


def _images(setup: _Setup, data_dir: str | Path | None, subset: str | None) -> _Images:
    """The images of `data_dir`, else of the run's split, labelled in the model's classes (checked against it)."""
    from classifier import data

    model, predictor, settings_run = setup.model, setup.predictor, setup.settings_run
    if data_dir is not None:
        root, items, folder_classes, skipped = _images_from_folder(str(data_dir), subset, setup.decoding)
        class_names = predictor.labels or (
            data.read_split(settings_run.split_path).class_names
            if settings_run is not None and settings_run.split_path.is_file()
            else folder_classes
        )
        items = _map_labels(items, folder_classes, list(class_names), root)
        source, subset_name = "folder", subset or ("test" if Path(root, "test").is_dir() else "all")
    else:
        split = data.read_split(settings_run.split_path)
        subset_name = subset if subset not in (None, "all") else "test"
        items, class_names, skipped, root, source = split.subset(subset_name), split.class_names, [], split.root, "run"
        if not items:
            raise UserError(
                f"the {subset_name} split of '{setup.run_dir}' is empty: evaluate --subset val, or train with "
                "--set data.test_fraction=0.15"
            )
        if predictor.labels and list(predictor.labels) != list(class_names):
            raise UserError(
                f"model '{model}' has classes {predictor.labels} but run '{setup.run_dir}' has {class_names}: "
                "evaluate the run's own model, or pass --data-dir with this model's classes"
            )
    class_names = list(class_names)
    if len(class_names) != predictor.num_classes:
        raise UserError(
            f"model '{model}' has {predictor.num_classes} outputs but the data has {len(class_names)} classes "
            f"({', '.join(class_names)}): evaluate it on data with its own classes"
        )
    return _Images(root, items, class_names, skipped, source, subset_name)


def _metrics(
    setup: _Setup, images: _Images, predictions: _Predictions, point: dict | None, positive_index: int
) -> tuple[dict, tuple[np.ndarray, float, float] | None]:
    """The metrics of the report, and the probabilities before temperature scaling for the reliability diagram."""
    from classifier import metrics

    result = metrics.evaluation_metrics(
        predictions.y_true,
        predictions.probabilities,
        images.class_names,
        positive_index=positive_index,
        threshold=point["threshold"] if point else None,
        n_bins=setup.n_bins,
    )
    result["calibration"], before = _calibration(
        setup.predictor, setup.model, predictions.y_true, predictions.probabilities, images.class_names, setup.n_bins
    )
    return result, before


def _operating_point(
    setup: _Setup, class_names: list[str], threshold_method: str | None, positive_class: str | None
) -> tuple[dict | None, int]:
    """The operating point to report (chosen now with `threshold_method`, else the stored one), the positive index."""
    settings_run = setup.settings_run
    if positive_class is not None:
        op_lib.resolve_positive_class(class_names, positive_class)  # an unknown name fails before any prediction
    if threshold_method is not None:
        if settings_run is None or not settings_run.split_path.is_file():
            raise UserError(
                "--choose-threshold needs the run's validation split: pass --run-dir saved_models/<run> (with "
                f"{SPLIT_FILE})"
            )
        point = choose_threshold(
            setup.predictor,
            settings_run,
            threshold_method,
            positive_class=positive_class,
            resize_mode=setup.resize_mode,
            batch_size=setup.batch_size,
            decoding=setup.decoding,
        )
        log.info(
            f"Operating point ({point['method']}) on {point['count']} validation images: threshold "
            f"{point['threshold']:.4f}, sensitivity {point['sensitivity']:.3f}, specificity "
            f"{point['specificity']:.3f}; saved to {point['path']}"
        )
    else:
        point = op_lib.find_operating_point(setup.model)
        if point is None and settings_run is not None:
            point = op_lib.read_operating_point(settings_run.operating_point_path)
    point = _resolve_point(point, class_names, positive_class)
    if len(class_names) == 2:
        positive_index = (
            point["positive_index"] if point else op_lib.resolve_positive_class(class_names, positive_class)
        )
    else:
        positive_index = 1
    return point, positive_index


def _predict(setup: _Setup, images: _Images) -> _Predictions:
    """Runs the model on every image; the unreadable ones are reported and left out."""
    items = images.items
    paths = [str(Path(images.root) / rel) for rel, _ in items]
    probabilities, errors = predict_files(
        setup.predictor,
        paths,
        resize_mode=setup.resize_mode,
        batch_size=setup.batch_size,
        description=f"evaluating {images.subset}",
        on_error=lambda path, reason: log.warning(f"skipped {path}: {reason}", extra=STDERR),
        decoding=setup.decoding,
    )
    skipped = list(images.skipped) + [{"path": items[i][0], "reason": reason} for i, reason in sorted(errors.items())]
    keep = [i for i in range(len(items)) if i not in errors]
    if not keep:
        raise UserError(f"none of the {len(items)} images under '{images.root}' could be read: see the messages above")
    return _Predictions(
        paths=[items[i][0] for i in keep],
        y_true=np.array([items[i][1] for i in keep]),
        probabilities=probabilities[keep],
        skipped=skipped,
    )


def _output_dir(setup: _Setup, images: _Images, output_dir: str | Path | None) -> Path:
    """The output folder (created): as given, else `evaluation/<model name>[-<subset or folder>]` of the run."""
    if output_dir is None:
        suffix = "" if images.source == "run" and images.subset == "test" else f"-{images.subset}"
        if images.source == "folder":
            suffix = f"-{Path(images.root).name}" + ("" if images.subset == "all" else f"-{images.subset}")
        base = setup.settings_run if setup.settings_run is not None else Run(setup.model.resolve().parent)
        output_dir = base.evaluation_dir / f"{_model_name(setup.model, setup.predictor.kind)}{suffix}"
    return atomic.writable_folder(output_dir, "--output-dir")


def _write_figures(
    setup: _Setup,
    images: _Images,
    predictions: _Predictions,
    result: dict,
    before: tuple[np.ndarray, float, float] | None,
    positive_index: int,
    output_dir: Path,
) -> None:
    """Draws the confusion matrices, the ROC curve and the reliability diagram into `output_dir`."""
    from classifier import plots

    y_true, probabilities, class_names = predictions.y_true, predictions.probabilities, images.class_names
    title = f"{setup.model.name} on {len(y_true)} {images.subset} images"
    plots.plot_confusion_matrices(
        y_true,
        probabilities.argmax(axis=1),
        class_names,
        output_dir / FIGURES["confusion_matrix"],
        output_dir / FIGURES["confusion_matrix_normalized"],
        title,
    )
    marks = {}
    if result["binary"]:
        marks = {"default": result["binary"]["default"], "operating point": result["binary"]["operating_point"]}
    plots.plot_roc(y_true, probabilities, class_names, output_dir / FIGURES["roc_curve"], title, positive_index, marks)
    plots.plot_reliability(
        y_true,
        probabilities,
        class_names,
        output_dir / FIGURES["reliability_diagram"],
        title,
        result["ece"],
        positive_index,
        setup.n_bins,
        before=before,
    )


def _write_report(
    setup: _Setup, images: _Images, predictions: _Predictions, result: dict, point: dict | None, output_dir: Path
) -> dict:
    """Writes evaluation.json (keys in `JSON_KEYS` order) and returns it."""
    predictor = setup.predictor
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"path": str(setup.model), "kind": predictor.kind, "image_size": predictor.image_size},
        "data": {
            "source": images.source,
            "run_dir": str(setup.run_dir) if setup.run_dir is not None else None,
            "data_dir": str(images.root),
            "subset": images.subset,
            "skipped": predictions.skipped,
        },
        "class_names": images.class_names,
        **result,
        "operating_point": point,
        "output_dir": str(output_dir),
        "files": {"report": REPORT_FILE, "predictions": PREDICTIONS_FILE, **FIGURES},
    }
    report["model"]["resize_mode"] = setup.resize_mode
    report["model"]["decoding"] = dataclasses.asdict(setup.decoding)
    report = {key: report[key] for key in JSON_KEYS}
    atomic.write_text(output_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


def _calibration(predictor, model: Path, y_true, probabilities, class_names, n_bins: int):
    """The model's temperature and its effect: (CALIBRATION_KEYS or None, (probabilities before, ECE, T) or None)."""
    from sklearn.metrics import log_loss

    from classifier.metrics import expected_calibration_error

    record = calibration_lib.find_calibration(model)
    if record is None:
        return None, None
    temperature = record["temperature"]
    inside = calibration_lib.model_temperature(predictor.model) if predictor.kind == "keras" else temperature
    if inside is None or abs(inside - temperature) > 1e-3 * temperature:
        log.info(
            f"note: ignoring {record['path']}: it records temperature {temperature:g} but {model} applies "
            f"{'none' if inside is None else f'{inside:g}'}",
            extra=STDERR,
        )
        return None, None
    before = calibration_lib.undo_temperature(probabilities, temperature)
    labels = list(range(len(class_names)))
    after = np.asarray(probabilities, dtype=np.float64)
    summary = {
        "temperature": temperature,
        "ece_before": expected_calibration_error(y_true, before, n_bins),
        "ece_after": expected_calibration_error(y_true, after, n_bins),
        "loss_before": float(log_loss(y_true, before, labels=labels)),
        "loss_after": float(log_loss(y_true, after / after.sum(axis=1, keepdims=True), labels=labels)),
        "source": record["path"],
        "note": record.get("note"),
    }
    return summary, (before, summary["ece_before"], temperature)


def _write_predictions(path: Path, predictions: _Predictions, class_names: list[str]) -> None:
    """One row per image, so the misclassified ones can be found and looked at."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true_label", "predicted_label", "correct", *(f"p_{name}" for name in class_names)])
        rows = zip(predictions.paths, predictions.y_true, predictions.probabilities, strict=True)
        for rel, label, scores in rows:
            predicted = int(scores.argmax())
            writer.writerow(
                [rel, class_names[label], class_names[predicted], int(predicted == label)]
                + [f"{value:.6f}" for value in scores]
            )


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _calibration_line(calibration: dict | None) -> str:
    if calibration is None:
        return f"(no {CALIBRATION_FILE} for this model: probabilities as the network gives them)"
    return (
        f"calibrated with temperature {calibration['temperature']:.3g}: ECE {calibration['ece_before']:.3f} before, "
        f"{calibration['ece_after']:.3f} after; log loss {calibration['loss_before']:.3f} before "
        "(accuracy and AUC do not change)"
    )


def format_report(report: dict) -> str:
    """The evaluation as a plain-text table for the terminal."""
    names = report["class_names"]
    width = max(12, *(len(name) for name in names)) + 2
    data = report["data"]
    lines = [
        f"Evaluation of {report['model']['path']} ({report['model']['kind']}, {report['model']['image_size']} px, "
        f"{report['model']['resize_mode']}) on {report['count']} {data['subset']} images from {data['data_dir']}",
        "",
        f"{'class':<{width}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}{'AUC':>8}",
    ]
    for name in names:
        scores = report["per_class"][name]
        lines.append(
            f"{name:<{width}}{scores['precision']:>10.3f}{scores['recall']:>8.3f}{scores['f1']:>8.3f}"
            f"{scores['support']:>9d}{_number(report['roc_auc']['per_class'][name]):>8}"
        )
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        scores = report[key]
        lines.append(
            f"{label:<{width}}{scores['precision']:>10.3f}{scores['recall']:>8.3f}{scores['f1']:>8.3f}"
            f"{scores['support']:>9d}"
        )
    lines += [
        "",
        f"accuracy {report['accuracy']:.3f}   balanced accuracy {report['balanced_accuracy']:.3f}   "
        f"ROC-AUC {_number(report['auc'])}   ECE {report['ece']:.3f}   log loss {report['loss']:.3f}",
        _calibration_line(report["calibration"]),
        "",
        "Confusion matrix (rows: true class, columns: predicted class):",
    ]
    short = [name[:10] for name in names]
    lines.append(f"{'':<{width}}" + "".join(f"{name:>11}" for name in short))
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{count:>11d}" for count in row))
    binary = report["binary"]
    if binary:
        lines += ["", f"Positive class: {binary['positive_class']}"]
        header = f"{'':<36}{'threshold':>10}{'sensitivity':>13}{'specificity':>13}{'PPV':>8}{'NPV':>8}{'accuracy':>10}"
        lines.append(header)
        rows = [("default (0.5)", binary["default"])]
        point = report["operating_point"]
        if point:
            target = f" {point['target_sensitivity']:g}" if point.get("target_sensitivity") else ""
            rows.append((f"operating point ({point['method']}{target})", binary["operating_point"]))
        for label, entry in rows:
            lines.append(
                f"{label:<36}{entry['threshold']:>10.4f}{_number(entry['sensitivity']):>13}"
                f"{_number(entry['specificity']):>13}{_number(entry['precision']):>8}{_number(entry['npv']):>8}"
                f"{_number(entry['accuracy']):>10}"
            )
        if not point:
            lines.append("(no operating point stored: choose one with --choose-threshold youden|sensitivity:0.95)")
    if data["skipped"]:
        lines += ["", f"Skipped {len(data['skipped'])} unreadable image(s), listed in {REPORT_FILE}."]
    lines += ["", f"Report, predictions and figures: {report['output_dir']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `classifier evaluate` options."""
    parser = argparse.ArgumentParser(
        prog="classifier evaluate",
        description="Evaluate model.keras, a SavedModel or a .tflite file on a run's test split or a folder of "
        "labelled images: metrics JSON, per-image CSV, figures, and a table on the terminal.",
    )
    parser.add_argument("--model", default=None, help="model file or SavedModel folder (default: RUN_DIR/model.keras)")
    parser.add_argument("--run-dir", default=None, help="run folder: its test split, settings and operating point")
    parser.add_argument("--data-dir", default=None, help="folder with one subfolder per class (instead of the split)")
    parser.add_argument(
        "--subset", choices=("train", "val", "test"), default=None, help="which split to evaluate (default test)"
    )
    parser.add_argument("--output-dir", default=None, help="default: RUN_DIR/evaluation/<model name>")
    parser.add_argument(
        "--positive-class", default=None, help="two-class tasks: the positive class (default: 2nd line of labels.txt)"
    )
    parser.add_argument(
        "--choose-threshold",
        nargs="?",
        const="youden",
        default=None,
        metavar="METHOD",
        help="two-class tasks: choose the decision threshold on the validation split first and store it as "
        "operating_point.json beside the model; METHOD is youden (default) or sensitivity:T, e.g. sensitivity:0.95",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        metavar="T",
        help="shorthand for --choose-threshold sensitivity:T",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: runtime's)")
    parser.add_argument(
        "--resize-mode", choices=("stretch", "crop"), default=None, help="default: the run's data.resize_mode"
    )
    add_dicom_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`classifier evaluate`."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        method = args.choose_threshold
        if args.target_sensitivity is not None:
            if method not in (None, "youden") and not method.startswith("sensitivity"):
                raise UserError("pass either --choose-threshold METHOD or --target-sensitivity T, not both")
            method = f"sensitivity:{args.target_sensitivity}"
        report = evaluate(
            args.model,
            run_dir=args.run_dir,
            data_dir=args.data_dir,
            subset=args.subset,
            output_dir=args.output_dir,
            positive_class=args.positive_class,
            threshold_method=method,
            batch_size=args.batch_size,
            threads=args.threads,
            resize_mode=args.resize_mode,
            dicom_window=args.dicom_window,
            dicom_frames=args.dicom_frames,
        )
        # The command's result, data rather than progress: written out directly (see benchmark.main).
        sys.stdout.write((json.dumps(report, indent=2) if args.json else format_report(report)) + "\n")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
