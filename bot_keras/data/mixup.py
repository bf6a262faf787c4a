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

CutMix (Yun et al., 2019; beyond the paper) pastes a box of the partner image instead of blending, as timm's
`Mixup` does it: λ ~ Beta(α, α), a box of sides ⌊H·√(1 − λ)⌋ × ⌊W·√(1 − λ)⌋ centred at a uniform pixel and
clipped to the image (`cutmix_box`, timm's `rand_bbox`), and the labels mixed by the pixels actually pasted
after clipping (timm's `correct_lam`), so the label weights equal the pasted fraction exactly. With both
mixup and CutMix on, each batch uses one or the other, CutMix with probability `switch_prob` (timm's
`switch_prob`, mode "batch"). `sample_mix` draws everything a batch needs in one float32 vector [4]
(`MIX_DRAW`: λ, CutMix or not, the box centre's y and x in [0, 1)) outside the step, where XLA is not
needed (the Gamma sampler does not compile); `mix` applies it.
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


# What `sample_mix` draws for one batch, in order: λ, 1.0 for CutMix (else mixup), the box centre in [0, 1).
MIX_DRAW = ("lambda", "cutmix", "center_y", "center_x")


def sample_mix(seed, *, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5):
    """One batch's draws, float32 [4] in `MIX_DRAW` order (module docstring). With mixup alone λ is
    `sample_mixup_lambda(mixup_alpha, seed=seed)` itself; CutMix's draws come from other streams of `seed`.
    A zero alpha turns that mix off; both zero is λ = 1 (no mixing)."""
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1:
        raise ValueError(
            f"need mixup_alpha >= 0, cutmix_alpha >= 0 and switch_prob in [0, 1]; got {mixup_alpha!r}, "
            f"{cutmix_alpha!r}, {switch_prob!r}."
        )
    seed = tf.cast(seed, tf.int64)
    mixup_lam = sample_mixup_lambda(mixup_alpha, seed=seed) if mixup_alpha > 0 else tf.constant(1.0)
    if cutmix_alpha <= 0:
        return tf.stack([mixup_lam, 0.0, 0.0, 0.0])
    lam_seed, uniform_seed = tf.unstack(tf.random.split(seed, 3)[1:])
    cutmix_lam = sample_mixup_lambda(cutmix_alpha, seed=lam_seed)
    switch, center_y, center_x = tf.unstack(tf.random.stateless_uniform([3], uniform_seed))
    use_cutmix = switch < switch_prob if mixup_alpha > 0 else tf.constant(True)
    lam = tf.where(use_cutmix, cutmix_lam, mixup_lam)
    return tf.stack([lam, tf.cast(use_cutmix, tf.float32), center_y, center_x])


def cutmix_box(lam, center, height, width):
    """timm's `rand_bbox`: int32 [top, bottom, left, right] (bottom/right exclusive) of the box of sides
    ⌊H·√(1 − λ)⌋ × ⌊W·√(1 − λ)⌋ centred at pixel (⌊center_y·H⌋, ⌊center_x·W⌋), clipped to the image."""
    cut = tf.sqrt(1.0 - tf.cast(lam, tf.float32))
    sides = tf.cast(tf.floor(tf.constant([height, width], tf.float32) * cut), tf.int32)
    centers = tf.cast(tf.floor(tf.cast(center, tf.float32) * [height, width]), tf.int32)
    centers = tf.minimum(centers, [height - 1, width - 1])  # a center of exactly 1.0 after rounding
    low = tf.clip_by_value(centers - sides // 2, 0, [height, width])
    high = tf.clip_by_value(centers + sides // 2, 0, [height, width])
    return tf.stack([low[0], high[0], low[1], high[1]])


def cutmix(images, labels, box):
    """Pastes the box [top, bottom, left, right) of each example's partner (the reversed batch) into it;
    labels are mixed with weight (pasted pixels / all pixels) for the partner. Returns (images, labels).
    ``images`` floating [B, H, W, C] (the dtype is kept), ``labels`` floating [B, K]."""
    if not images.dtype.is_floating or not labels.dtype.is_floating:
        raise ValueError(
            "cutmix needs floating images and labels (one-hot), "
            f"got {images.dtype.name} and {labels.dtype.name}."
        )
    height, width = images.shape[1], images.shape[2]
    rows = (tf.range(height) >= box[0]) & (tf.range(height) < box[1])
    columns = (tf.range(width) >= box[2]) & (tf.range(width) < box[3])
    inside = rows[:, None, None] & columns[None, :, None]  # [H, W, 1]
    mixed_images = tf.where(inside, tf.reverse(images, axis=[0]), images)
    pasted = tf.cast((box[1] - box[0]) * (box[3] - box[2]), tf.float32) / float(height * width)
    pasted = tf.cast(pasted, labels.dtype)
    mixed_labels = (1 - pasted) * labels + pasted * tf.reverse(labels, axis=[0])
    return mixed_images, mixed_labels


def mix(images, labels, draw):
    """Mixup or CutMix of a batch as `sample_mix`'s `draw` says (λ = 1 with mixup: unchanged)."""
    lam, use_cutmix, center = draw[0], draw[1] > 0, draw[2:]
    height, width = images.shape[1], images.shape[2]
    return tf.cond(
        use_cutmix,
        lambda: cutmix(images, labels, cutmix_box(lam, center, height, width)),
        lambda: mixup(images, labels, lam),
    )
