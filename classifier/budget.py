"""`--time-budget 10m`: fit a training run into a wall-clock budget by measuring, not guessing.

The same settings take 8 minutes on one machine and 30 on another, so epochs fixed in advance either waste a
fast machine or overrun a slow one. With a budget, training measures what the work costs on this machine once
it starts (phase 1's forward passes; one fine-tuning step) and cuts the work to fit: phase 1's augmented
feature views may use a third of the time left after a reserve for the final predictions, phase 2's epochs the
rest. A budget only ever shortens a run: the configured epochs and views are the most it does.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from classifier.errors import UserError

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# Phase 1's augmented views may take this share of the time left after the reserve; phase 2 gets the rest.
VIEWS_SHARE = 1 / 3


def parse_duration(text: str | int | float) -> float:
    """Parses `90s`, `10m`, `1.5h` or a number of seconds.

    Raises:
        UserError: anything else, or a duration that is not positive.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"time budget {text!r} is not a duration: write it like 90s, 10m or 1.5h.")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class TimeBudget:
    """A wall-clock budget for one training run.

    Attributes:
        seconds: The whole budget.
        started: `time.perf_counter()` when the run started.
    """

    seconds: float
    started: float

    def remaining(self) -> float:
        """Seconds left."""
        return self.seconds - (time.perf_counter() - self.started)

    def views(self, wanted: int, seconds_per_view: float, reserve_seconds: float, phase2: bool = True) -> int:
        """How many augmented views phase 1 can afford (at most `wanted`), and says so when it is fewer.

        With `phase2` False (no fine-tuning epochs) the views may use all the time left after the reserve.
        """
        spendable = (self.remaining() - reserve_seconds) * (VIEWS_SHARE if phase2 else 1.0)
        views = max(0, min(wanted, int(spendable // max(seconds_per_view, 1e-9))))
        if views < wanted:
            log.info(
                f"  time budget: {views} augmented view(s) instead of {wanted} "
                f"({seconds_per_view:.0f} s each, {self.remaining():.0f} s left)"
            )
        return views

    def epochs(self, wanted: int, seconds_per_epoch: float, reserve_seconds: float) -> int:
        """How many fine-tuning epochs fit (at most `wanted`), printing the plan."""
        spendable = self.remaining() - reserve_seconds
        epochs = max(0, min(wanted, int(spendable // max(seconds_per_epoch, 1e-9))))
        log.info(
            f"Time budget: {self.remaining():.0f} s left, {reserve_seconds:.0f} s kept for the final evaluation; "
            f"a fine-tuning epoch takes about {seconds_per_epoch:.0f} s here: {epochs} of {wanted} epoch(s) planned."
        )
        return epochs


def stop_when_spent(budget: TimeBudget, reserve_seconds: float, validation_seconds: float = 0.0, within_epoch=True):
    """A Keras callback that ends training when the budget would otherwise be overrun: after an epoch when the
    next one would not fit, and (with `within_epoch`) in the middle of one, after the batch past which the rest of
    the epoch, its validation and the reserve would not fit. Keras still validates a cut epoch, so its weights are
    checkpointed like any other's.

    The plan made before phase 2 rests on one measured step; the epochs themselves also pay for the input
    pipeline, the optimizer, validation and checkpoints, and for whatever else the machine is doing. Measuring
    as it goes keeps a slower-than-planned run inside its budget (seen: epochs planned at 66 s took 114-146 s,
    one planned at 139 s took 174 s, on a machine shared with other jobs).

    Args:
        budget: The run's budget.
        reserve_seconds: Kept for the end of the run (final predictions, saving, plots).
        validation_seconds: What one validation pass costs (estimated), kept free inside an epoch that is cut.
        within_epoch: False where the workers of a cluster must stop together (each would cut at a different
            batch and the others would wait for it forever); they stop between epochs only.
    """
    import keras

    class StopWhenSpent(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            self._began = self._batch_began = time.perf_counter()
            self._slowest_batch = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._batch_began = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self._slowest_batch = max(self._slowest_batch, time.perf_counter() - self._batch_began)
            if not within_epoch or self.model.stop_training:
                return
            left = budget.remaining() - reserve_seconds - validation_seconds
            steps = self.params.get("steps") or 0
            if left < self._slowest_batch and batch + 1 < steps:
                log.info(
                    f"\nTime budget: stopping epoch {self._epoch + 1} after batch {batch + 1} of {steps}; "
                    f"{max(0.0, left + validation_seconds):.0f} s are left for its validation before the final "
                    "evaluation."
                )
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            took = time.perf_counter() - self._began
            left = budget.remaining() - reserve_seconds
            last = epoch + 1 >= self.params.get("epochs", 0)
            if left < took and not self.model.stop_training and not last:
                log.info(
                    f"Time budget: stopping after epoch {epoch + 1}: it took {took:.0f} s and {max(0.0, left):.0f} s "
                    "are left before the final evaluation."
                )
                self.model.stop_training = True

    return StopWhenSpent()


def step_seconds(model, images, labels, repeats: int = 2) -> float:
    """Measured seconds of one training step's forward and backward pass on this batch (no update applied).

    The optimizer's update is left out: it is small next to the gradient of a convolutional network.
    """
    import keras  # here, not at the top: the config imports this module, and TensorFlow takes seconds to import
    import tensorflow as tf

    loss_fn = keras.losses.CategoricalCrossentropy()

    @tf.function
    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    gradients(images, labels)  # the first call traces the function: not a step's cost
    started = time.perf_counter()
    for _ in range(repeats):
        grads = gradients(images, labels)
    _ = [g.numpy() for g in grads[:1] if g is not None]  # wait for the last step to finish
    return (time.perf_counter() - started) / repeats


@dataclass
class StepTimes:
    """Wall-clock seconds of named steps (a step timed twice adds up): training's "after training" line and
    metrics.json (what the budget's reserve has to cover), and export's "export steps" line and report."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - began, 1)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value:.0f} s" for name, value in self.seconds.items())
        return f"{sum(self.seconds.values()):.0f} s ({parts})"
