"""Object detection as a `bot_keras.finetune` task (paper Section 6.1; ours is RetinaNet, see `model.py`).

The task contract is `bot_keras.tasks.Task`; what the transfer tasks share (the backbone flags and
weights) is `bot_keras.transfer`. Here: the flags `--keep_difficult`,
`--detection_scale_range`, `--detection_head_norm` and `--max_detections`; `data.make_detection_dataset`
(training: random scale, crop/pad to `--crop_size`, flip; validation: longer side to `--crop_size`, pad);
`model.build_detector`
with the backbone's weights; the loss of `loss.py` per image, normalised by the positive anchors of the
*global* batch (one all-reduce of the count; Lin et al.); training logs that loss, each epoch's evaluation
the VOC07 mAP@0.5 (11-point, the paper's metric) and the all-point mAP over the validation split, with
per-class AP in final_metrics.json (`evaluate.evaluate_detector`, NMS at 0.05).

The model's input is a static `--crop_size` square (a multiple of 32): keras-hub's anchors and NMS need
static shapes. Export (`export.DetectionServingModule`) and predict resize and pad inside, one image at a
time, and return boxes in the input image's pixels ("yxyx").
"""

import pathlib

import tensorflow as tf
from absl import flags

from bot_keras import cli, model_files, run_dir, steps, tasks, transfer
from bot_keras.data.decode import check_encoded_image
from bot_keras.detection import augment, data, draw, evaluate, export, sources
from bot_keras.detection import loss as detection_loss
from bot_keras.detection import model as detection_model
from bot_keras.models import build_backbone

NAME = tasks.DETECTION
SCHEDULE_NAMES = transfer.SCHEDULE_NAMES
DEFAULT_OUTPUT_STRIDE = 32  # FPN on P3-P5 at their true strides
CSV_COLUMNS = ("loss", "lr", "images_per_sec", "val_map_voc07", "val_map_all_point")
BEST_METRICS = ("val_map_voc07", "val_map_all_point")  # --keep_best
DRAW_MIN_SCORE = 0.3  # what predict draws; the serving signature returns every detection down to 0.05


def define_flags(fv):
    """The transfer tasks' flags (`transfer.define_flags`), then detection's own."""
    transfer.define_flags(fv)
    d = dict(flag_values=fv)
    flags.DEFINE_bool(
        "keep_difficult", False, "Detection: train on VOC 'difficult' / COCO crowd boxes too.", **d
    )
    flags.DEFINE_list(
        "detection_scale_range",
        [str(v) for v in augment.SCALE_RANGE],
        "Detection: training scale jitter LOW,HIGH (factors of 'longer side = --crop_size').",
        **d,
    )
    flags.DEFINE_bool(
        "detection_head_norm", False,
        "Detection: group normalisation after each head conv (keras-hub's use_prediction_head_norm; "
        "steadier from a weak backbone). Off: Lin et al.'s heads.", **d,
    )
    flags.DEFINE_integer("max_detections", detection_model.MAX_DETECTIONS,
                         "Detection: detections kept per image after NMS.", **d)


def scale_range(f):
    low, high = (float(v) for v in f.detection_scale_range)
    return low, high


def flag_problems(f):
    problems = transfer.flag_problems(f)
    if f.dataset:
        try:
            sources.parse_source(f.dataset)
        except ValueError as error:
            problems.append(f"--dataset: {error}")
    if f.output_stride not in (0, DEFAULT_OUTPUT_STRIDE):
        problems.append(f"--output_stride={f.output_stride}: detection's FPN needs 32 (or 0, the default).")
    if f.crop_size % 32 or f.crop_size < 64:
        problems.append(f"--crop_size={f.crop_size}: detection needs a multiple of 32, at least 64 "
                        "(a multiple of 128 tiles every FPN level).")
    try:
        low, high = scale_range(f)
        if not (len(f.detection_scale_range) == 2 and 0 < low <= high):
            raise ValueError
    except ValueError:
        problems.append(f"--detection_scale_range={','.join(f.detection_scale_range)} must be two numbers "
                        "0 < LOW <= HIGH.")
    if f.max_detections < 1:
        problems.append(f"--max_detections={f.max_detections} must be at least 1.")
    return problems


# --- data, model, loss, metrics (the training command's) --------------------------------------------------


def dataset_info(f, split):
    return sources.detection_info(f.dataset, split=split, data_dir=f.data_dir)


preflight = tasks.no_preflight


def make_dataset(f, *, split, training, input_context=None, batch_size=None, skipped_files=None):
    """Training: (images, {"boxes", "labels"}); validation: the same plus evaluation's metadata."""
    ds = data.make_detection_dataset(
        f.dataset,
        split=split,
        image_size=f.crop_size,
        global_batch_size=batch_size or f.batch_size,
        training=training,
        data_dir=f.data_dir,
        input_context=input_context,
        seed=f.seed,
        keep_difficult=f.keep_difficult,
        with_metadata=not training,
        scale_range=scale_range(f),
        skip_corrupt=f.skip_corrupt,
        skipped_files=skipped_files,
        max_image_pixels=f.max_image_pixels,
    )
    # The file names stay on the host: a distributed dataset moves every tensor to the replicas.
    return ds if training else ds.map(lambda images, targets: (images, _without_key(targets)))


def _without_key(targets):
    return {k: v for k, v in targets.items() if k != "key"}


initial_weights = transfer.initial_weights


def build_model(f, *, num_classes, output_stride=DEFAULT_OUTPUT_STRIDE, weights_from=None):
    """`model.build_detector` on `--backbone` (holding `weights_from`'s weights when given)."""
    size = f.crop_size
    encoder = build_backbone(f.backbone, input_shape=(size, size, 3), output_stride=output_stride,
                             weights_from=weights_from)
    return detection_model.build_detector(f.backbone, num_classes=num_classes, image_size=size,
                                          image_encoder=encoder, max_detections=f.max_detections,
                                          head_norm=f.detection_head_norm)


def inference_model(model):
    return model


def final_model(f, model, *, num_classes):
    return transfer.final_model(
        f, model, inference_model=inference_model, build_model=build_model, num_classes=num_classes
    )


def per_example_loss(f):
    """Per image: (box + focal sums) × global batch / positives of the global batch (`loss.py`)."""
    encoder = detection_model.make_label_encoder()
    image_shape = (f.crop_size, f.crop_size, 3)
    global_batch_size = f.batch_size

    def loss(labels, outputs, teacher_outputs=None):
        del teacher_outputs
        terms = detection_loss.per_example_terms(encoder, image_shape, labels, outputs)
        positives = tf.reduce_sum(terms["num_positives"])
        replica = tf.distribute.get_replica_context()
        if replica is not None:  # inside strategy.run: every replica's count
            positives = replica.all_reduce(tf.distribute.ReduceOp.SUM, positives)
        return detection_loss.normalized_per_example_loss(
            terms, num_positives=positives, global_batch_size=global_batch_size
        )

    return loss


def _loss_sums(per_example_loss, labels, outputs):
    del outputs
    count = tf.cast(tf.shape(labels["labels"])[0], tf.float32)
    return {"loss": tf.reduce_sum(per_example_loss), "count": count}


TRAIN_METRICS = steps.Metrics(("loss", "count"), _loss_sums)


def train_options(f, *, model, num_classes):
    del num_classes
    transfer.freeze(f, model)
    return tasks.TrainOptions(step_kwargs=dict(per_example_loss=per_example_loss(f), metrics=TRAIN_METRICS))


class Evaluator:
    """`evaluate(distributed dataset) -> {"map_voc07", "map_all_point", "count", ...}` over the split;
    `.details` holds the last call's per-class AP (final_metrics.json). Each replica's share of a batch is
    evaluated on this host (`strategy.experimental_local_results`); NMS and the AP are host-side work."""

    def __init__(self, strategy, model, class_names, coco=False):
        self.strategy, self.model, self.class_names, self.coco = strategy, model, tuple(class_names), coco
        self.details = {}

    def __call__(self, dataset):
        def local_batches():
            for batch in dataset:
                yield from self.strategy.experimental_local_results(batch)

        result = evaluate.evaluate_detector(self.model, local_batches(), class_names=self.class_names,
                                            coco=self.coco)
        self.details = {"ap_voc07": result["ap_voc07"], "ap_all_point": result["ap_all_point"]}
        return {k: v for k, v in result.items() if k.startswith(("map_", "coco_")) or k == "count"}


def make_evaluator(f, strategy, model, class_names):
    """Training's per-epoch evaluation: VOC mAP (COCO's, for coco: data, from bot_keras.evaluate)."""
    del f
    return Evaluator(strategy, model, class_names)


# --- bot_keras.evaluate, export and predict ---------------------------------------------------------------


def evaluate_run(run, *, dataset=None, split=None, data_dir=None, batch_size=None, **_):
    """Evaluates a detection run's model.keras on a split (default: the run's --eval_split) as training's
    validation does; returns (result for the JSON, with per-class AP; one-line summary)."""
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
    coco = f.dataset.startswith("coco:")
    with cli.setup_errors(f"--dataset={f.dataset}"):
        batches = make_dataset(f, split=split, training=False)
    with tasks.bad_input("Evaluation"):
        result = evaluate.evaluate_detector(model, batches, class_names=run.class_names, coco=coco)
    result.update(split=split, dataset=f.dataset, image_size=f.crop_size, model=str(run.model_path))
    line = (
        f"{f.dataset} {split} ({result['count']} images): VOC07 mAP@0.5 {100 * result['map_voc07']:.2f}%  "
        f"all-point {100 * result['map_all_point']:.2f}%"
    )
    if coco:
        line += f"  COCO mAP@[.5:.95] {100 * result['coco_map']:.2f}%"
    return result, line


def serving_module(run, model, *, top_k=None):
    del top_k  # detections are ranked by score, down to the NMS threshold
    module = export.DetectionServingModule(
        model, class_names=run.class_names, image_size=run.image_size,
        max_image_pixels=run.flags.get("max_image_pixels", export.MAX_IMAGE_PIXELS),
    )
    return module, {"serving_default": module.serve_bytes.get_concrete_function()}


def load_predictor(path, checkpoint="final"):
    """`detect(list of encoded images) -> {"boxes", "scores", "class_ids", "class_names",
    "num_detections"}` (numpy, input pixels) from a SavedModel `bot_keras.export` wrote or a detection
    run directory (its `checkpoint`'s model, through the very module the export saves)."""
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    else:
        run = run_dir.read_run(path, task=NAME, checkpoint=checkpoint)
        serve = serving_module(run, model_files.load_model(run))[0].serve_bytes
    return lambda encoded: {k: v.numpy() for k, v in serve(image_bytes=tf.constant(list(encoded))).items()}


def predict_files(model_path, image_paths, output_dir, encoded_images, *, k=None, checkpoint="final",
                  min_score=DRAW_MIN_SCORE):
    """Writes `<stem>_detections.png` (or `.jpg` for a JPEG input) with the detections scoring at least
    `min_score` drawn, per image, into `output_dir`; returns the lines to print (boxes in input pixels;
    `k` is the classifier's top-k, unused here)."""
    del k
    detect = load_predictor(model_path, checkpoint)
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for path, encoded in zip(image_paths, encoded_images, strict=True):
        if not bool(check_encoded_image(encoded)):
            raise cli.SetupError(f"{path} is not a complete JPEG, PNG, GIF or BMP image")
        found = detect([encoded])
        rows = draw.keep({k: v[0] for k, v in found.items() if k != "num_detections"}, min_score)
        jpeg = encoded[:2] == b"\xff\xd8"
        target = output_dir / f"{pathlib.Path(path).stem}_detections.{'jpg' if jpeg else 'png'}"
        target.write_bytes(draw.draw_detections(encoded, rows, "JPEG" if jpeg else "PNG"))
        lines.append(f"{draw.format_detections(path, rows)}\n  -> {target}")
    return lines
