"""`python -m bot_keras.finetune --flagfile=configs/transfer/X.flags [--flag=value ...]`: transfer learning.

The paper's Section 6: a classifier trained with the refinements is fine-tuned on other tasks (6.1 object
detection, 6.2 semantic segmentation) to show that a better ImageNet model transfers better. This command
starts a task model from a backbone — random, a bot_keras classification run, a `.keras`/`.weights.h5` file
or timm `.safetensors` (`--backbone_weights`) — and trains it with the classifier's machinery: the same
steps (`steps.py`), loop and checkpoints (`loop.py`), schedules, optimizer, precision and strategies and
the same run directory (`trainer.py`, `run_dir.py`); nothing of the trainer is copied.

main() wires, in order: flags → strategy and precision → data → model (backbone weights in, stages or BN
frozen) → optimizer and schedule → restore → fit → the float32 inference model in model.keras.

What differs between tasks is a task module, listed in `TASK_MODULES`, with:

    define_flags(fv)                       the task's own flags (e.g. segmentation's --head)
    DEFAULT_OUTPUT_STRIDE                  the backbone's output stride when --output_stride=0
    flag_problems(f) -> [str]              checks of its flags and --dataset, before any data is read
    dataset_info(f, split)                 .class_names, .num_examples of a split (ValueError/OSError: bad)
    make_dataset(f, *, split, training, input_context)   a tf.data of (images, labels) batches
    build_model(f, *, num_classes, output_stride, weights_from)   the training model (float32 outputs)
    inference_model(model)                 what model.keras holds (e.g. without an auxiliary head)
    per_example_loss(f)                    (labels, outputs, teacher_outputs=None) -> float32 [B]
    TRAIN_METRICS                          a steps.Metrics summed by the train step
    CSV_COLUMNS                            logs/training.csv's columns
    make_evaluator(strategy, model, class_names)   evaluate(dataset) -> {name: float}, .details (JSON)
and, for bot_keras.evaluate / export / predict, which route a run by its run.json task:
    evaluate_run(run, **overrides) -> (result dict, one-line summary)
    serving_module(run, model) -> (tf.Module, {signature name: concrete function})
    predict_files(model_path, image_paths, output_dir) -> lines to print
"""

import importlib
import os

import keras
from absl import flags

from bot_keras import cli, loop, run_dir, schedules, steps, trainer
from bot_keras.data import SkippedFiles
from bot_keras.models import RESNET_NAMES, build_backbone
from bot_keras.models.backbone import freeze_backbone
from bot_keras.models.resnet import OUTPUT_STRIDES

COMMAND = "bot_keras.finetune"
# Task name → its module.
TASK_MODULES = {
    run_dir.SEGMENTATION: "bot_keras.segmentation.task",
    run_dir.DETECTION: "bot_keras.detection.task",
}
WEIGHT_SUFFIXES = (".keras", ".weights.h5", ".safetensors")


def task_module(task):
    """The module implementing `task` (see the module docstring)."""
    if task not in TASK_MODULES:
        raise cli.SetupError(f"--task={task!r} is not one of {', '.join(TASK_MODULES)}.")
    return importlib.import_module(TASK_MODULES[task])


def define_flags(fv):
    """The fine-tuning flags on `fv`: the common ones, then each task's (also what reads a flags.txt)."""
    d = dict(flag_values=fv)
    # --- what to fine-tune, on what --------------------------------------------------------------------
    flags.DEFINE_string("task", None, " | ".join(TASK_MODULES) + ".", **d)
    flags.DEFINE_string(
        "dataset", None, "Data source of the task (e.g. seg_folder:ROOT, voc:ROOT, tfds:...).", **d
    )
    flags.DEFINE_string("data_dir", None, "TFDS data dir; relative source paths resolve in it.", **d)
    flags.DEFINE_string("train_split", "train", "Split to train on.", **d)
    flags.DEFINE_string("eval_split", "validation", "Split evaluated at each epoch end; empty: none.", **d)
    flags.DEFINE_string(
        "backbone", None, f"ResNet backbone, e.g. resnet50_d ({', '.join(RESNET_NAMES[:4])}, ...).", **d
    )
    flags.DEFINE_string(
        "backbone_weights",
        "",
        "Backbone initialisation: a bot_keras classification run directory (its model.keras), a .keras or "
        ".weights.h5 file of a classifier or backbone of --backbone, or timm .safetensors; empty: random.",
        **d,
    )
    flags.DEFINE_integer(
        "output_stride",
        0,
        "Backbone output stride 8 | 16 | 32 (dilated last stages); 0: the "
        "task's default (segmentation 8, detection 32).",
        **d,
    )
    flags.DEFINE_bool(
        "freeze_bn", False, "Freeze every BatchNorm of the backbone (statistics and affine).", **d
    )
    flags.DEFINE_integer("freeze_stages", 0, "Freeze the stem and backbone stages 1..N (0: none).", **d)
    flags.DEFINE_integer("crop_size", 480, "Training crop (pixels, square); the model's input size.", **d)
    # --- optimisation and machinery (the classifier's flags; fine-tuning defaults) ----------------------
    trainer.define_optimization_flags(
        fv,
        batch_size=16,
        epochs=50,
        base_lr=0.16,  # GluonCV's segmentation: 0.01 at batch 16 = 0.16 per 256 images
        lr_schedule="poly",
        schedule_names=schedules.FINETUNE_SCHEDULE_NAMES,
    )
    trainer.define_input_flags(fv)
    trainer.define_machinery_flags(fv)
    for name in TASK_MODULES:
        importlib.import_module(TASK_MODULES[name]).define_flags(fv)


def _defined_flags():
    scratch = flags.FlagValues()
    define_flags(scratch)
    return tuple(scratch)


CONTRACT_FLAGS = _defined_flags()


class FlagError(cli.SetupError):
    """A flag value that cannot work; the message names the flag and echoes the value."""


def backbone_weights_problem(spec, backbone):
    """Why --backbone_weights=`spec` cannot initialise `backbone`, or None (no model is loaded here)."""
    if not spec:
        return None
    if os.path.isdir(spec):
        try:
            run = run_dir.read_run(spec)
        except cli.SetupError as error:
            return f"--backbone_weights={spec!r}: {error}"
        if run.model_name != backbone:
            return (
                f"--backbone_weights={spec!r} is a {run.model_name} run but --backbone={backbone!r}; "
                "the weights would not fit."
            )
        return None
    if not os.path.isfile(spec):
        return f"--backbone_weights={spec!r}: no such file or directory."
    if not spec.endswith(WEIGHT_SUFFIXES):
        return f"--backbone_weights={spec!r} is not a run directory nor a {', '.join(WEIGHT_SUFFIXES)} file."
    return None


def validate_flags(f):
    """Checks what can be checked before data or models are touched; raises FlagError listing all."""
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    for name in ("task", "dataset", "backbone", "model_dir"):
        need(getattr(f, name), f"--{name} is required.")
    need(not f.task or f.task in TASK_MODULES, f"--task={f.task!r} is not one of {', '.join(TASK_MODULES)}.")
    need(
        not f.backbone or f.backbone in RESNET_NAMES,
        f"--backbone={f.backbone!r} is not a ResNet name; known: {', '.join(RESNET_NAMES)}.",
    )
    need(
        f.output_stride == 0 or f.output_stride in OUTPUT_STRIDES,
        f"--output_stride={f.output_stride} is not one of 0 (the task's default), 8, 16, 32.",
    )
    need(0 <= f.freeze_stages <= 4, f"--freeze_stages={f.freeze_stages} must be in [0, 4].")
    need(f.crop_size >= 32, f"--crop_size={f.crop_size} is too small (at least 32).")
    if f.backbone in RESNET_NAMES:
        problem = backbone_weights_problem(f.backbone_weights, f.backbone)
        need(problem is None, problem)
    if f.task in TASK_MODULES:
        problems.extend(task_module(f.task).flag_problems(f))
    problems.extend(trainer.machinery_problems(f, schedule_names=schedules.FINETUNE_SCHEDULE_NAMES))
    if problems:
        raise FlagError("\n".join(problems))


def output_stride(f, task):
    return f.output_stride or task.DEFAULT_OUTPUT_STRIDE


def load_backbone_weights(spec, backbone):
    """A model holding the weights of --backbone_weights under our layer names (a classifier or a
    `ResNetBackbone` of `backbone`), for `models.load_classifier_weights`; None when `spec` is empty."""
    if not spec:
        return None
    if os.path.isdir(spec):
        return run_dir.load_model(run_dir.read_run(spec))
    if spec.endswith(".keras"):
        return run_dir.load_keras_model(spec, label=f"--backbone_weights={spec}")
    source = build_backbone(backbone)
    if spec.endswith(".safetensors"):
        from bot_keras.models.timm_weights import load_timm_weights

        with cli.setup_errors(f"--backbone_weights={spec}"):
            return load_timm_weights(source, spec, skip_classifier=True)
    try:
        source.load_weights(spec)
    except Exception as error:  # Keras raises many types for a file of another model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise cli.SetupError(
            f"--backbone_weights={spec}: not the weights of a {backbone} backbone: {first}"
        ) from error
    return source


def resolved_flags_text(f):
    """The flags as a flagfile that reproduces the run (--resume left out, as the trainer does)."""
    return run_dir.flags_text(f, [name for name in CONTRACT_FLAGS if name != "resume"])


# --- main -----------------------------------------------------------------------------------------------


def main(argv, f=flags.FLAGS):
    """Fine-tunes as the flags `f` say. Set-up problems raise cli.SetupError (exit 2 through cli.run)."""
    del argv
    validate_flags(f)
    task = task_module(f.task)

    # Strategy and precision: before any variable exists.
    machinery = trainer.start(f)
    strategy = machinery.strategy

    # Data.
    with cli.setup_errors(f"--dataset={f.dataset}"):
        train_info = task.dataset_info(f, f.train_split)
        eval_info = task.dataset_info(f, f.eval_split) if f.eval_split else train_info
    if list(eval_info.class_names) != list(train_info.class_names):
        raise cli.SetupError(
            f"--eval_split={f.eval_split!r} has {len(eval_info.class_names)} classes but "
            f"--train_split={f.train_split!r} has {len(train_info.class_names)}: labels would not line up."
        )
    steps_per_epoch = trainer.steps_per_epoch(f, train_info.num_examples, f.train_split)
    skipped_files = SkippedFiles()  # the files --skip_corrupt skipped (checkpointed: summed on --resume)
    with cli.setup_errors(f"--dataset={f.dataset}"):
        train_iterator = iter(
            strategy.distribute_datasets_from_function(
                lambda context: task.make_dataset(
                    f, split=f.train_split, training=True, input_context=context, skipped_files=skipped_files
                )
            )
        )
        eval_dataset = (
            strategy.distribute_datasets_from_function(
                lambda context: task.make_dataset(
                    f, split=f.eval_split, training=False, input_context=context, skipped_files=skipped_files
                )
            )
            if f.eval_split
            else None
        )

    # Model: the backbone's weights first (a classifier loaded outside the strategy's scope is only read).
    weights_from = load_backbone_weights(f.backbone_weights, f.backbone)
    with strategy.scope():
        with cli.setup_errors(f"--backbone_weights={f.backbone_weights}"):
            model = task.build_model(
                f,
                num_classes=len(train_info.class_names),
                output_stride=output_stride(f, task),
                weights_from=weights_from,
            )
        del weights_from
        freeze_backbone(model, stages=f.freeze_stages, batch_norm=f.freeze_bn)
        # Optimizer and schedule.
        optimizer, step_var = trainer.build_optimizer(
            f, steps_per_epoch=steps_per_epoch, variables=model.trainable_variables
        )

    state = loop.RunState(task.CSV_COLUMNS)  # the run's total training time and last epoch's logs

    def export_model():
        """The inference model in float32 (a mixed-precision run's weights copied into a float32 build)."""
        inference = task.inference_model(model)
        if f.precision == "float32":
            return inference
        keras.mixed_precision.set_global_policy("float32")
        rebuilt = task.inference_model(
            task.build_model(
                f,
                num_classes=len(train_info.class_names),
                output_stride=output_stride(f, task),
                weights_from=None,
            )
        )
        return run_dir.copy_weights(rebuilt, inference, label=f"--precision={f.precision} model")

    # Restore.
    manager = loop.checkpoint_manager(
        machinery.write_dir,
        keep=f.keep_checkpoints,
        model=model,
        optimizer=optimizer,
        step=step_var,
        **state.checkpointed(),
        **skipped_files.checkpointed(),
    )
    evaluate = task.make_evaluator(strategy, model, train_info.class_names) if eval_dataset else None

    def evaluation_details():
        """final_metrics.json's `val_<name>` of the evaluator's last call (e.g. per-class AP or IoU)."""
        return {f"val_{key}": value for key, value in (evaluate.details if evaluate else {}).items()}

    def restored_evaluation_details():
        # The checkpoint holds the last epoch's logs but not the evaluator's details: the restored model is
        # evaluated again (the same weights and data give the same numbers).
        if evaluate:
            evaluate(eval_dataset)
        return evaluation_details()

    if trainer.restore(f, manager, optimizer=optimizer, step_var=step_var, steps_per_epoch=steps_per_epoch):
        # Nothing left to train.
        trainer.finish_trained_run(
            f, machinery=machinery, model=export_model(), state=state, step_var=step_var,
            extra_metrics=restored_evaluation_details,
        )
        return
    if machinery.chief:
        trainer.write_run_files(
            f, task=f.task, flags_text=resolved_flags_text(f), class_names=train_info.class_names
        )

    # Fit.
    train_function = steps.make_train_function(
        strategy,
        model,
        optimizer,
        per_example_loss=task.per_example_loss(f),
        global_batch_size=f.batch_size,
        metrics=task.TRAIN_METRICS,
        seed=f.seed,
        jit_compile=f.jit_compile,
        grad_clip_norm=f.grad_clip_norm,
    )
    logs, wall_time_s = trainer.fit(
        f,
        machinery=machinery,
        model=model,
        optimizer=optimizer,
        train_function=train_function,
        train_iterator=train_iterator,
        evaluate=evaluate,
        eval_dataset=eval_dataset,
        manager=manager,
        step_var=step_var,
        steps_per_epoch=steps_per_epoch,
        state=state,
    )

    # Export: the inference model in float32.
    inference = export_model()
    extra_metrics = evaluation_details()
    if f.skip_corrupt:
        extra_metrics["skipped_files"] = skipped_files.report()
    trainer.finish(
        f,
        machinery=machinery,
        model=inference,
        logs=logs,
        step_var=step_var,
        wall_time_s=wall_time_s,
        extra_metrics=extra_metrics,
    )


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND)
