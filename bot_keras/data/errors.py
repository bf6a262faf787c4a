"""Recognising the input pipeline's own checks in a TensorFlow error, in one place.

`make_dataset` validates every example inside the graph (`tf.debugging.Assert` in pipeline.py): an
undecodable image file, one over the pixel limit or an out-of-range label fails the running step with a
`tf.errors.InvalidArgumentError` whose message contains one of the markers below and names the file or
record. A graph op can raise nothing but TensorFlow's error types, so the marker text is the contract:
pipeline.py (and segmentation's data and augment) build each check's message as one string starting
with one of `MARKERS`, and `bad_input_message` is the only reader.
"""

import re

import tensorflow as tf

UNDECODABLE_IMAGE = "Undecodable image file (empty, not an image, or truncated):"
IMAGE_TOO_LARGE = "Image over the pixel limit:"  # a header declaring more than max_image_pixels
LABEL_OUT_OF_RANGE = "Label out of range"
BAD_SEGMENTATION_INPUT = "Bad segmentation input:"  # segmentation/data.py and augment.py's checks
BAD_DETECTION_INPUT = "Bad detection input:"  # detection/data.py's checks
SKIP_CURE = "(remove the file, or skip such files with --skip_corrupt)"  # how a message about a bad file ends

MARKERS = (
    UNDECODABLE_IMAGE, IMAGE_TOO_LARGE, LABEL_OUT_OF_RANGE, BAD_SEGMENTATION_INPUT, BAD_DETECTION_INPUT
)


def bad_input_message(error):
    """The pipeline's own one-line message in `error` (our sentence and the file or record, without
    TensorFlow's iterator path), or None when `error` is not one of the pipeline's input checks (then it is
    not the data's fault and should keep its traceback)."""
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return None
    for line in (error.message or str(error)).splitlines():
        starts = [line.find(marker) for marker in MARKERS if marker in line]
        if starts:  # tf.debugging.Assert prints each part inside [...]; assert_* ops print the message bare
            message = line[min(starts) :].rstrip().removesuffix("]")
            return re.sub(r"\]\s*\[", " ", message).strip()
    return None
