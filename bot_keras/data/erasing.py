"""Random erasing (Zhong et al., 2017; beyond the paper) as timm's `RandomErasing` does it by default.

Each image of a batch, independently, with probability p: up to 10 attempts at a box of area fraction
~ U[0.02, 1/3] and aspect ratio (height / width) log-uniform in [0.3, 1/0.3], sides rounded to pixels;
the first that fits strictly inside the image (timm: `h < H and w < W`) is placed at an offset uniform over
the positions where it fits, and its pixels are replaced by N(0, 1) noise per pixel and channel (timm's
`mode="pixel"`, its training default). No box is erased when no attempt fits. It runs on the normalised
batch in the train step, before mixup / CutMix (timm erases normalised images too, so N(0, 1) is noise at
the data's own scale).

All draws are stateless from one seed, per image (`erasing_boxes` returns the boxes, `erase` applies them),
so the same seed erases the same boxes eagerly, in a `tf.function` and under XLA.
"""

import math

import tensorflow as tf

AREA_RANGE = (0.02, 1 / 3)
ASPECT_RANGE = (0.3, 1 / 0.3)
ATTEMPTS = 10


def erasing_boxes(seed, *, batch_size, height, width, probability):
    """int32 [B, 4] boxes [top, bottom, left, right) (bottom/right exclusive), one per image; an empty box
    (top == bottom) where the image is not erased (the coin said no, or no attempt fitted)."""
    seeds = tf.random.split(tf.cast(seed, tf.int64), 2)
    coin = tf.random.stateless_uniform([batch_size], seeds[0]) < probability
    # Per image and attempt: area fraction, log aspect, offset y, offset x (uniform [0, 1)).
    u = tf.random.stateless_uniform([4, batch_size, ATTEMPTS], seeds[1])
    area = (AREA_RANGE[0] + (AREA_RANGE[1] - AREA_RANGE[0]) * u[0]) * float(height * width)
    log_low, log_high = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    aspect = tf.exp(log_low + (log_high - log_low) * u[1])
    h = tf.round(tf.sqrt(area * aspect))
    w = tf.round(tf.sqrt(area / aspect))
    fits = (h < height) & (w < width)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)  # the first fit (0 if none)
    pick = tf.stack([tf.range(batch_size), first], axis=1)
    h, w = tf.gather_nd(h, pick), tf.gather_nd(w, pick)
    erased = coin & tf.gather_nd(fits, pick)
    # timm: top = randint(0, H - h), both ends included: H - h + 1 positions.
    top = tf.floor(tf.gather_nd(u[2], pick) * (height - h + 1))
    left = tf.floor(tf.gather_nd(u[3], pick) * (width - w + 1))
    boxes = tf.cast(tf.stack([top, top + h, left, left + w], axis=1), tf.int32)
    return tf.where(erased[:, None], boxes, tf.zeros_like(boxes))


def erase(images, boxes, seed):
    """Replaces each image's box ([B, 4] from `erasing_boxes`) by N(0, 1) noise in the images' dtype."""
    height, width = images.shape[1], images.shape[2]
    rows, columns = tf.range(height)[None, :], tf.range(width)[None, :]
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])  # [B, H]
    in_columns = (columns >= boxes[:, 2:3]) & (columns < boxes[:, 3:4])  # [B, W]
    inside = in_rows[:, :, None, None] & in_columns[:, None, :, None]  # [B, H, W, 1]
    noise = tf.random.stateless_normal(tf.shape(images), tf.cast(seed, tf.int64), dtype=images.dtype)
    return tf.where(inside, noise, images)


def random_erasing(images, *, probability, seed):
    """Random erasing of a normalised float batch [B, H, W, C] (module docstring); returns the batch."""
    if not 0 <= probability <= 1:
        raise ValueError(f"random erasing probability must be in [0, 1], got {probability!r}.")
    box_seed, noise_seed = tf.unstack(tf.random.split(tf.cast(seed, tf.int64), 2))
    boxes = erasing_boxes(box_seed, batch_size=tf.shape(images)[0], height=images.shape[1],
                          width=images.shape[2], probability=probability)
    return erase(images, boxes, noise_seed)
