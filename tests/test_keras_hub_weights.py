"""keras-hub ResNet-vd presets into our ResNet-D: identical features, strict refusals, the hub name paths."""

import keras
import numpy as np
import pytest

from bot_keras.models import build_backbone, build_model, timm_weights
from bot_keras.models import keras_hub_weights as khw

keras_hub = pytest.importorskip("keras_hub")


def keras_hub_resnet(blocks, *, block_type="bottleneck_block_vd", stem=((32, 3), (32, 3), (64, 3))):
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[f for f, _ in stem], input_conv_kernel_sizes=[k for _, k in stem],
        stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=list(blocks),
        stackwise_num_strides=[1, 2, 2, 2], block_type=block_type, use_pre_activation=False,
        image_shape=(None, None, 3))


def randomise(model, seed):
    """Random weights everywhere, BN statistics included, so a wrong mapping cannot hide behind 0/1 inits."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0.0, 0.05, variable.shape)
        if "variance" in variable.path or "gamma" in variable.path:
            value = 1.0 + np.abs(value)
        variable.assign(value.astype("float32"))


@pytest.fixture(scope="module")
def vd50_preset(tmp_path_factory):
    """A keras-hub ResNet-vd-50 of random weights saved as a local preset, as save_to_preset writes one."""
    source = keras_hub_resnet((3, 4, 6, 3))
    randomise(source, seed=1)
    path = tmp_path_factory.mktemp("preset") / "resnet_vd_50"
    source.save_to_preset(str(path))
    return str(path), source


def test_vd50_preset_gives_identical_features_at_every_level(vd50_preset):
    path, source = vd50_preset
    loaded = khw.load_preset_backbone(khw.PRESET_PREFIX + path)
    ours = build_backbone("resnet50_d")
    report = khw.copy_preset_weights(ours, loaded)
    assert report["skipped"] == []
    assert len(report["loaded"]) == 3 * 2 + 16 * 3 * 2 + 4 * 2  # stem, blocks, one shortcut per stage
    images = np.random.default_rng(0).uniform(-2, 2, (2, 64, 64, 3)).astype("float32")
    features = keras.Model(source.input, source.pyramid_outputs)  # the preset's P2..P5 against ours
    expected = features(images, training=False)
    got = ours(images, training=False)
    for key in ("P2", "P3", "P4", "P5"):
        assert np.max(np.abs(np.asarray(got[key]) - np.asarray(expected[key]))) <= 1e-5, key


def test_classifier_keeps_its_head_and_reports_it_skipped(vd50_preset):
    path, _ = vd50_preset
    classifier = build_model("resnet50_d", num_classes=3, input_shape=(64, 64, 3))
    head = np.asarray(classifier.get_layer("logits").kernel).copy()
    report = khw.copy_preset_weights(classifier, khw.load_preset_backbone(path))
    assert report["skipped"] == ["logits"]
    np.testing.assert_array_equal(np.asarray(classifier.get_layer("logits").kernel), head)


def test_a_preset_into_another_resnet_is_refused_naming_both(vd50_preset):
    path, source = vd50_preset
    target = build_backbone("resnet50_c")
    before = [np.asarray(w).copy() for w in target.weights[:3]]
    with pytest.raises(ValueError, match=r"bottleneck_block_vd blocks \(3, 4, 6, 3\) \(our resnet50_d\), "
                                         r"but the model is resnet50_c"):
        khw.copy_preset_weights(target, source)
    for old, new in zip(before, target.weights[:3], strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))


@pytest.mark.parametrize("blocks, block_type, stem, words", [
    ((3, 4, 6, 3), "bottleneck_block", ((64, 7),), r"bottleneck_block blocks \(3, 4, 6, 3\)"),
    ((2, 2, 2, 2), "basic_block_vd", ((32, 3), (32, 3), (64, 3)), r"basic_block_vd blocks \(2, 2, 2, 2\)"),
])
def test_presets_that_are_not_resnet_d_are_refused_before_loading(tmp_path, blocks, block_type, stem, words):
    keras_hub_resnet(blocks, block_type=block_type, stem=stem).save_to_preset(str(tmp_path / "p"))
    expected = rf"^{tmp_path / 'p'} holds a keras-hub ResNet with {words}, which no bot_keras model matches"
    with pytest.raises(ValueError, match=expected + r"; only keras-hub's bottleneck ResNet-vd"):
        khw.load_preset_backbone(str(tmp_path / "p"))


def test_keras_hub_vd18_has_a_shortcut_resnet18_d_has_not():
    """Why basic-block presets are refused: a mapping would have nowhere to put stage 1's projection."""
    source = keras_hub_resnet((2, 2, 2, 2), block_type="basic_block_vd")
    names = {layer.name for layer in source.layers}
    ours = {layer.name for layer in build_backbone("resnet18_d").layers}
    assert "stack0_block0_0_conv" in names and "stage1_block0_down_conv" not in ours


def test_offline_preset_name_fails_in_one_line_naming_the_alternative(monkeypatch):
    import requests

    def offline(name, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    expected = r"^cannot download keras-hub preset 'resnet_vd_50_imagenet': Failed to resolve 'api.kaggle"
    with pytest.raises(ValueError, match=expected + r".com.\. Without network, .*save_to_preset\(DIR\)"):
        khw.load_preset_backbone("kerashub:resnet_vd_50_imagenet")


def test_timm_hub_name_downloads_the_safetensors_file(tmp_path):
    asked = {}

    def download(*, repo_id, filename):
        asked.update(repo_id=repo_id, filename=filename)
        return str(tmp_path / "model.safetensors")

    path = timm_weights.download_timm_weights("timm:resnet50d.gluon_in1k", download=download)
    assert path == str(tmp_path / "model.safetensors")
    assert asked == {"repo_id": "timm/resnet50d.gluon_in1k", "filename": "model.safetensors"}


def test_timm_hub_offline_fails_in_one_line_naming_the_local_file_alternative():
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    expected = (r"^cannot download timm:resnet50d.gluon_in1k "
                r"\(timm/resnet50d.gluon_in1k/model.safetensors\): "
                r"We couldn't connect to 'https://huggingface.co'\. Without network, "
                r".* pass the local file instead$")
    with pytest.raises(ValueError, match=expected):
        timm_weights.download_timm_weights("resnet50d.gluon_in1k", download=offline)
