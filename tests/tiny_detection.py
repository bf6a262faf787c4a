"""Tiny detection data for the tests: coloured rectangles on grey, written as a VOC folder."""

import os

import numpy as np
import tensorflow as tf
from test_detection_data import voc_xml

CLASSES = ("red", "green", "blue")
COLOURS = np.array([[230, 30, 30], [30, 200, 30], [30, 60, 230]], np.uint8)


def write_rectangles_voc(root, splits, *, size=64, seed=0, empty=()):
    """Writes `splits` ({split: image count}) of size×size PNGs with 1-2 rectangles each (class = colour)
    and their VOC XML under `root`, plus classes.txt; ids in `empty` get no rectangle. Returns the root."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split, count in splits.items():
        ids = [f"{split}{i:03d}" for i in range(count)]
        for image_id in ids:
            image = np.full([size, size, 3], 128, np.uint8)
            objects = []
            for _ in range(0 if image_id in empty else rng.integers(1, 3)):
                h, w = rng.integers(size // 4, size // 2 + 1, 2)
                y, x = rng.integers(0, size - h), rng.integers(0, size - w)
                k = int(rng.integers(0, len(CLASSES)))
                image[y:y + h, x:x + w] = COLOURS[k]
                objects.append((CLASSES[k], False, (x + 1, y + 1, x + w, y + h)))  # VOC: 1-based inclusive
            tf.io.write_file(os.path.join(root, "JPEGImages", f"{image_id}.png"), tf.io.encode_png(image))
            with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
                f.write(voc_xml(size, size, objects))
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return str(root)
