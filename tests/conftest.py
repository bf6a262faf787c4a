"""Shared test set-up: quiet TensorFlow, CPU only, and the `gpu` marker's skip."""

import os

# Before TensorFlow is imported anywhere: no C++ INFO/WARNING spam, no oneDNN notice, no GPU probing.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    skip = pytest.mark.skip(reason="needs a GPU; TensorFlow sees none")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with the float32 policy and a fresh Keras name scope."""
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
