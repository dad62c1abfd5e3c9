"""Metric values against scikit-learn and hand computations; operating points; figures (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    roc_curve,
)

from classifier import operating_point, plots
from classifier.errors import UserError
from classifier.metrics import (
    binary_metrics,
    classification_metrics,
    evaluation_metrics,
    expected_calibration_error,
)

CLASSES = ["benign", "malignant", "normal"]


def hand_made_predictions(seed: int = 0, count: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, a model that is right about 70 % of the time, with softmax-like rows."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, count)
    logits = rng.normal(0, 1, (count, 3))
    logits[np.arange(count), y_true] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities.astype(np.float32)


def assert_valid_png(path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200


def pairwise_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC-AUC as the share of (positive, negative) pairs ranked right, ties counting half (Mann-Whitney)."""
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(wins / (len(positive) * len(negative)))


def test_metrics_of_a_small_case_worked_out_by_hand():
    # Nine images, three per class; the predictions make this confusion matrix (rows true, columns predicted):
    #   benign     3 0 0      recall 1,   precision 3/5, F1 0.75
    #   malignant  1 2 0      recall 2/3, precision 2/3, F1 2/3
    #   normal     1 1 1      recall 1/3, precision 1,   F1 0.5
    # (evaluation_metrics uses scikit-learn; these numbers do not.)
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 0, 1])
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(0.05, 0.3, (9, 3))
    probabilities[np.arange(9), y_pred] = rng.uniform(0.5, 0.9, 9)  # the predicted class is the most probable
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    result = evaluation_metrics(y_true, probabilities, CLASSES)
    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["balanced_accuracy"] == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)
    expected = {"benign": (3 / 5, 1, 0.75), "malignant": (2 / 3, 2 / 3, 2 / 3), "normal": (1, 1 / 3, 0.5)}
    for name, (precision, recall, f1) in expected.items():
        scores = result["per_class"][name]
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((precision, recall, f1))
        assert scores["support"] == 3
    assert result["macro_avg"]["f1"] == pytest.approx((0.75 + 2 / 3 + 0.5) / 3)
    assert result["weighted_avg"]["precision"] == pytest.approx((3 / 5 + 2 / 3 + 1) / 3)  # equal supports
    assert result["confusion_matrix"] == [[3, 0, 0], [1, 2, 0], [1, 1, 1]]
    np.testing.assert_allclose(result["confusion_matrix_normalized"], [[1, 0, 0], [1 / 3, 2 / 3, 0], [1 / 3] * 3])
    aucs = [pairwise_auc(probabilities[y_true == k, k], probabilities[y_true != k, k]) for k in range(3)]
    for name, auc in zip(CLASSES, aucs, strict=True):
        assert result["roc_auc"]["per_class"][name] == pytest.approx(auc)
    assert result["roc_auc"]["average"] == pytest.approx(np.mean(aucs))  # one-vs-rest, macro
    assert result["binary"] is None
    json.dumps(result)  # plain Python types only


def test_int8_probabilities_that_do_not_sum_to_1_still_get_their_auc():
    # An int8 model's dequantized outputs come in steps of 1/256 and sum to 1 only within that rounding;
    # `classifier evaluate` on such a three-class .tflite ended in scikit-learn's ValueError (bench/hostile_sweep.py).
    y_true, probabilities = hand_made_predictions()
    quantized = np.floor(probabilities * 256) / 256
    assert not np.allclose(quantized.sum(axis=1), 1)
    result = classification_metrics(y_true, quantized, CLASSES)
    rows = quantized / quantized.sum(axis=1, keepdims=True)  # what the scores mean: probabilities summing to 1
    aucs = [pairwise_auc(rows[y_true == k, k], rows[y_true != k, k]) for k in range(3)]
    assert result["auc"] == pytest.approx(np.mean(aucs))


def test_expected_calibration_error_by_hand():
    # Confidences 0.95, 0.9 (bin 10, (0.9, 1.0]: 0.95 only; 0.9 falls in bin 9, (0.8, 0.9]), 0.85, 0.6, 0.55.
    probabilities = np.array([[0.95, 0.05], [0.1, 0.9], [0.85, 0.15], [0.4, 0.6], [0.55, 0.45]])
    y_true = np.array([0, 1, 1, 1, 1])  # right, right, wrong, right, wrong
    # bin (0.9, 1]: {0.95 right}        gap |1 - 0.95|   = 0.05,  weight 1/5
    # bin (0.8, 0.9]: {0.9 right, 0.85 wrong}  gap |0.5 - 0.875| = 0.375, weight 2/5
    # bin (0.5, 0.6]: {0.6 right, 0.55 wrong}  gap |0.5 - 0.575| = 0.075, weight 2/5
    expected = 0.05 / 5 + 2 * 0.375 / 5 + 2 * 0.075 / 5
    assert expected_calibration_error(y_true, probabilities, n_bins=10) == pytest.approx(expected)
    confident_and_right = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error([0, 1, 2, 1], confident_and_right) == pytest.approx(0.0)


def test_binary_metrics_by_hand():
    y_true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p_positive = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.2, 0.1, 0.1, 0.05, 0.35])
    at_half = binary_metrics(y_true, p_positive, 0.5)
    assert (at_half["tp"], at_half["fn"], at_half["fp"], at_half["tn"]) == (2, 2, 1, 5)
    assert at_half["sensitivity"] == pytest.approx(2 / 4)
    assert at_half["specificity"] == pytest.approx(5 / 6)
    assert at_half["precision"] == pytest.approx(2 / 3)
    assert at_half["npv"] == pytest.approx(5 / 7)
    lower = binary_metrics(y_true, p_positive, 0.3)  # >= 0.3 is positive
    assert (lower["tp"], lower["fp"]) == (4, 2) and lower["sensitivity"] == 1.0
    probabilities = np.stack([1 - p_positive, p_positive], axis=1)
    result = evaluation_metrics(y_true, probabilities, ["normal", "finding"], threshold=0.3)
    assert result["binary"]["positive_class"] == "finding"
    assert result["binary"]["default"] == at_half
    assert result["binary"]["operating_point"]["threshold"] == 0.3
    # The other class as positive: sensitivity and specificity swap.
    flipped = evaluation_metrics(y_true, probabilities, ["normal", "finding"], positive_index=0)["binary"]["default"]
    assert (flipped["sensitivity"], flipped["specificity"]) == pytest.approx(
        (at_half["specificity"], at_half["sensitivity"])
    )


def overlapping_scores(seed: int = 1, count: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.random(count) < 0.3
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, count) + 1.2 * y_true)))
    return y_true.astype(int), scores


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_for_target_sensitivity_reaches_it_with_best_specificity(target):
    y_true, scores = overlapping_scores()
    point = operating_point.choose_operating_point(y_true, scores, "sensitivity", target)
    called = scores >= point["threshold"]
    sensitivity = called[y_true == 1].mean()
    specificity = (~called[y_true == 0]).mean()
    assert sensitivity >= target
    assert (point["sensitivity"], point["specificity"]) == pytest.approx((sensitivity, specificity))
    # No threshold with the required sensitivity has a better specificity.
    best = max(
        (~(scores[y_true == 0] >= t)).mean() for t in np.unique(scores) if (scores[y_true == 1] >= t).mean() >= target
    )
    assert specificity == pytest.approx(best)
    assert specificity < 1.0  # the classes overlap: the test is not trivial


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    y_true, scores = overlapping_scores(seed=2)
    point = operating_point.choose_operating_point(y_true, scores)
    fpr, tpr, _ = roc_curve(y_true, scores)
    assert point["youden_j"] == pytest.approx(np.max(tpr - fpr))
    assert point["method"] == "youden" and point["target_sensitivity"] is None
    assert 0 < point["threshold"] < 1


def test_operating_point_errors_name_the_fix():
    with pytest.raises(UserError, match="both"):
        operating_point.choose_operating_point([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(UserError, match="sensitivity:0.95"):
        operating_point.parse_method("sensitive:0.95")
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        operating_point.parse_method("sensitivity:1.5")
    assert operating_point.parse_method("sensitivity:0.9") == ("sensitivity", 0.9)
    with pytest.raises(UserError, match="benign, malignant, normal"):
        operating_point.resolve_positive_class(CLASSES)
    with pytest.raises(UserError, match="cat, dog"):
        operating_point.resolve_positive_class(["cat", "dog"], "bird")


@pytest.mark.parametrize("change", [{"threshold": 5}, {"threshold": float("nan")}, {"positive_index": 2}])
def test_an_operating_point_outside_its_range_is_refused_naming_the_file(tmp_path, change):
    """Found by bench/hostile_sweep.py: a threshold of 5 (or NaN) in operating_point.json was used, calling every
    image negative."""
    y_true, scores = overlapping_scores(seed=3)
    point = operating_point.operating_point_for(y_true, np.stack([1 - scores, scores], axis=1), ["ok", "defect"])
    path = operating_point.write_operating_point(tmp_path, point)
    record = json.loads(path.read_text())
    record.update(change)
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="is not a valid operating point") as caught:
        operating_point.read_operating_point(tmp_path)
    assert str(path) in str(caught.value)


def test_operating_point_file_round_trip(tmp_path):
    y_true, scores = overlapping_scores(seed=3)
    probabilities = np.stack([1 - scores, scores], axis=1)
    point = operating_point.operating_point_for(
        y_true, probabilities, ["ok", "defect"], method="sensitivity", target_sensitivity=0.9
    )
    assert point["positive_class"] == "defect" and point["positive_index"] == 1
    path = operating_point.write_operating_point(tmp_path, point)
    assert path == tmp_path / "operating_point.json"
    read = operating_point.read_operating_point(tmp_path)
    assert read["threshold"] == point["threshold"] and read["path"] == str(path)
    export = tmp_path / "export"
    export.mkdir()
    assert operating_point.find_operating_point(export / "model_int8.tflite")["threshold"] == point["threshold"]
    assert operating_point.read_operating_point(tmp_path / "elsewhere") is None
    path.write_text('{"threshold": 0.4}')
    with pytest.raises(UserError, match="--choose-threshold"):
        operating_point.read_operating_point(tmp_path)
    # Positive class given by name.
    named = operating_point.operating_point_for(
        y_true == 0, probabilities[:, ::-1], ["defect", "ok"], positive_class="ok"
    )
    assert named["positive_index"] == 1


def test_training_curves_png(tmp_path):
    rows = ["epoch,accuracy,auc,learning_rate,loss,phase,val_accuracy,val_auc,val_loss"]
    for epoch in range(6):
        lr, phase = (1e-3, 1) if epoch < 3 else (1e-4, 2)
        rows.append(
            f"{epoch},{0.5 + epoch / 20},{0.6 + epoch / 20},{lr},{1 - epoch / 10},{phase},{0.5 + epoch / 25},0.7,0.9"
        )
    rows.append("3,0.66,0.76,0.0001,0.69,2,0.62,0.7,0.9")  # a resumed run logged epoch 3 twice
    (tmp_path / "history.csv").write_text("\n".join(rows) + "\n")
    path = plots.plot_training_curves(tmp_path)
    assert path == tmp_path / "training_curves.png"
    assert_valid_png(path)
    history = plots._read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4, 5]
    assert plots._last_head_epoch(history) == 3  # the phase boundary is drawn after the third epoch
    with pytest.raises(UserError, match="history.csv"):
        plots.plot_training_curves(tmp_path / "missing")


def test_evaluation_figures_are_valid_pngs(tmp_path):
    y_true, probabilities = hand_made_predictions()
    y_pred = probabilities.argmax(axis=1)
    counts, normalized = plots.plot_confusion_matrices(
        y_true, y_pred, CLASSES, tmp_path / "cm.png", tmp_path / "cm_norm.png", "test"
    )
    roc = plots.plot_roc(y_true, probabilities, CLASSES, tmp_path / "roc.png", "test")
    reliability = plots.plot_reliability(y_true, probabilities, CLASSES, tmp_path / "rel.png", "test", 0.1)
    binary_true, scores = overlapping_scores()
    binary = np.stack([1 - scores, scores], axis=1)
    point = binary_metrics(binary_true, scores, 0.3)
    roc2 = plots.plot_roc(binary_true, binary, ["ok", "defect"], tmp_path / "roc2.png", "t", 1, {"chosen": point})
    rel2 = plots.plot_reliability(binary_true, binary, ["ok", "defect"], tmp_path / "rel2.png", "t", 0.05)
    for path in (counts, normalized, roc, reliability, roc2, rel2):
        assert_valid_png(path)
