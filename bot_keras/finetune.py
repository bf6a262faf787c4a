"""`python -m bot_keras.finetune --flagfile=configs/transfer/X.flags [--flag=value ...]`: transfer learning.

The paper's Section 6: a classifier trained with the refinements is fine-tuned on other tasks (6.1 object
detection, 6.2 semantic segmentation) to show that a better ImageNet model transfers better. This command
starts a task model from a backbone — random, a bot_keras classification run, a `.keras`/`.weights.h5` file
or timm `.safetensors` (`--backbone_weights`, `bot_keras.transfer`) — and trains it with the classifier's
machinery: the same driver (`trainer.run`), steps, loop and checkpoints, schedules, optimizer, precision and
strategies and the same run directory; nothing of the trainer is copied.

`--task` chooses the task (`bot_keras.tasks`: classification, segmentation, detection); the command
defines the common `--task` and that task's flags only, so a run records only its own task's flags and
`--task=T --help` lists them. `--task=classification` trains a classifier with `bot_keras.train`'s flags
and defaults through the same driver.
"""

import sys

from absl import flags

from bot_keras import cli, run_dir, tasks, trainer

COMMAND = "bot_keras.finetune"
TASK_MODULES = tasks.TASK_MODULES  # task name → its module (kept under its old name)
task_module = tasks.task_module


def define_flags(fv, task=None):
    """--task, then the flags of `task` (the registry's module: also what reads a run's flags.txt); without
    a task, --task and the training machinery's flags (what `--help` shows)."""
    tasks.define_task_flag(fv)
    if task is None:
        trainer.define_machinery_flags(fv)
        return
    module = task_module(task)
    module.define_flags(fv)
    # A task trained from scratch by its own command (classification) states its fine-tuning defaults and
    # the fine-tuning name of its flags (--backbone for --model); flags.txt records the flags themselves.
    for name, value in getattr(module, "FINETUNE_DEFAULTS", {}).items():
        fv[name].default = value
        fv[name].value = value
    for alias, name in getattr(module, "FINETUNE_ALIASES", {}).items():
        flags.DEFINE_alias(alias, name, flag_values=fv)


def task_of(argv):
    """The --task of a command line (flagfiles read), or None when it names none."""
    scratch = flags.FlagValues()
    tasks.define_task_flag(scratch)
    try:
        scratch(["finetune", *argv], known_only=True)
    except flags.Error:
        return None
    return scratch.task


def parse_flags(argv):
    """A fine-tuning command line (no program name) parsed with its task's flags into a fresh FlagValues;
    a missing or unknown --task raises FlagError."""
    task = task_of(argv)
    if task not in TASK_MODULES:
        raise FlagError(task_problem(task))
    flag_values = flags.FlagValues()
    define_flags(flag_values, task)
    flag_values(["finetune", *argv])
    return flag_values


class FlagError(cli.SetupError):
    """A flag value that cannot work; the message names the flag and echoes the value."""


def task_problem(task):
    if not task:
        return f"--task is required: {' | '.join(TASK_MODULES)}."
    return f"--task={task!r} is not one of {', '.join(TASK_MODULES)}."


def validate_flags(f):
    """Checks what can be checked before data or models are touched; raises FlagError listing all."""
    if f.task not in TASK_MODULES:
        raise FlagError(task_problem(f.task))
    task = task_module(f.task)
    problems = (
        task.flag_problems(f) + trainer.machinery_problems(f, schedule_names=task.SCHEDULE_NAMES)
        + trainer.weight_selection_problems(f, task.BEST_METRICS)
    )
    if problems:
        raise FlagError("\n".join(problems))


def contract_flags(task):
    """Every flag a run of `task` records, in definition order (--task first); without a task, those every
    task shares (what `--help` lists)."""
    scratch = flags.FlagValues()
    define_flags(scratch, task)
    aliases = getattr(task_module(task), "FINETUNE_ALIASES", {}) if task is not None else {}
    return tuple(name for name in scratch if name not in aliases)


def resolved_flags_text(f):
    """The flags as a flagfile that reproduces the run (--resume left out, as the trainer does)."""
    return run_dir.flags_text(f, [name for name in contract_flags(f.task) if name != "resume"])


# --- main -----------------------------------------------------------------------------------------------


def main(argv, f=flags.FLAGS):
    """Fine-tunes as the flags `f` say. Set-up problems raise cli.SetupError (exit 2 through cli.run)."""
    del argv
    validate_flags(f)
    trainer.run(task_module(f.task), f, flags_text=resolved_flags_text(f))


def _define_command_flags(fv):
    """The command line's flags: those of its --task; a missing or unknown task is one line, exit 2."""
    argv = sys.argv[1:]
    task = task_of(argv)
    asked_for_help = any(arg.lstrip("-").split("=")[0] in cli.HELP_FLAGS for arg in argv)
    if task not in TASK_MODULES and (task is not None or not asked_for_help):
        cli.fail(COMMAND, task_problem(task))
    try:
        define_flags(fv, task)
    except cli.SetupError as error:  # e.g. a task whose extra is not installed
        cli.fail(COMMAND, str(error))
    for name in contract_flags(task):  # the command's own: `--help` lists them
        flags.declare_key_flag(name, flag_values=fv)


if __name__ == "__main__":
    cli.run(main, _define_command_flags, command=COMMAND)
