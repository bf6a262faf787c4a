"""Image classification as a task (the paper's subject): what `bot_keras.train` trains."""

from absl import flags

from bot_keras import schedules, trainer


def define_flags(fv):
    """Defines the trainer's flags on the `absl.flags.FlagValues` `fv` (also what reads a run's flags.txt)."""
    d = dict(flag_values=fv)
    # --- what to train, on what ----------------------------------------------------------------------
    flags.DEFINE_string("model", None, "Model name, e.g. resnet50_d (see bot_keras.models.MODEL_NAMES).", **d)
    flags.DEFINE_string(
        "dataset", None, "Data source: tfds:NAME[:VERSION], tfrecord:GLOB, folder:ROOT, synthetic.", **d
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data dir; relative folder:/tfrecord: paths resolve in it.", **d
    )
    flags.DEFINE_string(
        "train_split", "train", "Split to train on (TFDS split or image-folder subdirectory).", **d
    )
    flags.DEFINE_string(
        "eval_split", "validation", "Split evaluated at each epoch end; empty: no evaluation.", **d
    )
    flags.DEFINE_bool(
        "skip_corrupt", False, "Skip undecodable image files (each reported) instead of failing.", **d
    )
    flags.DEFINE_integer(
        "label_offset", None, "Subtracted from TFRecord labels (1 for TF's 1-based ImageNet shards).", **d
    )
    flags.DEFINE_integer("image_size", 224, "Training and evaluation resolution (pixels, square).", **d)
    flags.DEFINE_bool(
        "random_crop", True, "Random-resized crop, 8-100% of the area (Sec. 2.1); off: eval crop.", **d
    )
    flags.DEFINE_float(
        "crop_min_area", 0.08, "Smallest area fraction of the random-resized crop (paper: 0.08).", **d
    )
    flags.DEFINE_bool("flip", True, "Random horizontal flip (Sec. 2.1).", **d)
    flags.DEFINE_bool("color_jitter", True, "Brightness, saturation and contrast jitter (Sec. 2.1).", **d)
    flags.DEFINE_bool("pca_lighting", True, "AlexNet-style PCA lighting noise (Sec. 2.1).", **d)
    flags.DEFINE_float("dropout_rate", 0.0, "Dropout before the classifier.", **d)
    flags.DEFINE_bool(
        "zero_gamma", False, "Zero-initialise the last BN gamma of each residual block (Sec. 3.1).", **d
    )
    flags.DEFINE_bool("sync_bn", False, "Synchronise BatchNorm statistics across replicas.", **d)
    # --- optimisation ----------------------------------------------------------------------------------
    trainer.define_optimization_flags(
        fv,
        batch_size=256,
        epochs=120,
        base_lr=0.1,
        lr_schedule="step",
        schedule_names=schedules.SCHEDULE_NAMES,
    )
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing epsilon (Sec. 5.2).", **d)
    flags.DEFINE_float("mixup_alpha", 0.0, "Mixup Beta(alpha, alpha); 0 turns mixup off (Sec. 5.4).", **d)
    flags.DEFINE_integer("mixup_off_epochs", 0, "Train the last N epochs without mixup.", **d)
    flags.DEFINE_string(
        "teacher",
        "",
        "Distillation teacher: a .keras file, a SavedModel dir, or NAME:WEIGHTS (Sec. 5.3).",
        **d,
    )
    flags.DEFINE_float("distill_temperature", 20.0, "Distillation temperature T (Sec. 5.3).", **d)
    flags.DEFINE_float(
        "distill_hard_weight", None, "Weight w of the hard loss, (w, 1-w) form; unset: the paper's 1:1.", **d
    )
    # --- machinery -------------------------------------------------------------------------------------
    trainer.define_machinery_flags(fv)
