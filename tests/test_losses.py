"""Label smoothing (Section 5.2) and knowledge distillation (Section 5.3) against hand computations."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras.losses import classification_loss, distillation_loss


def numpy_cross_entropy(targets, logits):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return -(np.asarray(targets, np.float64) * log_probs).sum(-1)


def test_cross_entropy_hand_values():
    # softmax([0, log 3]) = [1/4, 3/4].
    logits = tf.constant([[0.0, math.log(3.0)]])
    labels = tf.constant([[0.0, 1.0]])
    assert float(classification_loss(0.0)(labels, logits)) == pytest.approx(-math.log(0.75), rel=1e-6)
    # ε = 0.2, K = 2: targets 1 − ε + ε/K = 0.9 and ε/K = 0.1.
    want = -0.1 * math.log(0.25) - 0.9 * math.log(0.75)  # 0.3975433...
    assert float(classification_loss(label_smoothing=0.2)(labels, logits)) == pytest.approx(want, rel=1e-6)
    # Uniform logits give log K whatever the smoothing.
    uniform = classification_loss(0.1)(tf.one_hot([2], 4), tf.zeros([1, 4]))
    assert float(uniform) == pytest.approx(math.log(4.0), rel=1e-6)


def test_label_smoothing_matches_a_numpy_implementation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32) * 3
    labels = np.eye(7, dtype=np.float32)[[0, 3, 6, 2, 2]]
    eps = 0.1
    targets = np.where(labels == 1, 1 - eps + eps / 7, eps / 7)
    got = float(classification_loss(eps)(labels, logits))
    assert got == pytest.approx(numpy_cross_entropy(targets, logits).mean(), rel=1e-6)


@pytest.mark.parametrize("num_classes, eps", [(10, 0.1), (5, 0.2)])
def test_optimal_logit_gap_is_log_1_plus_k_1_minus_eps_over_eps(num_classes, eps):
    # Section 5.2: with targets q_true = 1 − ε + ε/K and q_other = ε/K the cross-entropy is minimised
    # where softmax(z) = q, i.e. z_true − z_other = log(q_true / q_other) = log(1 + K(1 − ε)/ε): finite.
    loss_fn = classification_loss(eps)
    labels = tf.one_hot([0], num_classes)
    logits = tf.Variable(tf.zeros([1, num_classes]))

    @tf.function
    def descend():
        # Plain gradient descent on free logits; the Hessian's eigenvalues are < 1, so lr = 2 is stable,
        # and 3000 steps shrink the slowest mode (≈ 2·q_other per step) far below float32 precision.
        for _ in tf.range(3000):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, logits)
            logits.assign_sub(2.0 * tape.gradient(loss, logits))

    descend()
    z = logits.numpy()[0]
    want = math.log(1 + num_classes * (1 - eps) / eps)
    np.testing.assert_allclose(z[0] - z[1:], want, atol=1e-5)
    # The paper's text form ε/(K − 1) would predict log((K − 1)(1 − ε)/ε) — a different number.
    assert abs(want - math.log((num_classes - 1) * (1 - eps) / eps)) > 0.05


def test_distillation_hand_value_uniform_logits():
    # All logits equal: every cross-entropy is log K, so the loss is log K + T²·log K.
    labels, zeros = tf.one_hot([1, 3], 4), tf.zeros([2, 4])
    loss = distillation_loss(labels=labels, student_logits=zeros, teacher_logits=zeros, temperature=20.0)
    assert float(loss) == pytest.approx(401 * math.log(4.0), rel=1e-6)
    weighted = distillation_loss(
        labels=labels, student_logits=zeros, teacher_logits=zeros, temperature=20.0, hard_weight=0.5
    )
    assert float(weighted) == pytest.approx(0.5 * math.log(4.0) + 0.5 * 400 * math.log(4.0), rel=1e-6)


def numpy_distillation(labels, z, r, temperature, hard_weight=None):
    hard = numpy_cross_entropy(labels, z)
    scaled = np.asarray(r, np.float64) / temperature
    teacher = np.exp(scaled - scaled.max(-1, keepdims=True))
    teacher /= teacher.sum(-1, keepdims=True)
    soft = temperature**2 * numpy_cross_entropy(teacher, z / temperature)
    per_example = hard + soft if hard_weight is None else hard_weight * hard + (1 - hard_weight) * soft
    return per_example


@pytest.mark.parametrize("hard_weight", [None, 0.3])
def test_distillation_matches_a_numpy_implementation(hard_weight):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 6)).astype(np.float32) * 4
    r = rng.normal(size=(4, 6)).astype(np.float32) * 4
    labels = np.eye(6, dtype=np.float32)[[0, 5, 1, 1]]
    want = numpy_distillation(labels, z, r, 3.0, hard_weight)
    per_example = distillation_loss(
        labels=labels, student_logits=z, teacher_logits=r, temperature=3.0, hard_weight=hard_weight,
        reduction="none",
    )
    np.testing.assert_allclose(per_example.numpy(), want, rtol=1e-5)
    mean = distillation_loss(
        labels=labels, student_logits=z, teacher_logits=r, temperature=3.0, hard_weight=hard_weight
    )
    assert float(mean) == pytest.approx(want.mean(), rel=1e-5)


def test_distillation_label_smoothing_smooths_only_the_hard_term():
    rng = np.random.default_rng(2)
    z, r = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[[4, 0, 2]]
    smoothed = labels * 0.9 + 0.1 / 5
    got = distillation_loss(
        labels=labels, student_logits=z, teacher_logits=r, temperature=2.0, label_smoothing=0.1
    )
    assert float(got) == pytest.approx(numpy_distillation(smoothed, z, r, 2.0).mean(), rel=1e-5)


def test_distillation_is_float32_and_gives_no_teacher_gradient():
    z = tf.Variable(tf.random.stateless_normal([2, 3], seed=[1, 2], dtype=tf.float16))
    r = tf.Variable(tf.random.stateless_normal([2, 3], seed=[3, 4], dtype=tf.float16))
    with tf.GradientTape(persistent=True) as tape:
        labels = tf.one_hot([0, 2], 3)
        loss = distillation_loss(labels=labels, student_logits=z, teacher_logits=r, temperature=4.0)
    assert loss.dtype == tf.float32
    assert tape.gradient(loss, r) is None
    assert tape.gradient(loss, z) is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"hard_weight": 1.5}, "hard_weight must be in [0, 1], got 1.5"),
        ({"teacher_logits": np.zeros((2, 5), np.float32)}, "teacher logits 5"),
    ],
)
def test_distillation_rejects_bad_values(kwargs, message):
    args = dict(
        labels=np.eye(4, dtype=np.float32)[[0, 1]],
        student_logits=np.zeros((2, 4), np.float32),
        teacher_logits=np.zeros((2, 4), np.float32),
        temperature=20.0,
    )
    args.update(kwargs)
    with pytest.raises(ValueError) as error:
        distillation_loss(**args)
    assert message in str(error.value)


def test_label_smoothing_rejects_out_of_range():
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\), got 1.0"):
        classification_loss(1.0)


def test_classification_loss_is_float32_for_float16_logits_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    logits = tf.constant([[0.0, math.log(3.0)]], tf.float16)
    loss = classification_loss(0.2)(tf.constant([[0.0, 1.0]]), logits)
    assert loss.dtype == tf.float32
    want = -0.1 * math.log(0.25) - 0.9 * math.log(0.75)
    assert float(loss) == pytest.approx(want, rel=1e-3)  # log 3 rounded to float16
