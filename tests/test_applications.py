"""Table 6's MobileNet and Inception-V3 by name: sizes, float32 logits, and the zero-γ refusal."""

import keras
import numpy as np
import pytest

from bot_keras.models import build_model
from bot_keras.models.complexity import count_macs, count_trainable_params


def test_mobilenet_v1_size_and_cost():
    model = build_model("mobilenet", num_classes=1000)
    # Howard et al. 2017, Table 8: 1.0 MobileNet-224 has 569 million mult-adds and 4.2 million parameters.
    assert count_trainable_params(model) == 4_231_976
    assert count_macs(model) == pytest.approx(569e6, rel=0.005)
    assert model.get_layer("logits").units == 1000


def test_inception_v3_size():
    # 23,817,352 trainable parameters with the 1000-way head (Keras' InceptionV3 without aux head).
    model = build_model("inception_v3", num_classes=1000, input_shape=(299, 299, 3))
    assert count_trainable_params(model) == 23_817_352
    assert model.input.shape == (None, 299, 299, 3)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mobilenet_logits_are_float32_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = build_model("mobilenet", num_classes=7, input_shape=(64, 64, 3), dropout_rate=0.25)
    assert model.get_layer("dropout").rate == 0.25
    logits = model(np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32"), training=False)
    assert tuple(logits.shape) == (2, 7)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.isfinite(np.asarray(logits)).all()
    assert {v.dtype for v in model.trainable_variables} == {"float32"}


@pytest.mark.parametrize("name", ["mobilenet", "inception_v3"])
def test_zero_gamma_is_refused(name):
    with pytest.raises(ValueError, match=f"zero_gamma=True does not apply to '{name}'.*no residual blocks"):
        build_model(name, num_classes=10, input_shape=(96, 96, 3), zero_gamma=True)


def test_custom_initializer_is_refused():
    with pytest.raises(ValueError, match="kernel_initializer='msra_prelu' is not supported for 'mobilenet'"):
        build_model("mobilenet", num_classes=10, input_shape=(64, 64, 3), kernel_initializer="msra_prelu")
