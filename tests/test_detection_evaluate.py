"""Dataset-level detection evaluation (bot_keras/detection/evaluate.py): boxes back to the image, mAP."""

import types

import numpy as np
import pytest
import tensorflow as tf
from test_detection_data import TINY, write_voc

from bot_keras.detection import data, evaluate


def test_to_original_divides_by_the_scale_and_clips_to_the_image():
    boxes = [[10.0, 20.0, 60.0, 70.0], [-4.0, 2.0, 8.0, 10.0]]
    np.testing.assert_allclose(evaluate.to_original(boxes, [0.5, 2.0], [40, 60]),
                               [[20, 10, 40, 35], [0, 1, 16, 5]])  # y_max 120 and y_min -8 clipped


class ScriptedDetector:
    """Returns fixed detections (network pixels) for the one batch it is shown; records the NMS it got."""

    def __init__(self, boxes, scores, labels):
        self.prediction_decoder = types.SimpleNamespace(confidence_threshold=0.5, max_detections=4)
        self.found = {"boxes": tf.constant(boxes, tf.float32), "confidence": tf.constant(scores, tf.float32),
                      "labels": tf.constant(labels, tf.int32),
                      "num_detections": tf.constant([np.sum(np.array(s) > 0) for s in scores], tf.int32)}
        self.decoders = []

    def detect(self, images, decoder=None):
        self.decoders.append(decoder)
        return self.found


def test_map_of_scripted_detections_in_original_pixels(tmp_path):
    # TINY "a" is 40×60 (h×w) with a zebra at continuous y 5..20, x 10..30 and a difficult cat at
    # y 0..10, x 0..10; "c" (20×20) has no object. At S = 64, "a" is scaled by (43/40, 64/60).
    root = write_voc(tmp_path / "d", TINY, {"val": ["a", "c"]})
    ds = data.make_detection_dataset(f"voc:{root}", split="val", image_size=64, global_batch_size=2,
                                     training=False, with_metadata=True)
    s = np.array([43 / 40, 64 / 60, 43 / 40, 64 / 60])
    zebra = np.array([5.0, 10.0, 20.0, 30.0]) * s
    cat = np.array([0.0, 0.0, 10.0, 10.0]) * s
    detector = ScriptedDetector(
        boxes=[[zebra, zebra + 1, cat, -np.ones(4)], [[2, 2, 10, 10], *(-np.ones([3, 4]))]],
        # a: the zebra (TP), a duplicate of it (FP), the difficult cat (ignored); c: a zebra ranked first (FP)
        scores=[[0.9, 0.8, 0.7, -1], [0.95, -1, -1, -1]],
        labels=[[1, 1, 0, -1], [1, -1, -1, -1]],
    )
    result = evaluate.evaluate_detector(detector, ds, class_names=("cat", "zebra"), coco=True)
    # Zebra ranking FP, TP, FP over one object: recall 0, 1, 1; precision 0, 1/2, 1/3 → AP 0.5 both ways.
    assert result["ap_voc07"] == {"cat": None, "zebra": pytest.approx(0.5)}  # only a difficult cat: no AP
    assert result["map_voc07"] == pytest.approx(0.5) and result["map_all_point"] == pytest.approx(0.5)
    assert result["count"] == 2
    # COCO: the zebra box is exact after the division, so it matches at every IoU up to 0.95.
    assert result["coco_map"] == pytest.approx(0.5) and result["coco_map_50"] == pytest.approx(0.5)
    # The model was "built" with keras-hub's 0.5; evaluation decodes at 0.05 with the model's D.
    (decoder,) = detector.decoders
    assert decoder.confidence_threshold == 0.05 and decoder.max_detections == 4
