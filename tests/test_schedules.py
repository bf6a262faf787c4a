"""Golden values of the learning-rate schedules (Sections 3.1 and 5.1), serialisation, graph use."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras.schedules import (
    CosineDecay,
    LinearWarmup,
    StepDecay,
    build_lr_schedule,
    scaled_learning_rate,
    training_steps,
)


def values(schedule, steps):
    return [float(schedule(tf.constant(s, tf.int64))) for s in steps]


def test_linear_scaling_rule():
    # Section 3.1: 0.1 × b / 256.
    assert scaled_learning_rate(0.1, 256) == pytest.approx(0.1)
    assert scaled_learning_rate(0.1, 1024) == pytest.approx(0.4)
    assert scaled_learning_rate(0.1, 128) == pytest.approx(0.05)


def test_step_decay_golden():
    schedule = StepDecay(0.4, boundaries=[300, 600, 900], decay_rate=0.1)
    got = values(schedule, [0, 299, 300, 599, 600, 899, 900, 10_000])
    want = [0.4, 0.4, 0.04, 0.04, 0.004, 0.004, 0.0004, 0.0004]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cosine_golden():
    # η = 0.2, T = 600: ½(1 + cos(πt/T))·η at t = 0, T/4, T/3, T/2, 2T/3, T, beyond T.
    schedule = CosineDecay(0.2, decay_steps=600)
    got = values(schedule, [0, 150, 200, 300, 400, 600, 700])
    want = [0.2, 0.2 * (1 + 0.70710678) / 2, 0.15, 0.1, 0.05, 0.0, 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert got[-2] == 0.0


def test_warmup_is_the_papers_i_eta_over_m():
    # η = 0.2, m = 20: step s (0-based) is the paper's batch i = s + 1, lr = iη/m.
    schedule = LinearWarmup(StepDecay(0.2), warmup_steps=20)
    got = values(schedule, [0, 1, 9, 18, 19, 20, 500])
    want = [0.01, 0.02, 0.1, 0.19, 0.2, 0.2, 0.2]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_build_step_with_warmup_keeps_absolute_epoch_boundaries():
    # base_lr 0.1 per 256, batch 256, 10 steps/epoch, 100 epochs, warmup 5, ÷10 at epochs 30, 60, 90.
    schedule = build_lr_schedule(
        "step", base_lr=0.1, global_batch_size=256, steps_per_epoch=10, epochs=100, warmup_epochs=5
    )
    got = values(schedule, [0, 24, 49, 50, 299, 300, 599, 600, 900, 999])
    want = [0.002, 0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_build_cosine_counts_t_after_warmup_and_ends_at_zero():
    # Peak 0.1 × 512/256 = 0.2; 10 steps/epoch, 8 epochs = 80 updates, 2 warmup epochs = 20 updates;
    # T = 80 - 20 - 1 = 59 so the last update (step 79) has t = T and lr exactly 0.
    schedule = build_lr_schedule(
        "cosine", base_lr=0.1, global_batch_size=512, steps_per_epoch=10, epochs=8, warmup_epochs=2
    )
    got = values(schedule, [0, 19, 20, 50, 78, 79, 80])
    want = [
        0.01,
        0.2,
        0.2,
        0.1 * (1 + math.cos(math.pi * 30 / 59)),
        0.1 * (1 + math.cos(math.pi * 58 / 59)),
        0.0,
        0.0,
    ]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    assert got[5] == 0.0 and got[4] > 0.0


def test_build_constant_and_no_warmup():
    constant = build_lr_schedule(
        "constant", base_lr=0.1, global_batch_size=1024, steps_per_epoch=5, epochs=3, warmup_epochs=0
    )
    assert isinstance(constant, StepDecay)
    np.testing.assert_allclose(values(constant, [0, 7, 14]), [0.4] * 3, rtol=1e-6)
    cosine = build_lr_schedule(
        "cosine", base_lr=0.1, global_batch_size=256, steps_per_epoch=5, epochs=3, warmup_epochs=0
    )
    assert isinstance(cosine, CosineDecay) and cosine.decay_steps == 14


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "linear"}, "'linear'"),
        ({"epochs": -1}, "-1"),
        ({"warmup_epochs": 10}, "warmup_epochs (10)"),
        ({"warmup_epochs": -2}, "-2"),
        ({"base_lr": 0.0}, "base_lr must be > 0"),
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"name": "step", "decay_epochs": (3, 2)}, "[3, 2]"),
        ({"name": "step", "warmup_epochs": 5, "decay_epochs": (4, 8)}, "[4, 8]"),
        ({"steps_per_epoch": 1, "epochs": 2, "warmup_epochs": 1}, "leave 1"),
    ],
)
def test_build_rejects_bad_values_with_the_value_in_the_message(kwargs, message):
    args = dict(
        name="cosine", base_lr=0.1, global_batch_size=256, steps_per_epoch=10, epochs=10, warmup_epochs=1
    )
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValueError) as error:
        build_lr_schedule(name, **args)
    assert message in str(error.value)


def test_serialisation_round_trip_keeps_values():
    schedule = build_lr_schedule(
        "cosine", base_lr=0.1, global_batch_size=512, steps_per_epoch=10, epochs=8, warmup_epochs=2
    )
    config = keras.saving.serialize_keras_object(schedule)
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, LinearWarmup) and isinstance(restored.schedule, CosineDecay)
    assert restored.get_config() == schedule.get_config()
    steps = [0, 10, 19, 20, 45, 79]
    assert values(restored, steps) == values(schedule, steps)
    step = build_lr_schedule(
        "step", base_lr=0.1, global_batch_size=256, steps_per_epoch=10, epochs=100, warmup_epochs=5
    )
    restored_step = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(step))
    assert values(restored_step, [0, 300, 999]) == values(step, [0, 300, 999])


def test_graph_mode_int64_steps_and_optimizer_iterations():
    schedule = build_lr_schedule(
        "step", base_lr=0.1, global_batch_size=256, steps_per_epoch=10, epochs=100, warmup_epochs=5
    )
    lr_at = tf.function(lambda s: schedule(s))
    steps = tf.constant([0, 49, 300, 900], tf.int64)
    got = [float(lr_at(s)) for s in steps]
    np.testing.assert_allclose(got, [0.002, 0.1, 0.01, 0.0001], rtol=1e-6)
    # The optimizer feeds its int64 `iterations` variable.
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    optimizer.iterations.assign(300)
    assert float(optimizer.learning_rate) == pytest.approx(0.01, rel=1e-6)


def test_fractional_epochs_cosine_reaches_zero_at_the_loops_last_step():
    # 2.5 epochs of 5 steps: the loop runs ceil(12.5) = 13 updates, and cosine is 0 at the 13th (step 12).
    assert training_steps(2.5, 5) == 13 and training_steps(3, 5) == 15
    schedule = build_lr_schedule(
        "cosine", base_lr=0.1, global_batch_size=256, steps_per_epoch=5, epochs=2.5, warmup_epochs=0
    )
    assert float(schedule(12)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule(11)) > 0


def test_poly_decay_golden_values_and_warmup():
    # η (1 − t/T)^0.9 with T = total − warmup − 1: 10 steps a epoch, 2 epochs, 0.5 warmup epoch → T = 14.
    schedule = build_lr_schedule(
        "poly", base_lr=0.256, global_batch_size=256, steps_per_epoch=10, epochs=2, warmup_epochs=0.5
    )
    peak = 0.256
    expected = {0: peak / 5, 4: peak, 5: peak, 12: peak * (1 - 7 / 14) ** 0.9, 19: 0.0, 25: 0.0}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-7), step
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert float(restored(12)) == pytest.approx(float(schedule(12)))
