"""What a task is: the one interface the training driver, evaluate, export and predict use, and the registry.

A task is a module (`classification/task.py`, `segmentation/task.py`, `detection/task.py`) that provides
what `Task` below lists. `bot_keras.trainer.run(task, f)` trains any of them (data → model → optimizer →
restore → fit → the final model); `bot_keras.evaluate`, `export` and `predict` read a run's task from its
`run.json` and call the same module. The registry maps a task's name to its module's path and imports it
only when that task is asked for, so that reading a classification run never imports keras-hub or the
detection code, and no reader imports a training command.

Behaviour every task shares lives here once: the class-list check (`check_same_classes`), turning the
pipeline's bad-input errors into one line (`bad_input`), and resolving an evaluation's data from a run's
flags (`evaluation_flags`).

A new task: a package `bot_keras/NAME/` with a `task.py` providing `Task`, a line in `TASK_MODULES`, and
its name in `TASKS`.
"""

import contextlib
import dataclasses
import importlib
import importlib.util
import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from absl import flags

from bot_keras import cli

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
DETECTION = "detection"
TASKS = (CLASSIFICATION, SEGMENTATION, DETECTION)
# Task name → the module implementing it (imported on demand, see `task_module`).
TASK_MODULES = {
    SEGMENTATION: "bot_keras.segmentation.task",
    DETECTION: "bot_keras.detection.task",
    CLASSIFICATION: "bot_keras.classification.task",
}
# What a task needs beyond the core install: (importable module, pip extra that installs it).
REQUIREMENTS = {DETECTION: ("keras_hub", "transfer")}
# The command whose flagfile (`--flagfile=RUN/flags.txt`) reproduces a run of each task; a classification
# run written by `bot_keras.finetune --task=classification` records `--task` and names that command.
COMMANDS = {
    CLASSIFICATION: "bot_keras.train", SEGMENTATION: "bot_keras.finetune", DETECTION: "bot_keras.finetune"
}


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """What a task adds to the generic train step (`steps.make_train_function`'s keyword arguments:
    `per_example_loss`, and optionally `metrics`, `teacher`, `mixup_alpha`) and the number of leading
    epochs that mix up (0: none)."""

    step_kwargs: dict
    mixup_epochs: int = 0


class Task(Protocol):
    """The operations of a task module. `f` is the run's parsed flags (absl `FlagValues`, or a namespace of
    a run's recorded flags); every function may raise `cli.SetupError` naming a flag or file."""

    NAME: str  # the task's name in run.json
    CSV_COLUMNS: tuple  # logs/training.csv's columns
    BEST_METRICS: tuple  # the --keep_best values: val_* columns of CSV_COLUMNS (a loss is minimised)
    SCHEDULE_NAMES: tuple  # the --lr_schedule values the task accepts

    # --- flags ---------------------------------------------------------------------------------------
    def define_flags(self, fv) -> None:
        """Every flag a run of the task records in flags.txt (common ones included), with its defaults."""

    def flag_problems(self, f) -> list:
        """Messages for the bad values among the task's own flags and --dataset, before any data is read."""

    # --- training: data, model, step, evaluation, final model ------------------------------------------
    def dataset_info(self, f, split) -> Any:
        """`.class_names` and `.num_examples` of a split (ValueError/OSError: the user's data is bad)."""

    def preflight(self, f) -> dict:
        """Checks of the data that its files allow before the first step (read cheaply, e.g. from image
        headers; a SetupError names the file and the flag), and the values the run resolves from the data:
        `{flag name: value}`, which the driver uses in place of those flags' values and records in run.json,
        where the run's readers find them (`run_flags`). `no_preflight` for a task without any."""

    def make_dataset(self, f, *, split, training, input_context=None, batch_size=None,
                     skipped_files=None) -> Any:
        """A tf.data of (images, labels) batches; `skipped_files` counts the files --skip_corrupt skipped
        (a task without that flag never adds to it)."""

    def initial_weights(self, f) -> Any:
        """What the model starts from (a model holding pretrained weights), or None; called outside the
        strategy's scope."""

    def build_model(self, f, *, num_classes, weights_from=None) -> Any:
        """The training model (float32 outputs); called inside the strategy's scope."""

    def train_options(self, f, *, model, num_classes) -> TrainOptions:
        """The step's loss and metrics (and e.g. a distillation teacher); may set up `model` for training
        (frozen stages, synchronised BatchNorm). Called inside the strategy's scope."""

    def make_evaluator(self, f, strategy, model, class_names) -> Callable:
        """`evaluate(distributed dataset) -> {name: float}`; an optional `.details` dict of the last call
        goes to final_metrics.json as `val_<name>`."""

    def final_model(self, f, model, *, num_classes) -> Any:
        """What model.keras (and --keep_best's model_best.keras, during training) holds: the inference model
        (e.g. without an auxiliary head), sharing or copying the training model's weights."""

    # --- bot_keras.evaluate, export and predict ---------------------------------------------------------
    def evaluate_run(self, run, **overrides) -> tuple:
        """(result dict for the JSON report, one-line summary) of the run's model on a split."""

    def serving_module(self, run, model, *, top_k) -> tuple:
        """(tf.Module, {signature name: concrete function}) for `tf.saved_model.save`."""

    def predict_files(self, model_path, image_paths: Sequence, output_dir, encoded_images, *, k,
                      checkpoint="final") -> list:
        """The lines to print for the images (and, for dense tasks, files written into `output_dir`);
        `checkpoint` (final or best) chooses a run directory's model file."""


def no_preflight(f) -> dict:
    """`Task.preflight` of a task whose data has nothing to check before training: resolves nothing."""
    del f
    return {}


def define_task_flag(fv):
    """`--task`, which `bot_keras.finetune` takes and records first in flags.txt."""
    flags.DEFINE_string(
        "task", None, " | ".join(TASK_MODULES) + " (with --help: that task's flags).", flag_values=fv
    )


def define_run_flags(fv, task):
    """The flags a run of `task` may record in flags.txt: `--task` (a `bot_keras.finetune` run's) and the
    task's own: what reads a run's flags.txt."""
    define_task_flag(fv)
    task_module(task).define_flags(fv)


def task_module(name) -> Task:
    """The module implementing the task `name`, imported now (a SetupError names an unknown task)."""
    if name not in TASK_MODULES:
        raise cli.SetupError(f"--task={name!r} is not one of {', '.join(TASK_MODULES)}.")
    if name in REQUIREMENTS:
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise cli.SetupError(
                f"the {name} task needs {module.replace('_', '-')} (Python >= 3.11), which is not installed: "
                f"pip install 'bot-keras[{extra}]'."
            )
    return importlib.import_module(TASK_MODULES[name])


def check_same_classes(expected, found, *, expected_label, found_label, consequence):
    """A SetupError when two class lists differ: "`expected_label` N classes (a, b, ...) but `found_label`
    M (c, d, ...)`consequence`", the labels with their verb (e.g. "RUN/classes.txt lists")."""
    if list(expected) == list(found):
        return
    raise cli.SetupError(
        f"{expected_label} {len(expected)} classes ({', '.join(expected[:5])}, ...) but {found_label} "
        f"{len(found)} ({', '.join(found[:5])}, ...){consequence}"
    )


@contextlib.contextmanager
def bad_input(stage):
    """Turns the input pipeline's in-graph check (`data.errors`) into a SetupError "`stage` stopped by bad
    input data: <the file and what is wrong>"; any other InvalidArgumentError is a bug and propagates."""
    import tensorflow as tf

    from bot_keras.data.errors import bad_input_message

    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        message = bad_input_message(error)  # the pipeline's check naming the file, or None: a bug
        if message is None:
            raise
        raise cli.SetupError(f"{stage} stopped by bad input data: {message}") from None


def run_flags(run, **overrides):
    """A run's flags as attributes (`f.crop_size`, as a command's own FLAGS reads): the values the run
    resolved from its data (`Task.preflight`, run.json) in place of the flags that asked for them, and the
    non-None `overrides` (evaluate's --dataset, --data_dir, ...) in place of the recorded values."""
    values = dict(run.flags)
    values.update(run.resolved)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return types.SimpleNamespace(**values)


def evaluation_flags(run, *, split=None, default_split=None, **overrides):
    """(flags, split) of an evaluation of `run`: the run's recorded flags with the non-None `overrides`,
    and `split`, else the run's --eval_split, else `default_split`; without any, a SetupError asks for
    --split."""
    f = run_flags(run, **overrides)
    split = split or run.flags["eval_split"] or default_split
    if not split:
        raise cli.SetupError(
            f"{run.model_dir} was trained without an evaluation split (--eval_split=''): name the split to "
            "evaluate with --split."
        )
    if not f.dataset:
        raise cli.SetupError(f"--dataset is not set and {run.model_dir / 'flags.txt'} does not name one.")
    return f, split
