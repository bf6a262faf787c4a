"""`python -m bot_keras.evaluate --model_dir=RUN [--dataset=...] [--split=...]`: top-1 / top-5 of a run.

Loads the run's final model through `run_dir` (a mixed-precision run as its float32 rebuild), evaluates it
on the split with the evaluation transform the trainer uses (`make_dataset(..., training=False)`: shorter
side to S/0.875, centre crop, as in Section 2 of the paper), prints top-1 and top-5 and writes them as
JSON (default `RUN/eval_<split>.json`). What is not given on the command line comes from the run's
`flags.txt` (dataset, data_dir, image size, the trainer's eval split, label offset and `--skip_corrupt`),
so `--model_dir` alone re-evaluates a run exactly as its trainer did; a run trained without an eval split
needs `--split`. An undecodable image stops evaluation with one line naming the file, unless
`--skip_corrupt` (default: the run's setting) skips it; the number of distinct files skipped is printed
and written to the JSON report as `skipped_files`.

A `bot_keras.finetune` run (its run.json names the task) is evaluated by its task module: a segmentation
run prints pixel accuracy and mean IoU and writes per-class IoU and the confusion matrix to the JSON.
"""

import json
import os

import tensorflow as tf
from absl import flags

from bot_keras import cli, run_dir, steps
from bot_keras.data import SkippedFiles, dataset_info, make_dataset
from bot_keras.data.errors import bad_input_message

COMMAND = "bot_keras.evaluate"


def evaluate_run(
    model_dir,
    *,
    dataset=None,
    split=None,
    data_dir=None,
    image_size=None,
    batch_size=None,
    skip_corrupt=None,
    max_image_pixels=None,
):
    """Evaluates the run in `model_dir`; returns {"top1", "top5", "loss", "count", "split", ...} (and
    "skipped_files" when skipping). Unset arguments come from the run's flags.txt.

    Set-up problems (a missing file, other classes, a broken image) raise cli.SetupError."""
    run = run_dir.read_run(model_dir)
    dataset = dataset or run.flags["dataset"]
    split = split or run.flags["eval_split"]
    if not split:
        raise cli.SetupError(
            f"{run.model_dir} was trained without an evaluation split (--eval_split=''): name the split to "
            "evaluate with --split."
        )
    data_dir = data_dir or run.flags["data_dir"]
    image_size = int(image_size or run.image_size)
    batch_size = int(batch_size or run.flags["batch_size"])
    skip_corrupt = run.flags["skip_corrupt"] if skip_corrupt is None else skip_corrupt
    max_image_pixels = run.flags["max_image_pixels"] if max_image_pixels is None else max_image_pixels
    # The same shards are read with the same labels and the same corrupt-file policy as in training.
    source = dict(data_dir=data_dir, label_offset=run.flags["label_offset"], skip_corrupt=skip_corrupt)
    skipped_files = SkippedFiles()
    if not dataset:
        raise cli.SetupError(
            f"--dataset is not set and {run.model_dir / run_dir.FLAGS_FILE} does not name one."
        )
    with cli.setup_errors(f"--dataset={dataset}"):
        info = dataset_info(dataset, split=split, **source)
    if list(run.class_names) != list(info.class_names):
        raise cli.SetupError(
            f"{run.model_dir / run_dir.CLASSES_FILE} lists {len(run.class_names)} classes "
            f"({', '.join(run.class_names[:5])}, ...) but --dataset={dataset!r} split {split!r} has "
            f"{info.num_classes} ({', '.join(info.class_names[:5])}, ...); the model was trained on other "
            "classes."
        )
    model = run_dir.load_model(run)
    with cli.setup_errors(f"--dataset={dataset}"):
        data = make_dataset(
            dataset,
            split=split,
            image_size=image_size,
            global_batch_size=batch_size,
            training=False,
            skipped_files=skipped_files,
            max_image_pixels=max_image_pixels,
            **source,
        )
    try:
        result = steps.make_eval_function(tf.distribute.get_strategy(), model)(data)
    except tf.errors.InvalidArgumentError as error:
        message = bad_input_message(error)  # the pipeline's check naming the file, or None: a bug
        if message is None:
            raise
        raise cli.SetupError(f"Evaluation stopped by bad input data: {message}") from None
    result.update(split=split, dataset=dataset, image_size=image_size, model=str(run.model_path))
    if skip_corrupt:
        result["skipped_files"] = skipped_files.count()
    return result


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Run directory written by bot_keras.train.", **d)
    flags.DEFINE_string("dataset", None, "Data source (default: the run's --dataset).", **d)
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's).", **d)
    flags.DEFINE_string("split", None, "Split to evaluate (default: the run's --eval_split).", **d)
    flags.DEFINE_integer("image_size", None, "Resolution (default: the run's).", **d)
    flags.DEFINE_integer("batch_size", None, "Batch size (default: the run's).", **d)
    flags.DEFINE_bool(
        "skip_corrupt", None, "Skip undecodable images, naming each (default: the run's --skip_corrupt).", **d
    )
    flags.DEFINE_integer(
        "max_image_pixels", None, "Refuse (or skip) images over this many pixels (default: the run's).", **d
    )
    flags.DEFINE_string("output", None, "JSON file to write (default: MODEL_DIR/eval_SPLIT.json).", **d)


def evaluate_finetune_run(model_dir, task, *, dataset=None, split=None, data_dir=None, batch_size=None):
    """Evaluates a fine-tuning run through its task module; returns (result, one-line summary)."""
    from bot_keras import finetune

    run = run_dir.read_run(model_dir, task=task)
    return finetune.task_module(task).evaluate_run(
        run, dataset=dataset, split=split, data_dir=data_dir, batch_size=batch_size
    )


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    task = run_dir.read_task(f.model_dir)
    if task != run_dir.CLASSIFICATION:
        for name in ("image_size", "skip_corrupt", "max_image_pixels"):
            if f[name].value is not None:
                raise cli.SetupError(f"--{name} is for classification runs; {f.model_dir} is a {task} run")
        result, line = evaluate_finetune_run(
            f.model_dir, task, dataset=f.dataset, split=f.split, data_dir=f.data_dir, batch_size=f.batch_size
        )
        output = f.output or os.path.join(f.model_dir, f"eval_{result['split']}.json")
        run_dir.write_atomic(output, json.dumps(result, indent=2) + "\n")
        print(line)
        print(f"Wrote {output}")
        return
    result = evaluate_run(
        f.model_dir,
        dataset=f.dataset,
        split=f.split,
        data_dir=f.data_dir,
        image_size=f.image_size,
        batch_size=f.batch_size,
        skip_corrupt=f.skip_corrupt,
        max_image_pixels=f.max_image_pixels,
    )
    output = f.output or os.path.join(f.model_dir, f"eval_{result['split']}.json")
    run_dir.write_atomic(output, json.dumps(result, indent=2) + "\n")
    print(
        f"{result['dataset']} {result['split']} ({result['count']} images): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
    )
    if "skipped_files" in result:
        count = result["skipped_files"]
        print(f"Skipped {count} distinct undecodable file{'' if count == 1 else 's'} (--skip_corrupt).")
    print(f"Wrote {output}")


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("model_dir",))
