"""The detector: keras-hub's RetinaNet (FPN on P3-P5, levels 3-7) on a bot_keras ResNet backbone.

The paper (Section 6.1) fine-tunes its backbones as Faster-RCNN; keras-hub has no Faster-RCNN, and a
maintained, tested Keras 3 RetinaNet beats a home-made two-stage detector, so ours is RetinaNet (Lin et al.,
"Focal Loss for Dense Object Detection", 2017).

Box format at this boundary: **"yxyx" in pixels of the network input** (`[y_min, x_min, y_max, x_max]`,
continuous edges, so a box covering pixel rows 2..5 is y_min = 2, y_max = 6). Labels `{"boxes": [B, N, 4],
"labels": [B, N]}` padded with -1; predictions are the same format.

Three things differ from `keras_hub.models.RetinaNetObjectDetector` as keras-hub 0.32 builds it:
  * the heads are initialised as Lin et al. Section 4.1 says (`init_heads`): every head conv Gaussian
    σ = 0.01 with bias 0, except the classification output's bias b = -log((1 - π) / π), π = 0.01, so every
    anchor starts at confidence π. keras-hub 0.32 puts that prior on the *box* head (every box delta -4.6)
    and draws kernels with σ = 0.05, whose four 3×3×256 convs amplify: measured on resnet18_d at 64 px, a
    first loss of 379 and mean confidence 0.41 with only the bias moved, 1.5 and 0.010 with both fixed;
  * under mixed_float16 the head outputs are float16 and keras-hub's box decoding fails against its float32
    anchors; `decode_predictions` casts to float32 first (the float32 island of STYLE.md, habit 9);
  * the NMS confidence threshold is a parameter: keras-hub's 0.5 suits pictures, mAP needs low-confidence
    detections too (0.05, as the VOC/COCO benchmarks' reference detectors use); `detect(images,
    decoder=make_nms(...))` decodes with another NMS for one call (evaluation always uses 0.05).
keras-hub's NMS is class-agnostic: each anchor keeps its best class only, then one NMS over all classes.
"""

import math

import keras
import keras_hub
import tensorflow as tf

import bot_keras.models.backbone  # noqa: F401  registers ResNetBackbone so .keras detectors load
from bot_keras.models import build_backbone

BOX_FORMAT = "yxyx"
MIN_LEVEL, MAX_LEVEL = 3, 7  # Lin et al.: FPN levels P3-P7; P6, P7 from the backbone's last stage (C5)
PRIOR_PROBABILITY = 0.01
HEAD_INIT_STDDEV = 0.01
NMS_IOU = 0.5
MAP_CONFIDENCE_THRESHOLD = 0.05  # what mAP evaluation uses; keras-hub's default (for pictures) is 0.5
MAX_DETECTIONS = 100


@keras.saving.register_keras_serializable(package="bot_keras")
class RetinaNet(keras_hub.models.RetinaNetObjectDetector):
    """keras-hub's RetinaNetObjectDetector with the head-bias fix and float32 box decoding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Weights restored by `load_model` overwrite these; a fresh model gets Lin et al.'s initialisation.
        init_heads(self, PRIOR_PROBABILITY)

    def decode_predictions(self, predictions, data, decoder=None):
        """keras-hub's decoding (anchor deltas → boxes → NMS) in float32, with `decoder` (a
        `make_nms` layer) in place of `prediction_decoder` when given: evaluation decodes at the mAP
        threshold whatever the model was built with. `data` is the images (or (images, labels)) batch,
        of fully static shape: the anchor generator reads its H and W, NMS its batch size."""
        decoder = decoder or self.prediction_decoder
        images = data[0] if isinstance(data, (list, tuple)) else data
        height, width, channels = images.shape[1:]
        anchors = tf.concat(list(self.anchor_generator(images).values()), axis=0)
        boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors=anchors,
            boxes_delta=tf.cast(predictions["bbox_regression"], tf.float32),
            encoded_format="center_xywh",
            anchor_format=self.anchor_generator.bounding_box_format,
            box_format=self.bounding_box_format,
            image_shape=(height, width, channels),
        )
        if decoder.bounding_box_format != self.bounding_box_format:
            raise ValueError(f"decoder box format {decoder.bounding_box_format!r} is not the detector's "
                             f"{self.bounding_box_format!r}.")
        return decoder(boxes, tf.cast(predictions["cls_logits"], tf.float32), images=images)

    def detect(self, images, *, decoder=None):
        """NMS'd detections of a batch of network inputs: {"boxes" [B, D, 4] yxyx pixels of the input,
        "confidence" [B, D], "labels" [B, D] (-1 padding), "num_detections" [B]}."""
        return self.decode_predictions(self(images, training=False), images, decoder=decoder)


def init_heads(detector, prior_probability=PRIOR_PROBABILITY):
    """Lin et al. Section 4.1: head convs N(0, 0.01²), biases 0, classification output bias at the prior."""
    initializer = keras.initializers.RandomNormal(stddev=HEAD_INIT_STDDEV)
    for head in (detector.classification_head, detector.box_head):
        for conv in [*head.conv_layers, head.prediction_layer]:
            conv.kernel.assign(initializer(conv.kernel.shape, dtype=conv.kernel.dtype))
            if conv.bias is not None:  # (group-normalised head convs have none)
                conv.bias.assign(tf.zeros(conv.bias.shape, conv.bias.dtype))
    cls_bias = detector.classification_head.prediction_layer.bias
    cls_bias.assign(tf.fill(cls_bias.shape, -math.log((1 - prior_probability) / prior_probability)))
    return detector


def make_nms(confidence_threshold=MAP_CONFIDENCE_THRESHOLD, *, iou_threshold=NMS_IOU,
             max_detections=MAX_DETECTIONS):
    """keras-hub's NonMaxSuppression on sigmoid scores of the class logits, in `BOX_FORMAT`."""
    if not 0.0 <= confidence_threshold < 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1); got {confidence_threshold!r}.")
    return keras_hub.layers.NonMaxSuppression(
        bounding_box_format=BOX_FORMAT,
        from_logits=True,
        iou_threshold=iou_threshold,
        confidence_threshold=confidence_threshold,
        max_detections=max_detections,
    )


def make_anchor_generator():
    """keras-hub's RetinaNet anchors (3 scales × 3 aspect ratios a level, size 4 × stride) on P3-P7."""
    return keras_hub.layers.AnchorGenerator(BOX_FORMAT, min_level=MIN_LEVEL, max_level=MAX_LEVEL,
                                            num_scales=3, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=4)


class LabelEncoder:
    """RetinaNet's training targets (Lin et al.): each anchor matched to the ground-truth box of highest
    IoU, positive at IoU >= 0.5 (its box as "center_xywh" deltas, its class), background below 0.4 (class
    -1), ignored between (class -2); an anchor matched to a -1 padding box, whose deltas are NaN, is ignored.

    Built from public pieces (`keras_hub.layers.BoxMatcher`, `keras.utils.bounding_boxes`) to the rules of
    keras-hub 0.32's `RetinaNetLabelEncoder`, which keras-hub does not export (the detector builds one for
    itself, `detector.label_encoder`; tests/test_detection_model.py checks the two give the same targets).
    Called as keras-hub's: `(images, gt_boxes [B, N, 4], gt_classes [B, N]) -> (box deltas [B, A, 4],
    class targets [B, A, 1])`; only the images' static shape is read.
    """

    def __init__(self, anchor_generator, *, bounding_box_format=BOX_FORMAT, encoding_format="center_xywh",
                 positive_threshold=0.5, negative_threshold=0.4, box_variance=(1.0, 1.0, 1.0, 1.0),
                 background_class=-1.0, ignore_class=-2.0):
        self.anchor_generator = anchor_generator
        self.bounding_box_format = bounding_box_format
        self.encoding_format = encoding_format
        self.box_variance = list(box_variance)
        self.background_class, self.ignore_class = background_class, ignore_class
        self.box_matcher = keras_hub.layers.BoxMatcher(
            thresholds=[negative_threshold, positive_threshold], match_values=[-1, -2, 1],
            force_match_for_each_col=False,
        )

    def __call__(self, images, gt_boxes, gt_classes):
        height, width, channels = images.shape[1:]
        gt_boxes = tf.convert_to_tensor(gt_boxes)
        gt_classes = tf.cast(tf.convert_to_tensor(gt_classes), gt_boxes.dtype)
        if gt_classes.shape.rank == 3:
            gt_classes = gt_classes[..., 0]
        anchors = tf.concat(list(self.anchor_generator(images).values()), axis=0)
        anchors = keras.utils.bounding_boxes.convert_format(
            anchors, source=self.anchor_generator.bounding_box_format, target=self.bounding_box_format,
            height=height, width=width,
        )
        iou = keras.utils.bounding_boxes.compute_iou(
            anchors, gt_boxes, bounding_box_format=self.bounding_box_format,
            image_shape=(height, width, channels),
        )
        matched_index, matched_value = self.box_matcher(iou)
        if gt_boxes.shape[1] == 0:  # no box in the whole batch: every anchor is background
            matched_boxes = tf.zeros([tf.shape(gt_boxes)[0], tf.shape(anchors)[0], 4], gt_boxes.dtype)
            matched_classes = tf.zeros(tf.shape(matched_boxes)[:2], gt_boxes.dtype)
        else:
            matched_boxes = tf.gather(gt_boxes, matched_index, batch_dims=1)
            matched_classes = tf.gather(gt_classes, matched_index, batch_dims=1)
        deltas = keras.utils.bounding_boxes.encode_box_to_deltas(
            anchors=anchors, boxes=matched_boxes, anchor_format=self.bounding_box_format,
            box_format=self.bounding_box_format, encoding_format=self.encoding_format,
            variance=self.box_variance, image_shape=(height, width, channels),
        )
        classes = tf.where(tf.equal(matched_value, 1), matched_classes, self.background_class)
        classes = tf.where(tf.equal(matched_value, -2), self.ignore_class, classes)
        nan = tf.reduce_any(tf.math.is_nan(deltas), axis=-1)
        deltas = tf.where(nan[..., tf.newaxis], self.ignore_class, deltas)
        classes = tf.where(nan, self.ignore_class, classes)
        return deltas, classes


def make_label_encoder(anchor_generator=None):
    """`LabelEncoder` (IoU >= 0.5 positive, < 0.4 background) on `make_anchor_generator`'s anchors: the
    training loss's, built without the model; the detector's own (keras-hub's default for its anchors and
    box format) follows the same rules."""
    return LabelEncoder(anchor_generator or make_anchor_generator())


def build_detector(backbone_name, *, num_classes, image_size, image_encoder=None,
                   confidence_threshold=MAP_CONFIDENCE_THRESHOLD, max_detections=MAX_DETECTIONS,
                   kernel_initializer="glorot_uniform", head_norm=False):
    """A `RetinaNet` on `build_backbone(backbone_name, output_stride=32)` for square `image_size` inputs.

    Args:
      backbone_name: a ResNet name (`resnet50_d`, ...) for `bot_keras.models.build_backbone`.
      num_classes: object classes (no background class: RetinaNet's sigmoid classifier has none).
      image_size: S; the input is a static [S, S, 3] (keras-hub's anchor generator and NMS need a real H/W;
        a multiple of 128 lets every FPN level up to P7 tile the image exactly).
      image_encoder: an already built backbone (e.g. with a classifier's weights, or a registered
        keras-hub FeaturePyramidBackbone); its `pyramid_outputs` must hold P3..P5 at strides 8, 16, 32.
      confidence_threshold: NMS confidence threshold of `predict` (0.05 for mAP; 0.5 for pictures).
      max_detections: detections kept per image after NMS.
      kernel_initializer: for the backbone's convolutions (random init only).
      head_norm: group normalisation (32 groups) after each of the heads' 3×3 convs, as keras-hub's
        `use_prediction_head_norm` (and torchvision's RetinaNet v2) does; Lin et al.'s heads have none.
        Measured on the raccoon photos from a random or CIFAR-trained ResNet-18-D: without it the first
        steps' gradient norm spikes to hundreds (see docs/transfer.md).

    Compile it before `fit` or `compute_loss` (see `loss.py`): keras-hub's loss lives in `compile`.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
    if not isinstance(image_size, int) or image_size < 2 ** MAX_LEVEL // 2 or image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, at least {2 ** MAX_LEVEL // 2} (the "
                         f"backbone's P5 grid must tile it); got {image_size!r}.")
    if image_encoder is None:
        image_encoder = build_backbone(backbone_name, input_shape=(image_size, image_size, 3),
                                       output_stride=32, kernel_initializer=kernel_initializer)
    missing = [k for k in ("P3", "P4", "P5") if k not in getattr(image_encoder, "pyramid_outputs", {})]
    if missing:
        raise ValueError(f"Backbone {image_encoder.name!r} lacks pyramid outputs {missing} (needs P3-P5).")
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=image_encoder,
        min_level=MIN_LEVEL,
        max_level=MAX_LEVEL,
        use_p5=False,
        image_shape=(image_size, image_size, 3),
    )
    return RetinaNet(
        backbone=backbone,
        num_classes=num_classes,
        bounding_box_format=BOX_FORMAT,
        anchor_generator=make_anchor_generator(),
        label_encoder=None,  # keras-hub's own for these anchors and format (`LabelEncoder`'s rules)
        prediction_decoder=make_nms(confidence_threshold, max_detections=max_detections),
        use_prediction_head_norm=head_norm,
    )
