"""Dataset-level detection evaluation: run a detector over a split, map boxes back to the images, mAP.

The detector sees what training's validation sees (`make_detection_dataset(..., training=False,
with_metadata=True)`: longer side to S, padded to S×S). Its NMS runs at `MAP_CONFIDENCE_THRESHOLD` (0.05)
whatever threshold the model was built with: mAP integrates precision over the whole recall range, and
keras-hub's default 0.5 cuts the low-confidence tail off (it lowers the measured mAP). Predicted boxes are
divided by the evaluation resize's scale and clipped to the original image, so AP is measured in the
original image's pixels, where the annotations live (IoU itself is unchanged by the uniform resize;
clipping is what the VOC reference detectors do before scoring).

Metrics: VOC07 mAP@0.5 (11-point, the paper's Table 8 metric) and the all-point variant, per-class AP
by class name (difficult boxes ignored, `metrics.VOCEvaluator`); with `coco=True` also COCO's
AP@[.5:.95] and friends from pycocotools (for `coco:` data).
"""

import math
import time

import numpy as np
import tensorflow as tf

from bot_keras.detection import metrics
from bot_keras.detection.model import MAP_CONFIDENCE_THRESHOLD, make_nms


def to_original(boxes, scale, image_hw):
    """yxyx boxes in pixels of the S×S network input → pixels of the original image (÷ the evaluation
    resize's [sy, sx], clipped to its [h, w])."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / np.tile(np.asarray(scale, np.float64), 2)
    height, width = (float(v) for v in image_hw)
    return np.clip(boxes, 0.0, [height, width, height, width])


def _pad_batch(images, batch_size):
    """Pads a short last batch with zero images: NMS and the anchors need the static batch of the first."""
    missing = batch_size - images.shape[0]
    return tf.concat([images, tf.zeros([missing, *images.shape[1:]], images.dtype)], 0) if missing else images


def _by_name(values, class_names):
    return {name: (None if math.isnan(v) else v) for name, v in zip(class_names, values, strict=True)}


def evaluate_detector(detector, dataset, *, class_names, coco=False,
                      confidence_threshold=MAP_CONFIDENCE_THRESHOLD):
    """mAP of `detector` on `dataset` (a `make_detection_dataset(..., training=False, with_metadata=True)`).

    Returns {"map_voc07", "map_all_point", "ap_voc07": {class: AP or None}, "ap_all_point": {...},
    "count", "seconds", "images_per_second", "confidence_threshold"} plus `coco_map`'s statistics as
    "coco_<name>" when `coco`. A class without ground truth has AP None and is left out of the means.
    """
    decoder = make_nms(confidence_threshold, max_detections=detector.prediction_decoder.max_detections)
    detect = tf.function(lambda images: detector.detect(images, decoder=decoder))
    voc = metrics.VOCEvaluator(len(class_names))
    coco_images = []
    batch_size, count = None, 0
    start = time.perf_counter()
    for images, targets in dataset:
        n = int(images.shape[0])
        batch_size = batch_size or n
        found = {k: v.numpy()[:n] for k, v in detect(_pad_batch(images, batch_size)).items()}
        truth = {k: v.numpy() for k, v in targets.items() if k != "key"}
        for i in range(n):
            k = int(found["num_detections"][i])
            real = truth["labels"][i] >= 0
            image = {
                "gt_boxes": to_original(truth["boxes"][i][real], truth["scale"][i], truth["image_hw"][i]),
                "gt_labels": truth["labels"][i][real],
                "gt_difficult": truth["difficult"][i][real],
                "boxes": to_original(found["boxes"][i, :k], truth["scale"][i], truth["image_hw"][i]),
                "scores": found["confidence"][i, :k],
                "labels": found["labels"][i, :k],
            }
            voc.add(*image.values())
            if coco:
                coco_images.append(image)
        count += n
    seconds = time.perf_counter() - start
    if count == 0:
        raise ValueError("The evaluation dataset yielded no images.")
    result = voc.result()
    out = {
        "map_voc07": result["map_voc07"],
        "map_all_point": result["map_all_point"],
        "ap_voc07": _by_name(result["ap_voc07"], class_names),
        "ap_all_point": _by_name(result["ap_all_point"], class_names),
        "count": count,
        "seconds": seconds,
        "images_per_second": count / seconds,
        "confidence_threshold": confidence_threshold,
    }
    if coco:
        out.update({f"coco_{k}": v for k, v in metrics.coco_map(coco_images, len(class_names)).items()})
    return out
