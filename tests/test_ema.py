"""Weight EMA: the recursion with its decay warm-up recomputed in numpy (one device and MirroredStrategy
with two CPU devices), resume continuing the same averages, and the swap used for evaluation."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras import ema as ema_lib
from bot_keras import optimizers, steps

DECAY = 0.5  # reached by the warm-up's (1 + n) / (10 + n) at n = 8: the test's 10 steps cross it

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np, tensorflow as tf
    from bot_keras import distribute, ema as ema_lib, optimizers, steps

    def model_and_data():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3),
                                  keras.layers.BatchNormalization(), keras.layers.ReLU(),
                                  keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(3, dtype="float32")])
        x = np.random.RandomState(0).randn(8, 6, 6, 3).astype("float32")
        y = np.eye(3, dtype="float32")[np.arange(8) % 3]
        return model, tf.data.Dataset.from_tensors((x, y)).repeat()

    def run(strategy, n_steps, decay, checkpoint_dir=None, resume_at=None):
        with strategy.scope():
            model, data = model_and_data()
            optimizer = optimizers.build_optimizer(0.5, weight_decay=0.0)
            optimizer.build(model.trainable_variables)
            ema = ema_lib.WeightEMA(model, decay)
        loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
        train = steps.make_train_function(strategy, model, optimizer, per_example_loss=loss,
                                          global_batch_size=8, ema=ema)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, ema=ema)
        start = 0
        if resume_at is not None:
            checkpoint.restore(tf.train.latest_checkpoint(checkpoint_dir)).assert_existing_objects_matched()
            start = resume_at
        iterator = iter(strategy.experimental_distribute_dataset(data))
        weights = [[w.numpy().tolist() for w in model.weights]]
        for step in range(start, n_steps):
            train(iterator, tf.constant(step, tf.int64), tf.constant(1), tf.constant(False))
            weights.append([w.numpy().tolist() for w in model.weights])
            if checkpoint_dir is not None and resume_at is None and step + 1 == 3:
                checkpoint.save(checkpoint_dir + "/ckpt")
        return {"weights": weights, "averages": [a.numpy().tolist() for a in ema.averages],
                "updates": int(ema.updates.numpy())}
    """
)


def _recursion(history, decay):
    """numpy EMA of a weight history [initial, after step 1, ...] with the warm-up decay."""
    averages = [np.asarray(w, np.float64) for w in history[0]]
    for n, weights in enumerate(history[1:]):
        d = min(decay, (1 + n) / (10 + n))
        averages = [d * a + (1 - d) * np.asarray(w, np.float64)
                    for a, w in zip(averages, weights, strict=True)]
    return averages


def _run_script(tmp_path, body):
    script = tmp_path / "ema_script.py"
    script.write_text(_SCRIPT + textwrap.dedent(body))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_decay_warms_up_as_tensorflows_num_updates_convention():
    np.testing.assert_allclose([float(ema_lib.decay_at(0.9999, n)) for n in (0, 1, 90, 10**6)],
                               [0.1, 2 / 11, 91 / 100, 0.9999], rtol=1e-6)
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\), got 1.0"):
        ema_lib.WeightEMA(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), 1.0)


@pytest.mark.slow  # two subprocesses (two logical CPU devices must be set before TensorFlow starts)
def test_averages_equal_the_numpy_recursion_on_one_device_and_two_mirrored_replicas(tmp_path):
    out = _run_script(tmp_path, f"""
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        mirrored = distribute.create_strategy("mirrored")
        assert mirrored.num_replicas_in_sync == 2
        result = {{"default": run(tf.distribute.get_strategy(), 10, {DECAY}),
                   "mirrored": run(mirrored, 10, {DECAY})}}
        print("RESULT " + json.dumps(result))
        """)
    for name in ("default", "mirrored"):
        run = out[name]
        assert run["updates"] == 10
        expected = _recursion(run["weights"], DECAY)
        for got, want in zip(run["averages"], expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        # The averages lag the weights (a negative control: they are not simply the last weights).
        assert max(np.abs(np.subtract(a, w)).max() for a, w in zip(run["averages"], run["weights"][-1],
                                                                   strict=True)) > 1e-3


def test_resume_continues_the_same_averages(tmp_path):
    checkpoints = str(tmp_path / "checkpoints")
    script = {}
    exec(_SCRIPT, script)  # the subprocess script's `run`, in this process (one device needs no set-up)
    strategy = tf.distribute.get_strategy()
    whole = script["run"](strategy, 6, DECAY, checkpoint_dir=checkpoints)
    resumed = script["run"](strategy, 6, DECAY, checkpoint_dir=checkpoints, resume_at=3)
    assert resumed["updates"] == 6
    for got, want in zip(resumed["averages"], whole["averages"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_swap_exchanges_weights_and_averages_and_evaluation_swaps_back():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ema = ema_lib.WeightEMA(model, 0.9)
    initial = [w.numpy().copy() for w in model.weights]
    for w in model.weights:
        w.assign(w.numpy() + 1.0)
    ema.update()  # d_0 = 0.1: average = 0.1 · initial + 0.9 · (initial + 1)
    expected = [w + 0.9 for w in initial]
    seen = ema_lib.evaluated_with_averages(lambda _: [w.numpy().copy() for w in model.weights], ema)(None)
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(model.weights, initial, strict=True):  # swapped back
        np.testing.assert_allclose(got.numpy(), want + 1.0, rtol=1e-6)


def test_train_step_updates_the_averages_once_per_step():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, dtype="float32")])
    optimizer = optimizers.build_optimizer(0.1, weight_decay=0.0)
    optimizer.build(model.trainable_variables)
    ema = ema_lib.WeightEMA(model, 0.99)
    loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    train = steps.make_train_function(tf.distribute.get_strategy(), model, optimizer, per_example_loss=loss,
                                      global_batch_size=8, ema=ema)
    x = np.random.RandomState(0).randn(8, 6, 6, 3).astype("float32")
    data = tf.data.Dataset.from_tensors((x, np.eye(3, dtype="float32")[np.arange(8) % 3])).repeat()
    train(iter(data), tf.constant(0, tf.int64), tf.constant(3), tf.constant(False))
    assert int(ema.updates.numpy()) == 3
