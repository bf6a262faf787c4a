"""Random erasing: timm's box sampler (a numpy twin, KS on area and aspect), per-image independence, the
N(0, 1) fill, and the train step's use of it."""

import math

import numpy as np
import pytest
import tensorflow as tf
from test_mixup import _ks_statistic

from bot_keras.data.erasing import erase, erasing_boxes, random_erasing


def _timm_boxes(n, height, width, rng, attempts=10):
    """numpy twin of timm's RandomErasing._erase box (count 1, probability 1): (h, w) or None per image."""
    boxes = []
    for _ in range(n):
        for _ in range(attempts):
            area = rng.uniform(0.02, 1 / 3) * height * width
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < width and h < height:
                boxes.append((h, w))
                break
        else:
            boxes.append(None)
    return boxes


def test_erased_boxes_follow_timms_sampler():
    n, height, width = 3000, 24, 20
    boxes = erasing_boxes([4, 2], batch_size=n, height=height, width=width, probability=1.0).numpy()
    h, w = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 1] <= height).all() and (boxes[:, 3] <= width).all()
    twin = [b for b in _timm_boxes(n, height, width, np.random.default_rng(1)) if b is not None]
    twin_h, twin_w = np.array(twin).T
    critical = 1.95 * math.sqrt(2 / n)  # two-sample KS at the 0.1% level
    erased = h > 0
    assert abs(erased.mean() - len(twin) / n) < 4 * math.sqrt(0.25 / n)  # the same share of failures
    assert _ks_statistic(h[erased] * w[erased], twin_h * twin_w) < critical  # area
    assert _ks_statistic(np.log(h[erased] / w[erased]), np.log(twin_h / twin_w)) < critical  # aspect
    # Negative control: a sampler with the aspect drawn uniformly (not log-uniformly) is rejected.
    rng = np.random.default_rng(2)
    wrong = rng.uniform(0.3, 1 / 0.3, n)
    assert _ks_statistic(np.log(h[erased] / w[erased]), np.log(wrong)) > critical


def test_each_image_draws_its_own_box_and_coin():
    n = 4000
    boxes = erasing_boxes([9, 9], batch_size=n, height=32, width=32, probability=0.25).numpy()
    erased = boxes[:, 1] > boxes[:, 0]
    assert abs(erased.mean() - 0.25 * 0.99) < 4 * math.sqrt(0.25 * 0.75 / n)  # nearly every attempt fits
    # Independence: the boxes of neighbouring images are uncorrelated, and are not all the same box.
    tops = boxes[erased, 0].astype(float)
    assert abs(np.corrcoef(tops[:-1], tops[1:])[0, 1]) < 4 / math.sqrt(len(tops))
    assert len({tuple(b) for b in boxes[erased]}) > 0.5 * erased.sum()
    # The same seed gives the same boxes inside a tf.function (stateless).
    again = tf.function(lambda: erasing_boxes([9, 9], batch_size=n, height=32, width=32, probability=0.25))()
    np.testing.assert_array_equal(again.numpy(), boxes)


def test_erase_fills_exactly_the_box_with_standard_normal_noise():
    images = tf.fill([3, 40, 40, 3], 7.0)
    boxes = tf.constant([[2, 30, 5, 35], [0, 0, 0, 0], [10, 11, 0, 40]])
    out = erase(images, boxes, [1, 1]).numpy()
    changed = out != 7.0
    assert changed[0].sum() == 28 * 30 * 3 and changed[0, 2:30, 5:35].all()
    assert not changed[1].any()
    assert changed[2].sum() == 40 * 3 and changed[2, 10].all()
    noise = out[0, 2:30, 5:35].ravel()
    assert abs(noise.mean()) < 5 / math.sqrt(noise.size) and abs(noise.std() - 1) < 0.05


def test_random_erasing_keeps_dtype_and_refuses_a_bad_probability():
    out = random_erasing(tf.zeros([2, 8, 8, 3], tf.float16), probability=1.0, seed=[0, 3])
    assert out.dtype == tf.float16
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\], got 1.5"):
        random_erasing(tf.zeros([2, 8, 8, 3]), probability=1.5, seed=[0, 3])
