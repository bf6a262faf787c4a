"""`python -m bot_keras.<command> ARGS` run in the test's own process, for tests about what a command does
rather than about a fresh process (its start-up lines, a signal, its memory): `cli.call` parses the same
flags and runs the same `main` with the same exit codes, without the ~5 s of importing TensorFlow, Keras
and bot_keras that each subprocess costs.

Shared by the tests (pytest puts tests/ on sys.path).
"""

import contextlib
import importlib
import io
import subprocess

import keras

from bot_keras import cli

# The flags each command's `cli.run(..., required=...)` checks (its `if __name__ == "__main__"`).
REQUIRED = {
    "bot_keras.evaluate": ("model_dir",),
    "bot_keras.export": ("model_dir", "export_dir"),
    "bot_keras.predict": ("model",),
}


def run(module, *argv, capfd=None):
    """Runs `python -m MODULE *argv` in this process; returns a `subprocess.CompletedProcess` (returncode,
    stdout, stderr) as `subprocess.run(..., capture_output=True, text=True)` would.

    Python's own prints are captured; lines TensorFlow writes to the process' file descriptors (`tf.print`
    to stderr: the pipelines' skipped-file warnings) only with pytest's `capfd` fixture passed in."""
    tool = importlib.import_module(module)
    define_flags = tool.define_flags
    if module == "bot_keras.finetune":  # the fine-tuning command defines the flags of its --task
        task = tool.task_of(list(argv))
        define_flags = lambda flag_values: tool.define_flags(flag_values, task)  # noqa: E731
    out, err = io.StringIO(), io.StringIO()
    if capfd is not None:
        capfd.readouterr()  # what came before is not this command's
        redirect = contextlib.nullcontext()
    else:
        redirect = contextlib.ExitStack()
        redirect.enter_context(contextlib.redirect_stdout(out))
        redirect.enter_context(contextlib.redirect_stderr(err))
    with redirect:
        try:
            cli.call(tool.main, define_flags, list(argv), command=module, required=REQUIRED.get(module, ()))
            code = cli.OK
        except SystemExit as stop:
            code = stop.code
        finally:
            keras.mixed_precision.set_global_policy("float32")
            keras.backend.clear_session()
    if capfd is not None:
        captured = capfd.readouterr()
        return subprocess.CompletedProcess([module, *argv], code, captured.out, captured.err)
    return subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())
