"""Shared test set-up: quiet TensorFlow, a fresh Keras state per test, and the train-flags parser."""

import os

# Before TensorFlow is imported anywhere: no C++ INFO/WARNING spam, no oneDNN notice, no GPU probing.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with the float32 policy and a fresh Keras name scope. Without Keras' forced
    garbage collection: at 0.2-1 s a test it was a sixth of the suite, and Python's own collector runs."""
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session(free_memory=False)


@pytest.fixture
def parse(monkeypatch):
    """Parses a `bot_keras.train` command line into a fresh `absl.flags.FlagValues` holding the trainer's
    flags (from the repository root, where nested `--flagfile=configs/...` paths resolve)."""
    import pathlib

    from absl import flags

    from bot_keras import train

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parent.parent)

    def _parse(*args):
        flag_values = flags.FlagValues()
        train.define_flags(flag_values)
        flag_values(["train", *args])
        return flag_values

    return _parse
