"""The wiring both training commands share: `bot_keras.train` (classification) and `bot_keras.finetune`.

Each command defines its own flags and builds its own data and model; everything around them is here, in
the order a command calls it, and reads the flags both commands define under the same names:

    define_*_flags(fv)           the flags both define (each command chooses its optimisation defaults)
    machinery_problems(f)        checks of the optimisation and machinery flags (→ the command's FlagError)
    start(f)                     strategy and precision (before any variable), seed, chief, write_dir
    build_optimizer(f, ...)      schedule, Nesterov SGD with the paper's decay, loss scaling, step variable
    restore(f, ...)              --resume: the newest checkpoint, and a line saying where training continues
                                 (or, at the run's last step, that there is nothing left to train)
    finish_trained_run(f, ...)   --resume of a trained run: leaves a complete run as it is, or completes it
    write_run_files(f, ...)      run.json, flags.txt, classes.txt (the chief only)
    fit(f, ...)                  callbacks and `loop.train_loop`; bad input data becomes a one-line SetupError
    finish(f, ...)               model.keras and then final_metrics.json (the chief), or the worker's cleanup

The checkpoints carry a `loop.RunState` (the run's total training time, the last epoch's logs) beside the
model, optimizer and step, so a resumed run reports its total wall time and a run killed between its last
checkpoint and its final files gets them on `--resume`. final_metrics.json, written last, marks a run
finished.
"""

import dataclasses
import json
import math
import os
import shutil
import sys

import keras
import tensorflow as tf
from absl import flags

from bot_keras import (
    atomic_write,
    best_model,
    cli,
    distribute,
    loop,
    model_files,
    optimizers,
    run_dir,
    schedules,
    steps,
    tasks,
)
from bot_keras.data import SkippedFiles
from bot_keras.data.decode import MAX_IMAGE_PIXELS, pixel_limit_problem
from bot_keras.data.errors import bad_input_message
from bot_keras.ema import WeightEMA, evaluated_with_averages
from bot_keras.models.resnet import BACKBONE_VARIABLE_PATTERN


def define_optimization_flags(fv, *, batch_size, epochs, base_lr, lr_schedule, schedule_names):
    """Batch, epochs, learning rate and schedule, momentum and weight decay, with the command's defaults."""
    d = dict(flag_values=fv)
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size (split across all replicas).", **d)
    flags.DEFINE_float("epochs", epochs, "Training epochs (may be fractional).", **d)
    flags.DEFINE_float(
        "base_lr", base_lr, "Learning rate per 256 images: lr = base_lr × batch_size / 256 (Sec. 3.1).", **d
    )
    flags.DEFINE_string("lr_schedule", lr_schedule, " | ".join(schedule_names) + " (Sec. 2 and 5.1).", **d)
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
    flags.DEFINE_float(
        "grad_clip_norm",
        0.0,
        "Rescale the global batch's gradient to at most this L2 norm before each update (0: off; the "
        "paper clips nothing; the detection recipes use 10).",
        **d,
    )


def define_input_flags(fv):
    """What the training commands do with bad images: skip them, and the pixel limit (decompression bombs)."""
    d = dict(flag_values=fv)
    flags.DEFINE_bool(
        "skip_corrupt", False,
        "Skip undecodable image files and images over --max_image_pixels (each named once, counted in "
        "final_metrics.json) instead of failing.", **d,
    )
    flags.DEFINE_integer(
        "max_image_pixels", MAX_IMAGE_PIXELS,
        "Refuse (or with --skip_corrupt skip) images whose header declares more pixels (height x width), "
        "before decoding them; the default is Pillow's. Exports record it and refuse such images too.", **d,
    )


def define_weight_selection_flags(fv):
    """Which weights a run ends with (beyond the paper): weight EMA and the best epoch's model."""
    d = dict(flag_values=fv)
    flags.DEFINE_float(
        "ema_decay", 0.0,
        "Weight EMA decay (beyond the paper), e.g. 0.9999, warmed up as min(decay, (1+n)/(10+n)): "
        "evaluation, model.keras and final_metrics.json use the averaged weights; 0: off.", **d,
    )
    flags.DEFINE_string(
        "keep_best", "",
        "Also keep the best epoch's model as model_best.keras, by this evaluation metric (beyond the paper): "
        "classification val_top1 | val_top5 | val_loss; segmentation val_mean_iou | val_pixel_accuracy | "
        "val_loss; detection val_map_voc07 | val_map_all_point; empty: off.", **d,
    )


def weight_selection_problems(f, best_metrics):
    """Messages for bad --ema_decay / --keep_best values; `best_metrics`: the task's `BEST_METRICS`."""
    problems = []
    if not 0 <= f.ema_decay < 1:
        problems.append(f"--ema_decay={f.ema_decay} must be in [0, 1) (0: off).")
    if f.keep_best and f.keep_best not in best_metrics:
        problems.append(f"--keep_best={f.keep_best!r} is not one of {', '.join(best_metrics)} (empty: off).")
    elif f.keep_best and not f.eval_split:
        problems.append(f"--keep_best={f.keep_best} needs an evaluation (--eval_split).")
    return problems


def define_machinery_flags(fv):
    """Precision, strategy, run directory and resume, seed, checkpoints, step limits, verbosity."""
    d = dict(flag_values=fv)
    flags.DEFINE_string("precision", "float32", " | ".join(distribute.PRECISIONS) + ".", **d)
    flags.DEFINE_string("strategy", "default", " | ".join(distribute.STRATEGIES) + ".", **d)
    flags.DEFINE_string("tpu", "", "TPU address for --strategy=tpu (empty: local TPU VM).", **d)
    flags.DEFINE_string(
        "model_dir", None, "Run directory (flags.txt, classes.txt, checkpoints/, logs/, model.keras).", **d
    )
    flags.DEFINE_bool("resume", False, "Continue from the last checkpoint in --model_dir.", **d)
    flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, augmentation, mixup).", **d)
    flags.DEFINE_integer(
        "steps_per_execution", 1,
        "Training steps per tf.function call (more than 1 runs them in a graph loop, for accelerators whose "
        "per-call overhead dominates; on a CPU 1 was as fast or faster, docs/performance.md).", **d,
    )
    flags.DEFINE_bool(
        "jit_compile",
        False,
        "Compile the replica steps with XLA (one replica, or --strategy=mirrored on GPUs; bot_keras.train "
        "compiles its train and eval steps, bot_keras.finetune its train step).",
        **d,
    )
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


def weight_decay(f):
    """--weight_decay, or the paper-equivalent strength for --weight_decay_mode when it is unset."""
    if f.weight_decay is not None:
        return f.weight_decay
    return optimizers.paper_weight_decay(f.weight_decay_mode, momentum=f.momentum)


def machinery_problems(f, *, schedule_names=schedules.SCHEDULE_NAMES):
    """Messages for the bad values among the flags both commands define (optimisation, precision,
    strategy, checkpoints, the run directory); empty when all are fine."""
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    need(f.batch_size > 0, f"--batch_size={f.batch_size} must be positive.")
    need(f.epochs > 0, f"--epochs={f.epochs} must be positive.")
    need(f.base_lr > 0, f"--base_lr={f.base_lr} must be positive.")
    need(f.lr_schedule in schedule_names, f"--lr_schedule={f.lr_schedule!r} is not one of {schedule_names}.")
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
    need(f.grad_clip_norm >= 0, f"--grad_clip_norm={f.grad_clip_norm} must be >= 0 (0: off).")
    need(f.weight_decay is None or f.weight_decay >= 0, f"--weight_decay={f.weight_decay} must be >= 0.")
    need(
        f.weight_decay_mode in optimizers.WEIGHT_DECAY_MODES,
        f"--weight_decay_mode={f.weight_decay_mode!r} is not one of {optimizers.WEIGHT_DECAY_MODES}.",
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
    pixels = pixel_limit_problem(f.max_image_pixels)
    need(pixels is None, f"--max_image_pixels {pixels}.")
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
    return problems


@dataclasses.dataclass(frozen=True)
class Machinery:
    """What `start` set up: only the chief writes the run directory; another worker writes `write_dir`,
    a private directory (every worker must take part in saving checkpoints)."""

    strategy: tf.distribute.Strategy
    chief: bool
    write_dir: str


def start(f):
    """Strategy and precision (before any variable exists) and the seed; returns a `Machinery`."""
    cli.quiet_python_logging(f)  # TF's INFO lines break the progress bar
    with cli.setup_errors():
        strategy = distribute.create_strategy(f.strategy, tpu_address=f.tpu)
        distribute.per_replica_batch_size(f.batch_size, strategy.num_replicas_in_sync)
    if f.jit_compile:
        with cli.setup_errors(f"--jit_compile with --strategy={f.strategy}"):
            steps.check_jit_compile(strategy)
    distribute.set_precision(f.precision)
    warning = distribute.precision_warning(f.precision)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    keras.utils.set_random_seed(f.seed)
    return Machinery(strategy, distribute.is_chief(strategy), distribute.worker_dir(f.model_dir, strategy))


def steps_per_epoch(f, num_examples, split):
    """--steps_per_epoch, or the full batches in the training split; a batch larger than it is an error."""
    steps = f.steps_per_epoch or num_examples // f.batch_size
    if steps < 1:
        raise cli.SetupError(
            f"--batch_size={f.batch_size} is larger than the {num_examples} examples of "
            f"--train_split={split!r}."
        )
    return steps


def lr_schedule(f, *, steps_per_epoch):
    """The learning-rate schedule of the flags (`step -> lr`; Sections 3.1, 5.1)."""
    with cli.setup_errors():
        return schedules.build_lr_schedule(
            f.lr_schedule,
            base_lr=f.base_lr,
            global_batch_size=f.batch_size,
            steps_per_epoch=steps_per_epoch,
            epochs=f.epochs,
            warmup_epochs=f.warmup_epochs,
            decay_epochs=[float(e) for e in f.lr_decay_epochs],
            decay_rate=f.lr_decay_rate,
        )


def backbone_lr_multipliers(f):
    """`--backbone_lr_mult` as the optimizer's (pattern, factor) pairs: the backbone's variables step with
    the head's learning rate times the factor (none when the flag is 1 or the task has no such flag)."""
    factor = getattr(f, "backbone_lr_mult", 1.0)
    return () if factor == 1.0 else ((BACKBONE_VARIABLE_PATTERN, factor),)


def build_optimizer(f, *, steps_per_epoch, variables):
    """The schedule and optimizer of the flags (Sections 3.1, 5.1), built for `variables`, plus the step
    counter; call inside `strategy.scope()`. Returns (optimizer, step_var)."""
    optimizer = optimizers.build_optimizer(
        lr_schedule(f, steps_per_epoch=steps_per_epoch),
        momentum=f.momentum,
        nesterov=True,
        weight_decay=weight_decay(f),
        weight_decay_mode=f.weight_decay_mode,
        no_bias_decay=f.no_bias_decay,
        lr_multipliers=backbone_lr_multipliers(f),
    )
    if distribute.needs_loss_scaling(f.precision):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    return optimizer, step_var


def restore(f, manager, *, optimizer, step_var, steps_per_epoch):
    """With --resume, restores the newest checkpoint and says where training continues. Returns True when
    the checkpoint is at the run's last step (nothing left to train: call `finish_trained_run`)."""
    if not f.resume:
        return False
    path = loop.restore_latest(manager, f.model_dir)
    restored = int(step_var.numpy())
    if restored >= loop.total_steps(f.epochs, steps_per_epoch, f.max_steps):
        return True
    scale = getattr(optimizer, "dynamic_scale", None)
    print(
        f"Resumed from {path} at step {restored} (epoch {restored // steps_per_epoch}), learning rate "
        f"{float(optimizer.learning_rate):.6g}"
        + (f", loss scale {float(scale.numpy()):g}" if scale is not None else ""),
        flush=True,
    )
    return False


def finish_trained_run(f, *, machinery, model, state, step_var, extra_metrics=None):
    """`--resume` of a run whose checkpoint is at its last step (`restore` returned True): a complete run
    is left byte for byte as it is; a run killed after its last checkpoint gets the final files it lacks,
    `model` (ready for export) and metrics from the checkpoint's `state`, plus `extra_metrics()` when given
    (called only then: e.g. a fine-tuning evaluator's per-class details, which the checkpoint lacks).
    Another worker only removes its private directory."""
    if not machinery.chief:
        shutil.rmtree(machinery.write_dir, ignore_errors=True)
        return
    step = int(step_var.numpy())
    model_ok = model_files.keras_file_problem(os.path.join(f.model_dir, run_dir.MODEL_FILE)) is None
    metrics = os.path.join(f.model_dir, run_dir.METRICS_FILE)
    if model_ok and os.path.isfile(metrics):
        print(
            f"{f.model_dir} is a complete run (step {step}): nothing to do, every file left as it was. "
            "Raise --epochs (or --max_steps) with --resume to train it further.",
            flush=True,
        )
        return
    print(
        f"{f.model_dir} finished training (step {step}) but lacks its final files: writing them.", flush=True
    )
    run_dir.remove_temporaries(f.model_dir)
    if os.path.isfile(metrics):  # a damaged model.keras under complete metrics (e.g. copied in part)
        run_dir.save_model(model, f.model_dir)
        print(f"Run directory: {f.model_dir}", flush=True)
        return
    finish(
        f,
        machinery=machinery,
        model=model if not model_ok else None,
        logs=state.logs(),
        step_var=step_var,
        wall_time_s=float(state.wall_time_s.numpy()),
        extra_metrics=extra_metrics() if extra_metrics else None,
    )


def changed_flags(old_text, new_text, flag_values):
    """`--a=1 → --a=2` for each flag whose flagfile line differs between two flags.txt texts (booleans
    `--x` / `--nox` paired by name; a flag only one side records is shown against "unset"). --model_dir is
    left out: a run directory moved elsewhere is the same run."""

    def by_name(text):
        lines = {}
        for line in text.splitlines():
            name = line[2:].split("=", 1)[0]
            if "=" not in line and name not in flag_values and name.startswith("no"):
                name = name[2:]
            if name != "model_dir":
                lines[name] = line
        return lines

    old, new = by_name(old_text), by_name(new_text)
    return [f"{old.get(name, 'unset')} → {new.get(name, 'unset')}" for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)]


def write_run_files(f, *, task, flags_text, class_names, resolved=None):
    """run.json (the task and the `resolved` values), flags.txt and classes.txt in --model_dir (call on the
    chief only). A directory a run left before its first checkpoint (`run_dir.never_started`) is started
    afresh, its old logs removed."""
    if not f.resume and run_dir.never_started(f.model_dir):
        print(
            f"--model_dir={f.model_dir} holds no checkpoint and no model, only what a run that stopped "
            "before its first checkpoint left: starting the run afresh there.",
            flush=True,
        )
        shutil.rmtree(os.path.join(f.model_dir, run_dir.LOGS_DIR), ignore_errors=True)
    os.makedirs(f.model_dir, exist_ok=True)
    run_dir.remove_temporaries(f.model_dir)
    run_dir.write_run_info(f.model_dir, task=task, resolved=resolved)
    flags_path = os.path.join(f.model_dir, run_dir.FLAGS_FILE)
    if f.resume and os.path.isfile(flags_path):
        with open(flags_path, encoding="utf-8") as old:
            changes = changed_flags(old.read(), flags_text, f)
        if changes:
            print(f"--resume with flags changed since {flags_path}: {'; '.join(changes)} (flags.txt now "
                  "records the new values)", flush=True)
    atomic_write.write_atomic(flags_path, flags_text)
    run_dir.write_class_names(os.path.join(f.model_dir, run_dir.CLASSES_FILE), class_names)


def fit(
    f,
    *,
    machinery,
    model,
    optimizer,
    train_function,
    train_iterator,
    evaluate,
    eval_dataset,
    manager,
    step_var,
    steps_per_epoch,
    state,
    mixup_epochs=0,
):
    """Runs `loop.train_loop` with the run's callbacks (the CSV log's columns: `state.columns`); returns
    (last epoch's logs, the run's total training time in s, every process's, from `state`). On preemption
    every worker stops after the same step (`distribute.stop_agreement`); another worker removes its
    private directory before `cli.Preempted` goes on."""
    callbacks = loop.make_callbacks(
        machinery.write_dir,
        chief=machinery.chief,
        verbose=f.verbose,
        epochs=int(math.ceil(f.epochs)),
        steps_per_epoch=min(steps_per_epoch, f.max_steps or steps_per_epoch),  # the progress bar's end
        model=model,
        resume=f.resume,
        columns=state.columns,
    )
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
            learning_rate=lr_schedule(f, steps_per_epoch=steps_per_epoch),
            agree_to_stop=distribute.stop_agreement(machinery.strategy),  # every worker stops at one step
        )
    except cli.Preempted:
        if not machinery.chief:  # its checkpoint was only its part in the save; the chief's is the run's
            shutil.rmtree(machinery.write_dir, ignore_errors=True)
        raise
    except tf.errors.InvalidArgumentError as error:
        message = bad_input_message(error)  # the pipeline's check naming the file, or None: a bug
        if message is None:
            raise
        raise cli.SetupError(f"Training stopped by bad input data: {message}") from None
    return logs, float(state.wall_time_s.numpy())


def finish(f, *, machinery, model, logs, step_var, wall_time_s, extra_metrics=None):
    """The chief saves `model` as model.keras (None: keep the one there) and then the last logs (+
    `extra_metrics`) as final_metrics.json, the file that marks a run finished (tools/ablation.py reads it
    so); another worker removes its private directory. A kill before the metrics leaves checkpoints whose
    `RunState` lets `--resume` write both."""
    if not machinery.chief:
        shutil.rmtree(machinery.write_dir, ignore_errors=True)
        return
    if model is not None:
        run_dir.save_model(model, f.model_dir)
    summary = {k: float(v) for k, v in logs.items()}
    summary.update(step=int(step_var.numpy()), wall_time_s=wall_time_s)
    summary.update(extra_metrics or {})
    run_dir.write_metrics(f.model_dir, summary)
    shown = {k: round(v, 4) for k, v in summary.items() if isinstance(v, (int, float))}
    print(f"Finished: {json.dumps(shown)}", flush=True)
    print(f"Run directory: {f.model_dir}", flush=True)


# --- the driver -------------------------------------------------------------------------------------------


def run(task, f, *, flags_text):
    """Trains the `task` module (`bot_keras.tasks.Task`) as the flags `f` say, the flags already validated;
    `flags_text` is what flags.txt records. Reads top to bottom in the order the parts are wired: strategy
    and precision → data → model → optimizer and schedule → restore → fit → the final model. Set-up
    problems raise cli.SetupError (exit 2 through cli.run)."""
    # Strategy and precision: before any variable exists.
    machinery = start(f)
    strategy = machinery.strategy

    # Data.
    skipped_files = SkippedFiles()  # the distinct files --skip_corrupt skipped, counted at the end
    with cli.setup_errors(f"--dataset={f.dataset}"):
        train_info = task.dataset_info(f, f.train_split)
        eval_info = task.dataset_info(f, f.eval_split) if f.eval_split else train_info
    tasks.check_same_classes(
        eval_info.class_names, train_info.class_names,
        expected_label=f"--eval_split={f.eval_split!r} has",
        found_label=f"--train_split={f.train_split!r} has",
        consequence=": labels would not line up.",
    )
    class_names = train_info.class_names
    epoch_steps = steps_per_epoch(f, train_info.num_examples, f.train_split)
    # What the data's files tell before the first step: problems (one line), and the values resolved from
    # them (e.g. segmentation's evaluation size), used in place of their flags and recorded in run.json.
    with cli.setup_errors(f"--dataset={f.dataset}"):
        resolved = task.preflight(f)
    for name, value in resolved.items():
        setattr(f, name, value)

    def input_fn(split, training):
        return lambda context: task.make_dataset(
            f, split=split, training=training, input_context=context, skipped_files=skipped_files
        )

    with cli.setup_errors(f"--dataset={f.dataset}"):
        train_iterator = iter(strategy.distribute_datasets_from_function(input_fn(f.train_split, True)))
        eval_dataset = (
            strategy.distribute_datasets_from_function(input_fn(f.eval_split, False))
            if f.eval_split
            else None
        )

    # Model: pretrained weights first (a model loaded outside the strategy's scope is only read).
    weights_from = task.initial_weights(f)
    with strategy.scope():
        model = task.build_model(f, num_classes=len(class_names), weights_from=weights_from)
        del weights_from
        options = task.train_options(f, model=model, num_classes=len(class_names))
        # Optimizer and schedule.
        optimizer, step_var = build_optimizer(
            f, steps_per_epoch=epoch_steps, variables=model.trainable_variables
        )
        # Beyond the paper: weight EMA and the best epoch's model.
        ema = WeightEMA(model, f.ema_decay) if f.ema_decay else None  # in the checkpoints: exact --resume
        keep_best = best_model.KeepBest(
            f.keep_best, metrics=task.BEST_METRICS, model=model, chief=machinery.chief, step_var=step_var,
            save=lambda m: run_dir.save_model(
                task.final_model(f, m, num_classes=len(class_names)), f.model_dir, run_dir.BEST_MODEL_FILE
            ),
            steps_per_epoch=epoch_steps, sync_bn=getattr(f, "sync_bn", False),
        ) if f.keep_best else None
    state = loop.RunState(task.CSV_COLUMNS)  # the run's total training time and last epoch's logs

    # Restore.
    manager = loop.checkpoint_manager(
        machinery.write_dir,
        keep=f.keep_checkpoints,
        model=model,
        optimizer=optimizer,
        step=step_var,
        # Dropout and stochastic depth masks: exact --resume.
        **loop.seed_generator_states(model, loop.latest_checkpoint(f.model_dir) if f.resume else None),
        **state.checkpointed(),
        **skipped_files.checkpointed(),
        **({"ema": ema} if ema is not None else {}),
        **(keep_best.checkpointed() if keep_best is not None else {}),
    )
    evaluate = task.make_evaluator(f, strategy, model, class_names) if eval_dataset is not None else None
    if evaluate is not None and keep_best is not None:
        evaluate = keep_best.wrap(evaluate)  # inside the EMA swap below: scores and saves the averages
    if evaluate is not None and ema is not None:
        evaluate = evaluated_with_averages(evaluate, ema)  # the epoch's val_* are the averages' scores

    def evaluation_details():
        """final_metrics.json's `val_<name>` of the evaluator's last call (e.g. per-class AP or IoU)."""
        details = getattr(evaluate, "details", None) or {}
        return {f"val_{key}": value for key, value in details.items()}

    def restored_evaluation_details():
        # The checkpoint holds the last epoch's logs but not the evaluator's details: the restored model is
        # evaluated again (the same weights and data give the same numbers).
        if getattr(evaluate, "details", None) is not None:
            evaluate(eval_dataset)
        return evaluation_details()

    if restore(f, manager, optimizer=optimizer, step_var=step_var, steps_per_epoch=epoch_steps):
        # Nothing left to train.
        if ema is not None:
            ema.swap()  # the averaged weights are the run's model
        finish_trained_run(
            f, machinery=machinery, model=task.final_model(f, model, num_classes=len(class_names)),
            state=state, step_var=step_var, extra_metrics=restored_evaluation_details,
        )
        return
    if machinery.chief:
        write_run_files(f, task=task.NAME, flags_text=flags_text, class_names=class_names, resolved=resolved)

    # Fit.
    train_function = steps.make_train_function(
        strategy,
        model,
        optimizer,
        global_batch_size=f.batch_size,
        seed=f.seed,
        jit_compile=f.jit_compile,
        grad_clip_norm=f.grad_clip_norm,
        ema=ema,
        **options.step_kwargs,
    )
    logs, wall_time_s = fit(
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
        steps_per_epoch=epoch_steps,
        state=state,
        mixup_epochs=options.mixup_epochs,
    )

    # The final model.
    if ema is not None:
        ema.swap()  # model.keras holds the averaged weights
    final = task.final_model(f, model, num_classes=len(class_names))
    extra_metrics = evaluation_details()
    if ema is not None:
        extra_metrics["weights"] = f"ema (decay {f.ema_decay})"
    if keep_best is not None:
        extra_metrics.update(keep_best.summary())
    if getattr(f, "skip_corrupt", False):
        extra_metrics["skipped_files"] = skipped_files.report()
    finish(
        f,
        machinery=machinery,
        model=final,
        logs=logs,
        step_var=step_var,
        wall_time_s=wall_time_s,
        extra_metrics=extra_metrics,
    )
