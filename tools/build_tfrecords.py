"""Image folder → sharded TFRecords in the ImageNet layout that `tfrecord:` sources read.

    python tools/build_tfrecords.py --input /data/imagenet --output /data/imagenet-tfrecords \
        --splits train,val --shards train=1024,val=128

Reads INPUT/<split>/<class>/*.{jpg,jpeg,png,bmp,gif} (class index = sorted class folders, as `folder:`),
shuffles each split with a fixed seed so every shard mixes classes, and writes OUTPUT/<split>-NNNNN-of-MMMMM
records with `image/encoded` (JPEG bytes), `image/class/label` (index + --label_offset),
`image/class/text` and `image/filename`, plus OUTPUT/dataset_info.json (class names, example counts per
split, label offset) so that training needs no scan. JPEGs are copied as they are; PNG, BMP, GIF and CMYK
JPEGs (ImageNet has both disguised as .JPEG) are re-encoded as RGB JPEG (quality 95) so that the fused
decode-and-crop path applies to every record. Undecodable files stop the run with their name, or are
skipped and listed with --skip_corrupt.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bot_keras  # noqa: E402, F401, I001 - first: it keeps TensorFlow's start-up lines off (bot_keras/console.py)
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from bot_keras import cli  # noqa: E402
from bot_keras.data import decode, folder, sources  # noqa: E402

COMMAND = "tools/build_tfrecords.py"


def _feature_bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _feature_int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def to_rgb_jpeg(encoded, path):
    """The bytes to store: JPEG files unchanged unless CMYK; anything else decoded and re-encoded as JPEG."""
    if not bool(decode.check_encoded_image(encoded)):
        raise ValueError(f"Undecodable image file (empty, not an image, or truncated): {path!r}")
    try:
        if bool(decode.is_jpeg(encoded)) and int(tf.io.extract_jpeg_shape(encoded)[2]) in (1, 3):
            tf.io.decode_jpeg(encoded, channels=3)  # validates the whole stream
            return encoded
        image = decode.decode_image(encoded)
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"Undecodable image file: {path!r} ({e.message.splitlines()[-1]})") from None
    return tf.io.encode_jpeg(image, quality=95).numpy()


def _progress(done, total, label):
    width = 40
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r{label}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def build_split(input_root, output_dir, split, num_shards, *, label_offset=0, skip_corrupt=False, seed=0):
    """Writes one split's shards; returns (number of examples written, class names, skipped paths)."""
    listing = folder.list_folder(os.path.abspath(input_root), split, skip_corrupt)
    order = list(range(len(listing.paths)))
    random.Random(seed).shuffle(order)
    num_shards = max(1, min(num_shards, len(order)))
    writers = [
        tf.io.TFRecordWriter(os.path.join(output_dir, f"{split}-{i:05d}-of-{num_shards:05d}"))
        for i in range(num_shards)
    ]
    written, skipped = 0, []
    try:
        for done, index in enumerate(order, 1):
            path, label = listing.paths[index], listing.labels[index]
            with open(path, "rb") as f:
                encoded = f.read()
            try:
                encoded = to_rgb_jpeg(encoded, path)
            except ValueError:
                if not skip_corrupt:
                    raise
                skipped.append(path)
                continue
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image/encoded": _feature_bytes(encoded),
                        "image/class/label": _feature_int(label + label_offset),
                        "image/class/text": _feature_bytes(listing.class_names[label].encode()),
                        "image/filename": _feature_bytes(os.path.relpath(path, input_root).encode()),
                    }
                )
            )
            # Contiguous runs of the shuffled order per shard, so shard sizes differ by at most one.
            writers[written * num_shards // len(order)].write(example.SerializeToString())
            written += 1
            if done % 100 == 0 or done == len(order):
                _progress(done, len(order), split)
    finally:
        for writer in writers:
            writer.close()
    return written, listing.class_names, skipped


def build(input_root, output_dir, splits, shards, *, label_offset=0, skip_corrupt=False):
    """Converts every split and writes dataset_info.json; returns the metadata written."""
    os.makedirs(output_dir, exist_ok=True)
    meta = {"class_names": None, "num_examples": {}, "label_offset": label_offset}
    for split in splits:
        count, class_names, skipped = build_split(
            input_root,
            output_dir,
            split,
            shards.get(split, 1),
            label_offset=label_offset,
            skip_corrupt=skip_corrupt,
        )
        if meta["class_names"] is not None and list(class_names) != meta["class_names"]:
            raise ValueError(f"Split {split!r} has different class folders from the splits before it.")
        meta["class_names"] = list(class_names)
        meta["num_examples"][split] = count
        if skipped:
            print(f"{split}: skipped {len(skipped)} undecodable files: {skipped}", file=sys.stderr)
    with open(os.path.join(output_dir, sources.TFRECORD_METADATA), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _parse_shards(text, splits):
    if text.isdigit():
        return {split: int(text) for split in splits}
    shards = {}
    for item in text.split(","):
        split, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise cli.SetupError(f"--shards: expected N or split=N,...; got {text!r}")
        shards[split] = int(count)
    return shards


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("input", None, "Image folder root: INPUT/<split>/<class>/*.jpg.", **d)
    flags.DEFINE_string("output", None, "Directory for the shards and dataset_info.json.", **d)
    flags.DEFINE_string("splits", None, "Comma-separated splits (default: every sub-folder).", **d)
    flags.DEFINE_string("shards", "16", "Shards per split: N, or split=N,...", **d)
    flags.DEFINE_integer("label_offset", 0, "Added to stored labels (1: TF's ImageNet).", **d)
    flags.DEFINE_bool("skip_corrupt", False, "Skip undecodable files and list them.", **d)


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not os.path.isdir(f.input):
        raise cli.SetupError(f"--input {f.input!r} is not a directory")
    splits = (
        f.splits.split(",")
        if f.splits
        else sorted(d for d in os.listdir(f.input) if os.path.isdir(os.path.join(f.input, d)))
    )
    shards = _parse_shards(f.shards, splits)
    with cli.setup_errors():
        meta = build(
            f.input, f.output, splits, shards, label_offset=f.label_offset, skip_corrupt=f.skip_corrupt
        )
    print(f"wrote {meta['num_examples']} examples of {len(meta['class_names'])} classes to {f.output}")


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("input", "output"))
