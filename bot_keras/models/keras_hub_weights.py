"""keras-hub's ResNet-vd presets in our ResNet-D models.

keras-hub's ResNet-vd (PaddleClas's name for the paper's ResNet-D, Section 4.2: deep 32-32-64 stem and the
2×2 average-pool shortcut) with bottleneck blocks is our `resnet{50,101,152,200}_d` layer for layer:
weights copied by the mapping below give identical features. Its presets (`resnet_vd_50_imagenet`, the
distilled `resnet_vd_50_ssld_imagenet`, ...) are therefore ImageNet starts for `resnet50_d` fine-tuning.

The mapping, keras-hub layer → our layer (docs/architecture.md fixes our names):

    conv{i}_conv / conv{i}_bn                    stem_conv{i} / stem_bn{i}                  (i = 1, 2, 3)
    stack{s}_block{b}_0_conv / _0_bn             stage{s+1}_block{b}_down_conv / _down_bn   (the shortcut)
    stack{s}_block{b}_{i}_conv / _{i}_bn         stage{s+1}_block{b}_conv{i} / _bn{i}

Only those presets map. keras-hub's basic-block ResNet-vd-18/34 give the first block of stage 1 a 1×1
projection shortcut that ResNet-D (timm's `resnet18d`, ours) does not have, and its plain `resnet_50` etc.
have a 7×7 stem: loading either into a ResNet-D is refused, naming both architectures.

A preset is a directory written by keras-hub's `Backbone.save_to_preset` (`config.json`, `metadata.json`,
`model.weights.h5`) or a preset name, which keras-hub downloads on a connected machine. keras-hub is the
optional `transfer` extra: it is imported here only when a preset is loaded.
"""

import json
import os
import re

import numpy as np

from bot_keras.models.resnet import layers_with_weights

PRESET_PREFIX = "kerashub:"

# Our depth for keras-hub's blocks per stage, bottleneck ResNet-vd only (see the module docstring).
_VD_BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152, (3, 12, 48, 3): 200}
_KERAS_HUB_LAYER = re.compile(r"stack(\d+)_block(\d+)_(\d)_(conv|bn)")
_STEM_LAYER = re.compile(r"conv(\d)_(conv|bn)")


def is_preset_dir(path):
    """Whether `path` is a directory that keras-hub's `save_to_preset` wrote (config.json, metadata.json)."""
    return all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "metadata.json"))


def describe_config(config):
    """The architecture a keras-hub backbone config describes, in words, e.g. "keras-hub ResNet-vd-50"."""
    class_name = config.get("class_name", "?")
    inner = config.get("config", config)
    if class_name != "ResNetBackbone":
        return f"a keras-hub {class_name} (not a ResNet)"
    blocks = tuple(inner.get("stackwise_num_blocks", ()))
    block_type = inner.get("block_type", "?")
    pre = ", pre-activation (v2)" if inner.get("use_pre_activation") else ""
    return f"a keras-hub ResNet with {block_type} blocks {blocks}{pre}"


def model_name_for(config):
    """Our model name for a keras-hub backbone config (`config.json`'s dict), or None when none matches."""
    inner = config.get("config", config)
    if config.get("class_name", "ResNetBackbone") != "ResNetBackbone":
        return None
    if (inner.get("block_type") != "bottleneck_block_vd" or inner.get("use_pre_activation")
            or list(inner.get("input_conv_filters", ())) != [32, 32, 64]
            or list(inner.get("input_conv_kernel_sizes", ())) != [3, 3, 3]
            or list(inner.get("stackwise_num_filters", ())) != [64, 128, 256, 512]
            or list(inner.get("stackwise_num_strides", ())) != [1, 2, 2, 2]):
        return None
    depth = _VD_BOTTLENECK_DEPTHS.get(tuple(inner.get("stackwise_num_blocks", ())))
    return None if depth is None else f"resnet{depth}_d"


def _our_layer_name(keras_hub_name):
    match = _STEM_LAYER.fullmatch(keras_hub_name)
    if match:
        index, kind = match.groups()
        return f"stem_{kind}{index}"
    match = _KERAS_HUB_LAYER.fullmatch(keras_hub_name)
    if match:
        stack, block, index, kind = match.groups()
        prefix = f"stage{int(stack) + 1}_block{block}"
        return f"{prefix}_down_{kind}" if index == "0" else f"{prefix}_{kind}{index}"
    return None


def _import_keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise ValueError(
            "keras-hub presets need keras-hub, the optional `transfer` extra: "
            "pip install 'bot-keras[transfer]' (Python >= 3.11)"
        ) from None
    return keras_hub


def load_preset_backbone(preset):
    """keras-hub's backbone of `preset` (a preset directory, or a name downloaded by keras-hub).

    Raises ValueError with one line: a missing directory, keras-hub absent, or a failed download (naming the
    network and the local-directory alternative).
    """
    name = preset.removeprefix(PRESET_PREFIX)
    keras_hub = _import_keras_hub()
    if os.path.isdir(name):
        if not is_preset_dir(name):
            raise ValueError(f"{name} is not a keras-hub preset directory (no config.json and metadata.json)")
        with open(os.path.join(name, "config.json")) as f:
            config = json.load(f)
        if model_name_for(config) is None:
            raise ValueError(f"{name} holds {describe_config(config)}, which no bot_keras model matches; "
                             "only keras-hub's bottleneck ResNet-vd presets (= our resnetNN_d) load")
        return keras_hub.models.Backbone.from_preset(name)
    try:
        return keras_hub.models.Backbone.from_preset(name)
    except OSError as error:  # requests' ConnectionError is an OSError: no network, or the hub is down
        raise ValueError(
            f"cannot download keras-hub preset {name!r}: {str(error).splitlines()[0][:160]}. "
            "Without network, save it on a connected machine with keras_hub.models.Backbone.from_preset(NAME)"
            ".save_to_preset(DIR) and pass that directory instead"
        ) from None
    except ValueError as error:  # keras-hub's "Unknown preset identifier ..."
        raise ValueError(f"{name!r} is neither a directory nor a keras-hub preset name: "
                         f"{str(error).splitlines()[0]}") from None


def copy_preset_weights(model, source, *, label="the keras-hub preset"):
    """Copies the keras-hub ResNet-vd `source` into our ResNet-D `model` (a classifier or a backbone).

    Strict and all-or-nothing, like the timm loader: every backbone layer of `model` receives weights of the
    right shapes, and every layer of `source` is used; otherwise ValueError naming the first offending layer
    and both architectures, and no weight changes. Returns `{"loaded": [our layer names], "skipped": [our
    layers with weights that the preset does not cover]}`: only the classifier head (`logits`) may be skipped.
    """
    ours = layers_with_weights(model)
    theirs = layers_with_weights(source)
    name = model.name.removesuffix("_backbone")
    config = {"class_name": type(source).__name__, "config": source.get_config()}
    expected = model_name_for(config)
    if expected is None or name != expected:
        raise ValueError(
            f"{label} is {describe_config(config)}"
            + (f" (our {expected})" if expected else "")
            + f", but the model is {name}; the weights would not fit"
        )
    pairs = []
    for their_name, their_layer in theirs.items():
        our_name = _our_layer_name(their_name)
        if our_name is None or our_name not in ours:
            raise ValueError(f"{label}: layer {their_name!r} has no place in {name} (mapped to {our_name!r})")
        our_layer = ours[our_name]
        if len(our_layer.weights) != len(their_layer.weights):
            raise ValueError(f"{label}: layer {their_name!r} has {len(their_layer.weights)} weights, "
                             f"{our_name!r} of {name} has {len(our_layer.weights)}")
        for to, value in zip(our_layer.weights, their_layer.weights, strict=True):
            if tuple(to.shape) != tuple(value.shape):
                raise ValueError(f"{label}: {value.path} has shape {tuple(value.shape)}, {to.path} of {name} "
                                 f"needs {tuple(to.shape)}")
            pairs.append((to, value))
    loaded = {_our_layer_name(n) for n in theirs}
    skipped = sorted(set(ours) - loaded)
    backbone_skipped = [n for n in skipped if n != "logits"]
    if backbone_skipped:
        raise ValueError(f"{label} has no weights for {len(backbone_skipped)} backbone layers of {name}, "
                         f"first {backbone_skipped[0]!r}")
    for to, value in pairs:
        to.assign(np.asarray(value.value).astype(to.dtype))
    return {"loaded": sorted(loaded), "skipped": skipped}
