"""Encoded image bytes: which format they are, whether they look complete, and decoding them.

The framing check names a broken file before the decoder fails on it without a name (the decoder's own
errors carry no file name): the pipeline asserts it with the file's key, or skips the file.
"""

import tensorflow as tf

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"  # the end-of-image marker
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND"
GIF_TAIL_BYTES = 16  # how far from the end a GIF's trailer byte ';' may sit


def is_jpeg(encoded):
    """True when `encoded` starts with the JPEG start-of-image marker (whatever the file is named)."""
    return tf.equal(tf.strings.substr(encoded, 0, 3), JPEG_MAGIC)


def decode_image(encoded):
    """Decodes JPEG, PNG, BMP or (the first frame of) GIF bytes to uint8 [H, W, 3].

    Grayscale images are replicated to three channels and CMYK JPEGs converted to RGB (the JPEG decoder
    does both when asked for 3 channels); 16-bit PNGs are scaled to 8 bits.
    """
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _contains(encoded, marker):
    """Whether the bytes `marker` occur in `encoded` (a byte search; regexes want valid UTF-8)."""
    return tf.size(tf.strings.split(encoded, sep=marker)) > 1


def _ends_with_or_contains(encoded, marker, end_offset):
    """Whether `marker` sits `end_offset` bytes before the end (the usual place: one cheap comparison) or,
    failing that, anywhere in `encoded` (a search of the whole file, only for files with trailing bytes)."""
    size = tf.strings.length(encoded)
    at_end = tf.equal(tf.strings.substr(encoded, tf.maximum(size - end_offset, 0), len(marker)), marker)
    return tf.cond(at_end, lambda: at_end, lambda: _contains(encoded, marker))


def check_encoded_image(encoded):
    """Cheap framing check of encoded image bytes: True when they look like a complete image.

    No decoding: a JPEG must start with the start-of-image marker and hold an end-of-image marker (FF D9),
    a PNG its signature and an IEND chunk, a GIF its signature and trailer (in its last 16 bytes), a BMP its
    signature and a declared size no larger than the data. The end marker is looked for at the end first and
    then anywhere, since cameras and editors append trailers after it that decoders ignore. Catches
    zero-byte files, text or other non-images, and files cut short, so that the pipeline can name the file
    (or skip it) instead of failing inside the decoder with no file name.

    What it cannot see: a file cut short and then given an end marker (the decoder fills the missing rows
    with grey and only logs libjpeg's "Corrupt JPEG data: premature end of data segment", without a file
    name; TensorFlow offers no way to make that warning an error short of decoding the entropy-coded data),
    and damage inside the data; the decoder is the judge of those.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    size = tf.strings.length(encoded)

    def jpeg_ok():
        return _ends_with_or_contains(encoded, JPEG_END, 2)

    def other_ok():
        head = tf.io.decode_raw(tf.strings.substr(tf.strings.join([encoded, b"\x00" * 8]), 0, 8), tf.uint8)
        png = tf.equal(tf.strings.substr(encoded, 0, 8), PNG_MAGIC)
        png_ok = png & tf.cond(png, lambda: _ends_with_or_contains(encoded, PNG_END, 8), lambda: png)
        tail = tf.strings.substr(encoded, tf.maximum(size - GIF_TAIL_BYTES, 0), GIF_TAIL_BYTES)
        gif_ok = tf.equal(tf.strings.substr(encoded, 0, 4), b"GIF8") & _contains(tail, b";")
        bmp_size = tf.reduce_sum(
            tf.cast(head[2:6], tf.int64) * tf.constant([1, 256, 65536, 16777216], tf.int64)
        )
        bmp_ok = tf.equal(tf.strings.substr(encoded, 0, 2), b"BM") & (bmp_size <= tf.cast(size, tf.int64))
        return png_ok | gif_ok | bmp_ok

    return (size > 16) & tf.cond(is_jpeg(encoded), jpeg_ok, other_ok)
