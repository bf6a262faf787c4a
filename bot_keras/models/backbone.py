"""`ResNetBackbone`: our headless ResNet as a keras-hub `FeaturePyramidBackbone` that survives `.keras` files.

keras-hub's detection and segmentation tasks read only `backbone.inputs` and `backbone.pyramid_outputs`
(`P{n}` = stride 2**n). A plain functional model has both, but `keras.models.load_model` rebuilds it as a
`Functional` without `pyramid_outputs`, so a saved task does not load. This class is registered and its config
is the builder's arguments: loading calls `__init__`, which rebuilds the graph (and `pyramid_outputs`) through
`resnet_features`, then the saved weights are set.

keras-hub is optional (the `transfer` extra): without it the class derives from `keras.Model` with the same
registered name, attributes and outputs, so classification users never import it (importing it adds ~3 s), and
a file saved either way loads either way. Import this module (bot_keras.segmentation does) before loading a
`.keras` file that holds one.
"""

import keras

from bot_keras.models.resnet import parse_resnet_name, pyramid_keys, resnet_features

try:
    from keras_hub.models import FeaturePyramidBackbone as _Base
except ImportError:  # the `transfer` extra is not installed: classification and FCN still work
    _Base = keras.Model


@keras.saving.register_keras_serializable(package="bot_keras")
class ResNetBackbone(_Base):
    """Outputs the dict `pyramid_outputs` keyed by true stride; see `build_backbone` for the arguments.

    `stage_outputs` maps stage number (1..4) to its output tensor, including the dilated stages that share a
    stride with the last one and hence have no pyramid key (stage 3 at output stride 8 or 16).
    """

    def __init__(self, model_name, *, input_shape=(None, None, 3), output_stride=32, zero_gamma=False,
                 kernel_initializer="glorot_uniform", name=None, **kwargs):
        depth, tweaks = parse_resnet_name(model_name)
        inputs = keras.Input(shape=tuple(input_shape), name="images")
        stages = resnet_features(inputs, depth, tweaks=tweaks, output_stride=output_stride,
                                 zero_gamma=zero_gamma, kernel_initializer=kernel_initializer)
        pyramid = {key: stages[stage] for stage, key in pyramid_keys(output_stride).items()}
        super().__init__(inputs=inputs, outputs=pyramid, name=name or f"{model_name}_backbone", **kwargs)
        self.pyramid_outputs = pyramid
        self.stage_outputs = stages
        self.model_name = model_name
        self.output_stride = output_stride
        self.zero_gamma = zero_gamma
        self.kernel_initializer = kernel_initializer
        self._input_shape_arg = tuple(input_shape)

    def get_config(self):
        # keras-hub's Backbone.get_config (name, trainable, dtype) when present; a plain Model's config is the
        # functional graph, which from_config below does not take.
        config = super().get_config() if _Base is not keras.Model else {"name": self.name,
                                                                          "trainable": self.trainable}
        initializer = self.kernel_initializer
        if isinstance(initializer, keras.initializers.Initializer):
            initializer = keras.initializers.serialize(initializer)
        config.update(model_name=self.model_name, input_shape=list(self._input_shape_arg),
                      output_stride=self.output_stride, zero_gamma=self.zero_gamma,
                      kernel_initializer=initializer)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)
