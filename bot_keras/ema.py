"""Weight EMA (beyond the paper): an exponential moving average of every model weight, used for inference.

After each training step, every weight's average moves towards it:
    average ← d_n · average + (1 − d_n) · weight,   d_n = min(decay, (1 + n) / (10 + n)),
n being the number of updates before this one. The warm-up of the decay is TensorFlow's
`tf.train.ExponentialMovingAverage(num_updates=...)` convention, which TF Model Garden's `average_decay`
uses: early averages forget the random initialisation quickly (d_0 = 0.1, d_90 = 0.91) and the decay
reaches e.g. 0.9999 after about 90,000 updates. The averages start as the initial weights.

All of `model.weights` are averaged, BatchNorm's moving statistics included, as timm's `ModelEmaV2` does
with the whole state dict; Keras' optimizer `use_ema` averages the trainable variables only and has no
warm-up, so we keep our own. The update runs once a step in the cross-replica context (after the
replicas' optimizer update), so under a distribution strategy each average is one mirrored value.

`WeightEMA` is a `tf.Module`: put it in the run's checkpoint and `--resume` continues the same averages.
`swap()` exchanges the model's weights with the averages (call it again to swap back): evaluation during
training and the final `model.keras` use the averages this way.
"""

import tensorflow as tf


def decay_at(decay, updates):
    """The decay of update number `updates` (0-based): min(decay, (1 + n) / (10 + n))."""
    updates = tf.cast(updates, tf.float32)
    return tf.minimum(tf.cast(decay, tf.float32), (1.0 + updates) / (10.0 + updates))


class WeightEMA(tf.Module):
    """Moving averages of `model.weights`; build it in the strategy's scope, after the model is built."""

    def __init__(self, model, decay):
        super().__init__(name="weight_ema")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self._weights = list(model.weights)
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates")
        self.averages = [
            tf.Variable(tf.convert_to_tensor(w), trainable=False, name=f"ema_{i}")
            for i, w in enumerate(self._weights)
        ]

    def update(self):
        """One EMA step towards the current weights (call in the cross-replica context, e.g. in a
        `tf.function` after `strategy.run`)."""
        d = decay_at(self.decay, self.updates)
        for average, weight in zip(self.averages, self._weights, strict=True):
            value = tf.cast(tf.convert_to_tensor(weight), average.dtype)
            average.assign(d * average + (1.0 - d) * value)
        self.updates.assign_add(1)

    def swap(self):
        """Exchanges the model's weights and the averages (eagerly; twice restores both)."""
        for average, weight in zip(self.averages, self._weights, strict=True):
            current = tf.identity(tf.convert_to_tensor(weight))
            weight.assign(tf.convert_to_tensor(average))
            average.assign(current)


def evaluated_with_averages(evaluate, ema):
    """`evaluate(dataset)` run with the averages in the model (swapped in, then back)."""

    def evaluate_averages(dataset):
        ema.swap()
        try:
            return evaluate(dataset)
        finally:
            ema.swap()

    return evaluate_averages
