"""configs/**/*.flags: every recipe parses with its command's flags and passes its validation (no training).

Classifier recipes are read with `bot_keras.train`'s flags; configs/transfer/ with `bot_keras.finetune`'s.

A typo in a flag name, a value the trainer rejects, a nested --flagfile that moved, or a distillation
recipe whose --teacher does not point at the run its teacher recipe makes fails here, not 80 GPU-hours in.
"""

import pathlib
import re

import pytest
from absl import flags

from bot_keras import finetune, train
from bot_keras.models.applications import APPLICATIONS

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL_RECIPES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.flags"))
# bot_keras.finetune's: transfer to other tasks, and classifiers fine-tuned from pretrained weights.
TRANSFER_RECIPES = [r for r in ALL_RECIPES if r.startswith(("configs/transfer/", "configs/finetune/"))]
RECIPES = [r for r in ALL_RECIPES if r not in TRANSFER_RECIPES]  # bot_keras.train's


def header(recipe):
    """The leading comment block of a flagfile, without the '#' marks."""
    lines = []
    for line in (ROOT / recipe).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def header_model_dir(recipe):
    """The --model_dir of the training command in a recipe's header."""
    match = re.search(r"--model_dir=(\S+)", header(recipe))
    return match.group(1) if match else None


def test_there_are_recipes_for_every_table6_row():
    names = {pathlib.PurePath(r).stem for r in RECIPES if r.startswith("configs/imagenet/")}
    expected = {
        "resnet50_d_efficient", "resnet50_d_cosine", "resnet50_d_label_smoothing", "resnet152_d_teacher",
        "resnet50_d_distill", "resnet50_d_mixup", "resnet50_d_all_tricks", "mobilenet_efficient",
        "mobilenet_all_tricks", "inception_v3_efficient", "inception_v3_all_tricks",
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header_states_command_hardware_and_result(recipe):
    text = header(recipe)
    assert f"python -m bot_keras.train --flagfile={recipe}" in text, f"{recipe}: header lacks its own command"
    assert re.search(r"^Hardware:", text, re.MULTILINE), f"{recipe}: header does not state the hardware"
    assert re.search(r"^(Paper|Result)\b", text, re.MULTILINE), f"{recipe}: header states no result"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses_and_validates(parse, tmp_path, recipe):
    f = parse(f"--flagfile={recipe}")
    assert f.model_dir is None, f"{recipe} sets --model_dir; the command line chooses the run directory"
    assert not f.resume, f"{recipe} sets --resume"
    assert not (f.model in APPLICATIONS and f.zero_gamma), f"{recipe}: --zero_gamma with --model={f.model}"
    if f.teacher:
        # The teacher file exists only after the teacher's own run; checked separately below.
        stand_in = tmp_path / "teacher.keras"
        stand_in.write_bytes(b"")
        f.teacher = f"{f.teacher.split(':')[0]}:{stand_in}" if ":" in f.teacher else str(stand_in)
    f.model_dir = str(tmp_path / "run")
    train.validate_flags(f)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if re.fullmatch(
    r"configs/imagenet/resnet50(_[bcd])?_(baseline|efficient)\.flags", r)])
def test_section_2_to_4_recipes_hold_the_papers_settings(parse, recipe):
    f = parse(f"--flagfile={recipe}")
    # Section 2: 0.1 per 256 images, L2 1e-4, 120 epochs; Section 3.1 adds batch 1024 in fp16, 5 warmup
    # epochs, zero-gamma and no bias decay.
    assert f.base_lr == 0.1 and f.weight_decay_mode == "l2" and f.weight_decay == 1e-4 and f.epochs == 120
    efficient = "efficient" in recipe
    assert (f.batch_size, f.precision, f.warmup_epochs) == (
        (1024, "mixed_float16", 5) if efficient else (256, "float32", 0)
    )
    assert f.zero_gamma == f.no_bias_decay == efficient
    assert f.lr_schedule == "step" and [float(e) for e in f.lr_decay_epochs] == [30, 60, 90]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "--teacher=" in (ROOT / r).read_text()])
def test_teacher_points_at_the_run_of_a_teacher_recipe(parse, recipe):
    f = parse(f"--flagfile={recipe}")
    student_size = f.image_size
    name, _, weights = f.teacher.rpartition(":")
    run_dir, file_name = weights.rsplit("/", 1)
    assert file_name == "model.keras", f"{recipe}: --teacher={f.teacher} is not a run's model.keras"
    makers = [r for r in RECIPES if header_model_dir(r) == run_dir]
    assert makers, f"{recipe}: no recipe's header trains into {run_dir}"
    teacher = parse(f"--flagfile={makers[0]}")
    if name:  # NAME:WEIGHTS builds NAME at the student's size and loads the weights
        assert name == teacher.model
    else:  # a .keras file keeps the input size it was trained at; the trainer rejects a mismatch
        assert teacher.image_size == student_size, (recipe, teacher.image_size, student_size)


def test_a_typo_in_a_recipe_fails(parse, tmp_path):
    typo = tmp_path / "typo.flags"
    typo.write_text("--flagfile=configs/imagenet/resnet50_d_efficient.flags\n--lable_smoothing=0.1\n")
    with pytest.raises(flags.UnrecognizedFlagError, match="lable_smoothing"):
        parse(f"--flagfile={typo}")


def test_a_bad_value_in_a_recipe_fails_validation(parse, tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("--flagfile=configs/imagenet/resnet50_d_efficient.flags\n--lr_schedule=cosin\n")
    f = parse(f"--flagfile={bad}", f"--model_dir={tmp_path / 'run'}")
    with pytest.raises(train.FlagError, match="--lr_schedule='cosin'"):
        train.validate_flags(f)


def test_nested_recipes_override_their_base(parse):
    f = parse("--flagfile=configs/imagenet/resnet50_d_all_tricks.flags")
    assert (f.model, f.epochs, f.batch_size, f.base_lr) == ("resnet50_d", 200, 1024, 0.1)
    assert (f.lr_schedule, f.label_smoothing, f.mixup_alpha) == ("cosine", 0.1, 0.2)
    assert (f.teacher, f.distill_temperature) == ("runs/resnet152_d_teacher/model.keras", 20)
    assert f.zero_gamma and f.no_bias_decay and f.precision == "mixed_float16"
    g = parse("--flagfile=configs/imagenet/inception_v3_all_tricks.flags")
    assert (g.model, g.image_size, g.zero_gamma) == ("inception_v3", 299, False)


# --- configs/transfer: bot_keras.finetune's recipes ----------------------------------------------------


def parse_finetune(*args):
    return finetune.parse_flags(list(args))


def test_there_are_transfer_recipes_for_the_paper_and_for_a_cpu():
    names = {pathlib.PurePath(r).stem for r in TRANSFER_RECIPES}
    assert {"ade20k_fcn_resnet50_d", "camvid_fcn_resnet18_d"} <= names, names


@pytest.mark.parametrize("recipe", TRANSFER_RECIPES)
def test_transfer_recipe_header_states_command_hardware_and_result(recipe):
    text = header(recipe)
    assert f"python -m bot_keras.finetune --flagfile={recipe}" in text, f"{recipe}: header lacks its command"
    assert re.search(r"^Hardware:", text, re.MULTILINE), f"{recipe}: header does not state the hardware"
    assert re.search(r"^(Reference|Result)\b", text, re.MULTILINE), f"{recipe}: header states no result"


@pytest.mark.parametrize("recipe", TRANSFER_RECIPES)
def test_transfer_recipe_parses_and_validates(monkeypatch, tmp_path, recipe):
    monkeypatch.chdir(ROOT)
    f = parse_finetune(f"--flagfile={recipe}")
    # The command line chooses the run directory and a local run's weights; a hub name may be the recipe.
    local_weights = f.backbone_weights and not f.backbone_weights.startswith(("timm:", "kerashub:"))
    assert f.model_dir is None and not f.resume and not local_weights, (
        f"{recipe}: the command line chooses the run directory and the backbone weights"
    )
    f.model_dir = str(tmp_path / "run")
    finetune.validate_flags(f)


def test_ade20k_recipe_holds_the_papers_fcn_setting(monkeypatch):
    monkeypatch.chdir(ROOT)
    f = parse_finetune("--flagfile=configs/transfer/ade20k_fcn_resnet50_d.flags")
    assert (f.dataset, f.backbone, f.output_stride, f.head) == ("tfds:scene_parse150", "resnet50_d", 8, "fcn")
    assert (f.crop_size, f.batch_size, f.epochs, f.lr_schedule) == (480, 16, 120, "poly")
    assert f.base_lr * f.batch_size / 256 == pytest.approx(0.01)  # GluonCV's lr at batch 16


def test_voc_recipe_holds_the_papers_detection_setting(monkeypatch):
    monkeypatch.chdir(ROOT)
    f = parse_finetune("--flagfile=configs/transfer/voc_retinanet_resnet50_d.flags")
    assert (f.task, f.dataset, f.backbone) == ("detection", "voc:VOC0712", "resnet50_d")
    assert (f.train_split, f.eval_split) == ("trainval", "test")  # VOC 07+12 trainval → VOC 2007 test
    assert f.base_lr * f.batch_size / 256 == pytest.approx(0.01)  # Detectron/GluonCV's lr at batch 16
    assert "Faster-RCNN" in header("configs/transfer/voc_retinanet_resnet50_d.flags")
