"""Model size and cost from layer shapes: parameters and multiply-accumulates (MACs) per image.

Counted: one MAC per multiply of every `Conv2D` (H_out·W_out·C_out·k_h·k_w·C_in/groups),
`DepthwiseConv2D` (H_out·W_out·C_in·multiplier·k_h·k_w) and `Dense` (inputs·units). Not counted:
BatchNormalization (foldable into the conv), activations, pooling, additions, biases. This is the
convention of the paper's Table 5 "FLOPs" (3.9 G for ResNet-50), which are multiply-accumulates.
"""

import math

import keras


def count_macs(model):
    """Multiply-accumulates of one forward pass of one image through `model` (static input shape)."""
    total = 0
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out = layer.output.shape
            kh, kw = layer.kernel_size
            total += out[1] * out[2] * out[3] * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            kh, kw = layer.kernel_size
            total += out[1] * out[2] * out[3] * kh * kw * layer.input.shape[-1] // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += math.prod(layer.output.shape[1:-1]) * layer.input.shape[-1] * layer.units
    return int(total)


def count_trainable_params(model):
    return int(sum(math.prod(v.shape) for v in model.trainable_variables))


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer
