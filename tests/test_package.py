"""The package installs, imports and exposes the layout the other modules rely on."""

import importlib
import re

import bot_keras


def test_version_is_semver():
    assert re.fullmatch(r"\d+\.\d+\.\d+", bot_keras.__version__)


def test_subpackages_import():
    for name in ("bot_keras.models", "bot_keras.data"):
        assert importlib.import_module(name).__name__ == name


def test_keras3_and_tensorflow_221():
    import keras
    import tensorflow as tf

    assert keras.__version__.startswith("3.")
    assert tf.__version__.startswith("2.21.")
    # Keras 3 is the Keras TensorFlow hands out (no tf_keras / Keras 2 fallback).
    assert tf.keras.__name__.startswith("keras")


def test_no_tensorflow_addons_dependency():
    from importlib.metadata import requires

    deps = " ".join(requires("bot-keras") or [])
    assert "tensorflow-addons" not in deps and "tensorflow_addons" not in deps
