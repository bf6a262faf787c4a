"""Segmentation loss and metrics against hand computations (and Keras' MeanIoU as a second implementation)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras.segmentation import metrics
from bot_keras.segmentation.losses import pixel_cross_entropy

# Ground truth / prediction pairs on labelled pixels: (0,0) (0,1) (1,1) (2,2) (1,0); one 255; class 3 absent.
LABELS = np.array([[[0, 0, 1], [2, 255, 1]]])
PREDS = np.array([[[0, 1, 1], [2, 2, 0]]])
HAND = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_confusion_matrix_skips_the_ignore_label():
    np.testing.assert_array_equal(metrics.confusion_matrix(LABELS, PREDS, 4), HAND)


def test_accuracy_and_iou_by_hand():
    assert metrics.pixel_accuracy(HAND) == pytest.approx(3 / 5)
    iou = metrics.per_class_iou(HAND)
    np.testing.assert_allclose(iou[:3], [1 / 3, 1 / 3, 1.0])
    assert np.isnan(iou[3])  # in neither ground truth nor predictions: left out of the mean
    assert metrics.mean_iou(HAND) == pytest.approx(5 / 9)
    summary = metrics.summarize(HAND, ["a", "b", "c", "d"])
    assert summary["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1.0, "d": None})
    # One class-0 pixel predicted as 3: class 3 is now in the predictions, so it counts (IoU 0); IoU_0 = 1/4.
    assert metrics.mean_iou(HAND + np.eye(4, k=3, dtype=int)) == pytest.approx((1 / 4 + 1 / 3 + 1 + 0) / 4)


def test_mean_iou_matches_keras():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(3, 8, 8))
    labels[:, :2] = 255
    preds = rng.integers(0, 4, size=(3, 8, 8))  # class 4 is never predicted: IoU 0, still averaged
    reference = keras.metrics.MeanIoU(num_classes=5, ignore_class=255)
    reference.update_state(labels, preds)
    confusion = metrics.ConfusionMatrix(5)
    confusion.update_state(labels[:2], tf.one_hot(preds[:2], 5))  # logits-like input is argmax-ed
    confusion.update_state(labels[2:], preds[2:])
    assert float(confusion.result()) == pytest.approx(float(reference.result()), abs=1e-6)
    assert metrics.mean_iou(confusion.confusion) == pytest.approx(float(reference.result()), abs=1e-6)
    assert confusion.confusion.sum() == 3 * 6 * 8
    confusion.reset_state()
    assert confusion.confusion.sum() == 0


def test_label_beyond_the_classes_is_an_error():
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
        metrics.confusion_matrix(np.array([[4]]), np.array([[0]]), 4)


def test_pixel_cross_entropy_by_hand():
    ln3 = math.log(3)
    labels = np.array([[[0, 255]], [[1, 1]], [[255, 255]]])
    logits = np.array([[[[0, ln3], [9.0, -9.0]]],
                       [[[0, 0], [ln3, 0]]],
                       [[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    loss = pixel_cross_entropy(labels, logits)
    # Image 0: one labelled pixel, −log(1/4); image 1: mean of ln 2 and ln 4; image 2: nothing labelled.
    np.testing.assert_allclose(loss, [math.log(4), 1.5 * math.log(2), 0.0], rtol=1e-6)
    assert loss.dtype == tf.float32


def test_ignored_pixels_get_no_gradient_and_float16_logits_are_cast():
    labels = tf.constant([[[0, 255], [1, 2]]])
    logits = tf.Variable(tf.random.stateless_normal([1, 2, 2, 3], seed=[1, 2]))
    with tf.GradientTape() as tape:
        loss = pixel_cross_entropy(labels, tf.cast(logits, tf.float16))
    grad = tape.gradient(loss, logits).numpy()
    assert loss.dtype == tf.float32 and loss.shape == (1,)
    assert not grad[0, 0, 1].any() and grad[0, 1, 1].any()
