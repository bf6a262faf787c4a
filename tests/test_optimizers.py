"""Nesterov SGD in the authors' lr-outside form, L2 vs decoupled decay, no bias decay (Section 3.1)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras import optimizers
from bot_keras.optimizers import NO_DECAY_PATTERN, MomentumSGD, build_optimizer, decayed_variables
from bot_keras.schedules import CosineDecay, LinearWarmup, StepDecay

MU = 0.9


def small_model():
    """conv(+bias) → BN → dense(+bias), every trainable variable non-zero so decay would show."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, bias_initializer="ones", name="conv")(inputs)
    x = keras.layers.BatchNormalization(beta_initializer="ones", name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, bias_initializer="ones", name="logits")(x)
    return keras.Model(inputs, outputs)


def variable(values):
    return keras.Variable(np.asarray(values, np.float32), name="kernel")


def step_with_zero_gradients(model, optimizer):
    """With zero gradients and fresh (zero) momentum, only weight decay can move a variable."""
    before = {v.path: v.numpy().copy() for v in model.variables}
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    optimizer.apply(grads, model.trainable_variables)
    return {v.path for v in model.variables if not np.array_equal(v.numpy(), before[v.path])}


KERNELS = {"conv/kernel", "logits/kernel"}
ALL_TRAINABLE = KERNELS | {"conv/bias", "bn/gamma", "bn/beta", "logits/bias"}


@pytest.mark.parametrize("mode", ["decoupled", "l2"])
@pytest.mark.parametrize("no_bias_decay", [True, False])
def test_exactly_the_kernels_are_decayed_with_no_bias_decay(mode, no_bias_decay):
    model = small_model()
    want = KERNELS if no_bias_decay else ALL_TRAINABLE
    assert {v.path for v in decayed_variables(model, no_bias_decay=no_bias_decay)} == want
    optimizer = build_optimizer(0.1, weight_decay=1e-2, weight_decay_mode=mode, no_bias_decay=no_bias_decay)
    # What the optimizer really decays: moving mean/variance are never touched.
    assert step_with_zero_gradients(model, optimizer) == want


def test_no_decay_pattern_matches_names_as_keras_and_tensorflow_spell_them():
    excluded = ["bias", "gamma", "beta", "model/stem_bn/gamma:0", "m/logits/bias/replica_1:0", "m/bn/beta:0"]
    decayed = ["kernel", "depthwise_kernel", "m/stage1_block0_conv1/kernel:0", "beta/kernel:0", "moving_mean"]
    assert all(re.search(NO_DECAY_PATTERN, name) for name in excluded)
    assert not any(re.search(NO_DECAY_PATTERN, name) for name in decayed)


def test_one_step_decoupled_equals_hand_computation():
    lr, wd = 0.5, 0.01
    w0, g = np.array([1.0, -2.0, 3.0]), np.array([0.3, 0.1, -0.2])
    w = variable(w0)
    MomentumSGD(lr, momentum=MU, weight_decay=wd, weight_decay_mode="decoupled").apply([g], [w])
    # Keras' base class decays first (w ← w − lr·wd·w), then NAG with buf = g: w ← w − lr·(g + μ·g).
    want = w0 * (1 - lr * wd) - lr * (g + MU * g)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-6)


def test_one_step_l2_equals_hand_computation():
    lr, wd = 0.5, 0.01
    w0, g = np.array([1.0, -2.0, 3.0]), np.array([0.3, 0.1, -0.2])
    w = variable(w0)
    MomentumSGD(lr, momentum=MU, weight_decay=wd, weight_decay_mode="l2").apply([g], [w])
    g_l2 = g + wd * w0  # the penalty's gradient joins g before momentum
    np.testing.assert_allclose(w.numpy(), w0 - lr * (g_l2 + MU * g_l2), rtol=1e-6)


def test_two_steps_with_changing_lr_follow_the_lr_outside_form_not_keras_sgd():
    lr0, lr1 = 0.4, 0.1
    w0 = np.array([1.0, -2.0])
    g0, g1 = np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    schedule = StepDecay(lr0, boundaries=[1], decay_rate=lr1 / lr0)  # lr0 at step 0, lr1 at step 1

    ours = variable(w0)
    optimizer = MomentumSGD(schedule, momentum=MU, weight_decay=0.0)
    optimizer.apply([g0], [ours])
    optimizer.apply([g1], [ours])
    # PyTorch / MXNet NAG: buf1 = g0; w1 = w0 − lr0(g0 + μ·buf1);
    #                     buf2 = μ·buf1 + g1; w2 = w1 − lr1(g1 + μ·buf2).
    w1 = w0 - lr0 * (g0 + MU * g0)
    want = w1 - lr1 * (g1 + MU * (MU * g0 + g1))
    np.testing.assert_allclose(ours.numpy(), want, rtol=1e-6)

    theirs = variable(w0)
    sgd = keras.optimizers.SGD(schedule, momentum=MU, nesterov=True)
    sgd.apply([g0], [theirs])
    sgd.apply([g1], [theirs])
    # Keras: v1 = −lr0·g0; v2 = μ·v1 − lr1·g1; w2 = w1 + μ·v2 − lr1·g1 — g0 keeps its old lr0.
    keras_form = w1 + MU * (-MU * lr0 * g0 - lr1 * g1) - lr1 * g1
    np.testing.assert_allclose(theirs.numpy(), keras_form, rtol=1e-6)
    # The two differ by μ²·(lr0 − lr1)·g0.
    np.testing.assert_allclose(ours.numpy() - theirs.numpy(), MU**2 * (lr0 - lr1) * g0, rtol=1e-5)


def test_constant_lr_makes_both_forms_agree():
    w0, g0, g1 = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    ours, theirs = variable(w0), variable(w0)
    optimizer = MomentumSGD(0.3, momentum=MU, weight_decay=0.0)
    sgd = keras.optimizers.SGD(0.3, momentum=MU, nesterov=True)
    for g in (g0, g1):
        optimizer.apply([g], [ours])
        sgd.apply([g], [theirs])
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)


def test_plain_momentum_without_nesterov():
    w0, g0, g1 = np.array([1.0]), np.array([0.5]), np.array([-1.0])
    w = variable(w0)
    optimizer = MomentumSGD(0.1, momentum=MU, nesterov=False, weight_decay=0.0)
    optimizer.apply([g0], [w])
    optimizer.apply([g1], [w])
    np.testing.assert_allclose(w.numpy(), w0 - 0.1 * g0 - 0.1 * (MU * g0 + g1), rtol=1e-6)


def test_l2_decay_is_ten_times_decoupled_at_steady_state():
    # Zero loss gradient, many steps: per step L2 shrinks w by ≈ lr·wd/(1 − μ), decoupled by lr·wd.
    lr, wd, steps = 0.1, 1e-3, 200
    shrink = {}
    for mode in ("l2", "decoupled"):
        w = variable([1.0])
        optimizer = MomentumSGD(lr, momentum=MU, weight_decay=wd, weight_decay_mode=mode)
        for _ in range(steps):
            optimizer.apply([tf.zeros([1])], [w])
        before = float(w.numpy()[0])
        optimizer.apply([tf.zeros([1])], [w])
        shrink[mode] = 1 - float(w.numpy()[0]) / before
    assert shrink["decoupled"] == pytest.approx(lr * wd, rel=1e-3)
    # L2: the buffer settles at wd·w/(1 − μ), so NAG's step is lr·(wd·w + μ·wd·w/(1 − μ)) = lr·wd·w/(1 − μ).
    assert shrink["l2"] / shrink["decoupled"] == pytest.approx(1 / (1 - MU), rel=0.02)


def test_inside_tf_function_with_loss_scale_optimizer():
    lr, wd = 0.5, 0.01
    w0, c = np.array([1.0, -2.0, 3.0], np.float32), tf.constant([0.3, 0.1, -0.2])
    w = variable(w0)
    optimizer = keras.optimizers.LossScaleOptimizer(
        MomentumSGD(lr, momentum=MU, weight_decay=wd, weight_decay_mode="l2")
    )

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w * c)  # gradient c
            scaled = optimizer.scale_loss(loss)
        optimizer.apply(tape.gradient(scaled, [w]), [w])

    train_step()
    g_l2 = c.numpy() + wd * w0
    np.testing.assert_allclose(w.numpy(), w0 - lr * (1 + MU) * g_l2, rtol=1e-6)
    assert float(optimizer.dynamic_scale) > 1  # gradients really went through loss scaling


def test_mixed_float16_compile_wraps_and_trains():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = small_model()
    model.compile(optimizer=build_optimizer(0.1), loss=keras.losses.MeanSquaredError())
    x, y = np.ones((4, 6, 6, 2), np.float32), np.zeros((4, 4), np.float32)
    model.train_on_batch(x, y)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, MomentumSGD)
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def two_steps_under(strategy):
    """Two steps whose gradients are split unevenly over the replicas: replica r of n computes the share
    (r + 1)/(n(n + 1)/2) of g, so the optimizer's cross-replica sum is g whatever n is."""
    with strategy.scope():
        model = small_model()
        optimizer = build_optimizer(0.1, weight_decay=1e-2, weight_decay_mode="l2")
        # Momentum slots are created here, in the strategy's scope, not lazily inside the replica function
        # (that fails under MirroredStrategy with "You must feed a value for placeholder tensor").
        optimizer.build(model.trainable_variables)
    variables = model.trainable_variables

    def replica_step():
        context = tf.distribute.get_replica_context()
        n = context.num_replicas_in_sync
        share = tf.cast(context.replica_id_in_sync_group + 1, tf.float32) / (n * (n + 1) / 2)
        grads = [tf.random.stateless_normal(v.shape, seed=[i, 1]) * share for i, v in enumerate(variables)]
        optimizer.apply(grads, variables)

    @tf.function
    def step():
        strategy.run(replica_step)

    step()
    step()
    return [v.numpy() for v in model.trainable_variables]


def test_mirrored_strategy_step_matches_single_device():
    single = two_steps_under(tf.distribute.get_strategy())
    mirrored = two_steps_under(tf.distribute.MirroredStrategy(["/cpu:0"]))
    assert len(single) == len(mirrored) == 6
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_keras_file_round_trip_keeps_form_schedule_and_exclusions(tmp_path):
    schedule = LinearWarmup(CosineDecay(0.2, decay_steps=10), warmup_steps=2)
    model = small_model()
    model.compile(optimizer=build_optimizer(schedule, weight_decay=1e-3, weight_decay_mode="l2"), loss="mse")
    model.fit(np.ones((8, 6, 6, 2)), np.zeros((8, 4)), batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    optimizer = restored.optimizer
    assert isinstance(optimizer, MomentumSGD)
    assert optimizer.get_config() == model.optimizer.get_config()
    assert int(optimizer.iterations) == 2
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(2)))
    for saved, loaded in zip(model.optimizer.momentums, optimizer.momentums, strict=True):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())
    # The no-bias-decay exclusion survives loading (Keras does not serialise exclude_from_weight_decay).
    assert {v.path for v in restored.trainable_variables if optimizer._use_weight_decay(v)} == KERNELS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_decay_mode": "adamw"}, "'adamw'"),
        ({"weight_decay": -1e-4}, "-0.0001"),
        ({"momentum": 1.0}, "1.0"),
    ],
)
def test_bad_settings_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError) as error:
        build_optimizer(0.1, **kwargs)
    assert message in str(error.value)


TWO_REPLICA_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from test_optimizers import two_steps_under
single = two_steps_under(tf.distribute.get_strategy())
mirrored = two_steps_under(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print("MAXDIFF", max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored, strict=True)))
"""


@pytest.mark.slow
def test_two_replicas_match_single_device():
    # Two logical CPUs need a fresh process. The optimizer sums the replicas' gradients (1/3 g + 2/3 g)
    # and every replica applies the same update; update_step then also sees ".../bias/replica_1:0" names.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", TWO_REPLICA_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("MAXDIFF")[1]) < 1e-6


def test_default_decay_regularises_like_the_papers_l2():
    # build_optimizer's default (decoupled, weight_decay=None) shrinks weights at the steady-state rate of
    # the paper's L2 1e-4 with momentum 0.9: 1e-4/(1 − μ) = 1e-3 decoupled, measured as in the ratio test.
    assert optimizers.paper_weight_decay("decoupled", momentum=MU) == pytest.approx(1e-3)
    assert optimizers.paper_weight_decay("l2", momentum=MU) == 1e-4
    lr, steps = 0.1, 200
    shrink = {}
    for name, optimizer in {
        "paper_l2": build_optimizer(lr, weight_decay=1e-4, weight_decay_mode="l2", no_bias_decay=False),
        "default": build_optimizer(lr, no_bias_decay=False),
    }.items():
        w = variable([1.0])
        for _ in range(steps):
            optimizer.apply([tf.zeros([1])], [w])
        before = float(w.numpy()[0])
        optimizer.apply([tf.zeros([1])], [w])
        shrink[name] = 1 - float(w.numpy()[0]) / before
    assert shrink["default"] == pytest.approx(lr * 1e-3, rel=1e-3)
    assert shrink["default"] / shrink["paper_l2"] == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("mode", ["decoupled", "l2"])
def test_lr_multiplier_scales_the_step_and_the_decay_of_matching_variables(mode):
    lr, wd, factor = 0.5, 0.01, 0.1
    w0, g = np.array([1.0, -2.0, 3.0]), np.array([0.3, 0.1, -0.2])
    backbone = keras.Variable(w0.astype(np.float32), name="stage1_block0_conv1_kernel")
    head = keras.Variable(w0.astype(np.float32), name="logits_kernel")
    optimizer = MomentumSGD(lr, momentum=MU, weight_decay=wd, weight_decay_mode=mode, no_decay_pattern=None,
                            lr_multipliers=[(r"^stage\d+_", factor)])
    for _ in range(2):  # the second step goes through a non-zero momentum buffer
        optimizer.apply([g, g], [backbone, head])

    def by_hand(step_lr):
        w, buf = w0.copy(), np.zeros(3)
        for _ in range(2):
            if mode == "decoupled":
                w = w - step_lr * wd * w
                grad = g
            else:
                grad = g + wd * w
            buf = MU * buf + grad
            w = w - step_lr * (grad + MU * buf)
        return w

    np.testing.assert_allclose(backbone.numpy(), by_hand(lr * factor), rtol=1e-6)
    np.testing.assert_allclose(head.numpy(), by_hand(lr), rtol=1e-6)
    assert not np.allclose(by_hand(lr * factor), by_hand(lr), rtol=1e-3)  # the check can tell them apart


def test_lr_multiplier_zero_leaves_the_variable_as_it_was_and_survives_the_config():
    model = small_model()
    optimizer = build_optimizer(0.1, weight_decay=1e-2, weight_decay_mode="decoupled")
    optimizer = MomentumSGD.from_config({**optimizer.get_config(), "lr_multipliers": [["(?:^|/)conv/", 0.0]]})
    assert step_with_zero_gradients(model, optimizer) == {"logits/kernel"}  # conv/kernel's decay is off too
    assert MomentumSGD.from_config(optimizer.get_config()).lr_multipliers == (("(?:^|/)conv/", 0.0),)
    assert optimizer.lr_multiplier("m/conv/kernel") == 0.0
    assert optimizer.lr_multiplier("m/logits/kernel") == 1.0


@pytest.mark.parametrize("pairs, message", [([("(", 0.1)], "missing"), ([("stage", -1.0)], "must be >= 0")])
def test_bad_lr_multipliers_fail_when_built(pairs, message):
    with pytest.raises((ValueError, re.error), match=message):
        MomentumSGD(0.1, lr_multipliers=pairs)
