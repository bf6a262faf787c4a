"""Detection sources and pipeline (bot_keras/detection/{sources,data}.py) on tiny data written here."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bot_keras.data.errors import bad_input_message
from bot_keras.detection import data, sources


def write_png(path, height, width):
    tf.io.write_file(path, tf.io.encode_png(tf.zeros([height, width, 3], tf.uint8)))


def voc_xml(width, height, objects):
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_voc(root, images, splits):
    """images: {id: (height, width, objects or a raw XML string)}; splits: {split: [ids]}."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, (height, width, objects) in images.items():
        write_png(os.path.join(root, "JPEGImages", f"{image_id}.png"), height, width)
        xml = objects if isinstance(objects, str) else voc_xml(width, height, objects)
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(xml)
    for split, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return str(root)


# 40×60 image (h×w): a zebra at VOC x 11..30, y 6..20 (1-based inclusive → continuous x 10..30, y 5..20),
# a difficult cat; a 64×32 image with a cat; a 20×20 image without objects.
TINY = {
    "a": (40, 60, [("zebra", False, (11, 6, 30, 20)), ("cat", True, (1, 1, 10, 10))]),
    "b": (64, 32, [("cat", False, (1, 1, 32, 64))]),
    "c": (20, 20, []),
}


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(tmp_path / "mydata", TINY, {"train": ["a", "b", "c"], "val": ["a", "c"]})


def test_voc_classes_are_sorted_names_of_every_xml_and_voc_years_get_the_20(voc_root, tmp_path):
    info = sources.detection_info(f"voc:{voc_root}", split="val")
    assert info.class_names == ("cat", "zebra") and info.num_examples == 2  # 'cat' only in 'a' (and 'b')
    year = write_voc(tmp_path / "VOC2007", {"x": (10, 10, [("dog", False, (1, 1, 5, 5))])}, {"test": ["x"]})
    assert sources.detection_info(f"voc:{year}", split="test").class_names == sources.VOC_CLASSES


def test_splits_joined_with_plus_concatenate(voc_root):
    info = sources.detection_info(f"voc:{voc_root}", split="train+val")
    assert info.num_examples == 5
    paths = sources.read_voc(voc_root, "train").paths + sources.read_voc(voc_root, "val").paths
    assert sources._file_annotations("voc", voc_root, "train+val", None).paths == paths
    with pytest.raises(ValueError, match="empty part"):
        sources.detection_info(f"voc:{voc_root}", split="train+")


def test_eval_batches_hold_pixel_boxes_of_the_padded_input_and_keep_difficult_as_metadata(voc_root):
    ds = data.make_detection_dataset(f"voc:{voc_root}", split="val", image_size=64, global_batch_size=2,
                                     training=False, with_metadata=True)
    images, targets = next(iter(ds))
    assert images.shape == (2, 64, 64, 3)
    # 'a' is 40×60: longer side to 64 → 43×64 (42.67 rounds to 43), scale (43/40, 64/60).
    sy, sx = 43 / 40, 64 / 60
    np.testing.assert_allclose(targets["scale"][0], [sy, sx], rtol=1e-6)
    np.testing.assert_array_equal(targets["image_hw"], [[40, 60], [20, 20]])
    np.testing.assert_allclose(targets["boxes"][0], [[5 * sy, 10 * sx, 20 * sy, 30 * sx],
                                                     [0, 0, 10 * sy, 10 * sx]], rtol=1e-5)
    np.testing.assert_array_equal(targets["labels"], [[1, 0], [-1, -1]])  # 'c' has no boxes: -1 padding
    np.testing.assert_array_equal(targets["difficult"], [[False, True], [False, False]])
    np.testing.assert_array_equal(targets["boxes"][1], -np.ones([2, 4]))
    assert targets["key"][0].numpy().decode().endswith("JPEGImages/a.png")


def test_training_drops_difficult_boxes_and_an_empty_batch_keeps_one_pad_slot(tmp_path):
    root = write_voc(tmp_path / "d", {"a": TINY["a"], "c": TINY["c"], "e": (24, 24, [])},
                     {"train": ["a", "c", "e"], "empty": ["c", "e"]})
    ds = data.make_detection_dataset(f"voc:{root}", split="train", image_size=32, global_batch_size=3,
                                     training=True, seed=1, scale_range=(1.0, 1.0), flip=False)
    _, targets = next(iter(ds))
    assert sorted(targets["labels"].numpy().ravel().tolist()) == [-1, -1, 1]  # the difficult cat is gone
    ds = data.make_detection_dataset(f"voc:{root}", split="empty", image_size=32, global_batch_size=2,
                                     training=True, seed=1)
    _, targets = next(iter(ds))
    # keras-hub's label encoder fails on [B, 0, 4]; every batch keeps at least one -1 slot.
    assert targets["boxes"].shape == (2, 1, 4)
    np.testing.assert_array_equal(targets["labels"], [[-1], [-1]])


@pytest.mark.parametrize(
    "image, message",
    [
        ((10, 10, "<annotation><size><width>10</wid"), r"Malformed XML in annotation .*bad\.xml"),
        ((10, 10, [("cat", False, (5, 1, 5, 4))]), r"bad\.xml, object 0 \(cat\): box needs xmin < xmax"),
        ((10, 10, [("cat", False, (1, 1, 13, 4))]), r"bad\.xml.*lies outside the 10x10 image"),
        ((10, 10, [("dog", False, (1, 1, 3, 4))]), r"bad\.xml: unknown class name 'dog'"),
    ],
    ids=["malformed-xml", "xmin-ge-xmax", "box-outside", "unknown-class"],
)
def test_bad_voc_annotations_are_one_line_errors_naming_the_file(tmp_path, image, message):
    root = write_voc(tmp_path / "d", {"bad": image}, {"train": ["bad"]})
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("cat\n")
    with pytest.raises(ValueError, match=message):
        sources.detection_info(f"voc:{root}", split="train")


def test_voc_box_overshooting_by_a_pixel_is_clipped(tmp_path):
    # labelImg writes 0-based indices: xmin = 0 → continuous -1 → clipped to 0; xmax = 11 > 10 by 1 → 10.
    root = write_voc(tmp_path / "d", {"a": (10, 10, [("cat", False, (0, 1, 11, 10))])}, {"train": ["a"]})
    boxes = sources.read_voc(root, "train").boxes[0]
    np.testing.assert_allclose(boxes, [[0.0, 0.0, 1.0, 1.0]])


def test_voc_annotation_without_its_image_and_image_size_mismatch(tmp_path):
    root = write_voc(tmp_path / "d", {"a": (10, 12, [("cat", False, (1, 1, 5, 5))])},
                     {"train": ["a"], "val": ["a"]})
    os.remove(os.path.join(root, "JPEGImages", "a.png"))
    with pytest.raises(ValueError, match=r"Annotations/a\.xml has no image JPEGImages/a"):
        sources.detection_info(f"voc:{root}", split="train")
    write_png(os.path.join(root, "JPEGImages", "a.png"), 11, 12)  # the XML says 10×12
    ds = data.make_detection_dataset(f"voc:{root}", split="val", image_size=32, global_batch_size=1,
                                     training=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"differs from the annotated size.*a\.png") as e:
        next(iter(ds))
    # The commands print this line (exit 2) instead of TensorFlow's traceback.
    assert bad_input_message(e.value) == ("Bad detection input: image size (h, w) 11 12 differs from the "
                                          f"annotated size 10 12 in {root}/JPEGImages/a.png")


# ------------------------------------------------------------------------------------------------ COCO


def write_coco(folder, split, annotations, images=((1, "one.png", 20, 40),)):
    os.makedirs(folder, exist_ok=True)
    for _, name, height, width in images:
        write_png(os.path.join(folder, name), height, width)
    doc = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
        "categories": [{"id": 7, "name": "zebra"}, {"id": 3, "name": "cat"}],
        "annotations": annotations,
    }
    with open(os.path.join(folder, f"{split}.json"), "w") as f:
        json.dump(doc, f)
    return os.path.join(str(folder), "{split}.json")


def test_coco_boxes_categories_and_crowd(tmp_path):
    pattern = write_coco(tmp_path / "c", "val", [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 2, 10, 8], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40.4, 20], "iscrowd": 1},  # 0.4 px over
    ])
    info = sources.detection_info(f"coco:{pattern}", split="val")
    assert info.class_names == ("cat", "zebra")  # sorted by category id: 3, 7
    a = sources.read_coco(*sources.coco_paths(pattern, "val", None))
    np.testing.assert_allclose(a.boxes[0], [[2 / 20, 4 / 40, 10 / 20, 14 / 40], [0, 0, 1, 1]], rtol=1e-6)
    np.testing.assert_array_equal(a.labels[0], [1, 0])
    np.testing.assert_array_equal(a.difficult[0], [False, True])


@pytest.mark.parametrize(
    "annotation, message",
    [
        ({"id": 5, "image_id": 9, "category_id": 7, "bbox": [1, 1, 2, 2]}, r"annotation id 5: image_id 9 "),
        ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}, r"unknown category_id 1"),
        ({"id": 5, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 2]}, r"box needs xmin < xmax"),
        ({"id": 5, "image_id": 1, "category_id": 7, "bbox": [30, 1, 20, 2]}, r"outside the 40x20 image"),
    ],
    ids=["no-image", "unknown-category", "empty-box", "outside"],
)
def test_bad_coco_annotations_name_the_file(tmp_path, annotation, message):
    pattern = write_coco(tmp_path / "c", "train", [annotation])
    with pytest.raises(ValueError, match=r"val\.json|train\.json") as raised:
        sources.detection_info(f"coco:{pattern}", split="train")
    assert raised.match(message)


def test_coco_missing_image_file_and_pattern_without_split(tmp_path):
    pattern = write_coco(tmp_path / "c", "train", [])
    os.remove(tmp_path / "c" / "one.png")
    with pytest.raises(ValueError, match=r"train\.json: image 'one\.png' not found in"):
        sources.detection_info(f"coco:{pattern}", split="train")
    with pytest.raises(ValueError, match=r"needs '\{split\}'"):
        sources.parse_source("coco:/x/instances.json")


# ------------------------------------------------------------------------------------------------ TFDS


def test_tfds_voc_2007_code_path_with_mocked_records(tmp_path):
    """TFDS's random mock data breaks on voc's object sequences ("length of all elements of one sequence
    should be the same"), so `as_dataset` is mocked with records shaped like voc/2007's (PNG bytes under
    SkipDecoding, normalised yxyx boxes, is_difficult); the real feature metadata is written offline."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("voc/2007", data_dir=str(tmp_path))
    split = tfds.core.SplitInfo(name="test", shard_lengths=[2], num_bytes=0)
    builder.info.set_splits(tfds.core.SplitDict([split]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        png = tf.io.encode_png(tf.zeros([20, 40, 3], tf.uint8))
        return tf.data.Dataset.from_tensors({
            "image": png,
            "image/filename": tf.constant("000001.jpg"),
            "objects": {"bbox": tf.constant([[0.1, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]),
                        "label": tf.constant([14, 3], tf.int64),
                        "is_difficult": tf.constant([False, True]),
                        "is_truncated": tf.constant([False, False]),
                        "pose": tf.constant([0, 0], tf.int64)},
            "labels": tf.constant([14, 3], tf.int64),
            "labels_no_difficult": tf.constant([14], tf.int64),
            "tfds_id": tf.constant("voc-test.tfrecord-00000-of-00001__0"),
        }).repeat(2)

    with tfds.testing.mock_data(num_examples=2, as_dataset_fn=as_dataset, data_dir=str(tmp_path)):
        info = sources.detection_info("tfds:voc/2007", split="test", data_dir=str(tmp_path))
        assert info.class_names == sources.VOC_CLASSES and info.num_examples == 2
        ds = data.make_detection_dataset("tfds:voc/2007", split="test", image_size=64, global_batch_size=2,
                                         training=False, data_dir=str(tmp_path))
        _, targets = next(iter(ds))
    # 20×40 → 32×64 (scale 1.6): the person box y 2..10, x 10..20 → 3.2..16, 16..32; the difficult
    # boat is left out (no with_metadata).
    np.testing.assert_allclose(targets["boxes"][0], [[3.2, 16.0, 16.0, 32.0]], rtol=1e-5)
    np.testing.assert_array_equal(targets["labels"], [[14], [14]])
