"""Joint image/mask augmentation for semantic segmentation (GluonCV's `_sync_transform`), pure TF ops.

Training: random scale s ~ U[0.5, 2.0] of the image's own size (image bilinear, mask nearest neighbour) →
normalise (the classifier's `bot_keras.data.augment.normalize`) → pad bottom/right to at least the crop, the
image with 0 (= the mean colour after normalising) and the mask with the ignore label 255 → random crop →
horizontal flip with probability 0.5. GluonCV scales the shorter side to a random size around a fixed
`base_size` (520 on ADE20K) instead of the image's own size; for ADE20K's ~512 px images the ranges match.
Masks are only ever resized with nearest neighbour, so they hold class ids from the input and 255 only.

Validation ("whole image"): normalise, pad bottom/right to `crop_size` (mask 255) so that images batch; every
labelled pixel is scored at its original resolution. Images larger than the crop are refused (choose a crop
size at least the largest image; CamVid is 360×480). "center" is GluonCV's validation during training
instead: shorter side resized to `crop_size`, centre crop (mask nearest).

Every random op takes an explicit stateless `seed` (int tensor [2]) and the same seed gives the same result
eagerly and in `tf.data`.
"""

import tensorflow as tf

from bot_keras.data.augment import normalize
from bot_keras.data.errors import BAD_SEGMENTATION_INPUT
from bot_keras.segmentation.metrics import IGNORE_LABEL

SCALE_RANGE = (0.5, 2.0)
EVAL_MODES = ("pad", "center")


def _seeds(seed, count):
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def resize_pair(image, mask, size):
    """image [H, W, 3] bilinear (float32 out), mask [H, W] nearest neighbour, both to `size` = (h, w)."""
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
    return image, mask


def scale_pair(image, mask, scale):
    """Resizes both by `scale` (a float tensor) of the image's size, rounded, at least 1 px."""
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    return resize_pair(image, mask, size)


def random_scale(image, mask, seed, scale_range=SCALE_RANGE):
    scale = tf.random.stateless_uniform([], seed, scale_range[0], scale_range[1])
    return scale_pair(image, mask, scale)


def pad_pair(image, mask, size):
    """Pads bottom/right to at least `size` = (h, w): image with 0, mask with the ignore label."""
    hw = tf.shape(mask)[:2]
    pad_h = tf.maximum(size[0] - hw[0], 0)
    pad_w = tf.maximum(size[1] - hw[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
    mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_LABEL)
    return image, mask


def crop_pair(image, mask, offset, size):
    """The `size` = (h, w) window at `offset` = (y, x) of both."""
    image = tf.slice(image, [offset[0], offset[1], 0], [size[0], size[1], -1])
    mask = tf.slice(mask, [offset[0], offset[1]], [size[0], size[1]])
    return image, mask


def random_crop(image, mask, crop_size, seed):
    """Pads to at least crop_size² (see `pad_pair`), then a uniformly placed crop_size² window."""
    image, mask = pad_pair(image, mask, (crop_size, crop_size))
    hw = tf.shape(mask)[:2]
    offset = tf.random.stateless_uniform([2], seed, 0, tf.int32.max, dtype=tf.int32) % (hw - crop_size + 1)
    return crop_pair(image, mask, offset, (crop_size, crop_size))


def flip_pair(image, mask, flip):
    """Mirrors both left-right when `flip` (a bool tensor) is true."""
    return tf.cond(flip, lambda: (image[:, ::-1], mask[:, ::-1]), lambda: (image, mask))


def random_flip(image, mask, seed, probability=0.5):
    return flip_pair(image, mask, tf.random.stateless_uniform([], seed) < probability)


# Plain tensor code: not converted by AutoGraph (why: the note above pipeline.check_example).
@tf.autograph.experimental.do_not_convert
def preprocess_for_train(image, mask, crop_size, seed, *, scale_range=SCALE_RANGE, flip=True):
    """uint8 image [H, W, 3], int mask [H, W] → float32 normalised [S, S, 3], int32 [S, S] (S = crop_size)."""
    scale_seed, crop_seed, flip_seed = _seeds(seed, 3)
    mask = tf.cast(mask, tf.int32)
    if scale_range is not None:
        image, mask = random_scale(image, mask, scale_seed, scale_range)
    image, mask = random_crop(normalize(image), mask, crop_size, crop_seed)
    if flip:
        image, mask = random_flip(image, mask, flip_seed)
    return tf.ensure_shape(image, [crop_size, crop_size, 3]), tf.ensure_shape(mask, [crop_size, crop_size])


@tf.autograph.experimental.do_not_convert
def preprocess_for_eval(image, mask, crop_size, mode="pad"):
    """The validation transform (see the module docstring): "pad" keeps the whole image, "center" crops."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}")
    mask = tf.cast(mask, tf.int32)
    if mode == "center":
        hw = tf.cast(tf.shape(mask)[:2], tf.float32)
        size = tf.maximum(tf.cast(tf.round(hw * crop_size / tf.reduce_min(hw)), tf.int32), crop_size)
        image, mask = resize_pair(image, mask, size)
        offset = (size - crop_size) // 2
        image, mask = crop_pair(normalize(image), mask, offset, (crop_size, crop_size))
    else:
        tf.debugging.assert_less_equal(
            tf.shape(mask)[:2], crop_size,
            message=f"{BAD_SEGMENTATION_INPUT} an image is larger than the evaluation size {crop_size}: "
                    "raise the evaluation size or use the center mode")
        image, mask = pad_pair(normalize(image), mask, (crop_size, crop_size))
    return tf.ensure_shape(image, [crop_size, crop_size, 3]), tf.ensure_shape(mask, [crop_size, crop_size])
