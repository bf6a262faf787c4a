"""transfer.py: one --backbone_weights for every source, the classifier's head rule, freezing and the
backbone's learning-rate multiplier, and mismatched architectures refused in one line."""

import types

import keras
import numpy as np
import pytest
import safetensors.numpy

from bot_keras import cli, finetune, transfer
from bot_keras.classification import task as classification
from bot_keras.models import build_backbone, build_model, timm_weights

SIZE = 64


def randomise(model, seed):
    """Random weights everywhere, BN statistics included, so a wrong or partial copy shows in the features
    (kernels scaled by their fan-in, so activations keep their size through the network)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        fan_in = np.prod(variable.shape[:-1]) if len(variable.shape) > 1 else 400
        value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), variable.shape)
        if "variance" in variable.path or "gamma" in variable.path:
            value = 1.0 + np.abs(value)
        variable.assign(value.astype("float32"))
    return model


def classifier_flags(spec, **overrides):
    values = dict(model="resnet18_d", image_size=SIZE, zero_gamma=False, dropout_rate=0.0, drop_path_rate=0.0,
                  new_head=False,
                  backbone_weights=spec)
    return types.SimpleNamespace(**{**values, **overrides})


def pooled_features(classifier, images):
    return np.asarray(keras.Model(classifier.input, classifier.get_layer("logits").input)(images))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One random ResNet-18-D backbone written as every kind of source --backbone_weights takes."""
    root = tmp_path_factory.mktemp("sources")
    reference = randomise(build_backbone("resnet18_d"), seed=3)
    reference.save_weights(str(root / "backbone.weights.h5"))
    reference.save(str(root / "backbone.keras"))
    classifier = build_model("resnet18_d", num_classes=3, input_shape=(SIZE, SIZE, 3))
    randomise(classifier, seed=4)
    for layer in classifier.layers:
        if layer.weights and layer.name != "logits":
            layer.set_weights(reference.get_layer(layer.name).get_weights())
    classifier.save(str(root / "classifier.keras"))
    run = root / "run"
    run.mkdir()
    classifier.save(str(run / "model.keras"))
    (run / "classes.txt").write_text("a\nb\nc\n")
    (run / "flags.txt").write_text(f"--model=resnet18_d\n--image_size={SIZE}\n--precision=float32\n")
    # timm's layout of the same weights (the loader's own mapping, inverted; private to our module).
    state = {}
    for key, (variable, permutation) in timm_weights._targets(reference).items():
        value = np.asarray(variable)
        value = np.transpose(value, np.argsort(permutation)) if permutation else value
        state[key] = np.ascontiguousarray(value)
    safetensors.numpy.save_file(state, str(root / "timm.safetensors"))
    specs = {name: str(root / name) for name in
             ("backbone.weights.h5", "backbone.keras", "classifier.keras", "run", "timm.safetensors")}
    return specs, reference, classifier


@pytest.mark.parametrize("kind", ["run", "classifier.keras", "backbone.keras", "backbone.weights.h5",
                                  "timm.safetensors"])
def test_every_source_gives_the_sources_features(sources, kind, capsys):
    specs, reference, _ = sources
    spec = specs[kind]
    f = classifier_flags(spec)
    model = classification.build_model(f, num_classes=5, weights_from=classification.initial_weights(f))
    images = np.random.default_rng(0).uniform(-2, 2, (2, SIZE, SIZE, 3)).astype("float32")
    expected = np.mean(np.asarray(reference(images, training=False)["P5"]), axis=(1, 2))
    assert np.max(np.abs(pooled_features(model, images) - expected)) <= 1e-5
    report = capsys.readouterr().out
    loaded = f"--backbone_weights={spec}: 44 layers (110 tensors) loaded into resnet18_d; new head for 5 "
    assert loaded in report


def test_a_random_start_differs_from_the_source(sources):
    """The negative control of the feature test: the same comparison without --backbone_weights."""
    _, reference, _ = sources
    model = classification.build_model(classifier_flags(""), num_classes=5, weights_from=None)
    images = np.random.default_rng(0).uniform(-2, 2, (2, SIZE, SIZE, 3)).astype("float32")
    expected = np.mean(np.asarray(reference(images, training=False)["P5"]), axis=(1, 2))
    assert np.max(np.abs(pooled_features(model, images) - expected)) > 1e-2


@pytest.mark.parametrize("classes, new_head, kept", [(3, False, True), (3, True, False), (4, False, False)])
def test_the_head_is_kept_only_for_the_same_class_count_without_new_head(sources, classes, new_head, kept):
    specs, _, source = sources
    f = classifier_flags(specs["classifier.keras"], new_head=new_head)
    model = classification.build_model(f, num_classes=classes, weights_from=classification.initial_weights(f))
    head = np.asarray(model.get_layer("logits").kernel)
    same = head.shape == tuple(source.get_layer("logits").kernel.shape) and np.array_equal(
        head, np.asarray(source.get_layer("logits").kernel))
    assert same == kept


def test_a_resnet50_file_into_resnet18_d_names_both(tmp_path):
    build_model("resnet50", num_classes=3, input_shape=(32, 32, 3)).save(str(tmp_path / "r50.keras"))
    f = classifier_flags(str(tmp_path / "r50.keras"))
    expected = (r"^--backbone_weights=\S+r50.keras holds resnet50 weights, which do not fit resnet18_d: "
                r"it has no layer 'stem_conv1'\.$")
    with pytest.raises(cli.SetupError, match=expected):
        classification.build_model(f, num_classes=3, weights_from=classification.initial_weights(f))


def test_a_plain_resnet50_preset_into_resnet50_d_is_refused_before_training(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
        use_pre_activation=False, image_shape=(None, None, 3)).save_to_preset(str(tmp_path / "resnet_50"))
    problem = transfer.backbone_weights_problem(str(tmp_path / "resnet_50"), "resnet50_d")
    assert problem == (f"--backbone_weights='{tmp_path / 'resnet_50'}' holds a keras-hub ResNet with "
                       "bottleneck_block blocks (3, 4, 6, 3), which no bot_keras model matches but "
                       "--backbone='resnet50_d'; the weights would not fit.")


# --- training: frozen stages, frozen BatchNorm, the backbone's learning rate ------------------------------


def finetune_run(tmp_path, name, spec, *extra):
    model_dir = tmp_path / name
    argv = ["--task=classification", "--backbone=resnet18_d", f"--backbone_weights={spec}",
            "--dataset=synthetic:16", "--eval_split=", "--image_size=32", "--batch_size=8", "--epochs=1",
            "--warmup_epochs=0", "--base_lr=0.5", "--verbose=0", f"--model_dir={model_dir}", *extra]
    cli.call(finetune.main, lambda fv: finetune.define_flags(fv, "classification"), argv,
             command="bot_keras.finetune")
    return {v.path: np.asarray(v) for v in keras.models.load_model(model_dir / "model.keras").weights}


@pytest.fixture(scope="module")
def frozen_runs(sources, tmp_path_factory):
    specs, _, source = sources
    tmp_path = tmp_path_factory.mktemp("frozen")
    start = {v.path: np.asarray(v) for v in source.weights}
    return start, {
        "all_stages": finetune_run(tmp_path, "all_stages", specs["run"], "--freeze_stages=4"),
        "lr_mult_0": finetune_run(tmp_path, "lr_mult_0", specs["run"], "--backbone_lr_mult=0"),
        "stage1_bn": finetune_run(tmp_path, "stage1_bn", specs["run"], "--freeze_stages=1", "--freeze_bn"),
    }


def test_frozen_stages_are_bit_identical_and_lr_mult_zero_is_freezing_them_all(frozen_runs):
    start, runs = frozen_runs
    backbone = [p for p in start if not p.startswith("logits")]
    for path in backbone:
        np.testing.assert_array_equal(runs["all_stages"][path], start[path], err_msg=path)
    for path in runs["all_stages"]:  # the head trained the same way in both
        np.testing.assert_array_equal(runs["lr_mult_0"][path], runs["all_stages"][path], err_msg=path)


def test_frozen_batchnorm_keeps_its_statistics_while_the_convolutions_train(frozen_runs):
    start, runs = frozen_runs
    run = runs["stage1_bn"]
    frozen = [p for p in start if p.startswith(("stem_", "stage1_")) or "_bn" in p.split("/")[0]]
    assert any(p.endswith("moving_mean") and p.startswith("stage4_") for p in frozen)
    for path in frozen:
        np.testing.assert_array_equal(run[path], start[path], err_msg=path)
    trained = [p for p in start if p.startswith("stage3_") and p.endswith("kernel")]
    assert trained and all(not np.array_equal(run[p], start[p]) for p in trained)  # the negative control


def test_backbone_lr_mult_scales_the_backbones_steps(sources, tmp_path):
    """With the backbone at a tenth of the head's rate, its first-step change is a tenth of the full-rate
    run's (one step of SGD from the same start on the same batch; momentum has nothing in it yet)."""
    specs, _, source = sources
    start = {v.path: np.asarray(v) for v in source.weights}
    full = finetune_run(tmp_path, "full", specs["run"], "--max_steps=1")
    tenth = finetune_run(tmp_path, "tenth", specs["run"], "--max_steps=1", "--backbone_lr_mult=0.1")
    path = "stage4_block1_conv2/kernel"
    np.testing.assert_allclose(tenth[path] - start[path], 0.1 * (full[path] - start[path]), rtol=1e-3,
                               atol=1e-7)
    np.testing.assert_allclose(tenth["logits/kernel"], full["logits/kernel"], rtol=1e-5, atol=1e-7)
