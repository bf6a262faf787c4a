"""`python -m bot_keras.train --flagfile=configs/X.flags [--flag=value ...]`: the one training command.

main() reads top to bottom in the order the parts are wired: flags → strategy and precision → data →
model → optimizer and schedule → restore → fit → export. Every trick of the paper is one flag (see the
README's flag table): Section 3.1 (linear scaling, warmup, zero-γ, no bias decay), 3.2 (fp16), Section 4
(the model), Section 5 (cosine decay, label smoothing, distillation, mixup).

The parts live in their own modules: the distributed train and eval steps in `steps.py`, the host loop,
callbacks and checkpoints in `loop.py`, the wiring shared with `bot_keras.finetune` in `trainer.py`, the
distillation teacher in `teacher.py`, the run directory's
files in `run_dir.py`, the exit codes and error type in `cli.py`. This file holds the flags, their
validation and `main`.
"""

import math
import os

from absl import flags

from bot_keras import cli, distribute, loop, run_dir, schedules, steps, trainer
from bot_keras.data import Augmentation, SkippedFiles, dataset_info, make_dataset
from bot_keras.data.sources import parse_source
from bot_keras.models import MODEL_NAMES, RESNET_NAMES, build_model
from bot_keras.teacher import load_teacher, parse_teacher_spec

COMMAND = "bot_keras.train"


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
    flags.DEFINE_float("dropout_rate", 0.0, "Dropout before the classifier.", **d)
    flags.DEFINE_bool(
        "zero_gamma", False, "Zero-initialise the last BN gamma of each residual block (Sec. 3.1).", **d
    )
    flags.DEFINE_bool("sync_bn", False, "Synchronise BatchNorm statistics across replicas.", **d)
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
    flags.DEFINE_integer("mixup_off_epochs", 0, "Train the last N epochs without mixup.", **d)
    flags.DEFINE_string(
        "teacher",
        "",
        "Distillation teacher: a .keras file, a SavedModel dir, or NAME:WEIGHTS (Sec. 5.3).",
        **d,
    )
    flags.DEFINE_float("distill_temperature", 20.0, "Distillation temperature T (Sec. 5.3).", **d)
    flags.DEFINE_float(
        "distill_hard_weight", None, "Weight w of the hard loss, (w, 1-w) form; unset: the paper's 1:1.", **d
    )
    # --- machinery -------------------------------------------------------------------------------------
    trainer.define_input_flags(fv)
    trainer.define_machinery_flags(fv)


def _defined_flags():
    scratch = flags.FlagValues()
    define_flags(scratch)
    return tuple(scratch)


# Every flag the trainer defines, in definition order: what `flags.txt` records so that the run can be
# reproduced or resumed from it (derived, so that a new flag cannot be forgotten).
CONTRACT_FLAGS = _defined_flags()


class FlagError(cli.SetupError):
    """A flag value that cannot work; the message names the flag and echoes the value."""


weight_decay = trainer.weight_decay  # kept under its old name for tools/ and tests


def validate_flags(f):
    """Checks what can be checked before data or models are touched; raises FlagError listing all."""
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
    need(f.image_size >= 16, f"--image_size={f.image_size} is too small (at least 16).")
    need(0 < f.crop_min_area <= 1, f"--crop_min_area={f.crop_min_area} must be in (0, 1].")
    need(0 <= f.dropout_rate < 1, f"--dropout_rate={f.dropout_rate} must be in [0, 1).")
    need(0 <= f.label_smoothing < 1, f"--label_smoothing={f.label_smoothing} must be in [0, 1).")
    need(f.mixup_alpha >= 0, f"--mixup_alpha={f.mixup_alpha} must be >= 0 (0 turns mixup off).")
    need(f.mixup_off_epochs >= 0, f"--mixup_off_epochs={f.mixup_off_epochs} must be >= 0.")
    need(
        not f.mixup_off_epochs or f.mixup_alpha > 0,
        f"--mixup_off_epochs={f.mixup_off_epochs} needs mixup on (--mixup_alpha > 0, got {f.mixup_alpha}).",
    )
    need(
        f.mixup_off_epochs < f.epochs or not f.mixup_alpha,
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
    problems.extend(trainer.machinery_problems(f))
    if problems:
        raise FlagError("\n".join(problems))


def resolved_flags_text(f):
    """The trainer's flags as a flagfile (`--name=value` lines) that reproduces the run; --resume is left
    out (a flagfile describes a run, not whether this invocation continued it)."""
    return run_dir.flags_text(f, [name for name in CONTRACT_FLAGS if name != "resume"])


# --- main -----------------------------------------------------------------------------------------------


def main(argv, f=flags.FLAGS):
    """Trains as the flags `f` say. Set-up problems raise cli.SetupError (exit 2 through cli.run)."""
    del argv
    validate_flags(f)

    # Strategy and precision: before any variable exists.
    machinery = trainer.start(f)
    strategy = machinery.strategy

    # Data. Every read of the source names the same directory, label offset and corrupt-file policy.
    source = dict(data_dir=f.data_dir, label_offset=f.label_offset, skip_corrupt=f.skip_corrupt)
    skipped_files = SkippedFiles()  # the distinct files --skip_corrupt skipped, counted at the end
    with cli.setup_errors(f"--dataset={f.dataset}"):
        train_info = dataset_info(f.dataset, split=f.train_split, **source)
        eval_info = dataset_info(f.dataset, split=f.eval_split, **source) if f.eval_split else train_info
    if list(eval_info.class_names) != list(train_info.class_names):
        raise cli.SetupError(
            f"--eval_split={f.eval_split!r} has {eval_info.num_classes} classes "
            f"({', '.join(eval_info.class_names[:5])}, ...) but --train_split={f.train_split!r} has "
            f"{train_info.num_classes} ({', '.join(train_info.class_names[:5])}, ...): labels would not "
            "line up."
        )
    steps_per_epoch = trainer.steps_per_epoch(f, train_info.num_examples, f.train_split)

    def train_input(context):
        return make_dataset(
            f.dataset,
            split=f.train_split,
            image_size=f.image_size,
            global_batch_size=f.batch_size,
            training=True,
            input_context=context,
            seed=f.seed,
            augmentation=Augmentation(
                random_crop=f.random_crop,
                crop_area_range=(f.crop_min_area, 1.0),
                flip=f.flip,
                color_jitter=f.color_jitter,
                pca_lighting=f.pca_lighting,
            ),
            skipped_files=skipped_files,
            max_image_pixels=f.max_image_pixels,
            **source,
        )

    def eval_input(context):
        return make_dataset(
            f.dataset,
            split=f.eval_split,
            image_size=f.image_size,
            global_batch_size=f.batch_size,
            training=False,
            input_context=context,
            skipped_files=skipped_files,
            max_image_pixels=f.max_image_pixels,
            **source,
        )

    with cli.setup_errors(f"--dataset={f.dataset}"):
        train_iterator = iter(strategy.distribute_datasets_from_function(train_input))
        eval_dataset = strategy.distribute_datasets_from_function(eval_input) if f.eval_split else None

    with strategy.scope():
        # Model.
        model = build_model(
            f.model,
            num_classes=train_info.num_classes,
            input_shape=(f.image_size, f.image_size, 3),
            zero_gamma=f.zero_gamma,
            dropout_rate=f.dropout_rate,
        )
        distribute.set_synchronized_batch_norm(model, f.sync_bn)
        teacher = (
            load_teacher(f.teacher, num_classes=train_info.num_classes, image_size=f.image_size)
            if f.teacher
            else None
        )
        # Optimizer and schedule.
        optimizer, step_var = trainer.build_optimizer(
            f, steps_per_epoch=steps_per_epoch, variables=model.trainable_variables
        )
    state = loop.RunState()  # the run's total training time and last epoch's logs, in its checkpoints

    # Restore.
    manager = loop.checkpoint_manager(
        machinery.write_dir,
        keep=f.keep_checkpoints,
        model=model,
        optimizer=optimizer,
        step=step_var,
        **state.checkpointed(),
        **skipped_files.checkpointed(),
    )
    if trainer.restore(f, manager, optimizer=optimizer, step_var=step_var, steps_per_epoch=steps_per_epoch):
        distribute.set_synchronized_batch_norm(model, False)  # as exported below
        trainer.finish_trained_run(f, machinery=machinery, model=model, state=state, step_var=step_var)
        return
    if machinery.chief:
        trainer.write_run_files(
            f,
            task=run_dir.CLASSIFICATION,
            flags_text=resolved_flags_text(f),
            class_names=train_info.class_names,
        )

    # Fit.
    per_example_loss = steps.make_per_example_loss(
        label_smoothing=f.label_smoothing,
        temperature=f.distill_temperature,
        hard_weight=f.distill_hard_weight,
    )
    train_function = steps.make_train_function(
        strategy,
        model,
        optimizer,
        per_example_loss=per_example_loss,
        global_batch_size=f.batch_size,
        teacher=teacher,
        mixup_alpha=f.mixup_alpha,
        seed=f.seed,
        jit_compile=f.jit_compile,
        grad_clip_norm=f.grad_clip_norm,
    )
    evaluate = (
        steps.make_eval_function(strategy, model, jit_compile=f.jit_compile)
        if eval_dataset is not None
        else None
    )
    logs, wall_time_s = trainer.fit(
        f,
        machinery=machinery,
        model=model,
        optimizer=optimizer,
        train_function=train_function,
        train_iterator=train_iterator,
        evaluate=evaluate,
        eval_dataset=eval_dataset,
        manager=manager,
        step_var=step_var,
        steps_per_epoch=steps_per_epoch,
        state=state,
        mixup_epochs=int(math.ceil(f.epochs)) - f.mixup_off_epochs if f.mixup_alpha else 0,
    )

    # Export: the student alone (no teacher, no optimizer), per-replica BN config, next to its class list.
    distribute.set_synchronized_batch_norm(model, False)
    extra_metrics = {}
    if f.skip_corrupt:
        extra_metrics["skipped_files"] = skipped_files.report()
    trainer.finish(
        f,
        machinery=machinery,
        model=model,
        logs=logs,
        step_var=step_var,
        wall_time_s=wall_time_s,
        extra_metrics=extra_metrics,
    )


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND)
