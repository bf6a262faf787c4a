"""Semantic segmentation on our backbones (paper Section 6.2): data, joint augmentation, heads, loss, metrics.

    data.py      sources (seg_folder:, voc:, tfds:scene_parse150) → (image, mask) batches
    augment.py   joint image/mask augmentation: random scale, crop padded with 255, flip
    heads.py     build_segmenter("fcn" | "deeplabv3", ...)
    losses.py    pixel_cross_entropy: per-image cross-entropy ignoring 255
    metrics.py   confusion matrix → pixel accuracy, per-class IoU, mean IoU
"""

import bot_keras.models.backbone  # noqa: F401  registers ResNetBackbone so .keras segmenters load
