"""The detection input pipeline: source → decode → box-aware augmentation → padded batches.

Yields `(images, targets)`: float32 normalised images [B, S, S, 3] and `{"boxes": float32 [B, N, 4],
"labels": int32 [B, N]}` with **boxes "yxyx" in pixels of the S×S network input** (what keras-hub's
RetinaNet with `bounding_box_format="yxyx"` takes), padded with -1 (boxes and labels) to the batch's largest
box count, and to at least one slot: keras-hub 0.32's label encoder fails on a [B, 0, 4] batch (measured:
a GatherV2 index error), while a batch of all -1 slots trains as "all background".

Training drops difficult boxes (unless `keep_difficult`) and boxes that augmentation pushed out. With
`with_metadata` (evaluation) targets also hold `"difficult"` bool [B, N] (padding False), `"scale"` [B, 2]
(network pixels per original pixel, y and x: divide predicted boxes by it for original coordinates),
`"image_hw"` int32 [B, 2] (the original image's height and width) and `"key"` [B] (the file).
"""

import tensorflow as tf

from bot_keras.data.decode import MAX_IMAGE_PIXELS, decode_image, read_header
from bot_keras.data.errors import BAD_DETECTION_INPUT, SKIP_CURE, UNDECODABLE_IMAGE
from bot_keras.data.pipeline import SkippedFiles, assert_lazily, assert_pixel_limit, per_replica_batch_size
from bot_keras.detection import augment, sources

PAD = -1


def _pixels(boxes, hw):
    """Normalised yxyx → pixels of an image of int32 size `hw`."""
    return boxes * tf.tile(tf.cast(hw, tf.float32), [2])


def make_detection_dataset(
    source,
    *,
    split,
    image_size,
    global_batch_size,
    training,
    data_dir=None,
    input_context=None,
    seed=None,
    keep_difficult=False,
    with_metadata=False,
    scale_range=augment.SCALE_RANGE,
    flip=True,
    repeat=None,
    drop_remainder=None,
    deterministic=None,
    skip_corrupt=False,
    skipped_files=None,
    max_image_pixels=MAX_IMAGE_PIXELS,
):
    """A `tf.data.Dataset` of (images [B, S, S, 3], {"boxes" [B, N, 4] yxyx pixels, "labels" [B, N]}).

    Args:
      source, split, data_dir: see `sources` (`voc:ROOT`, `coco:PATTERN`, `tfds:NAME`).
      image_size: S, the square network input (static; a multiple of 128 suits FPN levels 3-7).
      global_batch_size: the batch across replicas; B = global / replicas with an `input_context`.
      training: random scale, crop/pad and flip, shuffled, repeated, drop_remainder; else longer side to S
        and pad, in order, one pass.
      seed: makes shuffling and augmentation reproducible; None draws fresh.
      keep_difficult: keep difficult boxes as training targets (VOC leaves them out).
      with_metadata: add "difficult", "scale", "image_hw" and "key" to the targets (for evaluation).
      scale_range: the training scale jitter (see `augment.preprocess_for_train`).
      skip_corrupt, skipped_files, max_image_pixels: an undecodable image, or one whose header declares
        more than `max_image_pixels` pixels, stops the run with one line naming it; with `skip_corrupt`
        it is skipped and named once in `skipped_files` (a `bot_keras.data.SkippedFiles`).
    """
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32; got {image_size!r}.")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high; got {tuple(scale_range)!r}.")
    batch_size = per_replica_batch_size(global_batch_size, input_context)
    info = sources.detection_info(source, split=split, data_dir=data_dir)
    if training and drop_remainder is not False and info.num_examples < global_batch_size:
        raise ValueError(
            f"Detection dataset {source!r} split {split!r} has {info.num_examples} images, fewer "
            f"than a global batch ({global_batch_size}); training would yield no batches."
        )
    num_classes = info.num_classes
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    if deterministic is None:
        deterministic = seed is not None or not training
    if seed is not None and input_context is not None:
        seed = seed + 1_000_003 * input_context.input_pipeline_id
    ds = sources.load_examples(source, split=split, data_dir=data_dir, input_context=input_context,
                               shuffle=training, seed=seed)
    if skip_corrupt:
        skipped, name = skipped_files or SkippedFiles(), f"{source} {split}"
        ds = ds.filter(lambda ex: skipped.keep(ex["encoded"], ex["key"], name, max_image_pixels))

    def decode(example):
        """Decoded uint8 image, with one-line errors naming the file for broken images and bad labels."""
        key, labels, declared = example["key"], example["labels"], example["image_hw"]
        shape, complete = read_header(example["encoded"])  # the header, read once for both checks
        ok = assert_lazily(complete,
                           lambda: tf.strings.join([UNDECODABLE_IMAGE, key, SKIP_CURE], " "))
        fits = assert_pixel_limit(example["encoded"], key, max_image_pixels, shape)
        with tf.control_dependencies([ok, fits]):
            image = decode_image(example["encoded"])
        hw = tf.shape(image)[:2]
        checks = [
            tf.debugging.Assert(tf.reduce_all(declared == 0) | tf.reduce_all(declared == hw),
                                [f"{BAD_DETECTION_INPUT} image size (h, w)", hw,
                                 "differs from the annotated size", declared, "in", key]),
            tf.debugging.Assert(tf.reduce_all((labels >= 0) & (labels < num_classes)),
                                [f"{BAD_DETECTION_INPUT} box label out of range [0, {num_classes}) in", key]),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(image), _pixels(example["boxes"], hw)

    def train_map(example, element_seed):
        image, boxes = decode(example)
        labels = example["labels"]
        if not keep_difficult:
            easy = ~example["difficult"]
            boxes, labels = tf.boolean_mask(boxes, easy), tf.boolean_mask(labels, easy)
        image, boxes, keep = augment.preprocess_for_train(image, boxes, image_size, element_seed,
                                                          scale_range=scale_range, flip=flip)
        return image, {"boxes": tf.boolean_mask(boxes, keep), "labels": tf.boolean_mask(labels, keep)}

    def eval_map(example):
        image, boxes = decode(example)
        labels, difficult = example["labels"], example["difficult"]
        if not (keep_difficult or with_metadata):
            boxes, labels = tf.boolean_mask(boxes, ~difficult), tf.boolean_mask(labels, ~difficult)
        image_hw = tf.shape(image)[:2]
        image, boxes, scale = augment.preprocess_for_eval(image, boxes, image_size)
        targets = {"boxes": boxes, "labels": labels}
        if with_metadata:
            targets.update(difficult=difficult, scale=scale, image_hw=image_hw, key=example["key"])
        return image, targets

    if training:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(train_map, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=deterministic)
    else:
        ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.map(_add_pad_slot)
    padding_values = {"boxes": float(PAD), "labels": PAD}
    if with_metadata:
        padding_values.update(difficult=False, scale=0.0, image_hw=0, key="")
    ds = ds.padded_batch(batch_size, padding_values=(0.0, padding_values), drop_remainder=drop_remainder)
    ds = ds.map(_drop_extra_slot)
    if repeat:
        ds = ds.repeat()
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# One padding slot per example guarantees N >= 1 after batching; the batch keeps only max(N_i, 1) slots.


def _add_pad_slot(image, targets):
    targets = dict(targets)
    targets["boxes"] = tf.concat([targets["boxes"], tf.fill([1, 4], float(PAD))], 0)
    targets["labels"] = tf.concat([targets["labels"], [PAD]], 0)
    if "difficult" in targets:
        targets["difficult"] = tf.concat([targets["difficult"], [False]], 0)
    return image, targets


def _drop_extra_slot(images, targets):
    slots = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(targets["labels"] != PAD, tf.int32), 1)), 1)
    targets = dict(targets)
    for name in ("boxes", "labels", "difficult"):
        if name in targets:
            targets[name] = targets[name][:, :slots]
    return images, targets
