"""The host side of training: checkpoints and resume, the step loop, and the Keras callbacks it drives.

Kept apart from `steps.py` (graph code that runs per replica) because this is eager Python bookkeeping
that works with any step function: `train_loop` calls `train_function(iterator, start_step, num_steps,
mixup_on) -> {name: sum}` (e.g. `steps.make_train_function`'s) in chunks of `steps_per_execution` that
never cross an epoch end or a checkpoint, logs the means through `keras.callbacks.CallbackList`
(progress bar, TensorBoard, CSVLogger), evaluates at each epoch end and saves checkpoints. A
fine-tuning command reuses it with its own step, metrics and evaluation.

A checkpoint holds, besides the model, optimizer and step, the model's dropout seed states
(`seed_generator_states`) and a `RunState`: the training time so far and the last epoch's logs. So a
resumed run reports its total wall time, and a run killed after its last checkpoint (e.g. during the final
save) can still write complete final metrics on `--resume`.
"""

import contextlib
import csv
import importlib.util
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bot_keras import atomic_write, run_dir
from bot_keras.cli import Preempted, SetupError
from bot_keras.schedules import training_steps

# The CSV log's columns, fixed so that mixup epochs show NA for accuracy.
CSV_COLUMNS = ("loss", "top1", "top5", "lr", "images_per_sec", "val_loss", "val_top1", "val_top5")


# --- checkpoints ----------------------------------------------------------------------------------------


def latest_checkpoint(model_dir):
    """The newest checkpoint of the run in `model_dir`, or None."""
    directory = os.path.join(model_dir, run_dir.CHECKPOINTS_DIR)
    return tf.train.latest_checkpoint(directory) if os.path.isdir(directory) else None


def checkpoint_step(model_dir):
    """The step of the newest checkpoint of `model_dir` (what `--resume` continues from), read from its
    name (`manager.save(checkpoint_number=step)`); 0 without one."""
    path = latest_checkpoint(model_dir)
    return int(path.rsplit("-", 1)[1]) if path else 0


def checkpoint_manager(write_dir, *, keep, **objects):
    """A `tf.train.CheckpointManager` of `objects` (e.g. model=, optimizer=, step=) in
    `write_dir/checkpoints`, keeping the last `keep`."""
    checkpoint = tf.train.Checkpoint(**objects)
    directory = os.path.join(write_dir, run_dir.CHECKPOINTS_DIR)
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)


def seed_generator_states(model, resume_from=None):
    """The states of `model`'s Keras seed generators as `checkpoint_manager` keyword arguments (none for
    a model without). `keras.layers.Dropout` (the classifier's `--dropout_rate`, stochastic depth's
    `--drop_path_rate`, a segmentation head's dropout) draws each call's mask from a
    `keras.random.SeedGenerator` whose state advances every call and which the model's own checkpoint
    leaves out: saved beside it, a resumed run draws the masks the uninterrupted run would.

    `resume_from`: the checkpoint `--resume` will restore. One written before these states were saved
    holds none; it is still restored, with fresh generators (said in one line), instead of refused."""
    states = [v for v in model.variables if v.name == "seed_generator_state"]
    if not states:
        return {}
    if resume_from and not any(
        name.startswith("seed_generators/") for name, _ in tf.train.list_variables(resume_from)
    ):
        print(f"{resume_from} holds no dropout-mask generator states (written by an older bot_keras): the "
              "resumed run draws fresh masks, so its weights will not equal an uninterrupted run's.",
              flush=True)
        return {}
    seed_generators = tf.Module(name="seed_generators")
    seed_generators.states = states  # (a tf.Module tracks the list, so the checkpoint holds each state)
    return {"seed_generators": seed_generators}


def save_checkpoint(manager, step):
    """`manager.save(checkpoint_number=step)`; a write that fails (a full disk: ENOSPC, EIO, as an OSError
    or TensorFlow's error) removes the half-written `ckpt-<step>` files and raises `atomic_write.write_error`.
    The `checkpoint` index is written last, so it still names the previous checkpoint, which `--resume`
    uses."""
    try:
        manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as error:
        prefix = os.path.join(manager.directory, f"ckpt-{step}")
        for path in tf.io.gfile.glob(prefix + ".*") + tf.io.gfile.glob(prefix + "_temp*"):
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)
        raise atomic_write.write_error(prefix, error) from None


def restore_latest(manager, model_dir):
    """Restores the newest checkpoint of `model_dir` into the manager's objects; returns its path. A
    checkpoint that does not fit (another model, precision or class count) is a SetupError."""
    path = latest_checkpoint(model_dir)
    if path is None:
        raise SetupError(f"--resume: no checkpoint in {os.path.join(model_dir, run_dir.CHECKPOINTS_DIR)!r}.")
    try:
        manager.checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise SetupError(
            f"--resume: {path} does not fit this model and optimizer (were --model, --precision or the "
            f"dataset's classes changed?): {str(error).splitlines()[0]}"
        ) from None
    return path


class RunState:
    """The run's bookkeeping that travels in its checkpoints (module docstring): `wall_time_s`, the
    training time of every process of the run up to the checkpoint, and `epoch_logs`, the last finished
    epoch's logs in `columns` order (the run's CSV columns; NaN: not logged, e.g. accuracy under mixup)."""

    def __init__(self, columns=CSV_COLUMNS):
        self.columns = tuple(columns)
        self.wall_time_s = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="wall_time_s")
        self.epoch_logs = tf.Variable(
            np.full(len(self.columns), np.nan), dtype=tf.float64, trainable=False, name="epoch_logs"
        )

    def checkpointed(self):
        """The objects to add to a `tf.train.Checkpoint` (keyword arguments of `checkpoint_manager`)."""
        return {"wall_time_s": self.wall_time_s, "epoch_logs": self.epoch_logs}

    def record_epoch(self, logs):
        self.epoch_logs.assign([float(logs.get(name, np.nan)) for name in self.columns])

    def logs(self):
        """The last finished epoch's logs as `train_loop` returned them."""
        values = self.epoch_logs.numpy()
        return {name: float(v) for name, v in zip(self.columns, values, strict=True) if np.isfinite(v)}


def total_steps(epochs, steps_per_epoch, max_steps):
    """The step a run of `epochs` (fractional allowed) ends at, `max_steps` (0: no limit) capping it."""
    total = training_steps(epochs, steps_per_epoch)
    return min(total, max_steps) if max_steps else total


# --- the loop -------------------------------------------------------------------------------------------


def make_callbacks(write_dir, *, chief, verbose, epochs, steps_per_epoch, model, resume, columns=CSV_COLUMNS):
    """Progress bar, TensorBoard and a CSV log with `columns` in `write_dir/logs` (the chief only)."""
    callbacks = []
    if chief:
        log_dir = os.path.join(write_dir, run_dir.LOGS_DIR)
        os.makedirs(log_dir, exist_ok=True)
        if importlib.util.find_spec("tensorboard") is not None:
            callbacks.append(_TensorBoardLog(log_dir))
        else:  # a dependency of bot-keras, but not of TensorFlow 2.21; the CSV log has the same numbers
            logging.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard logs.")
        callbacks.append(
            _CSVLog(os.path.join(log_dir, "training.csv"), columns=columns, append=resume)
        )
    return keras.callbacks.CallbackList(
        callbacks,
        add_progbar=chief and verbose > 0,
        model=model,
        verbose=verbose if chief else 0,
        epochs=epochs,
        steps=steps_per_epoch,
    )


class _CSVLog(keras.callbacks.Callback):
    """One row an epoch, `epoch` then `columns` ("NA" where the logs lack one), as Keras' CSVLogger writes
    them; unlike it, the columns are fixed up front (Keras' takes the first epoch's keys, and mixup epochs
    log fewer). A resumed run appends, with a header only in an empty file."""

    def __init__(self, filename, *, columns, append=False):
        super().__init__()
        self.filename, self.columns, self.append = filename, ["epoch", *columns], append
        self._file = self._writer = None

    def on_train_begin(self, logs=None):
        header = not (self.append and os.path.isfile(self.filename) and os.path.getsize(self.filename))
        self._file = open(self.filename, "a" if self.append else "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        if header:
            self._writer.writeheader()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {}, epoch=epoch)
        self._writer.writerow({name: logs.get(name, "NA") for name in self.columns})
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None


class _TensorBoardLog(keras.callbacks.Callback):
    """Each epoch's logs as TensorBoard scalars, laid out as Keras' TensorBoard callback does
    (`epoch_<name>` in `train/`, the `val_` ones in `validation/`, step = epoch). Keras' own reads the
    learning rate from a compiled model's optimizer, which this loop does not compile; our logs carry it
    as "lr"."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir, self._writers = log_dir, {}

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            split, key = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
            if split not in self._writers:
                self._writers[split] = tf.summary.create_file_writer(os.path.join(self.log_dir, split))
            with self._writers[split].as_default():
                tf.summary.scalar(f"epoch_{key}", value, step=epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def train_loop(
    *,
    optimizer,
    train_function,
    train_iterator,
    evaluate,
    eval_dataset,
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
    state=None,
    learning_rate=None,
    agree_to_stop=None,
):
    """Runs from `step_var` to the end; checkpoints every `checkpoint_steps` and at each epoch end.

    `evaluate(eval_dataset) -> {name: mean}` (or None: no evaluation) adds `val_<name>` to the epoch's
    logs. `state` (a `RunState` in the manager's checkpoint, or None) is brought up to date before each
    save. `learning_rate` (the optimizer's schedule, `step -> lr`, or None: a constant rate) gives the
    logged "lr". Returns the last epoch's logs. Raises FloatingPointError on a non-finite loss, and
    `cli.Preempted` after checkpointing when SIGTERM or SIGINT arrived (`stop_signals`).

    `agree_to_stop(signal name or None) -> signal name or None` turns this process's stop request into
    the decision of every process of the run (`distribute.stop_agreement`: under several workers a signal
    may reach one of them only, or reach them in different steps). It is asked after every
    `train_function` call and after each epoch's checkpoint, the same number of times on every worker, so
    all of them stop after the same step, each checkpointing it. None: this process decides alone.
    """
    if agree_to_stop is None:
        agree_to_stop = _alone
    end = total_steps(epochs, steps_per_epoch, max_steps)
    step = int(step_var.numpy())
    logs, traced = {}, False
    clock_start, previous_time = time.perf_counter(), float(state.wall_time_s.numpy()) if state else 0.0

    def save(step, epoch_logs=None):
        if state is not None:
            state.wall_time_s.assign(previous_time + time.perf_counter() - clock_start)
            if epoch_logs is not None:
                state.record_epoch(epoch_logs)
        save_checkpoint(manager, step)

    with stop_signals() as stop:  # SIGTERM / SIGINT: finish the step, checkpoint, stop
        callbacks.on_train_begin()  # (creates logs/training.csv: from then on a signal stops cleanly)
        while step < end:
            epoch = step // steps_per_epoch
            epoch_end = min((epoch + 1) * steps_per_epoch, end)
            epoch_start = step  # a resumed epoch runs from here: the progress bar counts the steps it runs
            callbacks.set_params({**callbacks.params, "steps": epoch_end - epoch_start})
            mixup_on = epoch < mixup_epochs
            callbacks.on_epoch_begin(epoch)
            totals, timed_steps = {}, 0
            start_time = time.perf_counter()
            while step < epoch_end:
                n = min(steps_per_execution, epoch_end - step)
                if checkpoint_steps:
                    n = min(n, checkpoint_steps - step % checkpoint_steps)
                callbacks.on_train_batch_begin(step - epoch_start)
                sums = train_function(
                    train_iterator, tf.constant(step, tf.int64), tf.constant(n), tf.constant(mixup_on)
                )
                sums = {name: float(value) for name, value in sums.items()}
                step += n
                if traced:
                    timed_steps += n
                else:  # images/s leaves out the first call, which traces and compiles the step
                    traced, start_time = True, time.perf_counter()
                step_var.assign(step)
                lr = last_learning_rate(optimizer, learning_rate)
                if not np.isfinite(sums["loss"]):
                    where = f"at step {step}" if n == 1 else f"in steps {step - n + 1}-{step}"
                    raise FloatingPointError(
                        f"Non-finite training loss ({sums['loss'] / sums['count']}) {where} (epoch {epoch}), "
                        f"--precision={precision}, learning rate {lr:.6g}; lower --base_lr or add "
                        "--warmup_epochs."
                    )
                totals = {name: totals.get(name, 0.0) + value for name, value in sums.items()}
                images_per_sec = timed_steps * global_batch_size / max(time.perf_counter() - start_time, 1e-9)
                logs = _train_logs(totals, mixup_on, lr, images_per_sec)
                callbacks.on_train_batch_end(step - epoch_start - 1, logs)
                stopping = agree_to_stop(stop["signal"])
                due = checkpoint_steps and step % checkpoint_steps == 0
                if step < epoch_end and (due or stopping):
                    save(step)
                    if stopping:
                        raise Preempted(step, stopping)
            if evaluate is not None:
                result = evaluate(eval_dataset)
                logs.update({f"val_{name}": value for name, value in result.items() if name != "count"})
            save(step, logs)
            callbacks.on_epoch_end(epoch, logs)
            stopping = agree_to_stop(stop["signal"])  # a signal during the evaluation or save counts too
            if stopping and step < end:
                raise Preempted(step, stopping)
    callbacks.on_train_end(logs)
    return logs


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _alone(signal_name):
    """One process's stop decision is its own (`train_loop`'s `agree_to_stop` for a single worker)."""
    return signal_name


@contextlib.contextmanager
def stop_signals():
    """While active, SIGTERM and SIGINT (what schedulers, Kubernetes and preemptible VMs send; Ctrl-C) only
    record that the run should stop: the loop finishes the step in flight, checkpoints and raises
    `cli.Preempted`. Yields a dict whose "signal" is None or the name of the signal received. Outside the
    main thread (where Python cannot install handlers) signals keep their usual effect."""
    stop = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def record(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, record) for sig in PREEMPTION_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def last_learning_rate(optimizer, schedule=None):
    """The learning rate of the last update: `schedule` (the optimizer's, `step -> lr`) at the optimizer's
    last iteration (Keras' `optimizer.learning_rate` is the next update's); without a schedule, the
    optimizer's constant rate."""
    if schedule is None or not callable(schedule):
        return float(optimizer.learning_rate)
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer counts skipped steps
    return float(schedule(max(int(inner.iterations.numpy()) - 1, 0)))


def _train_logs(totals, mixup_on, lr, images_per_sec):
    """Means of the summed metrics; under mixup only the loss (accuracy against mixed labels is not
    accuracy, Section 5.4)."""
    count = max(totals["count"], 1.0)
    logs = {name: value / count for name, value in totals.items() if name != "count"}
    if mixup_on:
        logs = {"loss": logs["loss"]}
    logs.update(lr=lr, images_per_sec=images_per_sec)
    return logs
