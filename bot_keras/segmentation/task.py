"""Semantic segmentation as a `bot_keras.finetune` task (paper Section 6.2: FCN on ADE20K).

The task contract is `bot_keras.tasks.Task`; what the transfer tasks share (the backbone flags and
weights) is `bot_keras.transfer`. Here: the flags `--head`,
`--aux_loss_weight`, `--eval_mode`, `--eval_size`; the data of `data.py` with `augment.py`'s transforms;
`heads.build_segmenter`; the loss of `losses.py` (FCN's auxiliary head weighted by `--aux_loss_weight`,
GluonCV's 0.5); training logs the mean per-image pixel accuracy of the crops, evaluation sums one confusion
matrix (`metrics.py`) over the split and reports pixel accuracy, mean IoU and per-class IoU.

Inference (export and predict) is `export.SegmentationServingModule`: each image is shrunk to fit the
evaluation size S when it is larger (never enlarged), normalised and padded to S×S as evaluation does, the
logits of the valid region are resized back to the input's size and the class map is their argmax. For an
image no larger than S this is exactly the evaluation transform ("pad") at the image's own resolution.
"""

import importlib.util
import pathlib

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from bot_keras import cli, model_files, run_dir, steps, tasks, transfer
from bot_keras.data.decode import MAX_IMAGE_PIXELS, decode_image
from bot_keras.segmentation import augment, data, export, heads, losses, metrics

NAME = tasks.SEGMENTATION
SCHEDULE_NAMES = transfer.SCHEDULE_NAMES
DEFAULT_OUTPUT_STRIDE = 8  # the paper's FCN (GluonCV's dilated ResNet)
PREDICT_BATCH = 8  # images per serving call in predict_files (a batch holds its decoded images at once)
CSV_COLUMNS = (
    "loss",
    "pixel_accuracy",
    "lr",
    "images_per_sec",
    "val_loss",
    "val_pixel_accuracy",
    "val_mean_iou",
)
BEST_METRICS = ("val_mean_iou", "val_pixel_accuracy", "val_loss")  # --keep_best


def define_flags(fv):
    """The transfer tasks' flags (`transfer.define_flags`), then segmentation's own."""
    transfer.define_flags(fv)
    d = dict(flag_values=fv)
    flags.DEFINE_string("head", "fcn", "Segmentation head: " + " | ".join(heads.HEADS) + ".", **d)
    flags.DEFINE_float(
        "aux_loss_weight",
        losses.AUX_WEIGHT,
        "FCN's auxiliary head on stage 3, weight of its loss (0: no auxiliary head).",
        **d,
    )
    flags.DEFINE_string(
        "eval_mode",
        "pad",
        "Validation transform: pad (whole image, padded to --eval_size) "
        "| center (shorter side to --eval_size, centre crop).",
        **d,
    )
    flags.DEFINE_integer(
        "eval_size",
        0,
        "Validation size S. 0: with pad, the --eval_split's largest image (its longer side, read from the "
        "file headers before training, rounded up to the output stride, at least --crop_size); with center, "
        "--crop_size. With pad, at least the largest validation image; each image costs S x S pixels of "
        "memory, whatever its own size. Exports fit larger images into S x S.",
        **d,
    )


def flag_problems(f):
    problems = transfer.flag_problems(f)
    if f.dataset:
        try:
            data.parse_source(f.dataset)
        except ValueError as error:
            problems.append(f"--dataset: {error}")
    if f.head not in heads.HEADS:
        problems.append(f"--head={f.head!r} is not one of {', '.join(heads.HEADS)}.")
    if f.head == "deeplabv3" and importlib.util.find_spec("keras_hub") is None:
        problems.append(
            "--head=deeplabv3 needs keras-hub (Python >= 3.11): pip install 'bot-keras[transfer]'."
        )
    if f.aux_loss_weight < 0:
        problems.append(f"--aux_loss_weight={f.aux_loss_weight} must be >= 0.")
    if f.head == "deeplabv3" and f["aux_loss_weight"].present and f.aux_loss_weight > 0:
        problems.append(
            f"--aux_loss_weight={f.aux_loss_weight}: the auxiliary head is FCN's; --head=deeplabv3 has none."
        )
    if f.eval_mode not in augment.EVAL_MODES:
        problems.append(f"--eval_mode={f.eval_mode!r} is not one of {', '.join(augment.EVAL_MODES)}.")
    if f.eval_size < 0 or 0 < f.eval_size < 32:
        problems.append(f"--eval_size={f.eval_size} must be 0 (from the data) or at least 32.")
    if (f.dataset and f.dataset.startswith("tfds:") and f.eval_split and f.eval_mode == "pad"
            and not f.eval_size):
        problems.append(
            f"--eval_mode=pad with --eval_size=0 adapts to the validation images' file headers, which "
            f"--dataset={f.dataset} (TFDS records) does not have: set --eval_size to at least its largest "
            "image's longer side, or use --eval_mode=center."
        )
    return problems


def eval_size(f):
    """The evaluation size S: --eval_size; unset (0), --crop_size. A run's readers pass `tasks.run_flags`,
    whose `eval_size` is the one the run resolved (`preflight`, recorded in run.json) when it did."""
    return f.eval_size or f.crop_size


def adaptive_eval_size(longest_side, *, crop_size, output_stride):
    """The pad-mode evaluation size for a split whose largest image has `longest_side`: rounded up to a
    multiple of `output_stride`, and never below `crop_size` (the size exports fit larger images into).

    The stride because DeepLabV3's decoder upsamples its stride-`output_stride` features by fixed factors
    (to P2, then to the input) and concatenates them with P2's: the input must be a multiple of the output
    stride for the shapes to meet. FCN resizes its logits to any input size; the same rule costs it at most
    `output_stride - 1` rows of padding (the ignore label) and keeps one rule for both heads."""
    rounded = -(-int(longest_side) // output_stride) * output_stride
    return max(int(crop_size), rounded)


def preflight(f):
    """`{"eval_size": S}`, the evaluation size the run uses (`eval_size(f)`, or with --eval_mode=pad and
    --eval_size=0 `adaptive_eval_size` of the --eval_split's largest image, read from the file headers
    once, before the first step). A given --eval_size smaller than that image is a SetupError naming the
    image, its size and the flag."""
    size = eval_size(f)
    if not f.eval_split or f.eval_mode != "pad" or data.parse_source(f.dataset)[0] == "tfds":
        return {"eval_size": size}  # (tfds with pad and --eval_size=0: refused by flag_problems)
    largest = data.largest_image(f.dataset, f.eval_split, f.data_dir, max_image_pixels=f.max_image_pixels)
    if largest is None:
        return {"eval_size": size}
    path, height, width = largest
    if not f.eval_size:
        stride = transfer.output_stride(f, DEFAULT_OUTPUT_STRIDE)
        size = adaptive_eval_size(max(height, width), crop_size=f.crop_size, output_stride=stride)
        return {"eval_size": size}
    if max(height, width) > f.eval_size:
        raise cli.SetupError(
            f"--eval_size={f.eval_size} is smaller than the largest image of --eval_split={f.eval_split!r}, "
            f"{path} ({height}x{width} pixels, height x width): --eval_mode=pad evaluates whole images, so "
            f"set --eval_size to at least {max(height, width)}, or 0 to adapt to the split, or use "
            "--eval_mode=center."
        )
    return {"eval_size": size}


def uses_aux(f):
    return f.head == "fcn" and f.aux_loss_weight > 0


# --- data, model, loss, metrics (the training command's) --------------------------------------------------


def dataset_info(f, split):
    return data.dataset_info(f.dataset, split=split, data_dir=f.data_dir)


def make_dataset(f, *, split, training, input_context=None, batch_size=None, skipped_files=None):
    return data.make_segmentation_dataset(
        f.dataset,
        split=split,
        crop_size=f.crop_size if training else eval_size(f),
        global_batch_size=batch_size or f.batch_size,
        training=training,
        data_dir=f.data_dir,
        input_context=input_context,
        seed=f.seed,
        eval_mode=f.eval_mode,
        skip_corrupt=f.skip_corrupt,
        skipped_files=skipped_files,
        max_image_pixels=f.max_image_pixels,
    )


initial_weights = transfer.initial_weights


def build_model(f, *, num_classes, output_stride=None, weights_from=None):
    """`heads.build_segmenter` of the flags; any input size (training crops and whole validation images)."""
    return heads.build_segmenter(
        f.head,
        f.backbone,
        num_classes=num_classes,
        output_stride=output_stride or transfer.output_stride(f, DEFAULT_OUTPUT_STRIDE),
        aux=uses_aux(f),
        weights_from=weights_from,
    )


def inference_model(model):
    """The model without FCN's auxiliary output (training only): logits [B, H, W, K]."""
    if isinstance(model.output, dict):
        return keras.Model(model.inputs[0], model.output["logits"], name=model.name)  # one input, not a list
    return model


def final_model(f, model, *, num_classes):
    return transfer.final_model(
        f, model, inference_model=inference_model, build_model=build_model, num_classes=num_classes
    )


def per_example_loss(f):
    aux_weight = f.aux_loss_weight

    def loss(labels, outputs, teacher_outputs=None):
        del teacher_outputs
        return losses.segmentation_loss(labels, outputs, aux_weight=aux_weight)

    return loss


def _pixel_accuracy_sums(per_example_loss, labels, outputs):
    """Summed loss, per-image pixel accuracy (labelled pixels) and the image count of one replica's batch."""
    logits = losses.main_logits(outputs)
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(tf.not_equal(labels, metrics.IGNORE_LABEL), tf.float32)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32) * valid
    per_image = tf.math.divide_no_nan(tf.reduce_sum(correct, [1, 2]), tf.reduce_sum(valid, [1, 2]))
    return {
        "loss": tf.reduce_sum(per_example_loss),
        "pixel_accuracy": tf.reduce_sum(per_image),
        "count": tf.cast(tf.shape(labels)[0], tf.float32),
    }


TRAIN_METRICS = steps.Metrics(("loss", "pixel_accuracy", "count"), _pixel_accuracy_sums)


def train_options(f, *, model, num_classes):
    del num_classes
    transfer.freeze(f, model)
    return tasks.TrainOptions(step_kwargs=dict(per_example_loss=per_example_loss(f), metrics=TRAIN_METRICS))


def _eval_loss(labels, outputs, teacher_outputs=None):
    del teacher_outputs
    return losses.pixel_cross_entropy(labels, losses.main_logits(outputs))


class Evaluator:
    """`evaluate(dataset) -> {"loss", "pixel_accuracy", "mean_iou", "count"}` from one confusion matrix
    summed over the split (`metrics.summarize`); `.details` holds the last call's per-class IoU and
    confusion matrix (`.confusion`) for the JSON files."""

    def __init__(self, strategy, model, class_names):
        self.class_names = tuple(class_names)
        k = len(self.class_names)

        def sums(per_example_loss, labels, outputs):
            predictions = tf.argmax(losses.main_logits(outputs), -1)
            return {
                "loss": tf.reduce_sum(per_example_loss),
                "count": tf.cast(tf.shape(labels)[0], tf.float32),
                "confusion": metrics.confusion_matrix(labels, predictions, k),
            }

        summed = steps.Metrics(("loss", "count", "confusion"), sums, shapes={"confusion": (k, k)})
        self._evaluate = steps.make_eval_function(
            strategy, model, per_example_loss=_eval_loss, metrics=summed, summarize=self._summarize
        )
        self.details, self.confusion = {}, None

    def _summarize(self, totals):
        confusion = np.rint(totals["confusion"]).astype(np.int64)
        summary = metrics.summarize(confusion, list(self.class_names))
        self.confusion = confusion
        self.details = {"per_class_iou": summary["per_class_iou"]}
        count = float(totals["count"])
        return {
            "loss": float(totals["loss"]) / max(count, 1.0),
            "pixel_accuracy": summary["pixel_accuracy"],
            "mean_iou": summary["mean_iou"],
            "count": int(count),
        }

    def __call__(self, dataset):
        return self._evaluate(dataset)


def make_evaluator(f, strategy, model, class_names):
    del f
    return Evaluator(strategy, model, class_names)


# --- bot_keras.evaluate, export and predict ---------------------------------------------------------------


def evaluate_run(run, *, dataset=None, split=None, data_dir=None, batch_size=None):
    """Evaluates a segmentation run's model.keras on a split (default: the run's --eval_split), with the
    run's validation transform; returns (result for the JSON, one-line summary)."""
    f, split = tasks.evaluation_flags(
        run, split=split, default_split="validation", dataset=dataset, data_dir=data_dir,
        batch_size=batch_size,
    )
    with cli.setup_errors(f"--dataset={f.dataset}"):
        info = dataset_info(f, split)
    tasks.check_same_classes(
        run.class_names, info.class_names, expected_label=f"{run.model_dir / run_dir.CLASSES_FILE} lists",
        found_label=f"--dataset={f.dataset!r} split {split!r} has", consequence=": other classes.",
    )
    model = model_files.load_model(run)
    evaluator = Evaluator(tf.distribute.get_strategy(), model, run.class_names)
    with cli.setup_errors(f"--dataset={f.dataset}"):
        batches = make_dataset(f, split=split, training=False)
    with tasks.bad_input("Evaluation"):
        result = evaluator(batches)
    result.update(
        evaluator.details,
        confusion=evaluator.confusion.tolist(),
        split=split,
        dataset=f.dataset,
        eval_mode=f.eval_mode,
        eval_size=eval_size(f),
        model=str(run.model_path),
    )
    line = (
        f"{f.dataset} {split} ({result['count']} images): pixel accuracy "
        f"{100 * result['pixel_accuracy']:.2f}%  mIoU {100 * result['mean_iou']:.2f}%"
    )
    return result, line


def serving_module(run, model, *, top_k=None):
    """`export.SegmentationServingModule` (`serving_default` on a batch, `serving_single` on one image)."""
    del top_k  # a class map has no top-k
    module = export.SegmentationServingModule(
        model, class_names=run.class_names, eval_size=eval_size(tasks.run_flags(run)),
        max_image_pixels=run.flags.get("max_image_pixels", MAX_IMAGE_PIXELS),
    )
    return module, module.signatures()


def colour_overlay(image, classes, alpha=0.5):
    """uint8 photo [H, W, 3] blended with the VOC colour of each pixel's class (255 = ignore: left as is)."""
    colours = data.voc_colormap()[np.clip(classes, 0, 255)].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def load_predictor(path, checkpoint="final"):
    """`predict(list of encoded images) -> [int32 class map [H, W] per image]` and the class names, from a
    SavedModel written by `bot_keras.export` or a segmentation run directory (its `checkpoint`'s model,
    through the very module the export saves)."""
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
        names = tuple(n.decode() for n in loaded.class_names.numpy())
    else:
        run = run_dir.read_run(path, task=NAME, checkpoint=checkpoint)
        serve = serving_module(run, model_files.load_model(run))[0].serve_bytes
        names = run.class_names

    def predict(encoded_images):
        out = {k: v.numpy() for k, v in serve(image_bytes=tf.constant(list(encoded_images))).items()}
        return [m[:h, :w] for m, h, w in zip(out["class_map"], out["height"], out["width"], strict=True)]

    return predict, names


def predict_files(model_path, image_paths, output_dir, encoded_images, *, k=None, checkpoint="final"):
    """Writes `<stem>_classes.png` (class ids as grey levels) and `<stem>_overlay.png` (the photo under
    the class colours) per image into `output_dir` (`<stem>_<position>` when two inputs share a stem);
    returns one line per image to print (`k` is the classifier's top-k; a class map has none)."""
    del k
    predict, names = load_predictor(model_path, checkpoint)
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    stems = [pathlib.Path(path).stem for path in image_paths]
    encoded = list(encoded_images)
    class_maps = []
    for start in range(0, len(encoded), PREDICT_BATCH):
        class_maps += predict(encoded[start : start + PREDICT_BATCH])
    for index, (path, image, classes) in enumerate(zip(image_paths, encoded, class_maps, strict=True)):
        stem = stems[index] if stems.count(stems[index]) == 1 else f"{stems[index]}_{index}"
        photo = decode_image(image).numpy()
        tf.io.write_file(
            str(output_dir / f"{stem}_classes.png"), tf.io.encode_png(classes.astype(np.uint8)[..., None])
        )
        tf.io.write_file(
            str(output_dir / f"{stem}_overlay.png"), tf.io.encode_png(colour_overlay(photo, classes))
        )
        ids, counts = np.unique(classes, return_counts=True)
        top = sorted(zip(counts, ids, strict=True), reverse=True)[:3]
        share = ", ".join(f"{names[i]} {100 * c / classes.size:.0f}%" for c, i in top)
        lines.append(f"{path}: {share} -> {output_dir / stem}_classes.png, {stem}_overlay.png")
    return lines
