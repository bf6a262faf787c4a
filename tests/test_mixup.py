"""Mixup (Section 5.4): λ's distribution, exact linearity, label sums, low-precision images, tf.data."""

import math

import numpy as np
import pytest
import tensorflow as tf

from bot_keras.data.mixup import cutmix, cutmix_box, mix, mixup, mixup_batch, sample_mix, sample_mixup_lambda

N = 100_000


def beta_moments_match(samples, alpha):
    """Mean ½ and variance 1/(4(2α + 1)) of Beta(α, α), within 5 standard errors for N samples.

    SE(mean) = sqrt(var/N); SE(variance) ≤ ¼/sqrt(N) since (λ − ½)² lies in [0, ¼].
    """
    variance = 1 / (4 * (2 * alpha + 1))
    mean_ok = abs(samples.mean() - 0.5) < 5 * math.sqrt(variance / len(samples))
    var_ok = abs(samples.var() - variance) < 5 * 0.25 / math.sqrt(len(samples))
    return mean_ok and var_ok


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_lambda_has_the_beta_mean_and_variance(alpha):
    samples = sample_mixup_lambda(alpha, seed=[7, 11], shape=(N,)).numpy().astype(np.float64)
    assert samples.min() >= 0 and samples.max() <= 1
    assert beta_moments_match(samples, alpha)


def test_the_moment_check_rejects_a_uniform_sampler_for_alpha_0_2():
    # The bug the check is there for: Uniform(0, 1) has variance 1/12, Beta(0.2, 0.2) has 1/5.6.
    uniform = tf.random.stateless_uniform((N,), seed=[7, 11]).numpy().astype(np.float64)
    assert beta_moments_match(uniform, 1.0)
    assert not beta_moments_match(uniform, 0.2)


def test_lambda_is_stateless_and_seeded():
    a = float(sample_mixup_lambda(0.2, seed=[1, 2]))
    assert a == float(sample_mixup_lambda(0.2, seed=tf.constant([1, 2], tf.int64)))
    others = [float(sample_mixup_lambda(0.2, seed=[1, k])) for k in range(3, 8)]
    assert all(o != a for o in others)


def test_bad_alpha_is_rejected_with_the_value():
    with pytest.raises(ValueError, match="--mixup_alpha must be a number > 0, got 0"):
        sample_mixup_lambda(0, seed=[1, 2])


def batch(dtype=tf.float32):
    images = tf.cast(tf.random.stateless_uniform((4, 3, 3, 2), seed=[0, 1]), dtype)
    labels = tf.one_hot([0, 2, 1, 2], 3) * 0.9 + 0.1 / 3  # smoothed one-hot, ε = 0.1
    return images, labels


def test_mixing_is_exactly_linear_in_lambda_with_the_reversed_batch():
    images, labels = batch()
    x, y = images.numpy().astype(np.float64), labels.numpy().astype(np.float64)
    same_images, same_labels = mixup(images, labels, 1.0)
    np.testing.assert_array_equal(same_images.numpy(), images.numpy())
    partner_images, partner_labels = mixup(images, labels, 0.0)
    np.testing.assert_array_equal(partner_images.numpy(), images.numpy()[::-1])
    np.testing.assert_array_equal(partner_labels.numpy(), labels.numpy()[::-1])
    for lam in (0.1, 0.37, 0.5, 0.93):
        mixed_images, mixed_labels = mixup(images, labels, tf.constant(lam))
        np.testing.assert_allclose(mixed_images.numpy(), lam * x + (1 - lam) * x[::-1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mixed_labels.numpy(), lam * y + (1 - lam) * y[::-1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mixed_labels.numpy().sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_images_keep_their_dtype_and_share_lambda_with_labels(dtype):
    images, labels = batch(dtype)
    lam = 0.3  # not representable: rounds to the dtype's nearest value
    mixed_images, mixed_labels = mixup(images, labels, lam)
    assert mixed_images.dtype == dtype and mixed_labels.dtype == tf.float32
    rounded = float(tf.cast(tf.cast(lam, dtype), tf.float32))
    y = labels.numpy()
    np.testing.assert_allclose(mixed_labels.numpy(), rounded * y + (1 - rounded) * y[::-1], rtol=1e-6)
    x = tf.cast(images, tf.float32).numpy()
    tolerance = 1e-2 if dtype == tf.bfloat16 else 2e-3
    np.testing.assert_allclose(
        tf.cast(mixed_images, tf.float32).numpy(), rounded * x + (1 - rounded) * x[::-1], atol=tolerance
    )


def test_integer_images_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        mixup(tf.zeros((2, 3, 3, 3), tf.uint8), tf.one_hot([0, 1], 2), 0.5)


def test_mixup_batch_is_the_same_eagerly_and_in_tf_data():
    images, labels = batch()
    eager = mixup_batch(images, labels, alpha=0.2, seed=[5, 0])
    lam = float(sample_mixup_lambda(0.2, seed=[5, 0]))
    np.testing.assert_allclose(eager[1].numpy(), mixup(images, labels, lam)[1].numpy(), rtol=1e-6)
    dataset = tf.data.Dataset.from_tensors((images, labels)).map(
        lambda x, y: mixup_batch(x, y, alpha=0.2, seed=tf.constant([5, 0]))
    )
    graph = next(iter(dataset))
    np.testing.assert_array_equal(graph[0].numpy(), eager[0].numpy())
    np.testing.assert_array_equal(graph[1].numpy(), eager[1].numpy())


# --- CutMix and the mixup/CutMix switch -------------------------------------------------------------------


def test_cutmix_box_is_timms_rand_bbox_by_hand():
    # λ = 0.5 on 8×8: sides ⌊8·√0.5⌋ = 5, centre pixel (4, 4), half side 5 // 2 = 2: rows and columns 2..5.
    assert cutmix_box(0.5, [0.5, 0.5], 8, 8).numpy().tolist() == [2, 6, 2, 6]
    # λ = 0.75: sides ⌊8·0.5⌋ = 4 at centre (0, 7): rows -2..1 clip to 0..1, columns 5..8 clip to 5..7.
    assert cutmix_box(0.75, [0.0, 0.99], 8, 8).numpy().tolist() == [0, 2, 5, 8]
    # λ = 1: an empty box; λ = 0: the whole image's side (an odd side loses its last row, as in timm).
    top, bottom, left, right = cutmix_box(1.0, [0.3, 0.6], 8, 6).numpy()
    assert bottom == top and right == left
    assert cutmix_box(0.0, [0.5, 0.5], 8, 6).numpy().tolist() == [0, 8, 0, 6]


def test_cutmix_label_weight_is_exactly_the_pasted_pixel_fraction():
    """Example i is the constant image i, so a pixel equal to the partner's value was pasted."""
    images = tf.constant(np.arange(4)[:, None, None, None] * np.ones((1, 10, 7, 3)), tf.float32)
    labels = tf.one_hot([0, 1, 2, 3], 4)
    checked = 0
    for k in range(60):
        draw = sample_mix([3, k], cutmix_alpha=0.5)
        box = cutmix_box(draw[0], draw[2:], 10, 7)
        mixed, mixed_labels = cutmix(images, labels, box)
        pasted = np.float32(np.sum(mixed.numpy()[0, :, :, 0] == 3.0)) / np.float32(70)
        assert mixed_labels.numpy()[0, 3] == pasted and mixed_labels.numpy()[0, 0] == np.float32(1) - pasted
        np.testing.assert_allclose(mixed_labels.numpy().sum(axis=1), 1.0, rtol=1e-6)
        checked += 0 < pasted < 1
    assert checked > 20  # most draws paste a proper part of the image


def _ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a − F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


def _timm_cutmix_lambdas(lams, size, rng):
    """numpy twin of timm's rand_bbox + correct_lam: λ after clipping the box to a size×size image."""
    cut = (size * np.sqrt(1 - lams)).astype(int)
    centers = rng.integers(0, size, size=(2, len(lams)))
    sides = [np.clip(c + cut // 2, 0, size) - np.clip(c - cut // 2, 0, size) for c in centers]
    return 1 - sides[0] * sides[1] / size**2


@tf.function
def _draw_lambdas(seeds, alpha, size):
    def one(seed):
        draw = sample_mix(seed, cutmix_alpha=alpha)
        box = cutmix_box(draw[0], draw[2:], size, size)
        return tf.stack([draw[0], 1 - tf.cast((box[1] - box[0]) * (box[3] - box[2]), tf.float32) / size**2])

    return tf.map_fn(one, seeds, fn_output_signature=tf.float32)


def test_cutmix_lambda_distribution_ks_against_beta_with_the_clipping():
    alpha, size, n = 0.5, 32, 4000
    seeds = tf.stack([tf.fill([n], 11), tf.range(n)], axis=1)
    drawn, corrected = _draw_lambdas(seeds, alpha, size).numpy().T
    rng = np.random.default_rng(0)
    critical = 1.95 * np.sqrt(2 / n)  # two-sample KS at the 0.1% level, n = m
    # The drawn λ is Beta(α, α); the label weight follows it through timm's clipped box.
    assert _ks_statistic(drawn, rng.beta(alpha, alpha, n)) < critical
    assert _ks_statistic(corrected, _timm_cutmix_lambdas(rng.beta(alpha, alpha, n), size, rng)) < critical
    # Negative controls: the same test rejects a wrong λ (uniform, i.e. α = 1) and ignoring the clipping.
    assert _ks_statistic(corrected, _timm_cutmix_lambdas(rng.uniform(size=n), size, rng)) > critical
    assert _ks_statistic(corrected, rng.beta(alpha, alpha, n)) > critical


def test_switch_picks_cutmix_per_batch_with_its_probability():
    n = 2000
    seeds = tf.stack([tf.fill([n], 5), tf.range(n)], axis=1)
    draw = tf.function(lambda seeds: tf.map_fn(
        lambda seed: sample_mix(seed, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.3), seeds,
        fn_output_signature=tf.float32))
    draws = draw(seeds).numpy()
    share = draws[:, 1].mean()
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    # A mixup batch carries mixup's own λ (same seed stream as mixup alone).
    for k in np.flatnonzero(draws[:20, 1] == 0):
        assert draws[k, 0] == float(sample_mixup_lambda(0.2, seed=tf.constant([5, k], tf.int64)))
    assert sample_mix([5, 1], mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.0).numpy()[1] == 0
    assert sample_mix([5, 1], mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=1.0).numpy()[1] == 1
    assert sample_mix([5, 1], cutmix_alpha=1.0, switch_prob=0.0).numpy()[1] == 1  # CutMix alone: always


def test_mix_applies_the_draw():
    images, labels = batch()
    lam = tf.constant(0.3)
    mixed = mix(images, labels, tf.stack([lam, 0.0, 0.0, 0.0]))
    for got, want in zip(mixed, mixup(images, labels, lam), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    mixed = mix(images, labels, tf.constant([0.5, 1.0, 0.4, 0.6]))
    for got, want in zip(mixed, cutmix(images, labels, cutmix_box(0.5, [0.4, 0.6], 3, 3)), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
