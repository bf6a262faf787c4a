"""bot_keras/predict.py: the same top-k from a SavedModel, a `.keras` file and a run directory; output
format; errors that name the bad file or path; the CLI."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import commands
import numpy as np
import pytest
import tensorflow as tf
from tiny_run import CLASS_NAMES, make_run, reference_logits, sample_images

from bot_keras import cli, export, predict

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", seed=3)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, data in sample_images():
        (root / name).write_bytes(data)
        paths.append(str(root / name))
    return paths


@pytest.fixture(scope="module")
def expected_probabilities(run, image_files):
    logits = reference_logits(run[1], [pathlib.Path(p).read_bytes() for p in image_files])
    return tf.nn.softmax(logits).numpy()


def _check(results, image_files, expected_probabilities, k):
    assert [path for path, _ in results] == image_files
    for (_, predictions), expected in zip(results, expected_probabilities, strict=True):
        ids = np.argsort(-expected, kind="stable")[:k]
        assert [p.class_id for p in predictions] == ids.tolist()
        assert [p.class_name for p in predictions] == [CLASS_NAMES[i] for i in ids]
        np.testing.assert_allclose([p.probability for p in predictions], expected[ids], atol=1e-5)


def test_run_directory(run, image_files, expected_probabilities):
    _check(predict.predict(run[0], image_files, k=3), image_files, expected_probabilities, 3)


def test_saved_model_and_keras_exports(run, image_files, expected_probabilities, tmp_path):
    saved_model = export.export(run[0], tmp_path / "sm")
    keras_dir = export.export(run[0], tmp_path / "k", export_format="keras")
    assert predict.load_classifier(saved_model).kind == "savedmodel"
    _check(predict.predict(saved_model, image_files, k=2), image_files, expected_probabilities, 2)
    # --top_k larger than the export's own top_k: predict ranks the full probability vector itself.
    _check(predict.predict(saved_model, image_files, k=5), image_files, expected_probabilities, 5)
    results = predict.predict(keras_dir / "model.keras", image_files, k=4)
    _check(results, image_files, expected_probabilities, 4)
    # The trainer's own model.keras, with classes.txt and flags.txt beside it, loads as the run.
    assert predict.load_classifier(run[0] / "model.keras").kind == "run"
    _check(predict.predict(run[0] / "model.keras", image_files, k=1), image_files, expected_probabilities, 1)
    # Any .keras file with a class list beside it; the image size from the model's input shape.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run[0] / "model.keras", other / "classifier.keras")
    shutil.copy(run[0] / "classes.txt", other)
    assert predict.load_classifier(other / "classifier.keras").kind == "keras"
    results = predict.predict(other / "classifier.keras", image_files, k=2)
    _check(results, image_files, expected_probabilities, 2)


def test_top_k_orders_by_probability_and_breaks_ties_by_class_id():
    probabilities = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.15, 0.05]])
    names = ("a", "b", "c", "d")
    result = predict.top_k(probabilities, names, 3)
    assert [[p.class_id for p in row] for row in result] == [[1, 3, 0], [0, 2, 1]]
    assert [p.class_name for p in result[1]] == ["a", "c", "b"]
    assert [len(row) for row in predict.top_k(probabilities, names, 10)] == [4, 4]


def test_format_prints_each_image_then_ranked_names_and_probabilities():
    results = [("x.jpg", [predict.Prediction(2, "fox", 0.81234), predict.Prediction(0, "cat", 0.1)]),
               ("y.png", [predict.Prediction(4, "yak", 1.0)])]
    assert predict.format_predictions(results) == (
        "x.jpg\n"
        "  1. fox  0.8123\n"
        "  2. cat  0.1000\n"
        "y.png\n"
        "  1. yak  1.0000")


def test_missing_and_non_image_files_are_named(run, image_files, tmp_path):
    with pytest.raises(cli.SetupError, match=f"image file {tmp_path / 'gone.jpg'} does not exist"):
        predict.predict(run[0], [image_files[0], str(tmp_path / "gone.jpg")])
    with pytest.raises(cli.SetupError, match=f"^{tmp_path} is a directory; name the image files"):
        predict.predict(run[0], [str(tmp_path)])
    (tmp_path / "notes.jpg").write_text("not a picture")
    truncated = pathlib.Path(image_files[1]).read_bytes()[:500]  # a JPEG cut short
    (tmp_path / "cut.jpg").write_bytes(truncated)
    for name in ("notes.jpg", "cut.jpg"):
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a complete JPEG, PNG, GIF or BMP"):
            predict.predict(run[0], [image_files[0], str(tmp_path / name)])


def test_bad_model_paths_are_named(run, image_files, tmp_path):
    with pytest.raises(cli.SetupError, match=f"--model={tmp_path / 'nothing'} does not exist"):
        predict.load_classifier(tmp_path / "nothing")
    with pytest.raises(ValueError, match="neither a SavedModel directory"):
        predict.load_classifier(tmp_path)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.keras").write_bytes((run[0] / "model.keras").read_bytes())
    with pytest.raises(cli.SetupError, match=f"{lonely / 'classes.txt'} is missing"):
        predict.load_classifier(lonely / "model.keras")
    with pytest.raises(ValueError, match="k=0 must be at least 1"):
        predict.predict(run[0], image_files, k=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=f"--model={broken / 'model.keras'}: not a .keras file"):
        predict.load_classifier(broken / "model.keras")
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match=f"--model={broken}: cannot load the SavedModel"):
        predict.load_classifier(broken)


@pytest.mark.slow
def test_cli_prints_names_and_probabilities(run, image_files, expected_probabilities):
    # The environment a user runs it in: bot_keras itself keeps TensorFlow's log lines off the console.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "bot_keras.predict", f"--model={run[0]}", "--top_k=2", *image_files[:2]],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"^[IWEF]\d{4} ", result.stdout + result.stderr, re.MULTILINE), result.stderr
    lines = result.stdout.strip().splitlines()[-6:]
    expected = []
    for path, probabilities in zip(image_files[:2], expected_probabilities, strict=False):
        expected.append(path)
        ids = np.argsort(-probabilities, kind="stable")[:2]
        width = max(len(CLASS_NAMES[i]) for i in ids)
        expected += [f"  {rank}. {CLASS_NAMES[i]:<{width}}  {probabilities[i]:.4f}"
                     for rank, i in enumerate(ids, start=1)]
    assert lines == expected



def _cli_call(argv):
    """`python -m bot_keras.predict argv` in this process (cli.call: the parsing and exit codes of cli.run,
    whose fresh-process launch test_cli_prints_names_and_probabilities checks): (exit code, stderr)."""
    done = commands.run(predict.COMMAND, *argv)
    return done.returncode, done.stderr


def test_cli_names_a_missing_image_and_exits_2(run):
    code, err = _cli_call([f"--model={run[0]}", "gone.png"])
    assert code == 2  # cli.USAGE_ERROR
    last_line = err.strip().splitlines()[-1]
    assert last_line == "bot_keras.predict: error: image file gone.png does not exist"
    code, err = _cli_call([f"--model={run[0]}", "--top_k=0", "gone.png"])  # the flag, before any file
    assert code == 2 and err == "bot_keras.predict: error: flag --top_k=0: 0 is not a positive integer\n"


def test_checkpoint_best_predicts_with_the_runs_best_model(run, image_files, tmp_path):
    """--checkpoint=best (or the file itself) reads model_best.keras: here another run's model, so its
    probabilities, not the final model's, come out; a path that is not a run directory is refused."""
    best_dir, best = make_run(tmp_path / "other", seed=4)
    run_copy = tmp_path / "run"
    shutil.copytree(run[0], run_copy)
    shutil.copy(best_dir / "model.keras", run_copy / "model_best.keras")
    want = tf.nn.softmax(reference_logits(best, [pathlib.Path(p).read_bytes() for p in image_files])).numpy()
    _check(predict.predict(str(run_copy), image_files, k=2, checkpoint="best"), image_files, want, 2)
    _check(predict.predict(str(run_copy / "model_best.keras"), image_files, k=2), image_files, want, 2)
    final = predict.predict(str(run_copy), image_files, k=5)
    assert not np.allclose([p.probability for p in final[0][1]], np.sort(want[0])[::-1], atol=1e-3)
    argv = [f"--model={run_copy / 'model.keras'}", "--checkpoint=best", image_files[0]]
    code, err = _cli_call(argv)
    assert code == cli.USAGE_ERROR, err[-2000:]
    assert err.strip().splitlines()[-1].endswith(
        f"--checkpoint=best chooses a run directory's model; --model={run_copy / 'model.keras'} is not a run "
        "directory"
    )
