"""Detection mAP: Pascal VOC's (the paper's Table 8 metric) and COCO's through pycocotools.

Boxes are "yxyx" with continuous edges, in any pixel frame as long as ground truth and detections share it
(IoU does not change under the evaluation resize, which scales both). Per image, ground truth is
(boxes [N, 4], labels [N], difficult [N]) and detections (boxes [M, 4], scores [M], labels [M]).

VOC (`VOCEvaluator`), as the devkit's `VOCevaldet` / py-faster-rcnn's `voc_eval.py`:
  * per class, detections sorted by score; each is matched to the ground-truth box of its class in its image
    with the highest IoU; IoU > 0.5 (strictly) with an unmatched box is a true positive, with an already
    matched box a false positive (duplicate detection), with a *difficult* box neither (ignored); otherwise
    a false positive;
  * recall = TP / (non-difficult ground truth), precision = TP / (TP + FP) along the ranking;
  * AP: VOC 2007's 11-point interpolation (mean over recall t ∈ {0, 0.1, ..., 1} of the best precision at
    recall ≥ t) and the all-point area under the monotone precision envelope of VOC 2010+;
  * mAP averages the classes that have ground truth (a class without any is NaN and left out).
The devkit's IoU counts pixels inclusively ("+1" in widths); on continuous edges [xmin - 1, xmax] (how
`sources` reads VOC boxes) plain IoU is the same number.

COCO (`coco_map`): AP@[.5:.95] and friends from pycocotools' COCOeval, the reference implementation
(pip extra `coco`).
"""

import contextlib
import io

import numpy as np

IOU_THRESHOLD = 0.5


def iou(box, boxes):
    """IoU of one yxyx box with each of `boxes` [N, 4] (continuous edges)."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    height = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    width = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = height * width
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area(box) + area(boxes) - inter)


def average_precision(recall, precision, *, eleven_point):
    """AP of a ranking's recall/precision arrays: VOC07 11-point, or the all-point (VOC 2010+) area."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if eleven_point:
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope, non-increasing in recall
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


class VOCEvaluator:
    """Accumulates images with `add`, then `result()` gives per-class AP and mAP (both VOC variants)."""

    def __init__(self, num_classes, iou_threshold=IOU_THRESHOLD):
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self._ground_truth = []  # per image: (boxes, labels, difficult)
        self._detections = []  # (image index, score, label, box)

    def add(self, gt_boxes, gt_labels, gt_difficult, boxes, scores, labels):
        """One image; -1 labels (padding) on either side are ignored."""
        gt_labels = np.asarray(gt_labels).reshape(-1)
        real = gt_labels >= 0
        difficult = np.zeros_like(real)
        if gt_difficult is not None:
            difficult = np.asarray(gt_difficult, bool).reshape(-1)
        self._ground_truth.append(
            (np.asarray(gt_boxes, np.float64).reshape(-1, 4)[real], gt_labels[real], difficult[real])
        )
        image = len(self._ground_truth) - 1
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores, labels = np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)
        for box, score, label in zip(boxes, scores, labels, strict=True):
            if label >= 0:
                self._detections.append((image, float(score), int(label), box))

    def class_ranking(self, label):
        """(recall, precision) along the score-sorted detections of one class; None without ground truth."""
        num_positives = sum(int(np.sum((lab == label) & ~d)) for _, lab, d in self._ground_truth)
        if num_positives == 0:
            return None
        dets = sorted((d for d in self._detections if d[2] == label), key=lambda d: -d[1])
        matched = [np.zeros(int(np.sum(lab == label)), bool) for _, lab, _ in self._ground_truth]
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for i, (image, _, _, box) in enumerate(dets):
            gt_boxes, gt_labels, gt_difficult = self._ground_truth[image]
            of_class = gt_labels == label
            overlaps = iou(box, gt_boxes[of_class]) if of_class.any() else np.zeros(0)
            best = int(np.argmax(overlaps)) if overlaps.size else -1
            if best < 0 or overlaps[best] <= self.iou_threshold:
                fp[i] = 1
            elif gt_difficult[of_class][best]:
                continue  # a detection of a difficult object: neither right nor wrong
            elif matched[image][best]:
                fp[i] = 1  # duplicate detection
            else:
                tp[i] = 1
                matched[image][best] = True
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        return tp / num_positives, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)

    def result(self):
        """{"ap_voc07": [K], "ap_all_point": [K], "map_voc07", "map_all_point"}; NaN for classes without
        ground truth, left out of the means."""
        ap07, ap_all = [], []
        for label in range(self.num_classes):
            ranking = self.class_ranking(label)
            if ranking is None:
                ap07.append(float("nan"))
                ap_all.append(float("nan"))
            else:
                ap07.append(average_precision(*ranking, eleven_point=True))
                ap_all.append(average_precision(*ranking, eleven_point=False))
        mean = lambda values: float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")
        return {"ap_voc07": ap07, "ap_all_point": ap_all,
                "map_voc07": mean(ap07), "map_all_point": mean(ap_all)}


COCO_STAT_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                   "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")  # fmt: skip


def coco_map(images, num_classes):
    """COCO's detection metrics from pycocotools for `images`: a list of dicts with "gt_boxes",
    "gt_labels", "gt_difficult" (iscrowd) and "boxes", "scores", "labels" (yxyx pixels).

    Returns {name: value} for `COCO_STAT_NAMES` ("map" is AP@[.5:.95]); -1 where COCO has nothing to
    measure (e.g. no small objects).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO mAP needs pycocotools: pip install 'bot-keras[coco]'.") from None

    def xywh(box):
        y0, x0, y1, x1 = (float(v) for v in box)
        return [x0, y0, x1 - x0, y1 - y0]

    gt_annotations, detections = [], []
    for image_id, image in enumerate(images):
        labels = np.asarray(image["gt_labels"]).reshape(-1)
        crowd = np.asarray(image.get("gt_difficult", np.zeros_like(labels, bool))).reshape(-1)
        for box, label, is_crowd in zip(np.reshape(image["gt_boxes"], (-1, 4)), labels, crowd, strict=True):
            if label >= 0:
                b = xywh(box)
                gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id,
                                       "category_id": int(label), "bbox": b, "area": b[2] * b[3],
                                       "iscrowd": int(is_crowd)})
        for box, score, label in zip(np.reshape(image["boxes"], (-1, 4)), np.reshape(image["scores"], -1),
                                     np.reshape(image["labels"], -1), strict=True):
            if label >= 0:
                detections.append({"image_id": image_id, "category_id": int(label), "bbox": xywh(box),
                                   "score": float(score)})
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": i} for i in range(len(images))],
        "categories": [{"id": k} for k in range(num_classes)],
        "annotations": gt_annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        ground_truth.createIndex()
        if not detections:
            return {name: 0.0 for name in COCO_STAT_NAMES}
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(COCO_STAT_NAMES, (float(v) for v in evaluation.stats), strict=True))
