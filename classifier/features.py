"""Phase 1 on cached features: run the frozen backbone once, then train the head on its outputs in memory.

With the backbone frozen (and called with `training=False`, so BatchNorm and everything else is deterministic),
the pooled features of an image never change between epochs. Training the head through the whole network
recomputes them every epoch; here they are computed once for the plain training images and for
`train.feature_views` augmented copies of each (augmentation still matters: it is what the head generalises
from), and the head (`dropout` → `head` → `temperature` → `probabilities` layers of the classifier, the very same
layer objects) trains on them in memory for as many epochs as it needs, in seconds. Phase 1 then costs (1 + views)
forward passes over the training set instead of `head_epochs` forward-and-backward passes, and phase 2 starts from
the trained head.

The head's loss, metrics, class weights and label smoothing are the ones phase 2 uses, and the validation
features are those of the un-augmented validation images, so `val_loss` here is the same number the full model
gives on the validation split: phase 2's best-checkpoint selection continues from phase 1's best value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

POOL_LAYER = "pool"
HEAD_LAYERS = ("dropout", "head", "temperature", "probabilities")
# Head training on features runs at least this batch: a step is a tiny matrix product, so at batch 32 Keras'
# per-step overhead is the cost. On ELPV features (224 px, two views, seed 42) batch 256 at the same peak rate
# ran 0.60 s per epoch against 1.40 and reached a lower validation loss (0.473 against 0.485).
HEAD_BATCH = 256
MIN_HEAD_STEPS = 8  # ... unless an epoch would then be fewer steps than this


@dataclass(frozen=True)
class Features:
    """Pooled backbone features of one subset, and their (possibly soft) one-hot labels.

    Attributes:
        x: float32 [N, D] pooled features.
        y: float32 [N, C] labels (one-hot, or soft after MixUp / CutMix).
        seconds: Time the forward passes took.
    """

    x: np.ndarray
    y: np.ndarray
    seconds: float


def feature_extractor(model: keras.Model) -> keras.Model:
    """The classifier up to its pooling layer: raw pixels in, pooled backbone features out."""
    return keras.Model(model.input, model.get_layer(POOL_LAYER).output, name="feature_extractor")


def head_model(model: keras.Model) -> keras.Model:
    """A model of the classifier's head alone (features in, probabilities out) sharing the classifier's layers.

    Training it trains the classifier's own `dropout` and `head` layers: no weights are copied back.
    """
    inputs = keras.Input(shape=model.get_layer(POOL_LAYER).output.shape[1:], name="features")
    x = inputs
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return keras.Model(inputs, x, name="head_on_features")


def forward_pass(extractor: keras.Model):
    """`extractor`'s forward pass (inference mode) as a tf.function traced once for every batch size.

    Make it once per run and give it to every `extract`: a trace per batch shape (the last batch of each subset is
    shorter) and per call costs a second or more each for a real backbone, and the first `extract`'s time is what
    the time budget measures the backbone's speed by.
    """
    spec = tf.TensorSpec([None, *extractor.input.shape[1:]], tf.float32)
    return tf.function(lambda images: extractor(images, training=False), input_signature=[spec])


def extract(forward, datasets: list[tf.data.Dataset], on_batch=None) -> Features:
    """Runs the frozen backbone over batched `(images, one-hot labels)` datasets, one after the other.

    Args:
        forward: From `forward_pass(feature_extractor(model))`.
        datasets: Batched datasets of (float32 pixels 0..255, float32 labels).
        on_batch: Called with (images done, seconds so far) after each batch (progress, time budget).

    Returns:
        The features and labels of every image of every dataset, in order.
    """
    xs, ys, done = [], [], 0
    started = time.perf_counter()
    for dataset in datasets:
        for images, labels in dataset:
            xs.append(forward(images).numpy())
            ys.append(np.asarray(labels, dtype=np.float32))
            done += len(ys[-1])
            if on_batch is not None:
                on_batch(done, time.perf_counter() - started)
    return Features(np.concatenate(xs), np.concatenate(ys), time.perf_counter() - started)


def head_logits(model: keras.Model, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The classifier's logits on images whose pooled features `x` are: its head at inference (dropout off, then the
    linear "head" layer), without running the backbone again. Equal to `calibration.logits_model(model)` on the
    images themselves while the backbone's weights are those that computed `x`."""
    dropout, head = model.get_layer(HEAD_LAYERS[0]), model.get_layer(HEAD_LAYERS[1])
    parts = [np.asarray(head(dropout(x[i : i + batch], training=False))) for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, head.units), np.float32)


class RestoreBest(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best monitored value and restores them when training ends.

    Keras' EarlyStopping(restore_best_weights=True) restores only when it stops training early; a run that uses
    all its epochs would keep the last weights instead of the best.
    """

    def __init__(self, monitor: str, mode: str):
        super().__init__()
        self.monitor, self.better = monitor, (np.less if mode == "min" else np.greater)
        self.best, self.best_epoch, self.weights = None, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and (self.best is None or self.better(value, self.best)):
            self.best, self.best_epoch, self.weights = float(value), epoch, self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)
