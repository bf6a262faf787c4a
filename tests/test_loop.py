"""loop.py: the host loop's bookkeeping (with a stand-in step), checkpoints and resume, the logs."""

import csv
import math
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_steps import _batches, _steps, _tiny_model

from bot_keras import cli, distribute, loop, optimizers, schedules, steps


class _FakeOptimizer:
    learning_rate = 0.25


class _RecordingManager:
    def __init__(self):
        self.saved = []

    def save(self, checkpoint_number):
        self.saved.append(checkpoint_number)


def _run_loop(
    tmp_path,
    *,
    epochs=3,
    steps_per_epoch=5,
    steps_per_execution=2,
    checkpoint_steps=3,
    mixup_epochs=0,
    nan_at_call=None,
    max_steps=0,
    start=0,
    verbose=0,
    state=None,
    agree_to_stop=None,
    manager=None,
):
    calls = []

    def fake_train_function(iterator, start_step, num_steps, mixup_on):
        calls.append((int(start_step), int(num_steps), bool(mixup_on)))
        n = float(num_steps) * 4
        loss = float("nan") if nan_at_call == len(calls) else 0.5 * n
        return {"loss": tf.constant(loss), "top1": tf.constant(0.25 * n), "top5": tf.constant(0.75 * n),
                "count": tf.constant(n)}

    step_var = tf.Variable(start, dtype=tf.int64)
    manager = manager or _RecordingManager()
    callbacks = loop.make_callbacks(
        str(tmp_path),
        chief=True,
        verbose=verbose,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        model=keras.Sequential(),
        resume=False,
    )
    logs = loop.train_loop(
        optimizer=_FakeOptimizer(),
        train_function=fake_train_function,
        train_iterator=None,
        evaluate=lambda _: {"loss": 1.0, "top1": 0.5, "top5": 0.9},
        eval_dataset=None,
        manager=manager,
        step_var=step_var,
        callbacks=callbacks,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        global_batch_size=4,
        steps_per_execution=steps_per_execution,
        checkpoint_steps=checkpoint_steps,
        max_steps=max_steps,
        mixup_epochs=mixup_epochs,
        precision="float32",
        state=state,
        agree_to_stop=agree_to_stop,
    )
    return calls, manager.saved, logs, int(step_var.numpy())


def test_loop_respects_epochs_steps_per_execution_and_checkpoint_steps(tmp_path):
    calls, saved, logs, step = _run_loop(tmp_path, mixup_epochs=2)
    # 3 epochs of 5 steps, at most 2 steps a call, never crossing an epoch end or a multiple of 3.
    assert [(s, n) for s, n, _ in calls] == [
        (0, 2),
        (2, 1),
        (3, 2),  # epoch 0: checkpoint after step 3, epoch end at 5
        (5, 1),
        (6, 2),
        (8, 1),
        (9, 1),  # epoch 1: checkpoints at 6 and 9, epoch end at 10
        (10, 2),
        (12, 2),
        (14, 1),  # epoch 2: checkpoint at 12, end at 15
    ]
    assert saved == [3, 5, 6, 9, 10, 12, 15]
    assert step == 15
    # --mixup_off_epochs: the last epoch trains on clean batches.
    assert [m for _, _, m in calls] == [True] * 7 + [False] * 3
    assert logs["top1"] == 0.25 and logs["val_top1"] == 0.5 and logs["lr"] == 0.25
    with open(tmp_path / "logs" / "training.csv") as f:
        rows = list(csv.DictReader(f))
    # Mixup epochs report no training accuracy (accuracy against mixed labels is not accuracy).
    assert [row["top1"] for row in rows] == ["NA", "NA", "0.25"]
    assert [float(row["val_top5"]) for row in rows] == [0.9] * 3
    assert float(rows[0]["loss"]) == 0.5


def test_loop_resumes_mid_epoch_and_honours_max_steps(tmp_path):
    calls, saved, _, step = _run_loop(tmp_path, start=7, max_steps=11, checkpoint_steps=0)
    assert [(s, n) for s, n, _ in calls] == [(7, 2), (9, 1), (10, 1)]
    assert saved == [10, 11] and step == 11


@pytest.mark.parametrize("agreed_at, step", [(2, 4), (4, 5)])
def test_a_signal_on_another_worker_stops_the_loop_at_the_agreed_step(tmp_path, agreed_at, step):
    # The agreement is asked after each call and after each epoch's checkpoint (5-step epochs in calls of
    # 2, 2, 1): another worker's SIGTERM agreed on at the 2nd question stops after step 4, at the 4th (after
    # the epoch-end save, e.g. a signal during the evaluation) at step 5, with no second save.
    asked, manager = [], _RecordingManager()

    def agree_to_stop(signal_name):
        asked.append(signal_name)
        return "SIGTERM on another worker" if len(asked) >= agreed_at else None

    with pytest.raises(cli.Preempted) as stop:
        _run_loop(tmp_path, checkpoint_steps=0, agree_to_stop=agree_to_stop, manager=manager)
    assert str(stop.value) == f"preempted at step {step} (SIGTERM on another worker); --resume continues"
    assert stop.value.step == step and manager.saved == [step]
    assert asked == [None] * agreed_at  # this process received no signal of its own


def test_checkpoint_step_is_the_newest_checkpoints_step(tmp_path):
    # What the trainer hands make_dataset(start_step=...) on --resume, before restoring anything.
    assert loop.checkpoint_step(str(tmp_path)) == 0
    step = tf.Variable(0, dtype=tf.int64)
    manager = loop.checkpoint_manager(str(tmp_path), keep=3, step=step)
    for number in (3, 12, 7):  # the newest, not the largest
        step.assign(number)
        manager.save(checkpoint_number=number)
    assert loop.checkpoint_step(str(tmp_path)) == 7


def test_progress_bar_of_a_resumed_epoch_counts_the_steps_it_runs(tmp_path, capsys):
    # Resumed at step 7 of 5-step epochs: the last epoch runs steps 8-10, 3 of them, and says so.
    _run_loop(tmp_path, epochs=2, start=7, checkpoint_steps=0, verbose=1, steps_per_execution=1)
    bars = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # without the terminal's colours
    counts = re.findall(r"(\d+)/(\d+) ", bars)
    assert counts and set(counts) <= {("1", "3"), ("2", "3"), ("3", "3")} and ("3", "3") in counts, counts


def test_run_state_carries_total_wall_time_and_the_last_epoch_logs(tmp_path):
    state = loop.RunState()
    assert state.logs() == {}
    state.wall_time_s.assign(100.0)  # what earlier processes of the run had trained, from the checkpoint
    _, _, logs, _ = _run_loop(tmp_path, epochs=1, checkpoint_steps=0, state=state)
    assert 100.0 < float(state.wall_time_s.numpy()) < 160.0
    assert state.logs() == logs  # every logged value round-trips through the checkpointed vector


def test_non_finite_loss_stops_naming_step_precision_and_lr(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"at step 3 \(epoch 0\), --precision=float32, learning rate 0.25"
    ):
        _run_loop(tmp_path, steps_per_execution=1, checkpoint_steps=0, nan_at_call=3)


def test_checkpoint_restores_weights_step_learning_rate_and_loss_scale(tmp_path):
    schedule = schedules.build_lr_schedule(
        "cosine", base_lr=0.1, global_batch_size=256, steps_per_epoch=10, epochs=2, warmup_epochs=0.5
    )

    def setup():
        keras.utils.set_random_seed(0)
        model = _tiny_model()
        optimizer = keras.optimizers.LossScaleOptimizer(optimizers.build_optimizer(schedule))
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
        return model, optimizer, step_var, checkpoint

    distribute.set_precision("mixed_float16")
    model, optimizer, step_var, checkpoint = setup()
    loss = steps.make_per_example_loss(label_smoothing=0.1, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(
        tf.distribute.get_strategy(), model, optimizer, per_example_loss=loss, global_batch_size=8
    )
    _steps(step, _batches(scale=3000.0), 1)  # one skipped step: scale 16384, iterations 0
    _steps(step, _batches(), 6, start=1)
    step_var.assign(7)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    manager.save(checkpoint_number=7)
    expected_weights = model.get_weights()
    expected_momenta = [v.numpy() for v in optimizer.inner_optimizer.variables]

    keras.backend.clear_session()
    model2, optimizer2, step_var2, checkpoint2 = setup()
    checkpoint2.restore(tf.train.latest_checkpoint(str(tmp_path))).assert_existing_objects_matched()
    assert int(step_var2.numpy()) == 7
    assert int(optimizer2.iterations.numpy()) == 6  # the skipped step did not advance the schedule
    assert float(optimizer2.dynamic_scale.numpy()) == 16384.0
    # optimizer.learning_rate is the next update's; last_learning_rate the last one's.
    assert float(optimizer2.learning_rate) == pytest.approx(float(schedule(6)), rel=1e-6)
    assert loop.last_learning_rate(optimizer2, schedule) == pytest.approx(float(schedule(5)), rel=1e-6)
    # Warmup over 5 steps to 0.1, then cosine: at step 6 the lr is ½(1 + cos(π·1/14))·0.1.
    assert float(schedule(6)) == pytest.approx(0.5 * (1 + math.cos(math.pi / 14)) * 0.1, rel=1e-6)
    for a, b in zip(expected_weights, model2.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(expected_momenta, [v.numpy() for v in optimizer2.inner_optimizer.variables], strict=True):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_logs_train_and_validation_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    _run_loop(tmp_path, epochs=1, checkpoint_steps=0)
    for split in ("train", "validation"):
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "logs" / split))


def test_dropout_seed_states_travel_in_the_checkpoint_so_resumed_masks_are_the_uninterrupted_ones(tmp_path):
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5), keras.layers.Dropout(0.5)])

    def manager_of(model):
        seeds = loop.seed_generator_states(model)
        return loop.checkpoint_manager(str(tmp_path), keep=1, model=model, **seeds)

    ones = np.ones((2, 64), "float32")
    model = build()
    assert loop.seed_generator_states(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])) == {}
    manager = manager_of(model)
    model(ones, training=True)  # a step: each Dropout's state advances
    manager.save(checkpoint_number=1)
    uninterrupted = model(ones, training=True).numpy()  # the next step's masks

    resumed = build()
    loop.restore_latest(manager_of(resumed), str(tmp_path))
    np.testing.assert_array_equal(resumed(ones, training=True).numpy(), uninterrupted)
    # Without the states a fresh model draws the first step's masks again, not the next step's.
    assert not np.array_equal(build()(ones, training=True).numpy(), uninterrupted)


def test_a_checkpoint_without_seed_states_still_resumes_and_says_so(tmp_path, capsys):
    """A checkpoint written before the dropout generators' states were saved restores (with fresh
    generators and one line saying so) instead of failing --resume as a mismatched model."""

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dropout(0.5)])

    old = build()
    loop.checkpoint_manager(str(tmp_path), keep=1, model=old).save(checkpoint_number=1)  # no seed states
    path = loop.latest_checkpoint(str(tmp_path))
    model = build()
    seeds = loop.seed_generator_states(model, resume_from=path)
    assert seeds == {} and "holds no dropout-mask generator states" in capsys.readouterr().out
    loop.restore_latest(loop.checkpoint_manager(str(tmp_path), keep=1, model=model, **seeds), str(tmp_path))
    # A checkpoint that has them keeps them.
    loop.checkpoint_manager(str(tmp_path / "new"), keep=1, model=old,
                            **loop.seed_generator_states(old)).save(checkpoint_number=1)
    assert loop.seed_generator_states(model, resume_from=loop.latest_checkpoint(str(tmp_path / "new")))
