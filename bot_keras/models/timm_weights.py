"""timm's ResNet weights in our ResNet-B/C/D models, read from `.safetensors` without PyTorch.

timm's ResNets are the paper's Section 4.2 tweaks (Figure 2) under other names: timm `resnetNN` is ResNet-B
(stride on the 3×3 conv), `resnetNNc` is ResNet-C (deep stem of three 3×3 convs, 32-32-64 channels) and
`resnetNNd` is ResNet-D (plus the 2×2 average-pool shortcut). The paper
authors' own GluonCV weights are published through timm (`resnet50d.gluon_in1k` is GluonCV's
`resnet50_v1d`), so this module is how a user starts from the authors' released ResNet-50-D.

The mapping, timm key → our layer (docs/architecture.md fixes our names):

    conv1 / bn1                                     stem_conv / stem_bn             (B)
    conv1.0, conv1.1, conv1.3, conv1.4, conv1.6, bn1  stem_conv1, stem_bn1, stem_conv2, stem_bn2,
                                                    stem_conv3, stem_bn3            (C, D)
    layer{s}.{b}.conv{i} / .bn{i}                   stage{s}_block{b}_conv{i} / _bn{i}
    layer{s}.{b}.downsample.0 / .1                  stage{s}_block{b}_down_conv / _down_bn   (B, C)
    layer{s}.{b}.downsample.1 / .2                  the same, after timm's pool at .0 (D; timm keeps
                                                    an Identity at .0 where the block does not stride)
    fc                                              logits

Tensors: conv OIHW → HWIO; Dense (out, in) → (in, out); BatchNorm weight / bias / running_mean /
running_var → gamma / beta / moving_mean / moving_variance; `num_batches_tracked` is ignored.

Loading is strict and all-or-nothing: every tensor the model expects must be in the file with the right
shape, and every tensor in the file must be used; otherwise a ValueError names the first offending key
and what the weights look like (e.g. "the weights look like timm 'resnet50c'"), and no weight is changed.
"""

import logging
import os
import pathlib
import re

import keras
import ml_dtypes  # numpy's bfloat16 (TensorFlow's and Keras's own dependency); safetensors needs it for BF16
import numpy as np
import safetensors

from bot_keras.models.resnet import nested_layers

# Depth → blocks per stage and block type, as timm builds them (used to describe a file in errors).
_TIMM_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((2, 2, 2, 2), True): 26,  # timm-only
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
    ((3, 24, 36, 3), True): 200,
}

# The timm keys of the deep stem (ResNet-C/-D) in our stem order: conv1 is an nn.Sequential of
# conv, BN, ReLU, conv, BN, ReLU, conv; the third BN is the model's bn1.
_DEEP_STEM_KEYS = {
    "stem_conv1": "conv1.0",
    "stem_bn1": "conv1.1",
    "stem_conv2": "conv1.3",
    "stem_bn2": "conv1.4",
    "stem_conv3": "conv1.6",
    "stem_bn3": "bn1",
}
_PLAIN_STEM_KEYS = {"stem_conv": "conv1", "stem_bn": "bn1"}
_BLOCK_LAYER = re.compile(r"stage(\d+)_block(\d+)_(conv\d+|bn\d+|down_conv|down_bn)")
CLASSIFIER_PREFIX = "fc."
HUB_PREFIX = "timm:"  # `timm:resnet50d.gluon_in1k`: a timm model on the Hugging Face hub


def read_safetensors(path):
    """Reads a `.safetensors` file into `{name: np.ndarray}` with the `safetensors` package (numpy, no torch).

    BF16 tensors come back as float32. A file that is not safetensors (a PyTorch `.pth`, a truncated
    download) or holds a dtype numpy has no type for (the FP8 formats) raises a one-line ValueError naming it.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {str(path)!r}")
    tensors = {}
    try:
        with safetensors.safe_open(str(path), framework="numpy") as file:
            for name in file.keys():
                tensors[name] = _get_tensor(path, file, name)
    except safetensors.SafetensorError as error:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({error}): damaged or truncated, or another "
            "format such as a PyTorch .pth/.bin checkpoint (timm's Hugging Face repos have model.safetensors)"
        ) from error
    return tensors


def _get_tensor(path, file, name):
    try:
        array = file.get_tensor(name)
    except (TypeError, AttributeError) as error:  # how the package reports a dtype numpy cannot name
        dtype = file.get_slice(name).get_dtype()
        raise ValueError(
            f"{str(path)!r}: tensor {name!r} has dtype {dtype}, which numpy cannot hold"
        ) from error
    if array.dtype == ml_dtypes.bfloat16:
        array = array.astype(np.float32)
    return array


def timm_model_name(name):
    """Our model name → timm's: `"resnet50_b"` → `"resnet50"`, `"resnet50_c"` → `"resnet50c"`, `_d` → `d`.

    timm registers no `c` model at depths 18 and 34; the name is still the natural one for that layout.
    """
    match = re.fullmatch(r"resnet(\d+)_([bcd])", name)
    if not match:
        raise ValueError(
            f"{name!r} has no timm counterpart: timm's ResNets are our ResNet-B/C/D models "
            "(resnet{18,34,50,101,152,200}_{b,c,d}); the original ResNet (stride on the 1×1 conv) is not "
            "in timm, and timm's resnetNN is our resnetNN_b"
        )
    depth, variant = match.groups()
    return f"resnet{depth}" + ("" if variant == "b" else variant)


def download_timm_weights(name, *, download=None):
    """Local path of the `model.safetensors` of timm's hub model `name` (e.g. `"resnet50d.gluon_in1k"`, the
    paper authors' GluonCV ResNet-50-D), fetched into the Hugging Face cache by `huggingface_hub` on a
    connected machine (a cached copy is reused offline). `download` replaces `hf_hub_download` (tests).

    Raises ValueError in one line when huggingface_hub is missing or the file cannot be had, naming the
    network and the local-file alternative.
    """
    name = name.removeprefix(HUB_PREFIX)
    if download is None:
        try:
            from huggingface_hub import hf_hub_download as download
        except ImportError:
            raise ValueError(f"{HUB_PREFIX}{name} needs huggingface_hub to download: "
                             "pip install huggingface_hub (or pass a local .safetensors file)") from None
    quiet = logging.getLogger("huggingface_hub")  # its retry warnings would precede our one-line error
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return download(repo_id=f"timm/{name}", filename="model.safetensors")
    except Exception as error:  # huggingface_hub raises its own HTTP, offline and not-found errors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.rstrip(".")
        raise ValueError(
            f"cannot download {HUB_PREFIX}{name} (timm/{name}/model.safetensors): {first}. Without network, "
            "download model.safetensors on a connected machine and pass the local file instead"
        ) from None
    finally:
        quiet.setLevel(level)


def describe_timm_state_dict(shapes):
    """The timm ResNet a `{key: shape}` (or `{key: array}`) layout looks like, e.g. `"resnet50d"`.

    Read from the keys alone: bottleneck if blocks have conv3, blocks per stage from the largest block
    index, deep stem if conv1.0 exists, average-pool shortcut if downsample.2 exists. Returns a phrase
    such as `"an unknown layout (...)"` when the keys fit no timm ResNet.
    """
    keys = set(shapes)
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in keys)
    depth = _TIMM_DEPTHS.get((tuple(blocks), bottleneck))
    deep_stem = "conv1.0.weight" in keys
    avg_down = any(".downsample.2." in k for k in keys)
    if depth is None or (avg_down and not deep_stem):
        kind = "bottleneck" if bottleneck else "basic"
        stem = "deep" if deep_stem else "plain"
        return f"an unknown layout ({kind} blocks per stage {tuple(blocks)}, {stem} stem)"
    return f"timm 'resnet{depth}{'d' if avg_down else 'c' if deep_stem else ''}'"


def _layer_prefix(name, *, avg_down):
    """Our layer name → its timm module prefix (no trailing dot), or None for the classifier."""
    if name in _PLAIN_STEM_KEYS:
        return _PLAIN_STEM_KEYS[name]
    if name in _DEEP_STEM_KEYS:
        return _DEEP_STEM_KEYS[name]
    match = _BLOCK_LAYER.fullmatch(name)
    if match:
        stage, block, part = match.groups()
        if part == "down_conv":
            part = "downsample.1" if avg_down else "downsample.0"
        elif part == "down_bn":
            part = "downsample.2" if avg_down else "downsample.1"
        return f"layer{stage}.{block}.{part}"
    return None


def _targets(model):
    """`{timm key: (keras variable, axes permutation timm → ours or None)}` in the model's layer order."""
    layers = list(nested_layers(model))
    names = {layer.name for layer in layers}
    avg_down = any(name.endswith("_down_pool") for name in names)
    _reject_resnet_a(model, layers)
    targets = {}
    for layer in layers:
        if not layer.weights:
            continue
        if layer.name == "logits" and isinstance(layer, keras.layers.Dense):
            prefix = "fc"
        else:
            prefix = _layer_prefix(layer.name, avg_down=avg_down)
        if prefix is None:
            raise ValueError(
                f"Model {model.name!r}: layer {layer.name!r} has weights but no timm counterpart "
                "(only ResNet-B/C/D models built by bot_keras.models load timm weights)"
            )
        if isinstance(layer, keras.layers.Conv2D):
            targets[f"{prefix}.weight"] = (layer.kernel, (2, 3, 1, 0))  # OIHW → HWIO
            if layer.use_bias:
                targets[f"{prefix}.bias"] = (layer.bias, None)
        elif isinstance(layer, keras.layers.BatchNormalization):
            if layer.scale:
                targets[f"{prefix}.weight"] = (layer.gamma, None)
            if layer.center:
                targets[f"{prefix}.bias"] = (layer.beta, None)
            targets[f"{prefix}.running_mean"] = (layer.moving_mean, None)
            targets[f"{prefix}.running_var"] = (layer.moving_variance, None)
        elif isinstance(layer, keras.layers.Dense):
            targets[f"{prefix}.weight"] = (layer.kernel, (1, 0))  # (out, in) → (in, out)
            if layer.use_bias:
                targets[f"{prefix}.bias"] = (layer.bias, None)
        else:
            raise ValueError(
                f"Model {model.name!r}: layer {layer.name!r} is a {type(layer).__name__}; "
                "timm ResNets only have Conv2D, BatchNormalization and Dense weights"
            )
    return targets


def _reject_resnet_a(model, layers):
    """The original ResNet (stride on a bottleneck's 1×1 conv) has ResNet-B's tensors but not its maths."""
    for layer in layers:
        if (
            isinstance(layer, keras.layers.Conv2D)
            and re.fullmatch(r"stage\d+_block\d+_conv1", layer.name)
            and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) != (1, 1)
        ):
            raise ValueError(
                f"Model {model.name!r} is the original ResNet (layer {layer.name!r} strides in its 1×1 "
                "conv), which timm does not have: timm's resnetNN is our resnetNN_b (ResNet-B)"
            )


def expected_timm_shapes(model, *, include_classifier=True):
    """`{timm key: shape in timm's layout}` for every tensor `model` takes from a timm state dict."""
    shapes = {}
    for key, (variable, permutation) in _targets(model).items():
        if not include_classifier and key.startswith(CLASSIFIER_PREFIX):
            continue
        shape = tuple(variable.shape)
        if permutation is not None:  # ours = timm.transpose(permutation) → timm = ours.transpose(inverse)
            shape = tuple(shape[permutation.index(axis)] for axis in range(len(shape)))
        shapes[key] = shape
    return shapes


def load_timm_weights(model, weights, *, skip_classifier=False):
    """Loads a timm ResNet state dict into our ResNet-B/C/D `model` (a classifier or a backbone).

    `weights` is a `.safetensors` path or a `{key: array}` mapping (numpy arrays, or anything
    `np.asarray` takes). With `skip_classifier=True` timm's `fc.*` tensors are ignored and our `logits`
    layer keeps its initialisation: fine-tuning to another number of classes, or a backbone without head.
    Everything else is strict (see the module docstring); the model is returned for chaining.
    """
    if isinstance(weights, (str, os.PathLike)):
        source = f" from {str(weights)!r}"
        state = read_safetensors(weights)
    else:
        source = ""
        state = {key: np.asarray(value) for key, value in weights.items()}
    state = {key: value for key, value in state.items() if not key.endswith(".num_batches_tracked")}
    targets = _targets(model)
    if skip_classifier:
        targets = {k: v for k, v in targets.items() if not k.startswith(CLASSIFIER_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}

    def mismatch(problem, hint=""):
        try:
            ours = f" (timm {timm_model_name(model.name.removesuffix('_backbone'))!r})"
        except ValueError:
            ours = ""
        return ValueError(
            f"timm weights{source} do not fit model {model.name!r}{ours}: {problem}. "
            f"The weights look like {describe_timm_state_dict(state)}.{hint}"
        )

    classifier_hint = (
        " Pass skip_classifier=True (the tool: --num_classes) to keep a freshly initialised classifier."
    )
    arrays = {}
    for key, (variable, permutation) in targets.items():
        if key not in state:
            raise mismatch(f"key {key!r} is missing")
        value = state[key]
        if permutation is not None and value.ndim == len(permutation):
            value = np.transpose(value, permutation)
        if tuple(value.shape) != tuple(variable.shape):
            timm_shape = tuple(state[key].shape)
            expected = expected_timm_shapes(model)[key]
            hint = classifier_hint if key.startswith(CLASSIFIER_PREFIX) else ""
            raise mismatch(f"key {key!r} has shape {timm_shape}, the model needs {expected}", hint)
        arrays[key] = value
    for key in state:
        if key not in targets:
            hint = classifier_hint if key.startswith(CLASSIFIER_PREFIX) else ""
            raise mismatch(f"key {key!r} has no place in the model", hint)
    for key, (variable, _) in targets.items():
        variable.assign(arrays[key].astype(variable.dtype))
    return model
