"""train.py: flag validation, the loop's bookkeeping, mixed precision, checkpoints, distillation, the CLI."""

import csv
import math
import os
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras import cli, distribute, loop, optimizers, schedules, steps, train
from bot_keras.teacher import load_teacher, teacher_logits


def _base(tmp_path):
    return ["--model=resnet18_d", "--dataset=synthetic", f"--model_dir={tmp_path / 'run'}", "--epochs=2"]


# --- flags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model=resnet51"], r"--model='resnet51' is unknown"),
        (["--epochs=-1"], r"--epochs=-1.0 must be positive"),
        (["--batch_size=0"], r"--batch_size=0 must be positive"),
        (["--precision=fp16"], r"--precision='fp16' is not one of"),
        (["--strategy=horovod"], r"--strategy='horovod' is not one of"),
        (["--lr_schedule=poly"], r"--lr_schedule='poly'"),
        (["--weight_decay_mode=adamw"], r"--weight_decay_mode='adamw'"),
        (["--warmup_epochs=2"], r"--warmup_epochs=2.0 must be in \[0, --epochs=2.0\)"),
        (["--label_smoothing=1.0"], r"--label_smoothing=1.0 must be in \[0, 1\)"),
        (["--mixup_off_epochs=1"], r"--mixup_off_epochs=1 needs mixup on \(--mixup_alpha > 0, got 0.0\)"),
        (["--mixup_alpha=0.2", "--mixup_off_epochs=2"], r"--mixup_off_epochs=2 leaves no mixup epoch"),
        (["--distill_hard_weight=0.5"], r"--distill_hard_weight=0.5 is set but there is no --teacher"),
        (["--teacher=/nonexistent/t.keras"], r"--teacher='/nonexistent/t.keras': no such file"),
        (["--steps_per_execution=0"], r"--steps_per_execution=0 must be >= 1"),
        (["--resume"], r"--resume: no checkpoint in"),
        (["--crop_min_area=0"], r"--crop_min_area=0.0 must be in \(0, 1\]"),
        (["--dataset=imagenet"], r"--dataset: Unknown dataset source 'imagenet'"),
        (["--model=mobilenet", "--zero_gamma"], r"--zero_gamma applies to residual networks only"),
        (["--teacher=resnet18_d:/nonexistent/w.h5"], r"no weights file '/nonexistent/w.h5'"),
        (["--crop_min_area=1.5"], r"--crop_min_area=1.5 must be in \(0, 1\]"),
    ],
)
def test_bad_flags_are_reported_with_their_value(parse, tmp_path, extra, message):
    with pytest.raises(train.FlagError, match=message):
        train.validate_flags(parse(*_base(tmp_path), *extra))


def test_all_problems_reported_at_once_and_required_flags_named(parse):
    with pytest.raises(train.FlagError) as error:
        train.validate_flags(parse("--epochs=0"))
    text = str(error.value)
    for expected in (
        "--model is required",
        "--dataset is required",
        "--model_dir is required",
        "--epochs=0.0",
    ):
        assert expected in text


def test_existing_run_is_never_overwritten_without_resume(parse, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "flags.txt").write_text("--model=resnet18\n")
    with pytest.raises(train.FlagError, match=r"already holds a run; pass --resume"):
        train.validate_flags(parse(*_base(tmp_path)))


def test_resolved_flags_reload_as_a_flagfile(parse, tmp_path):
    # Every flag train.py defines is recorded (read from the source, not from CONTRACT_FLAGS itself).
    defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', pathlib.Path(train.__file__).read_text()))
    assert set(train.CONTRACT_FLAGS) == defined and len(defined) > 40
    f = parse(*_base(tmp_path), "--no_bias_decay", "--lr_decay_epochs=10,20", "--base_lr=0.4", "--zero_gamma",
              "--crop_min_area=0.35", "--skip_corrupt", "--label_offset=1")
    text = train.resolved_flags_text(f)
    assert "--crop_min_area=0.35" in text and "--skip_corrupt" in text and "--label_offset=1" in text
    path = tmp_path / "flags.txt"
    path.write_text(text)
    expected = {name: f[name].value for name in train.CONTRACT_FLAGS if name != "resume"}
    f2 = parse(f"--flagfile={path}")
    assert {name: f2[name].value for name in expected} == expected
    assert "--no_bias_decay" in text and "--lr_decay_epochs=10,20" in text


# --- the loop's bookkeeping, with a stand-in step function -------------------------------------------


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
):
    calls = []

    def fake_train_function(iterator, start_step, num_steps, mixup_on):
        calls.append((int(start_step), int(num_steps), bool(mixup_on)))
        n = float(num_steps) * 4
        loss = float("nan") if nan_at_call == len(calls) else 0.5 * n
        return {"loss": tf.constant(loss), "top1": tf.constant(0.25 * n), "top5": tf.constant(0.75 * n),
                "count": tf.constant(n)}

    step_var = tf.Variable(start, dtype=tf.int64)
    manager = _RecordingManager()
    callbacks = loop.make_callbacks(
        str(tmp_path),
        chief=True,
        verbose=0,
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


def test_non_finite_loss_stops_naming_step_precision_and_lr(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"at step 3 \(epoch 0\), --precision=float32, learning rate 0.25"
    ):
        _run_loop(tmp_path, steps_per_execution=1, checkpoint_steps=0, nan_at_call=3)


# --- the real distributed step on one device -----------------------------------------------------------


def _tiny_model(num_classes=3, batch_norm=False):
    layers = [keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(num_classes, dtype="float32"),
    ]
    return keras.Sequential(layers)


def _batches(scale=1.0, n=8, seed=0):
    x = np.random.RandomState(seed).randn(n, 6, 6, 3).astype("float32") * scale
    y = np.eye(3, dtype="float32")[np.arange(n) % 3]
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _step_setup(precision, *, learning_rate=0.1, loss_scaling=None):
    distribute.set_precision(precision)
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = _tiny_model()
    optimizer = optimizers.build_optimizer(learning_rate, weight_decay=0.0)
    if loss_scaling if loss_scaling is not None else distribute.needs_loss_scaling(precision):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(strategy, model, optimizer, per_example_loss=loss, global_batch_size=8)
    return model, optimizer, step


def _steps(step, data, n, start=0):
    sums = step(iter(data), tf.constant(start, tf.int64), tf.constant(n), tf.constant(False))
    assert all(value.dtype == tf.float32 for value in sums.values())
    return {name: float(value) for name, value in sums.items()}


def test_mixed_float16_computes_in_half_keeps_float32_variables_logits_and_loss():
    model, optimizer, step = _step_setup("mixed_float16")
    conv = model.layers[0]
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    assert model(tf.zeros((1, 6, 6, 3))).dtype == tf.float32
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    sums = _steps(step, _batches(), 3)
    assert sums["count"] == 24
    weights_16 = model.get_weights()
    assert float(optimizer.dynamic_scale.numpy()) == 32768.0  # finite steps keep the initial scale

    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
    model_32, _, step_32 = _step_setup("float32")
    sums_32 = _steps(step_32, _batches(), 3)
    # The scaled float16 step is the float32 step up to half-precision round-off (~1e-3 relative).
    for a, b in zip(weights_16, model_32.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)
    assert sums["loss"] == pytest.approx(sums_32["loss"], rel=1e-2)


def test_overflowing_float16_gradients_skip_the_step_and_halve_the_loss_scale():
    model, optimizer, step = _step_setup("mixed_float16")
    before = model.get_weights()
    # Inputs of 3000 make the scaled (×32768) kernel gradients overflow float16's 65504.
    _steps(step, _batches(scale=3000.0), 1)
    assert float(optimizer.dynamic_scale.numpy()) == 16384.0
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.iterations.numpy()) == 0


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
    assert loop.last_learning_rate(optimizer2) == pytest.approx(float(schedule(5)), rel=1e-6)
    # Warmup over 5 steps to 0.1, then cosine: at step 6 the lr is ½(1 + cos(π·1/14))·0.1.
    assert float(schedule(6)) == pytest.approx(0.5 * (1 + math.cos(math.pi / 14)) * 0.1, rel=1e-6)
    for a, b in zip(expected_weights, model2.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(expected_momenta, [v.numpy() for v in optimizer2.inner_optimizer.variables], strict=True):
        np.testing.assert_array_equal(a, b)


# --- sync BN and distillation ---------------------------------------------------------------------------


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


def test_teacher_with_other_classes_or_size_is_rejected_naming_the_file(tmp_path):
    path = str(tmp_path / "teacher.keras")
    _tiny_model(num_classes=5).save(path)
    with pytest.raises(cli.SetupError, match=r"teacher\.keras' predicts 5 classes; the dataset has 3"):
        load_teacher(path, num_classes=3, image_size=6)
    with pytest.raises(cli.SetupError, match=r"takes 6x6 images; --image_size=8"):
        load_teacher(path, num_classes=5, image_size=8)
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(cli.SetupError, match=r"broken\.keras': cannot load the \.keras file"):
        load_teacher(str(tmp_path / "broken.keras"), num_classes=5, image_size=6)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_distillation_trains_the_student_and_never_changes_the_teacher(tmp_path, precision):
    keras.utils.set_random_seed(1)
    path = str(tmp_path / "teacher.keras")
    _tiny_model(batch_norm=True).save(path)
    teacher = load_teacher(path, num_classes=3, image_size=6)
    teacher_before = [w.copy() for w in teacher.get_weights()]  # includes BN moving mean/variance
    # Under mixed_float16 the student's step is loss-scaled; the teacher's logits enter the loss in float32.
    model, optimizer, _ = _step_setup(precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    loss = steps.make_per_example_loss(label_smoothing=0.1, temperature=4.0, hard_weight=None)
    step = steps.make_train_function(
        tf.distribute.get_strategy(),
        model,
        optimizer,
        per_example_loss=loss,
        global_batch_size=8,
        teacher=teacher,
    )
    student_before = model.get_weights()
    _steps(step, _batches(), 3)
    for a, b in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(student_before, model.get_weights(), strict=True)) > 1e-4


def _folder(root, splits):
    """root/<split>/<class>/i.png, flat colours; `splits` maps split → class names."""
    for split, classes in splits.items():
        for name in classes:
            os.makedirs(os.path.join(root, split, name))
            for i in range(4):
                image = np.full((12, 12, 3), 40 * i, np.uint8)
                tf.io.write_file(os.path.join(root, split, name, f"{i}.png"), tf.io.encode_png(image))


@pytest.mark.parametrize(
    "splits, eval_split, message",
    [
        ({"train": ["a", "b"]}, "test", r"Split 'test' not found"),  # a missing split names itself
        ({"train": ["a", "b"], "test": ["a", "c"]}, "test", r"--eval_split='test' has 2 classes \(a, c"),
    ],
)
def test_set_up_errors_are_one_message_not_a_traceback(parse, tmp_path, capsys, splits, eval_split, message):
    _folder(str(tmp_path / "data"), splits)
    f = parse(*_base(tmp_path), f"--dataset=folder:{tmp_path / 'data'}", f"--eval_split={eval_split}",
              "--batch_size=2", "--image_size=16", "--verbose=0")
    with pytest.raises(cli.SetupError, match=message):  # cli.run prints it in one line, exit 2
        train.main([], f)
    assert not os.path.exists(tmp_path / "run")  # nothing written for a run that never started


# --- the command line, end to end (subprocesses) ---------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    import sys

    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    # conftest turns oneDNN off for quiet in-process tests; the CLI runs as users run it (3-4x faster convs).
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    return [sys.executable, "-m", "bot_keras.train", *args], env


def _checkpoint_steps(run_dir):
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name[5:-6])
        for name in os.listdir(directory)
        if name.startswith("ckpt-") and name.endswith(".index")
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_from_the_last_checkpoint(tmp_path):
    import signal
    import subprocess
    import time

    run_dir = str(tmp_path / "run")
    steps_per_epoch, epochs, batch = 60, 2, 8
    args = [
        "--model=resnet18",
        "--dataset=synthetic:40",
        "--image_size=16",
        f"--batch_size={batch}",
        f"--steps_per_epoch={steps_per_epoch}",
        f"--epochs={epochs}",
        "--base_lr=0.1",
        "--lr_schedule=cosine",
        "--checkpoint_steps=3",
        "--keep_checkpoints=100",
        "--eval_split=",
        "--verbose=0",
        "--seed=3",
        f"--model_dir={run_dir}",
    ]
    command, env = _cli(*args)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill once the checkpoint state file names a checkpoint (its data files come first: a kill between
    # the two leaves files that --resume, like TensorFlow, does not use).
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if os.path.isdir(checkpoint_dir) and tf.train.latest_checkpoint(checkpoint_dir):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed_at = _checkpoint_steps(run_dir)
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    assert latest, f"no checkpoint was recorded before the kill (files: {killed_at})"
    last = int(latest.rsplit("-", 1)[1])
    assert last % 3 == 0 and last < steps_per_epoch, f"not killed mid-epoch: checkpoints {killed_at}"
    assert not os.path.exists(os.path.join(run_dir, "model.keras"))

    # Without --resume the existing run is protected.
    refused = subprocess.run(_cli(*args)[0], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "already holds a run; pass --resume" in refused.stderr

    resumed = subprocess.run(_cli(*args, "--resume")[0], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Cosine decay without warmup, peak 0.1·8/256, reaching 0 at the last of 120 steps (Section 5.1).
    peak, total = 0.1 * batch / 256, steps_per_epoch * epochs
    expected_lr = 0.5 * (1 + math.cos(math.pi * last / (total - 1))) * peak
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("Resumed from"))
    assert f"ckpt-{last} at step {last} (epoch 0)" in line
    assert float(line.split("learning rate ")[1].split()[0].rstrip(",")) == pytest.approx(
        expected_lr, rel=1e-4
    )
    assert _checkpoint_steps(run_dir)[-1] == total
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        assert json_load(f)["step"] == total
    assert os.path.exists(os.path.join(run_dir, "model.keras"))


def json_load(f):
    import json

    return json.load(f)


@pytest.mark.slow
def test_demo_config_trains_clearly_above_chance(tmp_path):
    import subprocess

    run_dir = str(tmp_path / "demo")
    command, env = _cli(
        f"--flagfile={os.path.join(REPO, 'configs', 'demo.flags')}", f"--model_dir={run_dir}", "--verbose=2"
    )
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        metrics = json_load(f)
    # 10 classes: chance is 10%. The demo reaches ~97% on a 2-core CPU; 60% leaves room for other CPUs.
    assert metrics["val_top1"] > 0.6, metrics
    assert sorted(os.listdir(run_dir)) == [
        "checkpoints",
        "classes.txt",
        "final_metrics.json",
        "flags.txt",
        "logs",
        "model.keras",
        "run.json",
    ]
    with open(os.path.join(run_dir, "classes.txt")) as f:
        assert len(f.read().split()) == 10


def test_mixup_in_the_step_uses_the_replica_seeded_lambda_and_switches_off():
    from bot_keras.data import mixup as mixup_ops

    keras.utils.set_random_seed(0)
    model = _tiny_model()
    optimizer = optimizers.build_optimizer(0.0, weight_decay=0.0)  # lr 0: the model stays fixed
    optimizer.build(model.trainable_variables)
    loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(
        tf.distribute.get_strategy(),
        model,
        optimizer,
        per_example_loss=loss,
        global_batch_size=8,
        mixup_alpha=0.2,
        seed=5,
    )
    images, labels = next(iter(_batches()))

    def loss_sum(x, y):
        return float(tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=model(x))))

    def run(start, mixup_on):
        it = iter(_batches())
        return step(it, tf.constant(start, tf.int64), tf.constant(1), tf.constant(mixup_on))["loss"].numpy()

    # λ of replica 0 at step 7 with run seed 5: seed (5, 7·1024 + 0).
    lam = mixup_ops.sample_mixup_lambda(0.2, seed=tf.constant([5, 7 * 1024], tf.int64))
    mixed_images, mixed_labels = mixup_ops.mixup(images, labels, lam)
    assert run(7, True) == pytest.approx(loss_sum(mixed_images, mixed_labels), rel=1e-5)
    assert run(8, True) != pytest.approx(run(7, True), rel=1e-5)  # a new λ each step
    assert run(7, False) == pytest.approx(loss_sum(images, labels), rel=1e-5)  # --mixup_off_epochs


def test_savedmodel_teacher_gives_the_models_logits(tmp_path):
    model = _tiny_model()
    model.export(str(tmp_path / "teacher_savedmodel"), verbose=False)  # Keras' SavedModel: float images in
    teacher = load_teacher(str(tmp_path / "teacher_savedmodel"), num_classes=3, image_size=6)
    images = tf.random.stateless_normal((4, 6, 6, 3), seed=(1, 2))
    np.testing.assert_allclose(teacher_logits(teacher, images), model(images), rtol=1e-5, atol=1e-6)
    with pytest.raises(cli.SetupError, match=r"teacher_savedmodel' predicts 3 classes; the dataset has 4"):
        load_teacher(str(tmp_path / "teacher_savedmodel"), num_classes=4, image_size=6)


def test_tensorboard_logs_train_and_validation_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    _run_loop(tmp_path, epochs=1, checkpoint_steps=0)
    for split in ("train", "validation"):
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "logs" / split))


@pytest.mark.slow
def test_undecodable_file_stops_training_naming_it(tmp_path):
    """A truncated JPEG met while training stops the CLI with the file's name, not a TensorFlow stack."""
    import subprocess

    _folder(str(tmp_path / "data"), {"train": ["a", "b"]})
    jpeg = tf.io.encode_jpeg(np.full((12, 12, 3), 99, np.uint8)).numpy()
    bad = tmp_path / "data" / "train" / "b" / "broken.jpg"
    bad.write_bytes(jpeg[: len(jpeg) // 2])
    command, env = _cli(*_base(tmp_path), f"--dataset=folder:{tmp_path / 'data'}", "--eval_split=",
                        "--batch_size=3", "--image_size=16", "--verbose=0")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Training stopped by bad input data" in proc.stderr and "broken.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr
