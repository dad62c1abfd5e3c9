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
