"""FCN and DeepLabV3 segmenters: output size and dtype, the backbone they sit on, `.keras` round trips."""

import keras
import numpy as np
import pytest

from bot_keras.models import build_model
from bot_keras.segmentation.heads import build_segmenter
from bot_keras.segmentation.losses import main_logits

SIZE = 64
IMAGES = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")


def randomize(model, seed=0):
    """Random weights everywhere, BN moving statistics included, so a round trip is a real check."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) if "variance" in v.path
                       else rng.normal(0, 0.1, w.shape).astype(w.dtype)
                       for v, w in zip(model.weights, model.get_weights(), strict=True)])


@pytest.mark.parametrize("head, kwargs", [("fcn", dict(aux=True)), ("deeplabv3", dict(output_stride=16))])
def test_keras_file_round_trip(tmp_path, head, kwargs):
    if head == "deeplabv3":
        pytest.importorskip("keras_hub")
    model = build_segmenter(head, "resnet18_d", num_classes=5, input_shape=(SIZE, SIZE, 3), **kwargs)
    randomize(model)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    expected, got = model(IMAGES, training=False), loaded(IMAGES, training=False)
    if head == "fcn":
        assert got.keys() == {"logits", "aux_logits"}
        np.testing.assert_allclose(got["aux_logits"], expected["aux_logits"], rtol=1e-5, atol=1e-5)
    else:
        assert type(loaded) is type(model)
        assert list(loaded.backbone.image_encoder.pyramid_outputs) == ["P2", "P3", "P4"]
    expected, got = np.asarray(main_logits(expected)), np.asarray(main_logits(got))
    assert expected.shape == (2, SIZE, SIZE, 5) and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fcn_heads_sit_on_the_last_stage_and_stage_3():
    model = build_segmenter("fcn", "resnet18_d", num_classes=7, output_stride=8, aux=True)
    # GluonCV's _FCNHead: in_channels / 4 (512 → 128 on the last stage, 256 → 64 on stage 3), dropout 0.1.
    assert model.get_layer("fcn_conv").kernel.shape == (3, 3, 512, 128)
    assert model.get_layer("aux_conv").kernel.shape == (3, 3, 256, 64)
    assert model.get_layer("fcn_dropout").rate == 0.1
    assert model.get_layer("fcn_conv").input is model.get_layer("stage4_block1_out").output
    assert model.get_layer("aux_conv").input is model.get_layer("stage3_block1_out").output
    # Any input size: the logits come back at the input's size.
    assert model(IMAGES[:, :40, :56], training=False)["logits"].shape == (2, 40, 56, 7)


@pytest.mark.parametrize("head", ["fcn", "deeplabv3"])
def test_classifier_weights_arrive_and_logits_stay_float32_under_mixed_precision(head):
    if head == "deeplabv3":
        pytest.importorskip("keras_hub")
    classifier = build_model("resnet18_d", num_classes=3, input_shape=(32, 32, 3))
    randomize(classifier)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_segmenter(head, "resnet18_d", num_classes=5, output_stride=16, weights_from=classifier,
                                input_shape=(SIZE, SIZE, 3))
        logits = model(IMAGES, training=False)
    finally:
        keras.config.set_dtype_policy("float32")
    assert logits.dtype == "float32" and logits.shape == (2, SIZE, SIZE, 5)
    backbone = model if head == "fcn" else model.backbone.image_encoder
    assert backbone.get_layer("stage4_block1_conv2").compute_dtype == "float16"
    np.testing.assert_array_equal(backbone.get_layer("stage3_block0_conv2").kernel,
                                  classifier.get_layer("stage3_block0_conv2").kernel)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="head 'unet'.*fcn, deeplabv3"):
        build_segmenter("unet", "resnet18_d", num_classes=5)
    with pytest.raises(ValueError, match="num_classes.*0"):
        build_segmenter("fcn", "resnet18_d", num_classes=0)
    with pytest.raises(ValueError, match="output_stride must be one of .*got 4"):
        build_segmenter("fcn", "resnet18_d", num_classes=5, output_stride=4)
