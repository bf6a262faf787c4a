"""The detector's serving module: image bytes in, NMS'd boxes in the input image's pixels out.

    serving_default(image_bytes: string [N])   JPEG/PNG/GIF/BMP bytes, any size each

returns, per image, up to D = the detector's `max_detections` detections, best first, padded with -1
(boxes, scores, class ids) and "" (class names) after `num_detections`:

    boxes           float32 [N, D, 4]  **"yxyx" = [y_min, x_min, y_max, x_max] in pixels of the input
                                       image** (continuous edges, clipped to the image)
    scores          float32 [N, D]     sigmoid confidence of the box's class
    class_ids       int32 [N, D]       index into `class_names`
    class_names     string [N, D]
    num_detections  int32 [N]

The preprocessing inside is evaluation's (`augment.preprocess_for_eval`: longer side to S, pad to S×S,
ImageNet normalisation). keras-hub's anchor generator and NMS need a fully static input shape, batch
included (the anchors read H and W as numbers; NMS builds `zeros([batch_size])`), so the signature runs
the detector on one [1, S, S, 3] image at a time (`tf.map_fn`) and any number of images of any size goes
in. NMS keeps detections down to the model's confidence threshold (0.05 for a model from
`build_detector`, as mAP needs); clients wanting pictures keep `scores >= 0.3` or so: greedy NMS over the
boxes above a higher threshold keeps exactly those same boxes.

The loaded object also carries `class_names`, `image_size`, `box_format` ("yxyx") and `task`
("detection") as variables. Loading needs TensorFlow only (no keras-hub, no bot_keras).
"""

import tensorflow as tf

from bot_keras.data.decode import MAX_IMAGE_PIXELS, decode_image, serving_checks
from bot_keras.detection import augment

BOX_FORMAT = "yxyx"


class DetectionServingModule(tf.Module):
    """A float32 `RetinaNet` (bot_keras.detection.model) behind the bytes signature (module docstring)."""

    def __init__(self, detector, *, class_names, image_size, max_image_pixels=MAX_IMAGE_PIXELS):
        super().__init__(name="bot_keras_detector")
        self.detector = detector
        self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
        self.image_size = tf.Variable(int(image_size), trainable=False, name="image_size")
        self.box_format = tf.Variable(BOX_FORMAT, trainable=False, name="box_format")
        self.task = tf.Variable("detection", trainable=False, name="task")
        self.max_image_pixels = tf.Variable(int(max_image_pixels), trainable=False, name="max_image_pixels")
        self._max_pixels = int(max_image_pixels)
        self._size = int(image_size)
        self._max_detections = int(detector.prediction_decoder.max_detections)

    def _detect_one(self, encoded):
        image = decode_image(encoded)
        image_hw = tf.cast(tf.shape(image)[:2], tf.float32)
        batch, _, scale = augment.preprocess_for_eval(image, tf.zeros([0, 4]), self._size)
        batch = batch[tf.newaxis]  # [1, S, S, 3], fully static
        found = self.detector.detect(batch)
        count = tf.cast(found["num_detections"][0], tf.int32)
        valid = tf.range(self._max_detections) < count
        limits = tf.tile(image_hw, [2])
        boxes = tf.clip_by_value(found["boxes"][0] / tf.tile(scale, [2]), 0.0, limits)
        boxes = tf.where(valid[:, tf.newaxis], boxes, -1.0)
        ids = tf.where(valid, tf.cast(found["labels"][0], tf.int32), -1)
        scores = tf.where(valid, tf.cast(found["confidence"][0], tf.float32), -1.0)
        names = tf.where(valid, tf.gather(self.class_names, tf.maximum(ids, 0)), "")
        return boxes, scores, ids, names, count

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        checks = serving_checks("serving_default", image_bytes, self._max_pixels)
        d = self._max_detections
        with tf.control_dependencies(checks):
            boxes, scores, ids, names, count = tf.map_fn(
                self._detect_one, tf.identity(image_bytes),
                fn_output_signature=(tf.TensorSpec([d, 4], tf.float32), tf.TensorSpec([d], tf.float32),
                                     tf.TensorSpec([d], tf.int32), tf.TensorSpec([d], tf.string),
                                     tf.TensorSpec([], tf.int32)),
            )
        return {"boxes": boxes, "scores": scores, "class_ids": ids, "class_names": names,
                "num_detections": count}


def save_serving_model(detector, path, *, class_names, image_size, max_image_pixels=MAX_IMAGE_PIXELS):
    """Writes the SavedModel with its `serving_default` signature to `path` (a new directory)."""
    module = DetectionServingModule(
        detector, class_names=class_names, image_size=image_size, max_image_pixels=max_image_pixels
    )
    signatures = {"serving_default": module.serve_bytes.get_concrete_function()}
    tf.saved_model.save(module, str(path), signatures=signatures)
    return module
