"""Semantic segmentation metrics from one confusion matrix: pixel accuracy, per-class IoU and mean IoU.

`confusion[g, p]` counts the pixels of ground-truth class g predicted as p; pixels labelled `IGNORE_LABEL`
(255: VOC's object borders, unlabelled ADE20K pixels) are left out everywhere. From it:
  pixel accuracy = Σ_k C[k, k] / Σ C                          (correct labelled pixels / labelled pixels)
  IoU_k          = C[k, k] / (Σ_p C[k, p] + Σ_g C[g, k] − C[k, k])   (intersection / union)
  mean IoU       = mean of IoU_k over the classes whose union is non-empty.
A class absent from both ground truth and predictions has IoU 0/0: reported as NaN and left out of the mean
(as Keras' MeanIoU, torchmetrics and mmseg do). GluonCV's `SegmentationMetric` instead counts it as 0; the
two agree whenever every class occurs in the evaluated ground truth (ADE20K val, CamVid val).
"""

import keras
import numpy as np
import tensorflow as tf

IGNORE_LABEL = 255


def confusion_matrix(labels, predictions, num_classes, ignore_label=IGNORE_LABEL):
    """int64 [K, K] counts of (ground truth, prediction) over the pixels whose label is not `ignore_label`.

    `labels` and `predictions` are integer class maps of the same shape (any rank); labels outside
    [0, K) other than the ignore label are a caller's bug and raise (tf.debugging), never silently counted.
    """
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int64), [-1])
    valid = tf.not_equal(labels, ignore_label)
    labels, predictions = tf.boolean_mask(labels, valid), tf.boolean_mask(predictions, valid)
    tf.debugging.assert_less(labels, tf.constant(num_classes, tf.int64),
                             message=f"a label is >= num_classes ({num_classes}) and is not {ignore_label}")
    counts = tf.math.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes,
                              maxlength=num_classes * num_classes, dtype=tf.int64)
    return tf.reshape(counts, [num_classes, num_classes])


def pixel_accuracy(confusion):
    """Correctly labelled pixels / labelled pixels (NaN for an empty matrix)."""
    confusion = np.asarray(confusion, np.float64)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def per_class_iou(confusion):
    """float64 [K]: IoU of each class; NaN where the class is in neither ground truth nor predictions."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def mean_iou(confusion):
    """Mean of `per_class_iou` over the classes present in ground truth or predictions."""
    iou = per_class_iou(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def summarize(confusion, class_names=None):
    """The evaluation JSON's numbers: `pixel_accuracy`, `mean_iou` and `per_class_iou` {name: IoU or None}."""
    iou = per_class_iou(confusion)
    names = class_names or [str(k) for k in range(len(iou))]
    return {
        "pixel_accuracy": pixel_accuracy(confusion),
        "mean_iou": mean_iou(confusion),
        "per_class_iou": {n: None if np.isnan(v) else float(v) for n, v in zip(names, iou, strict=True)},
    }


class ConfusionMatrix(keras.metrics.Metric):
    """Accumulates `confusion_matrix` over batches (summed across replicas); `result()` is the mean IoU.

    `update_state(labels, logits_or_classes)`: a trailing class axis of size K is argmax-ed away. Read the
    whole matrix with `.confusion` for `summarize`.
    """

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name="confusion_matrix", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.counts = self.add_variable(shape=(self.num_classes, self.num_classes), initializer="zeros",
                                        dtype="int64", aggregation="sum", name="counts")

    def update_state(self, labels, predictions, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("ConfusionMatrix takes no sample_weight; label skipped pixels 255 instead.")
        predictions = tf.convert_to_tensor(predictions)
        if predictions.shape.rank == tf.convert_to_tensor(labels).shape.rank + 1:
            predictions = tf.argmax(predictions, axis=-1)
        self.counts.assign_add(confusion_matrix(labels, predictions, self.num_classes, self.ignore_label))

    @property
    def confusion(self):
        return np.asarray(self.counts.numpy())

    def result(self):
        counts = tf.cast(tf.convert_to_tensor(self.counts), tf.float64)
        intersection = tf.linalg.diag_part(counts)
        union = tf.reduce_sum(counts, 0) + tf.reduce_sum(counts, 1) - intersection
        present = union > 0
        iou = tf.boolean_mask(intersection, present) / tf.boolean_mask(union, present)
        return tf.cast(tf.reduce_mean(iou), tf.float32)

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_label": self.ignore_label}
