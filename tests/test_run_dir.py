"""run_dir.py: flags.txt read back with the trainer's flags, classes.txt, run.json's task, atomic writes."""

import json
import zipfile

import pytest
from absl import flags

from bot_keras import atomic_write, cli, model_files, run_dir, train


def test_flags_round_trip_every_type_including_negated_booleans(parse, tmp_path):
    f = parse(
        "--model=resnet18_d",  # string
        "--dataset=folder:/data/with:colon",
        "--image_size=48",  # integer
        "--label_offset=1",  # integer whose default is None
        "--base_lr=0.35",  # float
        "--weight_decay=5e-05",  # float whose default is None
        "--lr_decay_epochs=10,20.5",  # list
        "--noflip",  # negated boolean, default True
        "--nono_bias_decay",
        "--skip_corrupt",  # boolean, default False
        "--nozero_gamma",
        "--eval_split=",  # empty string
    )
    run_dir.write_flags(tmp_path, f, train.CONTRACT_FLAGS)
    text = (tmp_path / "flags.txt").read_text()
    assert "--noflip\n" in text and "--nono_bias_decay\n" in text and "--skip_corrupt\n" in text
    assert "--distill_hard_weight" not in text  # unset (None) flags are left out and read back as None
    back = run_dir.read_flags(tmp_path / "flags.txt", train.define_flags)
    for name in train.CONTRACT_FLAGS:
        assert back[name].value == f[name].value, name
    assert (back.flip, back.no_bias_decay, back.skip_corrupt) == (False, False, True)
    assert back.lr_decay_epochs == ["10", "20.5"] and back.label_offset == 1 and back.weight_decay == 5e-05
    assert back.distill_hard_weight is None and back.eval_split == ""


def test_flags_file_with_an_unknown_flag_names_the_file(tmp_path):
    (tmp_path / "flags.txt").write_text("--model=resnet18_d\n--lable_smoothing=0.1\n")
    with pytest.raises(cli.SetupError, match=r"flags\.txt: .*lable_smoothing"):
        run_dir.read_flags(tmp_path / "flags.txt", train.define_flags)


def test_a_finetuning_run_from_before_per_task_flags_reads_without_the_other_tasks_flags(tmp_path):
    # Such a segmentation run recorded detection's flags too; reading it skips them, and nothing else.
    (tmp_path / "flags.txt").write_text(
        "--task=segmentation\n--backbone=resnet18_d\n--crop_size=32\n--head=fcn\n--keep_difficult\n"
        "--max_detections=100\n--nodetection_head_norm\n--nofreeze_bn\n"
    )
    define = run_dir.command_flags("segmentation")
    back = run_dir.read_flags(tmp_path / "flags.txt", define, skip=run_dir.OTHER_TASK_FLAGS["segmentation"])
    assert (back.task, back.backbone, back.crop_size, back.head, back.freeze_bn) == (
        "segmentation", "resnet18_d", 32, "fcn", False)
    assert "max_detections" not in back
    with pytest.raises(cli.SetupError, match=r"flags\.txt: .*keep_difficult"):
        run_dir.read_flags(tmp_path / "flags.txt", define)


def test_reading_a_run_registers_nothing_on_the_global_flags(tmp_path):
    run_dir.write_flags(tmp_path, _parsed("--model=resnet18_d"), ["model"])
    run_dir.read_flags(tmp_path / "flags.txt", train.define_flags)
    assert "model" not in flags.FLAGS and "base_lr" not in flags.FLAGS


def _parsed(*args):
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    flag_values(["train", *args])
    return flag_values


def test_class_names_round_trip(tmp_path):
    run_dir.write_class_names(tmp_path / "classes.txt", ["cat", "dog", "n01440764"])
    assert (tmp_path / "classes.txt").read_text() == "cat\ndog\nn01440764\n"
    assert run_dir.read_class_names(tmp_path / "classes.txt") == ("cat", "dog", "n01440764")


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "final_metrics.json"
    path.write_text("old")
    run_dir.write_metrics(tmp_path, {"top1": 0.5})
    assert json.loads(path.read_text()) == {"top1": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_metrics.json"]

    class Unwritable:
        def __str__(self):
            raise RuntimeError("disk full")

    with pytest.raises(TypeError):
        atomic_write.write_atomic(path, Unwritable())  # neither str nor bytes: nothing is replaced
    assert json.loads(path.read_text()) == {"top1": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_metrics.json"]


def test_task_is_recorded_and_checked(tmp_path):
    assert run_dir.read_task(tmp_path) == "classification"  # a run from before run.json existed
    run_dir.write_run_info(tmp_path, task="classification")
    assert json.loads((tmp_path / "run.json").read_text()) == {"task": "classification"}
    assert run_dir.read_task(tmp_path) == "classification"
    run_dir.write_run_info(tmp_path, task="segmentation")
    assert run_dir.read_task(tmp_path) == "segmentation"
    (tmp_path / "run.json").write_text('{"task": "regression"}')
    with pytest.raises(cli.SetupError, match=r"run\.json: task 'regression' is not one this version reads"):
        run_dir.read_task(tmp_path)
    with pytest.raises(ValueError, match="task='regression'"):
        run_dir.write_run_info(tmp_path, task="regression")


def test_keras_file_problem_tells_damage_from_a_non_keras_file(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    good = tmp_path / "good.keras"
    model.save(good)
    data = good.read_bytes()
    half = len(data) // 2
    cases = {
        "empty.keras": (b"", "damaged: empty (0 bytes)"),
        "cut.keras": (data[:half], f"damaged: a .keras archive cut short ({half} bytes)"),
        "text.keras": (b"hi\n", "not a .keras file (a .keras model is a zip archive; this 3-byte file is "
                       "not one)"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert model_files.keras_file_problem(tmp_path / name) == expected
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("data.txt", "x")
    expected = "a zip archive without config.json, not a .keras model"
    assert model_files.keras_file_problem(tmp_path / "other.keras") == expected
    assert model_files.keras_file_problem(tmp_path / "missing.keras") == "no such file"
    assert model_files.keras_file_problem(good) is None


def test_never_started_means_only_what_a_run_writes_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert not run_dir.never_started(run)  # missing
    run.mkdir()
    assert not run_dir.never_started(run)  # empty: a fresh directory, not a failed run
    for name in ("run.json", "flags.txt", "classes.txt", ".model.1.tmp.keras"):
        (run / name).write_text("x")
    (run / "logs").mkdir()
    (run / "checkpoints").mkdir()
    assert run_dir.never_started(run)
    (run / "checkpoints" / "checkpoint").write_text("x")
    assert not run_dir.never_started(run)  # a checkpoint: --resume's business
    (run / "checkpoints" / "checkpoint").unlink()
    (run / "model.keras").write_text("x")
    assert not run_dir.never_started(run)
    (run / "model.keras").unlink()
    (run / "my_notes.txt").write_text("x")
    assert not run_dir.never_started(run)  # someone else's file: never delete or reuse
