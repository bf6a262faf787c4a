"""ResNet-A/B/C/D (Section 4 of He et al., 2018) with zero-γ (Section 3.1), as Keras 3 functional models.

The paper's ResNet-50 (He et al., 2016) and its three tweaks, each one named switch:

Section 4.2 and Figure 2 of the paper:
- `stride_on_3x3` (ResNet-B, Figure 2a): a downsampling bottleneck strides in its 3×3 conv instead of its
  first 1×1 conv, so the 1×1 no longer skips three quarters of the input.
- `deep_stem` (ResNet-C, Figure 2b): the 7×7 stem conv becomes three 3×3 convs (32, 32, 64 channels;
  stride 2 on the first), each followed by BN and ReLU, then the 3×3/2 max pool.
- `avg_down` (ResNet-D, Figure 2c): the shortcut of a downsampling block is a 2×2/2 average pool followed
  by a 1×1 conv with stride 1, so the shortcut no longer skips three quarters of its input either.

The switches are independent; the named variants stack them as the paper does (C = B + deep stem,
D = C + average-pool shortcut). A basic block (depths 18, 34) has no 1×1 conv: its first 3×3 conv always
carries the stride, so `stride_on_3x3` changes nothing there (`resnet18` and `resnet18_b` are the same
network).

The architecture matches the authors' code (GluonCV `resnetv1b`) and timm exactly, so their weights load:
- every stride-2 conv and the max pool use explicit symmetric `ZeroPadding2D` then `"valid"`; TensorFlow's
  `"same"` pads only bottom/right at stride 2 on even sizes, shifting every feature map by half a pixel;
- convs have no bias; BatchNormalization uses momentum 0.9 and epsilon 1e-5 (the references' values);
- the D shortcut pool is `AveragePooling2D(2, 2, padding="same")`: ceil mode, padded cells not counted,
  i.e. PyTorch/MXNet `AvgPool(2, 2, ceil_mode=True, count_include_pad=False)`.

Beyond the paper, `drop_path_rate` adds stochastic depth (Huang et al., 2016), as timm and ResNet-RS train
ResNets today: during training each block's residual branch is dropped for a whole example with a
probability that grows linearly over the blocks, from 0 at the first block to `drop_path_rate` at the last
(timm's `drop_path_rate * i / (blocks - 1)`), and the survivors are scaled by 1 / (1 - rate) so that
inference, where the branch is always kept, needs no rescaling. It is a `Dropout` whose noise shape
`(None, 1, 1, 1)` draws one decision per example, named `stage{s}_block{b}_drop_path`; it has no weights,
so a model built without it loads the same weights and computes the same outputs at inference.

Layer names are a contract (the timm weight converter maps onto them): stem `stem_conv`/`stem_bn` or
`stem_conv1..3`/`stem_bn1..3`; `stage{s}_block{b}_conv{i}`/`_bn{i}`; shortcut `stage{s}_block{b}_down_conv`,
`_down_bn` and `_down_pool`. Stage outputs are the layers `stage{s}_block{last}_out`.
"""

import dataclasses

import keras

# Depth → blocks per stage (He et al., 2016, Table 1; 200 from the pre-activation paper / GluonCV).
BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
BASIC_BLOCK_DEPTHS = (18, 34)  # two 3×3 convs a block; deeper nets use the 1×1-3×3-1×1 bottleneck
STAGE_WIDTHS = (64, 128, 256, 512)  # channels of the (middle) convs in stages 1..4
BOTTLENECK_EXPANSION = 4

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
OUTPUT_STRIDES = (8, 16, 32)
# A backbone variable's path (`resnet50_d/stage1_block0_conv1/kernel`, also inside a task model): the stem_*
# and stage{n}_* layers below; the classifier head (`logits`) and task heads do not match.
BACKBONE_VARIABLE_PATTERN = r"(?:^|/)(?:stem_|stage\d+_)"


@dataclasses.dataclass(frozen=True)
class Tweaks:
    """The paper's Section 4 model tweaks, one switch each (all False = the original ResNet)."""

    stride_on_3x3: bool = False  # ResNet-B (Section 4.2, Figure 2a)
    deep_stem: bool = False  # ResNet-C (Section 4.2, Figure 2b)
    avg_down: bool = False  # ResNet-D (Section 4.2, Figure 2c)


# Name suffix → tweaks. Our names follow the paper; docs/models.md maps them to timm / GluonCV names.
VARIANTS = {
    "": Tweaks(),  # ResNet (He et al., 2016): stride on the first 1×1 conv of a bottleneck
    "_b": Tweaks(stride_on_3x3=True),  # = timm resnet50, GluonCV resnet50_v1b
    "_c": Tweaks(stride_on_3x3=True, deep_stem=True),  # = timm resnet50c, GluonCV resnet50_v1c
    "_d": Tweaks(stride_on_3x3=True, deep_stem=True, avg_down=True),  # = timm resnet50d, GluonCV _v1d
}

RESNET_NAMES = tuple(f"resnet{depth}{suffix}" for depth in BLOCKS_PER_STAGE for suffix in VARIANTS)


def parse_resnet_name(name):
    """`"resnet50_d"` → `(50, Tweaks(...))`; ValueError listing the valid names otherwise."""
    for depth in BLOCKS_PER_STAGE:
        for suffix, tweaks in VARIANTS.items():
            if name == f"resnet{depth}{suffix}":
                return depth, tweaks
    raise ValueError(f"Unknown ResNet name {name!r}; valid names: {', '.join(RESNET_NAMES)}")


def msra_prelu_initializer():
    """The authors' training script's init (GluonCV `mx.init.MSRAPrelu()`): Gaussian, fan_avg, slope 0.25.

    MXNet's MSRAPrelu is Xavier(gaussian, "avg", magnitude=2 / (1 + 0.25²)); the paper's text says Xavier
    uniform (Section 2.1), which is our default.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0 / (1.0 + 0.25**2), mode="fan_avg", distribution="untruncated_normal"
    )


def make_initializer(identifier):
    """A fresh kernel initializer per layer from a Keras identifier or `"msra_prelu"`.

    A new instance per layer keeps unseeded initializers from handing every layer the same draw.
    """
    if identifier == "msra_prelu":
        return msra_prelu_initializer()
    if isinstance(identifier, keras.initializers.Initializer):
        return keras.initializers.deserialize(keras.initializers.serialize(identifier))
    try:
        return keras.initializers.get(identifier)
    except ValueError as error:
        raise ValueError(
            f"Unknown kernel_initializer {identifier!r}: use a Keras initializer name or 'msra_prelu'"
        ) from error


def check_output_stride(output_stride):
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")


def check_depth(depth):
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"ResNet depth must be one of {tuple(BLOCKS_PER_STAGE)}, got {depth!r}")


def conv_bn(x, filters, kernel_size, *, prefix, suffix="", strides=1, dilation=1, relu=True,
            zero_gamma=False, kernel_initializer="glorot_uniform"):
    """Conv (no bias) → BN (momentum 0.9, epsilon 1e-5) → optional ReLU: every conv of the network.

    Layers are named `{prefix}_conv{suffix}`, `{prefix}_bn{suffix}`, `{prefix}_relu{suffix}` (and
    `{prefix}_pad{suffix}`). A strided conv with kernel > 1 gets explicit symmetric zero padding and
    `"valid"`, as in PyTorch/MXNet; stride-1 convs use `"same"`, which is symmetric for odd kernels.
    """
    padding = "same"
    if strides > 1:
        padding = "valid"
        pad = dilation * (kernel_size - 1) // 2
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{prefix}_pad{suffix}")(x)
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        use_bias=False,
        kernel_initializer=make_initializer(kernel_initializer),
        name=f"{prefix}_conv{suffix}",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        # Zero-γ (Section 3.1): the residual branch starts as zero, so each block starts as its shortcut.
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=f"{prefix}_bn{suffix}",
    )(x)
    if relu:
        x = keras.layers.ReLU(name=f"{prefix}_relu{suffix}")(x)
    return x


def stem(x, *, deep_stem, kernel_initializer):
    """Stride-4 stem: 7×7/2 conv (or ResNet-C's three 3×3 convs) then the 3×3/2 max pool."""
    if deep_stem:
        x = conv_bn(x, 32, 3, prefix="stem", suffix="1", strides=2, kernel_initializer=kernel_initializer)
        x = conv_bn(x, 32, 3, prefix="stem", suffix="2", kernel_initializer=kernel_initializer)
        x = conv_bn(x, 64, 3, prefix="stem", suffix="3", kernel_initializer=kernel_initializer)
    else:
        x = conv_bn(x, 64, 7, prefix="stem", strides=2, kernel_initializer=kernel_initializer)
    # Zero padding is exact here: the input is post-ReLU (≥ 0), so a 0 never beats PyTorch's -inf padding.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)


def shortcut(x, filters, *, prefix, strides, avg_down, kernel_initializer):
    """Identity, or a projection when the block changes shape.

    ResNet-D (Section 4.2): 2×2/2 average pool then a stride-1 1×1 conv. Where the block does not stride
    (stage 1, or a dilated stage) the pool is left out, as GluonCV's pool_size=1 does (timm instead
    applies a 2×2 stride-1 average in a dilated stage; this only matters for output_stride < 32).
    """
    if strides == 1 and x.shape[-1] == filters:
        return x
    if avg_down:
        if strides > 1:
            x = keras.layers.AveragePooling2D(strides, strides, padding="same", name=f"{prefix}_down_pool")(x)
        strides = 1
    return conv_bn(x, filters, 1, prefix=f"{prefix}_down", strides=strides, relu=False,
                   kernel_initializer=kernel_initializer)


def drop_path_rates(depth, drop_path_rate):
    """Stochastic depth's drop probability of every block in network order: linear from 0 at the first
    block to `drop_path_rate` at the last (timm's ResNet schedule)."""
    check_depth(depth)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    blocks = sum(BLOCKS_PER_STAGE[depth])
    return tuple(drop_path_rate * i / (blocks - 1) for i in range(blocks))


def residual_block(x, width, *, prefix, bottleneck, strides, dilation, first_dilation, tweaks,
                   zero_gamma, kernel_initializer, drop_path_rate=0.0):
    """One residual block: branch + shortcut, added, then ReLU (He et al., 2016; paper Figure 1).

    Basic block (ResNet-18/34): 3×3 (strided) → 3×3. Bottleneck: 1×1 → 3×3 → 1×1 (×4 channels), with
    the stride on the first 1×1 (original ResNet) or on the 3×3 (`tweaks.stride_on_3x3`, ResNet-B).
    `first_dilation` is the dilation of the block's first 3×3 conv: the previous stage's dilation in a
    stage's first block, as GluonCV and timm do. `drop_path_rate` > 0 drops the branch per example in
    training (stochastic depth, module docstring).
    """
    init = kernel_initializer
    if bottleneck:
        filters = width * BOTTLENECK_EXPANSION
        stride_1x1, stride_3x3 = (1, strides) if tweaks.stride_on_3x3 else (strides, 1)
        y = conv_bn(x, width, 1, prefix=prefix, suffix="1", strides=stride_1x1, kernel_initializer=init)
        y = conv_bn(y, width, 3, prefix=prefix, suffix="2", strides=stride_3x3, dilation=first_dilation,
                    kernel_initializer=init)
        y = conv_bn(y, filters, 1, prefix=prefix, suffix="3", relu=False, zero_gamma=zero_gamma,
                    kernel_initializer=init)
    else:
        filters = width
        y = conv_bn(x, width, 3, prefix=prefix, suffix="1", strides=strides, dilation=first_dilation,
                    kernel_initializer=init)
        y = conv_bn(y, width, 3, prefix=prefix, suffix="2", dilation=dilation, relu=False,
                    zero_gamma=zero_gamma, kernel_initializer=init)
    x = shortcut(x, filters, prefix=prefix, strides=strides, avg_down=tweaks.avg_down,
                 kernel_initializer=init)
    if drop_path_rate > 0:
        y = keras.layers.Dropout(drop_path_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop_path")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([x, y])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def stage_strides(output_stride=32):
    """The stride of each stage's output, stages 1..4: (4, 8, 16, 32) capped at `output_stride`."""
    check_output_stride(output_stride)
    return tuple(min(stride, output_stride) for stride in (4, 8, 16, 32))


def pyramid_keys(output_stride=32):
    """Stage number → pyramid key `P{n}` = stride 2**n (keras-hub's reading), for the stages that keep one.

    Output stride 32: stages 1..4 are P2..P5. A dilated stage shares its stride with the stage after it, and
    the deepest stage at a stride holds the key (as TF Model Garden does): OS 16 → {1: P2, 2: P3, 4: P4},
    OS 8 → {1: P2, 4: P3}. The stages left without a key (3 at OS 16; 2 and 3 at OS 8) stay reachable by
    stage number (`resnet_features`, `ResNetBackbone.stage_outputs`): FCN's auxiliary head reads stage 3.
    """
    keys = {}
    for stage, stride in enumerate(stage_strides(output_stride), start=1):
        keys = {s: k for s, k in keys.items() if k != f"P{stride.bit_length() - 1}"}
        keys[stage] = f"P{stride.bit_length() - 1}"
    return keys


def resnet_features(inputs, depth, *, tweaks=Tweaks(), output_stride=32, zero_gamma=False,
                    kernel_initializer="glorot_uniform", drop_path_rate=0.0):
    """Stem and four stages on a symbolic `inputs`; returns the stage outputs `{1: ..., 4: ...}`.

    Strides are `stage_strides(output_stride)`: 4, 8, 16, 32 by default. With `output_stride` 16 or 8 the last
    one or two stages keep stride 1 and dilate their 3×3 convs by 2, then 4 (GluonCV `dilated=True` / timm
    `output_stride`), for segmentation backbones. `drop_path_rate` is stochastic depth's rate at the last
    block (`drop_path_rates`).
    """
    check_depth(depth)
    check_output_stride(output_stride)
    block_rates = iter(drop_path_rates(depth, drop_path_rate))
    bottleneck = depth not in BASIC_BLOCK_DEPTHS
    x = stem(inputs, deep_stem=tweaks.deep_stem, kernel_initializer=kernel_initializer)
    features = {}
    net_stride, dilation = 4, 1
    stages = zip(BLOCKS_PER_STAGE[depth], STAGE_WIDTHS, strict=True)
    for stage, (num_blocks, width) in enumerate(stages, start=1):
        strides = 1 if stage == 1 else 2
        previous_dilation = dilation
        if net_stride * strides > output_stride:
            dilation, strides = dilation * strides, 1
        net_stride *= strides
        for block in range(num_blocks):
            x = residual_block(
                x,
                width,
                prefix=f"stage{stage}_block{block}",
                bottleneck=bottleneck,
                strides=strides if block == 0 else 1,
                dilation=dilation,
                first_dilation=previous_dilation if block == 0 else dilation,
                tweaks=tweaks,
                zero_gamma=zero_gamma,
                kernel_initializer=kernel_initializer,
                drop_path_rate=next(block_rates),
            )
        features[stage] = x
    return features


def nested_layers(model):
    """Every layer inside `model`, depth first, the layers of nested models included (our backbone inside a
    keras-hub task, a wrapped backbone), through the public `Model.layers`. The sublayers of a custom layer
    (keras-hub's FPN and heads) are not listed: Keras 3 exposes those only through the private
    `_flatten_layers`; every layer we freeze, copy or convert lives in a backbone's functional graph."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from nested_layers(layer)


def layers_with_weights(model):
    """{name: layer} of the innermost layers of `model` (`nested_layers`) that hold weights: what weight
    copying between two models matches by name."""
    return {layer.name: layer for layer in nested_layers(model)
            if layer.weights and not getattr(layer, "layers", None)}


def freeze_backbone(model, *, stages=0, batch_norm=False):
    """Freezes part of the ResNet inside `model` (a backbone, or a task built on one) for fine-tuning.

    `stages` = N ≥ 1 freezes the stem and stages 1..N (Detectron's FREEZE_AT = N + 1; GluonCV's Faster-RCNN
    freezes the stem and stage 1, N = 1); `batch_norm` freezes every BatchNorm of the backbone (scale, shift
    and statistics: Keras runs a non-trainable BatchNorm in inference mode), as detection fine-tuning with
    small per-device batches does. Layers are found, also inside nested models (a keras-hub task's
    backbone), by the names `resnet_features` gives them (`stem_*`, `stage{n}_*`); heads are never touched.
    Returns the number of layers frozen.
    """
    if not 0 <= stages <= 4:
        raise ValueError(f"stages must be in [0, 4], got {stages!r}")
    frozen_prefixes = ("stem_", *(f"stage{n}_" for n in range(1, stages + 1))) if stages else None
    count = 0
    for layer in nested_layers(model):
        if not layer.weights or not layer.name.startswith(("stem_", "stage")):
            continue
        in_frozen_stage = frozen_prefixes is not None and layer.name.startswith(frozen_prefixes)
        if in_frozen_stage or (batch_norm and isinstance(layer, keras.layers.BatchNormalization)):
            layer.trainable = False
            count += 1
    return count
