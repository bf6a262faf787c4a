"""Tiny detection data for the tests: coloured rectangles on grey, written as a VOC folder or COCO JSON."""

import json
import os

import numpy as np
import tensorflow as tf
from test_detection_data import voc_xml

CLASSES = ("red", "green", "blue")
COLOURS = np.array([[230, 30, 30], [30, 200, 30], [30, 60, 230]], np.uint8)


def _rectangles(splits, *, size, seed, empty):
    """Yields (split, image id, size×size uint8 image, [(class index, x, y, w, h)]) with 1-2 rectangles an
    image (class = colour), none for the ids in `empty`."""
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        for image_id in (f"{split}{i:03d}" for i in range(count)):
            image = np.full([size, size, 3], 128, np.uint8)
            objects = []
            for _ in range(0 if image_id in empty else rng.integers(1, 3)):
                h, w = rng.integers(size // 4, size // 2 + 1, 2)
                y, x = rng.integers(0, size - h), rng.integers(0, size - w)
                k = int(rng.integers(0, len(CLASSES)))
                image[y:y + h, x:x + w] = COLOURS[k]
                objects.append((k, int(x), int(y), int(w), int(h)))
            yield split, image_id, image, objects


def write_rectangles_voc(root, splits, *, size=64, seed=0, empty=()):
    """Writes `splits` ({split: image count}) of size×size PNGs with 1-2 rectangles each (class = colour)
    and their VOC XML under `root`, plus classes.txt; ids in `empty` get no rectangle. Returns the root."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = {split: [] for split in splits}
    for split, image_id, image, objects in _rectangles(splits, size=size, seed=seed, empty=empty):
        ids[split].append(image_id)
        tf.io.write_file(os.path.join(root, "JPEGImages", f"{image_id}.png"), tf.io.encode_png(image))
        voc_objects = [(CLASSES[k], False, (x + 1, y + 1, x + w, y + h)) for k, x, y, w, h in objects]
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(voc_xml(size, size, voc_objects))  # VOC: 1-based inclusive pixel indices
    for split, split_ids in ids.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(split_ids) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return str(root)


def write_rectangles_coco(root, splits, *, size=64, seed=0, empty=()):
    """The rectangles of `write_rectangles_voc` as COCO: `root/{split}.json` (category ids 1..3 in
    `CLASSES` order, bbox [x, y, w, h] in continuous pixels) beside the PNGs. Returns the `coco:` pattern."""
    os.makedirs(root, exist_ok=True)
    docs = {split: {"images": [], "annotations": [],
                    "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]}
            for split in splits}
    for split, image_id, image, objects in _rectangles(splits, size=size, seed=seed, empty=empty):
        doc = docs[split]
        number = len(doc["images"]) + 1
        tf.io.write_file(os.path.join(root, f"{image_id}.png"), tf.io.encode_png(image))
        doc["images"].append({"id": number, "file_name": f"{image_id}.png", "height": size, "width": size})
        for k, x, y, w, h in objects:
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": number,
                                       "category_id": k + 1, "bbox": [x, y, w, h], "area": w * h,
                                       "iscrowd": 0})
    for split, doc in docs.items():
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(doc, f)
    return os.path.join(str(root), "{split}.json")
