"""The distributed train and eval steps: what runs inside `strategy.run`, in a `tf.function`.

One pattern for every strategy (TensorFlow's custom-training-loop guide; Keras 3.15's `model.fit` fails
under `MultiWorkerMirroredStrategy` with two workers): the per-example loss is computed in float32 and
divided by the *global* batch (`tf.nn.compute_average_loss`), so the optimizer's all-reduce SUM of replica
gradients is the gradient of the global mean; `optimizer.scale_loss` gives dynamic loss scaling under
mixed_float16, with the overflow verdict agreed across replicas (`_poison_if_any_replica_overflowed`).

The steps are generic in the model, the loss and the metrics:

- `per_example_loss(labels, outputs, teacher_outputs) -> float32 [B]`;
- `Metrics`: the names and the function that sums them over one replica's batch ("loss" and "count"
  among them; `CLASSIFICATION_METRICS` adds top-1 and top-5 hits);
- the steps return those sums, summed over replicas and steps; `means` divides them by the count.

A fine-tuning command passes its own model, loss and sums; distillation and mixup are the classifier's
options (Sections 5.3 and 5.4) and are off unless asked for.
"""

import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from bot_keras import losses
from bot_keras.data import augment, erasing
from bot_keras.data import mixup as mixup_ops
from bot_keras.teacher import teacher_logits

ERASING_STREAM = 1  # random erasing's seeds: the step's (run seed, step·1024 + replica) folded with this


def classification_sums(per_example_loss, labels, logits):
    """Summed loss, top-1 and top-5 hits and the example count of one replica's batch (one-hot labels)."""
    classes = tf.argmax(labels, axis=-1, output_type=tf.int32)
    k5 = min(5, logits.shape[-1])
    return {
        "loss": tf.reduce_sum(per_example_loss),
        "top1": tf.reduce_sum(tf.cast(tf.math.in_top_k(classes, logits, 1), tf.float32)),
        "top5": tf.reduce_sum(tf.cast(tf.math.in_top_k(classes, logits, k5), tf.float32)),
        "count": tf.cast(tf.shape(logits)[0], tf.float32),
    }


@dataclasses.dataclass(frozen=True)
class Metrics:
    """What a step sums: `sums(per_example_loss, labels, outputs) -> {name: float32 scalar}` over one
    replica's batch, with exactly the keys `names` (among them "loss" and "count"). Inside the step the
    sums travel as one vector in `names` order: one all-reduce a step (a dict of scalars would be one
    each, and MultiWorkerMirroredStrategy's `reduce` rejects it), and the step loop's accumulator exists
    before its first iteration.

    `shapes` names the sums that are not scalars (e.g. a segmentation confusion matrix, {"confusion":
    (K, K)}); they travel flattened in the same vector. Keep each replica's per-batch sums below 2**24 so
    that float32 counts stay exact (the evaluation adds batches in float64 on the host).
    """

    names: tuple
    sums: Callable
    shapes: dict = dataclasses.field(default_factory=dict)

    def _shape(self, name):
        return tuple(self.shapes.get(name, ()))

    def vector(self, per_example_loss, labels, outputs):
        sums = self.sums(per_example_loss, labels, outputs)
        return tf.concat([tf.reshape(tf.cast(sums[name], tf.float32), [-1]) for name in self.names], 0)

    def named(self, vector):
        sizes = [math.prod(self._shape(name)) for name in self.names]
        parts = tf.split(vector, sizes)
        pairs = zip(self.names, parts, strict=True)
        return {name: tf.reshape(part, self._shape(name)) for name, part in pairs}


CLASSIFICATION_METRICS = Metrics(("loss", "top1", "top5", "count"), classification_sums)


def means(sums):
    """{name: sum / count} for every summed metric, and "count" itself as an int."""
    sums = {name: float(value) for name, value in sums.items()}
    count = max(sums["count"], 1.0)
    result = {name: value / count for name, value in sums.items() if name != "count"}
    result["count"] = int(sums["count"])
    return result


def cross_entropy(labels, logits, teacher_logits=None):
    """Plain softmax cross-entropy per example: the evaluation loss (no smoothing, no teacher)."""
    del teacher_logits
    return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def make_per_example_loss(*, label_smoothing, temperature, hard_weight):
    """`(labels, logits, teacher_logits) -> float32 [B]`: Section 5.2's smoothed CE, or 5.3's distillation.

    Smoothing applies to the (possibly mixed) one-hot labels; smoothing is linear in the labels, so this
    equals mixing already-smoothed labels (Section 5.4's order).
    """
    smoothed = losses.classification_loss(label_smoothing)

    def per_example_loss(labels, logits, teacher_logits):
        if teacher_logits is None:
            return smoothed.call(labels, logits)  # `call`: one value per example, no reduction
        return losses.distillation_loss(
            labels=labels,
            student_logits=logits,
            teacher_logits=teacher_logits,
            temperature=temperature,
            hard_weight=hard_weight,
            label_smoothing=label_smoothing,
            reduction="none",
        )

    return per_example_loss


def _float32(outputs):
    return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), outputs)


def make_train_function(
    strategy,
    model,
    optimizer,
    *,
    per_example_loss,
    global_batch_size,
    metrics=None,
    teacher=None,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    mix_switch_prob=0.5,
    random_erasing=0.0,
    ema=None,
    seed=0,
    jit_compile=False,
    grad_clip_norm=0.0,
    augmentation=None,
):
    """Returns `train_steps(iterator, start_step, num_steps, mixup_on) -> {name: sum over the steps}`.

    What a replica does to its batch before the model, in order (`prepare_batch`): the device half of
    Section 2.1 when `augmentation.on == "device"` (the uint8 batch cast, jittered, lit and normalised in
    float32, `augment.augment_batch_on_device`, each image's draws from the seed (run seed, step, replica),
    so a resumed run draws what an uninterrupted one would), then random erasing, then mixup or CutMix;
    the model gets its compute dtype.

    Each replica mixes its own batch with its own λ (Section 5.4: one λ a batch; the partner of example i
    is example B-1-i), the teacher (`teacher.load_teacher`'s, if any) sees the same mixed
    batch, and the loss is divided by the global batch so that the all-reduced SUM of replica gradients is
    the gradient of the global mean. Build the model and optimizer in `strategy.scope()`. `metrics`
    defaults to `CLASSIFICATION_METRICS`. `cutmix_alpha > 0` adds CutMix (`mixup_ops.sample_mix`): alone it
    replaces mixup; beside it, each batch of a replica uses CutMix with probability `mix_switch_prob`.
    `mixup_on` False turns both off. `random_erasing` > 0 erases a box of each image with that probability
    (`erasing.random_erasing`, seed (run seed, step·1024 + replica) folded with `ERASING_STREAM`) before
    the mixing. `ema` (an `ema.WeightEMA`, or None) is updated after every step.

    `jit_compile=True` compiles the whole replica step with XLA (mixup, teacher, forward, backward, the
    overflow agreement, the optimizer update and the metric sums); the step loop and its `next(iterator)`
    stay outside (XLA cannot compile iterators). See `check_jit_compile` for the strategies it supports.

    `grad_clip_norm > 0` rescales the global batch's gradient to at most that L2 norm before the update
    (`clip_global_norm`); 0 leaves it alone.
    """
    if grad_clip_norm < 0:
        raise ValueError(f"grad_clip_norm must be >= 0 (0: off); got {grad_clip_norm!r}.")
    metrics = metrics or CLASSIFICATION_METRICS
    agree_on_overflow = (
        isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and strategy.num_replicas_in_sync > 1
    )

    replicas = strategy.num_replicas_in_sync

    mixing = mixup_alpha > 0 or cutmix_alpha > 0

    def mix_draws(step, mixup_on):
        """Every replica's `mixup_ops.sample_mix` draw at `step` ([replicas, 4]; λ = 1 when mixing is off):
        stateless seed (run seed, step·1024 + replica). Drawn outside the replica step: XLA cannot compile
        the Gamma sampler."""
        off = tf.constant([[1.0, 0.0, 0.0, 0.0]])
        if not mixing:
            return tf.tile(off, [replicas, 1])
        run_seed = tf.cast(seed, tf.int64)
        draws = [
            mixup_ops.sample_mix(tf.stack([run_seed, step * 1024 + r]), mixup_alpha=mixup_alpha,
                                 cutmix_alpha=cutmix_alpha, switch_prob=mix_switch_prob)
            for r in range(replicas)
        ]
        return tf.where(mixup_on, tf.stack(draws), off)

    on_device = augmentation is not None and augmentation.on == "device"

    def prepare_batch(batch, step, draws):
        """A replica's batch as the model trains on it, in this order: device augmentation (float32) →
        random erasing (on the normalised batch, timm's order) → mixup/CutMix → the model's compute dtype
        (host-augmented float32 batches are left to the model's cast)."""
        images, labels = batch
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
        if on_device:
            images = augment.augment_batch_on_device(
                images, device_augmentation_seed(seed, step, replica), augmentation
            )
        if random_erasing > 0:
            erase_seed = tf.random.experimental.stateless_fold_in(
                tf.stack([tf.cast(seed, tf.int64), step * 1024 + replica]), ERASING_STREAM
            )
            images = erasing.random_erasing(images, probability=random_erasing, seed=erase_seed)
        if mixing:
            images, labels = mixup_ops.mix(images, labels, tf.gather(draws, replica))
        if on_device:
            images = tf.cast(images, model.compute_dtype)
        return images, labels

    def replica_step(batch, draws, step):
        images, labels = prepare_batch(batch, step, draws)
        teacher_outputs = teacher_logits(teacher, images) if teacher is not None else None
        with tf.GradientTape() as tape:
            outputs = _float32(model(images, training=True))
            example_losses = per_example_loss(labels, outputs, teacher_outputs)
            loss = tf.nn.compute_average_loss(example_losses, global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n([tf.cast(x, tf.float32) for x in model.losses])
                )
            scaled_loss = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        if agree_on_overflow:
            grads = _poison_if_any_replica_overflowed(grads)
        if grad_clip_norm:
            grads = clip_global_norm(grads, grad_clip_norm, optimizer=optimizer, replicas=replicas)
        optimizer.apply(grads, model.trainable_variables)
        return metrics.vector(example_losses, labels, outputs)

    if jit_compile:
        check_jit_compile(strategy)
        replica_step = tf.function(replica_step, jit_compile=True, autograph=False)

    # The step is plain tensor code (its `if`s test Python values), as is everything it calls: AutoGraph
    # converts only the loop of `several_steps`, which saves ~0.5 s of every training process's start.
    @tf.autograph.experimental.do_not_convert
    def one_step(iterator, step, mixup_on):
        per_replica = strategy.run(replica_step, args=(next(iterator), mix_draws(step, mixup_on), step))
        if ema is not None:  # after the update, once for all replicas
            ema.update()
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function(autograph=False)
    def single_step(iterator, start_step, mixup_on):
        return metrics.named(one_step(iterator, start_step, mixup_on))

    @tf.function
    def several_steps(iterator, start_step, num_steps, mixup_on):
        totals = tf.zeros([len(metrics.names)])
        for i in tf.range(num_steps):
            totals += one_step(iterator, start_step + tf.cast(i, tf.int64), mixup_on)
        return metrics.named(totals)

    def train_steps(iterator, start_step, num_steps, mixup_on):
        # One step runs outside the while-loop, as Keras' own train function does at steps_per_execution=1
        # (tools/bench_train.py times both: its "loop" row; docs/performance.md).
        if (isinstance(num_steps, int) or tf.executing_eagerly()) and int(num_steps) == 1:
            return single_step(iterator, start_step, mixup_on)
        return several_steps(iterator, start_step, num_steps, mixup_on)

    train_steps.several_steps = several_steps  # the loop, also for one step (tools/bench_train.py times it)
    return train_steps


# The device augmentation's draws are a stream apart from mixup's λ, which uses (run seed, step·1024 +
# replica) unfolded.
_DEVICE_AUGMENTATION_STREAM = 1


def device_augmentation_seed(seed, step, replica):
    """The stateless seed [2] of one replica's device augmentation at `step`: (run seed, step·1024 +
    replica), folded with a stream number of its own."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64) * 1024 + tf.cast(replica, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, _DEVICE_AUGMENTATION_STREAM, alg="philox")


def make_eval_function(strategy, model, *, per_example_loss=cross_entropy, metrics=None, summarize=means,
                       jit_compile=False):
    """Returns `evaluate(distributed_dataset) -> summarize(sums)`: by default `means`, {"loss", "top1",
    "top5", "count"} (plain cross-entropy, inference mode). The sums reach `summarize` as float64 numpy
    values (arrays for the non-scalar sums of `metrics.shapes`). `jit_compile=True` compiles each
    replica's forward pass and sums with XLA."""
    metrics = metrics or CLASSIFICATION_METRICS

    def replica_step(batch):
        images, labels = batch
        if images.dtype == tf.uint8:  # make_dataset(augmentation.on="device"): normalised here, batched
            images = augment.normalize(images)
        outputs = _float32(model(images, training=False))
        return metrics.vector(per_example_loss(labels, outputs, None), labels, outputs)

    if jit_compile:
        check_jit_compile(strategy)
        replica_step = tf.function(replica_step, jit_compile=True, autograph=False)

    @tf.function(autograph=False)
    def eval_batch(batch):
        per_replica = strategy.run(replica_step, args=(batch,))
        return metrics.named(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))

    def evaluate(dataset):
        totals = {name: 0.0 for name in metrics.names}
        for batch in dataset:
            totals = {name: totals[name] + np.asarray(value, np.float64) for name, value in
                      eval_batch(batch).items()}
        return summarize(totals)

    return evaluate


def check_jit_compile(strategy):
    """Raises ValueError unless XLA can compile `strategy`'s replica step: one replica (any device), or
    MirroredStrategy over GPUs only, where TensorFlow compiles the replica function with its all-reduces
    as XLA collectives. With several CPU replicas TensorFlow compiles all replicas into one cluster on one
    device, which cannot reach the other replicas' variables."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return
    devices = getattr(strategy.extended, "worker_devices", ())
    if isinstance(strategy, tf.distribute.MirroredStrategy) and all("GPU" in d.upper() for d in devices):
        return
    raise ValueError(
        f"jit_compile (XLA) needs one replica or MirroredStrategy over GPUs; this "
        f"{type(strategy).__name__} has {replicas} replicas on {', '.join(devices) or 'its devices'}."
    )


def clip_global_norm(grads, clip_norm, *, optimizer, replicas):
    """Scales one replica's gradients so that the global batch's gradient (their sum over the replicas)
    has an L2 norm of at most `clip_norm`, as `tf.clip_by_global_norm` does on one device.

    Under a `LossScaleOptimizer` the gradients are those of the scaled loss; the norm is compared unscaled.
    With several replicas the gradients are summed first and handed back divided by the replica count:
    the optimizer's own all-reduce sums them again. (Keras' `global_clipnorm` clips each replica's share on
    its own, before that all-reduce, so its threshold would depend on the number of replicas.) Non-finite
    gradients stay non-finite, so a loss-scaled overflow still skips the step.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    grads = list(grads)
    if replicas > 1:
        summed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [grads[i] for i in present]
        )
        for i, g in zip(present, summed, strict=True):
            grads[i] = g
    norm = tf.linalg.global_norm([tf.cast(grads[i], tf.float32) for i in present])
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        norm /= tf.cast(optimizer.dynamic_scale, tf.float32)
    # min(1, c / norm): 1 for a zero gradient, NaN (propagated to every gradient) for a non-finite one.
    factor = tf.where(norm > clip_norm, clip_norm / norm, tf.where(tf.math.is_finite(norm), 1.0, norm))
    factor /= replicas
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]


def _poison_if_any_replica_overflowed(grads):
    """Makes every replica's gradients non-finite when any replica's are (dynamic loss scaling).

    Keras' LossScaleOptimizer checks the *local* gradients for inf/NaN before its inner optimizer
    all-reduces them, and under MirroredStrategy it takes replica 0's verdict for all: an overflow on
    another replica is then summed into every weight (measured: NaN weights, loss scale unchanged). One
    scalar all-reduce of the non-finite count makes all replicas skip the step and halve the scale.
    """
    local = [tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in grads if g is not None]
    bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.add_n(local))
    poison = tf.where(bad > 0, float("nan"), 0.0)
    return [None if g is None else g + tf.cast(poison, g.dtype) for g in grads]
