"""The optimizer of both phases: Keras' AdamW, its weight decay reading the learning rate once per step.

Keras 3.15's TensorFlow optimizer applies decoupled weight decay in a function it runs for each variable
(`keras/src/backend/tensorflow/optimizer.py`, `_apply_weight_decay`), and that function reads
`self.learning_rate`, which evaluates the schedule (warmup `cond` and cosine) again every time. A training step's
graph then holds one copy of the schedule per decayed variable, traced with the step and evaluated at every step:
in a tiny-backbone test run under `cProfile` the schedule was called 95 times, 2.1 s of the run's 20 s, and three
alternating pairs of such runs took 13.1-15.8 s with Keras' AdamW against 11.6-13.4 s with this one. The subclass
below is the same decay with the rate read once per step; everything else is Keras' own.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose weight decay evaluates the learning-rate schedule once per step."""

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return

        def decay_all(distribution, variables):
            # Once, in the cross-replica context Keras' own version also runs its updates from.
            rate = tf.convert_to_tensor(self.learning_rate) * self.weight_decay

            def decay(variable):
                if self._use_weight_decay(variable):
                    variable.assign_sub(variable * tf.cast(rate, variable.dtype))

            for variable in variables:
                if isinstance(variable, keras.Variable):
                    variable = variable.value  # the tf.Variable, as Keras' version does
                distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(decay_all, self._distribution_strategy, variables)
