"""The classification head shared by every model: global average pool, optional dropout, float32 logits."""

import numbers

import keras


def check_dropout_rate(dropout_rate):
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")


def check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def classification_head(x, *, num_classes, dropout_rate=0.0, kernel_initializer=None):
    """GAP → Dropout (when `dropout_rate` > 0) → `Dense(num_classes)` named `logits`.

    The Dense layer computes in float32 under any mixed-precision policy, so the logits (and the loss built
    on them) stay float32: the float32 island of Section 3.2's FP16 training.
    """
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate > 0:
        x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    return keras.layers.Dense(
        int(num_classes),
        kernel_initializer=kernel_initializer or "glorot_uniform",
        dtype="float32",
        name="logits",
    )(x)
