"""`bot_keras.finetune --task=detection` (bot_keras/detection/task.py): flags, loss, freezing, end to end."""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_detection import CLASSES, write_rectangles_coco, write_rectangles_voc

from bot_keras import evaluate, finetune, model_files
from bot_keras import run_dir as runs
from bot_keras.detection import loss as detection_loss
from bot_keras.detection import model as detection_model
from bot_keras.detection import task
from bot_keras.models.resnet import freeze_backbone

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _user_env():
    """The environment a user runs a command in: bot_keras quiets TensorFlow itself (tests/test_cli.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    return dict(env, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")


def _no_tensorflow_log_line(proc):
    """Asserts the command succeeded and printed no TensorFlow log line (`I0000 ...`, `E0000 ...`)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if re.match(r"[IWEF]\d{4} ", line)]
    assert not lines, lines


def _flags(*args):
    return finetune.parse_flags(["--task=detection", "--backbone=resnet18_d", "--model_dir=/tmp/x", *args])


def test_detection_flags_are_checked_before_any_data(tmp_path):
    fv = _flags("--dataset=voc:/nowhere", "--output_stride=16", "--crop_size=100",
                "--detection_scale_range=2,1", "--max_detections=0")
    with pytest.raises(finetune.FlagError) as error:
        finetune.validate_flags(fv)
    message = str(error.value)
    for expected in ("--output_stride=16", "--crop_size=100", "--detection_scale_range=2,1",
                     "--max_detections=0"):
        assert expected in message
    with pytest.raises(finetune.FlagError, match="--dataset: Detection dataset must be one of"):
        finetune.validate_flags(_flags("--dataset=seg_folder:/x", "--crop_size=64"))


def test_per_image_loss_sums_to_the_batch_loss_normalised_by_the_positives():
    keras.utils.set_random_seed(0)
    detector = detection_model.build_detector("resnet18_d", num_classes=3, image_size=SIZE)
    images = tf.random.stateless_normal([2, SIZE, SIZE, 3], [0, 1])
    boxes = [[[-1.0, -1, -1, -1], [-1, -1, -1, -1]], [[5, 5, 60, 30], [20, 20, 50, 50]]]  # image 0: no box
    targets = {"boxes": tf.constant(boxes), "labels": tf.constant([[-1, -1], [0, 2]])}
    predictions = detector(images, training=True)
    f = types.SimpleNamespace(crop_size=SIZE, batch_size=2)
    per_image = task.per_example_loss(f)(targets, predictions)
    # The generic step divides the sum by the global batch: that is the library's single-replica loss,
    # computed with the detector's own label encoder (the task's is built from the same factory).
    expected = detection_loss.retinanet_loss(detector, images, targets, predictions)
    assert per_image.shape == (2,)
    assert float(tf.nn.compute_average_loss(per_image, global_batch_size=2)) == pytest.approx(
        float(expected), rel=1e-5)
    # The image without boxes has a loss too ("all background"), not zero.
    assert float(per_image[0]) > 0 and float(per_image[1]) > float(per_image[0])


def test_freeze_stages_and_bn_reach_the_backbone_inside_the_detector():
    detector = detection_model.build_detector("resnet18_d", num_classes=2, image_size=SIZE)
    before = len(detector.trainable_weights)
    frozen = freeze_backbone(detector, stages=1, batch_norm=True)
    assert frozen > 0
    names = {w.path for w in detector.trainable_weights}
    assert not any("stem_" in n or "stage1_" in n for n in names)
    assert not any("bn" in n.split("/")[-2] for n in names if n.startswith("stage"))  # backbone BN frozen
    assert any(n.startswith("classification_head") for n in names)  # heads train
    assert len(detector.trainable_weights) < before


def test_bad_annotation_is_one_line_naming_the_file_with_exit_2(tmp_path):
    root = write_rectangles_voc(tmp_path / "voc", {"train": 2, "val": 1})
    bad = pathlib.Path(root) / "Annotations" / "train001.xml"
    bad.write_text("<annotation><size><width>64</wid")
    result = subprocess.run(
        [sys.executable, "-m", "bot_keras.finetune", "--task=detection", f"--dataset=voc:{root}",
         "--backbone=resnet18_d", "--crop_size=64", "--batch_size=2", "--eval_split=val",
         f"--model_dir={tmp_path / 'run'}"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("bot_keras.finetune")]
    assert len(lines) == 1 and "Malformed XML in annotation" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # ~60 s: a 12-step fine-tuning run in a subprocess, then an evaluation in another
def test_finetune_lowers_the_loss_then_evaluate(tmp_path):
    """Export, serving and predict of a detection run (export and run predicting alike, the boxes of the
    served export equal to those of the module built from the run) are the task contract's:
    tests/test_tasks.py::test_task_contract_train_evaluate_export_serve_predict[detection]."""
    root = write_rectangles_voc(tmp_path / "voc", {"train": 4, "val": 4}, empty=("train001", "val002"))
    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "bot_keras.finetune", "--task=detection", f"--dataset=voc:{root}",
         "--backbone=resnet18_d", "--crop_size=64", "--batch_size=4", "--epochs=3", "--steps_per_epoch=4",
         "--base_lr=0.64", "--lr_schedule=constant", "--detection_scale_range=1,1", "--eval_split=val",
         f"--model_dir={run}", "--verbose=0"],
        env=_user_env(), capture_output=True, text=True, timeout=600)
    _no_tensorflow_log_line(trained)  # a console as clean as bot_keras.train's (evaluation's NMS included)
    with open(run / "logs" / "training.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    # Measured: 1.53, 1.49, 1.09 (lr 0.01, SGD; the same 4 images, one without boxes).
    assert losses[-1] < 0.85 * losses[0], losses
    # The logged mAP is the mean of the per-class APs of final_metrics.json (classes with boxes only).
    class_aps = json.loads((run / "final_metrics.json").read_text())["val_ap_voc07"]
    assert set(class_aps) == set(CLASSES)
    assert float(rows[-1]["val_map_voc07"]) == pytest.approx(
        np.mean([ap for ap in class_aps.values() if ap is not None]), abs=1e-6)
    assert runs.read_run(run, task="detection").class_names == CLASSES

    # bot_keras.evaluate routes the run by its run.json task; the run loads in a fresh
    # process (its backbone class registered by the detection task).
    evaluated = subprocess.run([sys.executable, "-m", "bot_keras.evaluate", f"--model_dir={run}"],
                               env=_user_env(), capture_output=True, text=True, timeout=600)
    _no_tensorflow_log_line(evaluated)
    result = json.loads((run / "eval_val.json").read_text())
    line = evaluated.stdout.strip().splitlines()[-2]
    assert set(result["ap_voc07"]) == set(CLASSES) and result["count"] == 4
    assert line.startswith(f"voc:{root} val (4 images): VOC07 mAP@0.5 ")
    assert result["map_voc07"] == pytest.approx(float(rows[-1]["val_map_voc07"]), abs=1e-6)
    assert result["ap_voc07"] == pytest.approx(class_aps, abs=1e-6)


def _final_metrics(run):
    return json.loads((run / "final_metrics.json").read_text())


@pytest.mark.slow  # two in-process one-step runs under mixed_float16 and an evaluation
def test_mixed_float16_coco_run_stops_resumes_and_evaluates_with_coco_map(tmp_path, capsys):
    pattern = write_rectangles_coco(tmp_path / "coco", {"train": 2, "val": 2})
    run = tmp_path / "run"
    args = ["--task=detection", f"--dataset=coco:{pattern}", "--backbone=resnet18_d", "--crop_size=64",
            "--batch_size=2", "--epochs=2", "--steps_per_epoch=1", "--eval_split=val",
            "--precision=mixed_float16", "--detection_scale_range=1,1", f"--model_dir={run}", "--verbose=0"]

    def main(*extra):
        finetune.main(["finetune"], _flags(*args, *extra))
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
        return capsys.readouterr().out

    # Stopped by --max_steps after epoch 1; --resume without the limit continues from the step-1 checkpoint
    # (its loss scale restored) to the end. (A resume after the last checkpoint: test_finetune.py.)
    main("--max_steps=1")
    stopped = _final_metrics(run)
    assert stopped["step"] == 1 and set(stopped["val_ap_voc07"]) == set(CLASSES)
    out = main("--resume")
    assert "Resumed from " in out and "at step 1 (epoch 1)" in out and "loss scale 32768" in out
    finished = _final_metrics(run)
    assert finished["step"] == 2 and set(finished["val_ap_voc07"]) == set(CLASSES)
    with open(run / "logs" / "training.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[-1]["loss"]) == pytest.approx(finished["loss"], rel=1e-6)

    # model.keras is a float32 build holding the trained float32 master weights of the last checkpoint.
    model = model_files.load_model(runs.read_run(run, task="detection"))
    assert {layer.dtype_policy.compute_dtype for layer in model.layers} == {"float32"}
    kernel = model.classification_head.prediction_layer.kernel.numpy()
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    stored = [reader.get_tensor(k) for k, shape in reader.get_variable_to_shape_map().items()
              if tuple(shape) == kernel.shape]
    assert any(np.array_equal(kernel, tensor) for tensor in stored)

    # bot_keras.evaluate on coco: data: training's VOC numbers again, plus COCO's mAP@[.5:.95].
    result, line = evaluate.evaluate_finetune_run(run, "detection")
    assert result["count"] == 2 and result["map_voc07"] == pytest.approx(finished["val_map_voc07"], abs=1e-6)
    assert result["ap_voc07"] == pytest.approx(finished["val_ap_voc07"], abs=1e-6)
    assert np.isfinite(result["coco_map"])  # NaN without boxes; its arithmetic: test_detection_metrics.py
    assert line.endswith(f"COCO mAP@[.5:.95] {100 * result['coco_map']:.2f}%")


# Two logical CPUs must be configured before TensorFlow initialises: a subprocess. Image 0 has one box and
# image 1 two, so the replicas of the 2-replica step count different positive anchors: only the all-reduced
# count (Lin et al.'s normaliser over the global batch) gives the 1-device loss.
_MIRRORED_SCRIPT = """
import json, types
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from bot_keras import steps
from bot_keras.detection import loss as detection_loss
from bot_keras.detection import model as detection_model
from bot_keras.detection import task
from bot_keras.models.resnet import freeze_backbone

SIZE, BATCH = 64, 2
images = tf.random.stateless_uniform([BATCH, SIZE, SIZE, 3], [0, 1], -1.0, 1.0)
targets = {"boxes": tf.constant([[[8.0, 8, 40, 24], [-1] * 4], [[5.0, 5, 60, 30], [20, 20, 50, 50]]]),
           "labels": tf.constant([[1, -1], [0, 2]])}
loss = task.per_example_loss(types.SimpleNamespace(crop_size=SIZE, batch_size=BATCH))

def first_step(strategy):  # the step's summed loss; the per-image terms of the same outputs, one device
    keras.utils.set_random_seed(0)
    with strategy.scope():
        detector = detection_model.build_detector("resnet18_d", num_classes=3, image_size=SIZE)
        freeze_backbone(detector, batch_norm=True)  # a replica's half batch then gives the same outputs
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(detector.trainable_variables)
    def dataset_fn(context):  # per-replica batches in global-batch order: replica r gets image r
        data = tf.data.Dataset.from_tensor_slices((images, targets))
        return data.batch(context.get_per_replica_batch_size(BATCH)).repeat()
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    outputs = detector(images, training=True)
    terms = detection_loss.per_example_terms(detection_model.make_label_encoder(), (SIZE, SIZE, 3),
                                             targets, outputs)
    step = steps.make_train_function(strategy, detector, optimizer, per_example_loss=loss,
                                     global_batch_size=BATCH, metrics=task.TRAIN_METRICS)
    sums = step(iterator, tf.constant(0, tf.int64), tf.constant(1), tf.constant(False))
    return float(sums["loss"]), {k: v.numpy().tolist() for k, v in terms.items()}

two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
loss_sum, terms = first_step(two)
print(json.dumps({"replicas": two.num_replicas_in_sync, "loss_sum": loss_sum, "terms": terms}))
"""


@pytest.mark.slow  # a subprocess with two logical CPUs and one detector step on 2 replicas
def test_two_replicas_normalise_by_the_global_positives_as_one_device_does():
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    terms = {k: np.array(v) for k, v in out["terms"].items()}
    sums = terms["box"] + terms["classification"]
    assert out["replicas"] == 2 and 0 < terms["num_positives"][0] < terms["num_positives"][1]
    # The step's summed per-image loss: Σ (box + focal) × global batch / positives of the global batch, the
    # 1-device loss (test_per_image_loss_sums_to_the_batch_loss_normalised_by_the_positives).
    expected = float(sums.sum() * 2 / terms["num_positives"].sum())
    per_replica = float((sums * 2 / terms["num_positives"]).sum())  # what each replica's own count gives
    assert out["loss_sum"] == pytest.approx(expected, rel=1e-5)
    assert abs(per_replica - expected) > 0.3 * expected
