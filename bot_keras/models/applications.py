"""The other networks of the paper's Table 6 (MobileNet, Inception-V3), from `keras.applications`.

The bodies are Keras' own (`weights=None`, `include_top=False`; their BatchNormalization settings are
Keras'); the head is ours (`head.classification_head`), so every training trick that acts on the logits
(label smoothing, mixup, distillation, float32 logits under mixed precision) applies unchanged. Zero-γ
(Section 3.1) is defined on residual blocks, which these networks do not have, so asking for it is an error.
Inception-V3 was trained at 299×299 in the paper; pass `input_shape=(299, 299, 3)` for that.
"""

import keras

from bot_keras.models.head import classification_head

APPLICATIONS = {
    "mobilenet": keras.applications.MobileNet,  # v1, width multiplier 1.0: the paper's Table 6 MobileNet
    "inception_v3": keras.applications.InceptionV3,
}


def build_application(name, *, num_classes, input_shape, zero_gamma=False, dropout_rate=0.0,
                      kernel_initializer="glorot_uniform", drop_path_rate=0.0):
    if name not in APPLICATIONS:
        raise ValueError(f"Unknown application {name!r}; valid names: {', '.join(APPLICATIONS)}")
    if zero_gamma:
        raise ValueError(
            f"zero_gamma=True does not apply to {name!r}: zero-γ (Section 3.1) initialises the last BN of "
            "each residual block, and this network has no residual blocks; use it with a ResNet"
        )
    if drop_path_rate:
        raise ValueError(
            f"drop_path_rate={drop_path_rate!r} does not apply to {name!r}: stochastic depth drops residual "
            "branches, and this network has none; use it with a ResNet"
        )
    if kernel_initializer != "glorot_uniform":
        raise ValueError(
            f"kernel_initializer={kernel_initializer!r} is not supported for {name!r}: its layers come "
            "from keras.applications with their own initializers; leave the default 'glorot_uniform'"
        )
    body = APPLICATIONS[name](weights=None, include_top=False, input_shape=tuple(input_shape))
    logits = classification_head(body.output, num_classes=num_classes, dropout_rate=dropout_rate)
    return keras.Model(body.input, logits, name=name)
