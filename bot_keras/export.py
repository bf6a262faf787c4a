"""Export a training run as a SavedModel, a `.keras` file or a TFLite model.

    python -m bot_keras.export --model_dir=RUN --export_dir=DIR [--format=savedmodel|keras|tflite]
        [--overwrite] [--quantize=none|dynamic] [--top_k=5]

Export reads a run directory (written by `bot_keras.train`) through `bot_keras.run_dir`: its `flags.txt`
(the model name and image size), `classes.txt` and final `model.keras`.

The SavedModel is a `tf.Module` with two signatures, both running the evaluation transform of Section 2.1
of the paper (shorter side to S/0.875, centre crop S, normalise; `data.augment.preprocess_for_eval`, the
very function evaluation uses) inside the graph, so a client sends pixels or file bytes and nothing else:

  serving_default(image_bytes: string [N])         JPEG/PNG/GIF/BMP bytes, any size each
  serving_images(images: uint8 [N, H, W, 3])       a batch of decoded images, any H and W

Both return `logits` [N, K], `probabilities` [N, K], `top_k_ids` [N, k], `top_k_probabilities` [N, k] and
`top_k_names` [N, k] (class names from the run's `classes.txt`). The loaded object also carries
`class_names` and `image_size` as variables.

Low-precision training (Section 3.2) keeps float32 master weights; a model trained under
`mixed_float16`/`mixed_bfloat16` is exported from a float32 rebuild of the same architecture with those
weights copied in (`model_files.load_model`), because float16 graphs are slow on CPU and TFLite rejects them.

The TFLite model takes one uint8 image [1, H, W, 3] (resize the input tensor to the image's H and W) and
runs the same evaluation transform before the network; `--quantize=dynamic` stores the weights as int8
(dynamic-range quantisation) while activations stay float.

The SavedModel's module comes from the run's task module (`bot_keras.tasks`); every task's
`serving_default` takes a batch `image_bytes: string [N]`. A segmentation or detection run exports as
`savedmodel` or `keras` only (TFLite is the classifier's): a segmentation run's `serving_default` returns
`class_map` int32 [N, Hmax, Wmax] (padded with -1 to the batch's largest image), `height` and `width`
int32 [N], and `serving_single(image_bytes: string [])` one image's `class_map` [H, W], with the evaluation's
preprocessing inside (`segmentation/export.py`); a detection run's, boxes (`detection/export.py`).

Every export is written to a temporary sibling of `--export_dir` and renamed into place at the end, so a
failed export leaves nothing half-written; an existing `--export_dir` is replaced only with `--overwrite`.
"""

import os
import pathlib
import shutil
import uuid

import keras
import tensorflow as tf
from absl import flags

from bot_keras import atomic_write, cli, model_files, run_dir, tasks
from bot_keras.data.augment import preprocess_for_eval
from bot_keras.data.decode import MAX_IMAGE_PIXELS, decode_image, serving_checks

COMMAND = "bot_keras.export"
FORMATS = ("savedmodel", "keras", "tflite")
QUANTIZE = ("none", "dynamic")
SIGNATURES = ("serving_default", "serving_images")
TFLITE_FILE = "model.tflite"
KERAS_FILE = "model.keras"


class ServingModule(tf.Module):
    """The exported object: a float32 classifier behind the two serving signatures (module docstring)."""

    def __init__(self, model, *, class_names, image_size, top_k, max_image_pixels=MAX_IMAGE_PIXELS):
        super().__init__(name="bot_keras_classifier")
        self.model = model
        self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
        self.image_size = tf.Variable(image_size, trainable=False, name="image_size")
        self.max_image_pixels = tf.Variable(int(max_image_pixels), trainable=False, name="max_image_pixels")
        self._max_pixels = int(max_image_pixels)
        self._size = int(image_size)
        self._top_k = min(int(top_k), len(class_names))

    def _preprocess(self, images_or_bytes, decode):
        """Per image (each may have its own size): [decode_image →] preprocess_for_eval."""
        size = self._size

        def one(x):
            return preprocess_for_eval(decode_image(x) if decode else x, size)

        return tf.map_fn(one, images_or_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

    def _outputs(self, images):
        logits = tf.cast(self.model(images, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        top = tf.math.top_k(probabilities, k=self._top_k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "top_k_ids": top.indices,
            "top_k_probabilities": top.values,
            "top_k_names": tf.gather(self.class_names, top.indices),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        with tf.control_dependencies(serving_checks("serving_default", image_bytes, self._max_pixels)):
            images = self._preprocess(tf.identity(image_bytes), decode=True)
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(self, images):
        shape = tf.shape(images)
        checks = [
            _assert_batch_not_empty("serving_images", images),
            tf.debugging.Assert(
                tf.logical_and(shape[1] > 0, shape[2] > 0),
                [
                    "serving_images: images need a height and width of at least 1 pixel; got shape",
                    shape,
                ],
            ),
        ]
        with tf.control_dependencies(checks):
            batch = self._preprocess(tf.identity(images), decode=False)
        return self._outputs(batch)


def _assert_batch_not_empty(signature, batch):
    return tf.debugging.Assert(
        tf.shape(batch)[0] > 0, [f"{signature}: got an empty batch; send at least one image"]
    )


def _tflite_bytes(model, image_size, quantize, scratch):
    """TFLite flatbuffer of preprocess_for_eval + model for one uint8 image [1, H, W, 3]."""

    def classify(image):
        # TFLite's RESIZE_BILINEAR needs the same input and output type, and TensorFlow's bilinear resize of
        # uint8 computes in float32 anyway: casting first gives the same pixels (the agreement test checks).
        batch = preprocess_for_eval(tf.cast(image[0], tf.float32), image_size)[tf.newaxis]
        logits = tf.cast(model(batch, training=False), tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    # Through a Keras ExportArchive SavedModel: converting a tf.function that merely captures the Keras
    # variables (from_concrete_functions, or a plain tf.Module SavedModel) leaves them as uninitialised
    # TFLite resource variables in TF 2.21, and the interpreter returns NaN.
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec([1, None, None, 3], tf.uint8, name="image")]
    archive.add_endpoint("serving_default", classify, input_signature=signature)
    archive.write_out(str(scratch), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(scratch))
    if quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    return converter.convert()


def _write(run, model, staging, *, export_format, quantize, top_k):
    if export_format == "savedmodel":
        module, signatures = tasks.task_module(run.task).serving_module(run, model, top_k=top_k)
        tf.saved_model.save(module, str(staging), signatures=signatures)
        extra = staging / "assets.extra"  # TF Serving's place for files the graph does not read
        extra.mkdir()
    elif export_format == "keras":
        model.save(staging / KERAS_FILE)
        extra = staging
    else:
        scratch = staging / "savedmodel-for-tflite"
        (staging / TFLITE_FILE).write_bytes(_tflite_bytes(model, run.image_size, quantize, scratch))
        shutil.rmtree(scratch)
        extra = staging
    for name in (run_dir.CLASSES_FILE, run_dir.FLAGS_FILE, run_dir.RUN_FILE):
        if (run.model_dir / name).is_file():
            shutil.copyfile(run.model_dir / name, extra / name)


def export(model_dir, export_dir, *, export_format="savedmodel", overwrite=False, quantize="none", top_k=5,
           checkpoint="final"):
    """Exports the run in `model_dir` to `export_dir`; returns the export directory as a Path. Bad
    options or a bad run directory raise cli.SetupError naming them. `checkpoint="best"` exports
    `model_best.keras` (`--keep_best`) instead of `model.keras`."""
    if export_format not in FORMATS:
        raise cli.SetupError(f"export_format={export_format} is not one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise cli.SetupError(f"quantize={quantize} is not one of {', '.join(QUANTIZE)}")
    if quantize != "none" and export_format != "tflite":
        raise cli.SetupError(
            f"quantize={quantize} applies to export_format=tflite only (got {export_format})"
        )
    if top_k < 1:
        raise cli.SetupError(f"top_k={top_k} must be at least 1")
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and not overwrite:
        raise cli.SetupError(f"--export_dir={export_dir} already exists; pass --overwrite to replace it")
    task = run_dir.read_task(model_dir) if pathlib.Path(model_dir).is_dir() else run_dir.CLASSIFICATION
    if task != run_dir.CLASSIFICATION and export_format == "tflite":
        raise cli.SetupError(
            f"{model_dir} is a {task} run; --format=tflite exports classification runs only: use "
            "--format=savedmodel (or keras)"
        )
    run = run_dir.read_run(model_dir, task=task, checkpoint=checkpoint)
    model = model_files.load_model(run)

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(export_dir, "partial")
    try:
        _write(run, model, staging, export_format=export_format, quantize=quantize, top_k=top_k)
        if export_dir.exists():  # --overwrite: move the old export aside, swap, then delete it
            retired = _sibling(export_dir, "old")
            os.rename(export_dir, retired / export_dir.name)
            try:
                os.rename(staging, export_dir)
            except BaseException:
                os.rename(retired / export_dir.name, export_dir)  # put the old export back
                shutil.rmtree(retired)
                raise
            shutil.rmtree(retired)
        else:
            os.rename(staging, export_dir)
    except OSError as error:  # a full disk (ENOSPC, EIO): the previous export is left as it was
        shutil.rmtree(staging, ignore_errors=True)
        raise atomic_write.write_error(
            export_dir, error, "any previous export is intact; free space and export again"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


def _sibling(path, kind):
    """A new empty directory next to `path` (same filesystem, so a rename is atomic); mkdir, unlike
    tempfile.mkdtemp, keeps the umask's permissions, which a serving process of another user needs."""
    sibling = path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sibling.mkdir()
    return sibling


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Run directory written by bot_keras.train.", **d)
    flags.DEFINE_string("export_dir", None, "Directory to create (must not exist unless --overwrite).", **d)
    flags.DEFINE_enum("format", "savedmodel", FORMATS, "What to write.", **d)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --export_dir.", **d)
    flags.DEFINE_enum(
        "quantize", "none", QUANTIZE, "TFLite only: dynamic-range (int8 weight) quantisation.", **d
    )
    flags.DEFINE_integer(
        "top_k", 5, "SavedModel only: how many classes the top_k_* outputs hold.", lower_bound=1, **d
    )
    flags.DEFINE_enum(
        "checkpoint", "final", list(run_dir.CHECKPOINTS),
        "final: model.keras; best: model_best.keras (a run trained with --keep_best).", **d,
    )


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    path = export(
        f.model_dir,
        f.export_dir,
        export_format=f.format,
        overwrite=f.overwrite,
        quantize=f.quantize,
        top_k=f.top_k,
        checkpoint=f.checkpoint,
    )
    print(f"exported {f.model_dir} ({f.format}) to {path}")


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("model_dir", "export_dir"))
