"""The frozen distillation teacher of Section 5.3: loading it and asking it for logits.

`--teacher` is a bot_keras classification run directory (its final model, rebuilt at the student's size
when it trained at another), a `.keras` file (e.g. a teacher run's `model.keras`), a SavedModel directory
whose serving signature takes normalised float32 images (Keras' `model.export`), or `NAME:WEIGHTS` (a model
of `bot_keras.models` built at the student's size, then `load_weights`). Errors name the file and the
mismatch as a `SetupError`.
"""

import os

import keras
import tensorflow as tf

from bot_keras import model_files, run_dir
from bot_keras.cli import SetupError
from bot_keras.models import MODEL_NAMES, build_model


def parse_teacher_spec(spec):
    """`(model name, weights path)` for a `NAME:WEIGHTS` spec, else `(None, spec)` (a path that may
    itself hold a ':')."""
    name, sep, weights = spec.partition(":")
    if sep and name in MODEL_NAMES and not os.path.exists(spec):
        return name, weights
    return None, spec


def load_teacher(spec, *, num_classes, image_size):
    """The teacher for `spec` (module docstring): a frozen `keras.Model` or a loaded SavedModel, checked
    to predict `num_classes` classes from `image_size` images."""
    name, path = parse_teacher_spec(spec)
    if name is not None:
        teacher = build_model(name, num_classes=num_classes, input_shape=(image_size, image_size, 3))
        try:
            teacher.load_weights(path)
        except Exception as error:  # any failure to read is reported with the file name
            raise SetupError(
                f"--teacher={spec!r}: cannot load weights {path!r} into {name}: {error}"
            ) from None
    elif os.path.isfile(os.path.join(path, run_dir.FLAGS_FILE)):  # a run directory
        try:
            run = run_dir.read_run(path)
        except SetupError as error:  # not a finished classification run
            raise SetupError(f"--teacher={spec!r}: {error}") from None
        teacher = model_files.at_resolution(model_files.load_model(run), run, image_size)
    elif os.path.isdir(path) and not path.endswith(".keras"):
        try:
            loaded = tf.saved_model.load(path)
        except Exception as error:  # a damaged SavedModel raises many TensorFlow error types
            raise SetupError(f"--teacher={spec!r} is not a readable SavedModel: {error}") from None
        teacher = (
            keras.layers.TFSMLayer(path, call_endpoint="serving_default") if not callable(loaded) else loaded
        )
    else:
        teacher = model_files.load_keras_model(path, label=f"--teacher={spec!r}")
    if isinstance(teacher, keras.Model):
        teacher.trainable = False
        classes = teacher.output_shape[-1]
        size = tuple(teacher.input_shape[1:3])
    else:
        try:
            probe = teacher(tf.zeros((1, image_size, image_size, 3)))
        except Exception as error:  # any signature mismatch is reported with the file name
            raise SetupError(
                f"--teacher={spec!r}: its serving signature does not take normalised float32 "
                f"[N, {image_size}, {image_size}, 3] images (a bot_keras.export SavedModel takes image bytes "
                "and preprocesses itself; pass the teacher run's model.keras instead): "
                f"{str(error).splitlines()[0]}"
            ) from None
        probe = next(iter(probe.values())) if isinstance(probe, dict) else probe
        classes, size = probe.shape[-1], (None, None)
    if classes != num_classes:
        raise SetupError(f"--teacher={spec!r} predicts {classes} classes; the dataset has {num_classes}.")
    if None not in size and size != (image_size, image_size):
        raise SetupError(f"--teacher={spec!r} takes {size[0]}x{size[1]} images; --image_size={image_size}.")
    return teacher


def teacher_logits(teacher, images):
    """The teacher's float32 logits for `images`, in inference mode, with no gradient."""
    out = teacher(images, training=False) if isinstance(teacher, keras.Model) else teacher(images)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return tf.stop_gradient(tf.cast(out, tf.float32))
