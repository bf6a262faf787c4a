"""`python -m bot_keras.train --flagfile=configs/X.flags [--flag=value ...]`: the one training command.

main() reads top to bottom in the order the parts are wired: flags → strategy and precision → data →
model → optimizer and schedule → restore → fit → export. Every trick of the paper is one flag (see the
README's flag table): Section 3.1 (linear scaling, warmup, zero-γ, no bias decay), 3.2 (fp16), Section 4
(the model), Section 5 (cosine decay, label smoothing, distillation, mixup).

One training loop for every strategy. Keras 3.15's `model.fit` fails under
`MultiWorkerMirroredStrategy` with two workers (its symbolic build calls `strategy.reduce` on a
per-replica batch), so we run our own distributed step under `strategy.run` inside a `tf.function`, with
an inner loop of `--steps_per_execution` steps. It is the pattern of TensorFlow's custom-training-loop
guide: the per-example loss is computed in float32 and divided by the *global* batch
(`tf.nn.compute_average_loss`), so the optimizer's all-reduce SUM of replica gradients is the gradient
of the global mean; `optimizer.scale_loss` gives dynamic loss scaling under mixed_float16. Keras
callbacks (progress bar, TensorBoard, CSVLogger) are driven through `keras.callbacks.CallbackList`.
"""

import importlib.util
import json
import math
import os
import shutil
import sys
import time

from absl import app, flags, logging

from bot_keras import distribute
from bot_keras.evaluate import SUM_KEYS, make_eval_function, top_k_sums

FLAGS = flags.FLAGS

# --- what to train, on what ----------------------------------------------------------------------------
flags.DEFINE_string("model", None, "Model name, e.g. resnet50_d (see bot_keras.models.MODEL_NAMES).")
flags.DEFINE_string(
    "dataset", None, "Data source: tfds:NAME[:VERSION], tfrecord:GLOB, folder:ROOT, synthetic."
)
flags.DEFINE_string("data_dir", None, "TFDS data dir; relative folder:/tfrecord: paths resolve in it.")
flags.DEFINE_string("train_split", "train", "Split to train on (TFDS split or image-folder subdirectory).")
flags.DEFINE_string("eval_split", "validation", "Split evaluated at each epoch end; empty: no evaluation.")
flags.DEFINE_bool("skip_corrupt", False, "Skip undecodable image files (each reported) instead of failing.")
flags.DEFINE_integer(
    "label_offset", None, "Subtracted from TFRecord labels (1 for TF's 1-based ImageNet shards)."
)
flags.DEFINE_integer("image_size", 224, "Training and evaluation resolution (pixels, square).")
flags.DEFINE_bool("random_crop", True, "Random-resized crop, 8-100% of the area (Sec. 2.1); off: eval crop.")
flags.DEFINE_float(
    "crop_min_area", 0.08, "Smallest area fraction of the random-resized crop (paper: 0.08)."
)
flags.DEFINE_bool("flip", True, "Random horizontal flip (Sec. 2.1).")
flags.DEFINE_bool("color_jitter", True, "Brightness, saturation and contrast jitter (Sec. 2.1).")
flags.DEFINE_bool("pca_lighting", True, "AlexNet-style PCA lighting noise (Sec. 2.1).")
flags.DEFINE_float("dropout_rate", 0.0, "Dropout before the classifier.")
flags.DEFINE_bool("zero_gamma", False, "Zero-initialise the last BN gamma of each residual block (Sec. 3.1).")
flags.DEFINE_bool("sync_bn", False, "Synchronise BatchNorm statistics across replicas.")
# --- optimisation --------------------------------------------------------------------------------------
flags.DEFINE_integer("batch_size", 256, "Global batch size (split across all replicas).")
flags.DEFINE_float("epochs", 120, "Training epochs (may be fractional).")
flags.DEFINE_float(
    "base_lr", 0.1, "Learning rate per 256 images: lr = base_lr × batch_size / 256 (Sec. 3.1)."
)
flags.DEFINE_string("lr_schedule", "step", "step | cosine | constant (Sec. 2 and 5.1).")
flags.DEFINE_list("lr_decay_epochs", ["30", "60", "90"], "Epochs where the step schedule divides the lr.")
flags.DEFINE_float("lr_decay_rate", 0.1, "Factor the step schedule multiplies the lr by at each decay epoch.")
flags.DEFINE_float("warmup_epochs", 0, "Linear warmup from 0 over this many epochs (Sec. 3.1).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (Nesterov).")
flags.DEFINE_float(
    "weight_decay", 1e-4, "Weight decay (1e-4: the paper's L2 value; decoupled needs ~1e-3 to match)."
)
flags.DEFINE_string(
    "weight_decay_mode", "decoupled", "decoupled (w -= lr·wd·w) | l2 (wd·w added to the grad)."
)
flags.DEFINE_bool("no_bias_decay", False, "Exclude biases and BN gamma/beta from weight decay (Sec. 3.1).")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing epsilon (Sec. 5.2).")
flags.DEFINE_float("mixup_alpha", 0.0, "Mixup Beta(alpha, alpha); 0 turns mixup off (Sec. 5.4).")
flags.DEFINE_integer("mixup_off_epochs", 0, "Train the last N epochs without mixup.")
flags.DEFINE_string(
    "teacher", "", "Distillation teacher: a .keras file, a SavedModel dir, or NAME:WEIGHTS (Sec. 5.3)."
)
flags.DEFINE_float("distill_temperature", 20.0, "Distillation temperature T (Sec. 5.3).")
flags.DEFINE_float(
    "distill_hard_weight", None, "Weight w of the hard loss, (w, 1-w) form; unset: the paper's 1:1."
)
# --- machinery -----------------------------------------------------------------------------------------
flags.DEFINE_string("precision", "float32", "float32 | mixed_float16 | mixed_bfloat16.")
flags.DEFINE_string("strategy", "default", "default | mirrored | multi_worker_mirrored | tpu.")
flags.DEFINE_string("tpu", "", "TPU address for --strategy=tpu (empty: local TPU VM).")
flags.DEFINE_string(
    "model_dir", None, "Run directory (flags.txt, classes.txt, checkpoints/, logs/, model.keras)."
)
flags.DEFINE_bool("resume", False, "Continue from the last checkpoint in --model_dir.")
flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, augmentation, mixup).")
flags.DEFINE_integer("steps_per_execution", 1, "Training steps per tf.function call.")
flags.DEFINE_integer("checkpoint_steps", 1000, "Also checkpoint every N steps (0: only at epoch ends).")
flags.DEFINE_integer("keep_checkpoints", 3, "How many checkpoints to keep.")
flags.DEFINE_integer("steps_per_epoch", 0, "Override the steps per epoch (0: training examples // batch).")
flags.DEFINE_integer("max_steps", 0, "Stop after this many steps in total (0: no limit); for smoke runs.")
flags.DEFINE_integer("verbose", 1, "0: quiet, 1: progress bar, 2: one line per epoch.")

# Every flag this module defines, in definition order: what `flags.txt` records so that the run can be
# reproduced or resumed from it (derived, so that a new flag cannot be forgotten).
CONTRACT_FLAGS = tuple(flag.name for flag in FLAGS.get_key_flags_for_module(__name__))


class FlagError(ValueError):
    """A flag value that cannot work; the message names the flag and echoes the value."""


def validate_flags(f):
    """Checks what can be checked before data or models are touched; raises FlagError listing all."""
    from bot_keras.data.sources import parse_source
    from bot_keras.models import MODEL_NAMES, RESNET_NAMES
    from bot_keras.schedules import SCHEDULE_NAMES

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
    need(f.lr_schedule in SCHEDULE_NAMES, f"--lr_schedule={f.lr_schedule!r} is not one of {SCHEDULE_NAMES}.")
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
    need(f.weight_decay >= 0, f"--weight_decay={f.weight_decay} must be >= 0.")
    need(
        f.weight_decay_mode in ("decoupled", "l2"),
        f"--weight_decay_mode={f.weight_decay_mode!r} is not decoupled or l2.",
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
        name, sep, weights = f.teacher.partition(":")
        if sep and name in MODEL_NAMES:  # NAME:WEIGHTS
            need(os.path.exists(weights), f"--teacher={f.teacher!r}: no weights file {weights!r}.")
        else:  # a path, which may itself hold a ':'
            need(os.path.exists(f.teacher), f"--teacher={f.teacher!r}: no such file or directory.")
    if f.model_dir:
        checkpoint_dir = os.path.join(f.model_dir, "checkpoints")
        has_files = os.path.isdir(f.model_dir) and bool(os.listdir(f.model_dir))
        if f.resume:
            need(
                _latest_checkpoint(checkpoint_dir) is not None,
                f"--resume: no checkpoint in {checkpoint_dir!r} to continue from.",
            )
        else:
            need(
                not has_files,
                f"--model_dir={f.model_dir!r} already holds a run; pass --resume to continue it, or choose "
                "another directory (runs are never overwritten).",
            )
    if problems:
        raise FlagError("\n".join(problems))


def _latest_checkpoint(checkpoint_dir):
    import tensorflow as tf

    return tf.train.latest_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None


def resolved_flags_text(f):
    """The flags of this module as a flagfile (`--name=value` lines) that reproduces the run."""
    lines = []
    for name in CONTRACT_FLAGS:
        flag = f[name]
        if flag.value is None:
            continue
        if name == "resume":
            continue  # a flagfile describes a run, not whether this invocation continued it
        lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


# --- distillation teacher ------------------------------------------------------------------------------


def load_teacher(spec, *, num_classes, image_size):
    """The frozen teacher of Section 5.3: a `.keras` file, a SavedModel directory, or `NAME:WEIGHTS`.

    Returns a callable `images -> float32 logits`; errors name the file and the mismatch.
    """
    import keras
    import tensorflow as tf

    from bot_keras.models import MODEL_NAMES, build_model

    name, sep, weights = spec.partition(":")
    if sep and name in MODEL_NAMES and not os.path.exists(spec):

        teacher = build_model(name, num_classes=num_classes, input_shape=(image_size, image_size, 3))
        try:
            teacher.load_weights(weights)
        except Exception as error:  # noqa: BLE001 - any failure to read is reported with the file name
            raise FlagError(
                f"--teacher={spec!r}: cannot load weights {weights!r} into {name}: {error}"
            ) from None
    elif os.path.isdir(spec) and not spec.endswith(".keras"):
        try:
            loaded = tf.saved_model.load(spec)
        except Exception as error:  # noqa: BLE001
            raise FlagError(f"--teacher={spec!r} is not a readable SavedModel: {error}") from None
        teacher = (
            keras.layers.TFSMLayer(spec, call_endpoint="serving_default") if not callable(loaded) else loaded
        )
    else:
        try:
            teacher = keras.models.load_model(spec, compile=False)
        except Exception as error:  # noqa: BLE001
            raise FlagError(f"--teacher={spec!r} is not a readable Keras model: {error}") from None
    if isinstance(teacher, keras.Model):
        teacher.trainable = False
        classes = teacher.output_shape[-1]
        size = tuple(teacher.input_shape[1:3])
    else:
        try:
            probe = teacher(tf.zeros((1, image_size, image_size, 3)))
        except Exception as error:  # noqa: BLE001 - any signature mismatch is reported with the file name
            raise FlagError(
                f"--teacher={spec!r}: its serving signature does not take normalised float32 "
                f"[N, {image_size}, {image_size}, 3] images (a bot_keras.export SavedModel takes image bytes "
                "and preprocesses itself; pass the teacher run's model.keras instead): "
                f"{str(error).splitlines()[0]}"
            ) from None
        probe = next(iter(probe.values())) if isinstance(probe, dict) else probe
        classes, size = probe.shape[-1], (None, None)
    if classes != num_classes:
        raise FlagError(f"--teacher={spec!r} predicts {classes} classes; the dataset has {num_classes}.")
    if None not in size and size != (image_size, image_size):
        raise FlagError(f"--teacher={spec!r} takes {size[0]}x{size[1]} images; --image_size={image_size}.")
    return teacher


def _teacher_logits(teacher, images):
    import keras
    import tensorflow as tf

    if isinstance(teacher, keras.Model):
        out = teacher(images, training=False)
    else:
        out = teacher(images)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return tf.stop_gradient(tf.cast(out, tf.float32))


# --- the distributed steps ------------------------------------------------------------------------------


def make_train_function(
    strategy, model, optimizer, *, per_example_loss, global_batch_size, teacher=None, mixup_alpha=0.0, seed=0
):
    """Returns `train_steps(iterator, start_step, num_steps, mixup_on) -> sums over the steps`.

    `per_example_loss(labels, logits, teacher_logits)` returns float32 `[B]`. Each replica mixes its own
    batch with its own λ (Section 5.4: one λ a batch; the partner of example i is example B-1-i), the
    teacher (if any) sees the same mixed batch in inference mode, and the loss is divided by the global
    batch so that the all-reduced SUM of replica gradients is the gradient of the global mean.
    """
    import keras
    import tensorflow as tf

    if mixup_alpha > 0:
        from bot_keras.data import mixup as mixup_ops

    agree_on_overflow = (
        isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and strategy.num_replicas_in_sync > 1
    )

    def replica_step(batch, step, mixup_on):
        images, labels = batch
        if mixup_alpha > 0:
            # A different λ on every replica and step: stateless seed (run seed, step·1024 + replica).
            replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
            lam_seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64) * 1024 + replica])
            lam = mixup_ops.sample_mixup_lambda(mixup_alpha, seed=lam_seed)
            lam = tf.where(mixup_on, lam, 1.0)
            images, labels = mixup_ops.mixup(images, labels, lam)
        teacher_logits = _teacher_logits(teacher, images) if teacher is not None else None
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            losses = per_example_loss(labels, logits, teacher_logits)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n([tf.cast(x, tf.float32) for x in model.losses])
                )
            scaled_loss = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        if agree_on_overflow:
            grads = _poison_if_any_replica_overflowed(grads)
        optimizer.apply(grads, model.trainable_variables)
        return top_k_sums(losses, labels, logits)

    @tf.function
    def train_steps(iterator, start_step, num_steps, mixup_on):
        totals = tf.zeros([len(SUM_KEYS)])
        for i in tf.range(num_steps):
            per_replica = strategy.run(
                replica_step, args=(next(iterator), start_step + tf.cast(i, tf.int64), mixup_on)
            )
            totals += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return totals

    return train_steps


def _poison_if_any_replica_overflowed(grads):
    """Makes every replica's gradients non-finite when any replica's are (dynamic loss scaling).

    Keras' LossScaleOptimizer checks the *local* gradients for inf/NaN before its inner optimizer
    all-reduces them, and under MirroredStrategy it takes replica 0's verdict for all: an overflow on
    another replica is then summed into every weight (measured: NaN weights, loss scale unchanged). One
    scalar all-reduce of the non-finite count makes all replicas skip the step and halve the scale.
    """
    import tensorflow as tf

    local = [tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in grads if g is not None]
    bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.add_n(local))
    poison = tf.where(bad > 0, float("nan"), 0.0)
    return [None if g is None else g + tf.cast(poison, g.dtype) for g in grads]


def make_per_example_loss(*, label_smoothing, temperature, hard_weight):
    """`(labels, logits, teacher_logits) -> float32 [B]`: Section 5.2's smoothed CE, or 5.3's distillation.

    Smoothing applies to the (possibly mixed) one-hot labels; smoothing is linear in the labels, so this
    equals mixing already-smoothed labels (Section 5.4's order).
    """
    from bot_keras import losses

    cross_entropy = losses.classification_loss(label_smoothing)

    def per_example_loss(labels, logits, teacher_logits):
        if teacher_logits is None:
            return cross_entropy.call(labels, logits)  # `call`: one value per example, no reduction
        return losses.distillation_loss(
            labels=labels,
            student_logits=logits,
            teacher_logits=teacher_logits,
            temperature=temperature,
            hard_weight=hard_weight,
            label_smoothing=label_smoothing,
            reduction="none",
        )

    return per_example_loss


# --- the loop -------------------------------------------------------------------------------------------


def make_callbacks(run_dir, *, chief, verbose, epochs, steps_per_epoch, model, resume):
    """Progress bar, TensorBoard and a CSV log (fixed columns, so mixup epochs show NA for accuracy)."""
    import keras

    class FixedColumnsCSVLogger(keras.callbacks.CSVLogger):
        columns = ["loss", "top1", "top5", "lr", "images_per_sec", "val_loss", "val_top1", "val_top5"]

        def on_epoch_end(self, epoch, logs=None):
            self.keys = list(self.columns)
            super().on_epoch_end(epoch, logs)

    callbacks = []
    if chief:
        log_dir = os.path.join(run_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        if importlib.util.find_spec("tensorboard") is not None:

            class TensorBoard(keras.callbacks.TensorBoard):
                def _collect_learning_rate(self, logs):
                    return logs  # our logs carry "lr"; Keras' version reads a compiled model's optimizer

            callbacks.append(TensorBoard(log_dir, write_graph=False, profile_batch=0))
        else:  # a dependency of bot-keras, but not of TensorFlow 2.21; the CSV log has the same numbers
            logging.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard logs.")
        callbacks.append(FixedColumnsCSVLogger(os.path.join(log_dir, "training.csv"), append=resume))
    return keras.callbacks.CallbackList(
        callbacks,
        add_progbar=chief and verbose > 0,
        model=model,
        verbose=verbose if chief else 0,
        epochs=epochs,
        steps=steps_per_epoch,
    )


def train_loop(
    *,
    strategy,
    model,
    optimizer,
    train_function,
    train_iterator,
    evaluate,
    eval_dataset,
    checkpoint,
    manager,
    step_var,
    callbacks,
    steps_per_epoch,
    epochs,
    global_batch_size,
    steps_per_execution,
    checkpoint_steps,
    max_steps,
    mixup_epochs,
    precision,
):
    """Runs from `step_var` to the end; checkpoints every `checkpoint_steps` and at each epoch end.

    Returns the last epoch's logs. Raises FloatingPointError on a non-finite loss.
    """
    import numpy as np
    import tensorflow as tf

    from bot_keras.schedules import training_steps

    total_steps = training_steps(epochs, steps_per_epoch)
    if max_steps:
        total_steps = min(total_steps, max_steps)
    step = int(step_var.numpy())
    logs, traced = {}, False
    callbacks.on_train_begin()
    while step < total_steps:
        epoch = step // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        mixup_on = epoch < mixup_epochs
        callbacks.on_epoch_begin(epoch)
        totals, timed_steps = np.zeros(len(SUM_KEYS)), 0
        start_time = time.perf_counter()
        while step < epoch_end:
            n = min(steps_per_execution, epoch_end - step)
            if checkpoint_steps:
                n = min(n, checkpoint_steps - step % checkpoint_steps)
            callbacks.on_train_batch_begin(step - epoch * steps_per_epoch)
            sums = train_function(
                train_iterator, tf.constant(step, tf.int64), tf.constant(n), tf.constant(mixup_on)
            )
            sums = sums.numpy()
            step += n
            if traced:
                timed_steps += n
            else:  # images/s leaves out the first call, which traces and compiles the step
                traced, start_time = True, time.perf_counter()
            step_var.assign(step)
            lr = last_learning_rate(optimizer)
            if not np.isfinite(sums[0]):
                where = f"at step {step}" if n == 1 else f"in steps {step - n + 1}-{step}"
                raise FloatingPointError(
                    f"Non-finite training loss ({sums[0] / sums[3]}) {where} (epoch {epoch}), "
                    f"--precision={precision}, learning rate {lr:.6g}; lower --base_lr or add "
                    "--warmup_epochs."
                )
            totals += sums
            images_per_sec = timed_steps * global_batch_size / max(time.perf_counter() - start_time, 1e-9)
            logs = _train_logs(totals, mixup_on, lr, images_per_sec)
            callbacks.on_train_batch_end(step - epoch * steps_per_epoch - 1, logs)
            if checkpoint_steps and step % checkpoint_steps == 0 and step < epoch_end:
                manager.save(checkpoint_number=step)
        if evaluate is not None:
            result = evaluate(eval_dataset)
            logs.update({f"val_{k}": result[k] for k in ("loss", "top1", "top5")})
        manager.save(checkpoint_number=step)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end(logs)
    return logs


def last_learning_rate(optimizer):
    """The learning rate of the last update (Keras' `optimizer.learning_rate` is the next update's)."""
    import keras

    inner = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = getattr(inner, "_learning_rate", None)  # Keras 3 keeps the schedule object here
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(schedule(max(int(inner.iterations.numpy()) - 1, 0)))
    return float(optimizer.learning_rate)


def _train_logs(totals, mixup_on, lr, images_per_sec):
    count = max(totals[3], 1.0)
    logs = {"loss": totals[0] / count}
    if not mixup_on:  # accuracy against mixed labels is not accuracy (Section 5.4)
        logs.update(top1=totals[1] / count, top5=totals[2] / count)
    logs.update(lr=lr, images_per_sec=images_per_sec)
    return logs


# --- main -----------------------------------------------------------------------------------------------


def main(argv):
    del argv
    try:
        validate_flags(FLAGS)
    except FlagError as error:
        fail(str(error))
    import keras
    import tensorflow as tf

    if not FLAGS["verbosity"].present:  # TensorFlow's INFO lines (checkpoint sharding) break the progress bar
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")
    from bot_keras import optimizers, schedules
    from bot_keras.data import Augmentation, dataset_info, make_dataset, write_class_names
    from bot_keras.models import build_model

    # Set-up errors (a missing folder or split, a TF_CONFIG that does not parse, a teacher that does not
    # fit) are the user's input: report them in one line, not as a traceback from deep inside TensorFlow.
    try:
        # Strategy and precision: before any variable exists.
        strategy = distribute.create_strategy(FLAGS.strategy, tpu_address=FLAGS.tpu)
        distribute.per_replica_batch_size(FLAGS.batch_size, strategy.num_replicas_in_sync)
        distribute.set_precision(FLAGS.precision)
        keras.utils.set_random_seed(FLAGS.seed)
        chief = distribute.is_chief(strategy)
        write_dir = distribute.worker_dir(FLAGS.model_dir, strategy)

        # Data. Every read of the source names the same directory, label offset and corrupt-file policy.
        source = dict(
            data_dir=FLAGS.data_dir, label_offset=FLAGS.label_offset, skip_corrupt=FLAGS.skip_corrupt
        )
        train_info = dataset_info(FLAGS.dataset, split=FLAGS.train_split, **source)
        steps_per_epoch = FLAGS.steps_per_epoch or train_info.num_examples // FLAGS.batch_size
        if FLAGS.eval_split:
            eval_info = dataset_info(FLAGS.dataset, split=FLAGS.eval_split, **source)
            if list(eval_info.class_names) != list(train_info.class_names):
                fail(
                    f"--eval_split={FLAGS.eval_split!r} has {eval_info.num_classes} classes "
                    f"({', '.join(eval_info.class_names[:5])}, ...) but --train_split={FLAGS.train_split!r} "
                    f"has {train_info.num_classes} ({', '.join(train_info.class_names[:5])}, ...): labels "
                    "would not line up."
                )
        if steps_per_epoch < 1:
            fail(
                f"--batch_size={FLAGS.batch_size} is larger than the {train_info.num_examples} examples of "
                f"--train_split={FLAGS.train_split!r}."
            )

        def train_input(context):
            return make_dataset(
                FLAGS.dataset,
                split=FLAGS.train_split,
                image_size=FLAGS.image_size,
                global_batch_size=FLAGS.batch_size,
                training=True,
                input_context=context,
                seed=FLAGS.seed,
                augmentation=Augmentation(
                    random_crop=FLAGS.random_crop,
                    crop_area_range=(FLAGS.crop_min_area, 1.0),
                    flip=FLAGS.flip,
                    color_jitter=FLAGS.color_jitter,
                    pca_lighting=FLAGS.pca_lighting,
                ),
                **source,
            )

        def eval_input(context):
            return make_dataset(
                FLAGS.dataset,
                split=FLAGS.eval_split,
                image_size=FLAGS.image_size,
                global_batch_size=FLAGS.batch_size,
                training=False,
                input_context=context,
                **source,
            )

        train_iterator = iter(strategy.distribute_datasets_from_function(train_input))
        eval_dataset = strategy.distribute_datasets_from_function(eval_input) if FLAGS.eval_split else None

        with strategy.scope():
            # Model.
            model = build_model(
                FLAGS.model,
                num_classes=train_info.num_classes,
                input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
                zero_gamma=FLAGS.zero_gamma,
                dropout_rate=FLAGS.dropout_rate,
            )
            set_synchronized_batch_norm(model, FLAGS.sync_bn)
            teacher = (
                load_teacher(FLAGS.teacher, num_classes=train_info.num_classes, image_size=FLAGS.image_size)
                if FLAGS.teacher
                else None
            )
            # Optimizer and schedule.
            schedule = schedules.build_lr_schedule(
                FLAGS.lr_schedule,
                base_lr=FLAGS.base_lr,
                global_batch_size=FLAGS.batch_size,
                steps_per_epoch=steps_per_epoch,
                epochs=FLAGS.epochs,
                warmup_epochs=FLAGS.warmup_epochs,
                decay_epochs=[float(e) for e in FLAGS.lr_decay_epochs],
                decay_rate=FLAGS.lr_decay_rate,
            )
            optimizer = optimizers.build_optimizer(
                schedule,
                momentum=FLAGS.momentum,
                nesterov=True,
                weight_decay=FLAGS.weight_decay,
                weight_decay_mode=FLAGS.weight_decay_mode,
                no_bias_decay=FLAGS.no_bias_decay,
            )
            if distribute.needs_loss_scaling(FLAGS.precision):
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
            step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")

    except (FlagError, ValueError, OSError) as error:
        fail(str(error))

    # Restore.
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    checkpoint_dir = os.path.join(write_dir, "checkpoints")
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=FLAGS.keep_checkpoints)
    if FLAGS.resume:
        path = _latest_checkpoint(os.path.join(FLAGS.model_dir, "checkpoints"))
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            fail(
                f"--resume: {path} does not fit this model and optimizer (were --model, --precision or the "
                f"dataset's classes changed?): {str(error).splitlines()[0]}"
            )
        restored = int(step_var.numpy())
        print(
            f"Resumed from {path} at step {restored} (epoch {restored // steps_per_epoch}), learning rate "
            f"{float(optimizer.learning_rate):.6g}{_loss_scale_text(optimizer)}",
            flush=True,
        )
    if chief:
        os.makedirs(FLAGS.model_dir, exist_ok=True)
        with open(os.path.join(FLAGS.model_dir, "flags.txt"), "w") as f:
            f.write(resolved_flags_text(FLAGS))
        write_class_names(os.path.join(FLAGS.model_dir, "classes.txt"), train_info.class_names)

    # Fit.
    per_example_loss = make_per_example_loss(
        label_smoothing=FLAGS.label_smoothing,
        temperature=FLAGS.distill_temperature,
        hard_weight=FLAGS.distill_hard_weight,
    )
    train_function = make_train_function(
        strategy,
        model,
        optimizer,
        per_example_loss=per_example_loss,
        global_batch_size=FLAGS.batch_size,
        teacher=teacher,
        mixup_alpha=FLAGS.mixup_alpha,
        seed=FLAGS.seed,
    )
    evaluate = make_eval_function(strategy, model) if eval_dataset is not None else None
    callbacks = make_callbacks(
        write_dir,
        chief=chief,
        verbose=FLAGS.verbose,
        epochs=int(math.ceil(FLAGS.epochs)),
        steps_per_epoch=min(steps_per_epoch, FLAGS.max_steps or steps_per_epoch),  # the progress bar's end
        model=model,
        resume=FLAGS.resume,
    )
    mixup_epochs = int(math.ceil(FLAGS.epochs)) - FLAGS.mixup_off_epochs if FLAGS.mixup_alpha else 0
    start = time.perf_counter()
    logs = train_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        train_function=train_function,
        train_iterator=train_iterator,
        evaluate=evaluate,
        eval_dataset=eval_dataset,
        checkpoint=checkpoint,
        manager=manager,
        step_var=step_var,
        callbacks=callbacks,
        steps_per_epoch=steps_per_epoch,
        epochs=FLAGS.epochs,
        global_batch_size=FLAGS.batch_size,
        steps_per_execution=FLAGS.steps_per_execution,
        checkpoint_steps=FLAGS.checkpoint_steps,
        max_steps=FLAGS.max_steps,
        mixup_epochs=mixup_epochs,
        precision=FLAGS.precision,
    )

    # Export: the student alone (no teacher, no optimizer), per-replica BN config, next to its class list.
    set_synchronized_batch_norm(model, False)
    if chief:
        model.save(os.path.join(FLAGS.model_dir, "model.keras"))
        summary = {k: float(v) for k, v in logs.items()}
        summary.update(step=int(step_var.numpy()), wall_time_s=time.perf_counter() - start)
        with open(os.path.join(FLAGS.model_dir, "final_metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"Finished: {json.dumps({k: round(v, 4) for k, v in summary.items()})}", flush=True)
        print(f"Run directory: {FLAGS.model_dir}", flush=True)
    else:
        shutil.rmtree(write_dir, ignore_errors=True)


def fail(message):
    """Exits with status 2 and the message alone (absl's UsageError would print every flag's help first)."""
    print(f"bot_keras.train: error:\n{message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _loss_scale_text(optimizer):
    scale = getattr(optimizer, "dynamic_scale", None)
    return f", loss scale {float(scale.numpy()):g}" if scale is not None else ""


def set_synchronized_batch_norm(model, synchronized):
    """`--sync_bn`: every BatchNormalization of `model` computes global-batch statistics across replicas.

    Keras reads `synchronized` at call time, so switching it after the build converts the model in place.
    """
    import keras

    def all_layers(parent):  # nested models (e.g. a wrapped backbone) included
        for layer in getattr(parent, "layers", []):
            yield layer
            yield from all_layers(layer)

    count = 0
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized
            count += 1
    return count


def run():
    import tensorflow as tf

    try:
        app.run(main)
    except FloatingPointError as error:
        print(f"Training stopped: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    except tf.errors.InvalidArgumentError as error:
        # The input pipeline's checks (pipeline.py) name the file of an undecodable image or the record of
        # an out-of-range label; that message is what the user needs, not TensorFlow's stack.
        lines = [line.strip() for line in (error.message or str(error)).splitlines() if line.strip()]
        ours = [line for line in lines if "Undecodable image" in line or "Label out of range" in line]
        message = "\n".join(ours or lines[-3:])
        print(f"Training stopped by bad input data: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
