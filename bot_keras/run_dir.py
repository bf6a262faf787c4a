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

Every file is written atomically (a temporary sibling, then `os.replace`), so a reader never sees half a
file and a crash leaves the previous version or nothing (and at worst a stale `.NAME.*.tmp*` sibling,
which `remove_temporaries` clears). A `model.keras` that is nevertheless damaged (e.g. copied in part)
is reported as damaged, with `--resume` as the cure when the run's checkpoints can rewrite it.

`flags.txt` is read back with the training command's own flag definitions, so a negated boolean
(`--noskip_corrupt`) or a list reads back typed, as the trainer parsed it. Runs written before `run.json`
existed are classification runs.
"""

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
import zipfile

import keras
import tensorflow as tf
from absl import flags

from bot_keras import tasks
from bot_keras.cli import SetupError
from bot_keras.models import build_backbone, build_model
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


# --- writing, atomically ----------------------------------------------------------------------------------

# What a training command's failed write says after the path and the error: its previous files are intact.
RESUME_AFTER_WRITE_ERROR = (
    "the previous files are intact; free space (or fix the disk), then rerun with --resume"
)


def write_error(path, error, cure=RESUME_AFTER_WRITE_ERROR):
    """The SetupError of a write to `path` that failed with `error` (an OSError such as ENOSPC or EIO, or
    TensorFlow's error for one): one line naming the path, the error and `cure`."""
    reason = f"[Errno {error.errno}] {error.strerror}" if getattr(error, "strerror", None) else str(error)
    reason = reason.strip().splitlines()[0] if reason.strip() else type(error).__name__
    return SetupError(f"cannot write {path}: {reason}; {cure}")


def write_atomic(path, data):
    """Writes `data` (str or bytes) to `path` through a temporary sibling and `os.replace`; a failed write
    (a full disk: ENOSPC, EIO) removes the temporary, leaves the previous file and raises `write_error`."""
    path = pathlib.Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a serving user
        os.replace(tmp, path)
    except OSError as error:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise write_error(path, error) from None
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    if not model_dir.is_dir():
        raise SetupError(f"run directory {model_dir} does not exist (--model_dir={model_dir})")
    if checkpoint not in CHECKPOINTS:
        raise SetupError(f"--checkpoint={checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    if checkpoint == "best" and not (model_dir / BEST_MODEL_FILE).is_file():
        raise SetupError(f"--checkpoint=best: {model_dir} has no {BEST_MODEL_FILE} (train with --keep_best)")
    missing = [name for name in (FLAGS_FILE, CLASSES_FILE, MODEL_FILE) if not (model_dir / name).is_file()]
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


# --- the model --------------------------------------------------------------------------------------------


def keras_file_problem(path):
    """Why the file `path` cannot be a `.keras` model (a zip archive holding `config.json`), or None when
    it looks like one. Keras itself reports a file it cannot open as "File not found"."""
    path = pathlib.Path(path)
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "a directory, not a .keras file"
    size = path.stat().st_size
    if size == 0:
        return "damaged: empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK":  # a zip archive cut short: its central directory is missing
            return f"damaged: a .keras archive cut short ({size} bytes)"
        return f"not a .keras file (a .keras model is a zip archive; this {size}-byte file is not one)"
    try:
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                return "a zip archive without config.json, not a .keras model"
    except zipfile.BadZipFile as error:
        return f"damaged: {error}"
    return None


def load_keras_model(path, *, label=None, cure=""):
    """`keras.models.load_model(path, compile=False)`; a damaged, missing or non-.keras file is a
    SetupError naming it (`label`, default the path) and what is wrong, followed by `cure`."""
    name = label or path
    problem = keras_file_problem(path)
    if problem is not None:
        raise SetupError(f"{name}: {problem}{cure}")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises a zoo of types for a damaged archive
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SetupError(f"{name}: damaged, cannot load the .keras file: {first}{cure}") from error


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


def load_model(run):
    """The run's final model as a float32 `keras.Model` ready for inference (see `float32_rebuild`;
    `bot_keras.finetune` saves its models in float32 already)."""
    tasks.task_module(run.task)  # registers the task's layers (backbone, heads) for loading
    model = load_keras_model(run.model_path, cure=resume_cure(run.model_dir))
    num_outputs = model.output_shape[-1] if isinstance(model.output_shape, tuple) else None
    if num_outputs is not None and num_outputs != len(run.class_names):
        raise SetupError(
            f"{run.model_path} predicts {num_outputs} classes but {run.model_dir / CLASSES_FILE} "
            f"lists {len(run.class_names)}"
        )
    return float32_rebuild(model, run)


def float32_rebuild(model, run):
    """The model itself when every layer computes in float32; else (a model saved under a mixed policy,
    Section 3.2's FP16 training) `--model` from `flags.txt` rebuilt under the float32 policy with the
    trained float32 master weights copied in, in order, each shape checked. float16 graphs are slow on
    CPU and TFLite rejects them."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model
    if run.task != CLASSIFICATION:
        raise SetupError(f"{run.model_path} computes in reduced precision; bot_keras.finetune saves float32 "
                         "models, so this file was not written by it")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        # Stochastic depth adds weightless layers that change the layers' order: rebuilt with them too.
        rebuilt = build_model(
            run.model_name, num_classes=len(run.class_names), input_shape=model.input_shape[1:],
            drop_path_rate=run.flags.get("drop_path_rate", 0.0),
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return copy_weights(rebuilt, model, label=f"{run.model_path} (--model={run.model_name} from flags.txt)")


def copy_weights(target, source, *, label):
    """Assigns every weight of `source` to `target` in order (cast to the target's dtype), each shape
    checked; returns `target`. `label` names the source in the SetupError of a mismatch."""
    if len(target.weights) != len(source.weights):
        raise SetupError(
            f"{label} has {len(source.weights)} weights but its float32 rebuild has {len(target.weights)}; "
            "the run's flags do not describe its model"
        )
    for to, source_weight in zip(target.weights, source.weights, strict=True):
        if tuple(to.shape) != tuple(source_weight.shape):
            raise SetupError(
                f"{label}: weight {source_weight.path} has shape {tuple(source_weight.shape)} but the "
                f"float32 rebuild expects {tuple(to.shape)} ({to.path})"
            )
        to.assign(tf.cast(source_weight.value, to.dtype))
    return target


def load_backbone(model_dir, **backbone_kwargs):
    """`build_backbone` of the run's architecture holding the trained classifier's weights (copied layer by
    layer by `models.load_classifier_weights`; the `logits` head is left out). `backbone_kwargs` go to
    `build_backbone` (e.g. `output_stride`, `input_shape`): the start for segmentation or detection."""
    run = read_run(model_dir)
    return build_backbone(run.model_name, weights_from=load_model(run), **backbone_kwargs)


run_flags = tasks.run_flags  # kept under its old name
