"""The paper's image preprocessing (Section 2.1) as pure TensorFlow ops.

Training (Section 2.1, steps 1-7, the "baseline training procedure"):
  1. decode; random resized crop (area fraction in [0.08, 1], aspect ratio in [3/4, 4/3]); resize to S;
  2. horizontal flip with probability 0.5;
  3. colour jitter: brightness, contrast and saturation, each scaled by a coefficient from U[0.6, 1.4];
  4. PCA lighting noise with alpha ~ N(0, 0.1);
  5. normalise with the ImageNet RGB mean and standard deviation.
Validation: resize the shorter side to S / 0.875 (256 for 224), centre crop S, normalise.

Every random op takes an explicit stateless `seed` (an int32/int64 tensor of shape [2]) and has a
deterministic twin that takes the random draw itself (`flip_left_right`, `apply_color_jitter`, `lighting`),
so the same seed gives the same result eagerly and inside `tf.data`, and the math is testable on exact
numbers. Images are float32 on the 0-255 scale between the crop and `normalize`.

Where we follow the authors' code (GluonCV `transforms.RandomColorJitter` / `RandomLighting`, used by the
paper's ImageNet training script) rather than the paper's text:
  * the paper lists "hue, saturation and brightness" jitter; the authors' training script jitters
    brightness, contrast and saturation (each 0.4, i.e. U[0.6, 1.4]) in random order — we do the same;
  * contrast and saturation blend towards the ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B): contrast
    towards the image's mean luma, saturation towards each pixel's luma; values are not clipped between
    steps (GluonCV does not clip either). Unclipped, the three are linear and keep the mean luma, so they
    commute: the random order (kept, to mirror the reference) changes only float rounding;
  * the eigen-values/vectors are the ones in GluonCV (0-255 scale here; GluonCV applies eigval / 255 to
    images in [0, 1], which is the same offset).
The crop is drawn by `tf.image.sample_distorted_bounding_box`, which draws the aspect ratio uniformly and
then the crop *height* uniformly within the area bounds (GluonCV draws the area uniformly); bounds, attempts
and the centre-crop fallback are the paper's / torchvision's.
"""

import math

import tensorflow as tf

# Section 2.1 step 7: ImageNet RGB mean and standard deviation on the 0-255 scale.
MEAN_RGB = (123.68, 116.779, 103.939)
STD_RGB = (58.393, 57.12, 57.375)

# Section 2.1 step 6 (AlexNet's PCA lighting, with GluonCV's values): eigen-values and eigen-vectors of the
# RGB pixel covariance of ImageNet, 0-255 scale. Rows are R, G, B; column j is eigen-vector j.
PCA_EIGVAL = (55.46, 4.794, 1.148)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
LIGHTING_STD = 0.1

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
JITTER_STRENGTH = 0.4  # coefficients from U[1 - 0.4, 1 + 0.4] = U[0.6, 1.4]
EVAL_CROP_FRACTION = 0.875  # 224 / 256

LUMA_RGB = (0.299, 0.587, 0.114)

# The six orders in which brightness (0), contrast (1) and saturation (2) can be applied.
_JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TAIL_BYTES = 4096  # how far from the end a JPEG's end-of-image marker (or PNG's IEND) may sit


# ----------------------------------------------------------------------------------------------- decoding


def _split_seed(seed, count):
    """`count` independent stateless seeds from one; int64 always, so a Python [3, 4] (int32) and a tf.data
    int64 seed give the same draws."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def is_jpeg(encoded):
    """True when `encoded` starts with the JPEG start-of-image marker (whatever the file is named)."""
    return tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)


def decode_image(encoded):
    """Decodes JPEG, PNG, BMP or (the first frame of) GIF bytes to uint8 [H, W, 3].

    Grayscale images are replicated to three channels and CMYK JPEGs converted to RGB (the JPEG decoder
    does both when asked for 3 channels); 16-bit PNGs are scaled to 8 bits.
    """
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _bytes_window(encoded, start, length):
    """`length` bytes of `encoded` from `start` (negative: from the end) as uint8, zero-padded if short."""
    pad = tf.constant(b"\x00" * length)
    if start >= 0:
        window = tf.strings.substr(tf.strings.join([encoded, pad]), start, length)
    else:
        window = tf.strings.substr(tf.strings.join([pad, encoded]), start, length)
    return tf.io.decode_raw(window, tf.uint8)


def _contains(haystack, needle):
    """Whether the uint8 vector `haystack` contains the byte string `needle` (a Python bytes)."""
    n = len(needle)
    length = tf.shape(haystack)[0] - n + 1
    match = tf.ones([length], tf.bool)
    for i, byte in enumerate(needle):
        match &= tf.equal(haystack[i : i + length], byte)
    return tf.reduce_any(match)


def check_encoded_image(encoded):
    """Cheap framing check of encoded image bytes: True when they look like a complete image.

    Looks only at the first and last few kilobytes (microseconds, no decoding): a JPEG must start with the
    start-of-image marker and have its end-of-image marker (FF D9) in its last 4 KiB, a PNG its signature
    and IEND chunk, a GIF its signature and trailer, a BMP its signature and a declared size no larger than
    the data. Catches zero-byte files, text or other non-images, and truncated files, so that the pipeline
    can name the file (or skip it) instead of failing later inside the decoder with no file name.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    size = tf.strings.length(encoded)
    head = _bytes_window(encoded, 0, 8)
    tail = _bytes_window(encoded, -_TAIL_BYTES, _TAIL_BYTES)
    head_str = tf.strings.substr(encoded, 0, 8)

    jpeg_ok = is_jpeg(encoded) & _contains(tail, b"\xff\xd9")
    png_ok = tf.equal(head_str, _PNG_MAGIC) & _contains(tail, b"IEND")
    gif_ok = tf.equal(tf.strings.substr(encoded, 0, 4), b"GIF8") & _contains(tail[-16:], b";")
    bmp_size = tf.reduce_sum(tf.cast(head[2:6], tf.int64) * tf.constant([1, 256, 65536, 16777216], tf.int64))
    bmp_ok = tf.equal(tf.strings.substr(encoded, 0, 2), b"BM") & (bmp_size <= tf.cast(size, tf.int64))
    return (size > 16) & (jpeg_ok | png_ok | gif_ok | bmp_ok)


# -------------------------------------------------------------------------------------- random resized crop


def center_crop_window(image_hw, aspect_range=CROP_ASPECT_RANGE):
    """The largest centred window whose aspect ratio (width / height) is clamped into `aspect_range`.

    This is the random resized crop's fallback after all attempts fail (torchvision's rule). Returns int32
    [offset_y, offset_x, height, width].
    """
    hw = tf.cast(image_hw, tf.float32)
    height, width = hw[0], hw[1]
    ratio = width / height
    crop_w = tf.where(ratio > aspect_range[1], tf.round(height * aspect_range[1]), width)
    crop_h = tf.where(ratio < aspect_range[0], tf.round(width / aspect_range[0]), height)
    crop_h = tf.clip_by_value(crop_h, 1.0, height)
    crop_w = tf.clip_by_value(crop_w, 1.0, width)
    window = tf.stack([(height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w])
    return tf.cast(window, tf.int32)


def sample_crop_window(
    image_hw,
    seed,
    *,
    area_range=CROP_AREA_RANGE,
    aspect_range=CROP_ASPECT_RANGE,
    max_attempts=CROP_ATTEMPTS,
):
    """Section 2.1 step 2: a random crop window of an image of height and width `image_hw`.

    Up to `max_attempts` draws of an aspect ratio (width / height) in `aspect_range` and an area fraction in
    `area_range` (`tf.image.stateless_sample_distorted_bounding_box`); when all fail, the centred window of
    `center_crop_window`. Returns int32 [offset_y, offset_x, height, width].
    """
    image_hw = tf.cast(image_hw, tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([image_hw, [3]], axis=0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.concat([begin[:2], size[:2]], axis=0)
    # The op returns the whole image when every attempt failed; a whole image whose aspect ratio is inside
    # the range is also a valid draw, and there the fallback window *is* the whole image, so replacing
    # every whole-image result by the fallback changes only the failures.
    is_whole = tf.reduce_all(tf.equal(size[:2], image_hw))
    return tf.where(is_whole, center_crop_window(image_hw, aspect_range), window)


def _resize(image, image_size):
    """Bilinear resize to [image_size, image_size] without antialiasing (as GluonCV/OpenCV), float32 out."""
    return tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=False)


def crop_and_resize(image, window, image_size):
    """Crops the int32 window [offset_y, offset_x, height, width] and resizes to a float32 [S, S, 3]."""
    crop = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])
    return _resize(crop, image_size)


def random_resized_crop(image, image_size, seed, **crop_kwargs):
    """Random resized crop of a decoded image [H, W, 3] to float32 [S, S, 3] (0-255 scale)."""
    window = sample_crop_window(tf.shape(image)[:2], seed, **crop_kwargs)
    return crop_and_resize(image, window, image_size)


def decode_and_random_resized_crop(encoded, image_size, seed, *, fused=True, **crop_kwargs):
    """Decodes and randomly crops encoded image bytes to float32 [S, S, 3] (0-255 scale).

    For JPEG with `fused=True`, the window is drawn from the header's shape (`extract_jpeg_shape`) and
    `tf.image.decode_and_crop_jpeg` decodes only the crop, which is what keeps ImageNet-sized inputs fast
    (see tools/bench_input.py). Other formats, and JPEG with `fused=False`, are fully decoded first. Both
    paths draw the same window for the same seed; their pixels can differ slightly where the crop starts
    at an odd column or row (libjpeg's chroma upsampling of a cropped scanline), which is invisible on photos.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)

    def fused_jpeg():
        window = sample_crop_window(tf.io.extract_jpeg_shape(encoded)[:2], seed, **crop_kwargs)
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        return _resize(crop, image_size)

    def decode_then_crop():
        return random_resized_crop(decode_image(encoded), image_size, seed, **crop_kwargs)

    if not fused:
        return decode_then_crop()
    return tf.cond(is_jpeg(encoded), fused_jpeg, decode_then_crop)


# -------------------------------------------------------------------------------------------------- flip


def flip_left_right(image, flip):
    """Mirrors [H, W, C] left-right when the boolean `flip` is true."""
    return tf.cond(tf.convert_to_tensor(flip), lambda: tf.reverse(image, axis=[1]), lambda: image)


def random_flip(image, seed, probability=0.5):
    """Section 2.1 step 3: horizontal flip with probability 0.5."""
    return flip_left_right(image, tf.random.stateless_uniform([], seed) < probability)


# ---------------------------------------------------------------------------------------- colour jitter


def _luma(image):
    return tf.tensordot(image, tf.constant(LUMA_RGB, image.dtype), axes=[[-1], [0]])[..., None]


def adjust_brightness(image, factor):
    """Scales every value by `factor` (GluonCV's brightness jitter is multiplicative)."""
    return image * factor


def adjust_contrast(image, factor):
    """Blends the image with its mean luma: factor * image + (1 - factor) * mean(luma)."""
    mean_luma = tf.reduce_mean(_luma(image))
    return image * factor + (1.0 - factor) * mean_luma


def adjust_saturation(image, factor):
    """Blends each pixel with its own luma: factor * pixel + (1 - factor) * luma(pixel)."""
    return image * factor + (1.0 - factor) * _luma(image)


def apply_color_jitter(image, factors, order):
    """Brightness, contrast and saturation with `factors` [3], applied in the order `_JITTER_ORDERS[order]`.

    Each of the three maps an image y to f*y + (1-f)*T(y), with T the identity (brightness), the mean luma
    (contrast) or the per-pixel luma (saturation); composed in any order they stay of the form
    P*x + Q*luma(x) + R*mean_luma(x). We compose the three scalar coefficients in the drawn order and touch
    the pixels once — the same values as running `adjust_*` one after the other (tests check both), at a
    third of the cost.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    factors = tf.cast(factors, tf.float32)
    orders = tf.constant(_JITTER_ORDERS, tf.int32)[order]
    p, q, r = tf.constant(1.0), tf.constant(0.0), tf.constant(0.0)
    for position in range(3):
        op = orders[position]
        f = tf.gather(factors, op)
        # y = p x + q l + r m has luma (p + q) l + r m and mean luma (p + q + r) m.
        contrast_r = f * r + (1 - f) * (p + q + r)
        saturation_q, saturation_r = f * q + (1 - f) * (p + q), f * r + (1 - f) * r
        q = tf.where(op == 2, saturation_q, f * q)
        r = tf.where(op == 1, contrast_r, tf.where(op == 2, saturation_r, f * r))
        p = f * p
    luma = _luma(image)
    return p * image + q * luma + r * tf.reduce_mean(luma)


def color_jitter(image, seed, strength=JITTER_STRENGTH):
    """Section 2.1 step 4, as the authors' code: brightness/contrast/saturation ~ U[1-s, 1+s], any order."""
    factor_seed, order_seed = _split_seed(seed, 2)
    factors = tf.random.stateless_uniform([3], factor_seed, 1.0 - strength, 1.0 + strength)
    order = tf.random.stateless_uniform([], order_seed, 0, len(_JITTER_ORDERS), dtype=tf.int32)
    return apply_color_jitter(image, factors, order)


# ------------------------------------------------------------------------------------------ PCA lighting


def lighting_offset(alpha):
    """The RGB offset eigvec · (alpha ⊙ eigval) for a draw `alpha` [3] (0-255 scale)."""
    eigvec = tf.constant(PCA_EIGVEC, tf.float32)
    eigval = tf.constant(PCA_EIGVAL, tf.float32)
    return tf.linalg.matvec(eigvec, tf.cast(alpha, tf.float32) * eigval)


def lighting(image, alpha):
    """Adds the PCA lighting offset for `alpha` [3] to every pixel of a float [.., 3] image."""
    return image + lighting_offset(alpha)


def random_lighting(image, seed, std=LIGHTING_STD):
    """Section 2.1 step 6: PCA lighting noise with alpha ~ N(0, std) per eigen-vector (std = 0.1)."""
    return lighting(image, std * tf.random.stateless_normal([3], seed))


# ------------------------------------------------------------------------------------- normalise, eval


def normalize(image):
    """Section 2.1 step 7: (image - mean) / std per RGB channel, float32 out."""
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def eval_resize_size(image_size):
    """The shorter side before the centre crop: ceil(S / 0.875) (256 for 224; GluonCV's rounding)."""
    return int(math.ceil(image_size / EVAL_CROP_FRACTION - 1e-9))


def resize_shorter_side(image, size):
    """Bilinear resize keeping the aspect ratio so that the shorter side is `size` (float32 out)."""
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(hw)
    new_hw = tf.cast(tf.maximum(tf.round(hw * scale), size), tf.int32)
    return tf.image.resize(image, new_hw, method="bilinear", antialias=False)


def center_crop(image, size):
    """The central [size, size] window of an image at least `size` on each side."""
    hw = tf.shape(image)[:2]
    top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
    return tf.slice(image, [top, left, 0], [size, size, -1])


def preprocess_for_eval(image, image_size):
    """Validation transform (Section 2.1): uint8 [H, W, 3] → normalised float32 [S, S, 3].

    Shorter side to ceil(S / 0.875), centre crop S, normalise. The exported models' serving signature uses
    this same function.
    """
    image = resize_shorter_side(image, eval_resize_size(image_size))
    image = center_crop(image, image_size)
    image = normalize(image)
    image.set_shape([image_size, image_size, 3])
    return image


def preprocess_for_train(
    encoded,
    image_size,
    seed,
    *,
    random_crop=True,
    fused_crop=True,
    flip=True,
    jitter=True,
    pca_lighting=True,
):
    """Training transform (Section 2.1 steps 2-7) of encoded bytes → normalised float32 [S, S, 3].

    Each step can be switched off for ablations; with `random_crop=False` the image is resized and centre
    cropped as for validation. One stateless `seed` [2] determines every draw.
    """
    crop_seed, flip_seed, jitter_seed, lighting_seed = _split_seed(seed, 4)
    if random_crop:
        image = decode_and_random_resized_crop(encoded, image_size, crop_seed, fused=fused_crop)
    else:
        image = center_crop(
            resize_shorter_side(decode_image(encoded), eval_resize_size(image_size)), image_size
        )
    if flip:
        image = random_flip(image, flip_seed)
    if jitter:
        image = color_jitter(image, jitter_seed)
    if pca_lighting:
        image = random_lighting(image, lighting_seed)
    image = normalize(image)
    image.set_shape([image_size, image_size, 3])
    return image
