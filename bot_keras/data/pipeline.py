"""`make_dataset`: source → decode and augment (Section 2.1) → batches of (images, one-hot labels).

Order of a training pipeline: shard per input pipeline → (cache encoded bytes) → shuffle → per-example
stateless seed → parallel map (framing check, fused decode-and-crop, flip, jitter, lighting, normalise,
one-hot) → batch (drop_remainder) → repeat → prefetch. Validation: no shuffle, resize + centre crop,
every example kept (the last batch may be short), one pass.

Training datasets repeat forever by default, and the repeat sits *after* batching: every pass over the data
yields exactly num_examples // global_batch_size global batches (per pipeline: its share // per-replica
batch), each pass reshuffled and re-augmented, so a loop that counts steps_per_epoch = num_examples //
global_batch_size stays aligned with the passes.
"""

import logging
import sys

import tensorflow as tf

from bot_keras import distribute
from bot_keras.data import augment, errors, sources

log = logging.getLogger(__name__)

# Caching encoded bytes is for CIFAR-sized data; ImageNet (1.28M images, ~140 GB) is never cached.
AUTO_CACHE_MAX_EXAMPLES = 100_000


def per_replica_batch_size(global_batch_size, input_context=None):
    """The batch one input pipeline produces: global / replicas in sync (the check lives in distribute)."""
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer; got {global_batch_size!r}.")
    if input_context is None:
        return global_batch_size
    return distribute.per_replica_batch_size(global_batch_size, input_context.num_replicas_in_sync)


def make_dataset(
    source,
    *,
    split,
    image_size,
    global_batch_size,
    training,
    data_dir=None,
    input_context=None,
    seed=None,
    cache=None,
    shuffle_buffer=10_000,
    skip_corrupt=False,
    label_offset=None,
    deterministic=None,
    repeat=None,
    drop_remainder=None,
    random_crop=True,
    fused_crop=True,
    flip=True,
    color_jitter=True,
    pca_lighting=True,
    crop_area_range=augment.CROP_AREA_RANGE,
    download=False,
):
    """A `tf.data.Dataset` of (float32 images [B, S, S, 3], one-hot float32 labels [B, K]).

    Args:
      source, split, data_dir, label_offset, download: see `sources` (`--dataset`, `--data_dir`).
      image_size: S, the square training/evaluation resolution (224 in the paper; any size >= 8).
      global_batch_size: the batch across all replicas; B = global / replicas with an `input_context`.
      training: the Section 2.1 training transform, shuffled, drop_remainder, repeated; else the validation
        transform (shorter side S / 0.875, centre crop), in order, one pass.
      input_context: a `tf.distribute.InputContext` (from `distribute_datasets_from_function`): this
        pipeline reads its share of the data and batches per replica.
      seed: makes shuffling and augmentation reproducible (and the order deterministic); None draws fresh.
      cache: keep encoded bytes in memory after the first pass (and shuffle them completely); None caches
        splits of at most AUTO_CACHE_MAX_EXAMPLES examples (CIFAR-sized), never ImageNet.
      shuffle_buffer: records in the shuffle buffer of uncached TFRecord/TFDS sources (folders always
        shuffle their whole file list).
      skip_corrupt: undecodable files (zero bytes, not an image, truncated) are skipped, each reported with a
        warning naming it and the running count; by default they raise an error naming the file.
      deterministic: keep element order under parallelism; None = True for validation, and for training
        exactly when `seed` is given (otherwise parallel map may reorder for speed).
      repeat, drop_remainder: None = `training`.
      random_crop, fused_crop, flip, color_jitter, pca_lighting: switch individual training steps off for
        ablations (`fused_crop=False` decodes whole JPEGs before cropping).
      crop_area_range: (low, high) area fraction of the random-resized crop; the paper's (0.08, 1.0).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8; got {image_size!r}.")
    low, high = crop_area_range
    if not 0 < low <= high <= 1:
        raise ValueError(
            f"crop_area_range must satisfy 0 < low <= high <= 1; got {tuple(crop_area_range)!r}."
        )
    batch_size = per_replica_batch_size(global_batch_size, input_context)
    info = sources.dataset_info(
        source,
        split=split,
        data_dir=data_dir,
        label_offset=label_offset,
        skip_corrupt=skip_corrupt,
        download=download,
    )
    if drop_remainder is not False and training and info.num_examples < global_batch_size:
        raise ValueError(
            f"Dataset {source!r} split {split!r} has {info.num_examples} examples, fewer than a global batch "
            f"({global_batch_size}); training would yield no batches."
        )
    if cache is None:
        cache = info.num_examples <= AUTO_CACHE_MAX_EXAMPLES
    if cache:
        shuffle_buffer = max(shuffle_buffer, info.num_examples)  # bytes in memory anyway: full shuffle
    if deterministic is None:
        deterministic = seed is not None or not training
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    num_classes = info.num_classes

    if seed is not None and input_context is not None:
        seed = seed + 1_000_003 * input_context.input_pipeline_id  # pipelines see different data and draws
    ds = sources.load_examples(
        source,
        split=split,
        data_dir=data_dir,
        input_context=input_context,
        shuffle=training,
        seed=seed,
        cache=cache,
        shuffle_buffer=shuffle_buffer,
        skip_corrupt=skip_corrupt,
        label_offset=label_offset,
        download=download,
    )

    if skip_corrupt:
        ds = ds.filter(_skip_counter(f"{source} {split}"))

    def check(example):
        """Names the file of a broken image (or out-of-range label) instead of failing inside the decoder."""
        key, label = example["key"], example["label"]
        checks = [
            tf.debugging.Assert(
                augment.check_encoded_image(example["encoded"]),
                [errors.UNDECODABLE_IMAGE, key, "— pass skip_corrupt"],
            ),
            tf.debugging.Assert(
                (label >= 0) & (label < num_classes),
                [f"Label out of range [0, {num_classes}) (check label_offset) in", key, "label", label],
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(example["encoded"]), tf.one_hot(label, num_classes, dtype=tf.float32)

    if training:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds)
        steps = dict(
            random_crop=random_crop,
            fused_crop=fused_crop,
            flip=flip,
            jitter=color_jitter,
            pca_lighting=pca_lighting,
            crop_area_range=tuple(crop_area_range),
        )

        def prepare(example, element_seed):
            encoded, label = check(example)
            return augment.preprocess_for_train(encoded, image_size, element_seed, **steps), label
    else:

        def prepare(example):
            encoded, label = check(example)
            return augment.preprocess_for_eval(augment.decode_image(encoded), image_size), label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if skip_corrupt:
        # Backstop for files that pass the framing check and still fail to decode.
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(
        batch_size,
        drop_remainder=drop_remainder,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    if repeat:
        ds = ds.repeat()
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _skip_counter(name):
    """A filter predicate that drops broken images and reports each with the running count of skips."""
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_images")

    def keep(example):
        ok = augment.check_encoded_image(example["encoded"])

        def report():
            count = skipped.assign_add(1)
            tf.print(
                "WARNING bot_keras.data:",
                name,
                ": skipped undecodable image",
                example["key"],
                "(",
                count,
                "skipped so far )",
                output_stream=sys.stderr,
            )
            return ok

        return tf.cond(ok, lambda: ok, report)

    keep.skipped = skipped
    return keep
