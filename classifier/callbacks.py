"""Callbacks that make a run watchable in TensorBoard and safe to interrupt.

Keras' own callbacks do what they can (EarlyStopping, CSVLogger); the ones here add what they lack: epoch scalars
on one axis across both phases, the learning rate in `history.csv`, images (augmented samples, the final
confusion matrix, Grad-CAM heatmaps of validation images), the phase and the hparams of the run. The checkpoints
are `classifier.checkpoints`.

Every summary of one TensorBoard run folder (`logs/train`, `logs/validation`) goes through one writer per process
(`summary_writer`), so a finished run has one event file per folder, not one per phase or per image.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")  # headless machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # noqa: E402
from tensorboard.plugins.hparams import api as hp  # noqa: E402

_WRITERS: dict[Path, tf.summary.SummaryWriter] = {}


def summary_writer(folder: Path) -> tf.summary.SummaryWriter:
    """The one summary writer of a TensorBoard run folder in this process (each new writer starts a new file)."""
    folder = Path(folder).resolve()
    if folder not in _WRITERS:
        _WRITERS[folder] = tf.summary.create_file_writer(str(folder))
    return _WRITERS[folder]


def close_summary_writers(log_dir: Path) -> None:
    """Closes (and so flushes) the writers of every run folder under `log_dir`."""
    log_dir = Path(log_dir).resolve()
    for folder in [folder for folder in _WRITERS if folder == log_dir or log_dir in folder.parents]:
        _WRITERS.pop(folder).close()


def figure_to_image(figure: plt.Figure) -> tf.Tensor:
    """Renders a matplotlib figure to a `[1, H, W, 4]` uint8 tensor for `tf.summary.image`, and closes it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return tf.expand_dims(tf.image.decode_png(buffer.getvalue(), channels=4), 0)


def image_grid(
    images: np.ndarray, titles: list[str], columns: int = 4, colours: list[str] | None = None, heading: str = ""
) -> plt.Figure:
    """Lays out up to 16 images (0..255) with titles (in `colours`, default black) and a heading in a grid."""
    from classifier.plots import image_figure

    return image_figure(images[:16], titles[:16], columns, colours[:16] if colours else None, heading)


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], title: str) -> plt.Figure:
    """Plots a confusion matrix (counts) with scikit-learn's display."""
    matrix = confusion_matrix(y_true, y_pred, labels=range(len(class_names)))
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    axis.set_title(title)
    figure.tight_layout()
    return figure


class LearningRateLogger(keras.callbacks.Callback):
    """Adds each epoch's mean learning rate to its logs (and so to history.csv and TensorBoard).

    The mean over the epoch's steps, not the value at its end: with a schedule that decays to almost nothing, the
    last step's rate of a single fine-tuning epoch read 1e-6 in TensorBoard (drawn as 0) while the epoch had trained
    at up to 1e-4. Up to 100 evenly spaced steps of the schedule are averaged.
    """

    MAX_SAMPLES = 100

    def on_epoch_begin(self, epoch, logs=None):
        self._first_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        optimizer = self.model.optimizer
        schedule = getattr(optimizer, "_learning_rate", None)
        last_step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) and last_step > self._first_step:
            count = min(self.MAX_SAMPLES, last_step - self._first_step)
            steps = np.linspace(self._first_step, last_step - 1, count).round()
            rates = [float(keras.ops.convert_to_numpy(schedule(int(step)))) for step in steps]
            logs["learning_rate"] = float(np.mean(rates))
        else:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class AugmentedSamples(keras.callbacks.Callback):
    """Writes a grid of augmented training images to TensorBoard once, at the start of training."""

    def __init__(self, log_dir: Path, dataset: tf.data.Dataset, class_names: list[str]):
        super().__init__()
        self.log_dir, self.dataset, self.class_names = Path(log_dir), dataset, class_names

    def on_train_begin(self, logs=None):
        images, labels = next(iter(self.dataset.take(1)))
        titles = [augmented_label(row, self.class_names) for row in labels.numpy()[:16]]
        mixed = any("%" in title for title in titles)
        heading = "Training images after augmentation"
        if mixed:
            heading += "\nMixUp / CutMix blend two images: the title gives each class's share of the label"
        with summary_writer(self.log_dir / "train").as_default():
            tf.summary.image(
                "augmented_samples",
                figure_to_image(image_grid(images.numpy(), titles, heading=heading)),
                step=0,
                description=heading.replace("\n", ". ") + ". Augmentation runs on the training pipeline only.",
            )


def augmented_label(row: np.ndarray, class_names: list[str]) -> str:
    """The title of one augmented sample: its class, or each class's share of a MixUp / CutMix label."""
    top = np.argsort(row)[::-1][:2]
    if row[top[0]] > 0.99:
        return class_names[top[0]]
    return " / ".join(f"{class_names[i]} {row[i]:.0%}" for i in top if row[i] > 0.01)


class EpochScalars(keras.callbacks.Callback):
    """Each epoch's logs as TensorBoard scalars: `epoch_<name>` in `train/`, `val_<name>` as `epoch_<name>` in
    `validation/`, at step = epoch number (so phase 2 continues phase 1's axis), and nothing else.

    Written instead of Keras' own TensorBoard callback, which cost about 0.6 s an epoch here (too much for phase 1,
    where an epoch of the head on cached features takes a fraction of that) and also writes
    `evaluation_*_vs_iterations` charts that repeat the validation values on an iteration axis restarted by each
    phase's `fit`.
    """

    def __init__(self, log_dir: Path):
        super().__init__()
        self._log_dir = Path(log_dir)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for subset, keys in (
            ("train", [key for key in logs if not key.startswith("val_")]),
            ("validation", [key for key in logs if key.startswith("val_")]),
        ):
            if not keys:
                continue
            with summary_writer(self._log_dir / subset).as_default(step=epoch):
                for key in keys:
                    tf.summary.scalar(f"epoch_{key.removeprefix('val_')}", float(logs[key]))

    def on_train_end(self, logs=None):
        for subset in ("train", "validation"):
            summary_writer(self._log_dir / subset).flush()


class PhaseLogger(keras.callbacks.Callback):
    """Adds the phase (1 = head on features, 2 = fine-tuning) to each epoch's logs: a column of history.csv and a
    step in TensorBoard's `epoch_phase` chart, which marks where fine-tuning starts."""

    def __init__(self, phase: int):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["phase"] = self.phase


def final_model_step(epoch: int | None) -> int:
    """The TensorBoard step of the final model's images: its epoch (from 1) on the 0-based axis of the scalars."""
    return max(0, epoch - 1) if epoch else 0


def final_model_title(epoch: int | None) -> str:
    """ "final model (weights of epoch 10, step 9)": which epoch's weights the final images show."""
    return "final model" + (f" (weights of epoch {epoch}, step {final_model_step(epoch)})" if epoch else "")


def write_confusion_matrix(
    log_dir: Path, y_true, y_pred: np.ndarray, class_names: list[str], epoch: int | None, rule: str
) -> None:
    """Writes the final model's validation confusion matrix to TensorBoard, once.

    Args:
        log_dir: The run's `logs/` folder.
        y_true: Validation labels.
        y_pred: The final model's decisions on them.
        class_names: Class names in label order.
        epoch: The epoch (from 1) the final model's weights come from, for the title and the step; None if unknown.
        rule: How the decisions were made, for the title: "argmax" or the operating point.
    """
    title = f"Validation, {final_model_title(epoch)}\ndecision: {rule}"
    figure = confusion_figure(np.asarray(y_true), np.asarray(y_pred), class_names, title)
    with summary_writer(Path(log_dir) / "validation").as_default():
        step, description = final_model_step(epoch), title.replace("\n", "; ")
        tf.summary.image("confusion_matrix", figure_to_image(figure), step=step, description=description)


def write_image_grid(
    log_dir: Path,
    tag: str,
    images: list[np.ndarray],
    titles: list[str],
    colours: list[str],
    heading: str,
    epoch: int | None,
) -> None:
    """Writes up to 16 images of the final model (e.g. Grad-CAM overlays) as one grid to the validation run."""
    figure = image_grid(np.stack(images), titles, colours=colours, heading=heading)
    with summary_writer(Path(log_dir) / "validation").as_default():
        description = heading.replace("\n", "; ")
        tf.summary.image(tag, figure_to_image(figure), step=final_model_step(epoch), description=description)


class ThroughputMeter(keras.callbacks.Callback):
    """Measures training images per second of each epoch, from its start to its last training batch.

    Validation and the other callbacks' end-of-epoch work are left out, so the figure is the training step's own.
    """

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.rates: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = self.last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.last > self.start:
            self.rates.append(self.images_per_epoch / (self.last - self.start))

    def steady_rate(self) -> float | None:
        """Median images/s over the epochs after the first (which pays for tracing and filling the cache)."""
        rates = self.rates[1:] or self.rates
        return float(np.median(rates)) if rates else None


# The HParams dashboard's metric columns: the validation run's own epoch charts, read at their last epoch.
HPARAMS_METRICS = {"epoch_loss": "val loss", "epoch_accuracy": "val accuracy", "epoch_auc": "val AUC"}


def write_hparams(log_dir: Path, hparams: dict) -> None:
    """Records the run's hyperparameters for TensorBoard's HParams dashboard, in the `validation` run.

    The session lives in the validation run and its metric columns are that run's `epoch_*` charts (TensorBoard
    takes their last value), so it adds no run of its own: a separate `hparams` run with one scalar each shows up
    in the Scalars dashboard as a run of one-dot charts. TensorBoard looks a session's metrics up in the session's
    folder or below it, never beside it (`os.path.join(session, group)`), hence the validation run itself.
    The final model's numbers (best epoch, calibrated, and the test split) are in metrics.json.
    """
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    with summary_writer(Path(log_dir) / "validation").as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in values],
            metrics=[
                hp.Metric(tag, display_name=f"{name} (last epoch)", description=f"{name} of the last epoch trained")
                for tag, name in HPARAMS_METRICS.items()
            ],
        )
        hp.hparams(values)
