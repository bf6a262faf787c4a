"""steps.py: the distributed train step (mixed precision, loss scaling, mixup) and the named metric sums."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras import distribute, optimizers, steps


def _tiny_model(num_classes=3, batch_norm=False):
    layers = [keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(num_classes, dtype="float32"),
    ]
    return keras.Sequential(layers)


def _batches(scale=1.0, n=8, seed=0):
    x = np.random.RandomState(seed).randn(n, 6, 6, 3).astype("float32") * scale
    y = np.eye(3, dtype="float32")[np.arange(n) % 3]
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _step_setup(precision, *, learning_rate=0.1, loss_scaling=None):
    distribute.set_precision(precision)
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = _tiny_model()
    optimizer = optimizers.build_optimizer(learning_rate, weight_decay=0.0)
    if loss_scaling if loss_scaling is not None else distribute.needs_loss_scaling(precision):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(strategy, model, optimizer, per_example_loss=loss, global_batch_size=8)
    return model, optimizer, step


def _steps(step, data, n, start=0):
    sums = step(iter(data), tf.constant(start, tf.int64), tf.constant(n), tf.constant(False))
    assert all(value.dtype == tf.float32 for value in sums.values())
    return {name: float(value) for name, value in sums.items()}


def test_mixed_float16_computes_in_half_keeps_float32_variables_logits_and_loss():
    model, optimizer, step = _step_setup("mixed_float16")
    conv = model.layers[0]
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    assert model(tf.zeros((1, 6, 6, 3))).dtype == tf.float32
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    sums = _steps(step, _batches(), 3)
    assert sums["count"] == 24
    weights_16 = model.get_weights()
    assert float(optimizer.dynamic_scale.numpy()) == 32768.0  # finite steps keep the initial scale

    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
    model_32, _, step_32 = _step_setup("float32")
    sums_32 = _steps(step_32, _batches(), 3)
    # The scaled float16 step is the float32 step up to half-precision round-off (~1e-3 relative).
    for a, b in zip(weights_16, model_32.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)
    assert sums["loss"] == pytest.approx(sums_32["loss"], rel=1e-2)


def test_overflowing_float16_gradients_skip_the_step_and_halve_the_loss_scale():
    model, optimizer, step = _step_setup("mixed_float16")
    before = model.get_weights()
    # Inputs of 3000 make the scaled (×32768) kernel gradients overflow float16's 65504.
    _steps(step, _batches(scale=3000.0), 1)
    assert float(optimizer.dynamic_scale.numpy()) == 16384.0
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.iterations.numpy()) == 0


def test_one_call_of_three_steps_equals_three_single_step_calls():
    # num_steps=1 runs a loop-free function (as Keras' fit does at steps_per_execution=1); more run the
    # while-loop. Same data, seeds and updates: the same sums and weights.
    model, _, step = _step_setup("float32")
    looped = _steps(step, _batches(), 3)
    looped_weights = model.get_weights()
    keras.backend.clear_session()
    model, _, step = _step_setup("float32")
    iterator = iter(_batches())
    singles = [step(iterator, tf.constant(i, tf.int64), tf.constant(1), tf.constant(False)) for i in range(3)]
    for name in looped:
        assert sum(float(sums[name]) for sums in singles) == pytest.approx(looped[name], rel=1e-6), name
    for a, b in zip(model.get_weights(), looped_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert step.several_steps.experimental_get_tracing_count() == 0  # the single steps never entered it


def _one_clipped_step(precision, clip_norm):
    """Weights after one step of `grad_clip_norm=clip_norm` with plain SGD(lr 1), and the unclipped
    gradient of the same batch (computed by hand)."""
    distribute.set_precision(precision)
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    optimizer = keras.optimizers.SGD(1.0)
    if distribute.needs_loss_scaling(precision):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    x, y = next(iter(_batches()))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(y, tf.cast(model(x), tf.float32)))
    grads = tape.gradient(loss, model.trainable_variables)
    before = model.get_weights()
    loss_fn = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(tf.distribute.get_strategy(), model, optimizer, per_example_loss=loss_fn,
                                     global_batch_size=8, grad_clip_norm=clip_norm)
    _steps(step, _batches(), 1)
    keras.mixed_precision.set_global_policy("float32")
    return before, [g.numpy() for g in grads], model.get_weights()


def test_grad_clip_norm_rescales_the_gradient_to_the_norm_and_leaves_smaller_ones_alone():
    before, grads, _ = _one_clipped_step("float32", 0.0)
    norm = float(np.sqrt(sum(np.sum(g.astype("float64") ** 2) for g in grads)))
    assert norm > 0.1
    for clip_norm, want_factor in ((norm / 4, 0.25), (norm * 4, 1.0)):
        _, _, after = _one_clipped_step("float32", clip_norm)
        for w0, g, w1 in zip(before, grads, after, strict=True):  # SGD(lr 1): w1 = w0 - factor · g
            np.testing.assert_allclose(w1, w0 - want_factor * g, rtol=1e-5, atol=1e-6)
    # Under mixed_float16 the gradients are those of the loss × 32768; the norm is compared unscaled.
    _, _, after_16 = _one_clipped_step("mixed_float16", norm / 4)
    for w0, g, w1 in zip(before, grads, after_16, strict=True):
        np.testing.assert_allclose(w1, w0 - 0.25 * g, rtol=2e-2, atol=2e-3)
    with pytest.raises(ValueError, match="grad_clip_norm must be >= 0"):
        _one_clipped_step("float32", -1.0)


def _frozen_step(**kwargs):
    """A step with learning rate 0 (the model stays fixed) and the mixing options `kwargs`; returns
    (run(start, mixup_on) -> the step's summed loss, loss_sum(images, labels) -> the same by hand)."""
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    optimizer = optimizers.build_optimizer(0.0, weight_decay=0.0)
    optimizer.build(model.trainable_variables)
    loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(tf.distribute.get_strategy(), model, optimizer, per_example_loss=loss,
                                     global_batch_size=8, seed=5, **kwargs)

    def run(start, mixup_on):
        it = iter(_batches())
        return step(it, tf.constant(start, tf.int64), tf.constant(1), tf.constant(mixup_on))["loss"].numpy()

    def loss_sum(x, y):
        return float(tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=model(x))))

    return run, loss_sum


def test_mixup_in_the_step_uses_the_replica_seeded_lambda_and_switches_off():
    from bot_keras.data import mixup as mixup_ops

    run, loss_sum = _frozen_step(mixup_alpha=0.2)
    images, labels = next(iter(_batches()))
    # λ of replica 0 at step 7 with run seed 5: seed (5, 7·1024 + 0).
    lam = mixup_ops.sample_mixup_lambda(0.2, seed=tf.constant([5, 7 * 1024], tf.int64))
    mixed_images, mixed_labels = mixup_ops.mixup(images, labels, lam)
    assert run(7, True) == pytest.approx(loss_sum(mixed_images, mixed_labels), rel=1e-5)
    assert run(8, True) != pytest.approx(run(7, True), rel=1e-5)  # a new λ each step
    assert run(7, False) == pytest.approx(loss_sum(images, labels), rel=1e-5)  # --mixup_off_epochs


class _InputSpy:
    """A model stand-in that records what the step hands the model (its dtype and float32 values)."""

    def __init__(self, model, batch_shape):
        self.model = model
        self.seen = tf.Variable(tf.zeros(batch_shape), trainable=False)
        self.dtypes = []

    def __call__(self, images, training=False):
        self.dtypes.append(images.dtype)
        self.seen.assign(tf.cast(images, tf.float32))
        return self.model(images, training=training)

    def __getattr__(self, name):  # trainable_variables, losses, compute_dtype
        return getattr(self.model, name)


@pytest.mark.parametrize("precision, compute, jit_compile", [
    ("float32", tf.float32, False),
    ("float32", tf.float32, True),  # XLA compiles the draws and the batched colour map too
    ("mixed_float16", tf.float16, False),
    ("mixed_bfloat16", tf.bfloat16, False),
])
def test_device_augmentation_in_the_step_computes_in_float32_and_hands_the_model_its_compute_dtype(
    precision, compute, jit_compile
):
    from bot_keras.data import augment

    distribute.set_precision(precision)
    keras.utils.set_random_seed(0)
    spy = _InputSpy(_tiny_model(), (8, 6, 6, 3))
    optimizer = optimizers.build_optimizer(0.0, weight_decay=0.0)
    optimizer.build(spy.trainable_variables)
    loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
    step = steps.make_train_function(
        tf.distribute.get_strategy(), spy, optimizer, per_example_loss=loss, global_batch_size=8, seed=5,
        augmentation=augment.Augmentation(on="device"), jit_compile=jit_compile,
    )
    images = np.random.default_rng(1).integers(0, 256, (8, 6, 6, 3)).astype(np.uint8)
    labels = np.eye(3, dtype="float32")[np.arange(8) % 3]
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    step(iter(data), tf.constant(11, tf.int64), tf.constant(1), tf.constant(False))
    assert spy.dtypes == [compute]
    # The float32 result of the device half (seed: run seed 5, step 11, replica 0), rounded once to the
    # compute dtype: within half a unit in the last place of that dtype (plus float32 round-off between
    # the eager and the compiled graph). A chain computed in half precision rounds 0-255 pixels to
    # bfloat16's 1.0 steps at its first op and misses this by far.
    # Under XLA the float draws come from XLA's own sampler (same distributions, other numbers), so the
    # reference is compiled the same way.
    device_half = tf.function(augment.augment_batch_on_device, jit_compile=jit_compile)
    expected = device_half(tf.constant(images), steps.device_augmentation_seed(5, 11, 0))
    assert expected.dtype == tf.float32
    expected = expected.numpy()
    mantissa_bits = {tf.float32: 23, tf.float16: 10, tf.bfloat16: 7}[compute]
    half_ulp = 0.5 * 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - mantissa_bits)
    assert (np.abs(spy.seen.numpy() - expected) <= half_ulp + 1e-5).all()
    # The step draws per step: another step's batch is augmented differently.
    other = augment.augment_batch_on_device(tf.constant(images), steps.device_augmentation_seed(5, 12, 0))
    assert np.abs(other.numpy() - expected).max() > 0.05
    keras.mixed_precision.set_global_policy("float32")


def test_cutmix_in_the_step_uses_the_replica_seeded_draw_and_switches_off():
    from bot_keras.data import mixup as mixup_ops

    run, loss_sum = _frozen_step(mixup_alpha=0.2, cutmix_alpha=1.0, mix_switch_prob=1.0)
    images, labels = next(iter(_batches()))
    draw = mixup_ops.sample_mix(tf.constant([5, 7 * 1024], tf.int64), mixup_alpha=0.2, cutmix_alpha=1.0,
                                switch_prob=1.0)
    assert draw[1] == 1.0  # switch probability 1: CutMix
    box = mixup_ops.cutmix_box(draw[0], draw[2:], 6, 6)
    assert 0 < (box[1] - box[0]) * (box[3] - box[2]) < 36  # a proper box, not a no-op
    mixed_images, mixed_labels = mixup_ops.cutmix(images, labels, box)
    assert run(7, True) == pytest.approx(loss_sum(mixed_images, mixed_labels), rel=1e-5)
    assert run(7, False) == pytest.approx(loss_sum(images, labels), rel=1e-5)  # --mixup_off_epochs


def test_random_erasing_in_the_step_erases_before_mixing_with_the_step_seed():
    from bot_keras.data import erasing
    from bot_keras.data import mixup as mixup_ops

    run, loss_sum = _frozen_step(mixup_alpha=0.2, random_erasing=1.0)
    images, labels = next(iter(_batches()))
    step_seed = tf.constant([5, 7 * 1024], tf.int64)
    seed = tf.random.experimental.stateless_fold_in(step_seed, steps.ERASING_STREAM)
    erased = erasing.random_erasing(images, probability=1.0, seed=seed)
    assert not np.array_equal(erased.numpy(), images.numpy())
    lam = mixup_ops.sample_mixup_lambda(0.2, seed=step_seed)
    assert run(7, True) == pytest.approx(loss_sum(*mixup_ops.mixup(erased, labels, lam)), rel=1e-5)


# --- XLA (jit_compile) ------------------------------------------------------------------------------------


def _bn_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, dtype="float32"),
        ]
    )


def _run_jit(jit_compile, precision, strategy_name, *, steps_per_execution=3, scale=1.0, model=_bn_model):
    """Two calls of `steps_per_execution` steps (label smoothing, mixup on) and one evaluation."""
    distribute.set_precision(precision)
    strategy = distribute.create_strategy(strategy_name)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        net = model()
        optimizer = optimizers.build_optimizer(0.1, weight_decay=1e-3)
        if distribute.needs_loss_scaling(precision):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(net.trainable_variables)
    loss = steps.make_per_example_loss(label_smoothing=0.1, temperature=1.0, hard_weight=None)
    train = steps.make_train_function(
        strategy, net, optimizer, per_example_loss=loss, global_batch_size=8, mixup_alpha=0.2, seed=3,
        jit_compile=jit_compile,
    )
    iterator = iter(strategy.experimental_distribute_dataset(_batches(scale)))
    n = tf.constant(steps_per_execution)
    losses = [
        float(train(iterator, tf.constant(start, tf.int64), n, tf.constant(True))["loss"])
        for start in (0, steps_per_execution)
    ]
    evaluate = steps.make_eval_function(strategy, net, jit_compile=jit_compile)
    result = evaluate(strategy.experimental_distribute_dataset(_batches().take(2)))
    keras.mixed_precision.set_global_policy("float32")
    return losses, result, net.get_weights(), optimizer


@pytest.mark.parametrize(
    "precision, strategy_name, rtol",
    [
        ("float32", "default", 1e-5),
        ("float32", "mirrored", 1e-5),  # one CPU replica, under MirroredStrategy's replica context
        ("mixed_float16", "default", 1e-3),  # XLA may fuse half-precision ops in another order
        ("mixed_bfloat16", "mirrored", 1e-2),
    ],
)
def test_xla_steps_give_the_losses_and_weights_of_the_plain_steps(precision, strategy_name, rtol):
    plain = _run_jit(False, precision, strategy_name)
    keras.backend.clear_session()
    xla = _run_jit(True, precision, strategy_name)
    np.testing.assert_allclose(xla[0], plain[0], rtol=rtol)
    for name in ("loss", "top1", "top5"):
        assert xla[1][name] == pytest.approx(plain[1][name], rel=rtol, abs=rtol), name
    assert xla[1]["count"] == plain[1]["count"] == 16
    for a, b in zip(xla[2], plain[2], strict=True):
        np.testing.assert_allclose(a, b, rtol=10 * rtol, atol=10 * rtol)
    assert int(xla[3].iterations.numpy()) == int(plain[3].iterations.numpy()) == 6


def test_xla_step_skips_an_overflowing_float16_step_like_the_plain_step():
    _, _, before, _ = _run_jit(False, "mixed_float16", "default", steps_per_execution=0, model=_tiny_model)
    keras.backend.clear_session()
    _, _, after, optimizer = _run_jit(True, "mixed_float16", "default", steps_per_execution=1, scale=3000.0,
                                      model=_tiny_model)
    # Both calls overflow (inputs of 3000): two skipped steps, the scale halved twice, weights as built.
    assert float(optimizer.dynamic_scale.numpy()) == 8192.0
    assert int(optimizer.iterations.numpy()) == 0
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_xla_refuses_several_cpu_replicas_naming_them():
    class _Extended:
        worker_devices = ("/job:localhost/device:CPU:0", "/job:localhost/device:CPU:1")

    class _TwoCpus:
        num_replicas_in_sync = 2
        extended = _Extended()

    message = r"needs one replica or MirroredStrategy over GPUs; this _TwoCpus has 2 replicas on .*CPU:0, .*1"
    with pytest.raises(ValueError, match=message):
        steps.check_jit_compile(_TwoCpus())
    steps.check_jit_compile(tf.distribute.get_strategy())  # one replica: fine
