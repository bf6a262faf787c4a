"""Models by name: the ResNet-A/B/C/D family (resnet.py) and Table 6's MobileNet / Inception-V3.

    model = build_model("resnet50_d", num_classes=1000, zero_gamma=True)      # classifier, float32 logits
    backbone = build_backbone("resnet50_d", output_stride=16, weights_from=model)   # {"P2", "P3", "P4"}

`MODEL_NAMES` lists every name `build_model` accepts; `build_backbone` takes the ResNet names.
"""

import keras

from bot_keras.models.applications import APPLICATIONS, build_application
from bot_keras.models.head import check_dropout_rate, check_num_classes, classification_head
from bot_keras.models.resnet import (
    RESNET_NAMES,
    check_output_stride,
    make_initializer,
    parse_resnet_name,
    resnet_features,
)

MODEL_NAMES = RESNET_NAMES + tuple(APPLICATIONS)


def _check_name(name, valid):
    if name not in valid:
        raise ValueError(f"Unknown model name {name!r}; valid names: {', '.join(valid)}")


def _check_input_shape(input_shape):
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[-1] is None or any(d is not None and d < 1 for d in shape):
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    return shape


def build_model(name, *, num_classes, input_shape=(224, 224, 3), zero_gamma=False, dropout_rate=0.0,
                kernel_initializer="glorot_uniform", drop_path_rate=0.0):
    """A classifier `keras.Model` returning float32 logits of shape `[batch, num_classes]`.

    Args:
      name: one of `MODEL_NAMES` ("resnet50", "resnet50_b", "resnet50_c", "resnet50_d", other depths,
        "mobilenet", "inception_v3").
      num_classes: size of the `logits` Dense layer.
      input_shape: (height, width, channels) of the float32 images.
      zero_gamma: Section 3.1's zero-γ: γ = 0 in the last BN of every residual branch (ResNets only).
      dropout_rate: dropout before the `logits` layer (0 = none).
      kernel_initializer: a Keras initializer for every conv and the Dense kernel; the paper's Xavier
        uniform by default, or "msra_prelu" for the authors' script's Gaussian MSRA-PReLU init.
      drop_path_rate: stochastic depth (beyond the paper; ResNets only): the last block's probability of
        dropping its residual branch in training, rising linearly from 0 at the first block.
    """
    _check_name(name, MODEL_NAMES)
    check_num_classes(num_classes)
    check_dropout_rate(dropout_rate)
    input_shape = _check_input_shape(input_shape)
    if name in APPLICATIONS:
        return build_application(name, num_classes=num_classes, input_shape=input_shape,
                                 zero_gamma=zero_gamma, dropout_rate=dropout_rate,
                                 kernel_initializer=kernel_initializer, drop_path_rate=drop_path_rate)
    depth, tweaks = parse_resnet_name(name)
    inputs = keras.Input(shape=input_shape, name="images")
    features = resnet_features(inputs, depth, tweaks=tweaks, zero_gamma=zero_gamma,
                               kernel_initializer=kernel_initializer, drop_path_rate=drop_path_rate)
    logits = classification_head(features[4], num_classes=num_classes, dropout_rate=dropout_rate,
                                 kernel_initializer=make_initializer(kernel_initializer))
    return keras.Model(inputs, logits, name=name)


def build_backbone(name, *, input_shape=(None, None, 3), output_stride=32, zero_gamma=False,
                   kernel_initializer="glorot_uniform", weights_from=None):
    """A headless ResNet (`ResNetBackbone`) whose outputs are its stage outputs keyed by true stride.

    Keys follow keras-hub's backbone contract, `P{n}` = stride 2**n, also on `model.pyramid_outputs`:
    output stride 32 → P2, P3, P4, P5 (strides 4..32); 16 → P2, P3, P4 (P4 = the last stage, dilated by 2);
    8 → P2, P3 (P3 = the last stage; stages 3 and 4 dilate by 2 and 4). Dilated stages that share a stride
    with the last one have no key; they are on `model.stage_outputs[stage]` (see `resnet.pyramid_keys`).
    The model saves to and loads from `.keras` files (also inside keras-hub tasks). Layer names equal the
    classifier's, so `weights_from=classifier` (a model from `build_model` with the same name) copies its
    weights in; see `load_classifier_weights`.
    """
    _check_name(name, RESNET_NAMES)
    input_shape = _check_input_shape(input_shape)
    check_output_stride(output_stride)
    from bot_keras.models.backbone import ResNetBackbone  # imports keras-hub when installed: only here

    model = ResNetBackbone(name, input_shape=input_shape, output_stride=output_stride, zero_gamma=zero_gamma,
                           kernel_initializer=kernel_initializer)
    if weights_from is not None:
        load_classifier_weights(model, weights_from)
    return model


def load_classifier_weights(backbone, classifier):
    """Copy a classifier's weights into a backbone layer by layer (matching names); returns the backbone.

    Every backbone layer with weights must exist in the classifier with the same weight shapes; the head
    (`logits`) is ignored. A ValueError names the first layer that does not match.
    """
    classifier_layers = {layer.name: layer for layer in classifier.layers}
    for layer in backbone.layers:
        if not layer.weights:
            continue
        source = classifier_layers.get(layer.name)
        if source is None:
            raise ValueError(f"Layer {layer.name!r} of {backbone.name!r} is missing from {classifier.name!r}")
        weights = source.get_weights()
        shapes = [tuple(w.shape) for w in weights]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != expected:
            raise ValueError(
                f"Layer {layer.name!r}: {classifier.name!r} has weight shapes {shapes}, "
                f"{backbone.name!r} expects {expected}"
            )
        layer.set_weights(weights)
    return backbone


__all__ = ["MODEL_NAMES", "build_backbone", "build_model", "load_classifier_weights"]
