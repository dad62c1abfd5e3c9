"""Callbacks that make a run watchable in TensorBoard and safe to interrupt.

Keras' own callbacks do what they can (EarlyStopping, CSVLogger); the ones here add what they lack: epoch scalars
on one axis across both phases, the learning rate in `history.csv`, images (augmented samples, the final
confusion matrix), the phase and the hparams of the run. The checkpoints are `classifier.checkpoints`.
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


def figure_to_image(figure: plt.Figure) -> tf.Tensor:
    """Renders a matplotlib figure to a `[1, H, W, 4]` uint8 tensor for `tf.summary.image`, and closes it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return tf.expand_dims(tf.image.decode_png(buffer.getvalue(), channels=4), 0)


def image_grid(images: np.ndarray, titles: list[str], columns: int = 4) -> plt.Figure:
    """Lays out up to 16 images (0..255) with titles in a grid."""
    count = min(len(images), 16)
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            axis.imshow(np.clip(images[index], 0, 255).astype(np.uint8))
            axis.set_title(titles[index], fontsize=8)
    figure.tight_layout()
    return figure


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
    """Adds the learning rate in effect at the end of each epoch to the logs (and so to history.csv)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class AugmentedSamples(keras.callbacks.Callback):
    """Writes a grid of augmented training images to TensorBoard once, at the start of training."""

    def __init__(self, log_dir: Path, dataset: tf.data.Dataset, class_names: list[str]):
        super().__init__()
        self.log_dir, self.dataset, self.class_names = Path(log_dir), dataset, class_names

    def on_train_begin(self, logs=None):
        images, labels = next(iter(self.dataset.take(1)))
        # Labels are one-hot, or soft after MixUp / CutMix: show the mix as "name p".
        titles = []
        for row in labels.numpy()[:16]:
            top = np.argsort(row)[::-1][:2]
            parts = [f"{self.class_names[i]} {row[i]:.2f}" for i in top if row[i] > 0.01]
            titles.append(" / ".join(parts))
        with tf.summary.create_file_writer(str(self.log_dir / "train")).as_default():
            tf.summary.image("augmented_samples", figure_to_image(image_grid(images.numpy(), titles)), step=0)


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
        self._writers: dict[str, tf.summary.SummaryWriter] = {}

    def _writer(self, name: str) -> tf.summary.SummaryWriter:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(str(self._log_dir / name))
        return self._writers[name]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for subset, keys in (
            ("train", [key for key in logs if not key.startswith("val_")]),
            ("validation", [key for key in logs if key.startswith("val_")]),
        ):
            if not keys:
                continue
            with self._writer(subset).as_default(step=epoch):
                for key in keys:
                    tf.summary.scalar(f"epoch_{key.removeprefix('val_')}", float(logs[key]))

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


class PhaseLogger(keras.callbacks.Callback):
    """Adds the phase (1 = head on features, 2 = fine-tuning) to each epoch's logs: a column of history.csv and a
    step in TensorBoard's `epoch_phase` chart, which marks where fine-tuning starts."""

    def __init__(self, phase: int):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["phase"] = self.phase


def write_confusion_matrix(
    log_dir: Path, y_true, probabilities: np.ndarray, class_names: list[str], epoch: int | None
) -> None:
    """Writes the final model's validation confusion matrix (argmax of the probabilities) to TensorBoard, once.

    Args:
        log_dir: The run's `logs/` folder.
        y_true: Validation labels.
        probabilities: The final model's validation probabilities.
        class_names: Class names in label order.
        epoch: The epoch (from 1) the final model's weights come from, for the title and the step; None if unknown.
    """
    title = "validation, final model" + (f" (epoch {epoch})" if epoch else "") + ", argmax"
    figure = confusion_figure(np.asarray(y_true), probabilities.argmax(axis=-1), class_names, title)
    with tf.summary.create_file_writer(str(Path(log_dir) / "validation")).as_default():
        tf.summary.image("confusion_matrix", figure_to_image(figure), step=epoch or 0)


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


def write_hparams(log_dir: Path, hparams: dict, metrics: dict[str, float]) -> None:
    """Records the run's hyperparameters and final metrics in TensorBoard's HParams dashboard."""
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    with tf.summary.create_file_writer(str(Path(log_dir) / "hparams")).as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in values],
            metrics=[hp.Metric(f"hparams/{name}", display_name=name) for name in metrics],
        )
        hp.hparams(values)
        for name, value in metrics.items():
            tf.summary.scalar(f"hparams/{name}", value, step=0)
