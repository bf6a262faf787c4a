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


# Plain tensor code: not converted by AutoGraph (why: the note above pipeline.check_example).
@tf.autograph.experimental.do_not_convert
def decode_image(encoded):
    """Decodes JPEG, PNG, BMP or (the first frame of) GIF bytes to uint8 [H, W, 3].

    Grayscale images are replicated to three channels and CMYK JPEGs converted to RGB (the JPEG decoder
    does both when asked for 3 channels); 16-bit PNGs are scaled to 8 bits.
    """
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _bytes(encoded, offset, count):
    """int32 [N, count]: `count` bytes of each string of `encoded` [N] from its `offset` [N] (or a scalar),
    zeros past its end. Only the bytes read are copied, never a whole file."""
    piece = _substr(encoded, tf.minimum(offset, tf.strings.length(encoded)), count)
    piece = tf.strings.substr(tf.strings.join([piece, b"\x00" * count]), 0, count)
    return tf.cast(tf.io.decode_raw(piece, tf.uint8), tf.int32)


def _substr(strings, offset, count):
    """`tf.strings.substr` with a scalar length for an offset per string (the op wants equal shapes)."""
    return tf.strings.substr(strings, offset, tf.fill(tf.shape(offset), count))


def _number(head, start, count, *, big):
    """int64 [N]: the unsigned `count`-byte integer at column `start` of the byte rows `head` [N, K]."""
    weights = [256 ** (count - 1 - i) if big else 256**i for i in range(count)]
    return tf.reduce_sum(tf.cast(head[:, start : start + count], tf.int64) * weights, axis=1)


def _contains(encoded, marker, where):
    """bool [N]: whether the bytes `marker` occur in `encoded` [N], searched only where `where` [N] is true
    (a byte search of whole files: regexes want valid UTF-8) and only when it is true anywhere."""

    def search():
        rows = tf.where(where)
        found = tf.strings.split(tf.gather_nd(encoded, rows), sep=marker).row_lengths() > 1
        return tf.scatter_nd(rows, found, tf.shape(where, tf.int64))

    return tf.cond(tf.reduce_any(where), search, lambda: tf.zeros_like(where))


# The JPEG header walk: the kind of segment each marker byte starts (a table, so that one gather classifies
# a whole batch), the bytes each kind moves the walk on (a segment also by its length field), and the
# fields that 9 bytes at a marker hold (a [9, 5] matrix: one matmul reads them for the batch).
_SEGMENT, _FRAME, _STANDALONE, _FILL, _STOP = range(5)
_JPEG_KIND = np.full(256, _SEGMENT, np.int32)
_JPEG_KIND[_JPEG_SOF] = _FRAME
_JPEG_KIND[_JPEG_STANDALONE] = _STANDALONE
_JPEG_KIND[0xFF] = _FILL  # fill bytes before a marker
_JPEG_KIND[[0xDA, 0xD9]] = _STOP  # start of scan (no frame header before it), end of image
_JPEG_STEP = [2, 0, 2, 1, 0]  # + the length field for _SEGMENT
_JPEG_FIELDS = np.zeros([9, 5], np.int32)  # -> [0xFF?, marker, length, height, width], big-endian
for _column, _positions in enumerate([(0,), (1,), (2, 3), (5, 6), (7, 8)]):
    for _i, _position in enumerate(_positions):
        _JPEG_FIELDS[_position, _column] = 256 ** (len(_positions) - 1 - _i)
# Segments walked without a loop: a real file reaches its frame header within 3-8 (APPn, DQT, SOF); a loop
# goes on for files with more, up to _JPEG_MAX_SEGMENTS.
_JPEG_UNROLLED = 6


def _jpeg_shapes(encoded, size, jpeg):
    """int32 [N, 2]: [height, width] of each JPEG's first start-of-frame segment, walking the segments
    before it by their lengths, all images of the batch at once; [-1, -1] when the markers do not lead to
    one before the scan or the end of the data, and for the images that are not JPEGs."""
    fields_of = tf.constant(_JPEG_FIELDS)
    kind_of, step_of = tf.constant(_JPEG_KIND), tf.constant(_JPEG_STEP)

    def walk(offset, shape, done):
        fields = tf.matmul(_bytes(encoded, offset, 9), fields_of)
        length = fields[:, 2]
        kind = tf.gather(kind_of, fields[:, 1])
        with_length = (kind == _SEGMENT) | (kind == _FRAME)
        broken = (fields[:, 0] != 0xFF) | (offset + 4 > size) | (with_length & (length < 2))
        kind = tf.where(broken | done, _STOP, kind)
        found = kind == _FRAME
        step = tf.gather(step_of, kind) + tf.where(kind == _SEGMENT, length, 0)
        return offset + step, tf.where(found[:, None], fields[:, 3:5], shape), done | found | (kind == _STOP)

    state = (tf.fill(tf.shape(size), 2), -tf.ones([tf.size(size), 2], tf.int32), ~jpeg)
    for _ in range(_JPEG_UNROLLED):
        state = walk(*state)

    def go_on():
        return tf.while_loop(lambda offset, shape, done: ~tf.reduce_all(done), walk, state,
                             maximum_iterations=_JPEG_MAX_SEGMENTS - _JPEG_UNROLLED)[1]

    return tf.cond(tf.reduce_all(state[2]), lambda: state[1], go_on)


# Traced once per process, whichever pipeline, serving graph or eager call asks first: its few hundred ops
# took ~0.4 s to trace on a 2-core CPU, for every dataset a process built (a tf.data map calls the traced
# function; a SavedModel that calls it stores it with the signature, for TensorFlow alone to load).
@tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
def read_headers(encoded):
    """(shape int64 [N, 2], complete bool [N]) of a batch [N] of encoded images, from their headers and
    ends, without decoding, every image of the batch in the same few ops (a per-image graph of many small
    ops costs more than decoding the crop; tools/bench_input.py). `shape`: see `image_shape`; `complete`:
    see `check_encoded_image`."""
    size = tf.strings.length(encoded)
    head = _bytes(encoded, 0, 32)

    def starts_with(magic):
        return tf.reduce_all(tf.equal(head[:, : len(magic)], list(magic)), axis=1)

    jpeg, png, gif, bmp = (starts_with(m) for m in (JPEG_MAGIC, PNG_MAGIC, b"GIF8", b"BM"))
    png_shape = tf.stack([_number(head, 20, 4, big=True), _number(head, 16, 4, big=True)], axis=1)
    ihdr = tf.reduce_all(tf.equal(head[:, 12:16], list(b"IHDR")), axis=1)
    png_shape = tf.where(ihdr[:, None], png_shape, tf.constant(-1, tf.int64))
    gif_shape = tf.stack([_number(head, 8, 2, big=False), _number(head, 6, 2, big=False)], axis=1)
    core = _number(head, 14, 4, big=False) == 12  # BITMAPCOREHEADER: 16-bit fields
    bmp_height = tf.where(core, _number(head, 20, 2, big=False), _number(head, 22, 4, big=False))
    bmp_height = tf.where(~core & (bmp_height >= 2**31), 2**32 - bmp_height, bmp_height)  # negative: top-down
    bmp_width = tf.where(core, _number(head, 18, 2, big=False), _number(head, 18, 4, big=False))
    jpeg_shape = tf.cast(_jpeg_shapes(encoded, size, jpeg), tf.int64)
    shape = tf.where(
        jpeg[:, None], jpeg_shape, tf.where(
            png[:, None], png_shape, tf.where(
                gif[:, None], gif_shape, tf.where(
                    bmp[:, None], tf.stack([bmp_height, bmp_width], axis=1), tf.constant(-1, tf.int64)))))

    # The ends: JPEG's end-of-image marker and PNG's IEND at the end (one comparison) or, for files with
    # trailing bytes, anywhere; a GIF's trailer ';' in its last 16 bytes; a BMP's declared size.
    def ends_with(marker, end_offset):
        at = tf.maximum(size - end_offset, 0)
        return tf.equal(_substr(encoded, at, len(marker)), marker)

    jpeg_end, png_end = jpeg & ends_with(JPEG_END, 2), png & ends_with(PNG_END, 8)
    jpeg_end |= _contains(encoded, JPEG_END, jpeg & ~jpeg_end)
    png_end |= _contains(encoded, PNG_END, png & ~png_end)
    tail = _bytes(encoded, tf.maximum(size - GIF_TAIL_BYTES, 0), GIF_TAIL_BYTES)
    gif_end = gif & tf.reduce_any(tf.equal(tail, ord(";")), axis=1)
    bmp_end = bmp & (_number(head, 2, 4, big=False) <= tf.cast(size, tf.int64))
    complete = (size > 16) & (jpeg_end | png_end | gif_end | bmp_end) & tf.reduce_all(shape > 0, axis=1)
    return shape, complete


@tf.autograph.experimental.do_not_convert
def read_header(encoded):
    """`read_headers` of one image: (shape int64 [2], complete bool)."""
    shape, complete = read_headers(tf.reshape(tf.convert_to_tensor(encoded, tf.string), [1]))
    return shape[0], complete[0]


@tf.autograph.experimental.do_not_convert
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
    and damage inside the data; the decoder is the judge of those. A batch: `read_headers`.
    """
    return read_header(encoded)[1]


@tf.autograph.experimental.do_not_convert
def image_shape(encoded):
    """[height, width] (int64) that the header of JPEG, PNG, GIF or BMP bytes declares, read without
    decoding; [-1, -1] when the bytes are none of these or the header cannot be read.

    JPEG: the first start-of-frame segment (the segments before it are skipped by their lengths); PNG: the
    IHDR chunk; GIF: the logical screen (what TensorFlow's decoder allocates per frame); BMP: the info
    header (a negative height, a top-down bitmap, counts by its magnitude). A batch: `read_headers`.
    """
    return read_header(encoded)[0]


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
        shapes[start : start + len(heads)] = read_headers(tf.constant(heads, tf.string))[0].numpy()
    for i in np.flatnonzero((shapes <= 0).any(axis=1)):  # cut inside the header: read the whole file
        if tf.io.gfile.stat(paths[i]).length > header_bytes:
            shapes[i] = image_shape(tf.io.read_file(paths[i])).numpy()
    return np.where((shapes <= 0).any(axis=1, keepdims=True), -1, shapes)


@tf.autograph.experimental.do_not_convert
def within_pixel_limit(encoded, max_pixels, shape=None):
    """True when the header's height × width (`image_shape`, or `shape` where the caller has it) is at most
    `max_pixels`, or cannot be read (then the framing check or the decoder judges the file). No decoding:
    safe on decompression bombs."""
    shape = image_shape(encoded) if shape is None else shape  # [2], or [N, 2] for a batch
    unread = tf.reduce_any(shape < 0, axis=-1)
    return unread | (shape[..., 0] * shape[..., 1] <= tf.cast(max_pixels, tf.int64))


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


@tf.autograph.experimental.do_not_convert
def too_large_description(encoded, max_pixels, shape=None):
    """A string tensor 'HxW = N pixels, over the limit of M' for an image `within_pixel_limit` refuses."""
    shape = image_shape(encoded) if shape is None else shape
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
    shape, complete = read_headers(flat)
    fits = within_pixel_limit(flat, max_pixels, shape)

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
