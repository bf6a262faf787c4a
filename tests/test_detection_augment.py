"""Boxes stay on their objects through every detection transform (bot_keras/detection/augment.py)."""

import numpy as np
import pytest
import tensorflow as tf

from bot_keras.data.augment import normalize
from bot_keras.detection import augment

# A white rectangle on black near the top-left corner (so crops can lose it): rows 2..8, columns 3..11 of a
# 30×50 image (continuous edges, yxyx).
H, W = 30, 50
BOX = (2.0, 3.0, 9.0, 12.0)
WHITE_MIDPOINT = float(normalize(tf.fill([1, 1, 3], 127.5))[0, 0, 0])  # red channel halfway black→white


def rectangle_image():
    image = np.zeros([H, W, 3], np.uint8)
    y0, x0, y1, x1 = (int(v) for v in BOX)
    image[y0:y1, x0:x1] = 255
    return tf.constant(image)


def bright_extent(normalized):
    """yxyx continuous edges of the pixels brighter than halfway between black and white; None if none."""
    rows, cols = np.nonzero(np.asarray(normalized)[..., 0] > WHITE_MIDPOINT)
    if rows.size == 0:
        return None
    return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32)


def test_flip_left_right_mirrors_boxes_exactly():
    image = tf.zeros([4, 10, 3])
    _, boxes = augment.flip_left_right(image, tf.constant([[1.0, 2.0, 3.0, 5.0]]), True)
    np.testing.assert_array_equal(boxes, [[1.0, 5.0, 3.0, 8.0]])  # x 2..5 of 10 → 10-5 .. 10-2
    _, boxes = augment.flip_left_right(image, tf.constant([[1.0, 2.0, 3.0, 5.0]]), False)
    np.testing.assert_array_equal(boxes, [[1.0, 2.0, 3.0, 5.0]])


def test_clip_boxes_clips_and_drops_the_ones_that_fell_out():
    boxes = tf.constant([[-5.0, 2.0, 10.0, 20.0],   # partly above: clipped to y 0..10, x 2..16
                         [3.0, 15.5, 9.0, 30.0],    # 0.5 px left inside: dropped
                         [20.0, 1.0, 30.0, 4.0]])   # entirely below the 16 px canvas: dropped
    clipped, keep = augment.clip_boxes(boxes, 16)
    np.testing.assert_array_equal(clipped[0], [0.0, 2.0, 10.0, 16.0])
    np.testing.assert_array_equal(keep, [True, False, False])


@pytest.mark.parametrize("in_graph", [False, True], ids=["eager", "tf.data"])
def test_train_transform_keeps_the_box_on_the_rectangle(in_graph):
    # Scales 0.5-3 of a 48 px fit: some draws pad, some crop through the rectangle, some crop it out.
    seeds = tf.constant([[s, 7] for s in range(24)], tf.int64)
    boxes = tf.constant([BOX])

    def transform(seed):
        return augment.preprocess_for_train(rectangle_image(), boxes, 48, seed, scale_range=(0.5, 3.0))

    if in_graph:
        results = list(tf.data.Dataset.from_tensor_slices(seeds).map(transform).as_numpy_iterator())
    else:
        results = [tuple(t.numpy() for t in transform(seed)) for seed in seeds]
    kept = dropped = 0
    for image, out_boxes, keep in results:
        assert image.shape == (48, 48, 3)
        extent = bright_extent(image)
        if keep[0]:
            kept += 1
            np.testing.assert_allclose(out_boxes[0], extent, atol=1.0)
        else:
            dropped += 1
            # Dropped only when less than a pixel of the rectangle is left in the canvas.
            assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= 1
    assert kept >= 12 and dropped >= 1  # both branches were exercised


def test_eval_transform_fits_the_longer_side_pads_and_maps_back():
    image, boxes, scale = augment.preprocess_for_eval(rectangle_image(), tf.constant([BOX]), 64)
    # 30×50 → longer side 64: 38×64 (30 · 64/50 = 38.4 → 38), so scale = (38/30, 64/50).
    np.testing.assert_allclose(scale, [38 / 30, 64 / 50], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], [2 * 38 / 30, 3 * 1.28, 9 * 38 / 30, 12 * 1.28], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], bright_extent(image), atol=1.0)
    np.testing.assert_array_equal(image[38:], 0.0)  # padding is 0 after normalisation (the mean colour)
    np.testing.assert_allclose(boxes / tf.tile(scale, [2]), [BOX], rtol=1e-6)  # back to original pixels
