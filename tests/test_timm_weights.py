"""timm weight import: reading safetensors, the key mapping, strict errors, the tool, and (slow,
optional) logits equal to timm's own ResNets."""

import json
import sys
import types

import keras
import numpy as np
import pytest

from bot_keras import cli
from bot_keras.models import build_backbone, build_model
from bot_keras.models.timm_weights import (
    describe_timm_state_dict,
    expected_timm_shapes,
    load_timm_weights,
    read_safetensors,
    timm_model_name,
)
from tools import convert_timm_weights

IMAGE = (32, 32, 3)


def write_safetensors(path, tensors, *, dtypes=None):
    """A second, hand-written implementation of the format: header length, JSON header, raw bytes."""
    dtypes = dtypes or {}
    codes = {"<f4": "F32", "<f2": "F16", "<i8": "I64", "<i4": "I32", "|u1": "U8"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        if dtypes.get(name) == "BF16":  # the top two bytes of each float32
            blob = (np.asarray(array, "<f4").view("<u4") >> 16).astype("<u2").tobytes()
            code = "BF16"
        else:
            array = np.array(array, order="C")  # (np.ascontiguousarray would make scalars 1-D)
            array = array.astype(array.dtype.newbyteorder("<"))
            blob, code = array.tobytes(), codes[array.dtype.str]
        header[name] = {
            "dtype": code,
            "shape": list(np.shape(array)),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the reference writer pads the header to 8 bytes
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))
    return path


def timm_layout(depth, variant, num_classes):
    """timm's ResNet state-dict layout written out by hand from timm's resnet.py (a second implementation
    of the mapping's key side): `{key: shape}` including `num_batches_tracked`."""
    blocks, bottleneck = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}[
        depth
    ]
    shapes = {}

    def conv(key, out_channels, in_channels, kernel):
        shapes[f"{key}.weight"] = (out_channels, in_channels, kernel, kernel)

    def bn(key, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{name}"] = (channels,)
        shapes[f"{key}.num_batches_tracked"] = ()

    if variant == "b":
        conv("conv1", 64, 3, 7)
        bn("bn1", 64)
    else:
        conv("conv1.0", 32, 3, 3)
        bn("conv1.1", 32)
        conv("conv1.3", 32, 32, 3)
        bn("conv1.4", 32)
        conv("conv1.6", 64, 32, 3)
        bn("bn1", 64)
    channels = 64
    for stage, (num_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        out = width * 4 if bottleneck else width
        for block in range(num_blocks):
            prefix = f"layer{stage}.{block}"
            if bottleneck:
                conv(f"{prefix}.conv1", width, channels, 1)
                bn(f"{prefix}.bn1", width)
                conv(f"{prefix}.conv2", width, width, 3)
                bn(f"{prefix}.bn2", width)
                conv(f"{prefix}.conv3", out, width, 1)
                bn(f"{prefix}.bn3", out)
            else:
                conv(f"{prefix}.conv1", width, channels, 3)
                bn(f"{prefix}.bn1", width)
                conv(f"{prefix}.conv2", width, width, 3)
                bn(f"{prefix}.bn2", width)
            if block == 0 and (stage > 1 or channels != out):
                first = 1 if variant == "d" else 0  # D: downsample.0 is the (weightless) average pool
                conv(f"{prefix}.downsample.{first}", out, channels, 1)
                bn(f"{prefix}.downsample.{first + 1}", out)
            channels = out
    shapes["fc.weight"] = (num_classes, channels)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def random_state(layout, seed=0):
    rng = np.random.default_rng(seed)
    return {
        key: np.array(7, np.int64)
        if key.endswith("num_batches_tracked")
        else rng.normal(size=shape).astype("float32")
        for key, shape in layout.items()
    }


def weights_by_name(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


# --- the reader ---------------------------------------------------------------------------------------


def test_read_safetensors_dtypes_and_values(tmp_path):
    tensors = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
        "f16": np.array([0.5, -1.25, 65504.0], np.float16),
        "i64": np.array(123456789012, np.int64),  # a scalar, as num_batches_tracked
        "bf16": np.array([[1.5, -2.0], [0.15625, 2.0**100]], np.float32),  # all exact in bfloat16
        "u8": np.array([0, 255], np.uint8),
    }
    path = write_safetensors(tmp_path / "t.safetensors", tensors, dtypes={"bf16": "BF16"})
    read = read_safetensors(path)
    assert sorted(read) == sorted(tensors)
    for name, array in tensors.items():
        assert read[name].shape == array.shape, name
        np.testing.assert_array_equal(read[name], array, err_msg=name)
    assert read["bf16"].dtype == np.float32
    assert read["i64"].dtype == np.int64 and int(read["i64"]) == 123456789012


def test_reader_errors_name_the_file_and_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_safetensors(tmp_path / "nope.safetensors")
    zip_archive = tmp_path / "model.pth"
    zip_archive.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a torch.save archive, not safetensors
    text = tmp_path / "notes.safetensors"
    text.write_text("an HTML error page saved under the wrong name\n" * 4)
    cut = write_safetensors(tmp_path / "cut.safetensors", {"a": np.ones((4, 4), np.float32)})
    cut.write_bytes(cut.read_bytes()[:-8])  # a truncated download: the tensor's bytes no longer fit
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")  # shorter than the 8-byte header length
    for path in (zip_archive, text, cut, tiny):
        one_line = rf"^'[^\n]*{path.name}' is not a readable safetensors file [^\n]*$"
        with pytest.raises(ValueError, match=one_line):
            read_safetensors(path)


def test_reader_names_a_tensor_whose_dtype_numpy_cannot_hold(tmp_path):
    header = json.dumps({"fc.weight": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path = tmp_path / "fp8.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00\x00")
    with pytest.raises(ValueError, match=r"fp8\.safetensors': tensor 'fc\.weight' has dtype F8_E4M3"):
        read_safetensors(path)


# --- the mapping ----------------------------------------------------------------------------------------


def test_timm_model_names():
    assert timm_model_name("resnet50_b") == "resnet50"
    assert timm_model_name("resnet101_c") == "resnet101c"
    assert timm_model_name("resnet18_d") == "resnet18d"
    with pytest.raises(ValueError, match="'resnet50' has no timm counterpart"):
        timm_model_name("resnet50")


@pytest.mark.parametrize(
    "name, depth, variant", [("resnet18_b", 18, "b"), ("resnet18_d", 18, "d"), ("resnet50_c", 50, "c")]
)
def test_expected_layout_is_timms(name, depth, variant):
    """The mapping generated from our layer names equals timm's layout written out by hand."""
    model = build_model(name, num_classes=10, input_shape=IMAGE)
    layout = {
        k: v for k, v in timm_layout(depth, variant, 10).items() if not k.endswith("num_batches_tracked")
    }
    assert expected_timm_shapes(model) == layout
    without_fc = expected_timm_shapes(model, include_classifier=False)
    assert set(layout) - set(without_fc) == {"fc.weight", "fc.bias"}


def test_describe_timm_state_dict():
    assert describe_timm_state_dict(timm_layout(18, "b", 10)) == "timm 'resnet18'"
    assert describe_timm_state_dict(timm_layout(34, "d", 10)) == "timm 'resnet34d'"
    assert describe_timm_state_dict(timm_layout(50, "c", 10)) == "timm 'resnet50c'"
    assert describe_timm_state_dict({"conv1.weight": (64, 3, 7, 7)}).startswith("an unknown layout")


@pytest.mark.parametrize("name, variant", [("resnet18_b", "b"), ("resnet18_d", "d")])
def test_load_places_every_tensor_transposed(tmp_path, name, variant):
    state = random_state(timm_layout(18, variant, 10))
    path = write_safetensors(tmp_path / "w.safetensors", state)
    model = build_model(name, num_classes=10, input_shape=IMAGE)
    before = weights_by_name(model)
    assert load_timm_weights(model, path) is model
    after = weights_by_name(model)
    # Every weight of the model came from the file (random normals never equal the initial values).
    for layer_name, weights in before.items():
        for old, new in zip(weights, after[layer_name], strict=True):
            assert not np.array_equal(old, new), layer_name
    layer = {layer.name: layer for layer in model.layers}
    # Conv OIHW → HWIO, element by element at a chosen index.
    stem_key, stem_layer = (
        ("conv1.weight", "stem_conv") if variant == "b" else ("conv1.6.weight", "stem_conv3")
    )
    o, i, h, w = 5, 2, 1, 0
    assert np.array(layer[stem_layer].kernel)[h, w, i, o] == state[stem_key][o, i, h, w]
    np.testing.assert_array_equal(
        np.array(layer["stage3_block1_conv2"].kernel), state["layer3.1.conv2.weight"].transpose(2, 3, 1, 0)
    )
    # BN: weight/bias/running_mean/running_var → gamma/beta/moving_mean/moving_variance.
    bn = layer["stage2_block0_bn1"]
    for ours, theirs in [
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ]:
        np.testing.assert_array_equal(np.array(getattr(bn, ours)), state[f"layer2.0.bn1.{theirs}"])
    # The shortcut: downsample.0/.1 (B) or .1/.2 after the average pool (D).
    conv_index = 1 if variant == "d" else 0
    np.testing.assert_array_equal(
        np.array(layer["stage4_block0_down_conv"].kernel)[0, 0],
        state[f"layer4.0.downsample.{conv_index}.weight"][:, :, 0, 0].T,
    )
    np.testing.assert_array_equal(
        np.array(layer["stage4_block0_down_bn"].moving_variance),
        state[f"layer4.0.downsample.{conv_index + 1}.running_var"],
    )
    # Dense (out, in) → (in, out).
    np.testing.assert_array_equal(np.array(layer["logits"].kernel), state["fc.weight"].T)
    np.testing.assert_array_equal(np.array(layer["logits"].bias), state["fc.bias"])


def test_load_under_mixed_precision_keeps_float32_variables():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_model("resnet18_d", num_classes=10, input_shape=IMAGE)
    state = {k: v.astype(np.float16) for k, v in random_state(timm_layout(18, "d", 10)).items()}
    load_timm_weights(model, state)
    kernel = model.get_layer("stage1_block1_conv1").kernel
    assert kernel.dtype == "float32"
    np.testing.assert_array_equal(
        np.array(kernel), state["layer1.1.conv1.weight"].astype(np.float32).transpose(2, 3, 1, 0)
    )
    assert np.array(model(np.zeros((1, *IMAGE), np.float32))).dtype == np.float32


# --- strict errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_b():
    return build_model("resnet18_b", num_classes=10, input_shape=IMAGE)


def test_wrong_variant_names_the_key_and_the_files_architecture(resnet18_b):
    state = random_state(timm_layout(18, "d", 10))
    with pytest.raises(
        ValueError,
        match=r"'resnet18_b' \(timm 'resnet18'\): key 'conv1\.weight' is missing.*"
        r"look like timm 'resnet18d'",
    ):
        load_timm_weights(resnet18_b, state)


def test_wrong_depth_names_the_first_extra_key(resnet18_b):
    state = random_state(timm_layout(34, "b", 10))
    with pytest.raises(ValueError, match=r"key 'layer1\.2\.conv1\.weight' has no place.*timm 'resnet34'"):
        load_timm_weights(resnet18_b, state)


def test_missing_key_and_wrong_shape_are_named(resnet18_b):
    state = random_state(timm_layout(18, "b", 10))
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"key 'layer3\.1\.bn2\.running_var' is missing"):
        load_timm_weights(resnet18_b, state)
    state = random_state(timm_layout(18, "b", 10))
    state["layer2.0.conv2.weight"] = state["layer2.0.conv2.weight"][:, :64]
    with pytest.raises(
        ValueError,
        match=r"key 'layer2\.0\.conv2\.weight' has shape \(128, 64, 3, 3\), "
        r"the model needs \(128, 128, 3, 3\)",
    ):
        load_timm_weights(resnet18_b, state)


def test_c_weights_do_not_fit_d(tmp_path):
    model = build_model("resnet18_d", num_classes=10, input_shape=IMAGE)
    with pytest.raises(ValueError, match=r"key 'layer2\.0\.downsample\.\d\.\w+'.*timm 'resnet18c'"):
        load_timm_weights(model, random_state(timm_layout(18, "c", 10)))


def test_failed_load_changes_nothing(resnet18_b):
    before = weights_by_name(resnet18_b)
    state = random_state(timm_layout(18, "b", 10))
    state["layer4.1.bn2.bias"] = np.zeros(3, np.float32)  # the last tensor the model reads
    with pytest.raises(ValueError, match="layer4.1.bn2.bias"):
        load_timm_weights(resnet18_b, state)
    after = weights_by_name(resnet18_b)
    for name, weights in before.items():
        for old, new in zip(weights, after[name], strict=True):
            np.testing.assert_array_equal(old, new, err_msg=name)


def test_classifier_size_needs_skip_classifier(resnet18_b):
    state = random_state(timm_layout(18, "b", 1000))
    with pytest.raises(
        ValueError, match=r"key 'fc\.weight' has shape \(1000, 512\).*\(10, 512\).*skip_classifier"
    ):
        load_timm_weights(resnet18_b, state)
    logits = resnet18_b.get_layer("logits")
    kernel = np.array(logits.kernel)
    load_timm_weights(resnet18_b, state, skip_classifier=True)
    np.testing.assert_array_equal(np.array(logits.kernel), kernel)  # untouched
    np.testing.assert_array_equal(
        np.array(resnet18_b.get_layer("stem_conv").kernel), state["conv1.weight"].transpose(2, 3, 1, 0)
    )


def test_backbone_loads_with_skip_classifier():
    backbone = build_backbone("resnet18_d", input_shape=IMAGE)
    state = random_state(timm_layout(18, "d", 1000))
    with pytest.raises(ValueError, match=r"key 'fc\.\w+' has no place.*skip_classifier"):
        load_timm_weights(backbone, state)
    load_timm_weights(backbone, state, skip_classifier=True)
    np.testing.assert_array_equal(
        np.array(backbone.get_layer("stage2_block0_down_bn").gamma), state["layer2.0.downsample.2.weight"]
    )


def test_original_resnet_is_refused():
    model = build_model("resnet50", num_classes=10, input_shape=IMAGE)
    with pytest.raises(
        ValueError, match=r"original ResNet.*'stage2_block0_conv1'.*timm's resnetNN is our resnetNN_b"
    ):
        load_timm_weights(model, random_state(timm_layout(50, "b", 10)))


# --- the tool ---------------------------------------------------------------------------------------------


def convert(argv):
    cli.call(
        convert_timm_weights.main,
        convert_timm_weights.define_flags,
        argv,
        command=convert_timm_weights.COMMAND,
        required=("model", "weights", "output"),
    )


def test_convert_tool_keeps_or_replaces_the_classifier(tmp_path, capsys):
    state = random_state(timm_layout(18, "d", 7))
    weights = write_safetensors(tmp_path / "resnet18d.safetensors", state)
    output = tmp_path / "out" / "resnet18_d.keras"
    convert(
        ["--model", "resnet18_d", "--weights", str(weights), "--output", str(output), "--image_size", "32"]
    )
    assert "timm's 7-class classifier" in capsys.readouterr().out
    model = keras.saving.load_model(output)
    assert model.input_shape == (None, 32, 32, 3)
    np.testing.assert_array_equal(np.array(model.get_layer("logits").kernel), state["fc.weight"].T)
    np.testing.assert_array_equal(
        np.array(model.get_layer("stem_conv1").kernel), state["conv1.0.weight"].transpose(2, 3, 1, 0)
    )

    output = tmp_path / "fine_tune.weights.h5"
    convert(
        ["--model", "resnet18_d", "--weights", str(weights), "--output", str(output), "--num_classes", "3"]
    )
    assert "new 3-class classifier" in capsys.readouterr().out
    model = build_model("resnet18_d", num_classes=3, input_shape=(64, 64, 3))
    model.load_weights(output)
    np.testing.assert_array_equal(
        np.array(model.get_layer("stage2_block0_down_conv").kernel),
        state["layer2.0.downsample.1.weight"].transpose(2, 3, 1, 0),
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet50"], "timm's resnetNN is our resnetNN_b"),
        (["--model", "resnet51_d"], "--model 'resnet51_d' is unknown; valid names: resnet18"),
        (["--model", "resnet18_d", "--output", "x.h5"], "--output 'x.h5' must end in .keras or .weights.h5"),
        (["--model", "resnet18_d", "--num_classes", "0"], "--num_classes must be a positive integer, got 0"),
        (["--model", "resnet18_b"], "key 'conv1.weight' is missing"),
    ],
)
def test_convert_tool_errors(tmp_path, capsys, args, message):
    weights = write_safetensors(tmp_path / "w.safetensors", random_state(timm_layout(18, "d", 7)))
    argv = ["--weights", str(weights), "--output", str(tmp_path / "o.keras")] + args
    with pytest.raises(SystemExit) as exit_info:
        convert(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_convert_tool_reports_a_damaged_file_in_one_line(tmp_path, capsys):
    weights = write_safetensors(tmp_path / "w.safetensors", random_state(timm_layout(18, "d", 7)))
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
    argv = ["--model", "resnet18_d", "--weights", str(weights), "--output", str(tmp_path / "o.keras")]
    with pytest.raises(SystemExit) as exit_info:
        convert(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"convert_timm_weights: error: --weights: {str(weights)!r} is not a readable safetensors file ("
    )


# --- equivalence with timm itself (optional extra: pip install -e ".[timm]") ------------------------------


def import_timm():
    """torch and timm, or a skip. PyPI's torchvision wheel is built for CUDA torch; beside the CPU torch
    its compiled ops do not load and registering their fake kernels raises. timm's ResNets use none of
    torchvision's ops, so that registration module is stubbed out and the import retried."""
    torch = pytest.importorskip("torch")
    try:
        import timm
    except ImportError as error:
        pytest.skip(f"timm is not installed ({error})")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import timm
    return torch, timm


def timm_resnet(timm, depth, variant, num_classes):
    if (depth, variant) == (18, "c"):  # timm registers no resnet18c; the same switches, spelled out
        from timm.models.resnet import BasicBlock, ResNet

        return ResNet(
            block=BasicBlock, layers=(2, 2, 2, 2), stem_width=32, stem_type="deep", num_classes=num_classes
        )
    return timm.create_model(timm_model_name(f"resnet{depth}_{variant}"), num_classes=num_classes)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("variant", ["b", "c", "d"])
def test_logits_equal_timms(tmp_path, depth, variant):
    """Random timm weights (BN statistics and γ randomised too), saved by safetensors' own torch writer,
    converted without torch: max |Δ logit| ≤ 1e-4 · max |logit| in float32, BN in inference mode.
    97×97 inputs make every stride-2 layer see an odd size (padding and the D pool's ceil mode)."""
    torch, timm = import_timm()
    save_file = pytest.importorskip("safetensors.torch").save_file
    torch.manual_seed(depth + ord(variant))
    net = timm_resnet(timm, depth, variant, num_classes=10).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)  # timm zero-initialises the last γ of each block
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        images = torch.randn(2, 3, 97, 97)
        expected = net(images).numpy()
    path = tmp_path / "timm.safetensors"
    save_file(net.state_dict(), str(path))

    model = build_model(f"resnet{depth}_{variant}", num_classes=10, input_shape=(97, 97, 3))
    load_timm_weights(model, path)
    logits = np.array(model(images.numpy().transpose(0, 2, 3, 1), training=False))
    error = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
    print(
        f"resnet{depth}_{variant}: max |Δ logit| / max |logit| = {error:.2e} (max |logit| "
        f"{np.max(np.abs(expected)):.3g})"
    )
    assert error <= 1e-4
