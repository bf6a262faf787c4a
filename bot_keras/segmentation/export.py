"""The segmenter's serving module: image bytes in, a class map per image at the input image's size out.

    serving_default(image_bytes: string [N])   JPEG/PNG/GIF/BMP bytes, any size each
    serving_single(image_bytes: string [])     one image

`serving_default` returns the batch's class maps padded to its largest image, with each image's size:

    class_map   int32 [N, Hmax, Wmax]  class ids (index into `class_names`); image i is
                                       `class_map[i, :height[i], :width[i]]`, the rest is PAD (-1, never
                                       a class id, as detection pads its class ids)
    height      int32 [N]
    width       int32 [N]

`serving_single` returns `class_map` int32 [H, W], the one image's map (the same graph, a batch of one).

Inside, per image, the evaluation transform of `--eval_mode=pad`: the image is shrunk to fit the evaluation
size S when it is larger (never enlarged), normalised and padded to S×S; the batch of S×S images goes
through the model in one call (`training=False`), and the logits of each image's valid region are resized
back to its size and argmaxed. For an image no larger than S this is exactly evaluation at the image's own
resolution. The pixel limit (`max_image_pixels`) is checked on every image's header before anything is
decoded (`data.decode.serving_checks`).

The loaded object also carries `class_names`, `eval_size`, `max_image_pixels` and `task` ("segmentation")
as variables. Loading needs TensorFlow only (no keras-hub, no bot_keras).

The model is called only at the static size [N, S, S, 3], and the module keeps the model's variables, not
the model, as its children: saving a Keras model makes `tf.saved_model.save` trace the model's own
default signature at a dynamic height and width, which keras-hub's DeepLabV3 cannot build (its
`UpSampling2D` needs a static size).
"""

import tensorflow as tf

from bot_keras.data.augment import normalize
from bot_keras.data.decode import MAX_IMAGE_PIXELS, decode_image, serving_checks

PAD = -1  # class_map's value outside an image smaller than the batch's largest


def fit_and_pad(image, size):
    """uint8 image [H, W, 3] → (normalised float32 [S, S, 3], its [H, W], the fitted [h, w] at the top
    left): shrunk to fit S×S when larger (aspect kept), zero-padded."""
    hw = tf.shape(image)[:2]
    scale = tf.minimum(1.0, size / tf.cast(tf.reduce_max(hw), tf.float32))
    fitted = tf.maximum(tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32), 1)
    resized = tf.image.resize(tf.cast(image, tf.float32), fitted, method="bilinear")
    padded = tf.image.pad_to_bounding_box(normalize(resized), 0, 0, size, size)
    return tf.ensure_shape(padded, [size, size, 3]), hw, fitted


def logits_to_class_map(logits, hw, fitted):
    """Logits [S, S, K] of a `fit_and_pad` image → int32 class map [H, W]: the fitted region's logits
    resized back to the image's size, argmax."""
    logits = tf.image.resize(logits[: fitted[0], : fitted[1]], hw, method="bilinear")
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def class_map(model, image, size):
    """uint8 image [H, W, 3] → int32 class map [H, W] (module docstring: fit in S×S, pad, predict, resize)."""
    padded, hw, fitted = fit_and_pad(image, size)
    logits = tf.cast(model(padded[tf.newaxis], training=False), tf.float32)
    return logits_to_class_map(logits[0], hw, fitted)


class SegmentationServingModule(tf.Module):
    """A float32 segmenter (logits [B, H, W, K]) behind the bytes signatures (module docstring)."""

    def __init__(self, model, *, class_names, eval_size, max_image_pixels=MAX_IMAGE_PIXELS):
        super().__init__(name="bot_keras_segmenter")
        # The variables are the module's children and the model is reached through a closure, which the
        # SavedModel does not follow (module docstring: DeepLabV3 cannot be traced at a dynamic size).
        self.model_variables = list(model.variables)
        self._logits = lambda images: tf.cast(model(images, training=False), tf.float32)
        self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
        self.eval_size = tf.Variable(int(eval_size), trainable=False, name="eval_size")
        self.task = tf.Variable("segmentation", trainable=False, name="task")
        self.max_image_pixels = tf.Variable(int(max_image_pixels), trainable=False, name="max_image_pixels")
        self._size = int(eval_size)
        self._max_pixels = int(max_image_pixels)

    def _class_maps(self, image_bytes):
        size = self._size

        def prepare(encoded):
            return fit_and_pad(decode_image(encoded), size)

        batch, hw, fitted = tf.map_fn(
            prepare, image_bytes,
            fn_output_signature=(tf.TensorSpec([size, size, 3], tf.float32), tf.TensorSpec([2], tf.int32),
                                 tf.TensorSpec([2], tf.int32)),
        )
        logits = self._logits(batch)  # [N, S, S, K]: one call for the batch
        largest = tf.reduce_max(hw, axis=0)

        def one(args):
            image_logits, image_hw, image_fitted = args
            classes = logits_to_class_map(image_logits, image_hw, image_fitted)
            return tf.pad(classes, [[0, largest[0] - image_hw[0]], [0, largest[1] - image_hw[1]]],
                          constant_values=PAD)

        maps = tf.map_fn(one, (logits, hw, fitted), fn_output_signature=tf.TensorSpec([None, None], tf.int32))
        return {"class_map": maps, "height": hw[:, 0], "width": hw[:, 1]}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        with tf.control_dependencies(serving_checks("serving_default", image_bytes, self._max_pixels)):
            return self._class_maps(tf.identity(image_bytes))

    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="image_bytes")])
    def serve_single(self, image_bytes):
        with tf.control_dependencies(serving_checks("serving_single", image_bytes, self._max_pixels)):
            maps = self.serve_bytes(tf.identity(image_bytes)[tf.newaxis])  # the batch graph, traced once
        return {"class_map": maps["class_map"][0]}

    def signatures(self):
        return {
            "serving_default": self.serve_bytes.get_concrete_function(),
            "serving_single": self.serve_single.get_concrete_function(),
        }


def save_serving_model(model, path, *, class_names, eval_size, max_image_pixels=MAX_IMAGE_PIXELS):
    """Writes the SavedModel with both signatures to `path` (a new directory)."""
    module = SegmentationServingModule(
        model, class_names=class_names, eval_size=eval_size, max_image_pixels=max_image_pixels
    )
    tf.saved_model.save(module, str(path), signatures=module.signatures())
    return module
