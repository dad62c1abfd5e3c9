"""The decision threshold of a binary classifier, chosen on the validation split and stored with the run.

A softmax model calls a case positive above 0.5 by default, which is rarely what a clinic or an inspection line
wants: missing a finding or a defect usually costs more than a second look. The threshold is chosen on the
VALIDATION split (never the test split, which must stay an unbiased estimate), either by Youden's J (the point of
the ROC curve farthest above the diagonal: sensitivity + specificity - 1 is largest) or as the highest threshold
that still reaches a target sensitivity (the best specificity at that sensitivity).

It is stored as `RUN/operating_point.json`; export copies it into `export/`, and evaluate and predict use it when
it is there. A case is called positive when its positive-class probability is >= the threshold.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from classifier import atomic
from classifier.errors import UserError
from classifier.log import STDERR
from classifier.run import OPERATING_POINT_FILE, Run, find_beside_model, read_record

log = logging.getLogger(__name__)

FILE_NAME = OPERATING_POINT_FILE
METHODS = ("youden", "sensitivity")
# Keys every operating_point.json has (the file may carry more).
KEYS = (
    "threshold",
    "method",
    "target_sensitivity",
    "positive_class",
    "positive_index",
    "class_names",
    "subset",
    "count",
    "positives",
    "sensitivity",
    "specificity",
    "youden_j",
)


def parse_method(text: str) -> tuple[str, float | None]:
    """Parses `youden` or `sensitivity:0.95` (the `--choose-threshold` value) into (method, target sensitivity).

    Raises:
        UserError: anything else, or a target outside (0, 1].
    """
    method, _, value = text.strip().partition(":")
    if method == "youden" and not value:
        return "youden", None
    if method == "sensitivity":
        try:
            target = float(value)
        except ValueError:
            target = None
        if target is not None and 0 < target <= 1:
            return "sensitivity", target
    raise UserError(
        f"threshold method '{text}' is unknown: use 'youden' or 'sensitivity:T' with a target sensitivity T in (0, 1], "
        "e.g. sensitivity:0.95"
    )


def choose_operating_point(
    y_true: np.ndarray, p_positive: np.ndarray, method: str = "youden", target_sensitivity: float | None = None
) -> dict:
    """Chooses a decision threshold from labelled scores.

    Args:
        y_true: 1 for a positive case, 0 for a negative one, shape [N]; both must occur.
        p_positive: Positive-class probability of each case, shape [N].
        method: "youden" (maximise sensitivity + specificity - 1) or "sensitivity" (the highest threshold whose
            sensitivity is >= `target_sensitivity`, i.e. the best specificity at that sensitivity).
        target_sensitivity: Required for method "sensitivity", in (0, 1].

    Returns:
        {threshold, method, target_sensitivity, sensitivity, specificity, youden_j, count, positives}: the
        sensitivity and specificity are those of `p_positive >= threshold` on these cases.

    Raises:
        UserError: unknown method, missing or out-of-range target, or only one class among the cases.
    """
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(p_positive, dtype=np.float64)
    if method not in METHODS:
        raise UserError(f"threshold method '{method}' is unknown: use one of {', '.join(METHODS)}")
    if method == "sensitivity" and (target_sensitivity is None or not 0 < target_sensitivity <= 1):
        raise UserError(
            f"target sensitivity {target_sensitivity!r} is not in (0, 1]: pass e.g. --target-sensitivity 0.95"
        )
    positives = int(y_true.sum())
    if positives == 0 or positives == len(y_true):
        raise UserError(
            f"the validation split has {positives} positive and {len(y_true) - positives} negative images: a "
            "threshold needs both; train with a larger --set data.val_fraction or on more images"
        )
    # Every distinct score is a candidate (drop_intermediate=False); index 0 is scikit-learn's "call nothing
    # positive" point (threshold inf), which is never a useful operating point.
    fpr, tpr, thresholds = roc_curve(y_true, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    # tpr and fpr only grow as the threshold falls: the first point that reaches the target has the lowest fpr.
    reaches_target = tpr >= (target_sensitivity or 0.0) - 1e-12
    index = int(np.argmax(tpr - fpr if method == "youden" else reaches_target))
    # Put the threshold halfway down to the next lower score: the validation decisions stay the same, but a
    # case scored exactly at the chosen value, or a few 1e-6 lower by another export format, is not flipped.
    threshold = thresholds[index]
    if index + 1 < len(thresholds):
        threshold = (thresholds[index] + thresholds[index + 1]) / 2
    called = scores >= threshold
    sensitivity = float(called[y_true].mean())
    specificity = float((~called[~y_true]).mean())
    return {
        "threshold": float(threshold),
        "method": method,
        "target_sensitivity": target_sensitivity if method == "sensitivity" else None,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "youden_j": sensitivity + specificity - 1,
        "count": int(len(y_true)),
        "positives": positives,
    }


def resolve_positive_class(class_names: list[str], positive_class: str | None = None) -> int:
    """The label index of the positive class: `positive_class` by name, else 1 (the second line of labels.txt).

    Raises:
        UserError: the task is not binary, or the name is not one of the classes.
    """
    if len(class_names) != 2:
        raise UserError(
            f"operating points are for two-class tasks; this model has {len(class_names)} classes "
            f"({', '.join(class_names)}): drop --choose-threshold / --positive-class"
        )
    if positive_class is None:
        return 1
    if positive_class not in class_names:
        raise UserError(
            f"--positive-class '{positive_class}' is not a class of this model: use one of {', '.join(class_names)}"
        )
    return class_names.index(positive_class)


def operating_point_for(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    *,
    method: str = "youden",
    target_sensitivity: float | None = None,
    positive_class: str | None = None,
    subset: str = "val",
) -> dict:
    """Chooses the operating point of a binary model from its validation predictions (what training calls).

    Args:
        labels: Integer labels of the validation images, shape [N].
        probabilities: The model's probabilities on them, shape [N, 2].
        class_names: The two class names in label order.
        method: "youden" or "sensitivity".
        target_sensitivity: For method "sensitivity".
        positive_class: Name of the positive class; default the second class (label 1).
        subset: Which split the predictions come from (recorded in the file).

    Returns:
        The `choose_operating_point` result plus positive_class, positive_index, class_names, subset, created:
        the content of `operating_point.json`.

    Raises:
        UserError: see `resolve_positive_class` and `choose_operating_point`.
    """
    positive_index = resolve_positive_class(class_names, positive_class)
    probabilities = np.asarray(probabilities)
    point = choose_operating_point(
        np.asarray(labels) == positive_index, probabilities[:, positive_index], method, target_sensitivity
    )
    point.update(
        positive_class=class_names[positive_index],
        positive_index=positive_index,
        class_names=list(class_names),
        subset=subset,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return point


def write_operating_point(run_dir: str | os.PathLike, point: dict) -> Path:
    """Writes `point` (from `operating_point_for`) as `run_dir/operating_point.json`, atomically; returns the path."""
    missing = [key for key in KEYS if key not in point]
    assert not missing, f"operating point lacks {missing}"
    path = Run(run_dir).operating_point_path
    atomic.write_text(path, json.dumps(point, indent=2) + "\n")
    return path


def read_operating_point(path_or_dir: str | os.PathLike) -> dict | None:
    """Reads an operating point.

    Args:
        path_or_dir: An `operating_point.json`, or a folder holding one (a run folder or its `export/`).

    Returns:
        The stored dict, or None when there is none.

    Raises:
        UserError: the file exists but is not a valid operating point.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = Run(path).operating_point_path

    def convert(point: dict) -> None:
        point["threshold"] = float(point["threshold"])
        point["positive_index"] = int(point["positive_index"])
        if not 0 <= point["threshold"] <= 1:  # also NaN: a probability threshold outside 0..1 decides nothing
            raise ValueError(f"threshold {point['threshold']} is not a probability")
        if point["positive_index"] not in (0, 1):
            raise ValueError(f"positive_index {point['positive_index']} is not 0 or 1")

    fix = "delete it, or choose the threshold again with `classifier evaluate --run-dir RUN --choose-threshold youden`"
    return read_record(path, KEYS, convert, "operating point", fix)


def find_operating_point(model_path: str | os.PathLike) -> dict | None:
    """The operating point that belongs to a model file: beside it (export/) or in the run folder above it."""
    return find_beside_model(model_path, lambda run: read_operating_point(run.operating_point_path))


def decision_rule(
    predictor, labels: list[str], threshold: float | None = None, use_operating_point: bool = True
) -> dict | None:
    """The threshold rule for a two-class model: from --threshold, else the stored operating point; else None.

    Returns:
        None (most probable class) or {"threshold", "positive_class", "positive_index", "source"}.

    Raises:
        UserError: --threshold given for a model with more than two classes, or outside [0, 1].
    """
    if threshold is not None:
        if len(labels) != 2:
            raise UserError(f"--threshold applies to two-class models; this one has {len(labels)} classes")
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {threshold} is not a probability: give a value in [0, 1]")
        return {"threshold": threshold, "positive_class": labels[1], "positive_index": 1, "source": "--threshold"}
    if not use_operating_point or len(labels) != 2:
        return None
    point = find_operating_point(predictor.path)
    if point is None:
        return None
    if list(point["class_names"]) != labels:
        log.info(
            f"note: ignoring {point['path']}: it is for classes {point['class_names']}, the model has {labels}",
            extra=STDERR,
        )
        return None
    return {
        "threshold": point["threshold"],
        "positive_class": point["positive_class"],
        "positive_index": point["positive_index"],
        "source": point["path"],
    }


def decision_function(rule: dict | None) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities [N, C] -> the class indices `prediction_rows` reports as `label` under `rule`."""
    if rule is None:
        return lambda probabilities: np.asarray(probabilities).argmax(axis=-1)
    positive, threshold = rule["positive_index"], rule["threshold"]
    return lambda probabilities: np.where(np.asarray(probabilities)[:, positive] >= threshold, positive, 1 - positive)
