"""bot_keras/export.py: SavedModel signatures with in-graph preprocessing, float32 re-export of a mixed
precision model, `.keras` and TFLite formats, the backbone hand-off, and every bad-input path."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_run import (
    CLASS_NAMES,
    IMAGE_SIZE,
    MODEL,
    evaluation_logits,
    make_run,
    pixels,
    reference_logits,
    sample_images,
    write_image_folder,
)

from bot_keras import cli, export, model_files, predict
from bot_keras import run_dir as runs

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, the trained float32 model)."""
    return make_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def saved_model(run, tmp_path_factory):
    return export.export(run[0], tmp_path_factory.mktemp("export") / "savedmodel", top_k=3)


@pytest.fixture(scope="module")
def loaded(saved_model):
    return tf.saved_model.load(str(saved_model))


@pytest.fixture(scope="module")
def tflite_files(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    return {
        quantize: export.export(run[0], root / quantize, export_format="tflite", quantize=quantize)
        / export.TFLITE_FILE
        for quantize in export.QUANTIZE
    }


# --- SavedModel ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fresh_process_without_bot_keras_predicts_like_the_evaluation_pipeline(run, saved_model, tmp_path):
    _, model = run
    paths = write_image_folder(tmp_path / "folder")
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({str(saved_model)!r})
        files = {paths!r}
        out = loaded.signatures["serving_default"](
            image_bytes=tf.constant([open(f, "rb").read() for f in files]))
        assert not any(name.startswith("bot_keras") for name in sys.modules), "bot_keras was imported"
        arrays = {{k: v.numpy().astype(str) if v.dtype == tf.string else v.numpy() for k, v in out.items()}}
        np.savez({str(tmp_path / "out.npz")!r}, **arrays)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env=_env(), cwd=tmp_path, timeout=300)
    out = np.load(tmp_path / "out.npz")

    # bot_keras.evaluate's input path: make_dataset(..., training=False) batches → model(training=False).
    expected = evaluation_logits(model, tmp_path / "folder")
    assert expected.shape == (len(paths), len(CLASS_NAMES))
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["probabilities"], tf.nn.softmax(expected).numpy(), atol=1e-5)
    expected_ids = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(out["top_k_ids"], expected_ids)
    np.testing.assert_array_equal(out["top_k_names"].astype(str), np.array(CLASS_NAMES)[expected_ids])
    # The margins make_run builds in: a top-1 change could not hide under the tolerance above.
    top2 = np.sort(expected, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)


@pytest.mark.slow
def test_saved_model_cli_lists_both_signatures(saved_model):
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if cli.exists():
        result = subprocess.run([str(cli), "show", "--dir", str(saved_model), "--all"], env=_env(),
                                capture_output=True, text=True, timeout=300, check=True)
        text = result.stdout
        assert "signature_def['serving_default']" in text and "signature_def['serving_images']" in text
        for line in ("inputs['image_bytes'] tensor_info:", "inputs['images'] tensor_info:",
                     "dtype: DT_STRING", "dtype: DT_UINT8", "shape: (-1, -1, -1, 3)",
                     "outputs['top_k_names'] tensor_info:", "outputs['logits'] tensor_info:"):
            assert line in text, line
    else:  # no CLI next to this interpreter: the same facts from the loaded object
        signatures = tf.saved_model.load(str(saved_model)).signatures
        assert set(export.SIGNATURES) <= set(signatures)


def test_both_signatures_agree_with_each_other_and_with_in_process_inference(run, loaded):
    _, model = run
    images = np.stack([pixels(45, 60, seed=s) for s in range(3)])  # PNG is lossless: same pixels
    png = [tf.io.encode_png(image).numpy() for image in images]
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(png))
    from_pixels = loaded.signatures["serving_images"](images=tf.constant(images))
    expected = reference_logits(model, png)
    np.testing.assert_allclose(from_pixels["logits"], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(from_bytes["logits"], from_pixels["logits"], atol=1e-6)


def test_outputs_are_consistent_top_k_of_the_probabilities(loaded):
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([data for _, data in sample_images()]))
    probabilities = out["probabilities"].numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probabilities, tf.nn.softmax(out["logits"]).numpy(), atol=1e-6)
    ids = out["top_k_ids"].numpy()
    assert ids.shape == (len(sample_images()), 3)  # --top_k=3 of 5 classes
    np.testing.assert_array_equal(out["top_k_probabilities"], np.take_along_axis(probabilities, ids, 1))
    assert np.all(np.diff(out["top_k_probabilities"].numpy(), axis=1) <= 0)
    np.testing.assert_array_equal(out["top_k_names"].numpy().astype(str), np.array(CLASS_NAMES)[ids])
    assert [n.decode() for n in loaded.class_names.numpy()] == list(CLASS_NAMES)
    assert int(loaded.image_size.numpy()) == IMAGE_SIZE


def test_top_k_is_capped_at_the_number_of_classes(run):
    module = export.ServingModule(run[1], class_names=CLASS_NAMES, image_size=IMAGE_SIZE, top_k=10)
    out = module.serve_images(tf.constant(pixels(33, 33, 0)[None]))
    assert out["top_k_ids"].shape == (1, len(CLASS_NAMES))
    assert sorted(out["top_k_ids"].numpy()[0].tolist()) == list(range(len(CLASS_NAMES)))


def test_export_dir_carries_the_class_list_and_flags(run, saved_model):
    extra = saved_model / "assets.extra"
    assert (extra / "classes.txt").read_text() == (run[0] / "classes.txt").read_text()
    assert (extra / "flags.txt").read_text() == (run[0] / "flags.txt").read_text()
    assert not list(saved_model.parent.glob(f".{saved_model.name}.*")), "staging directory left behind"


# --- mixed precision ------------------------------------------------------------------------------------


def test_mixed_float16_run_is_exported_as_float32_with_the_same_logits(tmp_path):
    run_dir, trained = make_run(tmp_path / "run16", precision="mixed_float16", seed=1)
    assert {layer.compute_dtype for layer in trained.layers if layer.weights} >= {"float16"}
    rebuilt = model_files.load_model(runs.read_run(run_dir))
    assert {layer.compute_dtype for layer in rebuilt.layers} == {"float32"}
    for source, target in zip(trained.weights, rebuilt.weights, strict=True):
        np.testing.assert_array_equal(source.numpy(), target.numpy())

    path = export.export(run_dir, tmp_path / "export16")
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    graph = signature.graph.as_graph_def()
    assert "DT_HALF" not in str(graph), "the exported graph computes in float16"
    encoded = [data for _, data in sample_images()]
    logits = signature(image_bytes=tf.constant(encoded))["logits"].numpy()
    # Same weights, float32 arithmetic: the export is the trained function.
    np.testing.assert_allclose(logits, reference_logits(rebuilt, encoded), atol=1e-4, rtol=1e-4)
    # Against the trained model's own float16 arithmetic the gap is float16 rounding (unit roundoff
    # 2^-11 ≈ 4.9e-4 a step), so the 1e-3 tolerance is taken relative to the logit scale: a float32
    # export of different weights (or a float16 graph) would miss it by orders of magnitude.
    trained_logits = reference_logits(trained, encoded)
    scale = np.abs(trained_logits).max()
    gap = np.abs(logits - trained_logits).max()
    print(f"mixed_float16 run: max |export - trained| logit {gap:.2e}, logit scale {scale:.2f}")
    assert gap <= 1e-3 * scale


def test_mixed_float16_run_with_stochastic_depth_rebuilds_with_the_same_weights(tmp_path):
    # The drop-path layers change the functional model's layer order: the float32 rebuild must have them.
    run_dir, trained = make_run(tmp_path / "run16", precision="mixed_float16", drop_path_rate=0.2)
    rebuilt = model_files.load_model(runs.read_run(run_dir))
    assert {layer.compute_dtype for layer in rebuilt.layers} == {"float32"}
    for source, target in zip(trained.weights, rebuilt.weights, strict=True):
        np.testing.assert_array_equal(source.numpy(), target.numpy())


def test_weights_that_do_not_fit_the_flags_architecture_are_named(tmp_path):
    run_dir, _ = make_run(tmp_path / "run16", precision="mixed_float16")
    flags = (run_dir / "flags.txt").read_text().replace(f"--model={MODEL}", "--model=resnet34_d")
    (run_dir / "flags.txt").write_text(flags)
    with pytest.raises(ValueError, match="--model=resnet34_d"):
        model_files.load_model(runs.read_run(run_dir))


# --- .keras and TFLite ----------------------------------------------------------------------------------


def test_keras_format_is_a_float32_model_with_its_class_list(run, tmp_path):
    path = export.export(run[0], tmp_path / "k", export_format="keras")
    assert sorted(p.name for p in path.iterdir()) == ["classes.txt", "flags.txt", "model.keras"]
    model = keras.models.load_model(path / "model.keras", compile=False)
    encoded = [data for _, data in sample_images()]
    np.testing.assert_allclose(reference_logits(model, encoded), reference_logits(run[1], encoded), atol=1e-6)


def _tflite_logits(path, images):
    interpreter = tf.lite.Interpreter(model_path=str(path))
    logits = []
    for image in images:  # one image a call, of its own size
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, (1, *image.shape))
        interpreter.allocate_tensors()
        logits.append(interpreter.get_signature_runner()(image=image[None])["logits"][0])
    return np.stack(logits)


def test_tflite_float32_and_dynamic_range_agree_with_the_saved_model(loaded, tflite_files):
    images = [np.asarray(tf.io.decode_image(data, channels=3)) for _, data in sample_images()]
    reference = np.concatenate([
        loaded.signatures["serving_images"](images=image[None])["logits"].numpy() for image in images])
    float32 = _tflite_logits(tflite_files["none"], images)
    dynamic = _tflite_logits(tflite_files["dynamic"], images)
    float32_error = np.abs(float32 - reference).max()
    dynamic_error = np.abs(dynamic - reference).max()
    probabilities = tf.nn.softmax(reference).numpy()
    dynamic_probability_error = np.abs(tf.nn.softmax(dynamic).numpy() - probabilities).max()
    print(f"TFLite vs SavedModel on {len(images)} images: float32 max |logit diff| {float32_error:.2e}; "
          f"dynamic-range max |logit diff| {dynamic_error:.2e}, "
          f"max |prob diff| {dynamic_probability_error:.2e}, "
          f"top-1 agreement {np.mean(dynamic.argmax(1) == reference.argmax(1)):.0%}")
    assert float32_error < 1e-4
    np.testing.assert_array_equal(float32.argmax(1), reference.argmax(1))
    # int8 weights: a logit error of a few per cent of the logit range, and the same top-1 class.
    assert dynamic_error < 0.05 * np.ptp(reference)
    np.testing.assert_array_equal(dynamic.argmax(1), reference.argmax(1))


def test_dynamic_range_tflite_stores_int8_weights(tflite_files):
    float_size = tflite_files["none"].stat().st_size
    dynamic_size = tflite_files["dynamic"].stat().st_size
    assert dynamic_size < 0.35 * float_size, (dynamic_size, float_size)  # 4 bytes → 1 byte a weight


def test_predict_runs_the_tflite_export_as_it_runs_the_run(run, tflite_files, tmp_path):
    paths = []
    for name, data in sample_images():  # several formats and sizes: the input is resized per image
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    k = len(CLASS_NAMES)
    reference = predict.predict(run[0], paths, k=k)  # the run's model.keras, preprocess_for_eval in Python

    def ranked(results):
        return [[(p.class_name, p.probability) for p in row] for _, row in results]

    for target in (tflite_files["none"].parent, tflite_files["none"]):  # the export directory, or its file
        assert predict.load_classifier(target).kind == "tflite"
        results = predict.predict(target, paths, k=k)
        assert [path for path, _ in results] == paths
        for ours, theirs in zip(ranked(results), ranked(reference), strict=True):
            assert [name for name, _ in ours[:1]] == [name for name, _ in theirs[:1]]
            np.testing.assert_allclose(sorted(p for _, p in ours), sorted(p for _, p in theirs), atol=1e-5)
    quantised = predict.predict(tflite_files["dynamic"], paths, k=1)  # int8 weights: the same top-1 class
    assert [row[0].class_name for _, row in quantised] == [row[0].class_name for _, row in reference]

    with pytest.raises(cli.SetupError, match="--checkpoint=best chooses a run directory's model"):
        predict.load_classifier(tflite_files["none"].parent, checkpoint="best")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.tflite").write_bytes(b"not a flatbuffer")
    shutil.copy(tflite_files["none"].parent / "classes.txt", broken)
    with pytest.raises(cli.SetupError, match=f"--model={broken / 'model.tflite'}: cannot load the TFLite"):
        predict.load_classifier(broken)
    (broken / "classes.txt").unlink()
    with pytest.raises(cli.SetupError, match=f"{broken / 'classes.txt'} is missing"):
        predict.load_classifier(broken / "model.tflite")


# --- backbone ---------------------------------------------------------------------------------------------


def test_trained_weights_load_into_the_backbone(run):
    run_dir, model = run
    backbone = model_files.load_backbone(run_dir)
    pool = next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    features = keras.Model(model.input, pool.input)
    images = tf.constant(np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)), tf.float32)
    p5 = backbone(images, training=False)["P5"]
    np.testing.assert_allclose(p5, features(images, training=False), atol=1e-5)
    assert float(tf.reduce_max(tf.abs(p5))) > 0.1  # not an all-zero coincidence
    # And it is the classifier: pooling P5 and the trained head give the trained logits.
    head = model.get_layer("logits")
    pooled = tf.reduce_mean(p5, axis=(1, 2))
    np.testing.assert_allclose(head(pooled), model(images, training=False), atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------


def test_a_string_that_is_not_an_image_fails_with_a_named_assertion(loaded):
    png = tf.io.encode_png(pixels(20, 20, 0)).numpy()
    batch = tf.constant([png, b"definitely not an image", png, b"", png[: len(png) // 2]])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"not complete JPEG, PNG, GIF or BMP images:\] \[1 3 4\]"):
        loaded.signatures["serving_default"](image_bytes=batch)


def test_empty_batches_fail_with_a_message(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match="serving_default: got an empty batch"):
        loaded.signatures["serving_default"](image_bytes=tf.zeros([0], tf.string))
    with pytest.raises(tf.errors.InvalidArgumentError, match="serving_images: got an empty batch"):
        loaded.signatures["serving_images"](images=tf.zeros([0, 8, 8, 3], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="height and width of at least 1"):
        loaded.signatures["serving_images"](images=tf.zeros([1, 0, 8, 3], tf.uint8))


def test_missing_run_directory_is_named(tmp_path):
    with pytest.raises(cli.SetupError, match=f"run directory {tmp_path / 'nope'} does not exist"):
        export.export(tmp_path / "nope", tmp_path / "out")


def test_incomplete_run_directory_names_the_missing_files(run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run[0] / "classes.txt", partial)
    (partial / "checkpoints").mkdir()
    with pytest.raises(cli.SetupError, match=r"incomplete: missing flags\.txt, model\.keras"):
        export.export(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_given_as_the_run_directory_is_named_as_an_export(saved_model, tmp_path):
    with pytest.raises(cli.SetupError, match=f"^{saved_model} is a SavedModel export, not a run directory"):
        export.export(saved_model, tmp_path / "out")
    with pytest.raises(cli.SetupError, match=f"is a file; give the run directory \\({saved_model}\\)$"):
        export.export(saved_model / "saved_model.pb", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flags_without_model_or_image_size_are_named(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run[0], broken)
    (broken / "flags.txt").write_text("--precision=float32\n")
    with pytest.raises(ValueError, match="lacks --model, --image_size"):
        runs.read_run(broken)
    (broken / "flags.txt").write_text(f"--model={MODEL}\n--image_size=big\n")
    with pytest.raises(cli.SetupError, match=r"flags\.txt: .*--image_size=big"):
        runs.read_run(broken)


def test_class_list_that_does_not_match_the_model_is_named(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run[0], broken)
    (broken / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="predicts 5 classes but .*classes.txt lists 2"):
        export.export(broken, tmp_path / "out")
    (broken / "classes.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no classes"):
        runs.read_run(broken)


def test_existing_export_is_kept_without_overwrite_and_replaced_with_it(run, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(cli.SetupError, match="pass --overwrite"):
        export.export(run[0], target, export_format="keras")
    assert (target / "precious.txt").read_text() == "keep me"
    export.export(run[0], target, export_format="keras", overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["classes.txt", "flags.txt", "model.keras"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired directory


def test_a_failed_export_leaves_nothing_behind(run, tmp_path, monkeypatch):
    def fail_midway(run, model, staging, **kwargs):
        (staging / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(run[0], tmp_path / "out", export_format="keras")
    assert list(tmp_path.iterdir()) == []
    # With --overwrite, a failure keeps the previous export as it was.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.keras").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(run[0], tmp_path / "out", export_format="keras", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.keras").read_text() == "old"


@pytest.mark.parametrize("kwargs, message", [
    ({"export_format": "onnx"}, "export_format=onnx is not one of savedmodel, keras, tflite"),
    ({"quantize": "int4", "export_format": "tflite"}, "quantize=int4 is not one of none, dynamic"),
    ({"quantize": "dynamic"}, "applies to export_format=tflite only"),
    ({"top_k": 0}, "top_k=0 must be at least 1"),
])
def test_bad_options_are_named(run, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export.export(run[0], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exports_and_refuses_to_overwrite(run, tmp_path, capsys):
    argv = [f"--model_dir={run[0]}", f"--export_dir={tmp_path / 'out'}", "--format=keras"]
    first = subprocess.run([sys.executable, "-m", "bot_keras.export", *argv], env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "out" / "model.keras").is_file()
    # The same command again, in this process (cli.call: cli.run's parsing and exit codes).
    capsys.readouterr()
    with pytest.raises(SystemExit) as second:
        cli.call(export.main, export.define_flags, argv, command=export.COMMAND,
                 required=("model_dir", "export_dir"))
    assert second.value.code == 2  # cli.USAGE_ERROR
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"bot_keras.export: error: --export_dir={tmp_path / 'out'} already exists; "
        "pass --overwrite to replace it")
    with pytest.raises(SystemExit) as third:  # the flag named at parsing, before the run is read
        cli.call(export.main, export.define_flags, [*argv, "--top_k=0"], command=export.COMMAND)
    assert third.value.code == 2
    assert capsys.readouterr().err == "bot_keras.export: error: flag --top_k=0: 0 is not a positive integer\n"

