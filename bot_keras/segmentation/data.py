"""Segmentation data: paired images and class-index masks from a source string, batched for training/eval.

Sources (relative paths resolved against `data_dir`):
  seg_folder:ROOT   ROOT/<split>/images/<stem>.{jpg,jpeg,png} with ROOT/<split>/masks/<stem>.png and
                    ROOT/classes.txt (one name a line, index order). Masks hold class ids, 255 = ignore.
  voc:ROOT          the VOCdevkit layout (ROOT = e.g. VOCdevkit/VOC2012): JPEGImages/<id>.jpg,
                    SegmentationClass/<id>.png, ids in ImageSets/Segmentation/<split>.txt; 21 classes.
  tfds:scene_parse150   ADE20K SceneParsing (the paper's Section 6.2 data) through TFDS: 150 classes;
                    its label 0 ("other") becomes 255 and k becomes k − 1, as GluonCV's ADE20K loader does.

Masks: a grayscale PNG's values are the class ids. A palette PNG (VOC's SegmentationClass) is read as palette
*indices*: TensorFlow's PNG decoder expands a palette to RGB, so the RGB colours are mapped back through the
VOC colour map (index k ↔ the bit-interleaved colour of VOC's devkit, 255 ↔ (224, 224, 192)); a colour
outside it is an error naming the file. (Palette PNGs with other colour maps: save them as grayscale.)

Bad input fails with one line naming the file: a missing mask or id list (when listing), and, when the
example is read, an unreadable image or mask, a mask whose size differs from its image, or a class id
>= num_classes other than 255 (`tf.errors.InvalidArgumentError` whose message names the file).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from bot_keras.data import decode as image_ops
from bot_keras.data.errors import BAD_SEGMENTATION_INPUT, SKIP_CURE
from bot_keras.data.pipeline import SkippedFiles, assert_lazily, assert_pixel_limit, per_replica_batch_size
from bot_keras.run_dir import read_class_names
from bot_keras.segmentation import augment
from bot_keras.segmentation.metrics import IGNORE_LABEL

SOURCE_FORMS = "'seg_folder:ROOT', 'voc:ROOT' or 'tfds:scene_parse150'"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
ADE20K_NUM_CLASSES = 150
TFDS_DATASETS = ("scene_parse150",)


@dataclasses.dataclass(frozen=True)
class SegmentationInfo:
    num_classes: int
    class_names: tuple
    num_examples: int


def voc_colormap(size=256):
    """VOC devkit's `labelcolormap`: index k's colour takes k's bits 0, 1, 2 as R, G, B's bits 7, 6, ..."""
    colours = np.zeros((size, 3), np.uint8)
    for k in range(size):
        value, c = k, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                c[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours[k] = c
    return colours


def parse_source(source):
    kind, _, argument = str(source).partition(":")
    if kind not in ("seg_folder", "voc", "tfds") or not argument:
        raise ValueError(f"Unknown segmentation dataset {source!r}; expected {SOURCE_FORMS}.")
    if kind == "tfds" and argument not in TFDS_DATASETS:
        raise ValueError(f"TFDS segmentation datasets supported: {', '.join(TFDS_DATASETS)}; got {source!r}.")
    return kind, argument


def _resolve(path, data_dir):
    path = os.path.expanduser(path)
    return os.path.join(data_dir, path) if data_dir and not os.path.isabs(path) else path


def list_pairs(source, split, data_dir=None):
    """(image paths, mask paths, class names) of a file source; errors name the missing file or split."""
    kind, argument = parse_source(source)
    root = _resolve(argument, data_dir)
    if kind == "seg_folder":
        classes = os.path.join(root, "classes.txt")
        if not os.path.isfile(classes):
            raise FileNotFoundError(f"{source!r}: missing {classes} (one class name a line).")
        image_dir, mask_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{source!r} has no split {split!r}: missing directory {image_dir}.")
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
        images = [os.path.join(image_dir, n) for n in names]
        masks = [os.path.join(mask_dir, os.path.splitext(n)[0] + ".png") for n in names]
        class_names = read_class_names(classes)
    else:
        ids_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(ids_file):
            raise FileNotFoundError(f"{source!r} has no split {split!r}: missing {ids_file}.")
        with open(ids_file, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
        images = [os.path.join(root, "JPEGImages", f"{i}.jpg") for i in ids]
        masks = [os.path.join(root, "SegmentationClass", f"{i}.png") for i in ids]
        class_names = VOC_CLASSES
    for image, mask in zip(images, masks, strict=True):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{source!r}: missing image {image}.")
        if not os.path.isfile(mask):
            raise FileNotFoundError(f"{source!r}: missing mask {mask} for image {image}.")
    if not images:
        raise ValueError(f"Dataset {source!r} split {split!r} is empty (0 images).")
    return images, masks, tuple(class_names)


def largest_image(source, split, data_dir=None, *, max_image_pixels=image_ops.MAX_IMAGE_PIXELS):
    """(path, height, width) of the image of a file source's split with the longest side, from the files'
    headers (`decode.file_image_shapes`: no decoding); None when no header can be read. Images over
    `max_image_pixels` are left out: the pipeline refuses (or skips) them."""
    images, _, _ = list_pairs(source, split, data_dir)
    shapes = image_ops.file_image_shapes(images)
    readable = (shapes > 0).all(axis=1) & (shapes[:, 0] * shapes[:, 1] <= max_image_pixels)
    if not readable.any():
        return None
    longest = np.where(readable, shapes.max(axis=1), -1)
    i = int(np.argmax(longest))  # the first of equals: the order of list_pairs
    return images[i], int(shapes[i, 0]), int(shapes[i, 1])


def _tfds_builder(name, data_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; run "
                                f"`tfds build {name}` (with --data_dir).")
    return builder


def dataset_info(source, *, split, data_dir=None):
    kind, argument = parse_source(source)
    if kind == "tfds":
        builder = _tfds_builder(argument, data_dir)
        names = tuple(f"class_{k}" for k in range(ADE20K_NUM_CLASSES))  # TFDS ships no names for them
        return SegmentationInfo(ADE20K_NUM_CLASSES, names, builder.info.splits[split].num_examples)
    images, _, names = list_pairs(source, split, data_dir)
    return SegmentationInfo(len(names), names, len(images))


def ade20k_mask(annotation):
    """TFDS scene_parse150 annotation (uint8 [H, W] or [H, W, C]) → ids: 0 → 255, k → k − 1."""
    annotation = tf.cast(annotation, tf.int32)
    if annotation.shape.rank == 3:
        annotation = annotation[..., 0]
    return tf.where(annotation == 0, IGNORE_LABEL, annotation - 1)


def _is_palette_png(encoded):
    # PNG: 8-byte signature, IHDR length + type (8 bytes), width, height, bit depth, then the colour type.
    return tf.equal(tf.strings.substr(encoded, 25, 1), b"\x03")


# Plain tensor code: not converted by AutoGraph (why: the note above pipeline.check_example).
@tf.autograph.experimental.do_not_convert
def decode_mask(encoded, path):
    """PNG bytes → int32 [H, W] class ids (grayscale values, or palette indices via the VOC colour map)."""
    def palette():
        rgb = tf.cast(tf.io.decode_png(encoded, channels=3), tf.int32)
        codes = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
        colours = voc_colormap().astype(np.int32)
        table = colours[:, 0] * 65536 + colours[:, 1] * 256 + colours[:, 2]
        matches = tf.equal(codes[..., None], tf.constant(table))
        _check(tf.reduce_all(tf.reduce_any(matches, -1)), "mask colour outside the VOC palette in ", path)
        return tf.argmax(tf.cast(matches, tf.int32), axis=-1, output_type=tf.int32)

    def grayscale():
        return tf.cast(tf.io.decode_png(encoded, channels=1, dtype=tf.uint8)[..., 0], tf.int32)

    return tf.cond(_is_palette_png(encoded), palette, grayscale)


def _check(condition, *message):
    """An in-graph check whose message `bot_keras.data.errors.bad_input_message` recognises (one line),
    built only when `condition` fails."""
    return assert_lazily(condition, lambda: tf.strings.join([BAD_SEGMENTATION_INPUT + " ", *message]))


def _is_png(encoded):
    return tf.equal(tf.strings.substr(encoded, 0, 8), image_ops.PNG_MAGIC)


@tf.autograph.experimental.do_not_convert
def decode_pair(encoded, encoded_mask, image_path, mask_path, num_classes,
                max_image_pixels=image_ops.MAX_IMAGE_PIXELS):
    """Checks (framing, the pixel limit from the headers) and decodes one pair's bytes: uint8 [H, W, 3],
    int32 [H, W]; errors name the file."""
    (image_shape, image_ok), (mask_shape, mask_ok) = map(image_ops.read_header, (encoded, encoded_mask))
    checks = [
        _check(image_ok, "unreadable image file ", image_path, " " + SKIP_CURE),
        _check(_is_png(encoded_mask) & mask_ok,
               "unreadable mask file (not a PNG) ", mask_path, " " + SKIP_CURE),
        assert_pixel_limit(encoded, image_path, max_image_pixels, image_shape),
        assert_pixel_limit(encoded_mask, mask_path, max_image_pixels, mask_shape),
    ]
    with tf.control_dependencies(checks):
        image = image_ops.decode_image(encoded)
        mask = decode_mask(encoded_mask, mask_path)
    return check_pair(image, mask, num_classes, image_path, mask_path)


@tf.autograph.experimental.do_not_convert
def check_pair(image, mask, num_classes, image_name, mask_name):
    """Asserts equal sizes and ids < num_classes (or 255); returns (image, mask) once checked."""
    size = tf.strings.reduce_join(tf.strings.as_string(tf.shape(mask)[:2]), separator="x")
    image_size = tf.strings.reduce_join(tf.strings.as_string(tf.shape(image)[:2]), separator="x")
    bad = tf.reduce_max(tf.where(mask == IGNORE_LABEL, -1, mask))
    checks = [
        _check(tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(mask)[:2])),
               "mask ", mask_name, " is ", size, " but its image ", image_name, " is ", image_size),
        _check(bad < num_classes, "mask ", mask_name, " holds class id ", tf.strings.as_string(bad),
               f" >= num_classes ({num_classes}) and not {IGNORE_LABEL}"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(image), tf.identity(mask)


def _tfds_pairs(name, split, data_dir, input_context, shuffle, seed):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    read_config = tfds.ReadConfig(add_tfds_id=True, input_context=input_context, shuffle_seed=seed)
    ds = builder.as_dataset(split=split, read_config=read_config, shuffle_files=shuffle)

    def convert(example):
        mask = ade20k_mask(example["annotation"])
        return check_pair(example["image"], mask, ADE20K_NUM_CLASSES, example["tfds_id"], example["tfds_id"])

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def make_segmentation_dataset(source, *, split, crop_size, global_batch_size, training, data_dir=None,
                              input_context=None, seed=None, eval_mode="pad", scale_range=augment.SCALE_RANGE,
                              flip=True, cache=False, repeat=None, drop_remainder=None, skip_corrupt=False,
                              skipped_files=None, max_image_pixels=image_ops.MAX_IMAGE_PIXELS):
    """Batches of (float32 normalised images [B, S, S, 3], int32 masks [B, S, S]), S = `crop_size`.

    Training: shuffled, `augment.preprocess_for_train` (random scale, crop padded with 255, flip) with
    per-example stateless seeds from `seed`, repeated, full batches only. Evaluation: `preprocess_for_eval`
    with `eval_mode` ("pad": the whole image padded to S, mask padded with 255; "center": GluonCV's resize +
    centre crop), one pass, last batch kept. `cache` keeps the decoded pairs in memory (small datasets).
    `skip_corrupt` skips a pair whose image or mask is undecodable or over `max_image_pixels` (from the
    headers), naming the file once in `skipped_files` (a `bot_keras.data.SkippedFiles`); without it such a
    file stops the run with one line naming it.
    """
    if eval_mode not in augment.EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {augment.EVAL_MODES}, got {eval_mode!r}")
    batch_size = per_replica_batch_size(global_batch_size, input_context)
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    kind, argument = parse_source(source)
    if kind == "tfds":
        pairs = _tfds_pairs(argument, split, data_dir, input_context, training, seed)
    else:
        images, masks, names = list_pairs(source, split, data_dir)
        files = tf.data.Dataset.from_tensor_slices((images, masks))
        if input_context is not None and input_context.num_input_pipelines > 1:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if training and not cache:
            files = files.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        pairs = files.map(lambda i, m: (tf.io.read_file(i), tf.io.read_file(m), i, m),
                          num_parallel_calls=tf.data.AUTOTUNE)
        if skip_corrupt:
            skipped, name = skipped_files or SkippedFiles(), f"{source} {split}"
            pairs = pairs.filter(lambda image, mask, i, m: skipped.keep(image, i, name, max_image_pixels)
                                 & skipped.keep(mask, m, name, max_image_pixels))
        pairs = pairs.map(
            lambda image, mask, i, m: decode_pair(image, mask, i, m, len(names), max_image_pixels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if cache:
        pairs = pairs.cache()
        if training:
            pairs = pairs.shuffle(1000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        pairs = pairs.repeat()
    if training:
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((pairs, seeds)).map(
            lambda pair, s: augment.preprocess_for_train(*pair, crop_size, s, scale_range=scale_range,
                                                         flip=flip),
            num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = pairs.map(lambda i, m: augment.preprocess_for_eval(i, m, crop_size, eval_mode),
                       num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
