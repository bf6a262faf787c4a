"""SGD with Nesterov momentum and weight decay without bias/BN decay (Sections 2 and 3.1).

The update (both weight-decay modes) is the authors' NAG form — GluonCV's ``train_imagenet.py`` trains
with MXNet 1.x's ``nag`` optimizer (state = μ·state + g + wd·w; w ← w − lr·(g + wd·w + μ·state)), the
same update as PyTorch's ``SGD(nesterov=True)`` — with the learning rate *outside* the momentum buffer
(MXNet 2.0 later moved it inside; we follow the 1.x form the paper's runs used):

    buf ← μ·buf + g
    w   ← w − lr·(g + μ·buf)          (nesterov; plain momentum: w ← w − lr·buf)

Keras' own ``keras.optimizers.SGD`` keeps the learning rate *inside* the buffer
(v ← μ·v − lr·g; w ← w + μ·v − lr·g). The two agree while lr is constant and differ as soon as it
changes — which warmup and cosine decay do at every step — because Keras' buffer still carries old
gradients scaled by old learning rates. ``MomentumSGD`` below is that lr-outside form.

Weight decay, ``weight_decay_mode``:

- ``"l2"`` (the paper's text and the authors' code, MXNet's ``wd``): g ← g + wd·w before the momentum
  update, i.e. an L2 penalty ½·wd·‖w‖² on the loss. Its decay passes through the momentum accumulator,
  so once training is steady it acts 1/(1 − μ) = 10× (μ = 0.9) harder than the same wd applied once
  per step.
- ``"decoupled"`` (Keras 3's optimizer ``weight_decay``): w ← w − lr·wd·w once per step, before and
  outside the momentum update, as Keras' base class applies it (with the current lr; ``update_step`` does it
  here, so a variable's learning-rate multiplier scales its decay too). Per unit of wd it is
  about 10× weaker than ``"l2"`` with μ = 0.9, so the paper's 1e-4 in ``l2`` corresponds to
  1e-4/(1 − μ) = 1e-3 ``decoupled`` (``paper_weight_decay``; the default of ``build_optimizer`` and
  of the trainer's ``--weight_decay``).

No bias decay (Section 3.1, "only applies the weight decay to the weights in convolution and
fully-connected layers"): every bias and every BatchNorm γ and β is excluded (GluonCV's ``--no-wd``
sets ``wd_mult = 0`` on parameters matching ``.*beta|.*gamma|.*bias``). Keras 3 matches
``exclude_from_weight_decay`` name patterns with ``re.search`` against a variable's name — the short
name (``kernel``, ``bias``, ``gamma``, ``beta``) of a Keras variable, but the full path
(``model/stem_bn/gamma:0``, ``.../replica_1:0`` under ``tf.distribute``) of the ``tf.Variable`` that the
TensorFlow backend passes to ``update_step`` — and a pattern that matches nothing excludes nothing, silently.
``NO_DECAY_PATTERN`` is the one pattern used both by the optimizer and by ``decayed_variables``, which
tells a caller (and the tests) exactly which variables are decayed. Moving means and variances are not
trainable and never reach the optimizer.

Learning-rate multipliers (``lr_multipliers``, fine-tuning's ``--backbone_lr_mult``): pairs of a regular
expression and a factor; a variable whose path matches a pattern (the first that matches) steps with
lr·factor, its decoupled decay included, as GluonCV's ``lr_mult`` and PyTorch's parameter groups do.
"""

import re

import keras
from keras import ops

WEIGHT_DECAY_MODES = ("decoupled", "l2")

# Section 2 / the authors' code: L2 weight decay 1e-4 (with Nesterov momentum 0.9).
PAPER_L2_WEIGHT_DECAY = 1e-4

# The last path component is bias, gamma or beta: matches the Keras variable's short name ("bias"), the
# tf.Variable the TensorFlow backend hands to `update_step` ("model/stem_bn/gamma:0", and
# "model/logits/bias/replica_1:0" under MirroredStrategy), but not "kernel", "depthwise_kernel",
# "moving_mean", nor a kernel whose *layer* happens to be called "beta" ("beta/kernel:0").
NO_DECAY_PATTERN = r"(?:^|/)(?:bias|gamma|beta)(?:/replica_\d+)?(?::\d+)?$"


@keras.saving.register_keras_serializable(package="bot_keras")
class MomentumSGD(keras.optimizers.Optimizer):
    """SGD with (Nesterov) momentum in the authors' lr-outside-the-buffer form, with L2 or decoupled decay.

    Args:
        learning_rate: float or ``LearningRateSchedule`` (see ``bot_keras.schedules``).
        momentum: μ in [0, 1).
        nesterov: the NAG update w ← w − lr·(g + μ·buf) (the paper's and GluonCV's choice).
        weight_decay: wd ≥ 0; 0 disables decay.
        weight_decay_mode: ``"l2"`` (g ← g + wd·w before momentum) or ``"decoupled"``
            (w ← w − lr·wd·w, Keras' base-class decay).
        no_decay_pattern: regular expression; variables whose name it matches (``re.search``) are not
            decayed. ``None`` decays every trainable variable. Stored in the config, so a ``.keras``
            file restores it (Keras' own ``exclude_from_weight_decay`` setting is not serialised).
        **kwargs: the base optimizer's arguments (``clipnorm``, ``name``, ...).
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.0,
        weight_decay_mode="decoupled",
        no_decay_pattern=NO_DECAY_PATTERN,
        lr_multipliers=(),
        name="momentum_sgd",
        **kwargs,
    ):
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay_mode must be one of {', '.join(WEIGHT_DECAY_MODES)}; "
                f"got {weight_decay_mode!r}."
            )
        weight_decay = 0.0 if weight_decay is None else float(weight_decay)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        lr_multipliers = tuple((str(pattern), float(factor)) for pattern, factor in lr_multipliers)
        for pattern, factor in lr_multipliers:
            re.compile(pattern)  # a bad pattern fails here, not at the first step
            if factor < 0:
                raise ValueError(f"learning-rate multiplier {factor!r} for {pattern!r} must be >= 0.")
        # Decoupled decay is applied in `update_step` (so a multiplier scales it), not by the base class.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.weight_decay_mode = weight_decay_mode
        self.no_decay_pattern = no_decay_pattern
        # The base class's `weight_decay` stays None (it applies nothing); both rates live here and are used
        # in `update_step`.
        self.l2_weight_decay = weight_decay if weight_decay_mode == "l2" else 0.0
        self.decoupled_weight_decay = weight_decay if weight_decay_mode == "decoupled" else 0.0
        self.lr_multipliers = lr_multipliers
        self._configured_weight_decay = weight_decay
        if no_decay_pattern:
            re.compile(no_decay_pattern)  # a bad pattern fails here, not at the first step
            self.exclude_from_weight_decay(var_names=[no_decay_pattern])

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._lr_factors = [self.lr_multiplier(variable.path) for variable in variables]
        self.momentums = []
        if self.momentum:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def lr_multiplier(self, path):
        """The learning-rate factor of the variable at `path`: the first matching pattern's, else 1."""
        return next((factor for pattern, factor in self.lr_multipliers if re.search(pattern, path)), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        # Keras' Optimizer has no public routes to a variable's slot index or to its own
        # exclude_from_weight_decay verdict: Keras' own SGD calls `_get_variable_index` in its update_step,
        # and its base class's decoupled decay `_use_weight_decay`.
        factor = self._lr_factors[self._get_variable_index(variable)]
        lr = ops.cast(learning_rate, variable.dtype)
        if factor != 1.0:
            lr = ops.multiply(lr, ops.cast(factor, variable.dtype))
        gradient = ops.cast(gradient, variable.dtype)
        if self.decoupled_weight_decay and self._use_weight_decay(variable):
            # Keras' base-class decoupled decay, w ← w − lr·wd·w before the update, with this variable's lr.
            wd = ops.cast(self.decoupled_weight_decay, variable.dtype)
            self.assign_sub(variable, ops.multiply(ops.multiply(lr, wd), variable))
        if self.l2_weight_decay and self._use_weight_decay(variable):
            # L2 mode: the penalty's gradient wd·w joins g before momentum (MXNet nag: grad += wd * weight).
            wd = ops.cast(self.l2_weight_decay, variable.dtype)
            gradient = ops.add(gradient, ops.multiply(wd, variable))
        if not self.momentum:
            self.assign_sub(variable, ops.multiply(lr, gradient))
            return
        momentum = ops.cast(self.momentum, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        new_buffer = ops.add(ops.multiply(momentum, buffer), gradient)
        self.assign(buffer, new_buffer)
        step = ops.add(gradient, ops.multiply(momentum, new_buffer)) if self.nesterov else new_buffer
        self.assign_sub(variable, ops.multiply(lr, step))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "weight_decay": self._configured_weight_decay,
                "weight_decay_mode": self.weight_decay_mode,
                "no_decay_pattern": self.no_decay_pattern,
                "lr_multipliers": [list(pair) for pair in self.lr_multipliers],
            }
        )
        return config


def paper_weight_decay(weight_decay_mode, *, momentum=0.9):
    """The strength that regularises like the paper's L2 1e-4 in `weight_decay_mode`.

    In steady state the L2 term wd·w passes through the momentum buffer and shrinks a weight by
    lr·wd/(1 − μ) per step (with or without Nesterov); decoupled decay shrinks it by lr·wd (Keras' base
    class multiplies the decay by the learning rate). Equal shrinkage: wd_decoupled = wd_l2/(1 − μ),
    1e-3 at μ = 0.9.
    """
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"weight_decay_mode must be one of {', '.join(WEIGHT_DECAY_MODES)}; got {weight_decay_mode!r}."
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if weight_decay_mode == "l2":
        return PAPER_L2_WEIGHT_DECAY
    return PAPER_L2_WEIGHT_DECAY / (1.0 - momentum)


def build_optimizer(
    learning_rate,
    *,
    momentum=0.9,
    nesterov=True,
    weight_decay=None,
    weight_decay_mode="decoupled",
    no_bias_decay=True,
    lr_multipliers=(),
):
    """The optimizer behind ``--weight_decay``, ``--weight_decay_mode``, ``--no_bias_decay`` (Section 3.1).

    Returns a ``MomentumSGD`` (Nesterov momentum 0.9 by default, Section 2). With ``no_bias_decay``
    every bias and BN γ/β is excluded from decay; otherwise all trainable variables are decayed (the
    baseline of Section 2). ``lr_multipliers``: (pattern, factor) pairs, see the module docstring.
    ``weight_decay=None`` is ``paper_weight_decay(weight_decay_mode, momentum)``:
    1e-4 in ``l2`` mode, 1e-3 in ``decoupled`` mode at momentum 0.9. Build it inside the distribution
    strategy's scope; under
    ``mixed_float16`` wrap it in ``keras.optimizers.LossScaleOptimizer`` (``model.compile`` does that
    itself for a ``mixed_float16`` policy).
    """
    if weight_decay is None:
        weight_decay = paper_weight_decay(weight_decay_mode, momentum=momentum)
    return MomentumSGD(
        learning_rate=learning_rate,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        weight_decay_mode=weight_decay_mode,
        no_decay_pattern=NO_DECAY_PATTERN if no_bias_decay else None,
        lr_multipliers=lr_multipliers,
    )


def decayed_variables(model_or_variables, *, no_bias_decay=True):
    """The trainable variables that ``build_optimizer(..., no_bias_decay=no_bias_decay)`` decays.

    Accepts a ``keras.Model`` (its trainable variables) or a list of variables. Decay applies to the
    conv and dense kernels; with ``no_bias_decay`` biases and BN γ/β are left out (same pattern and the
    same ``re.search`` on the variable name as the optimizer).
    """
    if hasattr(model_or_variables, "trainable_variables"):
        variables = model_or_variables.trainable_variables
    else:
        variables = list(model_or_variables)
    if not no_bias_decay:
        return list(variables)
    return [v for v in variables if re.search(NO_DECAY_PATTERN, v.name) is None]
