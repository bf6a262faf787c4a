"""Reliability, through the command lines as a user meets them: nothing a user saved is lost,
valid photos are never rejected, every bad input is named once.

Each case asserts the exact outcome: the exit status, the file named, which files are unchanged (hashes
before and after). The runs are tiny (ResNet-18-D on 32 px images, a few steps of a folder dataset the
test writes); the training cases are marked slow. A command runs in a fresh process where the process is
what is tested (a kill, a signal, a console without TensorFlow's lines, the memory a refusal costs), and
otherwise in this one through `commands.run` (the same flags, main and exit codes).
"""

import csv
import hashlib
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import commands
import pytest
from test_finetune import write_scenes
from test_train import _cli
from tiny_detection import write_rectangles_voc
from tiny_run import encode, jpeg_declaring, pixels, png_bomb

from bot_keras import cli, evaluate, export, predict, train

SLOW = pytest.mark.slow
TIMEOUT = 600  # seconds; a few each on an idle 2-core machine, far more on a loaded one


def _photo(seed, size=40):
    return encode(pixels(size, size, seed), "JPEG")


def _write_folder(root, per_class=8):
    """ROOT/train/{a,b}/i.jpg: two classes of small JPEGs (smooth gradients, a different noise each)."""
    for c, name in enumerate(("a", "b")):
        folder = pathlib.Path(root) / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i}.jpg").write_bytes(_photo(seed=10 * c + i))
    return pathlib.Path(root)


def _train_args(data, model_dir, *extra):
    return [
        "--model=resnet18_d", f"--dataset=folder:{data}", "--eval_split=", "--image_size=32",
        "--batch_size=4", "--steps_per_epoch=2", "--epochs=1", "--base_lr=0.1", "--verbose=0", "--seed=1",
        f"--model_dir={model_dir}", *extra,
    ]


def _run(module, *args, wrapper=None):
    """`python -m MODULE args` (or `python -c WRAPPER args`), as test_train runs the CLI."""
    _, env = _cli()
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as users run it: bot_keras keeps TensorFlow's start-up lines off
    command = [sys.executable, "-c", wrapper, *args] if wrapper else [sys.executable, "-m", module, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _error_line(proc, command):
    """The one-line error of a failed command: asserts there is exactly one and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _hashes(directory):
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(pathlib.Path(directory).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished run (trained by the CLI) and its data folder; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    data = _write_folder(root / "data")
    proc = commands.run("bot_keras.train", *_train_args(data, root / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", data


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# --- 1. --resume of a finished run ----------------------------------------------------------------------


@SLOW
def test_resume_of_a_finished_run_changes_no_file_and_raised_epochs_continue(finished_run, tmp_path):
    run, data = finished_run
    run = _copy(run, tmp_path)
    before = _hashes(run)
    first = json.loads((run / "final_metrics.json").read_text())
    assert {"loss", "top1", "top5", "step", "wall_time_s"} <= set(first) and first["step"] == 2

    proc = commands.run("bot_keras.train", *_train_args(data, run, "--resume"))
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert f"{run} is a complete run (step 2): nothing to do" in proc.stdout
    assert _hashes(run) == before  # model, metrics, flags, classes, checkpoints, logs: every byte

    proc = commands.run("bot_keras.train", *_train_args(data, run, "--resume", "--epochs=2"))
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["step"] == 4 and {"loss", "top1", "top5", "lr"} <= set(metrics)
    # The run's total training time: the first process's plus the second's.
    assert metrics["wall_time_s"] > first["wall_time_s"]
    assert "--epochs=2.0\n" in (run / "flags.txt").read_text()
    assert (f"--resume with flags changed since {run / 'flags.txt'}: --epochs=1.0 → --epochs=2.0 (flags.txt "
            "now records the new values)") in proc.stdout.splitlines()


# --- 2. a kill at the final save; a damaged model.keras -----------------------------------------------

# Kills the trainer (os._exit, as SIGKILL would) after the final model is written under its temporary name
# and before the rename that puts it in place.
_KILL_AT_MODEL_RENAME = """
import os, runpy, sys
replace = os.replace
def killing_replace(src, dst):
    if str(dst).endswith("model.keras"):
        os._exit(9)
    replace(src, dst)
os.replace = killing_replace
sys.argv[0] = "bot_keras.train"
runpy.run_module("bot_keras.train", run_name="__main__")
"""


@SLOW
def test_kill_during_the_final_save_leaves_no_model_and_resume_writes_it(tmp_path):
    data = _write_folder(tmp_path / "data")
    run = tmp_path / "run"
    proc = _run(None, *_train_args(data, run), wrapper=_KILL_AT_MODEL_RENAME)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not (run / "model.keras").exists()  # no half or empty model: it never had the final name
    assert [p.name for p in run.glob(".model.*.tmp.keras")]  # the complete temporary is all there was
    assert not (run / "final_metrics.json").exists()  # written last: it marks a finished run

    cure = r"missing model\.keras; the run's checkpoints can rewrite it: .*--resume$"
    with pytest.raises(cli.SetupError, match=cure):
        evaluate.evaluate_run(run, split="train")

    proc = commands.run("bot_keras.train", *_train_args(data, run, "--resume"))
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert "finished training (step 2) but lacks its final files: writing them" in proc.stdout
    # The checkpoint carried the last epoch's logs: the metrics are those training.csv recorded.
    metrics = json.loads((run / "final_metrics.json").read_text())
    with open(run / "logs" / "training.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert metrics["step"] == 2 and metrics["wall_time_s"] > 0
    for name in ("loss", "top1", "top5", "lr"):
        assert metrics[name] == pytest.approx(float(last[name]), rel=1e-6), name
    assert not list(run.glob(".*.tmp*"))
    assert evaluate.evaluate_run(run, split="train")["count"] == 16


@SLOW
def test_an_empty_model_file_is_reported_as_damaged_naming_resume(finished_run, tmp_path):
    run = _copy(finished_run[0], tmp_path)
    (run / "model.keras").write_bytes(b"")
    proc = commands.run("bot_keras.evaluate", f"--model_dir={run}", "--split=train")
    assert proc.returncode == cli.USAGE_ERROR
    expected = (f"bot_keras.evaluate: error: {run}/model.keras: damaged: empty (0 bytes); the run's "
                f"checkpoints can rewrite it: python -m bot_keras.train --flagfile={run}/flags.txt "
                f"--model_dir={run} --resume")
    assert _error_line(proc, "bot_keras.evaluate") == expected
    # export and predict read the model through the same function, and say the same.
    for call in (lambda: export.export(run, tmp_path / "export"), lambda: predict.load_classifier(run)):
        with pytest.raises(cli.SetupError, match=r"model\.keras: damaged: empty \(0 bytes\); .* --resume$"):
            call()
    assert not (tmp_path / "export").exists()
    before = {k: v for k, v in _hashes(run).items() if k != "model.keras"}
    proc = commands.run("bot_keras.train", f"--flagfile={run}/flags.txt", f"--model_dir={run}", "--resume")
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert {k: v for k, v in _hashes(run).items() if k != "model.keras"} == before
    predict.load_classifier(run)  # loads


# --- 3, 4, 6. the bad-data zoo -------------------------------------------------------------------------


@SLOW
def test_bad_data_zoo_trailer_trains_empty_file_named_then_rerun_reuses_the_directory(tmp_path):
    data = _write_folder(tmp_path / "data")
    # 10 KB after the JPEG's end-of-image marker (cameras and editors append such trailers): a valid photo.
    (data / "train" / "a" / "trailer.jpg").write_bytes(_photo(seed=99) + b"EXIF-TRAILER" * 850)
    (data / "train" / "b" / "zero.jpg").write_bytes(b"")
    run = tmp_path / "run"
    args = _train_args(data, run, "--steps_per_epoch=5")  # 18 images, 5 steps of 4: every file is read
    proc = _run("bot_keras.train", *args)
    assert proc.returncode == cli.USAGE_ERROR
    line = _error_line(proc, "bot_keras.train")
    assert line == (
        "bot_keras.train: error: Training stopped by bad input data: Undecodable image file (empty, not an "
        f"image, or truncated): {data}/train/b/zero.jpg (skip such files with skip_corrupt)"
    )
    assert "trailer.jpg" not in proc.stderr
    assert not (run / "model.keras").exists() and not any((run / "checkpoints").glob("*"))

    (data / "train" / "b" / "zero.jpg").unlink()  # the user fixes the data and runs the same command
    proc = commands.run("bot_keras.train", *args)
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert "holds no checkpoint and no model" in proc.stdout and "starting the run afresh" in proc.stdout
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 5


def test_several_non_image_files_are_listed_in_one_message(parse, tmp_path):
    data = _write_folder(tmp_path / "data", per_class=2)
    names = ["notes.txt", "labels.csv", "README"]
    for name in names:
        (data / "train" / "a" / name).write_text("not an image")
    f = parse(*_train_args(data, tmp_path / "run"))
    with pytest.raises(cli.SetupError) as error:
        train.main([], f)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names), message
    assert not (tmp_path / "run").exists()


# --- 5. evaluate on a split with a broken file ---------------------------------------------------------


@SLOW
def test_evaluate_on_a_broken_split_names_the_file_or_skips_it(finished_run, tmp_path):
    run, data = finished_run
    run = _copy(run, tmp_path)
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    jpeg = _photo(seed=5)
    (broken / "train" / "b" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    before = _hashes(run)

    # The run trained without an eval split: evaluate asks for one instead of guessing 'validation'.
    with pytest.raises(cli.SetupError, match=r"trained without an evaluation split .* with --split\.$"):
        evaluate.evaluate_run(run)

    proc = commands.run("bot_keras.evaluate", f"--model_dir={run}", f"--dataset=folder:{broken}",
                        "--split=train")
    assert proc.returncode == cli.USAGE_ERROR
    assert _error_line(proc, "bot_keras.evaluate") == (
        "bot_keras.evaluate: error: Evaluation stopped by bad input data: Undecodable image file (empty, "
        f"not an image, or truncated): {broken}/train/b/cut.jpg (skip such files with skip_corrupt)"
    )
    assert _hashes(run) == before  # no report written

    result = evaluate.evaluate_run(run, dataset=f"folder:{broken}", split="train", skip_corrupt=True)
    assert result["count"] == 16 and result["skipped_files"] == 1


# --- 6. one line when a required flag is missing, for every command -----------------------------------


@SLOW
@pytest.mark.parametrize(
    "module, args, message",
    [
        ("bot_keras.evaluate", [], "--model_dir is required."),
        ("bot_keras.predict", ["cat.jpg"], "--model is required."),
    ],
)
def test_a_missing_required_flag_is_one_line_not_the_flag_help(module, args, message):
    proc = _run(module, *args)
    assert proc.returncode == cli.USAGE_ERROR
    assert proc.stderr.strip().splitlines()[-1] == f"{module}: error: {message}"
    assert "flags:" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- 7. image bombs: refused from the header, before anything decodes them -------------------------------


def _bombs(directory):
    """A JPEG whose header declares 60000 x 60000 (a 600-byte file) and a valid 20000 x 20000 PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg, png = directory / "patched.jpg", directory / "bomb.png"
    jpeg.write_bytes(jpeg_declaring(60000, 60000))
    png.write_bytes(png_bomb(20000, 20000))
    return jpeg, png


@SLOW
def test_training_names_an_image_bomb_or_skips_and_counts_both(tmp_path, capfd):
    data = _write_folder(tmp_path / "data")
    jpeg, png = _bombs(data / "train" / "a")
    args = _train_args(data, tmp_path / "run", "--steps_per_epoch=5")  # 18 images, 5 steps of 4: all read
    proc = commands.run("bot_keras.train", *args)
    assert proc.returncode == cli.USAGE_ERROR
    line = _error_line(proc, "bot_keras.train")
    expected = {
        jpeg: "60000x60000 = 3600000000 pixels", png: "20000x20000 = 400000000 pixels"
    }
    named = [path for path in expected if str(path) in line]
    assert len(named) == 1, line
    assert line == (
        f"bot_keras.train: error: Training stopped by bad input data: Image over the pixel limit: {named[0]} "
        f"is {expected[named[0]]}, over the limit of 89478485 (raise max_image_pixels, or skip such files "
        "with skip_corrupt)"
    )

    proc = commands.run("bot_keras.train", *_train_args(data, tmp_path / "skip", "--steps_per_epoch=5",
                                                        "--skip_corrupt"), capfd=capfd)
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert json.loads((tmp_path / "skip" / "final_metrics.json").read_text())["skipped_files"] == 2
    warnings = [line for line in proc.stderr.splitlines() if "skipped image over the pixel limit" in line]
    assert sorted(str(p) for p in (jpeg, png) if any(str(p) in w for w in warnings)) == sorted(
        [str(jpeg), str(png)]
    ) and len(warnings) == 2, proc.stderr[-3000:]

    # The skipped files travel in the checkpoints: a resumed run reads both files again, names neither
    # again, and its count is the run's (2), not the process's (0 new files).
    resume = _train_args(data, tmp_path / "skip", "--steps_per_epoch=5", "--skip_corrupt", "--resume",
                         "--epochs=2")
    proc = commands.run("bot_keras.train", *resume, capfd=capfd)
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert "skipped image" not in proc.stderr and "Skipped 2 distinct undecodable files" in proc.stdout
    metrics = json.loads((tmp_path / "skip" / "final_metrics.json").read_text())
    assert metrics["skipped_files"] == 2 and metrics["step"] == 10


# Loads an export in a fresh process (no bot_keras), sends it each image in turn and prints the outcome and
# how much the process's peak resident memory grew during the call.
_SERVE_AND_MEASURE = """
import resource, sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
for path in sys.argv[2:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        serve(image_bytes=tf.constant([open(path, "rb").read()]))
        outcome = "served"
    except tf.errors.InvalidArgumentError as error:
        outcome = "refused: " + next(line for line in error.message.splitlines() if "serving_default" in line)
    print(outcome, "|", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@SLOW
def test_predict_and_the_exported_savedmodel_refuse_image_bombs_without_decoding_them(finished_run, tmp_path):
    run, data = finished_run
    jpeg, png = _bombs(tmp_path / "images")
    proc = commands.run("bot_keras.predict", f"--model={run}", str(png))
    assert proc.returncode == cli.USAGE_ERROR
    assert _error_line(proc, "bot_keras.predict") == (
        f"bot_keras.predict: error: {png} declares 20000x20000 = 400000000 pixels, over --max_image_pixels="
        "89478485 (a decompression bomb, or a photo to shrink first); it was not decoded"
    )
    with pytest.raises(cli.SetupError, match=r"patched\.jpg declares 60000x60000 = 3600000000 pixels, over"):
        predict.read_images([jpeg])

    exported = export.export(run, tmp_path / "export")
    loaded = __import__("tensorflow").saved_model.load(str(exported))
    assert int(loaded.max_image_pixels.numpy()) == 89478485  # recorded in the export
    del loaded
    photo = data / "train" / "a" / "0.jpg"
    proc = _run(None, str(exported), str(png), str(jpeg), str(photo), wrapper=_SERVE_AND_MEASURE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line.rsplit(" | ", 1) for line in proc.stdout.strip().splitlines()[-3:]]
    refusal = "serving_default: image_bytes entries at these batch indices declare more than 89478485 pixels"
    assert [outcome.startswith("refused") and refusal in outcome for outcome, _ in results] == [
        True, True, False
    ], results
    assert results[2][0] == "served"
    decoded_kib = 20000 * 20000 * 3 // 1024  # what decoding the PNG bomb to RGB would allocate: 1.1 GiB
    assert int(results[0][1]) < decoded_kib // 8, results  # < 140 MiB growth of the peak: nothing decoded


# --- 8. a truncated JPEG in a fine-tuning set ------------------------------------------------------------


def _truncated_jpeg():
    jpeg = _photo(seed=7, size=64)
    return jpeg[: len(jpeg) // 2]  # no end marker: Pillow refuses it too


@SLOW
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_a_truncated_jpeg_in_a_finetuning_set_is_named_with_the_cure_or_skipped_and_counted(task, tmp_path):
    if task == "detection":
        root = pathlib.Path(write_rectangles_voc(tmp_path / "voc", {"train": 4}))
        (root / "JPEGImages" / "train001.png").unlink()
        broken = root / "JPEGImages" / "train001.jpg"
        dataset = f"voc:{root}"
        expected = f"Undecodable image file (empty, not an image, or truncated): {broken}"
    else:
        root = write_scenes(tmp_path / "scenes", counts=(("train", 4),))
        (root / "train" / "images" / "2.png").unlink()
        broken = root / "train" / "images" / "2.jpg"
        dataset, expected = f"seg_folder:{root}", f"Bad segmentation input: unreadable image file {broken}"
    broken.write_bytes(_truncated_jpeg())
    args = [f"--task={task}", f"--dataset={dataset}", "--eval_split=", "--backbone=resnet18_d",
            "--crop_size=64" if task == "detection" else "--crop_size=32", "--batch_size=2",
            "--steps_per_epoch=2", "--epochs=1", "--verbose=0", "--seed=1"]  # 2 steps of 2: all read
    proc = commands.run("bot_keras.finetune", *args, f"--model_dir={tmp_path / 'run'}")
    assert proc.returncode == cli.USAGE_ERROR
    assert _error_line(proc, "bot_keras.finetune") == (
        f"bot_keras.finetune: error: Training stopped by bad input data: {expected} (remove the file, or "
        "skip such files with --skip_corrupt)"
    )

    proc = _run("bot_keras.finetune", *args, f"--model_dir={tmp_path / 'skip'}", "--skip_corrupt")
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert json.loads((tmp_path / "skip" / "final_metrics.json").read_text())["skipped_files"] == 1
    # A console as clean as bot_keras.train's: no TensorFlow log line (`I0000 ...`, `E0000 ...`).
    assert not re.search(r"^[IWEF]\d{4} ", proc.stdout + proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    assert proc.stderr.count(f"skipped undecodable image {broken} (1 distinct files skipped so far)") == 1
    assert "Skipped 1 distinct undecodable file (--skip_corrupt)." in proc.stdout


# --- 9. preemption: SIGTERM finishes the step, checkpoints, exits PREEMPTED; --resume is exact ----------


@SLOW
def test_sigterm_mid_epoch_checkpoints_the_step_exits_preempted_and_resume_finishes(tmp_path):
    data = _write_folder(tmp_path / "data")
    run, uninterrupted = tmp_path / "run", tmp_path / "uninterrupted"
    # One epoch of 24 steps on 16 px images and no step checkpoints: a checkpoint inside the epoch can
    # only be the preemption's. The signal comes as soon as the loop's handlers are in place, while the
    # first step is still being traced, so it lands early in the epoch whatever the machine's load.
    args = ["--image_size=16", "--steps_per_epoch=24", "--checkpoint_steps=0", "--lr_schedule=cosine",
            "--dropout_rate=0.2", "--drop_path_rate=0.1"]
    _, env = _cli()
    proc = subprocess.Popen([sys.executable, "-m", "bot_keras.train", *_train_args(data, run, *args)],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    csv_log = run / "logs" / "training.csv"  # opened once the loop's signal handlers are in place
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and not csv_log.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == cli.PREEMPTED, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "preempted" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    step = int(lines[0].split("preempted at step ")[1].split()[0])
    assert lines[0] == f"bot_keras.train: preempted at step {step} (SIGTERM); --resume continues"
    assert 1 <= step < 24
    assert tf_latest(run) == str(run / "checkpoints" / f"ckpt-{step}")
    assert not (run / "model.keras").exists() and not list(run.glob(".*.tmp*"))

    proc = _run("bot_keras.train", *_train_args(data, run, *args), "--resume")
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert f"at step {step} (epoch 0)" in proc.stdout
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 24

    # The same command uninterrupted ends with the same weights, bit for bit: the checkpoint holds the
    # model, the optimizer's momentum and iteration count, the dropout and stochastic-depth generators'
    # states and the step; the resumed (in-memory) split replays the data order and crops of the steps
    # already trained.
    proc = _run("bot_keras.train", *_train_args(data, uninterrupted, *args))
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    resumed, whole = _weights(run / "model.keras"), _weights(uninterrupted / "model.keras")
    assert sorted(resumed) == sorted(whole) and len(whole) > 100
    assert [name for name in whole if not (resumed[name] == whole[name]).all()] == []


def _weights(keras_file):
    """{path: array} of every variable in a .keras archive (its model.weights.h5), read with h5py."""
    import io
    import zipfile

    import h5py

    arrays = {}

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = item[()]

    with zipfile.ZipFile(keras_file) as archive:
        data = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(data, "r") as weights:
        weights.visititems(read)
    return arrays


def tf_latest(run):
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(run / "checkpoints"))


# --- 10. a full disk: ENOSPC on each kind of write ----------------------------------------------------

def _fill_the_disk(kind, monkeypatch):
    """Makes the write of `kind` fail as a full disk does (ENOSPC) after writing part of its data: the
    second checkpoint (its temporary shard written), model.keras (part of the archive written) or
    final_metrics.json (its temporary written, then fsync fails)."""
    import errno
    import os

    import keras
    import tensorflow as tf

    full = OSError(errno.ENOSPC, "No space left on device")
    if kind == "checkpoint":
        save, calls = tf.train.CheckpointManager.save, []

        def failing_save(self, checkpoint_number=None, **kwargs):
            calls.append(checkpoint_number)
            if len(calls) == 2:
                temp = pathlib.Path(self.directory) / f"ckpt-{checkpoint_number}_temp"
                temp.mkdir()
                (temp / "part-0").write_bytes(b"x")
                raise full
            return save(self, checkpoint_number=checkpoint_number, **kwargs)

        monkeypatch.setattr(tf.train.CheckpointManager, "save", failing_save)
    elif kind == "model":
        def failing_model_save(self, path, *args, **kwargs):
            pathlib.Path(path).write_bytes(b"PK\x03\x04 half an archive")
            raise full

        monkeypatch.setattr(keras.Model, "save", failing_model_save)
    else:
        fsync = os.fsync

        def failing_fsync(fd):
            if "final_metrics" in os.readlink(f"/proc/self/fd/{fd}"):
                raise full
            fsync(fd)

        monkeypatch.setattr(os, "fsync", failing_fsync)


@SLOW
@pytest.mark.parametrize("kind, path", [("checkpoint", "checkpoints/ckpt-2"), ("model", "model.keras"),
                                        ("metrics", "final_metrics.json")])
def test_a_full_disk_stops_in_one_line_leaves_the_previous_state_and_resume_finishes(kind, path, tmp_path,
                                                                                      monkeypatch):
    data = _write_folder(tmp_path / "data")
    run = tmp_path / "run"
    args = _train_args(data, run, "--checkpoint_steps=1")  # checkpoints at steps 1 and 2
    with monkeypatch.context() as disk:
        _fill_the_disk(kind, disk)
        proc = commands.run("bot_keras.train", *args)
    assert proc.returncode == cli.USAGE_ERROR, proc.stderr[-3000:]
    assert _error_line(proc, "bot_keras.train") == (
        f"bot_keras.train: error: cannot write {run / path}: [Errno 28] No space left on device; the "
        "previous files are intact; free space (or fix the disk), then rerun with --resume"
    )
    assert not list(run.glob(".*.tmp*")) and not list(run.glob("checkpoints/*_temp*"))  # no temporaries
    latest = tf_latest(run)
    assert latest == str(run / "checkpoints" / ("ckpt-1" if kind == "checkpoint" else "ckpt-2"))
    assert not (run / "final_metrics.json").exists()
    assert (run / "model.keras").exists() == (kind == "metrics")

    proc = commands.run("bot_keras.train", *args, "--resume")  # space freed
    assert proc.returncode == cli.OK, proc.stderr[-3000:]
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 2
    assert run_dir_model_ok(run)


def run_dir_model_ok(run):
    from bot_keras import model_files

    return model_files.keras_file_problem(run / "model.keras") is None


@SLOW
def test_a_full_disk_during_export_leaves_the_previous_export(finished_run, tmp_path, monkeypatch):
    import errno

    import keras

    run, _ = finished_run
    target = export.export(run, tmp_path / "export", export_format="keras")
    before = _hashes(target)

    def failing_save(self, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", failing_save)
    with pytest.raises(cli.SetupError) as error:
        export.export(run, target, export_format="keras", overwrite=True)
    assert str(error.value) == (
        f"cannot write {target}: [Errno 28] No space left on device; any previous export is intact; free "
        "space and export again"
    )
    assert _hashes(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging or retired sibling left
