"""Segmentation models on our backbones: the paper's FCN (Section 6.2) and keras-hub's DeepLabV3.

    model = build_segmenter("fcn", "resnet50_d", num_classes=150, output_stride=8, aux=True)

Both return float32 logits at the input's size, `[B, H, W, num_classes]`, under any precision policy.

`fcn` — GluonCV's FCN (the authors' segmentation code, `gluoncv.model_zoo.fcn`) on a dilated backbone
(output stride 8): on the last stage, 3×3 conv to in_channels/4 (no bias), BN, ReLU, dropout 0.1, 1×1 conv to
the classes, bilinear upsampling to the input size. With `aux=True` the same head on stage 3 gives auxiliary
logits, and the model outputs `{"logits", "aux_logits"}` (weight them with `losses.segmentation_loss`).
GluonCV upsamples with align_corners=True; we use TensorFlow's half-pixel resize (a sub-pixel difference).
A plain functional model: it needs no keras-hub, and `.keras` files round-trip.

`deeplabv3` — keras-hub's `DeepLabV3ImageSegmenter` (ASPP on the last stage, decoder on P2) on our
`ResNetBackbone`; needs the `transfer` extra. Call it with `training=False` outside `fit`: a `Resizing` layer
in its pyramid pooling defaults to training mode and would run (and update) two BatchNorms as in training. For
sparse masks with the ignore label, compile with `SparseCategoricalCrossentropy(from_logits=True,
ignore_class=255)` (its default compile wants one-hot masks), or use `losses.pixel_cross_entropy`.
"""

import contextlib
import math

import keras
import tensorflow as tf

from bot_keras.models import build_backbone
from bot_keras.models.head import check_dropout_rate, check_num_classes
from bot_keras.models.resnet import BN_EPSILON, BN_MOMENTUM, make_initializer

HEADS = ("fcn", "deeplabv3")
FCN_DROPOUT = 0.1  # GluonCV _FCNHead
# DeepLabV3's atrous rates at output stride 16, doubled at 8 (Chen et al., 2017, Section 4.1).
ASPP_RATES = {32: (3, 6, 9), 16: (6, 12, 18), 8: (12, 24, 36)}


@keras.saving.register_keras_serializable(package="bot_keras")
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of `x` to the spatial size of `reference` (sizes known only at run time work too)."""

    def call(self, x, reference):
        # tf.image.resize, not keras.ops.image.resize: Keras' version needs a static size in a graph, so a
        # traced model with unknown H, W (a SavedModel signature) would fail.
        return tf.cast(tf.image.resize(x, tf.shape(reference)[1:3], method="bilinear"), x.dtype)

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


def fcn_head(x, num_classes, *, prefix, dropout_rate=FCN_DROPOUT, kernel_initializer="glorot_uniform"):
    """GluonCV `_FCNHead`: 3×3 conv (in/4) → BN → ReLU → dropout → 1×1 conv with bias (float32 logits)."""
    x = keras.layers.Conv2D(x.shape[-1] // 4, 3, padding="same", use_bias=False,
                            kernel_initializer=make_initializer(kernel_initializer), name=f"{prefix}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
    x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
    if dropout_rate:
        x = keras.layers.Dropout(dropout_rate, name=f"{prefix}_dropout")(x)
    return keras.layers.Conv2D(num_classes, 1, kernel_initializer=make_initializer(kernel_initializer),
                               dtype="float32", name=f"{prefix}_logits")(x)


def build_fcn(backbone, num_classes, *, aux=False, dropout_rate=FCN_DROPOUT,
              kernel_initializer="glorot_uniform"):
    """FCN on a `ResNetBackbone`; its layers (and weights) become the model's, under the same names."""
    inputs = backbone.inputs[0]
    resize = ResizeLike(dtype="float32", name="upsample")
    logits = resize(fcn_head(backbone.stage_outputs[4], num_classes, prefix="fcn", dropout_rate=dropout_rate,
                             kernel_initializer=kernel_initializer), inputs)
    if not aux:
        return keras.Model(inputs, logits, name=f"fcn_{backbone.model_name}")
    aux_logits = ResizeLike(dtype="float32", name="aux_upsample")(
        fcn_head(backbone.stage_outputs[3], num_classes, prefix="aux", dropout_rate=dropout_rate,
                 kernel_initializer=kernel_initializer), inputs)
    outputs = {"logits": logits, "aux_logits": aux_logits}
    return keras.Model(inputs, outputs, name=f"fcn_{backbone.model_name}")


@contextlib.contextmanager
def _float32_policy():
    """Layers created inside compute in float32 (keras-hub's segmenter makes its output conv in __init__)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def import_keras_hub(what):
    try:
        import keras_hub
    except ImportError:
        raise ImportError(f"{what} needs keras-hub (Python >= 3.11): pip install 'bot-keras[transfer]'") \
            from None
    return keras_hub


def build_deeplabv3(backbone, num_classes, *, input_shape=(None, None, 3)):
    """keras-hub's DeepLabV3 (ASPP + P2 decoder) on a `ResNetBackbone`; float32 logits at the input size."""
    keras_hub = import_keras_hub("head 'deeplabv3'")
    stride = backbone.output_stride
    deeplab = keras_hub.models.DeepLabV3Backbone(
        image_encoder=backbone,
        spatial_pyramid_pooling_key=f"P{int(math.log2(stride))}",  # the last stage (true-stride key)
        upsampling_size=stride // 4,  # to P2's stride, where the decoder concatenates low-level features
        dilation_rates=list(ASPP_RATES[stride]),
        low_level_feature_key="P2",
        image_shape=tuple(input_shape),
    )
    with _float32_policy():
        return keras_hub.models.DeepLabV3ImageSegmenter(backbone=deeplab, num_classes=num_classes,
                                                        preprocessor=None)


def build_segmenter(head, backbone_name, *, num_classes, output_stride=8, input_shape=(None, None, 3),
                    aux=False, dropout_rate=FCN_DROPOUT, zero_gamma=False,
                    kernel_initializer="glorot_uniform", weights_from=None):
    """A segmentation model by name: `head` in HEADS on `build_backbone(backbone_name, ...)`.

    `weights_from` (a classifier from `build_model` with the same name) initialises the backbone, as in
    `build_backbone`; the head starts from `kernel_initializer`. `aux` and `dropout_rate` are FCN's.
    """
    if head not in HEADS:
        raise ValueError(f"Unknown segmentation head {head!r}; valid heads: {', '.join(HEADS)}")
    check_num_classes(num_classes)
    check_dropout_rate(dropout_rate)
    if head == "deeplabv3":
        import_keras_hub("head 'deeplabv3'")  # before building anything
        if aux:
            raise ValueError("aux is FCN's auxiliary head; head 'deeplabv3' has none")
    backbone = build_backbone(backbone_name, input_shape=input_shape, output_stride=output_stride,
                              zero_gamma=zero_gamma, kernel_initializer=kernel_initializer,
                              weights_from=weights_from)
    if head == "fcn":
        return build_fcn(backbone, num_classes, aux=aux, dropout_rate=dropout_rate,
                         kernel_initializer=kernel_initializer)
    return build_deeplabv3(backbone, num_classes, input_shape=input_shape)
