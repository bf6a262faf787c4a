"""`python -m bot_keras.train --flagfile=configs/X.flags [--flag=value ...]`: the one training command.

main() reads top to bottom in the order the parts are wired: flags → strategy and precision → data →
model → optimizer and schedule → restore → fit → export. Every trick of the paper is one flag (see the
README's flag table): Section 3.1 (linear scaling, warmup, zero-γ, no bias decay), 3.2 (fp16), Section 4
(the model), Section 5 (cosine decay, label smoothing, distillation, mixup).

The parts live in their own modules: the distributed train and eval steps in `steps.py`, the host loop,
callbacks and checkpoints in `loop.py`, the distillation teacher in `teacher.py`, the run directory's
files in `run_dir.py`, the exit codes and error type in `cli.py`. This file holds the flags, their
validation and `main`.
"""

import json
import math
import os
import shutil
import sys

import keras
import tensorflow as tf
from absl import flags, logging

from bot_keras import cli, distribute, loop, optimizers, run_dir, schedules, steps
from bot_keras.data import Augmentation, SkippedFiles, dataset_info, make_dataset
from bot_keras.data.errors import bad_input_message
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
    flags.DEFINE_bool(
        "skip_corrupt", False, "Skip undecodable image files (each reported) instead of failing.", **d
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
    flags.DEFINE_integer("batch_size", 256, "Global batch size (split across all replicas).", **d)
    flags.DEFINE_float("epochs", 120, "Training epochs (may be fractional).", **d)
    flags.DEFINE_float(
        "base_lr", 0.1, "Learning rate per 256 images: lr = base_lr × batch_size / 256 (Sec. 3.1).", **d
    )
    flags.DEFINE_string(
        "lr_schedule", "step", " | ".join(schedules.SCHEDULE_NAMES) + " (Sec. 2 and 5.1).", **d
    )
    flags.DEFINE_list(
        "lr_decay_epochs", ["30", "60", "90"], "Epochs where the step schedule divides the lr.", **d
    )
    flags.DEFINE_float(
        "lr_decay_rate", 0.1, "Factor the step schedule multiplies the lr by at each decay epoch.", **d
    )
    flags.DEFINE_float("warmup_epochs", 0, "Linear warmup from 0 over this many epochs (Sec. 3.1).", **d)
    flags.DEFINE_float("momentum", 0.9, "SGD momentum (Nesterov).", **d)
    # The paper's decay is L2 1e-4 with momentum 0.9. In steady state the L2 term wd·w passes through the
    # momentum buffer and shrinks w by lr·wd/(1 − μ) a step; decoupled decay (Keras 3's optimizer
    # weight_decay, multiplied by the lr in our MomentumSGD) shrinks it by lr·wd. So the paper-equivalent
    # decoupled strength is 1e-4/(1 − μ) = 1e-3 at μ = 0.9 (tests/test_optimizers.py measures the ratio).
    flags.DEFINE_float(
        "weight_decay",
        None,
        "Weight decay; unset: the paper's L2 1e-4 in l2 mode, its equivalent 1e-4/(1 - momentum) "
        "(1e-3 at momentum 0.9) in decoupled mode.",
        **d,
    )
    flags.DEFINE_string(
        "weight_decay_mode",
        "decoupled",
        "decoupled (w -= lr·wd·w once a step, Keras 3's weight_decay) | l2 (wd·w added to the gradient).",
        **d,
    )
    flags.DEFINE_bool(
        "no_bias_decay", True, "Exclude biases and BN gamma/beta from weight decay (Sec. 3.1).", **d
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
    flags.DEFINE_string("precision", "float32", " | ".join(distribute.PRECISIONS) + ".", **d)
    flags.DEFINE_string("strategy", "default", " | ".join(distribute.STRATEGIES) + ".", **d)
    flags.DEFINE_string("tpu", "", "TPU address for --strategy=tpu (empty: local TPU VM).", **d)
    flags.DEFINE_string(
        "model_dir", None, "Run directory (flags.txt, classes.txt, checkpoints/, logs/, model.keras).", **d
    )
    flags.DEFINE_bool("resume", False, "Continue from the last checkpoint in --model_dir.", **d)
    flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, augmentation, mixup).", **d)
    flags.DEFINE_integer("steps_per_execution", 1, "Training steps per tf.function call.", **d)
    flags.DEFINE_integer(
        "checkpoint_steps", 1000, "Also checkpoint every N steps (0: only at epoch ends).", **d
    )
    flags.DEFINE_integer("keep_checkpoints", 3, "How many checkpoints to keep.", **d)
    flags.DEFINE_integer(
        "steps_per_epoch", 0, "Override the steps per epoch (0: training examples // batch).", **d
    )
    flags.DEFINE_integer(
        "max_steps", 0, "Stop after this many steps in total (0: no limit); for smoke runs.", **d
    )
    flags.DEFINE_integer("verbose", 1, "0: quiet, 1: progress bar, 2: one line per epoch.", **d)


def _defined_flags():
    scratch = flags.FlagValues()
    define_flags(scratch)
    return tuple(scratch)


# Every flag the trainer defines, in definition order: what `flags.txt` records so that the run can be
# reproduced or resumed from it (derived, so that a new flag cannot be forgotten).
CONTRACT_FLAGS = _defined_flags()


class FlagError(cli.SetupError):
    """A flag value that cannot work; the message names the flag and echoes the value."""


def weight_decay(f):
    """--weight_decay, or the paper-equivalent strength for --weight_decay_mode when it is unset."""
    if f.weight_decay is not None:
        return f.weight_decay
    return optimizers.paper_weight_decay(f.weight_decay_mode, momentum=f.momentum)


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
    need(f.batch_size > 0, f"--batch_size={f.batch_size} must be positive.")
    need(f.epochs > 0, f"--epochs={f.epochs} must be positive.")
    need(f.base_lr > 0, f"--base_lr={f.base_lr} must be positive.")
    need(
        f.lr_schedule in schedules.SCHEDULE_NAMES,
        f"--lr_schedule={f.lr_schedule!r} is not one of {schedules.SCHEDULE_NAMES}.",
    )
    need(
        f.epochs <= 0 or 0 <= f.warmup_epochs < f.epochs,
        f"--warmup_epochs={f.warmup_epochs} must be in [0, --epochs={f.epochs}).",
    )
    try:
        [float(e) for e in f.lr_decay_epochs]
    except ValueError:
        problems.append(f"--lr_decay_epochs={','.join(f.lr_decay_epochs)} must be numbers, e.g. 30,60,90.")
    need(0 < f.lr_decay_rate <= 1, f"--lr_decay_rate={f.lr_decay_rate} must be in (0, 1].")
    need(0 <= f.momentum < 1, f"--momentum={f.momentum} must be in [0, 1).")
    need(f.weight_decay is None or f.weight_decay >= 0, f"--weight_decay={f.weight_decay} must be >= 0.")
    need(
        f.weight_decay_mode in optimizers.WEIGHT_DECAY_MODES,
        f"--weight_decay_mode={f.weight_decay_mode!r} is not one of {optimizers.WEIGHT_DECAY_MODES}.",
    )
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
    need(
        f.precision in distribute.PRECISIONS,
        f"--precision={f.precision!r} is not one of {distribute.PRECISIONS}.",
    )
    need(
        f.strategy in distribute.STRATEGIES,
        f"--strategy={f.strategy!r} is not one of {distribute.STRATEGIES}.",
    )
    need(f.steps_per_execution >= 1, f"--steps_per_execution={f.steps_per_execution} must be >= 1.")
    need(f.checkpoint_steps >= 0, f"--checkpoint_steps={f.checkpoint_steps} must be >= 0.")
    need(f.keep_checkpoints >= 1, f"--keep_checkpoints={f.keep_checkpoints} must be >= 1.")
    need(f.steps_per_epoch >= 0, f"--steps_per_epoch={f.steps_per_epoch} must be >= 0 (0: from the data).")
    need(f.max_steps >= 0, f"--max_steps={f.max_steps} must be >= 0 (0: no limit).")
    if f.teacher:
        name, path = parse_teacher_spec(f.teacher)
        if name is not None:  # NAME:WEIGHTS
            need(os.path.exists(path), f"--teacher={f.teacher!r}: no weights file {path!r}.")
        else:
            need(os.path.exists(path), f"--teacher={f.teacher!r}: no such file or directory.")
    if f.model_dir:
        checkpoint_dir = os.path.join(f.model_dir, run_dir.CHECKPOINTS_DIR)
        has_files = os.path.isdir(f.model_dir) and bool(os.listdir(f.model_dir))
        if f.resume:
            need(
                loop.latest_checkpoint(f.model_dir) is not None,
                f"--resume: no checkpoint in {checkpoint_dir!r} to continue from"
                + (
                    " (the run stopped before its first checkpoint; run the command without --resume to "
                    "start it afresh)."
                    if run_dir.never_started(f.model_dir)
                    else "."
                ),
            )
        else:
            need(
                not has_files or run_dir.never_started(f.model_dir),
                f"--model_dir={f.model_dir!r} already holds a run; pass --resume to continue it, or choose "
                "another directory (runs are never overwritten).",
            )
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
    if "verbosity" not in f or not f["verbosity"].present:  # TF's INFO lines break the progress bar
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")

    # Strategy and precision: before any variable exists.
    with cli.setup_errors():
        strategy = distribute.create_strategy(f.strategy, tpu_address=f.tpu)
        distribute.per_replica_batch_size(f.batch_size, strategy.num_replicas_in_sync)
    distribute.set_precision(f.precision)
    warning = distribute.precision_warning(f.precision)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    keras.utils.set_random_seed(f.seed)
    chief = distribute.is_chief(strategy)
    write_dir = distribute.worker_dir(f.model_dir, strategy)

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
    steps_per_epoch = f.steps_per_epoch or train_info.num_examples // f.batch_size
    if steps_per_epoch < 1:
        raise cli.SetupError(
            f"--batch_size={f.batch_size} is larger than the {train_info.num_examples} examples of "
            f"--train_split={f.train_split!r}."
        )

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
        with cli.setup_errors():
            schedule = schedules.build_lr_schedule(
                f.lr_schedule,
                base_lr=f.base_lr,
                global_batch_size=f.batch_size,
                steps_per_epoch=steps_per_epoch,
                epochs=f.epochs,
                warmup_epochs=f.warmup_epochs,
                decay_epochs=[float(e) for e in f.lr_decay_epochs],
                decay_rate=f.lr_decay_rate,
            )
        optimizer = optimizers.build_optimizer(
            schedule,
            momentum=f.momentum,
            nesterov=True,
            weight_decay=weight_decay(f),
            weight_decay_mode=f.weight_decay_mode,
            no_bias_decay=f.no_bias_decay,
        )
        if distribute.needs_loss_scaling(f.precision):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    state = loop.RunState()

    # Restore.
    manager = loop.checkpoint_manager(
        write_dir,
        keep=f.keep_checkpoints,
        model=model,
        optimizer=optimizer,
        step=step_var,
        **state.checkpointed(),
    )
    total_steps = loop.total_steps(f.epochs, steps_per_epoch, f.max_steps)
    if f.resume:
        path = loop.restore_latest(manager, f.model_dir)
        restored = int(step_var.numpy())
        if restored >= total_steps:  # nothing left to train: leave the run as it is, or complete it
            if chief:
                finish_trained_run(f.model_dir, model, state, step=restored)
            else:
                shutil.rmtree(write_dir, ignore_errors=True)
            return
        scale = getattr(optimizer, "dynamic_scale", None)
        print(
            f"Resumed from {path} at step {restored} (epoch {restored // steps_per_epoch}), learning rate "
            f"{float(optimizer.learning_rate):.6g}"
            + (f", loss scale {float(scale.numpy()):g}" if scale is not None else ""),
            flush=True,
        )
    if chief:
        if not f.resume and run_dir.never_started(f.model_dir):
            print(
                f"--model_dir={f.model_dir} holds no checkpoint and no model, only what a run that stopped "
                "before its first checkpoint left: starting the run afresh there.",
                flush=True,
            )
            shutil.rmtree(os.path.join(f.model_dir, run_dir.LOGS_DIR), ignore_errors=True)
        os.makedirs(f.model_dir, exist_ok=True)
        run_dir.remove_temporaries(f.model_dir)
        run_dir.write_run_info(f.model_dir, task=run_dir.CLASSIFICATION)
        run_dir.write_atomic(os.path.join(f.model_dir, run_dir.FLAGS_FILE), resolved_flags_text(f))
        run_dir.write_class_names(os.path.join(f.model_dir, run_dir.CLASSES_FILE), train_info.class_names)

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
    )
    evaluate = steps.make_eval_function(strategy, model) if eval_dataset is not None else None
    callbacks = loop.make_callbacks(
        write_dir,
        chief=chief,
        verbose=f.verbose,
        epochs=int(math.ceil(f.epochs)),
        steps_per_epoch=min(steps_per_epoch, f.max_steps or steps_per_epoch),  # the progress bar's end
        model=model,
        resume=f.resume,
    )
    mixup_epochs = int(math.ceil(f.epochs)) - f.mixup_off_epochs if f.mixup_alpha else 0
    try:
        logs = loop.train_loop(
            optimizer=optimizer,
            train_function=train_function,
            train_iterator=train_iterator,
            evaluate=evaluate,
            eval_dataset=eval_dataset,
            manager=manager,
            step_var=step_var,
            callbacks=callbacks,
            steps_per_epoch=steps_per_epoch,
            epochs=f.epochs,
            global_batch_size=f.batch_size,
            steps_per_execution=f.steps_per_execution,
            checkpoint_steps=f.checkpoint_steps,
            max_steps=f.max_steps,
            mixup_epochs=mixup_epochs,
            precision=f.precision,
            state=state,
        )
    except tf.errors.InvalidArgumentError as error:
        message = bad_input_message(error)  # the pipeline's check naming the file, or None: a bug
        if message is None:
            raise
        raise cli.SetupError(f"Training stopped by bad input data: {message}") from None

    # Export: the student alone (no teacher, no optimizer), per-replica BN config, next to its class list.
    distribute.set_synchronized_batch_norm(model, False)
    if f.skip_corrupt:
        count = skipped_files.count()
        plural = "" if count == 1 else "s"
        print(f"Skipped {count} distinct undecodable file{plural} (--skip_corrupt).", flush=True)
    if chief:
        extra = {"skipped_files": skipped_files.count()} if f.skip_corrupt else {}
        write_results(f.model_dir, model, state, step=int(step_var.numpy()), logs=logs, **extra)
    else:
        shutil.rmtree(write_dir, ignore_errors=True)


def write_results(model_dir, model, state, *, step, logs, write_model=True, **extra):
    """Writes model.keras and then final_metrics.json (the last epoch's logs, the step, the run's total
    training time), the file that marks a run finished (tools/ablation.py reads it so). A kill before the
    metrics leaves checkpoints whose `RunState` lets `--resume` write both."""
    if write_model:
        run_dir.save_model(model, model_dir)
    summary = {name: float(value) for name, value in logs.items()}
    summary.update(step=step, wall_time_s=float(state.wall_time_s.numpy()), **extra)
    run_dir.write_metrics(model_dir, summary)
    print(f"Finished: {json.dumps({k: round(v, 4) for k, v in summary.items()})}", flush=True)
    print(f"Run directory: {model_dir}", flush=True)


def finish_trained_run(model_dir, model, state, *, step):
    """`--resume` of a run whose checkpoint is at its last step: a complete run is left byte for byte as it
    is; a run killed after its last checkpoint gets the final files it lacks, from that checkpoint."""
    model_ok = run_dir.keras_file_problem(os.path.join(model_dir, run_dir.MODEL_FILE)) is None
    metrics = os.path.join(model_dir, run_dir.METRICS_FILE)
    if model_ok and os.path.isfile(metrics):
        print(
            f"{model_dir} is a complete run (step {step}): nothing to do, every file left as it was. "
            "Raise --epochs (or --max_steps) with --resume to train it further.",
            flush=True,
        )
        return
    print(f"{model_dir} finished training (step {step}) but lacks its final files: writing them.", flush=True)
    distribute.set_synchronized_batch_norm(model, False)
    run_dir.remove_temporaries(model_dir)
    if os.path.isfile(metrics):  # a damaged model.keras under complete metrics (e.g. copied in part)
        run_dir.save_model(model, model_dir)
        print(f"Run directory: {model_dir}", flush=True)
    else:
        write_results(model_dir, model, state, step=step, logs=state.logs(), write_model=not model_ok)


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND)
