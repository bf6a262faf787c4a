"""distribute.py: strategy and precision set-up, batch checks, and the training step under real strategies.

The multi-device checks run in subprocesses: logical CPU devices must be configured before TensorFlow
initialises, and a multi-worker run needs one process per worker.
"""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import pytest

from bot_keras import distribute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def test_unknown_strategy_and_precision_echo_the_value():
    with pytest.raises(ValueError, match=r"strategy name='mirorred'"):
        distribute.create_strategy("mirorred")
    with pytest.raises(ValueError, match=r"precision name='float16'"):
        distribute.set_precision("float16")


def test_global_batch_must_split_over_replicas():
    assert distribute.per_replica_batch_size(256, 8) == 32
    with pytest.raises(ValueError, match=r"size=100 .* not divisible by the 8 replicas.*e\.g\. 104"):
        distribute.per_replica_batch_size(100, 8)
    with pytest.raises(ValueError, match=r"global_batch_size=0"):
        distribute.per_replica_batch_size(0, 1)


def test_multi_worker_without_tf_config_says_so(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        distribute.create_strategy("multi_worker_mirrored")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG='{not json' is not a valid"):
        distribute.create_strategy("multi_worker_mirrored")
    # Worker index 2 of a two-worker cluster would wait forever for a peer that does not exist.
    config = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}'
    monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(ValueError, match=r"does not name one of the workers \['a:1', 'b:2'\]"):
        distribute.create_strategy("multi_worker_mirrored")


def test_default_strategy_is_chief_and_writes_to_model_dir(tmp_path):
    strategy = distribute.create_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.is_chief(strategy)
    assert distribute.worker_dir(str(tmp_path), strategy) == str(tmp_path)


def test_a_single_worker_decides_to_stop_alone_without_a_collective():
    strategy = distribute.create_strategy("default")
    assert distribute.worker_count(strategy) == 1
    agree = distribute.stop_agreement(strategy)
    assert [agree(None), agree("SIGTERM"), agree("SIGINT")] == [None, "SIGTERM", "SIGINT"]


@pytest.mark.parametrize("precision, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_precision_policy_applies_to_layers_built_afterwards(precision, compute):
    distribute.set_precision(precision)
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert layer.compute_dtype == compute and layer.variable_dtype == "float32"
    assert distribute.needs_loss_scaling(precision) == (precision == "mixed_float16")


# A small model and data shared by the subprocess scripts below; the per-replica batch is fed in
# global-batch order, so a 2-replica step sees exactly the examples a 1-device step sees.
_COMMON = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import keras
    from bot_keras import distribute, steps

    GLOBAL_BATCH = 8
    x = np.random.RandomState(0).randn(64, 6, 6, 3).astype("float32")
    y = np.eye(3, dtype="float32")[np.random.RandomState(1).randint(0, 3, 64)]

    def dataset_fn(context):
        batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
        data = tf.data.Dataset.from_tensor_slices((x, y))
        data = data.shard(context.num_input_pipelines, context.input_pipeline_id)
        return data.batch(batch, drop_remainder=True).repeat()

    def build(batch_norm):
        layers = [keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, use_bias=not batch_norm)]
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=0.9))
        layers += [keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)]
        return keras.Sequential(layers)

    def run(strategy, batch_norm=False, sync_bn=False, n_steps=5, grad_clip_norm=0.0):
        keras.utils.set_random_seed(0)
        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
        with strategy.scope():
            model = build(batch_norm)
            distribute.set_synchronized_batch_norm(model, sync_bn)
            optimizer = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
            optimizer.build(model.trainable_variables)
        initial = [w.tolist() for w in model.get_weights()]
        loss = lambda labels, logits, _: tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        step = steps.make_train_function(strategy, model, optimizer, per_example_loss=loss,
                                         global_batch_size=GLOBAL_BATCH, grad_clip_norm=grad_clip_norm)
        sums = step(iterator, tf.constant(0, tf.int64), tf.constant(n_steps), tf.constant(False))
        return [w.tolist() for w in model.get_weights()], [float(v) for v in sums.values()], initial
    """
)

_MIRRORED = _COMMON + textwrap.dedent(
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = distribute.create_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2, mirrored.num_replicas_in_sync
    out = {}
    cases = {"plain": {}, "bn": dict(batch_norm=True), "sync_bn": dict(batch_norm=True, sync_bn=True),
             "clipped": dict(grad_clip_norm=0.05)}
    for name, kwargs in cases.items():
        out[name] = {"single": run(single, **kwargs), "mirrored": run(mirrored, **kwargs)}

    # mixed_float16: only replica 1's half of the batch overflows the scaled float16 gradients.
    distribute.set_precision("mixed_float16")
    x_bad = x[:8].copy()
    x_bad[4:] *= 3000.0
    bad = tf.data.Dataset.from_tensors((x_bad, y[:8])).repeat()  # a global batch: split 4 + 4 over replicas
    with mirrored.scope():
        keras.utils.set_random_seed(0)
        model = build(False)
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build(model.trainable_variables)
    before = model.get_weights()
    loss = lambda labels, logits, _: tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    step = steps.make_train_function(mirrored, model, optimizer, per_example_loss=loss, global_batch_size=8)
    step(iter(mirrored.experimental_distribute_dataset(bad)), tf.constant(0, tf.int64), tf.constant(1),
         tf.constant(False))
    out["overflow"] = {
        "scale": float(optimizer.dynamic_scale.numpy()),
        "iterations": int(optimizer.iterations.numpy()),
        "unchanged": all((a == b).all() for a, b in zip(before, model.get_weights())),
    }

    # Mixup: replica r mixes its half batch with its own λ, drawn from seed (run seed, step·1024 + r).
    from bot_keras.data import mixup as mixup_ops
    distribute.set_precision("float32")
    with mirrored.scope():
        keras.utils.set_random_seed(0)
        model = build(False)
        optimizer = keras.optimizers.SGD(0.0)
        optimizer.build(model.trainable_variables)
    step = steps.make_train_function(mirrored, model, optimizer, per_example_loss=loss, global_batch_size=8,
                                     mixup_alpha=0.2, seed=5)
    got = step(iter(mirrored.distribute_datasets_from_function(dataset_fn)), tf.constant(7, tf.int64),
               tf.constant(1), tf.constant(True))["loss"]
    want = 0.0
    for r in range(2):
        lam = mixup_ops.sample_mixup_lambda(0.2, seed=tf.constant([5, 7 * 1024 + r], tf.int64))
        half = slice(4 * r, 4 * r + 4)
        images, labels = mixup_ops.mixup(tf.constant(x[half]), tf.constant(y[half]), lam)
        want += float(tf.reduce_sum(loss(labels, model(images), None)))
    try:
        steps.check_jit_compile(mirrored)
        refused = ""
    except ValueError as error:
        refused = str(error)
    out["mixup"] = {"got": float(got), "want": want, "jit_refused": refused}

    # Device augmentation: replica r jitters, lights and normalises its uint8 half batch with the draws of
    # seed (run seed, step, r), then mixes it with its λ.
    from bot_keras.data import augment
    x_uint8 = np.random.RandomState(2).randint(0, 256, (64, 6, 6, 3)).astype("uint8")
    def uint8_dataset_fn(context):
        batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
        return tf.data.Dataset.from_tensor_slices((x_uint8, y)).batch(batch, drop_remainder=True).repeat()
    on_device = augment.Augmentation(on="device")
    step = steps.make_train_function(mirrored, model, optimizer, per_example_loss=loss, global_batch_size=8,
                                     mixup_alpha=0.2, seed=5, augmentation=on_device)
    got = step(iter(mirrored.distribute_datasets_from_function(uint8_dataset_fn)), tf.constant(7, tf.int64),
               tf.constant(1), tf.constant(True))["loss"]
    def device_loss(seed_replica):
        total = 0.0
        for r in range(2):
            lam = mixup_ops.sample_mixup_lambda(0.2, seed=tf.constant([5, 7 * 1024 + r], tf.int64))
            half = slice(4 * r, 4 * r + 4)
            images = augment.augment_batch_on_device(tf.constant(x_uint8[half]),
                                                     steps.device_augmentation_seed(5, 7, seed_replica(r)))
            images, labels = mixup_ops.mixup(images, tf.constant(y[half]), lam)
            total += float(tf.reduce_sum(loss(labels, model(images), None)))
        return total
    # Each replica's own draws; the negative control: replica 0's draws on both.
    out["device"] = {"got": float(got), "want": device_loss(lambda r: r),
                     "want_shared": device_loss(lambda r: 0)}
    print("RESULT " + json.dumps(out))
    """
)


def _max_abs_diff(a, b):
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


def test_mirrored_two_devices_matches_one_device_with_the_same_global_batch(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED)
    proc = subprocess.run(
        [sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # After 5 Nesterov steps, a BN-free model and a synchronised-BN model agree to float32 round-off
    # (the all-reduce sums in a different order): 1e-5 absolute on weights of size ~0.1-1.
    for name in ("plain", "sync_bn", "clipped"):
        weights_1, sums_1, _ = out[name]["single"]
        weights_2, sums_2, _ = out[name]["mirrored"]
        assert _max_abs_diff(weights_1, weights_2) < 1e-5, name
        assert sums_1 == pytest.approx(sums_2, rel=1e-5), name
    # --grad_clip_norm clips the global batch's gradient, whatever the replica count (Keras'
    # global_clipnorm would clip each half batch's gradient alone); 0.05 is well below the norm here.
    assert _max_abs_diff(out["clipped"]["single"][0], out["plain"]["single"][0]) > 1e-3
    # Per-replica BN (the default) normalises each half batch on its own: a different model, which
    # shows the comparison above can fail.
    assert _max_abs_diff(out["bn"]["single"][0], out["bn"]["mirrored"][0]) > 1e-4
    # An overflow on replica 1 alone skips the step on both replicas and halves the loss scale (Keras'
    # LossScaleOptimizer alone would take replica 0's verdict and sum inf into every weight).
    assert out["overflow"] == {"scale": 16384.0, "iterations": 0, "unchanged": True}
    assert out["mixup"]["got"] == pytest.approx(out["mixup"]["want"], rel=1e-5)
    assert out["device"]["got"] == pytest.approx(out["device"]["want"], rel=1e-5)
    assert out["device"]["got"] != pytest.approx(out["device"]["want_shared"], rel=1e-3)
    # XLA cannot compile a step over two CPU replicas (one cluster, one device): refused, naming them.
    assert "needs one replica or MirroredStrategy over GPUs" in out["mixup"]["jit_refused"]
    assert "CPU:0" in out["mixup"]["jit_refused"] and "CPU:1" in out["mixup"]["jit_refused"]


_WORKER = _COMMON + textwrap.dedent(
    """
    strategy = distribute.create_strategy("multi_worker_mirrored")
    weights, sums, initial = run(strategy, n_steps=4)
    print("RESULT " + json.dumps({"chief": distribute.is_chief(strategy), "weights": weights, "sums": sums,
                                  "initial": initial}))
    """
)


@pytest.fixture
def two_worker_addresses():
    """Two localhost ports for a two-worker cluster, held until the test ends.

    TF_CONFIG must name every worker's port before any worker starts, so TensorFlow cannot pick them
    (port 0). Binding and closing a socket would free the port for anyone until the worker binds it; here
    a socket of ours keeps each port bound, with SO_REUSEADDR and never listening: the OS gives the port
    to no other bind or outgoing connection, while the worker's gRPC server, which also sets SO_REUSEADDR,
    can bind and listen on it (Linux allows that while no other socket on the port listens). SO_REUSEPORT
    would not do: TensorFlow switches it off for its server, which then fails to start.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(2):
            held = stack.enter_context(socket.socket())
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("127.0.0.1", 0))
            ports.append(held.getsockname()[1])
        yield [f"localhost:{port}" for port in ports]


def test_reserved_worker_ports_cannot_be_taken_by_another_socket(two_worker_addresses):
    for address in two_worker_addresses:
        with socket.socket() as other, pytest.raises(OSError) as error:
            other.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        assert error.value.errno == errno.EADDRINUSE


@pytest.mark.slow
def test_two_workers_on_localhost_train_to_identical_weights(tmp_path, two_worker_addresses):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    workers = two_worker_addresses
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=_env(TF_CONFIG=tf_config),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    assert [r["chief"] for r in results] == [True, False]
    assert _max_abs_diff(results[0]["weights"], results[1]["weights"]) == 0.0
    assert results[0]["sums"][3] == 4 * 8  # 4 steps of the global batch, counted across both workers
    assert _max_abs_diff(results[0]["weights"], results[0]["initial"]) > 1e-3  # it really trained


def _start_workers(args, workers, tmp_path):
    """`python -m bot_keras.train args` as each worker of `workers` (worker 0 the chief), their private
    directories under `tmp_path`."""
    procs = []
    for index in range(len(workers)):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        env = _env(TF_CONFIG=tf_config, TMPDIR=str(tmp_path))
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
        command = [sys.executable, "-m", "bot_keras.train", *args]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _outputs(procs, timeout=300):
    """Each worker's (stdout, stderr), once all have ended."""
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout))
        finally:
            proc.kill()
    return outputs


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_two_worker_resume_finishes(
    tmp_path, two_worker_addresses
):
    from bot_keras import cli

    run = tmp_path / "run"
    # One epoch of 6 steps and no step checkpoints: a checkpoint inside the epoch can only be the
    # preemption's. The chief opens logs/training.csv once its signal handlers are in place; worker 1,
    # which writes no run files, is there before it (a second of margin). The signal then lands while
    # the first step is being traced, early in the epoch whatever the machine's load. Under mixed_float16,
    # the precision a multi-worker CLI run is checked in (its loss scale checkpointed and restored too).
    args = ["--model=resnet18", "--dataset=synthetic:40", "--image_size=16", "--batch_size=8",
            "--steps_per_epoch=6", "--epochs=1", "--checkpoint_steps=0", "--eval_split=",
            "--strategy=multi_worker_mirrored", "--precision=mixed_float16", "--verbose=0",
            f"--model_dir={run}"]
    procs = _start_workers(args, two_worker_addresses, tmp_path)
    csv_log = run / "logs" / "training.csv"
    deadline = time.time() + 300
    while all(p.poll() is None for p in procs) and not csv_log.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)  # worker 1 only, not the chief
    outputs = _outputs(procs)
    reported, causes = [], ["SIGTERM on another worker", "SIGTERM"]
    for proc, (_, stderr), cause in zip(procs, outputs, causes, strict=True):
        assert proc.returncode == cli.PREEMPTED, stderr[-3000:]
        # Ours only: TensorFlow's own log may name a "preempted" leader when the chief is gone first.
        lines = [line for line in stderr.splitlines() if line.startswith("bot_keras.train: preempted")]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        step = int(lines[0].split("preempted at step ")[1].split()[0])
        assert lines[0] == f"bot_keras.train: preempted at step {step} ({cause}); --resume continues"
        reported.append(step)
    assert reported[0] == reported[1] and 1 <= reported[0] < 6
    assert _latest_checkpoint(run) == str(run / "checkpoints" / f"ckpt-{reported[0]}")
    assert not (run / "model.keras").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("bot_keras_worker")]  # worker 1's removed

    procs = _start_workers([*args, "--resume"], two_worker_addresses, tmp_path)
    outputs = _outputs(procs)
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    assert f"at step {reported[0]} (epoch 0)" in outputs[0][0]
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 6
    assert _latest_checkpoint(run) == str(run / "checkpoints" / "ckpt-6")
    # Only the chief reports and writes the run directory; the non-chief's private checkpoint directory
    # is deleted when training ends.
    assert "Finished:" in outputs[0][0] and "Finished:" not in outputs[1][0]
    assert sorted(os.listdir(run)) == [
        "checkpoints", "classes.txt", "final_metrics.json", "flags.txt", "logs", "model.keras", "run.json"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("bot_keras_worker")]


def _latest_checkpoint(run):
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(run / "checkpoints"))


def test_sync_bn_converts_every_batch_norm_of_a_built_model():
    from bot_keras.models import build_model

    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3))
    count = distribute.set_synchronized_batch_norm(model, True)
    # resnet18_d: 3 stem BNs + 8 blocks × 2 + 3 downsampling shortcuts.
    assert count == 3 + 16 + 3
    configs = [
        layer.get_config() for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(configs) == count and all(c["synchronized"] for c in configs)


def test_float16_without_a_gpu_warns_naming_the_cpu_precisions():
    warning = distribute.precision_warning("mixed_float16", {"CPU"})
    assert "--precision=mixed_float16 with no GPU visible" in warning
    assert "--precision=mixed_bfloat16 or --precision=float32" in warning
    assert distribute.precision_warning("mixed_float16", {"CPU", "GPU"}) is None
    assert distribute.precision_warning("mixed_float16", {"CPU", "TPU"}) is None
    assert distribute.precision_warning("mixed_bfloat16", {"CPU"}) is None
    assert distribute.precision_warning("float32", {"CPU"}) is None


def test_tpu_strategy_without_a_tpu_names_the_flags():
    with pytest.raises(ValueError, match=r"^--strategy=tpu: no TPU found on this machine \(no TPU VM; --tpu"):
        distribute.create_strategy("tpu")
