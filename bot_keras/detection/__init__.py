"""Object detection (paper Section 6.1) on bot_keras backbones: keras-hub's RetinaNet, VOC/COCO data, mAP.

`sources` reads `voc:ROOT`, `coco:PATTERN` and `tfds:NAME` annotations (normalised yxyx boxes); `augment`
moves boxes with the pixels; `data.make_detection_dataset` batches them as keras-hub wants (yxyx pixels of
the network input, -1 padding); `model.build_detector` builds the RetinaNet; `loss` exposes its loss to a
custom training step; `metrics` computes VOC07 / all-point mAP and COCO mAP. keras-hub is imported by
`model` and `loss` only, so the data and metrics modules work without it.
"""
