"""What the backbone fine-tuning tasks share (paper Section 6: segmentation, detection): their common flags,
the backbone's initial weights and the float32 final model.

A transfer task starts a task model from a ResNet backbone — random, a bot_keras classification run, a
`.keras`/`.weights.h5` file or timm `.safetensors` (`--backbone_weights`) — with stages or BatchNorm
frozen, and trains it with the classifier's machinery (`trainer.run`). `segmentation/task.py` and
`detection/task.py` call these functions from their `Task` operations.
"""

import json
import os

import keras
from absl import flags

from bot_keras import cli, model_files, run_dir, schedules, trainer
from bot_keras.models import RESNET_NAMES, build_backbone
from bot_keras.models.keras_hub_weights import (
    PRESET_PREFIX,
    copy_preset_weights,
    describe_config,
    is_preset_dir,
    load_preset_backbone,
    model_name_for,
)
from bot_keras.models.resnet import OUTPUT_STRIDES, freeze_backbone, layers_with_weights
from bot_keras.models.timm_weights import HUB_PREFIX, download_timm_weights, load_timm_weights

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
    define_backbone_flags(fv)
    flags.DEFINE_integer(
        "output_stride",
        0,
        "Backbone output stride 8 | 16 | 32 (dilated last stages); 0: the "
        "task's default (segmentation 8, detection 32).",
        **d,
    )
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
    trainer.define_weight_selection_flags(fv)
    trainer.define_input_flags(fv)
    trainer.define_machinery_flags(fv)


def define_backbone_flags(fv):
    """What the backbone starts from and how it trains: the flags every fine-tuning task shares, the
    classifier's included (its --model is the backbone)."""
    d = dict(flag_values=fv)
    flags.DEFINE_string(
        "backbone_weights",
        "",
        "Backbone initialisation: a bot_keras classification run directory, a .keras or .weights.h5 file "
        "of a classifier or backbone of the same ResNet, timm .safetensors, timm:NAME (a timm hub model, "
        "e.g. timm:resnet50d.gluon_in1k), a keras-hub preset directory or kerashub:NAME (ResNet-vd, e.g. "
        "kerashub:resnet_vd_50_imagenet); empty: random.",
        **d,
    )
    flags.DEFINE_integer("freeze_stages", 0, "Freeze the stem and backbone stages 1..N (0: none).", **d)
    flags.DEFINE_bool(
        "freeze_bn", False, "Freeze every BatchNorm of the backbone (statistics and affine).", **d
    )
    flags.DEFINE_float(
        "backbone_lr_mult", 1.0, "The backbone's learning rate as a fraction of the head's (0: frozen, "
        "a linear probe).", **d
    )


def backbone_flag_problems(f, backbone):
    """Messages for bad values of `define_backbone_flags`' flags, `backbone` being the ResNet to start."""
    problems = []
    if not 0 <= f.freeze_stages <= 4:
        problems.append(f"--freeze_stages={f.freeze_stages} must be in [0, 4].")
    if not f.backbone_lr_mult >= 0:
        problems.append(f"--backbone_lr_mult={f.backbone_lr_mult} must be >= 0 (0 freezes the backbone).")
    if backbone in RESNET_NAMES:
        problem = backbone_weights_problem(f.backbone_weights, backbone)
        if problem:
            problems.append(problem)
    return problems


def backbone_weights_problem(spec, backbone):
    """Why --backbone_weights=`spec` cannot initialise `backbone`, or None (no model is loaded here)."""
    if not spec or spec.startswith((HUB_PREFIX, PRESET_PREFIX)):
        return None  # fetched (or found in a hub's cache) when loaded
    if os.path.isdir(spec) and is_preset_dir(spec):
        with open(os.path.join(spec, "config.json")) as f:
            config = json.load(f)
        ours = model_name_for(config)
        if ours != backbone:
            return (f"--backbone_weights={spec!r} holds {describe_config(config)}"
                    + (f" (our {ours})" if ours else ", which no bot_keras model matches")
                    + f" but --backbone={backbone!r}; the weights would not fit.")
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
    need(f.crop_size >= 32, f"--crop_size={f.crop_size} is too small (at least 32).")
    return problems + backbone_flag_problems(f, f.backbone)


def output_stride(f, default):
    return f.output_stride or default


def load_backbone_weights(spec, backbone):
    """A model holding the weights of --backbone_weights under our layer names (a classifier or a
    `ResNetBackbone` of `backbone`), for `copy_pretrained` or `models.load_classifier_weights`; None when
    `spec` is empty. Hub names (`timm:`, `kerashub:`) are fetched here, on a connected machine."""
    if not spec:
        return None
    label = f"--backbone_weights={spec}"
    if spec.startswith(PRESET_PREFIX) or (os.path.isdir(spec) and is_preset_dir(spec)):
        source = build_backbone(backbone)
        with cli.setup_errors(label):
            copy_preset_weights(source, load_preset_backbone(spec), label=label)
        return source
    if os.path.isdir(spec):
        return model_files.load_model(run_dir.read_run(spec))
    if spec.endswith(".keras"):
        return model_files.load_keras_model(spec, label=label)
    source = build_backbone(backbone)
    if spec.startswith(HUB_PREFIX) or spec.endswith(".safetensors"):
        with cli.setup_errors(label):
            path = download_timm_weights(spec) if spec.startswith(HUB_PREFIX) else spec
            return load_timm_weights(source, path, skip_classifier=True)
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


def copy_pretrained(model, source, *, spec, keep_head):
    """Copies the pretrained `source` (`load_backbone_weights`) into the classifier `model`, layer by layer by
    name: every backbone layer must be found with the same shapes (else a SetupError naming both models and
    the layer, nothing changed); the head (`logits`) too when `keep_head`, else it keeps its initialisation.
    Prints what was copied and returns that line."""
    ours = layers_with_weights(model)
    theirs = layers_with_weights(source)
    pairs = []
    for name, layer in ours.items():
        if name == "logits" and not keep_head:
            continue
        other = theirs.get(name)
        problem = None
        if other is None:
            problem = f"it has no layer {name!r}"
        elif [tuple(w.shape) for w in other.weights] != [tuple(w.shape) for w in layer.weights]:
            problem = (f"its layer {name!r} has shapes {[tuple(w.shape) for w in other.weights]}, "
                       f"{model.name} needs {[tuple(w.shape) for w in layer.weights]}")
        if problem:
            raise cli.SetupError(f"--backbone_weights={spec} holds {source.name.removesuffix('_backbone')} "
                                 f"weights, which do not fit {model.name}: {problem}.")
        pairs.extend(zip(layer.weights, other.weights, strict=True))
    for to, value in pairs:
        to.assign(keras.ops.cast(value.value, to.dtype))
    loaded = len(ours) - (0 if keep_head else 1)
    head = theirs.get("logits")
    if keep_head:
        head_text = f"head kept ({ours['logits'].units} classes)"
    elif head is not None:
        head_text = (f"new head for {ours['logits'].units} classes (the source's {head.units}-class head "
                     "dropped)")
    else:
        head_text = f"new head for {ours['logits'].units} classes"
    line = (f"--backbone_weights={spec}: {loaded} layers ({len(pairs)} tensors) loaded into {model.name}; "
            f"{head_text}.")
    print(line, flush=True)
    return line


def keeps_head(source, num_classes, *, new_head):
    """Whether fine-tuning keeps the source classifier's head: it has one of `num_classes` outputs and
    --new_head is off (continuing a run on the same classes)."""
    head = layers_with_weights(source).get("logits")
    return not new_head and head is not None and getattr(head, "units", None) == num_classes


def freeze(f, model):
    """--freeze_stages and --freeze_bn on the task model's backbone; --backbone_lr_mult=0 freezes every stage
    (a linear probe: no gradient, optimizer slot or weight decay is spent on the backbone)."""
    stages = 4 if f.backbone_lr_mult == 0 else f.freeze_stages
    freeze_backbone(model, stages=stages, batch_norm=f.freeze_bn)


def final_model(f, model, *, inference_model, build_model, num_classes):
    """`inference_model(model)` in float32: a mixed-precision run's weights copied into a float32 build
    (`build_model(f, num_classes=...)`), as readers and TFLite want."""
    inference = inference_model(model)
    if f.precision == "float32":
        return inference
    previous = keras.mixed_precision.global_policy()  # --keep_best calls this mid-training
    keras.mixed_precision.set_global_policy("float32")
    try:
        rebuilt = inference_model(build_model(f, num_classes=num_classes, weights_from=None))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return model_files.copy_weights(rebuilt, inference, label=f"--precision={f.precision} model")
