"""Joint augmentation keeps image and mask aligned: the image's colour encodes the mask's class."""

import numpy as np
import pytest
import tensorflow as tf

from bot_keras.data.augment import MEAN_RGB, STD_RGB
from bot_keras.segmentation import augment

PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.uint8)


def class_image(height=40, width=56, seed=0):
    """A mask of rectangles (classes 0..3, a 255 strip) and an image whose colour is PALETTE[class]."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.int32)
    for k in (1, 2, 3):
        y, x = rng.integers(0, height - 10), rng.integers(0, width - 10)
        mask[y:y + rng.integers(6, 16), x:x + rng.integers(6, 20)] = k
    mask[:, :3] = 255  # an unlabelled border, as VOC has
    image = np.where((mask == 255)[..., None], 0, PALETTE[np.minimum(mask, 3)]).astype(np.uint8)
    return image, mask


def denormalize(image):
    return np.asarray(image) * np.array(STD_RGB) + np.array(MEAN_RGB)


def check_agreement(image, mask):
    """Exact colour at interior pixels, the padding 0 ↔ 255.

    Interior: the 5×5 neighbourhood holds one class. Bilinear reads the two source pixels around a sample,
    up to 1 source pixel = `scale` ≤ 2 output pixels away, so that is where the image may blend classes.
    """
    image, mask = denormalize(image), np.asarray(mask)
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 255}  # nearest neighbour: no interpolated ids
    padded = np.pad(mask, 2, constant_values=-1)  # unknown beyond the crop: never interior
    windows = np.stack([padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
                        for dy in range(5) for dx in range(5)])
    interior = (windows == mask).all(axis=0) & (mask != 255)
    assert interior.sum() > 0.2 * (mask != 255).sum() > 0
    np.testing.assert_allclose(image[interior], PALETTE[mask[interior]], atol=1e-2)
    # Every labelled pixel's colour is nearest to its own class's (bilinear blends only across an edge).
    labelled = mask != 255
    nearest = np.argmin(((image[labelled][:, None] - PALETTE[None]) ** 2).sum(-1), axis=1)
    assert (nearest == mask[labelled]).mean() > 0.95
    return image, mask


@pytest.mark.parametrize("seed", range(6))
def test_train_augmentation_keeps_image_and_mask_aligned(seed):
    image, mask = class_image(seed=seed)
    out_image, out_mask = augment.preprocess_for_train(image, mask, 48, seed=[seed, 7])
    assert out_image.shape == (48, 48, 3) and out_mask.shape == (48, 48) and out_mask.dtype == tf.int32
    check_agreement(out_image, out_mask)


def test_each_step_alone_keeps_alignment_and_flip_is_exact():
    image, mask = class_image()
    for scale in (0.5, 0.77, 1.0, 1.37, 2.0):
        scaled = augment.scale_pair(image, tf.constant(mask), tf.constant(scale))
        assert scaled[1].shape[:2] == (round(40 * scale), round(56 * scale))
        check_agreement((scaled[0] - MEAN_RGB) / STD_RGB, scaled[1])
    flipped_image, flipped_mask = augment.flip_pair(image, tf.constant(mask), tf.constant(True))
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])


def test_crop_pads_with_the_ignore_label_and_zero():
    image, mask = class_image(20, 24)
    out_image, out_mask = augment.random_crop(tf.ones((20, 24, 3)), tf.constant(mask), 32, seed=[1, 2])
    # The crop is larger than the image: the whole image sits at the top left, padding everywhere else.
    np.testing.assert_array_equal(out_mask[:20, :24], mask)
    assert (np.asarray(out_mask)[20:] == 255).all() and (np.asarray(out_mask)[:, 24:] == 255).all()
    assert (np.asarray(out_image)[20:] == 0).all() and (np.asarray(out_image)[:20, :24] == 1).all()


def test_random_draws_cover_the_ranges_and_repeat_with_the_seed():
    image, mask = class_image()
    a = augment.preprocess_for_train(image, mask, 32, seed=[3, 4])
    b = augment.preprocess_for_train(image, mask, 32, seed=[3, 4])
    np.testing.assert_array_equal(a[1], b[1])
    sizes, flips = [], 0
    for i in range(200):
        scaled = augment.random_scale(image, tf.constant(mask), [i, 0])
        sizes.append(scaled[1].shape[0] / 40)
        flips += bool(np.asarray(augment.random_flip(image, tf.constant(mask), [i, 1])[1])[0, -1] == 255)
    assert 0.5 <= min(sizes) < 0.6 and 1.9 < max(sizes) <= 2.0
    assert 70 < flips < 130  # p = 0.5, n = 200: mean 100, sd ~7


def test_same_result_inside_tf_data():
    image, mask = class_image()
    eager = augment.preprocess_for_train(image, mask, 32, seed=[5, 6])
    ds = tf.data.Dataset.from_tensors((image, mask)).map(
        lambda i, m: augment.preprocess_for_train(i, m, 32, seed=tf.constant([5, 6], tf.int64)))
    graph = next(iter(ds))
    np.testing.assert_allclose(graph[0], eager[0], atol=1e-5)
    np.testing.assert_array_equal(graph[1], eager[1])


def test_eval_pads_the_whole_image_or_centre_crops():
    image, mask = class_image()
    out_image, out_mask = augment.preprocess_for_eval(image, mask, 64)
    np.testing.assert_array_equal(out_mask[:40, :56], mask)
    assert (np.asarray(out_mask)[40:] == 255).all()
    check_agreement(out_image, out_mask)
    out_image, out_mask = augment.preprocess_for_eval(image, mask, 32, mode="center")
    assert out_mask.shape == (32, 32)
    check_agreement(out_image, out_mask)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the evaluation size 32"):
        augment.preprocess_for_eval(image, mask, 32)
