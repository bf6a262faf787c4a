"""make_dataset: batches, labels, passes, determinism, distribution, and every bad-input case."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bot_keras.data import (
    SkippedFiles,
    augment,
    bad_input_message,
    decode,
    folder,
    make_dataset,
    per_replica_batch_size,
    synthetic,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def encode(array, fmt="JPEG", **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def smooth(height, width, level=0):
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([255 * yy / height, 255 * xx / width, level + 0 * xx], -1).astype(np.uint8)


def write_folder(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    folder.list_folder.cache_clear()
    return f"folder:{root}"


def batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


# ------------------------------------------------------------------------------------------- batches


def test_training_batches_shapes_labels_and_normalisation():
    ds = make_dataset(
        "synthetic:40", split="train", image_size=32, global_batch_size=8, training=True, seed=0
    )
    (x, y), *_ = batches(ds.take(3))
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (8, 10) and y.dtype == np.float32
    np.testing.assert_array_equal(y.sum(1), 1.0)
    assert set(np.unique(y)) == {0.0, 1.0}
    assert -1.0 < x.mean() < 1.0 and 0.4 < x.std() < 2.0  # normalised, not 0-255


def test_training_is_reproducible_with_a_seed_and_reshuffles_every_pass():
    kwargs = dict(split="train", image_size=16, global_batch_size=10, training=True)
    first = batches(make_dataset("synthetic:20", seed=5, **kwargs).take(4))
    again = batches(make_dataset("synthetic:20", seed=5, **kwargs).take(4))
    other = batches(make_dataset("synthetic:20", seed=6, **kwargs).take(4))
    for (a, la), (b, lb) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(first[0][0], other[0][0])
    # 20 examples, batch 10: a pass is exactly batches 0-1, the next pass batches 2-3, with every label
    # (two of each class) in each pass, and a different order/augmentation in pass two.
    for start in (0, 2):
        counts = first[start][1].sum(0) + first[start + 1][1].sum(0)
        np.testing.assert_array_equal(counts, 2.0)
    assert not np.array_equal(first[0][0], first[2][0])


def test_one_pass_has_num_examples_floor_global_batch_steps():
    one_pass = make_dataset(
        "synthetic:30", split="train", image_size=16, global_batch_size=8, training=True, seed=1, repeat=False
    )
    first_pass = batches(one_pass)
    assert [y.shape[0] for _, y in first_pass] == [8, 8, 8]  # 30 // 8 = 3, remainder dropped
    repeated = make_dataset(
        "synthetic:30", split="train", image_size=16, global_batch_size=8, training=True, seed=1
    )
    for (a, _), (b, _) in zip(first_pass, batches(repeated.take(3)), strict=True):
        np.testing.assert_array_equal(a, b)  # the repeated dataset's first 3 batches are the first pass


def test_validation_keeps_order_and_every_example_and_matches_preprocess_for_eval():
    ds = make_dataset("synthetic:50", split="validation", image_size=24, global_batch_size=4, training=False)
    got = batches(ds)
    assert [y.shape[0] for _, y in got] == [4, 4, 2]  # all 10 examples, last batch short, one pass
    labels = np.concatenate([y for _, y in got]).argmax(1)
    np.testing.assert_array_equal(labels, np.arange(10) % 10)
    images, _ = synthetic.split_examples("validation", 10)
    expected = np.stack([augment.preprocess_for_eval(decode.decode_image(e), 24).numpy() for e in images])
    np.testing.assert_allclose(np.concatenate([x for x, _ in got]), expected, atol=1e-5)


def test_device_augmentation_batches_are_uint8_and_the_step_finishes_them():
    kwargs = dict(split="train", image_size=16, global_batch_size=4, training=True, seed=3)
    on_device = augment.Augmentation(on="device")
    host_crop_flip = augment.Augmentation(color_jitter=False, pca_lighting=False)
    device = batches(make_dataset("synthetic:20", augmentation=on_device, **kwargs).take(2))
    host = batches(make_dataset("synthetic:20", augmentation=host_crop_flip, **kwargs).take(2))
    for (x, y), (h, hy) in zip(device, host, strict=True):
        assert x.dtype == np.uint8 and x.shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(y, hy)  # same order, same crops and flips: only the rounding differs
        np.testing.assert_allclose(augment.normalize(x).numpy(), h, atol=0.5 / 57 + 1e-5)
    validation = make_dataset(
        "synthetic:20", split="validation", image_size=16, global_batch_size=4, training=False,
        augmentation=augment.Augmentation(on="device"),
    )
    assert next(iter(validation))[0].dtype == tf.uint8


def test_resume_mid_epoch_reproduces_the_augmented_batches_of_an_uninterrupted_run():
    from bot_keras import steps

    # 11 examples, batch 3: a pass is 3 steps (2 examples dropped), so steps 4-8 cross into the third pass.
    kwargs = dict(
        split="train", image_size=16, global_batch_size=3, training=True, seed=7,
        augmentation=augment.Augmentation(on="device"),
    )

    def augmented(ds, first_step, count):
        """What the train step trains on at each step: the device half with the step's seed (replica 0)."""
        out = []
        for step, (images, labels) in zip(range(first_step, first_step + count), ds, strict=False):
            seed = steps.device_augmentation_seed(7, step, 0)
            out.append((augment.augment_batch_on_device(images, seed).numpy(), labels.numpy()))
        return out

    uninterrupted = augmented(make_dataset("synthetic:11", **kwargs), 0, 9)[4:]
    resumed = augmented(make_dataset("synthetic:11", start_step=4, **kwargs), 4, 5)
    for (a, la), (b, lb) in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    # Negative control: a pipeline that starts afresh at step 4 (no start_step) trains on other batches.
    afresh = augmented(make_dataset("synthetic:11", **kwargs), 4, 1)
    assert not np.array_equal(afresh[0][0], uninterrupted[0][0])


def test_ablation_switches_reach_the_transform():
    # With every random step off, a training batch holds the validation images (in shuffled order).
    off = augment.Augmentation(random_crop=False, flip=False, color_jitter=False, pca_lighting=False)
    train = make_dataset(
        "synthetic:50",
        split="validation",
        image_size=16,
        global_batch_size=10,
        training=True,
        seed=2,
        repeat=False,
        augmentation=off,
    )
    val = make_dataset(
        "synthetic:50", split="validation", image_size=16, global_batch_size=10, training=False
    )
    ((xt, yt),) = batches(train)
    ((xv, yv),) = batches(val)
    order_t = np.lexsort(xt.reshape(10, -1).T[:5])
    order_v = np.lexsort(xv.reshape(10, -1).T[:5])
    np.testing.assert_allclose(xt[order_t], xv[order_v], atol=1e-5)
    np.testing.assert_array_equal(yt[order_t], yv[order_v])


# -------------------------------------------------------------------------------------- distribution


def test_per_replica_batch_size_and_its_errors():
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=4)
    assert per_replica_batch_size(32, context) == 8 and per_replica_batch_size(32) == 32
    with pytest.raises(ValueError, match=r"global_batch_size=30 is not divisible by the 4"):
        per_replica_batch_size(30, context)
    with pytest.raises(ValueError, match="positive integer; got 0"):
        make_dataset("synthetic", split="train", image_size=16, global_batch_size=0, training=True)
    ds = make_dataset(
        "synthetic:20",
        split="validation",
        image_size=16,
        global_batch_size=8,
        training=False,
        input_context=context,
    )
    assert [y.shape[0] for _, y in batches(ds)] == [2] * 5  # 10 validation examples, 8 / 4 replicas


def test_input_pipelines_read_disjoint_shares(tmp_path):
    source = write_folder(
        tmp_path, {f"val/c{i % 2}/{i}.png": encode(smooth(8, 8, 10 * i), "PNG") for i in range(8)}
    )
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2
        )
        ds = make_dataset(
            source, split="val", image_size=8, global_batch_size=4, training=False, input_context=context
        )
        got = batches(ds)
        assert [y.shape[0] for _, y in got] == [2, 2]
        seen += [round(float(x[..., 2].mean()), 3) for batch, _ in got for x in batch]
    assert len(set(seen)) == 8  # the blue level identifies each image: 8 distinct, none read twice


@pytest.mark.slow
def test_two_replica_mirrored_strategy_gets_per_replica_batches():
    # Logical CPU devices can only be configured before TensorFlow initialises: run in a fresh process.
    script = textwrap.dedent(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from bot_keras.data import make_dataset
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        def dataset_fn(context):
            return make_dataset("synthetic:40", split="train", image_size=16, global_batch_size=8,
                                training=True, seed=0, input_context=context)
        ds = strategy.distribute_datasets_from_function(dataset_fn)
        images, labels = next(iter(ds))
        shapes = [tuple(t.shape) for t in strategy.experimental_local_results(images)]
        label_shapes = [tuple(t.shape) for t in strategy.experimental_local_results(labels)]
        print("SHAPES", shapes, label_shapes)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHAPES [(4, 16, 16, 3), (4, 16, 16, 3)] [(4, 10), (4, 10)]" in result.stdout


# ------------------------------------------------------------------------------------------ bad input


def test_odd_but_decodable_files_work_in_training_and_validation(tmp_path):
    cmyk = io.BytesIO()
    Image.fromarray(smooth(20, 24)).convert("CMYK").save(cmyk, "JPEG")
    source = write_folder(
        tmp_path,
        {
            "train/a/grey.jpg": encode(smooth(20, 24)[..., 0]),
            "train/a/cmyk.jpg": cmyk.getvalue(),
            "train/a/png_named.jpg": encode(smooth(20, 24), "PNG"),
            "train/b/tiny.jpg": encode(smooth(2, 3)),
            "train/b/tall.jpg": encode(smooth(300, 4)),
            "train/b/wide.png": encode(smooth(3, 500), "PNG"),
            "train/b/animated.gif": encode(smooth(10, 10), "GIF"),
            "train/b/bitmap.bmp": encode(smooth(10, 10), "BMP"),
            # 10 KiB after the end-of-image marker (camera/editor trailers): decoders read it, so do we.
            "train/b/trailer.jpg": encode(smooth(20, 24)) + b"TRAILER-" * 1280,
        },
    )
    for training in (True, False):
        ds = make_dataset(
            source, split="train", image_size=16, global_batch_size=9, training=training, seed=0
        )
        x, y = next(iter(ds))
        assert x.shape == (9, 16, 16, 3) and np.isfinite(x.numpy()).all()
        assert sorted(y.numpy().argmax(1)) == [0, 0, 0, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("bad_name", ["truncated.jpg", "empty.jpg", "text.jpg", "truncated.png"])
def test_undecodable_file_fails_naming_it_or_is_skipped_and_counted(tmp_path, capfd, bad_name):
    good = encode(smooth(16, 16))
    bad = {
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "text.jpg": b"This is a text file that someone saved into a class folder.\n" * 3,
        "truncated.png": encode(smooth(16, 16), "PNG")[:-30],
    }[bad_name]
    source = write_folder(
        tmp_path, {**{f"train/c{i % 2}/{i}.jpg": good for i in range(6)}, f"train/c1/{bad_name}": bad}
    )
    for training in (True, False):
        ds = make_dataset(
            source, split="train", image_size=16, global_batch_size=7, training=training, seed=0
        )
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            batches(ds.take(1))
        # Our sentence and the file, without TensorFlow's iterator path.
        bad_path = str(tmp_path / "train" / "c1" / bad_name)
        assert bad_input_message(error.value) == (
            f"Undecodable image file (empty, not an image, or truncated): {bad_path} "
            "(skip such files with skip_corrupt)"
        )
    skipped = SkippedFiles()
    ds = make_dataset(
        source, split="train", image_size=16, global_batch_size=3, training=True, seed=0,
        skip_corrupt=True, skipped_files=skipped,
    )
    assert sum(y.shape[0] for _, y in batches(ds.take(8))) == 24  # 4 passes of 6 good images
    err = capfd.readouterr().err
    assert err.count("skipped undecodable image") == 1 and bad_name in err  # once per file, not per pass
    assert "1 distinct files skipped so far" in err
    assert skipped.count() == 1 and skipped.keys() == [bad_path]


def test_label_out_of_range_names_the_record(tmp_path):
    path = tmp_path / "train-00000-of-00001"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for label in (0, 1, 7):
            feature = {
                "image/encoded": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[encode(smooth(8, 8))])
                ),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    (tmp_path / "dataset_info.json").write_text(
        '{"class_names": ["a", "b"], "num_examples": {"train": 3}, "label_offset": 0}'
    )
    ds = make_dataset(
        f"tfrecord:{tmp_path}", split="train", image_size=8, global_batch_size=3, training=False
    )
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        batches(ds)
    assert bad_input_message(error.value) == (
        f"Label out of range [0, 2) (check label_offset) in {path}#2 label 7"
    )


def test_empty_or_too_small_datasets_and_bad_sizes_are_clear_errors(tmp_path):
    tf.io.TFRecordWriter(str(tmp_path / "train-00000-of-00001")).close()
    with pytest.raises(ValueError, match="split 'train' is empty"):
        make_dataset(f"tfrecord:{tmp_path}", split="train", image_size=8, global_batch_size=2, training=False)
    with pytest.raises(ValueError, match="has 20 examples, fewer than a global batch"):
        make_dataset("synthetic:100", split="validation", image_size=8, global_batch_size=32, training=True)
    with pytest.raises(ValueError, match="image_size must be an integer >= 8; got 4"):
        make_dataset("synthetic", split="train", image_size=4, global_batch_size=2, training=True)
    with pytest.raises(ValueError, match=r"crop_area_range must satisfy 0 < low <= high <= 1; got \(0.0, 1"):
        augment.Augmentation(crop_area_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"crop_sampler must be one of \('paper', 'tf'\); got 'torch'"):
        augment.Augmentation(crop_sampler="torch")
    with pytest.raises(ValueError, match="Unknown dataset source 'imagenet'"):
        make_dataset("imagenet", split="train", image_size=8, global_batch_size=2, training=True)
