"""Where images come from: one source string selects TFDS, TFRecords, an image folder or built-in data.

Every source yields examples `{"encoded": image bytes, "label": int64 class index, "key": a string naming
the file or record}`; decoding is left to the pipeline so that JPEG decoding can be fused with the random
crop (Section 2.1), and `key` is what error messages and skip reports name.

Source strings (the training CLI's `--dataset`; relative paths are resolved against `--data_dir`):
  tfds:NAME[:VERSION]   any TFDS image-classification dataset (`tfds:imagenet2012`, `tfds:cifar10:3.0.2`,
                        `tfds:imagenette/320px-v2`), read with `tfds.decode.SkipDecoding()`; `data_dir` is
                        the TFDS data directory. Splits are TFDS split strings (`train`, `validation`,
                        `train[:90%]`).
  tfrecord:PATTERN      TFRecords with `image/encoded` and `image/class/label` (the ImageNet layout).
                        PATTERN is a directory holding `<split>-*` shards, or a glob; `{split}` in the glob
                        is replaced by the split. `dataset_info.json` next to the shards (written by
                        tools/build_tfrecords.py) gives class names, example counts and the label offset;
                        without it the split's labels are scanned once.
  folder:ROOT           ROOT/<split>/<class>/*.{jpg,jpeg,png,bmp,gif}; class index = sorted class folders.
  synthetic[:N]         built-in, offline, deterministic: 10 classes of procedural textures, 64 px JPEGs,
                        N training images (default 5000) and N // 5 validation images.
"""

import dataclasses
import functools
import json
import logging
import os

import numpy as np
import tensorflow as tf

from bot_keras.data import folder, synthetic

log = logging.getLogger(__name__)

TFRECORD_METADATA = "dataset_info.json"
SOURCE_FORMS = "'tfds:NAME[:VERSION]', 'tfrecord:PATTERN', 'folder:ROOT' or 'synthetic[:N]'"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about one split of a source."""

    num_classes: int
    class_names: tuple
    num_examples: int
    source: str = ""
    split: str = ""


def parse_source(source):
    """Splits a source string into (kind, argument); raises ValueError naming the string if unknown."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"Dataset source must be a non-empty string such as {SOURCE_FORMS}; got {source!r}.")
    kind, _, argument = source.partition(":")
    if kind == "synthetic":
        if argument and not (argument.isdigit() and int(argument) >= 10):
            raise ValueError(f"'synthetic:N' needs an integer N >= 10 training examples; got {source!r}.")
        return kind, argument
    if kind in ("tfds", "tfrecord", "folder"):
        if not argument:
            raise ValueError(f"Dataset source {source!r} is missing its argument; expected {SOURCE_FORMS}.")
        return kind, argument
    raise ValueError(f"Unknown dataset source {source!r}; expected {SOURCE_FORMS}.")


def _resolve(path, data_dir):
    path = os.path.expanduser(path)
    if data_dir and not os.path.isabs(path) and "://" not in path:
        return os.path.join(data_dir, path)
    return path


def dataset_info(source, *, split, data_dir=None, label_offset=None, skip_corrupt=False, download=False):
    """Number of classes, class names and number of examples of one split of a source.

    `label_offset` (TFRecords only) is subtracted from stored labels; None takes it from the shards'
    `dataset_info.json`, else 0. `skip_corrupt` (folders only) leaves out non-image files instead of
    raising. `download` (TFDS only) lets TFDS download and prepare a missing dataset.
    """
    kind, argument = parse_source(source)
    if kind == "synthetic":
        images, labels = synthetic.split_examples(split, synthetic.split_size(argument, split))
        info = (len(synthetic.CLASSES), synthetic.CLASSES, len(labels))
    elif kind == "folder":
        listing = folder.list_folder(_resolve(argument, data_dir), split, skip_corrupt)
        info = (len(listing.class_names), listing.class_names, len(listing.paths))
    elif kind == "tfrecord":
        files, meta = _tfrecord_files(argument, split, data_dir)
        info = _tfrecord_info(tuple(files), json.dumps(meta, sort_keys=True), split, label_offset)
    else:
        builder = _tfds_builder(argument, data_dir, download)
        image_key, label_key = _tfds_keys(builder, argument)
        names = tuple(builder.info.features[label_key].names)
        info = (len(names), names, _tfds_split(builder, argument, split).num_examples)
    num_classes, class_names, num_examples = info
    if num_examples == 0:
        raise ValueError(f"Dataset {source!r} split {split!r} is empty (0 examples).")
    return DatasetInfo(num_classes, tuple(class_names), num_examples, source, split)


def load_examples(
    source,
    *,
    split,
    data_dir=None,
    input_context=None,
    shuffle=False,
    seed=None,
    cache=False,
    shuffle_buffer=10_000,
    skip_corrupt=False,
    label_offset=None,
    download=False,
):
    """A `tf.data.Dataset` of `{"encoded", "label", "key"}` for one split, sharded and (optionally) shuffled.

    With an `input_context`, each input pipeline reads its own share (whole files where there are enough,
    otherwise every n-th example). `cache` keeps the *encoded* bytes in memory after the first pass (for
    small datasets; the pipeline never caches decoded images). Shuffling is of file names before reading
    for folders, of shards and then a `shuffle_buffer` of records for TFRecords and TFDS, and complete for
    in-memory data; `seed` makes it reproducible, and every pass reshuffles.
    """
    kind, argument = parse_source(source)
    num_shards = input_context.num_input_pipelines if input_context else 1
    shard_index = input_context.input_pipeline_id if input_context else 0

    def shard(ds):
        return ds.shard(num_shards, shard_index) if num_shards > 1 else ds

    def shuffle_all(ds, count):
        return ds.shuffle(max(count, 1), seed=seed, reshuffle_each_iteration=True) if shuffle else ds

    if kind == "synthetic":
        images, labels = synthetic.split_examples(split, synthetic.split_size(argument, split))
        keys = [f"synthetic/{split}/{i:05d}" for i in range(len(labels))]
        ds = shard(tf.data.Dataset.from_tensor_slices({"encoded": images, "label": labels, "key": keys}))
        return shuffle_all(ds, len(labels))

    if kind == "folder":
        listing = folder.list_folder(_resolve(argument, data_dir), split, skip_corrupt)
        ds = shard(
            tf.data.Dataset.from_tensor_slices((list(listing.paths), np.array(listing.labels, np.int64)))
        )
        read = lambda path, label: {"encoded": tf.io.read_file(path), "label": label, "key": path}
        count = -(-len(listing.paths) // num_shards)
        if cache:
            ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
            return shuffle_all(ds, count)
        # Shuffle the (cheap) file names completely before reading: folders are sorted by class.
        return shuffle_all(ds, count).map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    if kind == "tfrecord":
        files, meta = _tfrecord_files(argument, split, data_dir)
        offset = _label_offset(label_offset, meta)
        files_ds = tf.data.Dataset.from_tensor_slices(files)
        by_file = len(files) >= num_shards
        if by_file:
            files_ds = shard(files_ds)
        if shuffle:
            files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

        def read_file(path):
            records = tf.data.TFRecordDataset(path).enumerate()
            return records.map(lambda i, record: (path, i, record))

        ds = files_ds.interleave(
            read_file,
            cycle_length=min(16, len(files)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if not by_file:
            ds = shard(ds)
        ds = ds.map(
            lambda path, i, record: _parse_tfrecord(path, i, record, offset),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        ds = _tfds_examples(argument, split, data_dir, input_context, shuffle, seed, download)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


# -------------------------------------------------------------------------------------------- tfrecord

_TFRECORD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def _parse_tfrecord(path, index, record, label_offset):
    example = tf.io.parse_single_example(record, _TFRECORD_FEATURES)
    key = tf.strings.join([path, tf.strings.as_string(index)], separator="#")
    return {
        "encoded": example["image/encoded"],
        "label": example["image/class/label"] - label_offset,
        "key": key,
    }


def _tfrecord_files(pattern, split, data_dir):
    pattern = _resolve(pattern, data_dir)
    if "{split}" in pattern:
        pattern = pattern.replace("{split}", split)
    elif tf.io.gfile.isdir(pattern):
        pattern = os.path.join(pattern, f"{split}-*")
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No TFRecord files match {pattern!r} (split {split!r}).")
    meta_path = os.path.join(os.path.dirname(files[0]), TFRECORD_METADATA)
    meta = json.loads(tf.io.gfile.GFile(meta_path).read()) if tf.io.gfile.exists(meta_path) else {}
    return files, meta


def _label_offset(label_offset, meta):
    return int(meta.get("label_offset", 0) if label_offset is None else label_offset)


@functools.lru_cache(maxsize=8)
def _tfrecord_info(files, meta_json, split, label_offset):
    """(num_classes, class_names, num_examples); cached, since without metadata it scans every record."""
    meta = json.loads(meta_json)
    offset = _label_offset(label_offset, meta)
    class_names = meta.get("class_names")
    num_examples = meta.get("num_examples", {}).get(split)
    if class_names is None or num_examples is None:
        log.warning(
            "No %s next to %s: scanning the labels of %d files.", TFRECORD_METADATA, files[0], len(files)
        )
        labels = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).map(
            lambda r: tf.io.parse_single_example(
                r, {"image/class/label": _TFRECORD_FEATURES["image/class/label"]}
            )["image/class/label"],
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        count, top = labels.reduce((np.int64(0), np.int64(-1)), lambda s, x: (s[0] + 1, tf.maximum(s[1], x)))
        num_examples = int(count) if num_examples is None else num_examples
        if class_names is None:
            class_names = [str(i) for i in range(max(int(top) - offset + 1, 0))]
    return len(class_names), class_names, int(num_examples)


# ------------------------------------------------------------------------------------------------ tfds


def _tfds_builder(name, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset in 'tfds:{name}': {str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it first with "
                f"`tfds build {name}` (--data_dir=DIR for another directory; ImageNet needs its manual "
                "download), or from Python pass download=True."
            )
        builder.download_and_prepare()
    return builder


def _tfds_keys(builder, name):
    import tensorflow_datasets as tfds

    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise ValueError(
            f"TFDS dataset {name!r} is not image classification (needs an Image and a ClassLabel)."
        )
    return images[0], ("label" if "label" in labels else labels[0])


def _tfds_split(builder, name, split):
    try:
        return builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r}; available splits: {sorted(builder.info.splits)} "
            f"({e})."
        ) from None


def _tfds_examples(name, split, data_dir, input_context, shuffle, seed, download):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir, download)
    image_key, label_key = _tfds_keys(builder, name)
    _tfds_split(builder, name, split)
    read_config = tfds.ReadConfig(add_tfds_id=True, input_context=input_context, shuffle_seed=seed)
    ds = builder.as_dataset(
        split=split,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=read_config,
        shuffle_files=shuffle,
    )
    return ds.map(
        lambda ex: {
            "encoded": ex[image_key],
            "label": tf.cast(ex[label_key], tf.int64),
            "key": ex["tfds_id"],
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
