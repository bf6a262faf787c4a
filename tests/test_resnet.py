"""ResNet-A/B/C/D: exact sizes, the tweaks' layer structure, padding semantics against a numpy reference,
dilation, zero-γ, precision policies, serialisation, backbones and error messages."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from bot_keras.models import MODEL_NAMES, build_backbone, build_model, load_classifier_weights
from bot_keras.models.resnet import BLOCKS_PER_STAGE, Tweaks, drop_path_rates, resnet_features

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def resnet50_family():
    """The paper's four ResNet-50s at 224×224 with 1000 classes (built once; never run forward)."""
    return {name: build_model(name, num_classes=1000) for name in
            ("resnet50", "resnet50_b", "resnet50_c", "resnet50_d")}


def randomize(model, seed=0):
    """Every weight (BN moving statistics included) drawn from U(0.5, 1.5) × ±1, variances positive."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        values = rng.uniform(0.5, 1.5, size=variable.shape)
        if "variance" not in variable.path:
            values *= rng.choice([-1.0, 1.0], size=variable.shape) * 0.2
        variable.assign(values.astype("float32"))


def images(size, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype("float32")


# --- names and sizes -------------------------------------------------------------------------------------


def test_model_names():
    depths = (18, 34, 50, 101, 152, 200)
    expected = {f"resnet{d}{s}" for d in depths for s in ("", "_b", "_c", "_d")}
    expected |= {"mobilenet", "inception_v3"}
    assert set(MODEL_NAMES) == expected and len(MODEL_NAMES) == len(expected)


@pytest.mark.parametrize(
    "name, params",
    [("resnet50", 25_557_032), ("resnet50_b", 25_557_032),
     ("resnet50_c", 25_576_264), ("resnet50_d", 25_576_264)],
)
def test_trainable_parameter_counts(resnet50_family, name, params):
    model = resnet50_family[name]
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == params


def test_basic_block_parameter_counts():
    # torchvision's resnet18 / resnet34 (1000 classes), the same architecture as our A and B variants.
    resnet18 = build_model("resnet18", num_classes=1000, input_shape=(32, 32, 3))
    # count_params adds the BN moving mean and variance: 2 × 4,800 channels of BN.
    assert resnet18.count_params() == 11_689_512 + 2 * 4_800
    model = build_model("resnet34_b", num_classes=1000, input_shape=(32, 32, 3))
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 21_797_672


# --- the tweaks' structure -------------------------------------------------------------------------------


def layer_names(model):
    return {layer.name for layer in model.layers}


def test_where_the_downsampling_stride_sits(resnet50_family):
    a, b = resnet50_family["resnet50"], resnet50_family["resnet50_b"]
    # ResNet (Figure 1): stride 2 on the first 1×1 conv. ResNet-B (Section 4.2): on the 3×3 conv.
    assert a.get_layer("stage2_block0_conv1").strides == (2, 2)
    assert a.get_layer("stage2_block0_conv2").strides == (1, 1)
    assert b.get_layer("stage2_block0_conv1").strides == (1, 1)
    assert b.get_layer("stage2_block0_conv2").strides == (2, 2)
    for model in (a, b):
        assert model.get_layer("stage2_block0_down_conv").strides == (2, 2)
        assert model.get_layer("stem_conv").kernel_size == (7, 7)


def test_deep_stem_and_average_pool_shortcut(resnet50_family):
    c, d = resnet50_family["resnet50_c"], resnet50_family["resnet50_d"]
    for model in (c, d):
        names = layer_names(model)
        assert "stem_conv" not in names
        stem = [model.get_layer(f"stem_conv{i}") for i in (1, 2, 3)]
        assert [conv.filters for conv in stem] == [32, 32, 64]
        assert [conv.strides for conv in stem] == [(2, 2), (1, 1), (1, 1)]
        assert [conv.kernel_size for conv in stem] == [(3, 3)] * 3
        assert {f"stem_bn{i}" for i in (1, 2, 3)} <= names
    assert not any(name.endswith("_down_pool") for name in layer_names(c))
    # ResNet-D (Section 4.2): 2×2/2 average pool then a stride-1 1×1 conv; stage 1 has no pool.
    pools = sorted(name for name in layer_names(d) if name.endswith("_down_pool"))
    assert pools == ["stage2_block0_down_pool", "stage3_block0_down_pool", "stage4_block0_down_pool"]
    for stage in (1, 2, 3, 4):
        assert d.get_layer(f"stage{stage}_block0_down_conv").strides == (1, 1)


def test_weighted_layer_names_follow_the_contract(resnet50_family):
    """The names the timm converter maps onto (docs/architecture.md)."""
    expected = {f"stem_{kind}{i}" for kind in ("conv", "bn") for i in (1, 2, 3)} | {"logits"}
    for stage, blocks in enumerate(BLOCKS_PER_STAGE[50], start=1):
        for block in range(blocks):
            expected |= {f"stage{stage}_block{block}_{kind}{i}" for kind in ("conv", "bn") for i in (1, 2, 3)}
        expected |= {f"stage{stage}_block0_down_conv", f"stage{stage}_block0_down_bn"}
    model = resnet50_family["resnet50_d"]
    assert {layer.name for layer in model.layers if layer.weights} == expected


def test_batchnorm_and_conv_settings(resnet50_family):
    model = resnet50_family["resnet50_d"]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(bns) == len(convs) == 3 + 16 * 3 + 4
    assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    assert not any(conv.use_bias for conv in convs)
    # Every strided conv with a spatial kernel is "valid" after explicit symmetric padding.
    for conv in convs:
        if conv.strides != (1, 1) and conv.kernel_size != (1, 1):
            assert conv.padding == "valid"


# --- padding semantics against numpy (PyTorch / MXNet conventions) --------------------------------------


def reference_conv(x, kernel, stride, pad):
    """Cross-correlation with symmetric zero padding, as torch.nn.Conv2d(padding=pad)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out = (x.shape[1] - k) // stride + 1
    y = 0
    for i in range(k):
        for j in range(k):
            window = x[:, i:i + stride * (out - 1) + 1:stride, j:j + stride * (out - 1) + 1:stride]
            y = y + window @ kernel[i, j]
    return y


def reference_max_pool(x):
    """3×3/2 max pool with padding 1 (padded cells never win), as torch.nn.MaxPool2d(3, 2, 1)."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out = (x.shape[1] - 3) // 2 + 1
    windows = [x[:, i:i + 2 * (out - 1) + 1:2, j:j + 2 * (out - 1) + 1:2] for i in range(3) for j in range(3)]
    return np.max(windows, axis=0)


def reference_avg_pool_ceil(x):
    """2×2/2 average pool, ceil mode, padded cells not counted (count_include_pad=False)."""
    n = x.shape[1]
    out = -(-n // 2)
    y = np.zeros((x.shape[0], out, out, x.shape[3]))
    for i in range(out):
        for j in range(out):
            y[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("name, conv", [("resnet18", "stem_conv"), ("resnet18_c", "stem_conv1")])
def test_stride2_convs_and_max_pool_pad_symmetrically(name, conv):
    # An even size: there TensorFlow's "same" would pad bottom/right only (at odd sizes it is symmetric).
    backbone = build_backbone(name)
    pool = backbone.get_layer("stem_pool")
    probe = keras.Model(backbone.input, [backbone.get_layer(conv).output, pool.output, pool.input])
    x = images(16)
    conv_out, pool_out, pool_in = (np.asarray(t) for t in probe(x))
    kernel = backbone.get_layer(conv).get_weights()[0]
    np.testing.assert_allclose(conv_out, reference_conv(x, kernel, 2, kernel.shape[0] // 2), atol=1e-4)
    pool_in = pool_in[:, 1:-1, 1:-1]  # drop our explicit zero padding; the reference pads with -inf
    np.testing.assert_allclose(pool_out, reference_max_pool(pool_in), atol=0)


def test_avg_down_pool_is_ceil_mode_without_padded_cells():
    backbone = build_backbone("resnet18_d")
    x = np.random.default_rng(1).normal(size=(1, 9, 9, 4)).astype("float32")
    y = np.asarray(backbone.get_layer("stage2_block0_down_pool")(x))
    assert y.shape == (1, 5, 5, 4)
    np.testing.assert_allclose(y, reference_avg_pool_ceil(x), atol=1e-6)


# --- strides and dilation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output_stride, sizes", [(32, (16, 8, 4, 2)), (16, (16, 8, 4, 4)), (8, (16, 8, 8, 8))]
)
def test_stage_output_strides(output_stride, sizes):
    backbone = build_backbone("resnet18_d", input_shape=(64, 64, 3), output_stride=output_stride)
    shapes = {stage: tuple(t.shape) for stage, t in backbone.stage_outputs.items()}
    assert shapes == {i + 1: (None, s, s, c) for i, (s, c) in enumerate(zip(sizes, (64, 128, 256, 512),
                                                                              strict=True))}


@pytest.mark.parametrize("output_stride, keys", [(32, "P2 P3 P4 P5"), (16, "P2 P3 P4"), (8, "P2 P3")])
def test_pyramid_keys_name_the_true_stride(output_stride, keys):
    """keras-hub reads P{n} as stride 2**n: a key maps 64 px to 64 / 2**n; the last stage has the last key."""
    backbone = build_backbone("resnet18_d", input_shape=(64, 64, 3), output_stride=output_stride)
    assert list(backbone.pyramid_outputs) == keys.split() == list(backbone.output)
    for key, tensor in backbone.pyramid_outputs.items():
        assert tensor.shape[1:3] == (64 >> int(key[1:]),) * 2, key
    last = backbone.pyramid_outputs[keys.split()[-1]]
    assert last is backbone.stage_outputs[4] and last.shape[-1] == 512
    x = images(64)
    out = backbone(x, training=False)
    assert {k: v.shape[1] for k, v in out.items()} == {k: 64 >> int(k[1:]) for k in keys.split()}


def test_odd_input_sizes_follow_the_floor_formula():
    # PyTorch: floor((n + 2p - k) / s) + 1 → 33 → 17 (stem conv) → 9 (pool) → 5 → 3 → 2 (ceil for D's pool).
    backbone = build_backbone("resnet18_d", input_shape=(33, 33, 3))
    assert [t.shape[1] for t in backbone.pyramid_outputs.values()] == [9, 5, 3, 2]
    assert [t.shape[1] for t in backbone.stage_outputs.values()] == [9, 5, 3, 2]


def test_dilation_follows_the_gluoncv_timm_rule():
    """Output stride 8: stages 3 and 4 dilate by 2 and 4; a stage's first block uses the previous dilation."""
    bottleneck = build_backbone("resnet50_d", output_stride=8)
    rates = {f"stage{s}_block{b}": bottleneck.get_layer(f"stage{s}_block{b}_conv2").dilation_rate[0]
             for s, b in ((2, 0), (3, 0), (3, 1), (3, 5), (4, 0), (4, 2))}
    assert rates == {"stage2_block0": 1, "stage3_block0": 1, "stage3_block1": 2, "stage3_block5": 2,
                     "stage4_block0": 2, "stage4_block2": 4}
    assert all(bottleneck.get_layer(f"stage{s}_block0_{c}").strides == (1, 1) for s in (3, 4)
               for c in ("conv1", "conv2", "down_conv"))
    # GluonCV: the D shortcut's pool is identity (pool_size 1) in a dilated stage.
    assert [n for n in layer_names(bottleneck) if n.endswith("_down_pool")] == ["stage2_block0_down_pool"]
    basic = build_backbone("resnet18_d", output_stride=16)
    assert basic.get_layer("stage4_block0_conv1").dilation_rate == (1, 1)
    assert basic.get_layer("stage4_block0_conv2").dilation_rate == (2, 2)
    assert basic.get_layer("stage4_block1_conv1").dilation_rate == (2, 2)
    assert basic.get_layer("stage3_block1_conv2").dilation_rate == (1, 1)


# --- zero-γ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(BLOCKS_PER_STAGE))
def test_zero_gamma_zeroes_exactly_the_last_bn_of_each_branch(depth):
    model = build_model(f"resnet{depth}_d", num_classes=10, input_shape=(32, 32, 3), zero_gamma=True)
    last_bn = "bn2" if depth in (18, 34) else "bn3"
    zeroed, ones = [], 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma = np.asarray(layer.gamma)
            if not gamma.any():
                zeroed.append(layer.name)
            else:
                assert (gamma == 1).all(), layer.name
                ones += 1
    assert len(zeroed) == sum(BLOCKS_PER_STAGE[depth])
    assert all(name.startswith("stage") and name.endswith(last_bn) for name in zeroed)
    # The rest: three stem BNs, the other branch BNs and the four shortcut BNs.
    branch_bns = 2 if depth in (18, 34) else 3
    assert ones == 3 + (branch_bns - 1) * sum(BLOCKS_PER_STAGE[depth]) + (4 if depth >= 50 else 3)


def test_without_zero_gamma_every_gamma_is_one():
    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    gammas = [np.asarray(bn.gamma) for bn in bns]
    assert all((g == 1).all() for g in gammas)


def test_zero_gamma_blocks_start_as_their_shortcut():
    backbone = build_backbone("resnet18_d", zero_gamma=True)
    probe = keras.Model(backbone.input, [backbone.get_layer("stage1_block0_out").output,
                                         backbone.get_layer("stage1_block1_out").output])
    before, after = (np.asarray(t) for t in probe(images(32), training=False))
    assert np.abs(before).max() > 0
    np.testing.assert_array_equal(after, before)  # identity shortcut, zero branch, ReLU of a ReLU output


# --- stochastic depth ------------------------------------------------------------------------------------


def test_drop_path_rates_rise_linearly_over_the_blocks():
    # ResNet-18: 8 blocks, rate i/7 of the last block's 0.35 (timm's schedule).
    np.testing.assert_allclose(drop_path_rates(18, 0.35), [0.35 * i / 7 for i in range(8)])
    assert len(drop_path_rates(50, 0.1)) == 16 and drop_path_rates(50, 0.1)[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        drop_path_rates(18, 1.0)


def test_drop_path_is_the_identity_at_inference():
    plain = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3))
    dropped = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3), drop_path_rate=0.5)
    randomize(plain)
    load_classifier_weights(dropped, plain)  # layer by layer: the drop-path layers have no weights
    x = images(32, batch=4)
    inference = np.asarray(dropped(x, training=False))
    np.testing.assert_array_equal(inference, np.asarray(plain(x, training=False)))
    # In training the two differ (a negative control for the comparison above).
    assert not np.allclose(np.asarray(dropped(x, training=True)), np.asarray(plain(x, training=True)))


def test_drop_path_survival_per_block_follows_the_schedule():
    """Each block keeps its branch for a whole example with probability 1 - rate, scaled by 1 / (1 - rate):
    the survivors' branches are nonzero and the dropped ones exactly zero, within 4 binomial sigmas."""
    rate, batch = 0.6, 256
    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3), drop_path_rate=rate)
    drops = [layer for layer in model.layers if layer.name.endswith("_drop_path")]
    expected = drop_path_rates(18, rate)
    names = [f"stage{s}_block{b}_drop_path" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert [d.name for d in drops] == names[1:]
    probe = keras.Model(model.input, [t for d in drops for t in (d.input, d.output)])
    outputs = [np.asarray(t) for t in probe(images(32, batch=batch), training=True)]
    for i, (branch, dropped) in enumerate(zip(outputs[::2], outputs[1::2], strict=True)):
        block_rate = expected[i + 1]  # the first block's rate is 0: no layer
        kept = np.abs(dropped).reshape(batch, -1).max(axis=1) > 0
        sigma = np.sqrt(block_rate * (1 - block_rate) / batch)
        assert abs((1 - kept.mean()) - block_rate) < 4 * sigma, (drops[i].name, kept.mean(), block_rate)
        np.testing.assert_allclose(dropped[kept], branch[kept] / (1 - block_rate), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet", "inception_v3"])
def test_drop_path_is_refused_without_residual_blocks(name):
    with pytest.raises(ValueError, match=f"drop_path_rate=0.1 does not apply to '{name}'.*has none"):
        build_model(name, num_classes=10, input_shape=(96, 96, 3), drop_path_rate=0.1)


# --- initialisers ----------------------------------------------------------------------------------------


def test_kernel_initializers():
    glorot = build_model("resnet18", num_classes=10, input_shape=(32, 32, 3))
    msra = build_model("resnet18", num_classes=10, input_shape=(32, 32, 3), kernel_initializer="msra_prelu")
    fan_avg = (3 * 3 * 256 + 3 * 3 * 512) / 2  # stage4_block0_conv1: 3×3, 256 → 512
    g = np.asarray(glorot.get_layer("stage4_block0_conv1").kernel).ravel()
    m = np.asarray(msra.get_layer("stage4_block0_conv1").kernel).ravel()
    # Xavier uniform: U(±sqrt(3/fan_avg)); MSRA-PReLU: N(0, 2/(1+0.25²)/fan_avg), 4.55% beyond 2σ.
    limit = np.sqrt(3 / fan_avg)
    # float32 draws may round a hair past the float64 limit.
    assert np.abs(g).max() <= limit * (1 + 1e-6) and np.std(g) == pytest.approx(limit / np.sqrt(3), rel=0.01)
    sigma = np.sqrt(2 / (1 + 0.25**2) / fan_avg)
    assert np.std(m) == pytest.approx(sigma, rel=0.01)
    assert np.mean(np.abs(m) > 2 * sigma) == pytest.approx(0.0455, abs=0.003)
    # Each layer draws its own values (a shared unseeded initializer would repeat them).
    first, second = (msra.get_layer(f"stage1_block{b}_conv1").kernel for b in (0, 1))
    assert not np.array_equal(first, second)


# --- precision (every model's gradients: test_models.py) ---------------------------------------------------


@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_logits_and_variables_float32(policy, compute):
    keras.mixed_precision.set_global_policy(policy)
    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3), zero_gamma=True)
    assert model.get_layer("stage1_block0_conv1").compute_dtype == compute
    assert model.get_layer("stage4_block1_out").output.dtype == compute
    logits = model(images(32), training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.isfinite(np.asarray(logits)).all()
    assert {v.dtype for v in model.weights} == {"float32"}


# --- serialisation ---------------------------------------------------------------------------------------


def test_config_round_trip_gives_identical_outputs():
    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3), dropout_rate=0.3,
                        kernel_initializer="msra_prelu")
    randomize(model)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    x = images(32)
    np.testing.assert_array_equal(np.asarray(clone(x, training=False)), np.asarray(model(x, training=False)))


def test_keras_file_round_trip(tmp_path):
    model = build_model("resnet18_d", num_classes=10, input_shape=(32, 32, 3), zero_gamma=True)
    randomize(model)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    x = images(32)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)))
    backbone = build_backbone("resnet18_d", output_stride=16, weights_from=model,
                              kernel_initializer="msra_prelu")
    backbone.save(tmp_path / "backbone.keras")
    loaded = keras.models.load_model(tmp_path / "backbone.keras")
    # Reloaded as the registered class with its arguments, so the keras-hub contract survives the file.
    assert type(loaded) is type(backbone) and loaded.get_config() == backbone.get_config()
    assert list(loaded.pyramid_outputs) == ["P2", "P3", "P4"] and loaded.output_stride == 16
    out, ref = loaded(x, training=False), backbone(x, training=False)
    assert out.keys() == ref.keys() == {"P2", "P3", "P4"}
    for level in ref:
        np.testing.assert_array_equal(np.asarray(out[level]), np.asarray(ref[level]))


# --- backbones take a classifier's weights --------------------------------------------------------------


def test_classifier_weights_load_into_the_backbone():
    classifier = build_model("resnet50_d", num_classes=10, input_shape=(64, 64, 3))
    randomize(classifier)
    backbone = build_backbone("resnet50_d", weights_from=classifier)
    stage_outputs = keras.Model(classifier.input, [classifier.get_layer(f"stage{s}_block{b}_out").output
                                                   for s, b in ((1, 2), (2, 3), (3, 5), (4, 2))])
    x = images(64)
    expected = stage_outputs(x, training=False)
    got = backbone(x, training=False)
    for level, ref in zip(("P2", "P3", "P4", "P5"), expected, strict=True):
        np.testing.assert_allclose(np.asarray(got[level]), np.asarray(ref), rtol=1e-6, atol=1e-6)
    # The same weights serve a dilated backbone (shapes do not depend on dilation).
    dilated = load_classifier_weights(build_backbone("resnet50_d", output_stride=8), classifier)
    np.testing.assert_array_equal(dilated.get_layer("stage4_block2_conv2").kernel,
                                  classifier.get_layer("stage4_block2_conv2").kernel)


def test_mismatched_classifier_weights_name_the_layer():
    with pytest.raises(ValueError, match="'stem_conv1'.* missing"):
        classifier = build_model("resnet18", num_classes=3, input_shape=(32, 32, 3))
        build_backbone("resnet18_d", weights_from=classifier)
    with pytest.raises(ValueError, match="'stage1_block0_conv1'.*shapes"):
        load_classifier_weights(build_backbone("resnet50_d"),
                                build_model("resnet18_d", num_classes=3, input_shape=(32, 32, 3)))


# --- errors ----------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="'resnet51'.*resnet50_d.*inception_v3"):
        build_model("resnet51", num_classes=10)
    with pytest.raises(ValueError, match="'mobilenet'.*resnet18, resnet18_b"):
        build_backbone("mobilenet")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dropout_rate=-0.1), "dropout_rate.*-0.1"),
        (dict(dropout_rate=1.0), "dropout_rate.*1.0"),
        (dict(num_classes=0), "num_classes.*0"),
        (dict(num_classes=2.5), "num_classes.*2.5"),
        (dict(input_shape=(32, 32)), r"input_shape.*\(32, 32\)"),
        (dict(kernel_initializer="gaussian_ish"), "kernel_initializer 'gaussian_ish'"),
    ],
)
def test_bad_arguments_echo_the_value(kwargs, message):
    arguments = dict(num_classes=10, input_shape=(32, 32, 3)) | kwargs
    with pytest.raises(ValueError, match=message):
        build_model("resnet18", **arguments)


@pytest.mark.parametrize("output_stride", [4, 0, 24])
def test_impossible_output_stride_is_echoed(output_stride):
    message = f"output_stride must be one of \\(8, 16, 32\\), got {output_stride}"
    with pytest.raises(ValueError, match=message):
        build_backbone("resnet18", output_stride=output_stride)


@pytest.mark.parametrize("depth", [0, -50, 51])
def test_impossible_depth_is_echoed(depth):
    with pytest.raises(ValueError, match=f"depth must be one of .*got {depth}"):
        resnet_features(keras.Input((32, 32, 3)), depth, tweaks=Tweaks())


# --- other backends --------------------------------------------------------------------------------------

JAX_CHECK = """
import keras, numpy as np
from bot_keras.models import build_backbone, build_model
assert keras.backend.backend() == "jax", keras.backend.backend()
model = build_model("resnet18_d", num_classes=10, input_shape=(64, 64, 3), zero_gamma=True)
x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
logits = np.asarray(model(x, training=False))
assert logits.shape == (2, 10) and np.isfinite(logits).all()
p = build_backbone("resnet18_d", output_stride=8)(x)
shapes = [tuple(t.shape) for t in p.values()]
assert list(p) == ["P2", "P3"] and shapes == [(2, 16, 16, 64), (2, 8, 8, 512)], shapes
# D's shortcut pool: the bottom-right cell of a 9×9 input averages only the one real cell (ceil mode,
# padded cells not counted) under this backend's pooling too.
ramp = np.arange(81, dtype="float32").reshape(1, 9, 9, 1)
corner = np.asarray(model.get_layer("stage2_block0_down_pool")(ramp))[0, 4, 4, 0]
assert corner == 80.0, corner
print("jax ok", logits.shape)
"""


@pytest.mark.slow
def test_models_build_and_run_under_jax():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", JAX_CHECK], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jax ok (2, 10)" in result.stdout
