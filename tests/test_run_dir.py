"""run_dir.py: flags.txt read back with the trainer's flags, classes.txt, run.json's task, atomic writes."""

import json

import pytest
from absl import flags

from bot_keras import cli, run_dir, train


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
        run_dir.write_atomic(path, Unwritable())  # neither str nor bytes: nothing is replaced
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
