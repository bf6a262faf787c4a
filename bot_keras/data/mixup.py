"""Mixup (Section 5.4, "Mixup Training"): x̂ = λ·x_i + (1 − λ)·x_j, ŷ = λ·y_i + (1 − λ)·y_j, λ ~ Beta(α, α).

One λ per batch (per replica: apply it to the per-replica batch), the partner j of example i is the
batch reversed (i ↔ B − 1 − i, as in GluonCV's ``train_imagenet.py``, which mixes a batch with its
reverse), and images and labels share λ. Labels are the one-hot (already smoothed, if label smoothing
is on) float vectors from the pipeline, so mixed labels still sum to 1.

Random draws are stateless with an explicit seed (a shape-[2] integer tensor), so a batch's mixing is
reproducible and identical wherever it is computed. λ is drawn as X/(X + Y) with X, Y ~ Gamma(α, 1)
independent — the standard construction of Beta(α, α) from two Gamma draws (no ``tf.random.beta``
exists); a sampler that returned Uniform(0, 1) instead would only be right for α = 1, which the tests
check against the Beta mean ½ and variance 1/(4(2α + 1)).
"""

import tensorflow as tf


def sample_mixup_lambda(alpha, *, seed, shape=()):
    """λ ~ Beta(α, α) as float32, stateless: ``seed`` is a shape-[2] int tensor (or pair of ints).

    ``shape`` draws several independent λ at once (``()`` — one scalar — is what mixup uses).
    """
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"--mixup_alpha must be a number > 0, got {alpha!r}.")
    # Canonical int64 seed: tf.random.split gives different streams for int32 and int64 seeds of the same
    # value, and a seed from tf.data.Dataset.random is int64 while a Python pair becomes int32.
    seeds = tf.random.split(tf.cast(seed, tf.int64), 2)
    # Gamma(α) with α = 0.2 puts mass very close to 0; float64 keeps X + Y from underflowing to 0.
    x = tf.random.stateless_gamma(shape, seed=seeds[0], alpha=float(alpha), dtype=tf.float64)
    y = tf.random.stateless_gamma(shape, seed=seeds[1], alpha=float(alpha), dtype=tf.float64)
    total = x + y
    lam = tf.where(total > 0, x / tf.where(total > 0, total, 1.0), 0.5)
    return tf.cast(lam, tf.float32)


def mixup(images, labels, lam):
    """Mix each example with its partner in the reversed batch, with the same λ for images and labels.

    ``images``: floating ``[B, ...]`` (float32, float16 or bfloat16; the result keeps the dtype);
    ``labels``: floating ``[B, K]``. λ is first rounded to the images' dtype and that same value is used
    for the labels, so a float16 batch's images and labels are mixed with exactly one λ.
    """
    if not images.dtype.is_floating or not labels.dtype.is_floating:
        raise ValueError(
            "mixup needs floating images and labels (one-hot), "
            f"got {images.dtype.name} and {labels.dtype.name}."
        )
    lam_images = tf.cast(lam, images.dtype)
    lam_labels = tf.cast(lam_images, labels.dtype)
    mixed_images = lam_images * images + (1 - lam_images) * tf.reverse(images, axis=[0])
    mixed_labels = lam_labels * labels + (1 - lam_labels) * tf.reverse(labels, axis=[0])
    return mixed_images, mixed_labels


def mixup_batch(images, labels, *, alpha, seed):
    """``mixup`` with λ drawn by ``sample_mixup_lambda(alpha, seed=seed)``; returns (images, labels).

    Works eagerly, in a ``tf.function`` train step and in ``tf.data`` ``map`` (seed e.g. from
    ``tf.data.Dataset.random`` or ``(run_seed, batch_index)``; give each replica a different seed).
    """
    return mixup(images, labels, sample_mixup_lambda(alpha, seed=seed))
