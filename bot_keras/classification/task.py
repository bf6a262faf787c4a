"""Image classification as a task (the paper's subject): what `bot_keras.train` trains.

The task contract is `bot_keras.tasks.Task`. Here: the trainer's flags (every trick of the paper is one flag,
see the README's flag table: Section 3.1 linear scaling, warmup, zero-γ, no bias decay; 3.2 fp16; Section 4
the model; Section 5 cosine decay, label smoothing, distillation, mixup); `data.make_dataset` with the
Section 2.1 augmentation; `models.build_model`; the step's label-smoothed (and distilled, mixed-up) loss;
top-1/top-5 evaluation; export's `ServingModule` and predict's top-k.
"""

import math
import os

import tensorflow as tf
from absl import flags

from bot_keras import (
    cli,
    distribute,
    loop,
    metrics,
    model_files,
    schedules,
    steps,
    tasks,
    trainer,
    transfer,
)
from bot_keras.data import Augmentation, SkippedFiles
from bot_keras.data import dataset_info as data_info
from bot_keras.data import make_dataset as data_pipeline
from bot_keras.data.decode import MAX_IMAGE_PIXELS
from bot_keras.data.randaugment import parse_randaugment
from bot_keras.data.sources import parse_source
from bot_keras.models import MODEL_NAMES, RESNET_NAMES
from bot_keras.models import build_model as build_classifier
from bot_keras.teacher import load_teacher, parse_teacher_spec

NAME = tasks.CLASSIFICATION
SCHEDULE_NAMES = schedules.SCHEDULE_NAMES
CSV_COLUMNS = loop.CSV_COLUMNS
BEST_METRICS = ("val_top1", "val_top5", "val_loss")  # --keep_best


def define_flags(fv):
    """Defines the trainer's flags on the `absl.flags.FlagValues` `fv` (also what reads a run's flags.txt)."""
    d = dict(flag_values=fv)
    # --- what to train, on what ----------------------------------------------------------------------
    flags.DEFINE_string("model", None, "Model name, e.g. resnet50_d (see bot_keras.models.MODEL_NAMES).", **d)
    flags.DEFINE_string(
        "dataset", None, "Data source: tfds:NAME[:VERSION], tfrecord:GLOB, folder:ROOT, synthetic.", **d
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data dir; relative folder:/tfrecord: paths resolve in it.", **d
    )
    flags.DEFINE_string(
        "train_split", "train", "Split to train on (TFDS split or image-folder subdirectory).", **d
    )
    flags.DEFINE_string(
        "eval_split", "validation", "Split evaluated at each epoch end; empty: no evaluation.", **d
    )
    flags.DEFINE_integer(
        "label_offset", None, "Subtracted from TFRecord labels (1 for TF's 1-based ImageNet shards).", **d
    )
    flags.DEFINE_integer("image_size", 224, "Training and evaluation resolution (pixels, square).", **d)
    flags.DEFINE_bool(
        "random_crop", True, "Random-resized crop, 8-100% of the area (Sec. 2.1); off: eval crop.", **d
    )
    flags.DEFINE_float(
        "crop_min_area", 0.08, "Smallest area fraction of the random-resized crop (paper: 0.08).", **d
    )
    flags.DEFINE_bool("flip", True, "Random horizontal flip (Sec. 2.1).", **d)
    flags.DEFINE_bool("color_jitter", True, "Brightness, saturation and contrast jitter (Sec. 2.1).", **d)
    flags.DEFINE_bool("pca_lighting", True, "AlexNet-style PCA lighting noise (Sec. 2.1).", **d)
    flags.DEFINE_enum(
        "augment_on",
        "device",
        ["host", "device"],
        "Where jitter, lighting and normalisation run: device (batched in the train step; the host sends "
        "uint8) or host (per image in the tf.data map).",
        **d,
    )
    flags.DEFINE_float("dropout_rate", 0.0, "Dropout before the classifier.", **d)
    flags.DEFINE_bool(
        "zero_gamma", False, "Zero-initialise the last BN gamma of each residual block (Sec. 3.1).", **d
    )
    flags.DEFINE_float(
        "drop_path_rate", 0.0,
        "Stochastic depth (beyond the paper): the last residual block's drop probability, linear from 0 "
        "at the first (timm's schedule); ResNets only; 0: off.", **d,
    )
    flags.DEFINE_bool("sync_bn", False, "Synchronise BatchNorm statistics across replicas.", **d)
    # --- fine-tuning: a pretrained start (ResNets) -----------------------------------------------------
    transfer.define_backbone_flags(fv)
    flags.DEFINE_bool(
        "new_head", False, "With --backbone_weights of a classifier with as many classes as the data: start "
        "a new head anyway (the head is always new when the class counts differ).", **d
    )
    # --- optimisation ----------------------------------------------------------------------------------
    trainer.define_optimization_flags(
        fv,
        batch_size=256,
        epochs=120,
        base_lr=0.1,
        lr_schedule="step",
        schedule_names=schedules.SCHEDULE_NAMES,
    )
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing epsilon (Sec. 5.2).", **d)
    flags.DEFINE_float("mixup_alpha", 0.0, "Mixup Beta(alpha, alpha); 0 turns mixup off (Sec. 5.4).", **d)
    flags.DEFINE_float(
        "cutmix_alpha", 0.0,
        "CutMix Beta(alpha, alpha) (beyond the paper; timm's): paste a box of the partner image, labels "
        "mixed by its pasted area; 0 turns it off.", **d,
    )
    flags.DEFINE_float(
        "mix_switch_prob", 0.5,
        "With both --mixup_alpha and --cutmix_alpha: the probability that a batch uses CutMix, else mixup "
        "(timm's switch probability).", **d,
    )
    flags.DEFINE_float(
        "random_erasing", 0.0,
        "Random erasing probability per image (beyond the paper; timm's default mode): a box of 2-33% of the "
        "normalised image replaced by N(0, 1) noise; 0: off.", **d,
    )
    flags.DEFINE_string(
        "randaugment", "",
        "RandAugment N,M, e.g. 2,9 (beyond the paper; timm's increasing op list): N of 15 ops per image, "
        "each applied with probability 0.5, at magnitude M in 0..10, after the crop and flip; empty: off.",
        **d,
    )
    flags.DEFINE_integer("mixup_off_epochs", 0, "Train the last N epochs without mixup (and CutMix).", **d)
    flags.DEFINE_string(
        "teacher",
        "",
        "Distillation teacher: a classification run dir, a .keras file, a SavedModel dir, or NAME:WEIGHTS "
        "(Sec. 5.3).",
        **d,
    )
    flags.DEFINE_float("distill_temperature", 20.0, "Distillation temperature T (Sec. 5.3).", **d)
    flags.DEFINE_float(
        "distill_hard_weight", None, "Weight w of the hard loss, (w, 1-w) form; unset: the paper's 1:1.", **d
    )
    # --- machinery -------------------------------------------------------------------------------------
    trainer.define_weight_selection_flags(fv)
    trainer.define_input_flags(fv)
    trainer.define_machinery_flags(fv)


# `bot_keras.finetune --task=classification`'s defaults where they differ from training from scratch: a
# pretrained backbone needs a tenth of the from-scratch learning rate (0.01 per 256 images, 0.0025 at batch
# 64), a short warmup (half an epoch: the new head's first large gradients reach a trained backbone),
# cosine decay, and far fewer epochs; --backbone is the fine-tuning commands' name for --model.
FINETUNE_DEFAULTS = dict(batch_size=64, epochs=30, base_lr=0.01, lr_schedule="cosine", warmup_epochs=0.5)
FINETUNE_ALIASES = {"backbone": "model"}


def flag_problems(f):
    """Messages for the bad values among the classifier's own flags (the command adds the machinery's)."""
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    for name in ("model", "dataset", "model_dir"):
        need(getattr(f, name), f"--{name} is required.")
    need(
        not f.model or f.model in MODEL_NAMES,
        f"--model={f.model!r} is unknown; known: {', '.join(MODEL_NAMES)}.",
    )
    if f.dataset:
        try:
            parse_source(f.dataset)
        except ValueError as error:
            problems.append(f"--dataset: {error}")
    need(
        not (f.zero_gamma and f.model in MODEL_NAMES and f.model not in RESNET_NAMES),
        f"--zero_gamma applies to residual networks only (Section 3.1); --model={f.model!r} has no "
        "residual blocks.",
    )
    pretrained = f.backbone_weights or f.freeze_stages or f.freeze_bn or f.backbone_lr_mult != 1.0
    need(
        not (pretrained and f.model in MODEL_NAMES and f.model not in RESNET_NAMES),
        f"--backbone_weights, --freeze_stages, --freeze_bn and --backbone_lr_mult need a ResNet --model; "
        f"--model={f.model!r} is not one.",
    )
    problems.extend(transfer.backbone_flag_problems(f, f.model))
    need(0 <= f.drop_path_rate < 1, f"--drop_path_rate={f.drop_path_rate} must be in [0, 1).")
    need(
        not (f.drop_path_rate and f.model in MODEL_NAMES and f.model not in RESNET_NAMES),
        f"--drop_path_rate applies to residual networks only (stochastic depth drops residual branches); "
        f"--model={f.model!r} has none.",
    )
    need(f.image_size >= 16, f"--image_size={f.image_size} is too small (at least 16).")
    need(0 < f.crop_min_area <= 1, f"--crop_min_area={f.crop_min_area} must be in (0, 1].")
    need(0 <= f.dropout_rate < 1, f"--dropout_rate={f.dropout_rate} must be in [0, 1).")
    need(0 <= f.label_smoothing < 1, f"--label_smoothing={f.label_smoothing} must be in [0, 1).")
    need(f.mixup_alpha >= 0, f"--mixup_alpha={f.mixup_alpha} must be >= 0 (0 turns mixup off).")
    need(f.mixup_off_epochs >= 0, f"--mixup_off_epochs={f.mixup_off_epochs} must be >= 0.")
    need(0 <= f.random_erasing <= 1, f"--random_erasing={f.random_erasing} must be in [0, 1].")
    try:
        parse_randaugment(f.randaugment)
    except ValueError as error:
        problems.append(f"--randaugment={f.randaugment!r} {error}.")
    need(f.cutmix_alpha >= 0, f"--cutmix_alpha={f.cutmix_alpha} must be >= 0 (0 turns CutMix off).")
    need(0 <= f.mix_switch_prob <= 1, f"--mix_switch_prob={f.mix_switch_prob} must be in [0, 1].")
    need(
        not f.mixup_off_epochs or f.mixup_alpha > 0 or f.cutmix_alpha > 0,
        f"--mixup_off_epochs={f.mixup_off_epochs} needs mixup on (--mixup_alpha > 0, got {f.mixup_alpha}) "
        f"or CutMix (--cutmix_alpha > 0, got {f.cutmix_alpha}).",
    )
    need(
        f.mixup_off_epochs < f.epochs or not (f.mixup_alpha or f.cutmix_alpha),
        f"--mixup_off_epochs={f.mixup_off_epochs} leaves no mixup epoch out of --epochs={f.epochs}.",
    )
    need(f.distill_temperature > 0, f"--distill_temperature={f.distill_temperature} must be positive.")
    need(
        f.distill_hard_weight is None or 0 <= f.distill_hard_weight <= 1,
        f"--distill_hard_weight={f.distill_hard_weight} must be in [0, 1].",
    )
    need(
        f.distill_hard_weight is None or f.teacher,
        f"--distill_hard_weight={f.distill_hard_weight} is set but there is no --teacher.",
    )
    if f.teacher:
        name, path = parse_teacher_spec(f.teacher)
        if name is not None:  # NAME:WEIGHTS
            need(os.path.exists(path), f"--teacher={f.teacher!r}: no weights file {path!r}.")
        else:
            need(os.path.exists(path), f"--teacher={f.teacher!r}: no such file or directory.")
    return problems


# --- data, model, loss, metrics (the training driver's) ----------------------------------------------------


def _source(f, skip_corrupt=None):
    """Every read of the source names the same directory, label offset and corrupt-file policy."""
    return dict(
        data_dir=f.data_dir,
        label_offset=f.label_offset,
        skip_corrupt=f.skip_corrupt if skip_corrupt is None else skip_corrupt,
    )


def dataset_info(f, split):
    return data_info(f.dataset, split=split, **_source(f))


preflight = tasks.no_preflight


def augmentation(f):
    """The Section 2.1 augmentation of the flags, where it runs (--augment_on), and --randaugment."""
    return Augmentation(
        random_crop=f.random_crop,
        crop_area_range=(f.crop_min_area, 1.0),
        flip=f.flip,
        color_jitter=f.color_jitter,
        pca_lighting=f.pca_lighting,
        on=f.augment_on,
        randaugment=parse_randaugment(f.randaugment),
    )


def make_dataset(f, *, split, training, input_context=None, batch_size=None, skipped_files=None):
    """Training: the Section 2.1 augmentation of the flags; evaluation: the centre crop. With
    --augment_on=device both yield uint8 batches that the train and eval steps finish; a resumed training
    pipeline starts at the checkpoint's step."""
    return data_pipeline(
        f.dataset,
        split=split,
        image_size=f.image_size,
        global_batch_size=batch_size or f.batch_size,
        training=training,
        input_context=input_context,
        seed=f.seed if training else None,
        augmentation=augmentation(f),
        skipped_files=skipped_files,
        start_step=loop.checkpoint_step(f.model_dir) if training and f.resume else 0,
        max_image_pixels=f.max_image_pixels,
        **_source(f),
    )


def initial_weights(f):
    """The model of --backbone_weights (`transfer.load_backbone_weights`), or None: from scratch (the
    initialisation of --zero_gamma, Section 3.1)."""
    return transfer.load_backbone_weights(f.backbone_weights, f.model)


def build_model(f, *, num_classes, weights_from=None):
    """The classifier of --model; with `weights_from`, its backbone (and head, when the source's has
    `num_classes` outputs and --new_head is off) copied in."""
    model = build_classifier(
        f.model,
        num_classes=num_classes,
        input_shape=(f.image_size, f.image_size, 3),
        zero_gamma=f.zero_gamma,
        dropout_rate=f.dropout_rate,
        drop_path_rate=f.drop_path_rate,
    )
    if weights_from is not None:
        keep_head = transfer.keeps_head(weights_from, num_classes, new_head=f.new_head)
        transfer.copy_pretrained(model, weights_from, spec=f.backbone_weights, keep_head=keep_head)
    return model


def train_options(f, *, model, num_classes):
    """Synchronised BatchNorm (--sync_bn), the distillation teacher (Section 5.3), the label-smoothed and
    distilled loss (5.2, 5.3) and mixup (5.4) for all but the last --mixup_off_epochs epochs."""
    distribute.set_synchronized_batch_norm(model, f.sync_bn)
    transfer.freeze(f, model)  # --freeze_stages, --freeze_bn, --backbone_lr_mult=0
    teacher = (
        load_teacher(f.teacher, num_classes=num_classes, image_size=f.image_size) if f.teacher else None
    )
    per_example_loss = steps.make_per_example_loss(
        label_smoothing=f.label_smoothing,
        temperature=f.distill_temperature,
        hard_weight=f.distill_hard_weight,
    )
    return tasks.TrainOptions(
        step_kwargs=dict(per_example_loss=per_example_loss, teacher=teacher, mixup_alpha=f.mixup_alpha,
                         cutmix_alpha=f.cutmix_alpha, mix_switch_prob=f.mix_switch_prob,
                         random_erasing=f.random_erasing, augmentation=augmentation(f)),
        mixup_epochs=int(math.ceil(f.epochs)) - f.mixup_off_epochs if f.mixup_alpha or f.cutmix_alpha else 0,
    )


def make_evaluator(f, strategy, model, class_names):
    del class_names
    return steps.make_eval_function(strategy, model, jit_compile=f.jit_compile)


def final_model(f, model, *, num_classes):
    """The student alone (no teacher, no optimizer) with per-replica BatchNorm; a mixed-precision model is
    saved as trained (readers rebuild it in float32, `model_files.float32_rebuild`)."""
    del f, num_classes
    distribute.set_synchronized_batch_norm(model, False)
    return model


# --- bot_keras.evaluate, export and predict ---------------------------------------------------------------


def evaluate_run(run, *, dataset=None, split=None, data_dir=None, image_size=None, batch_size=None,
                 skip_corrupt=None, max_image_pixels=None):
    """Top-1 / top-5 of the run's model on a split (default: the run's --eval_split) with the evaluation
    transform the trainer uses; unset arguments come from the run's flags.txt, so the same shards are read
    with the same labels and corrupt-file policy. Returns (result for the JSON, one-line summary)."""
    f, split = tasks.evaluation_flags(
        run, split=split, dataset=dataset, data_dir=data_dir, image_size=image_size, batch_size=batch_size,
        skip_corrupt=skip_corrupt, max_image_pixels=max_image_pixels,
    )
    skipped_files = SkippedFiles()
    with cli.setup_errors(f"--dataset={f.dataset}"):
        info = dataset_info(f, split)
    tasks.check_same_classes(
        run.class_names, info.class_names,
        expected_label=f"{run.model_dir / 'classes.txt'} lists", found_label=f"--dataset={f.dataset!r} split "
        f"{split!r} has", consequence="; the model was trained on other classes.",
    )
    model = model_files.at_resolution(model_files.load_model(run), run, int(f.image_size))
    with cli.setup_errors(f"--dataset={f.dataset}"):
        batches = make_dataset(f, split=split, training=False, skipped_files=skipped_files)
    summed, summarize = metrics.with_confusion(run.class_names)
    with tasks.bad_input("Evaluation"):
        result = steps.make_eval_function(
            tf.distribute.get_strategy(), model, metrics=summed, summarize=summarize
        )(batches)
    result.update(split=split, dataset=f.dataset, image_size=int(f.image_size), model=str(run.model_path))
    if f.skip_corrupt:
        result["skipped_files"] = skipped_files.count()
    line = (
        f"{result['dataset']} {result['split']} ({result['count']} images): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
    )
    worst = metrics.worst_classes(result["per_class"])
    if worst:
        line += "\nLowest F1: " + ", ".join(
            f"{name} {100 * result['per_class'][name]['f1']:.1f}% (recall "
            f"{100 * (result['per_class'][name]['recall'] or 0):.1f}%)" for name in worst
        )
    if "skipped_files" in result:
        count = result["skipped_files"]
        line += f"\nSkipped {count} distinct undecodable file{'' if count == 1 else 's'} (--skip_corrupt)."
    return result, line


def serving_module(run, model, *, top_k):
    """`export.ServingModule`: `serving_default` (image bytes) and `serving_images` (uint8 pixels)."""
    from bot_keras.export import ServingModule  # the serving graph lives with the export command's docs

    module = ServingModule(
        model, class_names=run.class_names, image_size=run.image_size, top_k=top_k,
        max_image_pixels=run.flags.get("max_image_pixels", MAX_IMAGE_PIXELS),
    )
    return module, {
        "serving_default": module.serve_bytes.get_concrete_function(),
        "serving_images": module.serve_images.get_concrete_function(),
    }


def predict_files(model_path, image_paths, output_dir, encoded_images, *, k=5, checkpoint="final"):
    """The top-k classes of each image (`predict.format_predictions`); writes no files."""
    del output_dir, encoded_images
    from bot_keras import predict  # the classifier's loaders (SavedModel, .keras file, run) live there

    return [predict.format_predictions(predict.predict(model_path, image_paths, k=k, checkpoint=checkpoint))]
