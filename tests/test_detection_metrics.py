"""VOC07 mAP against a hand-worked example, COCO mAP through pycocotools (bot_keras/detection/metrics.py)."""

import numpy as np
import pytest

from bot_keras.detection import metrics

CAT, DOG, BIRD = 0, 1, 2


def golden_evaluator():
    """Two images, classes cat/dog (+ bird with no ground truth). Boxes yxyx.

    Image 0: cat A [0, 0, 10, 10]; cat D [20, 20, 30, 30], difficult.
    Image 1: cat C [0, 0, 10, 10]; dog E [0, 20, 10, 40] (10 × 20).
    """
    ev = metrics.VOCEvaluator(num_classes=3)
    ev.add([[0, 0, 10, 10], [20, 20, 30, 30], [-1, -1, -1, -1]], [CAT, CAT, -1], [False, True, False],
           boxes=[[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]],
           scores=[0.9, 0.8, 0.7], labels=[CAT, CAT, CAT])
    ev.add([[0, 0, 10, 10], [0, 20, 10, 40]], [CAT, DOG], [False, False],
           boxes=[[50, 50, 60, 60], [0, 0, 10, 9], [0, 20, 10, 30], [0, 22, 10, 40], [0, 0, 5, 5]],
           scores=[0.6, 0.5, 0.95, 0.4, 0.3], labels=[CAT, CAT, DOG, DOG, BIRD])
    return ev


def test_voc_map_matches_the_hand_computation():
    # cat (2 non-difficult boxes), detections by score:
    #   0.9 on A, IoU 1            → TP                     recall .5, precision 1
    #   0.8 on A again             → FP (duplicate)         recall .5, precision 1/2
    #   0.7 on difficult D         → ignored (neither)
    #   0.6 on nothing             → FP                     recall .5, precision 1/3
    #   0.5 [0,0,10,9] on C, IoU .9 → TP                    recall 1,  precision 2/4
    #   11-point: t = 0..0.5 (6 points) best precision 1; t = 0.6..1 (5 points) 0.5 → (6 + 2.5) / 11
    #   all-point: envelope 1 up to recall .5, .5 up to 1 → .5 · 1 + .5 · .5 = .75
    # dog (1 box): 0.95 [0,20,10,30] has IoU 100/200 = 0.5, not > 0.5 → FP; 0.4 IoU 180/200 = .9 → TP:
    #   recall 0, 1; precision 0, 1/2 → 11-point 0.5 everywhere; all-point 1 · .5 = .5
    # bird: no ground truth → NaN, left out of the mean.
    result = golden_evaluator().result()
    np.testing.assert_allclose(result["ap_voc07"][:2], [8.5 / 11, 0.5])
    np.testing.assert_allclose(result["ap_all_point"][:2], [0.75, 0.5])
    assert np.isnan(result["ap_voc07"][BIRD]) and np.isnan(result["ap_all_point"][BIRD])
    np.testing.assert_allclose(result["map_voc07"], (8.5 / 11 + 0.5) / 2)
    np.testing.assert_allclose(result["map_all_point"], 0.625)


def test_average_precision_interpolations_on_a_two_point_ranking():
    # recall .5 at precision 1, recall 1 at precision .5 (the cat ranking without its repeated points)
    assert metrics.average_precision([0.5, 1.0], [1.0, 0.5], eleven_point=True) == pytest.approx(8.5 / 11)
    assert metrics.average_precision([0.5, 1.0], [1.0, 0.5], eleven_point=False) == pytest.approx(0.75)


def test_coco_map_perfect_and_one_shifted_box():
    gt = [[0, 0, 10, 10], [0, 0, 10, 10]]
    images = [{"gt_boxes": [b], "gt_labels": [0], "boxes": [b], "scores": [0.9], "labels": [0]} for b in gt]
    assert metrics.coco_map(images, num_classes=1)["map"] == pytest.approx(1.0)
    # Second detection shifted 1 px right: IoU 90/110 = .818, a TP at the 7 thresholds .50..80, a FP
    # (ranked after the perfect TP) at .85, .90, .95, where precision is 1 up to recall .5: COCO's 101
    # recall points give 51/101. AP@[.5:.95] = (7 · 1 + 3 · 51/101) / 10.
    images[1]["boxes"] = [[0, 1, 10, 11]]
    images[1]["scores"] = [0.8]
    result = metrics.coco_map(images, num_classes=1)
    assert result["map"] == pytest.approx((7 + 3 * 51 / 101) / 10)
    assert result["map_50"] == pytest.approx(1.0)
