"""Source strings: folder, TFRecord, TFDS (mocked) and synthetic data, and their errors on bad input."""

import io
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tools_module import load_tool

from bot_keras.data import augment, decode, folder, sources, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def jpeg(array, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def colour(value, shape=(12, 16)):
    return np.full((*shape, 3), value, np.uint8)


def write_folder(root, files):
    """files: {"split/class/name.ext": bytes}."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    folder.list_folder.cache_clear()
    return root


def read_keys(ds):
    return sorted(k.decode() for k in ds.map(lambda ex: ex["key"]).as_numpy_iterator())


def load_build_tfrecords():
    return load_tool("build_tfrecords")


# ------------------------------------------------------------------------------------------ source strings


@pytest.mark.parametrize(
    "bad", ["", "imagenet", "tfds:", "folder:", "s3:bucket", "synthetic:3", "synthetic:x"]
)
def test_unknown_or_malformed_source_strings_are_rejected_by_name(bad):
    with pytest.raises(ValueError, match=repr(bad) if bad else "non-empty"):
        sources.dataset_info(bad, split="train")


# ------------------------------------------------------------------------------------------------ folder


def test_folder_classes_are_sorted_folder_names_and_labels_follow(tmp_path):
    root = write_folder(
        tmp_path,
        {
            "train/zebra/a.jpg": jpeg(colour(10)),
            "train/apple/b.JPEG": jpeg(colour(20)),
            "train/apple/c.png": png(colour(30)),
            "train/mango/d.bmp": b"",  # listed by extension; decoding errors come later, in the pipeline
            "train/mango/.DS_Store": b"junk",  # hidden files are ignored
            "val/apple/e.jpg": jpeg(colour(40)),
        },
    )
    info = sources.dataset_info(f"folder:{root}", split="train")
    assert (
        info.class_names == ("apple", "mango", "zebra") and info.num_classes == 3 and info.num_examples == 4
    )
    examples = list(sources.load_examples(f"folder:{root}", split="train").as_numpy_iterator())
    labels = {os.path.basename(ex["key"].decode()): int(ex["label"]) for ex in examples}
    assert labels == {"b.JPEG": 0, "c.png": 0, "d.bmp": 1, "a.jpg": 2}
    assert [ex["encoded"] for ex in examples if ex["key"].endswith(b"a.jpg")][0] == (
        root / "train/zebra/a.jpg"
    ).read_bytes()
    # A relative ROOT is resolved against data_dir.
    assert sources.dataset_info("folder:.", split="val", data_dir=str(root)).num_examples == 1


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.dataset_info(f"folder:{tmp_path / 'nope'}", split="train")
    root = write_folder(tmp_path, {"train/cat/a.jpg": jpeg(colour(1))})
    with pytest.raises(
        FileNotFoundError, match=r"Split 'validation' not found.*available splits: \['train'\]"
    ):
        sources.dataset_info(f"folder:{root}", split="validation")
    (root / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"Class folder .*dog' has no images"):
        sources.dataset_info(f"folder:{root}", split="train")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        sources.dataset_info(f"folder:{root}", split="empty")


def test_folder_non_image_files_are_all_named_in_one_error_or_skipped(tmp_path, caplog):
    names = ["notes.txt", "Thumbs.db", "model.keras"] + [
        f"extra{i:02d}.txt" for i in range(folder.MAX_LISTED_FILES)
    ]
    root = write_folder(
        tmp_path,
        {
            "train/cat/a.jpg": jpeg(colour(1)),
            **{f"train/dog/{n}": b"x" for n in names},
            "train/dog/b.png": png(colour(2)),
        },
    )
    with pytest.raises(ValueError) as error:
        sources.dataset_info(f"folder:{root}", split="train")
    message = str(error.value)
    assert message.startswith(f"{len(names)} files in ") and "skip_corrupt" in message and "\n" not in message
    listed = sorted(names)[: folder.MAX_LISTED_FILES]  # sorted per class folder, the rest counted
    assert all(n in message for n in listed) and f"and {len(names) - len(listed)} more" in message
    assert sources.dataset_info(f"folder:{root}", split="train", skip_corrupt=True).num_examples == 2
    assert f"Skipped {len(names)} non-image files" in caplog.text


def test_folder_sharding_and_shuffling(tmp_path):
    files = {f"train/c{i % 3}/{i:02d}.jpg": jpeg(colour(i)) for i in range(10)}
    root = write_folder(tmp_path, files)
    source = f"folder:{root}"
    everything = read_keys(sources.load_examples(source, split="train"))
    shards = [
        read_keys(
            sources.load_examples(source, split="train", input_context=tf.distribute.InputContext(2, i, 2))
        )
        for i in range(2)
    ]
    assert len(shards[0]) == 5 and len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == everything
    order = lambda **kw: [
        k for k in sources.load_examples(source, split="train", **kw).map(lambda e: e["key"])
    ]
    a, b = order(shuffle=True, seed=3), order(shuffle=True, seed=3)
    assert [x.numpy() for x in a] == [x.numpy() for x in b]
    assert sorted(x.numpy().decode() for x in a) == everything
    cached = sources.load_examples(source, split="train", shuffle=True, seed=3, cache=True)
    assert read_keys(cached) == everything


# ---------------------------------------------------------------------------------------------- tfrecord


def test_build_tfrecords_reencodes_png_and_cmyk_and_the_source_reads_them(tmp_path):
    smooth = np.stack([*np.meshgrid(np.arange(16) * 15, np.arange(12) * 20), np.full((12, 16), 90)], -1)
    smooth = smooth.astype(np.uint8)
    cmyk = io.BytesIO()
    Image.fromarray(smooth).convert("CMYK").save(cmyk, "JPEG", quality=95)
    root = write_folder(
        tmp_path / "images",
        {
            "train/a/1.jpg": jpeg(smooth),
            "train/a/2.JPEG": png(smooth),  # PNG disguised as JPEG
            "train/b/3.jpg": cmyk.getvalue(),
            "train/b/4.jpg": jpeg(smooth[..., 0]),  # grayscale JPEG: kept as is
            "val/a/5.jpg": jpeg(smooth),
            "val/b/6.png": png(smooth),
        },
    )
    out = tmp_path / "records"
    meta = load_build_tfrecords().build(str(root), str(out), ["train", "val"], {"train": 2, "val": 1})
    assert meta == {"class_names": ["a", "b"], "num_examples": {"train": 4, "val": 2}, "label_offset": 0}
    assert sorted(os.listdir(out)) == [
        "dataset_info.json",
        "train-00000-of-00002",
        "train-00001-of-00002",
        "val-00000-of-00001",
    ]
    info = sources.dataset_info(f"tfrecord:{out}", split="train")
    assert (info.num_classes, info.class_names, info.num_examples) == (2, ("a", "b"), 4)
    examples = list(sources.load_examples(f"tfrecord:{out}", split="train").as_numpy_iterator())
    assert sorted(int(ex["label"]) for ex in examples) == [0, 0, 1, 1]
    for ex in examples:
        assert bool(decode.is_jpeg(ex["encoded"]))
        assert int(tf.io.extract_jpeg_shape(ex["encoded"])[2]) in (1, 3)  # no CMYK left
        decoded = decode.decode_image(ex["encoded"]).numpy().astype(int)
        error = min(np.abs(decoded - smooth).mean(), np.abs(decoded - smooth[..., :1]).mean())  # RGB or grey
        assert error < 12, ex["key"]
        assert b"-of-00002#" in ex["key"]
    # A glob with {split} selects the same files.
    glob_info = sources.dataset_info(f"tfrecord:{out}/{{split}}-*", split="val")
    assert glob_info.num_examples == 2


def test_tfrecord_without_metadata_is_scanned_and_label_offset_applies(tmp_path):
    # TensorFlow's ImageNet scripts store 1-based labels; label_offset=1 maps them to 0..K-1.
    path = tmp_path / "train-00000-of-00001"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for label in (1, 2, 3, 3, 2):
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg(colour(label))])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    info = sources.dataset_info(f"tfrecord:{tmp_path}", split="train", label_offset=1)
    assert (info.num_classes, info.num_examples) == (3, 5)
    labels = [
        int(ex["label"])
        for ex in sources.load_examples(f"tfrecord:{tmp_path}", split="train", label_offset=1)
    ]
    assert labels == [0, 1, 2, 2, 1]
    with pytest.raises(FileNotFoundError, match=r"No TFRecord files match .*validation-\*"):
        sources.dataset_info(f"tfrecord:{tmp_path}", split="validation")


# -------------------------------------------------------------------------------------------------- tfds


@pytest.fixture
def mock_cifar10(tmp_path):
    """TFDS cifar10 mocked offline: real feature metadata, 6 train / 4 test examples of random pixels."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name="train", shard_lengths=[6], num_bytes=0),
                tfds.core.SplitInfo(name="test", shard_lengths=[4], num_bytes=0),
            ]
        )
    )
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        yield str(tmp_path)


def test_tfds_source_reads_encoded_images(mock_cifar10):
    info = sources.dataset_info("tfds:cifar10", split="train", data_dir=mock_cifar10)
    assert (info.num_classes, info.num_examples) == (10, 6)
    assert sources.dataset_info("tfds:cifar10", split="train[:50%]", data_dir=mock_cifar10).num_examples == 3
    examples = list(
        sources.load_examples("tfds:cifar10", split="train", data_dir=mock_cifar10).as_numpy_iterator()
    )
    assert len(examples) == 6
    for ex in examples:
        assert ex["encoded"][:4] == b"\x89PNG"  # SkipDecoding: the stored bytes reach the pipeline
        assert decode.decode_image(ex["encoded"]).shape == (32, 32, 3)
        assert 0 <= ex["label"] < 10 and ex["key"].startswith(b"cifar10-train")


def test_tfds_errors(mock_cifar10):
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        sources.dataset_info("tfds:cifar10", split="validation", data_dir=mock_cifar10)
    with pytest.raises(ValueError, match="Unknown TFDS dataset in 'tfds:no_such_dataset'"):
        sources.dataset_info("tfds:no_such_dataset", split="train")


def test_tfds_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar10"):
        sources.dataset_info("tfds:cifar10", split="train", data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_jpeg():
    info = sources.dataset_info("synthetic:100", split="train")
    assert (info.num_classes, info.num_examples, info.class_names) == (10, 100, synthetic.CLASSES)
    assert sources.dataset_info("synthetic:100", split="validation").num_examples == 20
    assert sources.dataset_info("synthetic", split="train").num_examples == 5000
    images, labels = synthetic.split_examples("train", 100)
    assert np.bincount(labels).tolist() == [10] * 10
    assert all(bool(decode.is_jpeg(x)) for x in images)
    assert tuple(decode.decode_image(images[0]).shape) == (64, 64, 3)
    again = synthetic.texture_image(3, np.random.default_rng(5))
    np.testing.assert_array_equal(again, synthetic.texture_image(3, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="splits.*'test'"):
        sources.dataset_info("synthetic", split="test")


def test_synthetic_classes_differ_in_texture_not_just_colour():
    # Gradient energy separates stripe orientations: horizontal stripes change down the columns,
    # vertical ones along the rows (squared differences: edges of >= 60 luma levels dwarf the noise).
    rng = np.random.default_rng(0)
    luma = np.array(augment.LUMA_RGB)
    for _ in range(5):
        h = synthetic.texture_image(0, rng) @ luma
        v = synthetic.texture_image(1, rng) @ luma
        assert (np.diff(h, axis=0) ** 2).mean() > 3 * (np.diff(h, axis=1) ** 2).mean()
        assert (np.diff(v, axis=1) ** 2).mean() > 3 * (np.diff(v, axis=0) ** 2).mean()


def test_dataset_info_is_written_for_tfrecords_metadata_format(tmp_path):
    # The metadata file is plain JSON a user can write by hand for existing shards.
    (tmp_path / "train-0").write_bytes(b"")
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"class_names": ["x", "y"], "num_examples": {"train": 7}, "label_offset": 1})
    )
    info = sources.dataset_info(f"tfrecord:{tmp_path}", split="train")
    assert (info.num_classes, info.num_examples) == (2, 7)
