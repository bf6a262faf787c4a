"""Classify image files and print the top-k classes with their names and probabilities.

    python -m bot_keras.predict --model=PATH [--top_k=5] IMAGE [IMAGE ...]

PATH is any of:
  - a SavedModel directory written by `bot_keras.export` (its `serving_default` signature decodes and
    preprocesses the file bytes inside the graph; class names come from the export itself);
  - a run directory written by `bot_keras.train` (its final `model.keras`, or with `--checkpoint=best` its
    `model_best.keras`, rebuilt in float32 if it was trained in mixed precision), or either file itself,
    or the directory `--format=keras` writes;
  - any other `.keras` file, with `classes.txt` beside it; the image size comes from `flags.txt` beside it
    or else the model's input shape;
  - the directory `--format=tflite` writes, or its `model.tflite` (with `classes.txt` beside it): run by
    TensorFlow's TFLite interpreter one image at a time, the evaluation transform inside the model.
For run directories and `.keras` files the images go through `data.decode.decode_image` and
`preprocess_for_eval`, the evaluation transform of Section 2.1 of the paper that the SavedModel carries in
its graph.

Output, for each image:

    cat.jpg
      1. tabby_cat        0.8123
      2. tiger_cat        0.1010

Every model is routed to its task module (`bot_keras.tasks`; the task of a run's run.json, also when its
`model.keras` or `model_best.keras` is given, or an export's `task` variable, classification when it has
none): a segmentation model writes `<stem>_classes.png`
(class ids as grey levels) and `<stem>_overlay.png` (the photo under the class colours) per image into
`--output_dir` and prints the largest classes of each image; a detection model draws its boxes.
"""

import dataclasses
import pathlib
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import flags

from bot_keras import cli, model_files, run_dir, tasks
from bot_keras.data.augment import preprocess_for_eval
from bot_keras.data.decode import (
    MAX_IMAGE_PIXELS,
    check_encoded_image,
    decode_image,
    image_shape,
    pixel_limit_problem,
)
from bot_keras.export import TFLITE_FILE

COMMAND = "bot_keras.predict"


@dataclasses.dataclass(frozen=True)
class Classifier:
    """`probabilities(list of encoded images) -> float array [N, K]` and the K class names."""

    probabilities: Callable
    class_names: tuple
    kind: str  # "savedmodel", "keras", "run" or "tflite"


@dataclasses.dataclass(frozen=True)
class Prediction:
    class_id: int
    class_name: str
    probability: float


def _keras_classifier(model, class_names, image_size, kind):
    def probabilities(encoded_images):
        batch = tf.stack([preprocess_for_eval(decode_image(data), image_size) for data in encoded_images])
        return tf.nn.softmax(tf.cast(model(batch, training=False), tf.float32), axis=-1).numpy()

    return Classifier(probabilities=probabilities, class_names=tuple(class_names), kind=kind)


def _tflite_classifier(path):
    """The model `bot_keras.export --format=tflite` writes: one uint8 image [1, H, W, 3] a call, the input
    resized to each image's own size (the evaluation transform runs inside); classes.txt beside it."""
    class_names = _read_class_names(path.parent / run_dir.CLASSES_FILE)
    try:
        interpreter = tf.lite.Interpreter(model_path=str(path))
    except ValueError as err:  # not a flatbuffer, or a damaged one
        raise cli.SetupError(f"--model={path}: cannot load the TFLite model: {err}") from err
    details = interpreter.get_input_details()
    if len(details) != 1 or details[0]["dtype"] != np.uint8 or len(details[0]["shape"]) != 4:
        raise cli.SetupError(f"--model={path} is a TFLite model but not one bot_keras.export wrote "
                             "(it takes one uint8 image [1, H, W, 3])")

    def probabilities(encoded_images):
        rows = []
        for data in encoded_images:
            image = decode_image(data).numpy()[np.newaxis]
            interpreter.resize_tensor_input(details[0]["index"], image.shape)
            interpreter.allocate_tensors()
            rows.append(interpreter.get_signature_runner()(image=image)["probabilities"][0])
        return np.stack(rows)

    return Classifier(probabilities=probabilities, class_names=tuple(class_names), kind="tflite")


def _read_class_names(path):
    if not path.is_file():
        raise cli.SetupError(f"{path} is missing; it lists the class names (one a line, index order)")
    names = run_dir.read_class_names(path)
    if not names:
        raise cli.SetupError(f"{path} lists no classes")
    return names


def run_of_model_file(path):
    """(run directory, checkpoint) when `path` is a run directory's `model.keras` or `model_best.keras`
    (flags.txt beside it), else None: such a file is predicted from as its run, whatever the task."""
    path = pathlib.Path(path)
    names = {file: name for name, file in run_dir.CHECKPOINTS.items()}
    if path.is_file() and path.name in names and (path.parent / run_dir.FLAGS_FILE).is_file():
        return path.parent, names[path.name]
    return None


def load_classifier(path, checkpoint="final"):
    """A `Classifier` for a SavedModel directory, a `.keras` file or a run directory (module docstring;
    `checkpoint`: the run's final or best model); a path that is none of them, or a damaged one, raises
    cli.SetupError."""
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as err:  # a damaged SavedModel raises many TensorFlow error types
            raise cli.SetupError(f"--model={path}: cannot load the SavedModel: {err}") from err
        if "serving_default" not in loaded.signatures or not hasattr(loaded, "class_names"):
            raise cli.SetupError(
                f"--model={path} is a SavedModel but not one bot_keras.export wrote "
                "(it needs a serving_default signature and class_names)"
            )
        serve = loaded.signatures["serving_default"]

        def probabilities(encoded_images):
            return serve(image_bytes=tf.constant(list(encoded_images)))["probabilities"].numpy()

        names = tuple(name.decode() for name in loaded.class_names.numpy())
        return Classifier(probabilities=probabilities, class_names=names, kind="savedmodel")
    if path.is_dir() and (path / TFLITE_FILE).is_file():
        path = path / TFLITE_FILE
    if path.is_file() and path.suffix == ".tflite":
        if checkpoint != "final":
            raise cli.SetupError(f"--checkpoint={checkpoint} chooses a run directory's model; --model={path} "
                                 "is a TFLite export")
        return _tflite_classifier(path)
    # A run directory's final or best model: load it as the run (float32 rebuild included).
    path, checkpoint = run_of_model_file(path) or (path, checkpoint)
    if path.is_file() and path.suffix == ".keras":
        model = model_files.load_keras_model(path, label=f"--model={path}")
        class_names = _read_class_names(path.parent / run_dir.CLASSES_FILE)
        flagfile = path.parent / run_dir.FLAGS_FILE
        image_size = model.input_shape[1]
        if flagfile.is_file():
            image_size = run_dir.read_flags(
                flagfile, run_dir.command_flags(run_dir.CLASSIFICATION)
            ).image_size
        if image_size is None:
            raise cli.SetupError(f"{path} takes any image size and no flags.txt beside it gives --image_size")
        return _keras_classifier(model, class_names, image_size, "keras")
    if path.is_dir() and (path / run_dir.FLAGS_FILE).is_file():
        run = run_dir.read_run(path, checkpoint=checkpoint)
        return _keras_classifier(model_files.load_model(run), run.class_names, run.image_size, "run")
    if not path.exists():
        raise cli.SetupError(f"--model={path} does not exist")
    raise cli.SetupError(
        f"--model={path} is neither a SavedModel directory (saved_model.pb), a .keras or .tflite file "
        "nor a run directory (flags.txt, classes.txt, model.keras)"
    )


def read_images(paths, max_image_pixels=MAX_IMAGE_PIXELS):
    """The bytes of each image file; an error names the first file that is missing, not an image, or
    whose header declares more than `max_image_pixels` pixels (checked before anything decodes it)."""
    encoded = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            raise cli.SetupError(f"{path} is a directory; name the image files (e.g. {path / '*.jpg'})")
        if not path.is_file():
            raise cli.SetupError(f"image file {path} does not exist")
        data = path.read_bytes()
        if not bool(check_encoded_image(data)):
            raise cli.SetupError(f"{path} is not a complete JPEG, PNG, GIF or BMP image")
        height, width = (int(n) for n in image_shape(data))
        if height * width > max_image_pixels:
            raise cli.SetupError(
                f"{path} declares {width}x{height} = {height * width} pixels, over --max_image_pixels="
                f"{max_image_pixels} (a decompression bomb, or a photo to shrink first); it was not decoded"
            )
        encoded.append(data)
    return encoded


def top_k(probabilities, class_names, k):
    """For each row of `probabilities`, the k most likely classes, most likely first (ties: lower id)."""
    k = min(k, len(class_names))
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [Prediction(int(i), class_names[i], float(row[i])) for i in ids]
        for row, ids in zip(probabilities, order, strict=True)
    ]


def predict(model_path, image_paths, *, k=5, max_image_pixels=MAX_IMAGE_PIXELS, checkpoint="final"):
    """[(image path, [Prediction, ...]), ...] for the image files, in order (`checkpoint`: a run
    directory's final or best model)."""
    if k < 1:
        raise cli.SetupError(f"k={k} must be at least 1")
    classifier = load_classifier(model_path, checkpoint)
    encoded = read_images(image_paths, max_image_pixels)
    return list(
        zip(image_paths, top_k(classifier.probabilities(encoded), classifier.class_names, k), strict=True)
    )


def format_predictions(results):
    lines = []
    for path, predictions in results:
        lines.append(str(path))
        width = max(len(p.class_name) for p in predictions)
        lines.extend(
            f"  {rank}. {p.class_name:<{width}}  {p.probability:.4f}"
            for rank, p in enumerate(predictions, start=1)
        )
    return "\n".join(lines)


def model_task(path):
    """The task of the model at `path`: a run directory's run.json, a SavedModel's `task` variable (a
    classifier's export has none), else classification."""
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as err:  # a damaged SavedModel raises many TensorFlow error types
            raise cli.SetupError(f"--model={path}: cannot load the SavedModel: {err}") from err
        task = getattr(loaded, "task", None)
        return task.numpy().decode() if task is not None else run_dir.CLASSIFICATION
    if path.is_dir() and (path / run_dir.FLAGS_FILE).is_file():
        return run_dir.read_task(path)
    return run_dir.CLASSIFICATION


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string(
        "model", None,
        "SavedModel directory, .keras or .tflite file (or its export directory), or run directory.", **d,
    )
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.", lower_bound=1, **d)
    flags.DEFINE_enum(
        "checkpoint", "final", list(run_dir.CHECKPOINTS),
        "With a run directory as --model: final: model.keras; best: model_best.keras (a run trained with "
        "--keep_best).", **d,
    )
    flags.DEFINE_string("output_dir", "predictions", "Segmentation: where class maps and overlays go.", **d)
    flags.DEFINE_integer(
        "max_image_pixels", MAX_IMAGE_PIXELS,
        "Refuse images whose header declares more pixels (height x width), before decoding them.", **d,
    )


def main(argv, f=flags.FLAGS):
    if len(argv) < 2:
        raise cli.SetupError("name at least one image: python -m bot_keras.predict --model=PATH IMAGE ...")
    problem = pixel_limit_problem(f.max_image_pixels)
    if problem:
        raise cli.SetupError(f"--max_image_pixels {problem}")
    if f.checkpoint != "final" and not (pathlib.Path(f.model) / run_dir.FLAGS_FILE).is_file():
        raise cli.SetupError(
            f"--checkpoint={f.checkpoint} chooses a run directory's model; --model={f.model} is not a run "
            "directory"
        )
    model, checkpoint = run_of_model_file(f.model) or (f.model, f.checkpoint)
    task = tasks.task_module(model_task(model))
    encoded = read_images(argv[1:], f.max_image_pixels)  # every header checked before anything decodes
    lines = task.predict_files(model, argv[1:], f.output_dir, encoded, k=f.top_k, checkpoint=checkpoint)
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("model",))
