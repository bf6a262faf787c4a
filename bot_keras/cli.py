"""The one convention every command line follows (`bot_keras.train`, `evaluate`, `export`, `predict`, tools/).

- Flags are defined by a module's `define_flags(flag_values)`; importing a module registers nothing.
  `run(main, define_flags, ...)` defines them on absl's global `FLAGS` only when the command runs.
- Exit status (the README's table):

      0  OK                 the command did what it was asked
      1  INTERNAL_ERROR     a bug (ours, Keras' or TensorFlow's): Python's traceback, unchanged
      2  USAGE_ERROR        bad flags or input (a missing flag or file, undecodable data): one message
      3  NON_FINITE_LOSS    training stopped on a NaN/inf loss (`FloatingPointError`)
      4  PREEMPTED          training stopped on SIGTERM or SIGINT after writing a checkpoint (`Preempted`):
                            the same command with `--resume` continues

- A set-up problem the user can fix raises `SetupError` (a `ValueError`) with a message naming the flag,
  file or value; `run` prints it after `<command>: error:` and exits 2. Any other exception is a bug and
  keeps its traceback. A missing required flag, an unknown flag or a value absl cannot parse is one line
  and exit 2 too, not absl's help dump. `--help` prints the flags and exits 0.
"""

import contextlib
import logging as python_logging
import sys

from absl import app, flags, logging

OK = 0
INTERNAL_ERROR = 1
USAGE_ERROR = 2
NON_FINITE_LOSS = 3
PREEMPTED = 4
HELP_FLAGS = ("help", "h", "?", "helpshort", "helpfull", "helpxml")  # absl's own


class SetupError(ValueError):
    """A problem with the command's input that the user can fix; the message names the flag or file."""


class Preempted(Exception):
    """Training stopped on a signal after checkpointing `step` (exit PREEMPTED)."""

    def __init__(self, step, signal_name):
        super().__init__(f"preempted at step {step} ({signal_name}); --resume continues")
        self.step = step


def fail(command, message, code=USAGE_ERROR):
    """Prints `command: error: message` on stderr and exits with `code`."""
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def setup_errors(context=""):
    """Re-raises the ValueError / OSError of a call whose documented errors are the user's input (a
    missing split, a TF_CONFIG that does not parse) as SetupError. Wrap single calls, never a block that
    runs Keras or TensorFlow code whose ValueError would be a bug."""
    try:
        yield
    except SetupError:
        raise
    except (ValueError, OSError) as error:
        prefix = f"{context}: " if context else ""
        raise SetupError(f"{prefix}{error}") from error


def require(flag_values, names):
    """Raises SetupError naming every flag of `names` that is unset (None or empty)."""
    missing = [f"--{name}" for name in names if flag_values[name].value in (None, "", [])]
    if missing:
        raise SetupError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required.")


def quiet_python_logging(flag_values):
    """absl's and TensorFlow's Python INFO lines off (e.g. SavedModel's "Assets written to ...", in the
    C++ log format `I1204 12:00:00 ...`), unless the command line sets absl's --verbosity: every command
    prints its own results, and TensorFlow's warnings and errors still show."""
    if "verbosity" in flag_values and flag_values["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    python_logging.getLogger("tensorflow").setLevel(python_logging.WARNING)  # `tf.get_logger()`


def _checked_main(main, argv, flag_values, *, command, required):
    """Checks `required`, runs `main(argv, ...)` and maps SetupError and FloatingPointError to exit codes."""
    quiet_python_logging(flag_values)
    try:
        require(flag_values, required)
        return main(argv) if flag_values is flags.FLAGS else main(argv, flag_values)
    except SetupError as error:
        fail(command, str(error))
    except FloatingPointError as error:
        fail(command, f"training stopped: {error}", NON_FINITE_LOSS)
    except Preempted as stop:
        print(f"{command}: {stop}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED)


def run(main, define_flags, *, command, required=()):
    """The entry point of a command: defines its flags, parses argv, checks `required`, runs
    `main(argv)` and maps SetupError and FloatingPointError to their exit codes (module docstring)."""
    define_flags(flags.FLAGS)

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            fail(command, str(error))
        except SystemExit as stop:  # absl prints --help / --helpfull and exits 1; asked-for help is OK
            asked = any(arg.lstrip("-").split("=")[0] in HELP_FLAGS for arg in argv[1:])
            sys.exit(OK if asked and stop.code == 1 else stop.code)

    app.run(
        lambda argv: _checked_main(main, argv, flags.FLAGS, command=command, required=required),
        flags_parser=parse,
    )


def call(main, define_flags, argv, *, command, required=()):
    """`run` in-process, for tests and scripts that call a tool: the flags go on a scratch FlagValues
    (nothing is left on absl's global FLAGS), `argv` has no program name, `main(argv, flag_values)` gets
    the positional arguments; errors print and exit as `run`'s do. Returns main's result."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        rest = flag_values([command, *argv])
    except flags.Error as error:
        fail(command, str(error))
    return _checked_main(main, rest, flag_values, command=command, required=required)
