"""`make_dataset`: source → decode and augment (Section 2.1) → batches of (images, one-hot labels).

Order of a training pipeline: shard per input pipeline → (cache encoded bytes) → shuffle → per-example
stateless seed → parallel map (framing check, fused decode-and-crop, flip, RandAugment when asked, jitter,
lighting, normalise, one-hot; with `augmentation.on == "device"` the map stops after the flip and
RandAugment, uint8 out, and the train step does the rest) → batch (drop_remainder) → repeat → prefetch.
Validation: no shuffle, resize + centre crop, every example kept (the last batch may be short), one pass.

Training datasets repeat forever by default, and the repeat sits *after* batching: every pass over the data
yields exactly num_examples // global_batch_size global batches (per pipeline: its share // per-replica
batch), each pass reshuffled and re-augmented, so a loop that counts steps_per_epoch = num_examples //
global_batch_size stays aligned with the passes.
"""

import logging
import sys

import tensorflow as tf

from bot_keras import distribute
from bot_keras.data import augment, decode, errors, sources

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
    augmentation=None,
    skipped_files=None,
    download=False,
    start_step=0,
    max_image_pixels=decode.MAX_IMAGE_PIXELS,
):
    """A `tf.data.Dataset` of (float32 images [B, S, S, 3], one-hot float32 labels [B, K]); uint8 images
    when `augmentation.on == "device"` (cropped, resized and flipped; the train or eval step does the rest).

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
      skip_corrupt: undecodable files (zero bytes, not an image, truncated) are skipped, each file reported
        once (however many passes read it) with a warning naming it and the number of distinct files
        skipped so far; by default they raise an error naming the file (`bad_input_message` extracts it).
      max_image_pixels: an image whose header declares more pixels (height × width) is bad input like an
        undecodable one (refused naming the file, or skipped with `skip_corrupt`), checked before decoding
        so that a decompression bomb never allocates its decoded size.
      skipped_files: a `SkippedFiles` that records the files skipped (`count()` at the end of a run); None
        keeps a private one.
      deterministic: keep element order under parallelism; None = True for validation, and for training
        exactly when `seed` is given (otherwise parallel map may reorder for speed).
      repeat, drop_remainder: None = `training`.
      augmentation: an `augment.Augmentation` (None: every step on): the Section 2.1 training steps,
        each switchable for ablations, the crop's area range and sampler (the paper's by default), where
        jitter, lighting and normalisation run (`on`; validation honours `on` too), and RandAugment
        (`randaugment`, off by default; training only).
      start_step: a training pipeline that starts at the batch a run reaches after this many global steps
        (`--resume`): with a `seed`, the batches of an uninterrupted run from there on. The skipped steps'
        records are read, shuffled and batched but not decoded, so only a cached (in-memory) split is
        replayed; an uncached one (ImageNet) starts afresh, a fresh shuffle and fresh crops.
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8; got {image_size!r}.")
    if augmentation is None:
        augmentation = augment.Augmentation()  # every Section 2.1 step, as the paper trains
    if not isinstance(augmentation, augment.Augmentation):
        raise ValueError(f"augmentation must be an augment.Augmentation; got {augmentation!r}.")
    problem = decode.pixel_limit_problem(max_image_pixels)
    if problem:
        raise ValueError(f"max_image_pixels {problem}.")
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

    ds = with_headers(ds)
    if skip_corrupt:
        ds = ds.filter((skipped_files or SkippedFiles()).filter_for(f"{source} {split}", max_image_pixels))

    if training:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds)
        if start_step and cache:
            ds = _skip_batches(ds, batch_size, start_step * _batches_per_step(input_context))
            repeat = False  # _skip_batches repeats, before the skip
        elif start_step:
            log.info(
                "%s %s is not cached: the pipeline starts afresh at step %d (replaying it would read every "
                "finished pass again).", source, split, start_step,
            )

        def prepare(example, element_seed):
            encoded, label = check_example(example, num_classes, max_image_pixels)
            image = augment.preprocess_for_train(
                encoded, image_size, element_seed, augmentation, image_hw=example["header_hw"]
            )
            return image, label
    else:

        def prepare(example):
            encoded, label = check_example(example, num_classes, max_image_pixels)
            image = decode.decode_image(encoded)
            return augment.preprocess_for_eval(image, image_size, on=augmentation.on), label

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


# The data functions are plain tensor code (their branches are tf.cond, tf.where, tf.switch_case or
# Python values), so AutoGraph is told not to convert the entry points, and with them everything they
# call: converting them took ~1.9 s of every training process's start on a 2-core CPU.
@tf.autograph.experimental.do_not_convert
def check_example(example, num_classes, max_image_pixels=decode.MAX_IMAGE_PIXELS):
    """(encoded bytes, one-hot float32 label) of an example of `with_headers`, once checked: a broken
    image, one over the pixel limit or an out-of-range label fails with a message naming the file (`errors`)
    instead of failing inside the decoder; the message is built only for a bad example."""
    key, label, encoded = example["key"], example["label"], example["encoded"]
    shape, framed = example["header_hw"], example["complete"]
    fits = decode.within_pixel_limit(encoded, max_image_pixels, shape)
    labelled = (label >= 0) & (label < num_classes)

    def message():
        undecodable = tf.strings.join(
            [errors.UNDECODABLE_IMAGE, key, "(skip such files with skip_corrupt)"], " "
        )
        out_of_range = tf.strings.join(
            [
                errors.LABEL_OUT_OF_RANGE,
                f"[0, {num_classes}) (check label_offset) in",
                key,
                "label",
                tf.strings.as_string(label),
            ],
            " ",
        )
        too_large = too_large_message(encoded, key, max_image_pixels, shape)
        return tf.where(~framed, undecodable, tf.where(~fits, too_large, out_of_range))

    with tf.control_dependencies([assert_lazily(framed & fits & labelled, message)]):
        return tf.identity(encoded), tf.one_hot(label, num_classes, dtype=tf.float32)


# Examples whose headers `with_headers` reads in one go: the few dozen small ops of a header read then cost
# each image a sixty-fourth of what they would one image at a time (tools/bench_input.py's waterfall).
HEADER_BATCH = 64


def with_headers(ds):
    """The examples of `ds` with `header_hw` (int64 [2]) and `complete` (bool) added: what
    `decode.read_headers` finds in their bytes, read HEADER_BATCH examples at a time, in order."""

    def read(examples):
        shape, complete = decode.read_headers(examples["encoded"])
        return {**examples, "header_hw": shape, "complete": complete}

    return ds.batch(HEADER_BATCH).map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def _batches_per_step(input_context):
    """Per-replica batches one input pipeline yields a global step: its replicas' share."""
    if input_context is None:
        return 1
    return input_context.num_replicas_in_sync // input_context.num_input_pipelines


def _skip_batches(ds, batch_size, count):
    """The undecoded (example, seed) stream of a training pipeline, repeated, without the elements of its
    first `count` batches: batched (drop_remainder, so each pass ends where a pass of decoded batches does),
    repeated as `make_dataset` repeats, `count` batches skipped, unbatched again for the map. Every pass
    reshuffles and redraws exactly as in a pipeline that yielded those batches."""
    return ds.batch(batch_size, drop_remainder=True).repeat().skip(count).unbatch()


@tf.autograph.experimental.do_not_convert
def assert_lazily(ok, message):
    """An assertion (for `tf.control_dependencies`) of the scalar boolean `ok` whose message, `message()` (a
    string tensor), is built only when `ok` is false. `tf.debugging.Assert` computes its data on every
    call, and string work per image is a measurable share of the input pipeline's time
    (tools/bench_input.py)."""

    def fail():
        with tf.control_dependencies([tf.debugging.Assert(ok, [message()])]):
            return tf.identity(ok)

    return tf.cond(ok, lambda: ok, fail)


def too_large_message(encoded, key, max_image_pixels, shape=None):
    """The line naming `key` for an image over the pixel limit (its header's size, the limit, the cure)."""
    return tf.strings.join(
        [
            errors.IMAGE_TOO_LARGE,
            key,
            "is",
            decode.too_large_description(encoded, max_image_pixels, shape),
            "(raise max_image_pixels, or skip such files with skip_corrupt)",
        ],
        " ",
    )


@tf.autograph.experimental.do_not_convert
def assert_pixel_limit(encoded, key, max_image_pixels, shape=None):
    """An assertion (for `tf.control_dependencies` before decoding) that the header of `encoded` declares
    at most `max_image_pixels` pixels; its message names `key` and the image's size. `shape`: the header's
    `decode.image_shape` where the caller has read it already."""
    shape = decode.image_shape(encoded) if shape is None else shape
    return assert_lazily(
        decode.within_pixel_limit(encoded, max_image_pixels, shape),
        lambda: too_large_message(encoded, key, max_image_pixels, shape),
    )


class SkippedFiles:
    """The distinct files a pipeline (or several) skipped as undecodable or over the pixel limit: each is
    reported once, however many passes read it, and `count()` / `keys()` give the tally at the end of a
    run."""

    def __init__(self):
        self._table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=0)

    def count(self):
        return int(self._table.size())

    def checkpointed(self):
        """The table as a `tf.train.Checkpoint` object (keyword arguments of `loop.checkpoint_manager`): a
        resumed run adds to the files its earlier processes skipped and names none of them again."""
        return {"skipped_files": self._table}

    def report(self):
        """Prints the count (the line both training commands end with) and returns it."""
        count = self.count()
        plural = "" if count == 1 else "s"
        print(f"Skipped {count} distinct undecodable file{plural} (--skip_corrupt).", flush=True)
        return count

    def keys(self):
        return sorted(k.decode() for k in self._table.export()[0].numpy())

    def filter_for(self, name, max_image_pixels=decode.MAX_IMAGE_PIXELS):
        """A `Dataset.filter` predicate on examples: `keep` of their bytes and key (and their header, where
        `with_headers` read it)."""

        def keep(example):
            header = (example["header_hw"], example["complete"]) if "complete" in example else None
            return self.keep(example["encoded"], example["key"], name, max_image_pixels, header=header)

        return keep

    def keep(self, encoded, key, name, max_image_pixels=decode.MAX_IMAGE_PIXELS, header=None):
        """False for undecodable `encoded` bytes or an image over `max_image_pixels` (header only, no
        decoding), with a warning naming `key` the first time per file (the fine-tuning pipelines call it
        per image and per mask). `header`: `decode.read_header(encoded)` where the caller has it."""
        table = self._table
        shape, framed = decode.read_header(encoded) if header is None else header
        ok = framed & decode.within_pixel_limit(encoded, max_image_pixels, shape)
        too_large = f"image over the pixel limit of {int(max_image_pixels)}"
        reason = tf.where(framed, too_large, "undecodable image")

        def report():
            def warn():
                with tf.control_dependencies([table.insert(key, tf.constant(1, tf.int64))]):
                    count = table.size()
                line = tf.strings.join([
                    f"WARNING bot_keras.data: {name}: skipped ", reason, " ", key,
                    " (", tf.strings.as_string(count), " distinct files skipped so far)",
                ])
                tf.print(line, output_stream=sys.stderr)  # a scalar string prints unquoted
                return ok

            return tf.cond(tf.equal(table.lookup(key), 0), warn, lambda: ok)

        return tf.cond(ok, lambda: ok, report)
