"""evaluate.py: top-1/top-5 sums, a folder dataset trained and evaluated end to end, and clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from bot_keras import cli, evaluate, model_files, steps, train
from bot_keras import run_dir as run_dir_lib
from bot_keras.data.augment import preprocess_for_eval
from bot_keras.data.decode import decode_image
from bot_keras.models import build_model


def test_top_k_sums_count_hits_by_hand():
    logits = tf.constant(
        [
            [0.0, 3.0, 1.0, 2.0, -1.0, -2.0],  # true 1: top-1 hit
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # true 5: ranked 6th, top-5 miss
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        ]
    )  # true 4: ranked 5th, top-5 hit
    labels = tf.one_hot([1, 5, 4], 6)
    sums = steps.classification_sums(tf.constant([1.0, 2.0, 3.0]), labels, logits)
    sums = {name: float(value) for name, value in sums.items()}
    assert sums == {"loss": 6.0, "top1": 1.0, "top5": 2.0, "count": 3.0}


def _write_folder(root, *, classes=("cat", "dog", "fish"), per_class=(12, 4)):
    """train/<class>/*.png and test/<class>/*.png; each class a different flat colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for index, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                colour = np.zeros((20, 20, 3)) + 60 + 80 * np.eye(3)[index] * 2
                image = np.clip(colour + rng.normal(0, 10, colour.shape), 0, 255).astype(np.uint8)
                tf.io.write_file(os.path.join(root, split, name, f"{i}.png"), tf.io.encode_png(image))


@pytest.fixture(scope="module")
def trained_folder_run(tmp_path_factory):
    """Trains in-process through train.main on a folder dataset with a train and a test split."""
    tmp_path = tmp_path_factory.mktemp("folder_run")
    _write_folder(str(tmp_path / "data"))
    run_dir = str(tmp_path / "run")
    f = flags.FlagValues()
    train.define_flags(f)
    f(
        [
            "train",
            "--model=resnet18_d",
            f"--dataset=folder:{tmp_path / 'data'}",
            "--train_split=train",
            "--eval_split=test",
            "--image_size=16",
            "--batch_size=12",
            "--epochs=1",
            "--base_lr=0.4",
            "--lr_schedule=cosine",
            "--no_bias_decay",
            "--norandom_crop",
            "--nocolor_jitter",
            "--nopca_lighting",
            f"--model_dir={run_dir}",
            "--verbose=0",
            "--seed=2",
        ]
    )
    train.main([], f)
    return run_dir, str(tmp_path / "data")


def test_folder_dataset_trains_and_evaluates_end_to_end(trained_folder_run):
    run_dir, data = trained_folder_run
    with open(os.path.join(run_dir, "classes.txt")) as f:
        assert f.read() == "cat\ndog\nfish\n"
    flags_text = open(os.path.join(run_dir, "flags.txt")).read()
    assert f"--dataset=folder:{data}" in flags_text and "--eval_split=test" in flags_text
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        final = json.load(f)
    assert final["step"] == 3  # 36 training images // 12 = 3 steps, one epoch
    result = evaluate.evaluate_run(run_dir)  # dataset, split and size come from the run's flags.txt
    assert result["split"] == "test" and result["count"] == 12
    # The exported model.keras scores what the trainer measured at its last epoch end.
    assert result["top1"] == pytest.approx(final["val_top1"], abs=1e-6)
    assert result["top5"] == 1.0  # 3 classes: every label is in the top 5
    confusion = np.array(result["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 12
    assert np.trace(confusion) / 12 == pytest.approx(result["top1"])
    assert [m["support"] for m in result["per_class"].values()] == [4, 4, 4]
    assert list(result["per_class"]) == ["cat", "dog", "fish"]


def test_another_image_size_rebuilds_the_model_with_the_same_weights(trained_folder_run):
    run_dir, data = trained_folder_run
    at_run = evaluate.evaluate_run(run_dir)
    result = evaluate.evaluate_run(run_dir, image_size=24)
    assert (result["image_size"], result["count"], at_run["image_size"]) == (24, 12, 16)
    # A second implementation: a size-agnostic build holding the run's weights, on the evaluation transform
    # of each test image at 24 px, decoded here.
    trained = model_files.load_model(run_dir_lib.read_run(run_dir))
    anysize = build_model("resnet18_d", num_classes=3, input_shape=(None, None, 3))
    anysize.set_weights(trained.get_weights())
    images, labels = [], []
    for label, name in enumerate(("cat", "dog", "fish")):
        for file in sorted(os.listdir(os.path.join(data, "test", name))):
            encoded = tf.io.read_file(os.path.join(data, "test", name, file))
            images.append(preprocess_for_eval(decode_image(encoded), 24))
            labels.append(label)
    logits = anysize(tf.stack(images), training=False)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    assert result["loss"] == pytest.approx(float(tf.reduce_mean(losses)), rel=5e-4)  # float32 sums
    assert result["top1"] == pytest.approx(float(np.mean(np.argmax(logits, 1) == labels)))
    assert abs(result["loss"] - at_run["loss"]) > 1e-3  # the size took effect (negative control)


def test_evaluate_command_writes_per_class_metrics_and_the_confusion_png(trained_folder_run, tmp_path,
                                                                          capsys):
    pytest.importorskip("matplotlib")
    run_dir, _ = trained_folder_run
    output, png = tmp_path / "eval.json", tmp_path / "confusion.png"
    f = flags.FlagValues()
    evaluate.define_flags(f)
    f(["evaluate", f"--model_dir={run_dir}", f"--output={output}", f"--confusion_png={png}"])
    evaluate.main(["evaluate"], f)
    report = json.loads(output.read_text())
    assert set(report["per_class"]["dog"]) == {"precision", "recall", "f1", "support"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Lowest F1: " in printed and f"Wrote {png}" in printed


def test_evaluate_rejects_runs_trained_on_other_classes(trained_folder_run, tmp_path):
    run_dir, _ = trained_folder_run
    other = str(tmp_path / "other")
    _write_folder(other, classes=("ant", "bee", "cow"), per_class=(1, 1))
    with pytest.raises(
        ValueError, match=r"classes\.txt lists 3 classes \(cat, dog, fish.*has 3 \(ant, bee, cow"
    ):
        evaluate.evaluate_run(run_dir, dataset=f"folder:{other}")
    with pytest.raises(cli.SetupError, match=r"incomplete: missing .*model\.keras"):
        evaluate.evaluate_run(str(tmp_path))


def test_evaluate_honours_the_runs_skip_corrupt(trained_folder_run, tmp_path):
    """A truncated image in the evaluated split: skipped when the run trained with --skip_corrupt, and
    otherwise a one-line error naming the file (evaluate reads the run's flag, typed, from flags.txt)."""
    run, data = trained_folder_run
    clean = evaluate.evaluate_run(run)
    shutil.copytree(data, tmp_path / "data")
    png = tf.io.encode_png(np.full((20, 20, 3), 90, np.uint8)).numpy()
    (tmp_path / "data" / "test" / "dog" / "broken.png").write_bytes(png[: len(png) // 2])
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "flags.txt").read_text()
    text = text.replace(f"--dataset=folder:{data}", f"--dataset=folder:{tmp_path / 'data'}")
    assert "--noskip_corrupt\n" in text
    (copy / "flags.txt").write_text(text.replace("--noskip_corrupt", "--skip_corrupt"))
    result = evaluate.evaluate_run(str(copy))
    assert result["count"] == 12 and result["top1"] == pytest.approx(clean["top1"], abs=1e-6)
    (copy / "flags.txt").write_text(text)
    expected = (r"^Evaluation stopped by bad input data: Undecodable image file \(empty, not an image, or "
                r"truncated\): \S*broken\.png \(skip such files with skip_corrupt\)$")
    with pytest.raises(cli.SetupError, match=expected):
        evaluate.evaluate_run(str(copy))
