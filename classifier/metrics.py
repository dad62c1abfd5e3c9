"""Classification metrics from labels and predicted probabilities, all computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    roc_auc_score,
)


def macro_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float | None:
    """ROC-AUC: binary on the positive class, else macro one-vs-rest; None when a class is missing from y_true."""
    num_classes = probabilities.shape[1]
    if len(np.unique(y_true)) < num_classes:
        return None  # AUC is undefined for a class with no positive example.
    if num_classes == 2:
        return float(roc_auc_score(y_true, probabilities[:, 1]))
    totals = probabilities.sum(axis=1, keepdims=True)
    if not np.allclose(totals, 1):
        # An int8 model's dequantized outputs sum to 1 only within their rounding (steps of 1/256), and
        # scikit-learn's multi-class AUC refuses scores that do not sum to 1.
        probabilities = probabilities / np.where(totals > 0, totals, 1)
    return float(roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro", labels=range(num_classes)))


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Summarises predictions for a split.

    Args:
        y_true: Integer labels, shape [N].
        probabilities: Predicted class probabilities, shape [N, C].
        class_names: Names in label order.

    Returns:
        loss (cross-entropy), accuracy, balanced_accuracy, auc (macro, or None), per_class
        {name: {precision, recall, f1, support}}, macro_avg, weighted_avg, confusion_matrix (counts), count.
    """
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0
    )

    def scores(entry: dict) -> dict:
        return {
            "precision": entry["precision"],
            "recall": entry["recall"],
            "f1": entry["f1-score"],
            "support": int(entry["support"]),
        }

    return {
        "count": int(len(y_true)),
        # float32 softmax rows sum to 1 only within ~1e-7; scikit-learn insists on exact sums.
        "loss": float(log_loss(y_true, probabilities / probabilities.sum(axis=1, keepdims=True), labels=labels)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "auc": macro_auc(y_true, probabilities),
        "per_class": {name: scores(report[name]) for name in class_names},
        "macro_avg": scores(report["macro avg"]),
        "weighted_avg": scores(report["weighted avg"]),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = 10) -> float:
    """Top-label expected calibration error (Guo et al., 2017, "On Calibration of Modern Neural Networks").

    scikit-learn (1.9) has `calibration_curve` but no ECE, so it is written here: the predictions are put into
    `n_bins` equal-width bins by their confidence (the largest probability); ECE is the average gap between a bin's
    accuracy and its mean confidence, weighted by the share of predictions in the bin. 0 = perfectly calibrated.

    Args:
        y_true: Integer labels, shape [N].
        probabilities: Predicted class probabilities, shape [N, C].
        n_bins: Number of equal-width confidence bins on [0, 1].

    Returns:
        The ECE in [0, 1] (0.0 for an empty set).
    """
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(y_true) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(np.float64)
    # Bins are (lo, hi] with the first one closed, as in Guo et al.; a confidence of exactly 1.0 lands in the last.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    error = 0.0
    for index in np.unique(bins):
        members = bins == index
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def per_class_auc(y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC of every class; None for a class with no positive (or no negative) example."""
    y_true = np.asarray(y_true)
    result: dict[str, float | None] = {}
    for index, name in enumerate(class_names):
        positive = y_true == index
        defined = 0 < positive.sum() < len(y_true)
        result[name] = float(roc_auc_score(positive, probabilities[:, index])) if defined else None
    return result


def binary_metrics(y_true: np.ndarray, p_positive: np.ndarray, threshold: float, positive_index: int = 1) -> dict:
    """The numbers a clinician or an inspector reads off a yes/no decision at one threshold.

    A case is called positive when its positive-class probability is >= `threshold`.

    Args:
        y_true: Integer labels, shape [N] (binary task: 0 and 1).
        p_positive: Probability of the positive class, shape [N].
        threshold: Decision threshold on `p_positive`.
        positive_index: The label that counts as positive (a finding, a defect).

    Returns:
        {threshold, sensitivity (recall of positives), specificity (recall of negatives), precision (PPV), npv,
        f1, accuracy, balanced_accuracy, tp, fp, tn, fn}. A rate whose denominator is 0 is None.
    """
    positive = np.asarray(y_true) == positive_index
    called = np.asarray(p_positive, dtype=np.float64) >= threshold
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(positive, called, labels=[False, True]).ravel())

    def ratio(numerator: int, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    precision = ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    balanced = None if sensitivity is None or specificity is None else (sensitivity + specificity) / 2
    return {
        "threshold": float(threshold),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "npv": ratio(tn, tn + fn),
        "f1": f1,
        "accuracy": ratio(tp + tn, len(positive)),
        "balanced_accuracy": balanced,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def evaluation_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    *,
    positive_index: int = 1,
    threshold: float | None = None,
    n_bins: int = 10,
) -> dict:
    """Everything `classifier evaluate` reports about a set of predictions.

    Args:
        y_true: Integer labels, shape [N].
        probabilities: Predicted class probabilities, shape [N, C].
        class_names: Names in label order.
        positive_index: Binary tasks only: the label that counts as positive.
        threshold: Binary tasks only: a chosen decision threshold to report beside the default 0.5.
        n_bins: Confidence bins of the expected calibration error.

    Returns:
        The keys of `classification_metrics` (predictions by argmax) plus confusion_matrix_normalized (rows = true
        class, each row sums to 1; a class with no images has a row of 0), roc_auc {"average", "per_class"}, ece,
        ece_bins, and binary: None for more than two classes, else {positive_class, positive_index, default (the
        `binary_metrics` at 0.5), operating_point (the same at `threshold`, or None)}.
    """
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    result = classification_metrics(y_true, probabilities, class_names)
    counts = np.asarray(result["confusion_matrix"], dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    result["confusion_matrix_normalized"] = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0).tolist()
    result["roc_auc"] = {"average": result["auc"], "per_class": per_class_auc(y_true, probabilities, class_names)}
    result["ece"] = expected_calibration_error(y_true, probabilities, n_bins)
    result["ece_bins"] = n_bins
    result["binary"] = None
    if len(class_names) == 2:
        p_positive = probabilities[:, positive_index]
        result["binary"] = {
            "positive_class": class_names[positive_index],
            "positive_index": positive_index,
            "default": binary_metrics(y_true, p_positive, 0.5, positive_index),
            "operating_point": None
            if threshold is None
            else binary_metrics(y_true, p_positive, threshold, positive_index),
        }
    return result
