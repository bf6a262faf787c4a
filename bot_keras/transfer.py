"""What the backbone fine-tuning tasks share (paper Section 6: segmentation, detection): their common flags,
the backbone's initial weights and the float32 final model.

A transfer task starts a task model from a ResNet backbone — random, a bot_keras classification run, a
`.keras`/`.weights.h5` file or timm `.safetensors` (`--backbone_weights`) — with stages or BatchNorm
frozen, and trains it with the classifier's machinery (`trainer.run`). `segmentation/task.py` and
`detection/task.py` call these functions from their `Task` operations.
"""

import os

import keras
from absl import flags

from bot_keras import cli, run_dir, schedules, trainer
from bot_keras.models import RESNET_NAMES, build_backbone
from bot_keras.models.backbone import freeze_backbone
from bot_keras.models.resnet import OUTPUT_STRIDES

WEIGHT_SUFFIXES = (".keras", ".weights.h5", ".safetensors")
SCHEDULE_NAMES = schedules.FINETUNE_SCHEDULE_NAMES


def define_flags(fv):
    """The flags every transfer task defines, before its own (the order flags.txt records them in)."""
    d = dict(flag_values=fv)
    # --- what to fine-tune, on what --------------------------------------------------------------------
    flags.DEFINE_string(
        "dataset", None, "Data source of the task (e.g. seg_folder:ROOT, voc:ROOT, tfds:...).", **d
    )
    flags.DEFINE_string("data_dir", None, "TFDS data dir; relative source paths resolve in it.", **d)
    flags.DEFINE_string("train_split", "train", "Split to train on.", **d)
    flags.DEFINE_string("eval_split", "validation", "Split evaluated at each epoch end; empty: none.", **d)
    flags.DEFINE_string(
        "backbone", None, f"ResNet backbone, e.g. resnet50_d ({', '.join(RESNET_NAMES[:4])}, ...).", **d
    )
    flags.DEFINE_string(
        "backbone_weights",
        "",
        "Backbone initialisation: a bot_keras classification run directory (its model.keras), a .keras or "
        ".weights.h5 file of a classifier or backbone of --backbone, or timm .safetensors; empty: random.",
        **d,
    )
    flags.DEFINE_integer(
        "output_stride",
        0,
        "Backbone output stride 8 | 16 | 32 (dilated last stages); 0: the "
        "task's default (segmentation 8, detection 32).",
        **d,
    )
    flags.DEFINE_bool(
        "freeze_bn", False, "Freeze every BatchNorm of the backbone (statistics and affine).", **d
    )
    flags.DEFINE_integer("freeze_stages", 0, "Freeze the stem and backbone stages 1..N (0: none).", **d)
    flags.DEFINE_integer("crop_size", 480, "Training crop (pixels, square); the model's input size.", **d)
    # --- optimisation and machinery (the classifier's flags; fine-tuning defaults) ----------------------
    trainer.define_optimization_flags(
        fv,
        batch_size=16,
        epochs=50,
        base_lr=0.16,  # GluonCV's segmentation: 0.01 at batch 16 = 0.16 per 256 images
        lr_schedule="poly",
        schedule_names=SCHEDULE_NAMES,
    )
    trainer.define_machinery_flags(fv)


def backbone_weights_problem(spec, backbone):
    """Why --backbone_weights=`spec` cannot initialise `backbone`, or None (no model is loaded here)."""
    if not spec:
        return None
    if os.path.isdir(spec):
        try:
            run = run_dir.read_run(spec)
        except cli.SetupError as error:
            return f"--backbone_weights={spec!r}: {error}"
        if run.model_name != backbone:
            return (
                f"--backbone_weights={spec!r} is a {run.model_name} run but --backbone={backbone!r}; "
                "the weights would not fit."
            )
        return None
    if not os.path.isfile(spec):
        return f"--backbone_weights={spec!r}: no such file or directory."
    if not spec.endswith(WEIGHT_SUFFIXES):
        return f"--backbone_weights={spec!r} is not a run directory nor a {', '.join(WEIGHT_SUFFIXES)} file."
    return None


def flag_problems(f):
    """Messages for the bad values among `define_flags`' task-independent flags."""
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    for name in ("dataset", "backbone", "model_dir"):
        need(getattr(f, name), f"--{name} is required.")
    need(
        not f.backbone or f.backbone in RESNET_NAMES,
        f"--backbone={f.backbone!r} is not a ResNet name; known: {', '.join(RESNET_NAMES)}.",
    )
    need(
        f.output_stride == 0 or f.output_stride in OUTPUT_STRIDES,
        f"--output_stride={f.output_stride} is not one of 0 (the task's default), 8, 16, 32.",
    )
    need(0 <= f.freeze_stages <= 4, f"--freeze_stages={f.freeze_stages} must be in [0, 4].")
    need(f.crop_size >= 32, f"--crop_size={f.crop_size} is too small (at least 32).")
    if f.backbone in RESNET_NAMES:
        problem = backbone_weights_problem(f.backbone_weights, f.backbone)
        need(problem is None, problem)
    return problems


def output_stride(f, default):
    return f.output_stride or default


def load_backbone_weights(spec, backbone):
    """A model holding the weights of --backbone_weights under our layer names (a classifier or a
    `ResNetBackbone` of `backbone`), for `models.load_classifier_weights`; None when `spec` is empty."""
    if not spec:
        return None
    if os.path.isdir(spec):
        return run_dir.load_model(run_dir.read_run(spec))
    if spec.endswith(".keras"):
        return run_dir.load_keras_model(spec, label=f"--backbone_weights={spec}")
    source = build_backbone(backbone)
    if spec.endswith(".safetensors"):
        from bot_keras.models.timm_weights import load_timm_weights

        with cli.setup_errors(f"--backbone_weights={spec}"):
            return load_timm_weights(source, spec, skip_classifier=True)
    try:
        source.load_weights(spec)
    except Exception as error:  # Keras raises many types for a file of another model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise cli.SetupError(
            f"--backbone_weights={spec}: not the weights of a {backbone} backbone: {first}"
        ) from error
    return source


def initial_weights(f):
    return load_backbone_weights(f.backbone_weights, f.backbone)


def freeze(f, model):
    """--freeze_stages and --freeze_bn on the task model's backbone."""
    freeze_backbone(model, stages=f.freeze_stages, batch_norm=f.freeze_bn)


def final_model(f, model, *, inference_model, build_model, num_classes):
    """`inference_model(model)` in float32: a mixed-precision run's weights copied into a float32 build
    (`build_model(f, num_classes=...)`), as readers and TFLite want."""
    inference = inference_model(model)
    if f.precision == "float32":
        return inference
    keras.mixed_precision.set_global_policy("float32")
    rebuilt = inference_model(build_model(f, num_classes=num_classes, weights_from=None))
    return run_dir.copy_weights(rebuilt, inference, label=f"--precision={f.precision} model")
