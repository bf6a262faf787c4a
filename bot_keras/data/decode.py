"""Encoded image bytes: which format they are, whether they look complete, how large they are, decoding.

The framing check names a broken file before the decoder fails on it without a name (the decoder's own
errors carry no file name): the pipeline asserts it with the file's key, or skips the file. The size check
reads the width and height from the header (no decoding) so that a decompression bomb — a small file that
declares a huge image, e.g. a 1 MB PNG of 20000 × 20000 pixels that decodes to 1.2 GB — is refused before
the decoder allocates it.
"""

import numpy as np
import tensorflow as tf

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"  # the end-of-image marker
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND"
GIF_TAIL_BYTES = 16  # how far from the end a GIF's trailer byte ';' may sit

# The default limit on an image's pixels (height × width), Pillow's own default (`PIL.Image.
# MAX_IMAGE_PIXELS`, 1024³ / 4 / 3: a 256 MiB RGB image), which Pillow warns above and refuses at twice.
MAX_IMAGE_PIXELS = 89_478_485
# The largest limit a user may set: TensorFlow's JPEG decoder itself refuses to decode more than 2^29
# bytes (jpeg_mem.cc, "Image too large"), i.e. 2^29 / 3 RGB pixels, with an error that names no file.
MAX_IMAGE_PIXELS_CEILING = 2**29 // 3
# JPEG start-of-frame markers (they carry the image's height and width): C0-CF except C4 (DHT), C8 (JPG
# extension) and CC (DAC); markers without a length field: TEM (01) and RST0-RST7 (D0-D7).
_JPEG_SOF = [m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)]
_JPEG_STANDALONE = [0x01, *range(0xD0, 0xD8)]
_JPEG_MAX_SEGMENTS = 4096  # a bound on the header walk; real files reach their frame header in < 20
# How much of a file `file_image_shapes` reads first: a JPEG's frame header follows its APPn segments (EXIF,
# ICC profile), each at most 64 KiB; a file whose header lies further is read whole.
HEADER_BYTES = 1 << 16


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
    (or skip it) instead of failing inside the decoder with no file name. The header must declare a
    positive height and width (`image_shape`; for a JPEG, a frame header before the scan).

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

    framed = (size > 16) & tf.cond(is_jpeg(encoded), jpeg_ok, other_ok)
    # A header the decoder would reject (no JPEG frame header before the scan, a zero width or height).
    return framed & tf.cond(framed, lambda: tf.reduce_all(image_shape(encoded) > 0), lambda: framed)


def _unsigned(padded, offset, size, *, big):
    """The unsigned integer (int64) of `size` bytes at `offset` of `padded` (zero bytes appended to the data;
    an offset past them reads the last bytes: callers stop at the data's end)."""
    offset = tf.minimum(tf.cast(offset, tf.int64), tf.cast(tf.strings.length(padded), tf.int64) - size)
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, size), tf.uint8), tf.int64)
    weights = [256 ** (size - 1 - i) if big else 256**i for i in range(size)]
    return tf.reduce_sum(raw[:size] * tf.constant(weights, tf.int64))


def _jpeg_shape(padded, size):
    """[height, width] from the first start-of-frame segment, walking the segments before it by their
    lengths; [-1, -1] when the markers do not lead to one before the scan or the end of the data."""
    offset0 = tf.constant(2, tf.int64)
    unknown = tf.constant([-1, -1], tf.int64)

    def walk(offset, shape, done):
        byte0 = _unsigned(padded, offset, 1, big=True)
        marker = _unsigned(padded, offset + 1, 1, big=True)
        length = _unsigned(padded, offset + 2, 2, big=True)
        frame = tf.reduce_any(tf.equal(marker, _JPEG_SOF))
        found = tf.stack([_unsigned(padded, offset + 5, 2, big=True),
                          _unsigned(padded, offset + 7, 2, big=True)])
        fill = tf.equal(marker, 0xFF)  # fill bytes before a marker
        standalone = tf.reduce_any(tf.equal(marker, _JPEG_STANDALONE))
        stop = (
            tf.not_equal(byte0, 0xFF)
            | tf.equal(marker, 0xDA)  # start of scan: no frame header before it
            | tf.equal(marker, 0xD9)  # end of image
            | (offset + 4 > size)
            | (~fill & ~standalone & (length < 2))
        )
        one, two = tf.constant(1, tf.int64), tf.constant(2, tf.int64)
        step = tf.where(fill, one, tf.where(standalone, two, 2 + length))
        shape = tf.where(frame & ~stop, found, unknown)
        return offset + step, shape, stop | frame

    _, shape, _ = tf.while_loop(
        lambda offset, shape, done: ~done,
        walk,
        (offset0, unknown, tf.constant(False)),
        maximum_iterations=_JPEG_MAX_SEGMENTS,
    )
    return shape


def image_shape(encoded):
    """[height, width] (int64) that the header of JPEG, PNG, GIF or BMP bytes declares, read without
    decoding; [-1, -1] when the bytes are none of these or the header cannot be read.

    JPEG: the first start-of-frame segment (the segments before it are skipped by their lengths); PNG: the
    IHDR chunk; GIF: the logical screen (what TensorFlow's decoder allocates per frame); BMP: the info
    header (a negative height, a top-down bitmap, counts by its magnitude).
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    size = tf.cast(tf.strings.length(encoded), tf.int64)
    padded = tf.strings.join([encoded, b"\x00" * 32])

    def png():
        ok = tf.equal(tf.strings.substr(padded, 12, 4), b"IHDR")
        shape = tf.stack([_unsigned(padded, 20, 4, big=True), _unsigned(padded, 16, 4, big=True)])
        return tf.where(ok, shape, [-1, -1])

    def gif():
        return tf.stack([_unsigned(padded, 8, 2, big=False), _unsigned(padded, 6, 2, big=False)])

    def bmp():
        core = tf.equal(_unsigned(padded, 14, 4, big=False), 12)  # BITMAPCOREHEADER: 16-bit fields
        height = tf.where(core, _unsigned(padded, 20, 2, big=False), _unsigned(padded, 22, 4, big=False))
        height = tf.where(~core & (height >= 2**31), 2**32 - height, height)  # int32, negative: top-down
        width = tf.where(core, _unsigned(padded, 18, 2, big=False), _unsigned(padded, 18, 4, big=False))
        return tf.stack([height, width])

    return tf.case(
        [
            (is_jpeg(encoded), lambda: _jpeg_shape(padded, size)),
            (tf.equal(tf.strings.substr(padded, 0, 8), PNG_MAGIC), png),
            (tf.equal(tf.strings.substr(padded, 0, 4), b"GIF8"), gif),
            (tf.equal(tf.strings.substr(padded, 0, 2), b"BM"), bmp),
        ],
        default=lambda: tf.constant([-1, -1], tf.int64),
        exclusive=False,
    )


def file_image_shapes(paths, *, header_bytes=HEADER_BYTES, chunk=256):
    """int64 [N, 2]: the (height, width) each image file's header declares (`image_shape`), without decoding:
    the first `header_bytes` of each file are read (the whole file when its header lies further), `chunk`
    files at a time; -1 where no header can be read (the pipeline's framing check names such a file)."""
    paths = [str(path) for path in paths]
    shapes = np.full([len(paths), 2], -1, np.int64)
    for start in range(0, len(paths), chunk):
        heads = []
        for path in paths[start : start + chunk]:
            with tf.io.gfile.GFile(path, "rb") as f:
                heads.append(f.read(header_bytes))
        shapes[start : start + len(heads)] = _image_shapes(tf.constant(heads, tf.string)).numpy()
    for i in np.flatnonzero((shapes <= 0).any(axis=1)):  # cut inside the header: read the whole file
        if tf.io.gfile.stat(paths[i]).length > header_bytes:
            shapes[i] = image_shape(tf.io.read_file(paths[i])).numpy()
    return np.where((shapes <= 0).any(axis=1, keepdims=True), -1, shapes)


# `image_shape` of a batch of encoded images (traced once, on the first call).
_image_shapes = tf.function(
    lambda encoded: tf.map_fn(image_shape, encoded, fn_output_signature=tf.int64),
    input_signature=[tf.TensorSpec([None], tf.string)],
)


def within_pixel_limit(encoded, max_pixels):
    """True when the header's height × width (`image_shape`) is at most `max_pixels`, or cannot be read
    (then the framing check or the decoder judges the file). No decoding: safe on decompression bombs."""
    shape = image_shape(encoded)
    return tf.reduce_any(shape < 0) | (shape[0] * shape[1] <= tf.cast(max_pixels, tf.int64))


def pixel_limit_problem(max_pixels):
    """Why `max_pixels` cannot be the limit on an image's pixels, or None."""
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or not (
        1 <= max_pixels <= MAX_IMAGE_PIXELS_CEILING
    ):
        return (
            f"must be an integer in [1, {MAX_IMAGE_PIXELS_CEILING}] (TensorFlow's JPEG decoder refuses "
            f"larger images); got {max_pixels!r}"
        )
    return None


def too_large_description(encoded, max_pixels):
    """A string tensor 'HxW = N pixels, over the limit of M' for an image `within_pixel_limit` refuses."""
    shape = image_shape(encoded)
    return tf.strings.join(
        [
            tf.strings.as_string(shape[0]), "x", tf.strings.as_string(shape[1]), " = ",
            tf.strings.as_string(shape[0] * shape[1]), f" pixels, over the limit of {int(max_pixels)}",
        ]
    )


def serving_checks(signature, image_bytes, max_pixels):
    """The assertions an exported signature runs (under `tf.control_dependencies`) before it decodes
    `image_bytes` (a scalar or a batch [N]): not an empty batch, every entry a complete image, and every
    header within `max_pixels` pixels, so a decompression bomb is refused without allocating its decoded
    size. The messages name `signature` and the failing batch indices."""
    flat = tf.reshape(image_bytes, [-1])
    complete = tf.map_fn(check_encoded_image, flat, fn_output_signature=tf.bool)
    fits = tf.map_fn(lambda e: within_pixel_limit(e, max_pixels), flat, fn_output_signature=tf.bool)

    def failing(ok):
        return tf.reshape(tf.where(tf.logical_not(ok)), [-1])

    return [
        tf.debugging.Assert(tf.size(flat) > 0, [f"{signature}: got an empty batch; send at least one image"]),
        tf.debugging.Assert(tf.reduce_all(complete), [
            f"{signature}: image_bytes entries at these batch indices are not complete JPEG, PNG, GIF or BMP "
            "images:", failing(complete),
        ]),
        tf.debugging.Assert(tf.reduce_all(fits), [
            f"{signature}: image_bytes entries at these batch indices declare more than {int(max_pixels)} "
            "pixels (height x width; the export's max_image_pixels):", failing(fits),
        ]),
    ]
