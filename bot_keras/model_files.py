"""Model files: loading a `.keras` file (damage named, not a traceback), a finished run's model for
inference (float32, mixed-precision runs rebuilt) and a classification run's backbone for fine-tuning.

    load_keras_model(path)          `keras.models.load_model`, or a SetupError saying what is wrong
    load_model(run)                 a `run_dir.read_run` run's model.keras (or model_best.keras), float32
    load_backbone(model_dir)        `build_backbone` of a classification run holding its trained weights
    at_resolution(model, run, size) the classifier at another input size, same weights (evaluate --image_size)
    copy_weights(target, source)    weight by weight, shapes checked
"""

import pathlib
import zipfile

import keras
import tensorflow as tf

from bot_keras import tasks
from bot_keras.cli import SetupError
from bot_keras.models import build_backbone, build_model
from bot_keras.run_dir import CLASSES_FILE, CLASSIFICATION, read_run, resume_cure


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


def at_resolution(model, run, image_size):
    """The classifier `model` taking `image_size` × `image_size` images: the model itself when it already
    does (or takes any size); else the run's `--model` rebuilt at that size with every weight copied. A
    ResNet's, MobileNet's or Inception's weights do not depend on the input size (global average pooling
    before the head), so `evaluate --image_size` can test a run at another resolution than it trained at."""
    if tuple(model.input_shape[1:3]) in ((image_size, image_size), (None, None)):
        return model
    try:
        rebuilt = build_model(
            run.model_name, num_classes=len(run.class_names), input_shape=(image_size, image_size, 3),
            drop_path_rate=run.flags.get("drop_path_rate", 0.0),
        )
    except ValueError as error:  # e.g. Inception-V3 below 75 px
        raise SetupError(f"--image_size={image_size}: {run.model_name} cannot be built at that size "
                         f"({error})") from error
    label = f"{run.model_path} (--model={run.model_name} at {image_size} px)"
    return copy_weights(rebuilt, model, label=label)


def copy_weights(target, source, *, label):
    """Assigns every weight of `source` to `target` in order (cast to the target's dtype), each shape
    checked; returns `target`. `label` names the source in the SetupError of a mismatch."""
    if len(target.weights) != len(source.weights):
        raise SetupError(
            f"{label} has {len(source.weights)} weights but its rebuild has {len(target.weights)}; "
            "the run's flags do not describe its model"
        )
    for to, source_weight in zip(target.weights, source.weights, strict=True):
        if tuple(to.shape) != tuple(source_weight.shape):
            raise SetupError(
                f"{label}: weight {source_weight.path} has shape {tuple(source_weight.shape)} but the "
                f"rebuild expects {tuple(to.shape)} ({to.path})"
            )
        to.assign(tf.cast(source_weight.value, to.dtype))
    return target


def load_backbone(model_dir, **backbone_kwargs):
    """`build_backbone` of the run's architecture holding the trained classifier's weights (copied layer by
    layer by `models.load_classifier_weights`; the `logits` head is left out). `backbone_kwargs` go to
    `build_backbone` (e.g. `output_stride`, `input_shape`): the start for segmentation or detection."""
    run = read_run(model_dir)
    return build_backbone(run.model_name, weights_from=load_model(run), **backbone_kwargs)
