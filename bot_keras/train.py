"""`python -m bot_keras.train --flagfile=configs/X.flags [--flag=value ...]`: the one training command.

main() reads top to bottom in the order the parts are wired: flags → strategy and precision → data →
model → optimizer and schedule → restore → fit → export. Every trick of the paper is one flag (see the
README's flag table): Section 3.1 (linear scaling, warmup, zero-γ, no bias decay), 3.2 (fp16), Section 4
(the model), Section 5 (cosine decay, label smoothing, distillation, mixup).

The parts live in their own modules: the classification task (its flags, data, model and loss) in
`classification/task.py`, the driver that trains every task in `trainer.py` (`trainer.run`), the distributed
train and eval steps in `steps.py`, the host loop, callbacks and checkpoints in `loop.py`, the distillation
teacher in `teacher.py`, the run directory's files in `run_dir.py`, the exit codes and error type in
`cli.py`. This file holds the command: validation of the flags and `main`.
"""

from absl import flags

from bot_keras import cli, run_dir, trainer
from bot_keras.classification import task as classification

COMMAND = "bot_keras.train"
define_flags = classification.define_flags  # the trainer's flags (also what reads a run's flags.txt)


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
    problems = (
        classification.flag_problems(f) + trainer.machinery_problems(f)
        + trainer.weight_selection_problems(f, classification.BEST_METRICS)
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
    trainer.run(classification, f, flags_text=resolved_flags_text(f))


def _define_command_flags(fv):
    """`define_flags`, every flag declared the command's own so that `--help` lists them all."""
    define_flags(fv)
    for name in CONTRACT_FLAGS:
        flags.declare_key_flag(name, flag_values=fv)


if __name__ == "__main__":
    cli.run(main, _define_command_flags, command=COMMAND)
