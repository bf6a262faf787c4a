"""Pixel-wise softmax cross-entropy that ignores label 255, one value per image.

Per image: the mean over its labelled pixels (label != 255) of −log softmax(logits)[label]; an image with no
labelled pixel contributes 0. A generic train step averages these over the global batch, so every image
weighs the same. (PyTorch's `CrossEntropyLoss(ignore_index=255)`, used by GluonCV, averages over all
labelled pixels of the batch instead; the two agree when images have equally many labelled pixels, as
random crops of fully labelled images mostly do.) Logits are cast to float32 first: the float32 island of
mixed precision.
"""

import tensorflow as tf

from bot_keras.segmentation.metrics import IGNORE_LABEL


def pixel_cross_entropy(labels, logits, ignore_label=IGNORE_LABEL):
    """labels int [B, H, W], logits [B, H, W, K] → float32 [B]: mean cross-entropy over labelled pixels."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))  # any class: the value is masked out below
    pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    weights = tf.cast(valid, tf.float32)
    total = tf.reduce_sum(pixel * weights, axis=[1, 2])
    count = tf.reduce_sum(weights, axis=[1, 2])
    return tf.math.divide_no_nan(total, count)


AUX_WEIGHT = 0.5  # GluonCV's segmentation train.py `--aux-weight`


def segmentation_loss(labels, outputs, aux_weight=AUX_WEIGHT, ignore_label=IGNORE_LABEL):
    """Per-image loss [B] of a segmenter's outputs: logits, or FCN's `{"logits", "aux_logits"}` dict, for
    which it is CE(logits) + aux_weight · CE(aux_logits) (GluonCV's `MixSoftmaxCrossEntropyLoss`)."""
    if isinstance(outputs, dict):
        return (pixel_cross_entropy(labels, outputs["logits"], ignore_label)
                + aux_weight * pixel_cross_entropy(labels, outputs["aux_logits"], ignore_label))
    return pixel_cross_entropy(labels, outputs, ignore_label)


def main_logits(outputs):
    """The logits to score: FCN's main output when the model has an auxiliary head."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs
