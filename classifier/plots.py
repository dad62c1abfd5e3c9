"""Figures for people: training curves of a run, and the confusion matrix, ROC and reliability plots of evaluate.

Every function writes a PNG (matplotlib, Agg backend: no display needed) and returns its path.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from classifier.run import Run  # noqa: E402

DPI = 120
# (title, train column, validation column) of each panel of the training curves.
_PANELS = (
    ("Loss", "loss", "val_loss"),
    ("Accuracy", "accuracy", "val_accuracy"),
    ("ROC-AUC", "auc", "val_auc"),
    ("Learning rate", "learning_rate", None),
)


def save_figure(figure: plt.Figure, path: str | os.PathLike) -> Path:
    """Saves a figure as PNG and closes it (open figures would pile up in a long session)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def image_figure(
    images: list[np.ndarray] | np.ndarray,
    titles: list[str],
    columns: int = 4,
    colours: list[str] | None = None,
    heading: str = "",
) -> plt.Figure:
    """Lays out images (RGB, 0..255) in a grid, each with its title (in its colour, default black)."""
    count = len(images)
    columns = max(1, columns)
    rows = max(1, -(-count // columns))
    lines = max((title.count("\n") + 1 for title in titles), default=1)
    row_height = 2.1 + 0.2 * lines  # the picture and its title lines
    # Constrained layout keeps each row's titles clear of the pictures above (tight_layout did not, with imshow).
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(2.2 * columns, row_height * rows + 0.4 * bool(heading)),
        squeeze=False,
        layout="constrained",
    )
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            axis.imshow(np.clip(images[index], 0, 255).astype(np.uint8))
            axis.set_title(titles[index], fontsize=8, color=colours[index] if colours else "black")
    if heading:
        figure.suptitle(heading, fontsize=9)
    return figure


def _read_history(path: Path) -> list[dict[str, float]]:
    """history.csv rows as floats, one per epoch: a resumed run may have logged an epoch twice, the last wins."""
    by_epoch: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, text in row.items():
                try:
                    values[key] = float(text)
                except (TypeError, ValueError):
                    continue
            if "epoch" in values:
                by_epoch[int(values["epoch"])] = values
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _last_head_epoch(rows: list[dict]) -> int | None:
    """The last epoch (from 1) of phase 1, from history.csv's `phase` column; None when the column is absent."""
    head = [int(row["epoch"]) + 1 for row in rows if row.get("phase") == 1]
    return max(head) if head else None


def plot_training_curves(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Plots loss, accuracy, ROC-AUC and learning rate per epoch from a run's history.csv.

    The boundary between phase 1 (head only) and phase 2 (fine-tuning) is drawn when both phases have epochs in
    the history (its `phase` column). Epochs are numbered from 1, as training prints
    them.

    Args:
        run_dir: A run folder with history.csv.
        output: PNG path; default `run_dir/training_curves.png`.

    Returns:
        The PNG path.

    Raises:
        UserError: the run has no history.csv or it holds no epoch.
    """
    from classifier.errors import UserError

    run = Run(run_dir)
    history_path = run.history_path
    rows = _read_history(history_path) if history_path.is_file() else []
    if not rows:
        raise UserError(
            f"'{history_path}' is missing or empty: pass a run folder in which training finished at least one epoch"
        )
    epochs = np.array([row["epoch"] for row in rows]) + 1
    head_epochs = _last_head_epoch(rows)
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for axis, (title, train_key, val_key) in zip(axes.flat, _PANELS, strict=True):
        axis.set_title(title)
        for key, label, style in ((train_key, "train", "-o"), (val_key, "validation", "-s")):
            if key is None or not any(key in row for row in rows):
                continue
            values = np.array([row.get(key, np.nan) for row in rows])
            axis.plot(epochs, values, style, markersize=3, label=label)
        if train_key == "learning_rate":
            positive = [row["learning_rate"] for row in rows if row.get("learning_rate", 0) > 0]
            if positive and max(positive) / min(positive) > 20:
                axis.set_yscale("log")  # phase 2 runs at a tenth of phase 1's rate: a log axis shows both
        if head_epochs and epochs.min() <= head_epochs < epochs.max():
            axis.axvline(head_epochs + 0.5, color="grey", linestyle="--", linewidth=1)
            axis.text(
                head_epochs + 0.5, 0.98, " fine-tuning →", transform=axis.get_xaxis_transform(), va="top", fontsize=8
            )
        if axis.get_legend_handles_labels()[0] and train_key != "learning_rate":
            axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"Training curves: {run.root.resolve().name}")
    figure.tight_layout()
    return save_figure(figure, Path(output) if output is not None else run.training_curves_path)


def plot_confusion_matrices(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], counts_path: Path, normalized_path: Path, title: str
) -> tuple[Path, Path]:
    """Writes the confusion matrix as counts and normalised per true class (each row sums to 1).

    Returns:
        (counts PNG, normalised PNG).
    """
    from classifier.callbacks import confusion_figure  # the one training logs to TensorBoard

    counts = save_figure(confusion_figure(y_true, y_pred, class_names, f"{title} (counts)"), counts_path)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(class_names))),
        display_labels=class_names,
        normalize="true",
        values_format=".2f",
        cmap="Blues",
        colorbar=False,
        xticks_rotation=45,
        ax=axis,
    )
    axis.set_title(f"{title} (share of each true class)")
    figure.tight_layout()
    return counts, save_figure(figure, normalized_path)


def plot_roc(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    path: Path,
    title: str,
    positive_index: int = 1,
    operating_points: dict[str, dict] | None = None,
) -> Path:
    """ROC curves: the positive class for a binary task, one-vs-rest per class otherwise.

    Args:
        y_true: Integer labels [N].
        probabilities: [N, C].
        class_names: Names in label order.
        path: PNG path.
        title: Figure title.
        positive_index: Binary tasks: the positive class.
        operating_points: Binary tasks: {legend name: `binary_metrics` result} drawn as points on the curve.

    Returns:
        The PNG path.
    """
    y_true = np.asarray(y_true)
    figure, axis = plt.subplots(figsize=(6, 6))
    classes = [positive_index] if len(class_names) == 2 else range(len(class_names))
    for index in classes:
        positive = y_true == index
        if 0 < positive.sum() < len(y_true):  # the curve is undefined for a class with no (or only) examples
            RocCurveDisplay.from_predictions(positive, probabilities[:, index], name=class_names[index], ax=axis)
    for name, point in (operating_points or {}).items():
        if point and point["sensitivity"] is not None and point["specificity"] is not None:
            axis.plot(
                1 - point["specificity"],
                point["sensitivity"],
                "o",
                markersize=8,
                label=f"{name}: threshold {point['threshold']:.3f}",
            )
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    axis.set_xlabel("1 - specificity (false positive rate)")
    axis.set_ylabel("sensitivity (true positive rate)")
    axis.set_title(title if len(class_names) == 2 else f"{title}\none-vs-rest per class")
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_reliability(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    path: Path,
    title: str,
    ece: float,
    positive_index: int = 1,
    n_bins: int = 10,
    before: tuple[np.ndarray, float, float] | None = None,
) -> Path:
    """Reliability diagram: how often the model is right when it says "p".

    The left panel is the top-label view that the ECE summarises (confidence of the predicted class against how
    often that prediction is right); for a binary task a right panel shows the positive class's probability
    against the observed share of positives. Bars under each curve count the predictions in each bin.

    Args:
        before: (probabilities before temperature scaling, their ECE, the temperature): drawn dashed beside the
            calibrated curve, with their counts as an outline over the bars.

    Returns:
        The PNG path.
    """
    y_true = np.asarray(y_true)

    def views(scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(outcome, score) of each panel."""
        scores = np.asarray(scores, dtype=np.float64)
        result = [(scores.argmax(axis=1) == y_true, scores.max(axis=1))]
        if len(class_names) == 2:
            result.append((y_true == positive_index, scores[:, positive_index]))
        return result

    labels = [("top-label", "confidence of the predicted class", "share correct")]
    if len(class_names) == 2:
        positive = class_names[positive_index]
        labels.append((f"P({positive})", f"predicted probability of '{positive}'", f"observed share of '{positive}'"))
    after_views = views(probabilities)
    before_views = views(before[0]) if before is not None else [None] * len(labels)
    figure, axes = plt.subplots(
        2, len(labels), figsize=(5.5 * len(labels), 6.5), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}
    )
    edges = np.linspace(0, 1, n_bins + 1)
    for column, ((name, xlabel, ylabel), (outcome, score), earlier) in enumerate(
        zip(labels, after_views, before_views, strict=True)
    ):
        axis, histogram = axes[0, column], axes[1, column]
        if earlier is not None and len(earlier[0]):
            observed, predicted = calibration_curve(earlier[0], earlier[1], n_bins=n_bins, strategy="uniform")
            axis.plot(predicted, observed, "o--", color="tab:orange", alpha=0.8, label=f"{name}, before (T = 1)")
            histogram.hist(earlier[1], bins=edges, histtype="step", color="tab:orange", linewidth=1.5)
        if len(outcome):
            observed, predicted = calibration_curve(outcome, score, n_bins=n_bins, strategy="uniform")
            label = name if before is None else f"{name}, calibrated (T = {before[2]:.3g})"
            axis.plot(predicted, observed, "s-", color="tab:blue", label=label)
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
        axis.set_xlim(0, 1)
        axis.set_ylim(-0.02, 1.02)  # points at exactly 0 or 1 (a perfect bin) stay visible
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8, loc="upper left")
        axis.grid(alpha=0.3)
        histogram.hist(score, bins=edges, color="tab:blue", alpha=0.6)
        histogram.set_xlim(0, 1)
        histogram.set_xlabel(xlabel)
        histogram.set_ylabel("images")
    ece_text = f"ECE {ece:.3f} ({n_bins} bins)"
    if before is not None:
        ece_text = f"ECE {ece:.3f}, before temperature scaling {before[1]:.3f} ({n_bins} bins)"
    axes[0, 0].set_title(f"{title}\n{ece_text}")
    if len(labels) > 1:
        axes[0, 1].set_title("positive class")
    figure.tight_layout()
    return save_figure(figure, path)
