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

Every run is evaluated by its task module (`bot_keras.tasks`, by the task its run.json names): a
segmentation run prints pixel accuracy and mean IoU and writes per-class IoU and the confusion matrix to
the JSON; a detection run the VOC (and, on COCO, COCO) mAP with per-class AP.
"""

import json
import os

from absl import flags

from bot_keras import atomic_write, cli, metrics, run_dir, tasks

COMMAND = "bot_keras.evaluate"
# What only a classification run's evaluation takes.
CLASSIFICATION_FLAGS = ("image_size", "skip_corrupt", "max_image_pixels")


def evaluate_run(
    model_dir, *, dataset=None, split=None, data_dir=None, image_size=None, batch_size=None,
    skip_corrupt=None, max_image_pixels=None, checkpoint="final",
):
    """Evaluates the classification run in `model_dir`; returns {"top1", "top5", "loss", "count", "split",
    ...} (and "skipped_files" when skipping). Unset arguments come from the run's flags.txt.

    Set-up problems (a missing file, other classes, a broken image) raise cli.SetupError."""
    run = run_dir.read_run(model_dir, checkpoint=checkpoint)
    result, _ = tasks.task_module(run.task).evaluate_run(
        run, dataset=dataset, split=split, data_dir=data_dir, image_size=image_size, batch_size=batch_size,
        skip_corrupt=skip_corrupt, max_image_pixels=max_image_pixels,
    )
    return result


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Run directory written by bot_keras.train.", **d)
    flags.DEFINE_string("dataset", None, "Data source (default: the run's --dataset).", **d)
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's).", **d)
    flags.DEFINE_string("split", None, "Split to evaluate (default: the run's --eval_split).", **d)
    flags.DEFINE_integer(
        "image_size", None,
        "Classification: resolution (default: the run's; another rebuilds the model at it, same weights).",
        lower_bound=16, **d,
    )
    flags.DEFINE_integer("batch_size", None, "Batch size (default: the run's).", lower_bound=1, **d)
    flags.DEFINE_bool(
        "skip_corrupt", None, "Skip undecodable images, naming each (default: the run's --skip_corrupt).", **d
    )
    flags.DEFINE_integer(
        "max_image_pixels", None, "Refuse (or skip) images over this many pixels (default: the run's).", **d
    )
    flags.DEFINE_string("output", None, "JSON file to write (default: MODEL_DIR/eval_SPLIT.json).", **d)
    flags.DEFINE_enum(
        "checkpoint", "final", list(run_dir.CHECKPOINTS),
        "final: model.keras; best: model_best.keras (a run trained with --keep_best).", **d,
    )
    flags.DEFINE_string(
        "confusion_png", None, "Classification: also draw the confusion matrix to this PNG (matplotlib).",
        **d,
    )


def evaluate_task_run(model_dir, task, checkpoint="final", **overrides):
    """Evaluates the `task` run in `model_dir` (its `checkpoint`: final or best) through its task module
    (`bot_keras.tasks`); the non-None `overrides` replace the run's flags. Returns (result for the JSON, the
    lines to print)."""
    run = run_dir.read_run(model_dir, task=task, checkpoint=checkpoint)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return tasks.task_module(task).evaluate_run(run, **overrides)


def evaluate_finetune_run(model_dir, task, *, dataset=None, split=None, data_dir=None, batch_size=None):
    """Evaluates a fine-tuning run through its task module; returns (result, one-line summary)."""
    return evaluate_task_run(
        model_dir, task, dataset=dataset, split=split, data_dir=data_dir, batch_size=batch_size
    )


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    task = run_dir.read_task(f.model_dir)
    overrides = dict(dataset=f.dataset, split=f.split, data_dir=f.data_dir, batch_size=f.batch_size)
    for name in CLASSIFICATION_FLAGS:
        if task == tasks.CLASSIFICATION:
            overrides[name] = f[name].value
        elif f[name].value is not None:
            raise cli.SetupError(f"--{name} is for classification runs; {f.model_dir} is a {task} run")
    if task != tasks.CLASSIFICATION and f.confusion_png:
        raise cli.SetupError(f"--confusion_png is for classification runs; {f.model_dir} is a {task} run")
    if f.confusion_png:
        metrics.pyplot(f.confusion_png)  # before the evaluation: a missing matplotlib is one line, at once
    result, line = evaluate_task_run(f.model_dir, task, checkpoint=f.checkpoint, **overrides)
    suffix = "_best" if f.checkpoint == "best" else ""
    output = f.output or os.path.join(f.model_dir, f"eval_{result['split']}{suffix}.json")
    atomic_write.write_atomic(output, json.dumps(result, indent=2) + "\n")
    print(line)
    if f.confusion_png:
        metrics.plot_confusion(result["confusion"], list(result["per_class"]), f.confusion_png)
        print(f"Wrote {f.confusion_png}")
    print(f"Wrote {output}")


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("model_dir",))
