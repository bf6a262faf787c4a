"""RetinaNet's loss for a custom training step: keras-hub's loss, split so replicas can share its normaliser.

keras-hub keeps the loss inside `compile`: `RetinaNetObjectDetector.compute_loss(x, y, y_pred,
sample_weight)` encodes the targets with the model's `label_encoder` (anchor matching: IoU ≥ 0.5 positive,
< 0.4 background, in between ignored) and hands them to the compiled losses — Huber (δ = 1) on the
center-xywh box deltas of positive anchors and binary focal cross-entropy (γ = 2, no α balancing) on every
non-ignored anchor, both `reduction="sum"` and divided by the number of positive anchors. So a generic
GradientTape step can get it only after `detector.compile()`:

    detector.compile(optimizer=...)                 # installs the default box/classification losses
    with tf.GradientTape() as tape:
        predictions = detector(images, training=True)
        loss = detector.compute_loss(x=images, y=targets, y_pred=predictions, sample_weight=None)

which also adds `detector.losses` (regularisers). Two things make that awkward under a distribution
strategy: the normaliser is the *replica's* positive-anchor count, and a batch without any positive anchor
gets weight 0 on everything (no gradient, not even "this is background"). `loss_terms` returns the sums and
the count instead, so a step can all-reduce the count and divide by the global one (Lin et al. normalise by
the positives of the whole batch). `per_example_terms` gives them per image from a label encoder alone
(`model.make_label_encoder()`, the same config as the detector's), which is what `bot_keras.finetune`'s
generic step needs: a per-example loss with no model at hand (`normalized_per_example_loss`).
`retinanet_loss` is the single-replica form, equal to keras-hub's
`compute_loss` whenever the batch has a positive anchor (tests check that).

Per-anchor values are keras' `huber` and `binary_focal_crossentropy`, which average over their last axis
(the 4 coordinates, the K classes) before the sum: that is keras-hub's scale, kept so the two agree.
"""

import keras
import tensorflow as tf

HUBER_DELTA = 1.0
FOCAL_GAMMA = 2.0
BACKGROUND, IGNORE = -1.0, -2.0  # the label encoder's class targets for background and ignored anchors


def encode_targets(label_encoder, image_shape, targets):
    """Anchor targets of a batch: (box deltas [B, A, 4], class targets [B, A] float: k, -1 or -2).

    `targets["boxes"]` are in the encoder's `bounding_box_format` (pixels of images of static
    `image_shape` (H, W, C)), padded with -1. The encoder reads only the images' shape, so none are needed.
    """
    shape_only = tf.zeros([1, *image_shape])
    box_targets, class_targets = label_encoder(
        images=shape_only, gt_boxes=targets["boxes"], gt_classes=targets["labels"]
    )
    return box_targets, tf.reshape(class_targets, tf.shape(class_targets)[:2])


def per_example_terms(label_encoder, image_shape, targets, predictions):
    """`{"box": Σ Huber over the positive anchors, "classification": Σ focal over non-ignored anchors,
    "num_positives": positive anchors}`, each float32 [B]: one value per image."""
    box_targets, class_targets = encode_targets(label_encoder, image_shape, targets)
    box_pred = tf.cast(predictions["bbox_regression"], tf.float32)
    cls_pred = tf.cast(predictions["cls_logits"], tf.float32)
    positive = tf.cast(class_targets > BACKGROUND, tf.float32)
    counted = tf.cast(tf.not_equal(class_targets, IGNORE), tf.float32)
    # Background (-1) and ignored (-2) anchors one-hot to all zeros.
    cls_true = tf.one_hot(tf.cast(class_targets, tf.int32), cls_pred.shape[-1], dtype=tf.float32)
    box = keras.losses.huber(tf.cast(box_targets, tf.float32), box_pred, delta=HUBER_DELTA)
    cls = keras.losses.binary_focal_crossentropy(cls_true, cls_pred, gamma=FOCAL_GAMMA, from_logits=True)
    return {
        "box": tf.reduce_sum(box * positive, axis=1),
        "classification": tf.reduce_sum(cls * counted, axis=1),
        "num_positives": tf.reduce_sum(positive, axis=1),
    }


def loss_terms(detector, images, targets, predictions):
    """`per_example_terms` summed over the batch (float32 scalars), with the detector's own encoder."""
    if detector.label_encoder.bounding_box_format != detector.bounding_box_format:
        raise ValueError("The detector's label encoder must use the detector's bounding_box_format.")
    terms = per_example_terms(detector.label_encoder, images.shape[1:], targets, predictions)
    return {name: tf.reduce_sum(value) for name, value in terms.items()}


def normalized_per_example_loss(terms, *, num_positives, global_batch_size):
    """Per-image (box + classification) × global batch / max(positives of the global batch, 1): the loss
    whose `tf.nn.compute_average_loss` (Σ / global batch) over the replicas is Lin et al.'s normalised
    loss. `num_positives` is the all-reduced count."""
    scale = global_batch_size / tf.maximum(tf.cast(num_positives, tf.float32), 1.0)
    return (terms["box"] + terms["classification"]) * tf.stop_gradient(scale)


def retinanet_loss(detector, images, targets, predictions, *, num_positives=None):
    """(box + classification sums) / max(num_positives, 1), float32.

    `num_positives` defaults to this batch's; pass the all-reduced count of every replica to get the
    global-batch normalisation (then divide nothing else: the replicas' gradients are summed).
    """
    terms = loss_terms(detector, images, targets, predictions)
    if num_positives is None:
        num_positives = terms["num_positives"]
    return (terms["box"] + terms["classification"]) / tf.maximum(tf.cast(num_positives, tf.float32), 1.0)
