"""cli.py: one exit-code table and one-line errors for every command; console.py: no TF start-up lines."""

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from bot_keras import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(main, argv, *, required=()):
    def define_flags(fv):
        if "cli_test_value" not in fv:
            flags.DEFINE_string("cli_test_value", None, "A flag of this test.", flag_values=fv)

    old_argv = sys.argv
    sys.argv = ["cmd", *argv]
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run(main, define_flags, command="cmd", required=required)
    finally:
        sys.argv = old_argv
        flags.FLAGS.unparse_flags()
    return exit_.value.code


def test_setup_error_is_one_line_and_exit_2(capsys):
    def main(argv):
        raise cli.SetupError("--cli_test_value='x' names no file")

    assert _run(main, ["--cli_test_value=x"]) == cli.USAGE_ERROR
    assert capsys.readouterr().err == "cmd: error: --cli_test_value='x' names no file\n"


def test_missing_required_and_unknown_flags_are_one_line(capsys):
    assert _run(lambda argv: None, [], required=("cli_test_value",)) == cli.USAGE_ERROR
    assert capsys.readouterr().err == "cmd: error: --cli_test_value is required.\n"
    assert _run(lambda argv: None, ["--cli_test_valeu=1"]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("cmd: error: ") and "cli_test_valeu" in err and err.count("\n") == 1


def test_help_exits_0_and_lists_the_flags(capsys):
    assert _run(lambda argv: None, ["--helpfull"]) == cli.OK  # --help lists __main__'s flags only
    assert "--cli_test_value: A flag of this test." in capsys.readouterr().out


def test_non_finite_loss_exits_3_and_a_bug_keeps_its_traceback(capsys):
    def nan(argv):
        raise FloatingPointError("Non-finite training loss (nan) at step 3")

    assert _run(nan, []) == cli.NON_FINITE_LOSS
    assert "training stopped: Non-finite training loss (nan) at step 3" in capsys.readouterr().err

    def bug(argv):
        raise ValueError("a Keras bug, not the user's input")

    with pytest.raises(ValueError, match="a Keras bug"):  # not turned into a one-line exit 2
        _run(bug, [])


def test_setup_errors_wraps_only_value_and_os_errors():
    with pytest.raises(cli.SetupError, match="^--dataset=x: Split 'test' not found$"):
        with cli.setup_errors("--dataset=x"):
            raise ValueError("Split 'test' not found")
    with pytest.raises(KeyError):
        with cli.setup_errors("--dataset=x"):
            raise KeyError("a bug")


@pytest.mark.slow
def test_training_console_has_no_tensorflow_start_up_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "bot_keras.train", "--flagfile=configs/demo.flags", "--max_steps=2",
               "--dataset=synthetic:128", "--eval_split=", "--verbose=0", f"--model_dir={tmp_path / 'run'}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("cuInit", "E0000", "I0000", "port.cc", "cpu_feature_guard", "absl::InitializeLog"):
        assert noise not in proc.stderr, proc.stderr
    assert "Finished:" in proc.stdout
    # The user's own TF_CPP_MIN_LOG_LEVEL wins: TensorFlow's lines come back.
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    loud = subprocess.run([sys.executable, "-c", "import bot_keras, tensorflow as tf; tf.constant(1)"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert "I0000" in loud.stderr or "E0000" in loud.stderr, loud.stderr
