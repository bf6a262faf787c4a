"""Mixup (Section 5.4): λ's distribution, exact linearity, label sums, low-precision images, tf.data."""

import math

import numpy as np
import pytest
import tensorflow as tf

from bot_keras.data.mixup import mixup, mixup_batch, sample_mixup_lambda

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
