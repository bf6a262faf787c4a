"""Best-epoch selection (beyond the paper; timm's `--eval-metric`, Keras' `ModelCheckpoint(save_best_only)`).

With `--keep_best=METRIC`, one of the task's `val_*` columns of `logs/training.csv` (classification
`val_top1`, `val_top5`, `val_loss`; segmentation `val_mean_iou`, `val_pixel_accuracy`, `val_loss`;
detection `val_map_voc07`, `val_map_all_point`: each task module's `BEST_METRICS`), the trainer scores
every epoch-end evaluation and, when the metric beats the best so far (higher is better, lower for a loss),
saves the inference model (the task's `final_model`, as `model.keras` holds it) as `model_best.keras`
beside `model.keras`, atomically (`run_dir.save_model`: a temporary file, then a rename;
a kill between the two leaves the previous best in place). The best value and its epoch (0-based, the
`epoch` column of `logs/training.csv`) travel in the checkpoints, so a resumed run keeps comparing against
the same best, and end in `final_metrics.json` as `best_epoch` and `best_<metric>`. With weight EMA the
scored and saved weights are the averages, as for `model.keras`.
"""

import math

import tensorflow as tf

from bot_keras import distribute


class KeepBest:
    """Wraps a trainer's `evaluate(dataset) -> {name: mean}` to save the best epoch's model."""

    def __init__(self, metric, *, metrics, model, save, chief, step_var, steps_per_epoch, sync_bn):
        """`metrics`: the task's `BEST_METRICS`; `save(model)` writes the best model (the trainer: the
        task's final model to `model_best.keras`)."""
        if metric not in metrics:
            raise ValueError(f"keep_best must be one of {metrics}, got {metric!r}")
        self.metric, self.model, self.save, self.chief = metric, model, save, chief
        self.step_var, self.steps_per_epoch, self.sync_bn = step_var, steps_per_epoch, sync_bn
        self.sign = -1.0 if metric.endswith("loss") else 1.0
        self.best = tf.Variable(-math.inf, dtype=tf.float64, trainable=False, name="best_metric")
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")

    def checkpointed(self):
        """The objects to add to the run's checkpoint (keyword arguments of `loop.checkpoint_manager`)."""
        return {"best_metric": self.best, "best_epoch": self.best_epoch}

    def wrap(self, evaluate):
        def evaluate_and_keep_best(dataset):
            result = evaluate(dataset)
            value = self.sign * float(result[self.metric.removeprefix("val_")])
            if value > float(self.best.numpy()):
                if self.chief:
                    distribute.set_synchronized_batch_norm(self.model, False)  # the exported form
                    try:
                        self.save(self.model)
                    finally:
                        distribute.set_synchronized_batch_norm(self.model, self.sync_bn)
                self.best.assign(value)
                self.best_epoch.assign((int(self.step_var.numpy()) - 1) // self.steps_per_epoch)
            return result

        return evaluate_and_keep_best

    def summary(self):
        """{"best_epoch", "best_<metric>"} for final_metrics.json ({} before any evaluation)."""
        if int(self.best_epoch.numpy()) < 0:
            return {}
        best = self.sign * float(self.best.numpy())
        return {"best_epoch": int(self.best_epoch.numpy()), f"best_{self.metric}": best}
