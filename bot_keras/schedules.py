"""Learning-rate schedules: linear scaling and warmup (Section 3.1), step and cosine decay (Section 5.1).

Every schedule maps the optimizer's iteration counter (the 0-based index of the update about to be
applied; Keras passes its int64 ``iterations`` variable) to a float32 learning rate, and is a serialisable
``keras.optimizers.schedules.LearningRateSchedule`` so that a ``.keras`` file or a checkpoint restores it.

Conventions, decided once here:

- ``scaled_learning_rate``: the paper's linear scaling rule, lr = base_lr × global_batch / 256
  (0.1 × b / 256 in Section 3.1; ``--base_lr`` is the learning rate per 256 images).
- ``LinearWarmup``: the paper's warmup "at batch i, 1 ≤ i ≤ m, set the learning rate to iη/m"
  with 1-based batches; with our 0-based step s that is η·(s + 1)/m for s < m, so the first update
  already uses η/m and the m-th uses η. η is the wrapped schedule's value at its step 0.
  After warmup the wrapped schedule runs either on the absolute step (``shift=False``: step decay,
  whose boundaries are absolute epochs as in the paper's baseline, "divided by 10 at the 30th, 60th
  and 90th epochs") or on the step counted from the end of warmup (``shift=True``: cosine, whose
  t is counted after warmup, "ignoring warmup stage").
- ``CosineDecay``: η_t = ½(1 + cos(πt/T))·η for 0 ≤ t ≤ T and 0 afterwards. ``build_lr_schedule`` sets
  T = (iterations after warmup) − 1 so that the last update of training uses exactly 0 (the paper's T,
  "the total number of batches", differs from ours by that one iteration).
- ``StepDecay``: η·rate^k where k is the number of boundaries (in steps) that the step has reached,
  so the learning rate drops at the first step of the boundary epoch.
"""

import math

import keras
from keras import ops

PAPER_BATCH_SIZE = 256  # Section 3.1: "0.1 × b/256" — base_lr is per 256 images.

SCHEDULE_NAMES = ("step", "cosine", "constant")  # the classifier's (bot_keras.train)
# Fine-tuning adds the poly schedule of semantic segmentation (DeepLab, GluonCV's FCN: power 0.9).
FINETUNE_SCHEDULE_NAMES = ("cosine", "poly", "step", "constant")
POLY_POWER = 0.9


def scaled_learning_rate(base_lr, global_batch_size):
    """Linear scaling rule (Section 3.1): base_lr × global_batch_size / 256."""
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}.")
    if int(global_batch_size) != global_batch_size or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}.")
    return float(base_lr) * global_batch_size / PAPER_BATCH_SIZE


def _float_step(step):
    return ops.cast(step, "float32")


@keras.saving.register_keras_serializable(package="bot_keras")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """η·decay_rate^k, k = number of ``boundaries`` (steps, ascending) with step ≥ boundary.

    With no boundaries this is a constant learning rate (what ``--lr_schedule=constant`` uses).
    """

    def __init__(self, initial_learning_rate, boundaries=(), decay_rate=0.1):
        boundaries = [int(b) for b in boundaries]
        if any(b <= 0 for b in boundaries) or boundaries != sorted(set(boundaries)):
            raise ValueError(
                f"StepDecay boundaries must be positive and strictly increasing, got {boundaries}."
            )
        if not initial_learning_rate > 0:
            raise ValueError(f"StepDecay initial_learning_rate must be > 0, got {initial_learning_rate!r}.")
        if not 0 < decay_rate <= 1:
            raise ValueError(f"StepDecay decay_rate must be in (0, 1], got {decay_rate!r}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.boundaries = boundaries
        self.decay_rate = float(decay_rate)

    def __call__(self, step):
        lr = ops.convert_to_tensor(self.initial_learning_rate, "float32")
        # Multiply once per reached boundary (rather than rate ** k) so that e.g. 0.4 × 0.1 is the same
        # float32 product a hand computation gets; the loop is over a handful of Python constants.
        step = ops.cast(step, "int64")
        for boundary in self.boundaries:
            factor = ops.where(ops.greater_equal(step, boundary), self.decay_rate, 1.0)
            lr = lr * ops.cast(factor, "float32")
        return lr

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "boundaries": list(self.boundaries),
            "decay_rate": self.decay_rate,
        }


@keras.saving.register_keras_serializable(package="bot_keras")
class CosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Section 5.1: η_t = ½(1 + cos(πt/T))·η for 0 ≤ t ≤ T (``decay_steps``), 0 for t > T.

    Steps before 0 (never produced by ``LinearWarmup``) are clipped to 0.
    """

    def __init__(self, initial_learning_rate, decay_steps):
        if not initial_learning_rate > 0:
            raise ValueError(f"CosineDecay initial_learning_rate must be > 0, got {initial_learning_rate!r}.")
        if int(decay_steps) != decay_steps or decay_steps < 1:
            raise ValueError(f"CosineDecay decay_steps must be a positive integer, got {decay_steps!r}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = int(decay_steps)

    def __call__(self, step):
        t = ops.clip(_float_step(step), 0.0, float(self.decay_steps))
        # ½(1 + cos x) = cos²(x/2): the same value without float32 cancellation near the end of training,
        # where 1 + cos x would lose most of its digits.
        half = ops.cos(0.5 * math.pi * t / self.decay_steps)
        # cos(π/2) is not exactly 0 in float32; the mask makes t ≥ T exactly 0.
        before_end = ops.cast(ops.less(t, float(self.decay_steps)), "float32")
        return self.initial_learning_rate * ops.square(half) * before_end

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps}


@keras.saving.register_keras_serializable(package="bot_keras")
class PolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """η·(1 − t/T)^power for 0 ≤ t ≤ T (``decay_steps``), 0 after: DeepLab's "poly" policy, power 0.9.

    GluonCV's segmentation trainer divides by the total iterations; as for ``CosineDecay``,
    ``build_lr_schedule`` sets T so that the last update uses exactly 0.
    """

    def __init__(self, initial_learning_rate, decay_steps, power=POLY_POWER):
        if not initial_learning_rate > 0:
            raise ValueError(f"PolyDecay initial_learning_rate must be > 0, got {initial_learning_rate!r}.")
        if int(decay_steps) != decay_steps or decay_steps < 1:
            raise ValueError(f"PolyDecay decay_steps must be a positive integer, got {decay_steps!r}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = int(decay_steps)
        self.power = float(power)

    def __call__(self, step):
        t = ops.clip(_float_step(step), 0.0, float(self.decay_steps))
        return self.initial_learning_rate * ops.power(1.0 - t / self.decay_steps, self.power)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "power": self.power}


@keras.saving.register_keras_serializable(package="bot_keras")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Section 3.1 warmup in front of any schedule.

    For step s < ``warmup_steps`` = m: η·(s + 1)/m, η = ``schedule(0)`` (the paper's iη/m, 1-based i).
    For s ≥ m: ``schedule(s - m)`` if ``shift`` (cosine: t counts after warmup) else ``schedule(s)``
    (step decay: boundaries stay absolute).
    """

    def __init__(self, schedule, warmup_steps, shift=True):
        if isinstance(schedule, dict):
            schedule = keras.saving.deserialize_keras_object(schedule)
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(f"LinearWarmup needs a LearningRateSchedule to wrap, got {schedule!r}.")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"LinearWarmup warmup_steps must be a positive integer, got {warmup_steps!r}.")
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.shift = bool(shift)

    def __call__(self, step):
        step = ops.cast(step, "int64")
        target = ops.cast(self.schedule(0), "float32")
        warm = target * (_float_step(step) + 1.0) / float(self.warmup_steps)
        after = self.schedule(step - self.warmup_steps if self.shift else step)
        return ops.where(ops.less(step, self.warmup_steps), warm, ops.cast(after, "float32"))

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "warmup_steps": self.warmup_steps,
            "shift": self.shift,
        }


def training_steps(epochs, steps_per_epoch):
    """Updates in a run of `epochs` (may be fractional; a partial last epoch counts its started steps).

    The one definition the trainer's loop and the schedules share, so that cosine reaches 0 exactly at
    the last update the loop runs.
    """
    return int(math.ceil(epochs * steps_per_epoch - 1e-9))


def build_lr_schedule(
    name,
    *,
    base_lr,
    global_batch_size,
    steps_per_epoch,
    epochs,
    warmup_epochs,
    decay_epochs=(30, 60, 90),
    decay_rate=0.1,
):
    """The schedule behind ``--lr_schedule``, ``--base_lr``, ``--warmup_epochs`` (Sections 2, 3.1, 5.1).

    The peak learning rate is ``scaled_learning_rate(base_lr, global_batch_size)``.

    - ``step``: ÷(1/decay_rate) at each of ``decay_epochs`` (absolute epochs; the baseline's 30, 60, 90).
    - ``cosine``: from the peak at the end of warmup to exactly 0 at the last iteration of training.
    - ``poly``: (1 − t/T)^0.9 from the peak at the end of warmup to exactly 0 at the last iteration
      (fine-tuning only; not one of the classifier's ``SCHEDULE_NAMES``).
    - ``constant``: the peak throughout.

    ``warmup_epochs`` > 0 wraps the schedule in ``LinearWarmup``; 0 returns the bare schedule.
    Epoch counts may be fractional as long as they give whole steps (e.g. warmup 0.5 epochs).
    """
    if name not in FINETUNE_SCHEDULE_NAMES:
        raise ValueError(f"name must be one of {', '.join(FINETUNE_SCHEDULE_NAMES)}; got {name!r}.")
    if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}.")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}.")
    if warmup_epochs >= epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs!r}) must be smaller than epochs ({epochs!r}).")
    peak = scaled_learning_rate(base_lr, global_batch_size)
    total_steps = training_steps(epochs, steps_per_epoch)
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    if name == "step":
        decay_epochs = list(decay_epochs)
        if decay_epochs != sorted(set(decay_epochs)) or any(e <= warmup_epochs for e in decay_epochs):
            raise ValueError(
                f"decay_epochs must be strictly increasing and after warmup_epochs={warmup_epochs!r}; "
                f"got {decay_epochs}."
            )
        boundaries = [int(round(e * steps_per_epoch)) for e in decay_epochs]
        schedule, shift = StepDecay(peak, boundaries, decay_rate), False
    elif name in ("cosine", "poly"):
        decay_steps = total_steps - warmup_steps - 1
        if decay_steps < 1:
            raise ValueError(
                f"{name} decay needs at least 2 iterations after warmup; epochs={epochs!r}, "
                f"warmup_epochs={warmup_epochs!r}, steps_per_epoch={steps_per_epoch!r} leave "
                f"{total_steps - warmup_steps}."
            )
        decay = CosineDecay if name == "cosine" else PolyDecay
        schedule, shift = decay(peak, decay_steps), True
    else:
        schedule, shift = StepDecay(peak, (), 1.0), False

    if warmup_steps == 0:
        return schedule
    return LinearWarmup(schedule, warmup_steps, shift=shift)
