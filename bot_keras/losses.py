"""Classification and distillation losses: label smoothing (Section 5.2), knowledge distillation (5.3).

Labels are one-hot (or already soft: smoothed and/or mixed by mixup) float vectors ``[B, K]``; logits are
cast to float32 before any softmax, so the loss is a float32 island under mixed precision.

Label smoothing: Keras' ``CategoricalCrossentropy(label_smoothing=ε)`` replaces a one-hot target by
(1 − ε)·y + ε/K, i.e. 1 − ε + ε/K for the true class and ε/K for each of the others — what GluonCV
(the authors' code), timm and torchvision do. The paper's text writes ε/(K − 1) for the others
(and 1 − ε for the true class); the two differ only by how ε is spread and give the same target for
ε' = ε·K/(K − 1). We follow the code. The optimal logit gap between the true class and the others is
then log(q_true/q_other) = log(1 + K(1 − ε)/ε) (the paper's text form gives log((K − 1)(1 − ε)/ε)).
"""

import keras
from keras import ops


def classification_loss(label_smoothing=0.0):
    """``--label_smoothing`` ε: softmax cross-entropy on one-hot labels, targets smoothed as above.

    Returns a ``keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ε)`` (mean over
    the batch; Keras scales it for ``tf.distribute`` inside ``fit``).
    """
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)


def _soft_cross_entropy(targets, logits):
    """-Σ_k targets_k · log softmax(logits)_k, per example."""
    return -ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1)


def distillation_loss(
    *,
    labels,
    student_logits,
    teacher_logits,
    temperature,
    hard_weight=None,
    label_smoothing=0.0,
    reduction="mean",
):
    """Knowledge distillation (Section 5.3), z = student, r = teacher logits, T = temperature.

    ``hard_weight=None`` (the paper's equation, 1:1):
        CE(labels, softmax(z)) + T²·CE(softmax(r/T), softmax(z/T))
    ``hard_weight=w`` (GluonCV's ``DistillationSoftmaxCrossEntropyLoss``):
        w·CE(labels, softmax(z)) + (1 − w)·T²·CE(softmax(r/T), softmax(z/T))

    CE(p, softmax(x)) = −Σ p·log softmax(x) is the cross-entropy against the teacher's distribution (KL
    divergence plus the teacher's entropy, a constant for the student; gradients are the same). T² keeps
    the soft term's gradient scale independent of T. The teacher's logits are treated as constants.
    ``label_smoothing`` ε smooths one-hot ``labels`` for the hard term as ``classification_loss`` does.
    ``reduction``: ``"mean"`` over the batch (a scalar) or ``"none"`` (one value per example, e.g. for a
    custom distributed step that divides by the global batch).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    if hard_weight is not None and not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight!r}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    labels = ops.cast(labels, "float32")
    student_logits = ops.cast(student_logits, "float32")
    teacher_logits = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
    if labels.shape[-1] != student_logits.shape[-1] or teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"distillation needs the same number of classes everywhere; labels have {labels.shape[-1]}, "
            f"student logits {student_logits.shape[-1]}, teacher logits {teacher_logits.shape[-1]}."
        )
    if label_smoothing:
        num_classes = ops.cast(ops.shape(labels)[-1], "float32")
        labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes

    hard = _soft_cross_entropy(labels, student_logits)
    teacher_probs = ops.softmax(teacher_logits / temperature, axis=-1)
    soft = temperature**2 * _soft_cross_entropy(teacher_probs, student_logits / temperature)
    if hard_weight is None:
        per_example = hard + soft
    else:
        per_example = hard_weight * hard + (1.0 - hard_weight) * soft
    return per_example if reduction == "none" else ops.mean(per_example)
