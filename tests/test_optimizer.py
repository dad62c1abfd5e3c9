"""The training optimizer: Keras' AdamW with its schedule read once per step must train exactly as Keras' own."""

from __future__ import annotations

import numpy as np


def test_adamw_with_a_scheduled_rate_trains_to_the_same_weights_as_keras_adamw():
    import keras

    from classifier.optimizer import AdamW

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 48)]

    def trained(optimizer_class) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Dense(8, activation="relu")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
        # Warmup then cosine decay, as train.py's phases use; weight decay large enough to matter.
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=12, alpha=0.01, warmup_target=1e-2, warmup_steps=6
        )
        model.compile(
            optimizer=optimizer_class(learning_rate=schedule, weight_decay=0.2), loss="categorical_crossentropy"
        )
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
        return model.get_weights()

    ours, theirs = trained(AdamW), trained(keras.optimizers.AdamW)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    without_decay = trained(lambda **kwargs: AdamW(**{**kwargs, "weight_decay": 0.0}))
    assert (
        max(float(np.max(np.abs(a - b))) for a, b in zip(ours, without_decay, strict=True)) > 1e-4
    )  # the decay was applied
