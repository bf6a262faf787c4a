"""The run directory: the one module that names, writes and reads its files.

A run directory (`--model_dir`) as `bot_keras.train` leaves it:

    run.json            {"task": "classification"}: what kind of model the run trained (readers check it;
                        `bot_keras.finetune` writes "segmentation" or "detection"), and the values the run
                        resolved from its data (`Task.preflight`: segmentation's "eval_size")
    flags.txt           the resolved flags, a flagfile that reproduces the run (`--flagfile=RUN/flags.txt`)
    classes.txt         one class name a line, in label order
    checkpoints/        tf.train.CheckpointManager's checkpoints (model, optimizer, step), for --resume
    logs/               training.csv and TensorBoard events
    model.keras         the final model, written when training ends
    final_metrics.json  the last epoch's logs, step and wall time

Every file is written atomically (`atomic_write`: a temporary sibling, then `os.replace`), so a reader
never sees half a file and a crash leaves the previous version or nothing (and at worst a stale
`.NAME.*.tmp*` sibling, which `remove_temporaries` clears). A `model.keras` that is nevertheless damaged
(e.g. copied in part) is reported as damaged by `model_files`, with `--resume` as the cure when the run's
checkpoints can rewrite it.

`flags.txt` is read back with the training command's own flag definitions, so a negated boolean
(`--noskip_corrupt`) or a list reads back typed, as the trainer parsed it. Runs written before `run.json`
existed are classification runs.
"""

import dataclasses
import functools
import json
import os
import pathlib

import tensorflow as tf
from absl import flags

from bot_keras import tasks
from bot_keras.atomic_write import write_atomic, write_error
from bot_keras.cli import SetupError
from bot_keras.tasks import CLASSIFICATION, DETECTION, SEGMENTATION, TASKS

RUN_FILE = "run.json"
FLAGS_FILE = "flags.txt"
CLASSES_FILE = "classes.txt"
MODEL_FILE = "model.keras"
BEST_MODEL_FILE = "model_best.keras"  # --keep_best: the inference model of the best epoch
CHECKPOINTS = {"final": MODEL_FILE, "best": BEST_MODEL_FILE}  # --checkpoint of evaluate and export
METRICS_FILE = "final_metrics.json"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
# What a run writes before its first checkpoint: a directory holding only these is a run that never got
# going (stopped by bad data, or killed, before it saved anything) and may be started afresh.
START_FILES = (RUN_FILE, FLAGS_FILE, CLASSES_FILE, CHECKPOINTS_DIR, LOGS_DIR)

TASK_COMMANDS = tasks.COMMANDS
# The flags a finished run's flags.txt must set: the architecture and the input size.
REQUIRED_FLAGS = {CLASSIFICATION: ("model", "image_size"), SEGMENTATION: ("backbone", "crop_size"),
                  DETECTION: ("backbone", "crop_size")}


# --- writing ----------------------------------------------------------------------------------------------


def write_run_info(model_dir, *, task=CLASSIFICATION, resolved=None):
    """run.json: the task, then the `resolved` values ({flag name: value} the run resolved from its data)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    info = {"task": task, **(resolved or {})}
    write_atomic(pathlib.Path(model_dir) / RUN_FILE, json.dumps(info, indent=2) + "\n")


def flags_text(flag_values, names):
    """`names` of `flag_values` as flagfile lines (`--name=value`, `--flag` / `--noflag`), unset ones left
    out: the text `read_flags` parses back to the same values."""
    lines = [flag_values[name].serialize() for name in names if flag_values[name].value is not None]
    return "\n".join(lines) + "\n"


def write_flags(model_dir, flag_values, names):
    write_atomic(pathlib.Path(model_dir) / FLAGS_FILE, flags_text(flag_values, names))


def write_class_names(path, class_names):
    """Writes one class name a line in index order (the run directory's `classes.txt`)."""
    write_atomic(path, "".join(f"{name}\n" for name in class_names))


def read_class_names(path):
    """Reads a `classes.txt` written by `write_class_names`."""
    with open(path, encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


def write_metrics(model_dir, metrics):
    write_atomic(pathlib.Path(model_dir) / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


def save_model(model, model_dir, name=MODEL_FILE):
    """`model.save` to `model_dir/model.keras` (or `name`, e.g. `BEST_MODEL_FILE`), atomically (Keras needs
    the `.keras` suffix on the temporary name too); a failed write is a `write_error`, as in
    `write_atomic`."""
    path = pathlib.Path(model_dir) / name
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(path, error) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _is_temporary(name):
    return name.startswith(".") and ".tmp" in name


def remove_temporaries(model_dir):
    """Deletes the temporary siblings a killed writer left in `model_dir` (`.NAME.*.tmp*`)."""
    for entry in pathlib.Path(model_dir).iterdir():
        if entry.is_file() and _is_temporary(entry.name):
            entry.unlink(missing_ok=True)


def has_checkpoint(model_dir):
    """Whether `model_dir/checkpoints` holds a checkpoint `--resume` can continue from."""
    directory = pathlib.Path(model_dir) / CHECKPOINTS_DIR
    return directory.is_dir() and tf.train.latest_checkpoint(str(directory)) is not None


def never_started(model_dir):
    """True when `model_dir` holds nothing but what a run writes before its first checkpoint
    (`START_FILES`, an empty checkpoints folder, temporaries): a run that stopped on bad data or was
    killed early, which a rerun may start afresh; False for an empty or missing directory."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        return False
    names = [name for name in os.listdir(model_dir) if not _is_temporary(name)]
    checkpoints = model_dir / CHECKPOINTS_DIR
    return (
        bool(names)
        and all(name in START_FILES for name in names)
        and not (checkpoints.is_dir() and any(checkpoints.iterdir()))
    )


# --- reading ----------------------------------------------------------------------------------------------


def read_run_info(model_dir):
    """run.json as a dict; a run without one predates the file and is a classification run."""
    path = pathlib.Path(model_dir) / RUN_FILE
    if not path.is_file():
        return {"task": CLASSIFICATION}
    try:
        info = json.loads(path.read_text())
        task = info["task"]
    except (ValueError, KeyError, TypeError) as error:
        raise SetupError(f"{path} is not a run description ({{'task': ...}}): {error!r}") from None
    if task not in TASKS:
        raise SetupError(f"{path}: task {task!r} is not one this version reads ({', '.join(TASKS)})")
    return info


def read_task(model_dir):
    """The run's task from run.json (`read_run_info`)."""
    return read_run_info(model_dir)["task"]


def command_flags(task):
    """The flag definitions (`define_flags(flag_values)`) that read a flags.txt of a `task` run: the task
    module's (`bot_keras.tasks`), plus the `--task` a `bot_keras.finetune` run records."""
    return functools.partial(tasks.define_run_flags, task=task)


# Fine-tuning runs written before each task defined only its own flags record the other task's flags
# too (at their defaults); reading such a run skips them.
OTHER_TASK_FLAGS = {
    SEGMENTATION: ("keep_difficult", "detection_scale_range", "detection_head_norm", "max_detections"),
    DETECTION: ("head", "aux_loss_weight", "eval_mode", "eval_size"),
}


def read_flags(path, define_flags, *, skip=()):
    """Parses the flagfile `path` with `define_flags` into a fresh `absl.flags.FlagValues` (typed values;
    flags the file does not set keep their defaults, `.present` tells them apart); lines setting a flag
    named in `skip` are left out."""
    path = pathlib.Path(path)
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    args = [f"--flagfile={path}"]
    if skip:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        args = [
            line for line in lines
            if line and not line.startswith("#") and not _sets_one_of(line, skip)
        ]
    try:
        flag_values(["run_dir", *args], known_only=False)
    except flags.Error as error:
        raise SetupError(f"{path}: {error}") from None
    return flag_values


def _sets_one_of(line, names):
    """Whether the flagfile line (`--name=value`, `--name`, `--noname`) sets a flag of `names`."""
    name = line.lstrip("-").split("=", 1)[0]
    return name in names or ("=" not in line and name.startswith("no") and name[2:] in names)


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run directory, as `read_run` checked it."""

    model_dir: pathlib.Path
    task: str
    flags: dict  # every flag of the training command: the run's value, or the command's default
    class_names: tuple
    model_file: str = MODEL_FILE  # or BEST_MODEL_FILE (`read_run(..., checkpoint="best")`)
    # The values the run resolved from its data (run.json; `tasks.run_flags` puts them in place of their
    # flags); a run written before they were recorded has none, and its readers apply the flags' old rule.
    resolved: dict = dataclasses.field(default_factory=dict)

    @property
    def model_path(self):
        return self.model_dir / self.model_file

    @property
    def model_name(self):
        """The architecture: the classifier's --model, a fine-tuning run's --backbone."""
        return self.flags["model" if self.task == CLASSIFICATION else "backbone"]

    @property
    def image_size(self):
        """The classifier's --image_size, a fine-tuning run's --crop_size."""
        return self.flags["image_size" if self.task == CLASSIFICATION else "crop_size"]


def read_run(model_dir, *, task=CLASSIFICATION, checkpoint="final"):
    """Checks a finished run directory of `task` and reads its flags and class names; a SetupError names
    what is missing or wrong. `checkpoint="best"` reads `model_best.keras` (`--keep_best`) instead of
    `model.keras`."""
    model_dir = pathlib.Path(model_dir)
    if model_dir.is_file():
        raise SetupError(f"--model_dir={model_dir} is a file; give the run directory ({model_dir.parent})")
    if not model_dir.is_dir():
        raise SetupError(f"run directory {model_dir} does not exist (--model_dir={model_dir})")
    if checkpoint not in CHECKPOINTS:
        raise SetupError(f"--checkpoint={checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    if checkpoint == "best" and not (model_dir / BEST_MODEL_FILE).is_file():
        raise SetupError(f"--checkpoint=best: {model_dir} has no {BEST_MODEL_FILE} (train with --keep_best)")
    missing = [name for name in (FLAGS_FILE, CLASSES_FILE, MODEL_FILE) if not (model_dir / name).is_file()]
    if missing and (model_dir / "saved_model.pb").is_file():
        raise SetupError(f"{model_dir} is a SavedModel export, not a run directory: give the run directory "
                         "it was exported from (bot_keras.predict --model takes the export)")
    if missing:
        hint = ""
        if MODEL_FILE in missing:
            hint = resume_cure(model_dir) or (
                f" ({writing_command(model_dir)} writes model.keras when training ends)"
            )
        raise SetupError(f"run directory {model_dir} is incomplete: missing {', '.join(missing)}{hint}")
    info = read_run_info(model_dir)
    run_task = info["task"]
    if run_task != task:
        raise SetupError(f"{model_dir} is a {run_task} run; this command reads {task} runs")
    parsed = read_flags(
        model_dir / FLAGS_FILE, command_flags(run_task), skip=OTHER_TASK_FLAGS.get(run_task, ())
    )
    lacking = [f"--{name}" for name in REQUIRED_FLAGS[run_task] if not parsed[name].present]
    if lacking:
        raise SetupError(f"{model_dir / FLAGS_FILE} lacks {', '.join(lacking)}")
    class_names = read_class_names(model_dir / CLASSES_FILE)
    if not class_names:
        raise SetupError(f"{model_dir / CLASSES_FILE} lists no classes")
    values = {name: parsed[name].value for name in parsed}
    resolved = {name: value for name, value in info.items() if name != "task" and name in values}
    return Run(model_dir=model_dir, task=run_task, flags=values, class_names=class_names,
               model_file=CHECKPOINTS[checkpoint], resolved=resolved)


def resume_cure(model_dir):
    """The advice for a damaged final model of the run in `model_dir`: its checkpoints can rewrite it."""
    if not has_checkpoint(model_dir):
        return ""
    return (
        f"; the run's checkpoints can rewrite it: python -m {writing_command(model_dir)} "
        f"--flagfile={pathlib.Path(model_dir) / FLAGS_FILE} --model_dir={model_dir} --resume"
    )


def writing_command(model_dir):
    """The command that wrote the run in `model_dir` (its flags.txt is that command's flagfile): a run
    recording --task is bot_keras.finetune's."""
    flagfile = pathlib.Path(model_dir) / FLAGS_FILE
    if flagfile.is_file() and any(line.startswith("--task=") for line in flagfile.read_text().splitlines()):
        return "bot_keras.finetune"
    return TASK_COMMANDS[read_task(model_dir)]



run_flags = tasks.run_flags  # kept under its old name
