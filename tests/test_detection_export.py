"""The detector's `.keras` round trip, serving SavedModel (bot_keras/detection/export.py) and drawing."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_detection_data import voc_xml

from bot_keras.detection import data, draw, evaluate, export
from bot_keras.detection import model as detection_model

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64
CLASSES = ("cat", "zebra")
TOP = 10  # detections compared: past the first few, padded regions give exactly tied scores


@pytest.fixture(scope="module")
def detector():
    """An untrained detector whose confidences spread out (classification bias 0, kernel ×50), so NMS
    keeps detections with distinct scores to compare."""
    keras.utils.set_random_seed(0)
    model = detection_model.build_detector("resnet18_d", num_classes=len(CLASSES), image_size=SIZE)
    layer = model.classification_head.prediction_layer
    layer.bias.assign(tf.zeros_like(layer.bias))
    layer.kernel.assign(layer.kernel * 50)
    return model


def test_keras_round_trip_keeps_the_weights_and_the_low_threshold_nms(detector, tmp_path):
    detector.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert isinstance(loaded, detection_model.RetinaNet)
    assert loaded.prediction_decoder.confidence_threshold == detection_model.MAP_CONFIDENCE_THRESHOLD
    images = tf.random.stateless_normal([1, SIZE, SIZE, 3], [0, 1])
    expected, got = detector.detect(images), loaded.detect(images)
    assert int(got["num_detections"][0]) == int(expected["num_detections"][0]) > TOP
    np.testing.assert_allclose(got["boxes"][0, :TOP], expected["boxes"][0, :TOP], atol=1e-4)
    np.testing.assert_allclose(got["confidence"], expected["confidence"], atol=1e-5)


def _write_images(root):
    """A VOC root with a 50×100 PNG and a 72×40 JPEG of noise (non-square: the resize scale matters)."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(root / sub, exist_ok=True)
    paths = []
    for name, (h, w), fmt in (("wide", (50, 100), "png"), ("tall", (72, 40), "jpeg")):
        pixels = (rng.random([h, w, 3]) * 255).astype(np.uint8)
        encoded = tf.io.encode_png(pixels) if fmt == "png" else tf.io.encode_jpeg(pixels)
        path = root / "JPEGImages" / f"{name}.{'png' if fmt == 'png' else 'jpg'}"
        path.write_bytes(encoded.numpy())
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(w, h, [("cat", False, (1, 1, 10, 10))]))
        paths.append(str(path))
    (root / "ImageSets/Main/val.txt").write_text("wide\ntall\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return paths


@pytest.mark.slow  # ~30 s: saving traces the detector, the fresh process loads it
def test_fresh_process_without_bot_keras_serves_the_evaluation_boxes(detector, tmp_path):
    paths = _write_images(tmp_path / "voc")
    export.save_serving_model(detector, tmp_path / "served", class_names=CLASSES, image_size=SIZE)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({str(tmp_path / "served")!r})
        out = loaded.signatures["serving_default"](
            image_bytes=tf.constant([open(f, "rb").read() for f in {paths!r}]))
        assert not any(name.startswith("bot_keras") for name in sys.modules), "bot_keras was imported"
        assert loaded.box_format.numpy() == b"yxyx" and loaded.image_size.numpy() == {SIZE}
        np.savez({str(tmp_path / "out.npz")!r},
                 **{{k: v.numpy().astype(str) if v.dtype == tf.string else v.numpy()
                    for k, v in out.items()}})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    out = np.load(tmp_path / "out.npz")

    # Evaluation's path: the validation pipeline, detect on the batch, ÷ scale, clip (evaluate.to_original).
    ds = data.make_detection_dataset(f"voc:{tmp_path / 'voc'}", split="val", image_size=SIZE,
                                     global_batch_size=2, training=False, with_metadata=True)
    images, targets = next(iter(ds))
    found = detector.detect(images)
    for i, (h, w) in enumerate([(50, 100), (72, 40)]):
        count = int(found["num_detections"][i])
        assert out["num_detections"][i] == count > TOP
        expected = evaluate.to_original(found["boxes"][i, :count], targets["scale"][i], (h, w))
        np.testing.assert_allclose(out["boxes"][i, :TOP], expected[:TOP], atol=1e-3)
        np.testing.assert_allclose(out["scores"][i, :TOP], found["confidence"][i, :TOP], atol=1e-5)
        ids = found["labels"][i, :TOP].numpy()
        np.testing.assert_array_equal(out["class_ids"][i, :TOP], ids)
        np.testing.assert_array_equal(out["class_names"][i, :TOP], np.array(CLASSES)[ids])
        assert out["boxes"][i, :count, 2].max() <= h and out["boxes"][i, :count, 3].max() <= w
        assert out["boxes"][i, :count, 2].max() > SIZE * h / max(h, w)  # input pixels, not network ones
        # Padding after num_detections: -1 and "".
        assert np.all(out["class_ids"][i, count:] == -1) and np.all(out["class_names"][i, count:] == "")


def test_drawn_box_and_label_sit_on_the_given_pixels():
    buffer = io.BytesIO()
    Image.new("RGB", (60, 40), (128, 128, 128)).save(buffer, format="PNG")
    detections = {"boxes": [[20.0, 10.0, 35.0, 50.0], [1, 1, 5, 5], [-1] * 4], "scores": [0.9, 0.1, -1],
                  "class_ids": [1, 0, -1], "class_names": [b"zebra", b"cat", b""]}
    rows = draw.keep(detections, min_score=0.5)
    assert [(score, name) for _, score, _, name in rows] == [(0.9, "zebra")]
    picture = np.asarray(Image.open(io.BytesIO(draw.draw_detections(buffer.getvalue(), rows))))
    colour = draw.PALETTE[1]
    # yxyx [20, 10, 35, 50]: left edge at column 10, rows 20..34; right edge at column 49; inside untouched.
    assert tuple(picture[27, 10]) == colour and tuple(picture[27, 49]) == colour
    assert tuple(picture[34, 30]) == colour and tuple(picture[27, 30]) == (128, 128, 128)
    assert tuple(picture[27, 51]) == (128, 128, 128)
    assert (picture[:20, 10:50] != 128).any()  # the label is drawn above the box
    assert draw.format_detections("a.png", rows) == (
        "a.png  (1 detection)\n  zebra  0.900  yxyx [20.0, 10.0, 35.0, 50.0]")
    # Empty boxes are drawn, not refused by Pillow: one clipped at the bottom edge (y_min = y_max = 40, the
    # image height: its label shows above it, on row 39) and a zero-width one (a line at column 55).
    empty = draw.keep({"boxes": [[40.0, 5.0, 40.0, 30.0], [10.0, 55.0, 30.0, 55.0]], "scores": [0.8, 0.7],
                       "class_ids": [2, 3], "class_names": [b"a", b"b"]}, min_score=0.5)
    lines = np.asarray(Image.open(io.BytesIO(draw.draw_detections(buffer.getvalue(), empty))))
    assert tuple(lines[39, 6]) == draw.PALETTE[2] and tuple(lines[20, 55]) == draw.PALETTE[3]
    assert tuple(lines[20, 54]) == (128, 128, 128)
