"""train.py: flag validation, flags.txt, set-up errors, and the command line end to end."""

import inspect
import math
import os
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from bot_keras import cli, train, trainer, transfer
from bot_keras.classification import task as classification


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
        (["--cutmix_alpha=-1"], r"--cutmix_alpha=-1.0 must be >= 0"),
        (["--keep_best=top1"], r"--keep_best='top1' is not one of"),
        (["--keep_best=val_top1", "--eval_split="], r"--keep_best=val_top1 needs an evaluation"),
        (["--random_erasing=2"], r"--random_erasing=2.0 must be in \[0, 1\]"),
        (["--mix_switch_prob=1.5"], r"--mix_switch_prob=1.5 must be in \[0, 1\]"),
        (["--cutmix_alpha=1", "--mixup_off_epochs=2"], r"--mixup_off_epochs=2 leaves no mixup epoch"),
        (["--mixup_alpha=0.2", "--mixup_off_epochs=2"], r"--mixup_off_epochs=2 leaves no mixup epoch"),
        (["--distill_hard_weight=0.5"], r"--distill_hard_weight=0.5 is set but there is no --teacher"),
        (["--teacher=/nonexistent/t.keras"], r"--teacher='/nonexistent/t.keras': no such file"),
        (["--steps_per_execution=0"], r"--steps_per_execution=0 must be >= 1"),
        (["--resume"], r"--resume: no checkpoint in"),
        (["--crop_min_area=0"], r"--crop_min_area=0.0 must be in \(0, 1\]"),
        (["--dataset=imagenet"], r"--dataset: Unknown dataset source 'imagenet'"),
        (["--model=mobilenet", "--zero_gamma"], r"--zero_gamma applies to residual networks only"),
        (["--model=mobilenet", "--drop_path_rate=0.1"], r"--drop_path_rate applies to residual networks"),
        (["--drop_path_rate=1"], r"--drop_path_rate=1.0 must be in \[0, 1\)"),
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
    # Only what a run writes before its first checkpoint: a run that never got going may start afresh.
    train.validate_flags(parse(*_base(tmp_path)))
    with pytest.raises(train.FlagError, match=r"no checkpoint .* run the command without --resume"):
        train.validate_flags(parse(*_base(tmp_path), "--resume"))
    for name in ("checkpoints/checkpoint", "model.keras", "notes.txt"):  # a run, or someone else's files
        (tmp_path / "run" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "run" / name).write_text("x")
        with pytest.raises(train.FlagError, match=r"already holds a run; pass --resume"):
            train.validate_flags(parse(*_base(tmp_path)))
        (tmp_path / "run" / name).unlink()


def test_resolved_flags_reload_as_a_flagfile(parse, tmp_path):
    # Every flag train.py defines (through the classification task's and trainer.py's shared definitions) is
    # recorded (read from the sources, not from CONTRACT_FLAGS itself).
    sources = (pathlib.Path(classification.__file__).read_text() + pathlib.Path(trainer.__file__).read_text()
               + inspect.getsource(transfer.define_backbone_flags))
    defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', sources))
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


# --- the real distributed step on one device -----------------------------------------------------------


# --- sync BN and distillation ---------------------------------------------------------------------------


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
def test_sigkill_mid_epoch_then_resume_continues_from_the_last_checkpoint(tmp_path, capsys):
    import signal
    import subprocess
    import time

    run_dir = str(tmp_path / "run")
    # The kill comes at the first checkpoint (step 3); 30 steps an epoch leave 9 more checkpoints of margin
    # for it to land mid-epoch, and the resumed run still crosses the epoch boundary.
    steps_per_epoch, epochs, batch = 30, 2, 8
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

    # Without --resume the existing run is protected (the same command line, in this process: cli.call
    # parses and maps errors to exit codes as the command's cli.run does).
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli.call(train.main, train.define_flags, args, command=train.COMMAND)
    assert refused.value.code != 0 and "already holds a run; pass --resume" in capsys.readouterr().err

    resumed = subprocess.run(_cli(*args, "--resume")[0], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Cosine decay without warmup, peak 0.1·8/256, reaching 0 at the last of 60 steps (Section 5.1).
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


def test_changed_flags_pairs_values_and_booleans_by_name(parse):
    f = parse("--model=resnet18_d", "--image_size=32")
    old = "--model=resnet18_d\n--epochs=5.0\n--zero_gamma\n--label_smoothing=0.1\n--model_dir=a\n"
    new = "--model=resnet18_d\n--epochs=12.0\n--nozero_gamma\n--mixup_alpha=0.2\n--model_dir=b\n"  # moved
    assert trainer.changed_flags(old, new, f) == [
        "--epochs=5.0 → --epochs=12.0", "--label_smoothing=0.1 → unset", "unset → --mixup_alpha=0.2",
        "--zero_gamma → --nozero_gamma"]
    assert trainer.changed_flags(old, old, f) == []


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


def test_undecodable_file_stops_training_naming_it(tmp_path, capsys):
    """A truncated JPEG met while training stops the command with the file's name, not a TensorFlow stack
    (in this process through cli.call; a fresh train process stopped by bad data, its whole stderr one
    line and exit 2, is test_reliability.py's bad-data zoo)."""
    _folder(str(tmp_path / "data"), {"train": ["a", "b"]})
    jpeg = tf.io.encode_jpeg(np.full((12, 12, 3), 99, np.uint8)).numpy()
    bad = tmp_path / "data" / "train" / "b" / "broken.jpg"
    bad.write_bytes(jpeg[: len(jpeg) // 2])
    args = [*_base(tmp_path), f"--dataset=folder:{tmp_path / 'data'}", "--eval_split=", "--batch_size=3",
            "--image_size=16", "--verbose=0"]
    with pytest.raises(SystemExit) as stop:  # any other exception (a traceback) fails the test
        cli.call(train.main, train.define_flags, args, command=train.COMMAND)
    stderr = capsys.readouterr().err
    assert stop.value.code == 2, stderr[-2000:]
    assert "Training stopped by bad input data" in stderr and "broken.jpg" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow  # a training run end to end, then an evaluation
def test_ema_and_keep_best_run_saves_and_scores_the_averaged_weights(parse, tmp_path):
    """--ema_decay: model.keras holds the averages (those of the last checkpoint, not the raw weights), and
    evaluating it gives the val_top1 the trainer logged for its last epoch. --keep_best=val_loss:
    final_metrics.json names the epoch with the lowest logged val_loss, and model_best.keras scores it."""
    import csv
    import json

    from bot_keras import evaluate, loop, model_files, run_dir

    f = parse(*_base(tmp_path), "--dataset=synthetic:16", "--image_size=16", "--batch_size=8", "--epochs=3",
              "--ema_decay=0.9", "--base_lr=0.4", "--keep_best=val_loss", "--verbose=0")
    train.main([], f)
    run = str(tmp_path / "run")
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["weights"] == "ema (decay 0.9)"
    with open(tmp_path / "run" / "logs" / "training.csv") as log:
        val_losses = [float(row["val_loss"]) for row in csv.DictReader(log)]
    assert len(val_losses) == 3
    assert final["best_epoch"] == int(np.argmin(val_losses))
    assert final["best_val_loss"] == pytest.approx(min(val_losses), rel=1e-6)
    best = evaluate.evaluate_run(run, checkpoint="best")
    assert best["loss"] == pytest.approx(final["best_val_loss"], rel=1e-5)
    saved = model_files.load_model(run_dir.read_run(run))
    reader = tf.train.load_checkpoint(loop.latest_checkpoint(run))
    names = {name for name, _ in tf.train.list_variables(loop.latest_checkpoint(run))}
    averages = [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE")
                for i in range(len(saved.weights))]
    assert "ema/updates/.ATTRIBUTES/VARIABLE_VALUE" in names
    for weight, average in zip(saved.weights, averages, strict=True):
        np.testing.assert_array_equal(weight.numpy(), average)
    assert evaluate.evaluate_run(run)["top1"] == pytest.approx(final["val_top1"], abs=1e-6)
