"""The whole zoo (every name in `MODEL_NAMES`): finite logits and a gradient for every trainable variable."""

import numpy as np
import pytest
import tensorflow as tf

from bot_keras.models import MODEL_NAMES, build_model

# The smallest input each network takes (Inception-V3's valid-padded stem needs 75 px); 32 px brings every
# ResNet and MobileNet down to a 1×1 final feature map, which still back-propagates through all layers.
MIN_SIZE = {"inception_v3": 75}
# Depths 101-200 repeat the bottleneck blocks ResNet-50 already exercises, with the same tweaks, but take
# 10-20 s each to build and back-propagate on CPU.
DEEP = ("resnet101", "resnet152", "resnet200")


def zoo():
    return [pytest.param(name, marks=pytest.mark.slow) if name.startswith(DEEP) else name
            for name in MODEL_NAMES]


def forward_and_gradients(model, size, batch=2):
    """One training-mode forward pass on random images and the gradients of a random projection of the
    logits (batch 2: training-mode BN over a single 1×1 value would pass no gradient back)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, size, size, 3)).astype("float32")
    projection = tf.constant(rng.normal(size=(batch, model.output_shape[-1])).astype("float32"))
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_sum(logits * projection)
    grads = tape.gradient(loss, model.trainable_variables)
    by_path = {variable.path: grad for variable, grad in zip(model.trainable_variables, grads, strict=True)}
    return images, np.asarray(logits), by_path


@pytest.mark.parametrize("name", zoo())
def test_every_trainable_variable_gets_a_gradient(name):
    # zero_gamma=False: with zero-γ the residual branches start switched off and pass no gradient (below).
    size = MIN_SIZE.get(name, 32)
    model = build_model(name, num_classes=10, input_shape=(size, size, 3), dropout_rate=0.2)
    images, logits, grads = forward_and_gradients(model, size)
    assert len(grads) == len(model.trainable_variables)  # variable paths are unique
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    no_gradient = [path for path, grad in grads.items()
                   if grad is None or not np.isfinite(grad).all() or not np.abs(grad).max() > 0]
    assert no_gradient == []
    inference = np.asarray(model(images, training=False))
    assert np.isfinite(inference).all() and inference.std() > 0


def test_zero_gamma_branches_learn_through_their_last_bn_only():
    """Section 3.1's zero-γ: a branch's output is γ·x̂ + β = β, so its earlier layers get exactly zero
    gradient at the first step, while d loss/dγ = Σ upstream · x̂ (x̂ the normalised input) is not zero:
    the branch switches itself on."""
    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3), zero_gamma=True)
    _, logits, grads = forward_and_gradients(model, 32)
    assert np.isfinite(logits).all()
    last_bn_gammas = [layer.gamma.path for layer in model.layers
                      if layer.name.startswith("stage") and layer.name.endswith("_bn2")]
    assert len(last_bn_gammas) == 8  # one per basic block of ResNet-18
    for path in last_bn_gammas:
        assert np.abs(grads[path]).max() > 0, path
    branch_start = [model.get_layer(f"stage{s}_block{b}_{part}").weights[0].path
                    for s in range(1, 5) for b in range(2) for part in ("conv1", "conv2", "bn1")]
    for path in branch_start:
        assert not np.asarray(grads[path]).any(), path
    # The shortcuts and stem still learn.
    assert np.abs(grads[model.get_layer("stem_conv1").kernel.path]).max() > 0

