"""finetune.py with the segmentation task: flags, backbone weights, run directory, evaluate, export, predict.

One small fine-tuning run (ResNet-18-D from a classification run, 32 px crops of 40×48 images, 3 classes,
two steps, validation at the size adapted to its largest image) is shared by the tests that read a finished
run; the multi-process ones are marked slow.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import commands
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image
from tiny_run import make_run

from bot_keras import (
    atomic_write,
    cli,
    evaluate,
    export,
    finetune,
    model_files,
    predict,
    run_dir,
    tasks,
    train,
)
from bot_keras.data.augment import MEAN_RGB, STD_RGB
from bot_keras.models.resnet import freeze_backbone
from bot_keras.segmentation import export as seg_export
from bot_keras.segmentation import heads
from bot_keras.segmentation import task as segmentation

REPO = str(pathlib.Path(__file__).resolve().parent.parent)
CLASSES = ("sky", "road", "car")
COLOURS = np.array([[90, 140, 230], [80, 80, 80], [200, 30, 30]])


def write_scenes(root, counts=(("train", 8), ("val", 3)), size=(40, 48), seed=0):
    """seg_folder data: sky above road, a car square, a 255 corner; colour + noise encodes the class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    h, w = size
    for split, n in counts:
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((h, w), np.uint8)
            mask[h // 2 :] = 1
            y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
            mask[y : y + 12, x : x + 12] = 2
            mask[0, :3] = 255
            image = COLOURS[np.minimum(mask, 2)] + rng.normal(0, 10, (h, w, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / split / "images" / f"{i}.png"
            )
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def cli_env():
    """The environment a user runs the command in: bot_keras quiets TensorFlow itself (tests/test_cli.py);
    conftest's oneDNN switch (for quiet in-process tests) is dropped, as users do not set it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    return dict(env, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")


def parse(*args):
    return finetune.parse_flags(list(args))


def base_args(data, model_dir, *extra):
    return [
        "--task=segmentation",
        f"--dataset=seg_folder:{data}",
        "--eval_split=val",
        "--backbone=resnet18_d",
        "--crop_size=32",
        "--eval_size=48",
        "--batch_size=4",
        "--epochs=1",
        "--base_lr=0.1",
        "--verbose=0",
        f"--model_dir={model_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(classifier run dir, data root, fine-tuning run dir): two steps from the classifier, stages 1-4 and
    their BatchNorms frozen so the backbone must come out exactly as it went in; --eval_size=0 (the default)
    with a 60×44 validation image beside the three 40×48 ones, so the run evaluates at an adapted 64 px."""
    root = tmp_path_factory.mktemp("finetune")
    classifier_dir, _ = make_run(root / "classifier")
    data = _scenes_with_a_large_validation_image(root)
    model_dir = root / "run"
    f = parse(
        *base_args(
            data,
            model_dir,
            f"--backbone_weights={classifier_dir}",
            "--freeze_stages=4",
            "--strategy=mirrored",
            "--max_steps=2",
            "--steps_per_epoch=2",
            "--eval_size=0",
        )
    )
    finetune.main(["finetune"], f)
    keras.backend.clear_session()
    return classifier_dir, data, model_dir


# --- flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backbone=vgg16"], "--backbone='vgg16' is not a ResNet name"),
        (["--output_stride=4"], "--output_stride=4 is not one of"),
        (["--freeze_stages=5"], "--freeze_stages=5 must be in [0, 4]"),
        (["--crop_size=8"], "--crop_size=8 is too small"),
        (["--head=pspnet"], "--head='pspnet' is not one of fcn, deeplabv3"),
        (["--head=deeplabv3", "--aux_loss_weight=0.4"], "the auxiliary head is FCN's"),
        (["--eval_mode=sliding"], "--eval_mode='sliding' is not one of"),
        (["--lr_schedule=exp"], "--lr_schedule='exp' is not one of"),
        (["--dataset=coco:x"], "--dataset: Unknown segmentation dataset 'coco:x'"),
        # TFDS records have no image files whose headers give the validation images' sizes.
        (["--dataset=tfds:scene_parse150", "--eval_size=0"], "--eval_mode=pad with --eval_size=0 adapts to"),
        (["--backbone_weights=/nonexistent/run"], "--backbone_weights='/nonexistent/run': no such file"),
        (["--precision=fp8"], "--precision='fp8' is not one of"),
        (["--keep_best=val_top1"], "--keep_best='val_top1' is not one of val_mean_iou, val_pixel_accuracy, "
                                   "val_loss"),
        (["--keep_best=val_mean_iou", "--eval_split="], "--keep_best=val_mean_iou needs an evaluation"),
        (["--ema_decay=1"], "--ema_decay=1.0 must be in [0, 1)"),
    ],
)
def test_bad_flags_are_named_with_their_value(tmp_path, extra, message):
    f = parse(*base_args("/unused", tmp_path / "run", *extra))
    with pytest.raises(finetune.FlagError) as error:
        finetune.validate_flags(f)
    assert message in str(error.value)


def test_an_unknown_task_is_named_before_its_flags_are_read(tmp_path):
    # The task chooses which flags the command line may hold, so it is checked as the flags are parsed.
    with pytest.raises(finetune.FlagError) as error:
        parse(*base_args("/unused", tmp_path / "run", "--task=regression"))
    assert "--task='regression' is not one of segmentation" in str(error.value)


def test_backbone_weights_of_another_architecture_are_refused(tmp_path):
    classifier_dir, _ = make_run(tmp_path / "classifier")  # a resnet18_d run
    f = parse(
        *base_args(
            "/unused", tmp_path / "run", "--backbone=resnet34_d", f"--backbone_weights={classifier_dir}"
        )
    )
    with pytest.raises(finetune.FlagError, match="is a resnet18_d run but --backbone='resnet34_d'"):
        finetune.validate_flags(f)


def test_poly_schedule_is_finetunes_not_the_classifiers(tmp_path):
    finetune.validate_flags(parse(*base_args("/unused", tmp_path / "run", "--lr_schedule=poly")))
    train_flags = flags.FlagValues()
    train.define_flags(train_flags)
    train_flags(
        [
            "train",
            "--model=resnet18",
            "--dataset=synthetic",
            f"--model_dir={tmp_path / 'c'}",
            "--lr_schedule=poly",
        ]
    )
    with pytest.raises(train.FlagError, match="--lr_schedule='poly'"):
        train.validate_flags(train_flags)


@pytest.mark.slow
def test_cli_bad_flags_exit_2_one_line_each_and_no_traceback(tmp_path):
    command = [
        sys.executable,
        "-m",
        "bot_keras.finetune",
        *base_args(tmp_path, tmp_path / "run"),
        "--backbone=vgg16",
        "--freeze_stages=9",
    ]
    env = cli_env()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("bot_keras.finetune: error: ") and "Traceback" not in result.stderr
    assert any("--backbone='vgg16'" in x for x in lines) and any("--freeze_stages=9" in x for x in lines)
    assert len(lines) == 2


@pytest.mark.parametrize("argv, own, foreign", [
    (["--help"], {"task", "model_dir", "resume", "precision"}, {"head", "backbone", "model"}),
    (["--task=segmentation", "--help"], {"task", "model_dir", "head", "backbone", "epochs"}, {"model"}),
    (["--task=classification", "--helpfull"], {"task", "model_dir", "model", "mixup_alpha"}, {"head"}),
])
def test_help_lists_the_common_flags_and_with_a_task_that_tasks(argv, own, foreign, monkeypatch):
    # The command's flags as `python -m bot_keras.finetune ARGV` defines them (its key flags: what --help
    # prints); without --task, --help must not stop at the missing task.
    monkeypatch.setattr(sys, "argv", ["bot_keras.finetune", *argv])
    flag_values = flags.FlagValues()
    finetune._define_command_flags(flag_values)
    listed = {flag.name for flag in flag_values.get_key_flags_for_module(finetune)}
    assert own <= listed and not foreign & listed, sorted(listed)


# --- the backbone: weights in, parts frozen ------------------------------------------------------------


def test_freeze_stages_and_bn_touch_the_backbone_only():
    model = heads.build_segmenter("fcn", "resnet18_d", num_classes=3, output_stride=8, aux=True)
    freeze_backbone(model, stages=1, batch_norm=True)
    trainable = {layer.name: layer.trainable for layer in model.layers if layer.weights}
    assert not trainable["stem_conv1"] and not trainable["stage1_block1_conv2"]
    assert trainable["stage2_block0_conv1"] and not trainable["stage2_block0_bn1"]  # BN frozen everywhere
    assert trainable["fcn_conv"] and trainable["fcn_bn"] and trainable["aux_logits"]  # heads untouched
    # keras-hub's DeepLabV3 nests our backbone two models deep; freezing finds it there too. The check
    # walks with Keras' private `_flatten_layers` (custom layers' sublayers included), a second walk
    # beside the public one (`nested_layers`) that freeze_backbone takes.
    deeplab = heads.build_segmenter("deeplabv3", "resnet18_d", num_classes=3, output_stride=16)
    before = len(deeplab.trainable_weights)
    frozen = freeze_backbone(deeplab, stages=4)
    backbone_layers = [
        x for x in deeplab._flatten_layers() if x.name.startswith(("stem_", "stage")) and x.weights
    ]
    assert frozen == len(backbone_layers) > 40 and not any(x.trainable for x in backbone_layers)
    assert 0 < len(deeplab.trainable_weights) < before  # the ASPP and decoder still train


def test_weights_arrive_from_the_classification_run_and_the_run_directory_is_complete(finetuned):
    classifier_dir, _, model_dir = finetuned
    classifier = model_files.load_model(run_dir.read_run(classifier_dir))
    run = run_dir.read_run(model_dir, task="segmentation")
    model = model_files.load_model(run)
    for name in ("stem_conv1", "stage3_block1_conv2", "stage4_block0_bn1"):
        for ours, theirs in zip(
            model.get_layer(name).get_weights(), classifier.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(ours, theirs)
    assert run.class_names == CLASSES and run.flags["backbone"] == "resnet18_d"
    # run.json: the task and the evaluation size the run used (here adapted: --eval_size itself is recorded
    # in tests/test_tasks.py's contract test).
    assert json.loads((model_dir / "run.json").read_text()) == {"task": "segmentation", "eval_size": 64}
    header = (model_dir / "logs" / "training.csv").read_text().splitlines()[0]
    assert header == ",".join(("epoch",) + segmentation.CSV_COLUMNS)
    final = json.loads((model_dir / "final_metrics.json").read_text())
    assert final["step"] == 2 and set(final["val_per_class_iou"]) == set(CLASSES)
    # mIoU is the mean of the per-class IoUs of the classes present (None: in neither truth nor prediction).
    present = [iou for iou in final["val_per_class_iou"].values() if iou is not None]
    assert present and final["val_mean_iou"] == pytest.approx(np.mean(present), abs=1e-6)
    # The model saved for inference has no auxiliary output; the fcn head did train (it is not frozen).
    assert model.output_shape == (None, None, None, 3)


def test_a_random_backbone_differs_from_the_classifier(tmp_path):
    classifier_dir, classifier = make_run(tmp_path / "classifier")
    model = segmentation.build_model(
        parse(*base_args("/unused", tmp_path / "r")), num_classes=3, output_stride=8, weights_from=None
    )
    ours = model.get_layer("stage3_block1_conv2").get_weights()[0]
    assert not np.allclose(ours, classifier.get_layer("stage3_block1_conv2").get_weights()[0])


@pytest.mark.parametrize("head", ["fcn", "deeplabv3"])
def test_both_heads_round_trip_through_run_dir_load_model(tmp_path, head):
    extra = [f"--head={head}"] + (["--aux_loss_weight=0"] if head == "deeplabv3" else [])
    f = parse(*base_args("/unused", tmp_path / "run", *extra))
    model = segmentation.build_model(f, num_classes=3, output_stride=16, weights_from=None)
    rng = np.random.default_rng(1)
    for weight in model.weights:
        weight.assign(
            rng.normal(0, 0.1, weight.shape).astype("float32") + (1.0 if "variance" in weight.path else 0)
        )
    inference = segmentation.inference_model(model)
    (tmp_path / "run").mkdir()
    run_dir.write_run_info(tmp_path / "run", task="segmentation")
    atomic_write.write_atomic(tmp_path / "run" / "flags.txt", finetune.resolved_flags_text(f))
    run_dir.write_class_names(tmp_path / "run" / "classes.txt", CLASSES)
    run_dir.save_model(inference, tmp_path / "run")
    loaded = model_files.load_model(run_dir.read_run(tmp_path / "run", task="segmentation"))
    x = rng.normal(0, 1, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x, training=False), inference(x, training=False), rtol=1e-5, atol=1e-5)


# --- evaluate, export, predict on the finished run -----------------------------------------------------


def _hand_confusion(model, data, size):
    """A second computation: numpy bincount over each val image's labelled pixels, predictions from the
    model on the image padded to `size` (the evaluation transform) by hand."""
    confusion = np.zeros((3, 3), np.int64)
    mean, std = np.array(MEAN_RGB), np.array(STD_RGB)
    for image_path in sorted((data / "val" / "images").glob("*.png")):
        image = np.asarray(Image.open(image_path), np.float32)
        mask = np.asarray(Image.open(data / "val" / "masks" / image_path.name)).astype(np.int64)
        padded = np.zeros((size, size, 3), np.float32)
        padded[: image.shape[0], : image.shape[1]] = (image - mean) / std
        logits = model(padded[None], training=False).numpy()[0, : image.shape[0], : image.shape[1]]
        prediction = logits.argmax(-1)
        keep = mask != 255
        confusion += np.bincount(mask[keep] * 3 + prediction[keep], minlength=9).reshape(3, 3)
    return confusion


def test_evaluate_miou_equals_a_hand_computation_on_the_predictions(finetuned, capsys):
    _, data, model_dir = finetuned
    result, line = evaluate.evaluate_finetune_run(model_dir, "segmentation")
    confusion = _hand_confusion(
        model_files.load_model(run_dir.read_run(model_dir, task="segmentation")), data, 64
    )
    np.testing.assert_array_equal(np.array(result["confusion"]), confusion)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    assert result["mean_iou"] == pytest.approx((intersection[present] / union[present]).mean())
    assert result["pixel_accuracy"] == pytest.approx(intersection.sum() / confusion.sum())
    assert result["count"] == 4 and "mIoU" in line and "pixel accuracy" in line
    assert set(result["per_class_iou"]) == set(CLASSES)
    # The trainer's last validation saw the same split with the same transform.
    final = json.loads((model_dir / "final_metrics.json").read_text())
    assert final["val_mean_iou"] == pytest.approx(result["mean_iou"])


# --- the evaluation size: adapted to the validation images, or checked before the first step --------------


def test_adaptive_eval_size_rounds_the_longest_side_up_to_the_output_stride():
    # A 375×500 VOC photo: 500 → 504 at output stride 8, 512 at 16 and 32; a split of small images keeps
    # --crop_size (the size exports fit larger images into).
    assert segmentation.adaptive_eval_size(500, crop_size=480, output_stride=8) == 504
    assert segmentation.adaptive_eval_size(500, crop_size=480, output_stride=16) == 512
    assert segmentation.adaptive_eval_size(512, crop_size=480, output_stride=32) == 512
    assert segmentation.adaptive_eval_size(300, crop_size=480, output_stride=8) == 480


def _scenes_with_a_large_validation_image(root):
    """write_scenes' data (40×48 images, 32 px crops) plus val/images/big.png of 60×44 (height × width)."""
    data = write_scenes(root / "data")
    big = write_scenes(root / "big", counts=(("val", 1),), size=(60, 44), seed=1)
    for kind in ("images", "masks"):
        shutil.copy(big / "val" / kind / "0.png", data / "val" / kind / "big.png")
    return data


def test_a_too_small_eval_size_is_refused_before_the_first_step(tmp_path):
    data = _scenes_with_a_large_validation_image(tmp_path)
    model_dir = tmp_path / "run"
    with pytest.raises(cli.SetupError) as refused:
        finetune.main(["finetune"], parse(*base_args(data, model_dir, "--eval_size=56")))
    message = str(refused.value)
    assert message.startswith("--eval_size=56 is smaller than the largest image of --eval_split='val', ")
    assert f"{data / 'val' / 'images' / 'big.png'} (60x44 pixels" in message and "at least 60" in message
    assert "\n" not in message and not model_dir.exists()  # nothing written: no run, no checkpoint


def test_validation_images_larger_than_the_crop_are_evaluated_whole_with_default_flags(finetuned):
    _, _, model_dir = finetuned  # --eval_size=0, the default, and a 60×44 validation image
    # The largest validation image is 60 px high: 64 at output stride 8, recorded for the run's readers.
    assert json.loads((model_dir / "run.json").read_text()) == {"task": "segmentation", "eval_size": 64}
    assert "--eval_size=0\n" in (model_dir / "flags.txt").read_text()  # the flag as given: adapt
    run = run_dir.read_run(model_dir, task="segmentation")
    assert segmentation.eval_size(tasks.run_flags(run)) == 64
    # The trainer's validation equals an evaluation at the explicit size.
    explicit = dataclasses.replace(run, resolved={}, flags={**run.flags, "eval_size": 64})
    result, _ = segmentation.evaluate_run(explicit)
    final = json.loads((model_dir / "final_metrics.json").read_text())
    assert result["count"] == 4 and result["eval_size"] == 64
    assert final["val_mean_iou"] == pytest.approx(result["mean_iou"], abs=1e-6)
    # A run recorded before run.json held the size reads with the old rule: --crop_size.
    assert segmentation.eval_size(tasks.run_flags(dataclasses.replace(run, resolved={}))) == 32


def test_predict_writes_a_class_map_and_an_overlay_per_image(finetuned, tmp_path):
    _, data, model_dir = finetuned
    images = [str(data / "val" / "images" / "0.png"), str(data / "val" / "images" / "1.png")]
    lines = segmentation.predict_files(model_dir, images, tmp_path / "out", predict.read_images(images))
    assert len(lines) == 2 and lines[0].startswith(images[0]) and "0_overlay.png" in lines[0]
    classes = np.asarray(Image.open(tmp_path / "out" / "0_classes.png"))
    overlay = np.asarray(Image.open(tmp_path / "out" / "0_overlay.png"))
    photo = np.asarray(Image.open(images[0]))
    assert classes.shape == photo.shape[:2] and overlay.shape == photo.shape and classes.max() < 3
    # The overlay is the photo half-blended with the VOC colour of each pixel's class.
    from bot_keras.segmentation.data import voc_colormap

    expected = np.rint(0.5 * photo + 0.5 * voc_colormap()[classes]).astype(np.uint8)
    np.testing.assert_array_equal(overlay, expected)
    assert predict.model_task(model_dir) == "segmentation"
    # Two inputs with the same file name get one picture each.
    twice = [images[0], str(tmp_path / "copy" / "0.png")]
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "0.png").write_bytes(pathlib.Path(images[0]).read_bytes())
    segmentation.predict_files(model_dir, twice, tmp_path / "twice", predict.read_images(twice))
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == [
        "0_0_classes.png", "0_0_overlay.png", "0_1_classes.png", "0_1_overlay.png"]
    # The command given the run's model.keras predicts as from the run (its task from run.json beside it).
    done = commands.run(predict.COMMAND, f"--model={model_dir / 'model.keras'}",
                        f"--output_dir={tmp_path / 'file'}", images[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "file" / "0_classes.png")), classes)


def test_export_refuses_tflite_for_a_segmentation_run_and_names_the_format_that_works(finetuned, tmp_path):
    _, _, model_dir = finetuned
    with pytest.raises(cli.SetupError, match=r"segmentation run; --format=tflite exports classification runs "
                       r"only: use --format=savedmodel"):
        export.export(model_dir, tmp_path / "lite", export_format="tflite")
    assert not (tmp_path / "lite").exists()


@pytest.mark.slow  # an export and its serving functions traced (~15 s)
def test_export_serves_class_maps_at_the_input_size(finetuned, tmp_path):
    """The export loaded back in this process. That it loads and serves in a fresh process with TensorFlow
    alone (no bot_keras, no keras-hub imported), and matches the module built from the run, is
    tests/test_tasks.py's contract test (segmentation-fcn): the same FCN export, one fresh process there."""
    _, data, model_dir = finetuned
    target = export.export(model_dir, tmp_path / "exported")
    rng = np.random.default_rng(3)
    # One image larger than eval_size 64 (shrunk to fit, predicted, resized back), one smaller (padded).
    images = [rng.integers(0, 255, (70, 90, 3), dtype=np.uint8), rng.integers(0, 255, (30, 20, 3), np.uint8)]
    paths = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    m = tf.saved_model.load(str(target))
    batch = tf.constant([pathlib.Path(p).read_bytes() for p in paths])
    served = {k: v.numpy() for k, v in m.signatures["serving_default"](image_bytes=batch).items()}
    served["single"] = m.signatures["serving_single"](image_bytes=batch[1])["class_map"].numpy()
    assert (m.task.numpy().decode(), [n.decode() for n in m.class_names.numpy()]) == (
        "segmentation", ["sky", "road", "car"])
    # The batch: padded to its largest image (70 x 90) with PAD, each image's size alongside.
    assert served["class_map"].shape == (2, 70, 90) and served["class_map"].dtype == np.int32
    assert served["height"].tolist() == [70, 30] and served["width"].tolist() == [90, 20]
    small = served["class_map"][1]
    assert (small[30:] == seg_export.PAD).all() and (small[:, 20:] == seg_export.PAD).all()
    assert small[:30, :20].min() >= 0
    np.testing.assert_array_equal(served["single"], small[:30, :20])
    # Each image's map against the in-process single-image path (one model call per image).
    model = model_files.load_model(run_dir.read_run(model_dir, task="segmentation"))
    for image, served_map in zip(images, served["class_map"], strict=True):
        expected = seg_export.class_map(model, tf.constant(image), 64).numpy()
        h, w = image.shape[:2]
        assert (served_map[:h, :w] == expected).mean() > 0.999


def _file_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_no_file_and_rewrites_lost_metrics(finetuned, tmp_path, capsys):
    # The trainer.py logic bot_keras.train has, here through bot_keras.finetune.
    run = tmp_path / "run"
    shutil.copytree(finetuned[2], run)
    args = [f"--flagfile={run / 'flags.txt'}", f"--model_dir={run}", "--resume"]
    before = _file_bytes(run)
    capsys.readouterr()
    finetune.main(["finetune"], parse(*args))
    keras.backend.clear_session()
    assert f"{run} is a complete run (step 2): nothing to do" in capsys.readouterr().out
    assert _file_bytes(run) == before  # every byte: model, metrics, flags, classes, checkpoints, logs

    # A kill between model.keras and final_metrics.json: --resume writes the metrics from the checkpoint.
    metrics = json.loads((run / "final_metrics.json").read_text())
    (run / "final_metrics.json").unlink()
    finetune.main(["finetune"], parse(*args))
    keras.backend.clear_session()
    assert "finished training (step 2) but lacks its final files: writing them" in capsys.readouterr().out
    rewritten = json.loads((run / "final_metrics.json").read_text())
    assert rewritten["step"] == 2
    assert rewritten["wall_time_s"] == pytest.approx(metrics["wall_time_s"], rel=1e-6)
    for name in segmentation.CSV_COLUMNS:
        if name in metrics:
            assert rewritten[name] == pytest.approx(metrics[name], rel=1e-6), name
    # The evaluator's details are not in the checkpoint: the restored model is evaluated again.
    assert rewritten["val_per_class_iou"] == pytest.approx(metrics["val_per_class_iou"], abs=1e-6)
    assert (run / "model.keras").read_bytes() == before["model.keras"]  # it was fine: not rewritten


@pytest.mark.slow
def test_sigkill_then_resume_finishes_the_run(tmp_path):
    data = write_scenes(tmp_path / "data")
    model_dir = tmp_path / "run"
    args = base_args(
        data,
        model_dir,
        "--steps_per_epoch=3",
        "--epochs=2",
        "--checkpoint_steps=1",
        "--keep_checkpoints=50",
        "--eval_split=",
        "--lr_schedule=poly",
        "--seed=2",
    )
    env = cli_env()
    command = [sys.executable, "-m", "bot_keras.finetune", *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = model_dir / "checkpoints"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if checkpoints.is_dir() and tf.train.latest_checkpoint(str(checkpoints)):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    latest = tf.train.latest_checkpoint(str(checkpoints))
    assert latest and not (model_dir / "model.keras").exists()
    last = int(latest.rsplit("-", 1)[1])
    assert last < 6
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("Resumed from"))
    # poly: peak 0.1·4/256, T = 6 − 1 updates, (1 − t/T)^0.9 at the next update t = last.
    expected_lr = 0.1 * 4 / 256 * (1 - last / 5) ** 0.9
    assert f"at step {last} " in line
    assert float(line.split("learning rate ")[1].split()[0].rstrip(",")) == pytest.approx(
        expected_lr, rel=1e-4
    )
    assert json.loads((model_dir / "final_metrics.json").read_text())["step"] == 6
    assert run_dir.read_task(model_dir) == "segmentation" and (model_dir / "model.keras").is_file()


def test_a_bad_mask_stops_training_with_one_line_naming_the_file(tmp_path):
    data = write_scenes(tmp_path / "data", counts=(("train", 4),))
    bad = np.zeros((40, 48), np.uint8)
    bad[5, 5] = 7  # class id 7 of 3 classes
    Image.fromarray(bad).save(data / "train" / "masks" / "2.png")
    f = parse(*base_args(data, tmp_path / "run", "--eval_split=", "--max_steps=1", "--steps_per_epoch=2"))
    with pytest.raises(cli.SetupError) as error:
        finetune.main(["finetune"], f)
    message = str(error.value)
    assert "Training stopped by bad input data" in message and "2.png holds class id 7" in message
    assert "\n" not in message


@pytest.mark.slow
def test_a_mixed_precision_run_saves_a_float32_model_holding_the_trained_weights(tmp_path):
    data = write_scenes(tmp_path / "data", counts=(("train", 4),))
    f = parse(*base_args(data, tmp_path / "run", "--eval_split=", "--max_steps=1", "--steps_per_epoch=2",
                         "--precision=mixed_bfloat16"))
    finetune.main(["finetune"], f)
    # The float32 rebuild for model.keras (and --keep_best's model_best.keras, mid-training) leaves the
    # run's policy in place.
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    keras.mixed_precision.set_global_policy("float32")
    model = model_files.load_model(run_dir.read_run(tmp_path / "run", task="segmentation"))
    assert {layer.dtype_policy.compute_dtype for layer in model.layers} == {"float32"}
    # The trained (float32 master) weights of the last checkpoint, not a fresh build's: the head's kernel is
    # one of the checkpoint's tensors of its shape (the others: its momentum).
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    kernel = model.get_layer("fcn_logits").get_weights()[0]
    stored = [reader.get_tensor(k) for k, shape in reader.get_variable_to_shape_map().items()
              if tuple(shape) == kernel.shape]
    assert stored and any(np.array_equal(kernel, tensor) for tensor in stored)


@pytest.mark.slow  # three short epochs with evaluation, then two evaluations
def test_ema_and_keep_best_apply_to_fine_tuning(tmp_path):
    """--ema_decay and --keep_best=val_mean_iou on a segmentation run (FCN with its auxiliary head):
    final_metrics.json names the epoch of the highest logged val_mean_iou, model_best.keras is the
    inference model and scores exactly that, and model.keras holds the averaged weights of the last
    checkpoint, not the raw ones."""
    import csv

    data = write_scenes(tmp_path / "data")
    f = parse(*base_args(data, tmp_path / "run", "--epochs=3", "--steps_per_epoch=2", "--ema_decay=0.5",
                         "--keep_best=val_mean_iou"))
    finetune.main(["finetune"], f)
    run = tmp_path / "run"
    final = json.loads((run / "final_metrics.json").read_text())
    with open(run / "logs" / "training.csv") as log:
        mious = [float(row["val_mean_iou"]) for row in csv.DictReader(log)]
    assert len(mious) == 3 and final["weights"] == "ema (decay 0.5)"
    assert final["best_epoch"] == int(np.argmax(mious))
    assert final["best_val_mean_iou"] == pytest.approx(max(mious), rel=1e-6)
    best, _ = evaluate.evaluate_task_run(run, "segmentation", checkpoint="best")
    assert best["mean_iou"] == pytest.approx(final["best_val_mean_iou"], abs=1e-6)
    best_model = model_files.load_model(run_dir.read_run(run, task="segmentation", checkpoint="best"))
    assert not isinstance(best_model.output, dict)  # the inference model: no auxiliary output
    # model.keras' head kernel is the EMA average the last checkpoint holds, and differs from the raw one.
    kernel = model_files.load_model(run_dir.read_run(run, task="segmentation")).get_layer("fcn_logits")
    kernel = kernel.get_weights()[0]
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    same_shape = {k: reader.get_tensor(k) for k, shape in reader.get_variable_to_shape_map().items()
                  if tuple(shape) == kernel.shape}
    matches = [k for k, tensor in same_shape.items() if np.array_equal(kernel, tensor)]
    assert matches and all(k.startswith("ema/averages/") for k in matches)
