"""Box-aware image transforms for detection: the boxes move with the pixels.

Boxes here are float32 [N, 4] **"yxyx" in pixels** of the image they belong to, with continuous edges: a box
covering pixel columns 2..5 has x_min = 2, x_max = 6 (so width = x_max - x_min counts pixels). Images are
float32 on the 0-255 scale until `normalize`; padding comes after normalisation and is 0 there, i.e. the
ImageNet mean colour (what a detector's zero padding of normalised inputs shows it).

Training (`preprocess_for_train`): random scale — the image is first scaled so that its longer side is S, then
by a factor drawn from U[scale_range] — then a random S×S crop where the scaled image is larger than S and
bottom/right padding where it is smaller; horizontal flip with probability 0.5. Boxes are scaled, shifted,
clipped to the S×S canvas, and dropped when less than one pixel of height or width is left (they fell out).
Validation (`preprocess_for_eval`): the *longer* side to S (so nothing is cropped and no box is lost; the
"shorter side to S" of classification would crop a non-square image), then pad bottom/right to S×S. Fixed
S×S inputs are what keras-hub's anchor generator and a static export signature need.

A resize maps the continuous coordinate u to u · new / old per axis (half-pixel centres, as
`tf.image.resize`), so scaling a box by the same ratio keeps it on its pixels.
"""

import tensorflow as tf

from bot_keras.data.augment import normalize

SCALE_RANGE = (0.5, 1.5)  # factors of the "longer side = S" size; GluonCV/Model Garden use similar jitter
MIN_BOX_SIZE = 1.0  # pixels; boxes thinner than this after clipping are dropped


def _split_seed(seed, count):
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def fit_size(image_hw, image_size, scale=1.0):
    """int32 [h, w] of an image scaled so its longer side is `image_size` · `scale` (rounded, >= 1)."""
    hw = tf.cast(image_hw, tf.float32)
    factor = tf.cast(image_size, tf.float32) * tf.cast(scale, tf.float32) / tf.reduce_max(hw)
    return tf.cast(tf.maximum(tf.round(hw * factor), 1.0), tf.int32)


def resize(image, boxes, new_hw):
    """Bilinear resize to `new_hw`, boxes scaled by new / old per axis; returns (image, boxes, [sy, sx])."""
    old = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(new_hw, tf.float32) / old
    image = tf.image.resize(tf.cast(image, tf.float32), new_hw, method="bilinear", antialias=False)
    return image, boxes * tf.tile(scale, [2]), scale


def flip_left_right(image, boxes, flip):
    """Mirrors the image and its boxes (x ↦ W - x, min and max swapped) when the boolean `flip` is true."""
    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    flipped = tf.stack([boxes[:, 0], width - boxes[:, 3], boxes[:, 2], width - boxes[:, 1]], axis=1)
    flip = tf.convert_to_tensor(flip)
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image), tf.where(flip, flipped, boxes)


def clip_boxes(boxes, size, min_size=MIN_BOX_SIZE):
    """Clips boxes to [0, size] on both axes; returns (boxes, keep) with keep false for boxes whose clipped
    height or width is below `min_size` (they fell out of the canvas or shrank below a pixel)."""
    boxes = tf.clip_by_value(boxes, 0.0, tf.cast(size, boxes.dtype))
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    return boxes, keep


def crop_and_pad(image, boxes, offset, size):
    """The size×size window at int32 `offset` [y, x] (padded bottom/right with 0 where the image ends);
    boxes shifted by the offset and clipped. Returns (image [size, size, C], boxes, keep)."""
    hw = tf.shape(image)[:2]
    crop_hw = tf.minimum(hw - offset, size)
    image = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([crop_hw, [-1]], 0))
    image = tf.image.pad_to_bounding_box(image, 0, 0, size, size)
    boxes = boxes - tf.cast(tf.tile(offset, [2]), boxes.dtype)
    boxes, keep = clip_boxes(boxes, size)
    return image, boxes, keep


# Plain tensor code: not converted by AutoGraph (why: the note above pipeline.check_example).
@tf.autograph.experimental.do_not_convert
def preprocess_for_train(image, boxes, image_size, seed, *, scale_range=SCALE_RANGE, flip=True):
    """Random scale, random crop / pad to S×S, flip; normalised float32 [S, S, 3], boxes and `keep` [N].

    `image` is [H, W, 3] (uint8 or float 0-255), `boxes` [N, 4] yxyx pixels of it. Callers drop the boxes
    (and their labels) where `keep` is false.
    """
    scale_seed, crop_seed, flip_seed = _split_seed(seed, 3)
    low, high = scale_range
    scale = tf.random.stateless_uniform([], scale_seed, low, high)
    image, boxes, _ = resize(image, boxes, fit_size(tf.shape(image)[:2], image_size, scale))
    slack = tf.maximum(tf.shape(image)[:2] - image_size, 0)
    offset = tf.cast(
        tf.floor(tf.random.stateless_uniform([2], crop_seed) * tf.cast(slack + 1, tf.float32)), tf.int32
    )
    offset = tf.minimum(offset, slack)
    image = normalize(image)
    image, boxes, keep = crop_and_pad(image, boxes, offset, image_size)
    if flip:
        image, boxes = flip_left_right(image, boxes, tf.random.stateless_uniform([], flip_seed) < 0.5)
    image.set_shape([image_size, image_size, 3])
    return image, boxes, keep


@tf.autograph.experimental.do_not_convert
def preprocess_for_eval(image, boxes, image_size):
    """Longer side to S, pad to S×S; returns (normalised image, boxes, scale [sy, sx]).

    Divide a predicted box by `scale` (tiled to yxyx) to get it in the original image's pixels. No box is
    lost: the whole image fits.
    """
    image, boxes, scale = resize(image, boxes, fit_size(tf.shape(image)[:2], image_size))
    image = tf.image.pad_to_bounding_box(normalize(image), 0, 0, image_size, image_size)
    image.set_shape([image_size, image_size, 3])
    return image, boxes, scale
