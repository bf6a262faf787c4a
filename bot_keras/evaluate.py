"""`python -m bot_keras.evaluate --model_dir=RUN [--dataset=...] [--split=...]`: top-1 / top-5 of a run.

Loads `RUN/model.keras`, evaluates it on the split with the evaluation transform the trainer uses
(`make_dataset(..., training=False)`: shorter side to S/0.875, centre crop, as in Section 2 of the
paper), prints top-1 and top-5 and writes them as JSON (default `RUN/eval_<split>.json`). What is not
given on the command line is read from the run's `flags.txt` (dataset, data_dir, image size, the
trainer's eval split), so `--model_dir` alone re-evaluates a run.
"""

import json
import os
import sys

from absl import app, flags

# Summed per replica, reduced with SUM across replicas, accumulated on the host.
SUM_KEYS = ("loss", "top1", "top5", "count")


def top_k_sums(per_example_loss, labels, logits):
    import tensorflow as tf

    classes = tf.argmax(labels, axis=-1, output_type=tf.int32)
    k5 = min(5, logits.shape[-1])
    return tf.stack(
        [
            tf.reduce_sum(per_example_loss),
            tf.reduce_sum(tf.cast(tf.math.in_top_k(classes, logits, 1), tf.float32)),
            tf.reduce_sum(tf.cast(tf.math.in_top_k(classes, logits, k5), tf.float32)),
            tf.cast(tf.shape(logits)[0], tf.float32),
        ]
    )


def make_eval_function(strategy, model):
    """Returns `evaluate(distributed_dataset) -> {"loss", "top1", "top5", "count"}` (plain cross-entropy)."""
    import numpy as np
    import tensorflow as tf

    def replica_step(batch):
        images, labels = batch
        logits = tf.cast(model(images, training=False), tf.float32)
        losses = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return top_k_sums(losses, labels, logits)

    @tf.function
    def eval_batch(batch):
        return strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(batch,)), axis=None
        )

    def evaluate(dataset):
        totals = np.zeros(len(SUM_KEYS))
        for batch in dataset:
            totals += eval_batch(batch).numpy()
        count = max(totals[3], 1.0)
        return {
            "loss": totals[0] / count,
            "top1": totals[1] / count,
            "top5": totals[2] / count,
            "count": int(totals[3]),
        }

    return evaluate


def evaluate_run(model_dir, *, dataset=None, split=None, data_dir=None, image_size=None, batch_size=None):
    """Evaluates `model_dir/model.keras`; returns {"top1", "top5", "loss", "count", "split", ...}."""
    model_path = os.path.join(model_dir, "model.keras")
    if not os.path.exists(model_path):
        raise ValueError(f"--model_dir={model_dir!r} has no model.keras (has its training finished?).")
    from bot_keras.export import read_flagfile  # the one reader of a run's flags.txt

    run_flags = {}
    if os.path.exists(os.path.join(model_dir, "flags.txt")):
        run_flags = read_flagfile(os.path.join(model_dir, "flags.txt"))
    dataset = dataset or run_flags.get("dataset")
    split = split or run_flags.get("eval_split") or "validation"
    data_dir = data_dir or run_flags.get("data_dir")
    image_size = int(image_size or run_flags.get("image_size", 224))
    batch_size = int(batch_size or run_flags.get("batch_size", 256))
    if not dataset:
        raise ValueError(f"--dataset is not set and {model_dir!r}/flags.txt does not name one.")

    import keras
    import tensorflow as tf

    from bot_keras.data import dataset_info, make_dataset, read_class_names

    info = dataset_info(dataset, split=split, data_dir=data_dir)
    classes_path = os.path.join(model_dir, "classes.txt")
    classes = read_class_names(classes_path) if os.path.exists(classes_path) else None
    if classes is not None and list(classes) != list(info.class_names):
        raise ValueError(
            f"{model_dir!r}/classes.txt lists {len(classes)} classes ({', '.join(classes[:5])}, ...) but "
            f"--dataset={dataset!r} split {split!r} has {info.num_classes} ({', '.join(info.class_names[:5])}"
            ", ...); the model was trained on other classes."
        )
    model = keras.models.load_model(model_path, compile=False)
    if model.output_shape[-1] != info.num_classes:
        raise ValueError(
            f"{model_path!r} predicts {model.output_shape[-1]} classes; --dataset={dataset!r} has "
            f"{info.num_classes}."
        )
    strategy = tf.distribute.get_strategy()
    data = make_dataset(
        dataset,
        split=split,
        image_size=image_size,
        global_batch_size=batch_size,
        training=False,
        data_dir=data_dir,
    )
    result = make_eval_function(strategy, model)(data)
    result = {k: float(v) for k, v in result.items()}
    result.update(
        count=int(result["count"]), split=split, dataset=dataset, image_size=image_size, model=model_path
    )
    return result


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string(
        "model_dir", None, "Run directory holding model.keras (and flags.txt).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "dataset", None, "Data source (default: the run's --dataset).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data directory (default: the run's).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "split", None, "Split to evaluate (default: the run's --eval_split).", flag_values=flag_values
    )
    flags.DEFINE_integer("image_size", None, "Resolution (default: the run's).", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", None, "Batch size (default: the run's).", flag_values=flag_values)
    flags.DEFINE_string(
        "output", None, "JSON file to write (default: MODEL_DIR/eval_SPLIT.json).", flag_values=flag_values
    )


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.model_dir:
        raise app.UsageError("--model_dir is required.")
    try:
        result = evaluate_run(
            f.model_dir,
            dataset=f.dataset,
            split=f.split,
            data_dir=f.data_dir,
            image_size=f.image_size,
            batch_size=f.batch_size,
        )
    except ValueError as error:
        print(f"evaluate: {error}", file=sys.stderr)
        sys.exit(1)
    output = f.output or os.path.join(f.model_dir, f"eval_{result['split']}.json")
    with open(output, "w") as out:
        json.dump(result, out, indent=2)
    print(
        f"{result['dataset']} {result['split']} ({result['count']} images): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
    )
    print(f"Wrote {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
