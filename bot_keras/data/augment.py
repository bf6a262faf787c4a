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
The crop (`sample_crop_window`, sampler "paper", the default) draws what the authors' code draws (MXNet's
`random_size_crop`, like torchvision's `RandomResizedCrop`): an area fraction uniform in [0.08, 1] and an
aspect ratio (width / height) log-uniform in [3/4, 4/3], width and height rounded to pixels, boxes that do not
fit the image rejected, 10 attempts (drawn at once), then a centre crop (torchvision's fallback) when none
fits; the offset is uniform over the positions where the box fits. Sampler "tf" is
`tf.image.stateless_sample_distorted_bounding_box` (TF Model Garden's choice): it draws the aspect ratio
uniformly, then the height uniformly within what the area bounds allow, so its areas skew small and it
almost never falls back.

Steps 4-7 (jitter, lighting, normalise) are one affine map of each pixel's RGB (a 3x3 matrix and an offset;
see `color_and_normalize`), applied in one pass after the resize; the step-by-step functions are kept as
the readable definition and tests check that the two agree.

Where they run (`Augmentation.on`, the trainer's `--augment_on`): "host" runs every step per image in the
tf.data map; "device" (the trainer's default) stops the map after the flip with uint8 images, and the
compiled train step runs steps 4-7 on the whole batch (`augment_batch_on_device`: `draw_color_params`
draws each image's factors, order and lighting alpha from the same distributions, `color_and_normalize_batch`
applies them), where an accelerator does the per-pixel float work for free and the host sends a quarter of
the bytes. The batched functions follow `color_and_normalize`, their per-image twin.

Beyond the paper, `Augmentation.randaugment` adds RandAugment (`randaugment.py`) right after the flip, per
image on uint8 pixels, on the host in both modes (timm's order: crop, flip, RandAugment, colour, normalise).
"""

import dataclasses
import math

import tensorflow as tf

from bot_keras.data import randaugment as randaugment_ops
from bot_keras.data.decode import decode_image, is_jpeg

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
CROP_SAMPLERS = ("paper", "tf")
AUGMENT_ON = ("host", "device")  # where jitter, lighting and normalisation run (`Augmentation.on`)
JITTER_STRENGTH = 0.4  # coefficients from U[1 - 0.4, 1 + 0.4] = U[0.6, 1.4]
EVAL_CROP_FRACTION = 0.875  # 224 / 256

LUMA_RGB = (0.299, 0.587, 0.114)

RANDAUGMENT_STREAM = 1  # RandAugment's per-image seed: the image's seed folded with this

# The six orders in which brightness (0), contrast (1) and saturation (2) can be applied.
_JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


# ------------------------------------------------------------------------------------------------ switches


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Section 2.1's training steps, one switch each (the defaults are the paper's baseline)."""

    random_crop: bool = True  # step 2; off: resize and centre crop as for validation
    fused_crop: bool = True  # decode only the crop of a JPEG (same draws, faster); off: decode, then crop
    flip: bool = True  # step 3
    color_jitter: bool = True  # step 4 (brightness, contrast, saturation as the authors' code)
    pca_lighting: bool = True  # step 6
    crop_area_range: tuple = CROP_AREA_RANGE  # the crop's area fraction; a milder low end suits 32 px images
    crop_sampler: str = "paper"  # "paper": the authors' distribution; "tf": TensorFlow's bounding-box sampler
    # "host": every step in the tf.data map, float32 out; "device": the map crops, resizes and flips (uint8
    # out) and the train step runs jitter, lighting and normalisation batched (`augment_batch_on_device`)
    on: str = "host"
    # Beyond the paper: RandAugment (num_ops, magnitude) after the flip, per image on the host in both
    # modes (`randaugment.randaugment`); None: off
    randaugment: tuple | None = None

    def __post_init__(self):
        area = tuple(float(a) for a in self.crop_area_range)
        if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
            raise ValueError(
                f"crop_area_range must satisfy 0 < low <= high <= 1; got {tuple(self.crop_area_range)!r}."
            )
        object.__setattr__(self, "crop_area_range", area)
        if self.crop_sampler not in CROP_SAMPLERS:
            raise ValueError(f"crop_sampler must be one of {CROP_SAMPLERS}; got {self.crop_sampler!r}.")
        if self.on not in AUGMENT_ON:
            raise ValueError(f"on must be one of {AUGMENT_ON}; got {self.on!r}.")
        if self.randaugment is not None:
            top = randaugment_ops.MAX_MAGNITUDE
            values = tuple(self.randaugment)
            if not (len(values) == 2 and all(isinstance(v, int) for v in values)
                    and values[0] >= 0 and 0 <= values[1] <= top):
                raise ValueError(
                    f"randaugment must be None or integers (num_ops >= 0, magnitude in [0, {top}]); got "
                    f"{self.randaugment!r}."
                )
            object.__setattr__(self, "randaugment", tuple(self.randaugment))


def _split_seed(seed, count):
    """`count` independent stateless seeds from one; int64 always, so a Python [3, 4] (int32) and a tf.data
    int64 seed give the same draws."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.unstack(tf.random.experimental.stateless_split(seed, count, alg="philox"))


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
    sampler="paper",
):
    """Section 2.1 step 2: a random crop window of an image of height and width `image_hw`.

    `sampler="paper"`: `max_attempts` boxes of area fraction ~ U[area_range] and aspect ratio (width /
    height) ~ exp(U[log aspect_range]), sides rounded to pixels; the first that fits, at an offset uniform
    over where it fits; when none fits, the centred window of `center_crop_window`. `sampler="tf"`:
    `tf.image.stateless_sample_distorted_bounding_box` with the same bounds and fallback. Returns int32
    [offset_y, offset_x, height, width].
    """
    if sampler == "tf":
        return _sample_window_tf(image_hw, seed, area_range, aspect_range, max_attempts)
    if sampler != "paper":
        raise ValueError(f"sampler must be one of {CROP_SAMPLERS}; got {sampler!r}.")
    hw = tf.cast(image_hw, tf.float32)
    # All attempts in one draw: rows are area fraction, log aspect, offset y, offset x (uniform [0, 1)).
    # Few, vector-wide ops: in a tf.data map each op costs microseconds whatever its size.
    u = tf.random.stateless_uniform([4, max_attempts], tf.cast(seed, tf.int64))
    area = (area_range[0] + (area_range[1] - area_range[0]) * u[0]) * (hw[0] * hw[1])
    log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    log_aspect = log_low + (log_high - log_low) * u[1]
    # Rows: height = sqrt(area / aspect), width = sqrt(area * aspect), rounded to pixels.
    sides = tf.round(tf.sqrt(area * tf.exp(tf.stack([-log_aspect, log_aspect]))))
    fits = tf.reduce_all((sides >= 1) & (sides <= hw[:, None]), axis=0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # the first that fits (0 if none)
    size = sides[:, first]
    offset = tf.minimum(tf.floor(u[2:, first] * (hw - size + 1)), hw - size)
    window = tf.cast(tf.concat([offset, size], 0), tf.int32)
    return tf.cond(fits[first], lambda: window, lambda: center_crop_window(image_hw, aspect_range))


def _sample_window_tf(image_hw, seed, area_range, aspect_range, max_attempts):
    """TensorFlow's sampler (aspect uniform, then height uniform within the area bounds) + our fallback."""
    image_hw = tf.cast(image_hw, tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([image_hw, [3]], axis=0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=tf.cast(seed, tf.int64),
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


def decode_and_random_resized_crop(encoded, image_size, seed, *, fused=True, image_hw=None, **crop_kwargs):
    """Decodes and randomly crops encoded image bytes to float32 [S, S, 3] (0-255 scale).

    For JPEG with `fused=True`, the window is drawn from the header's shape (`extract_jpeg_shape`) and
    `tf.image.decode_and_crop_jpeg` decodes only the crop, which is what keeps ImageNet-sized inputs fast
    (see tools/bench_input.py). Other formats, and JPEG with `fused=False`, are fully decoded first. Both
    paths draw the same window for the same seed; their pixels can differ slightly where the crop starts
    at an odd column or row (libjpeg's chroma upsampling of a cropped scanline), which is invisible on photos.
    `image_hw`: the [height, width] the header declares (`decode.read_headers`), where the pipeline has read
    it: the fused path then draws the window without the decoder's own header read.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)

    def fused_jpeg():
        hw = tf.io.extract_jpeg_shape(encoded)[:2] if image_hw is None else tf.cast(image_hw, tf.int32)
        window = sample_crop_window(hw, seed, **crop_kwargs)
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


def jitter_coefficients(factors, order):
    """(p, q, r) such that brightness, contrast and saturation with `factors` [3], applied in the order
    `_JITTER_ORDERS[order]`, map an image x to p * x + q * luma(x) + r * mean(luma(x)).

    Each of the three maps y to f*y + (1-f)*T(y), with T the identity (brightness), the mean luma (contrast)
    or the per-pixel luma (saturation); composed in any order they keep that form, so we compose three
    scalar coefficients in the drawn order instead of touching the pixels three times. Batched too:
    `factors` [B, 3] and `order` [B] give coefficients [B] (the device path's one draw per image).
    """
    factors = tf.cast(factors, tf.float32)
    orders = tf.gather(tf.constant(_JITTER_ORDERS, tf.int32), order)  # [3] or [B, 3]
    p, q, r = tf.constant(1.0), tf.constant(0.0), tf.constant(0.0)
    for position in range(3):
        op = orders[..., position]
        # factors[op] per image; the one-hot product is exact (x * 1 + 0 + 0).
        f = tf.reduce_sum(factors * tf.one_hot(op, 3), axis=-1)
        # y = p x + q l + r m has luma (p + q) l + r m and mean luma (p + q + r) m.
        contrast_r = f * r + (1 - f) * (p + q + r)
        saturation_q, saturation_r = f * q + (1 - f) * (p + q), f * r + (1 - f) * r
        q = tf.where(op == 2, saturation_q, f * q)
        r = tf.where(op == 1, contrast_r, tf.where(op == 2, saturation_r, f * r))
        p = f * p
    return p, q, r


def apply_color_jitter(image, factors, order):
    """Brightness, contrast and saturation with `factors` [3], applied in the order `_JITTER_ORDERS[order]`:
    the same values as running `adjust_*` one after the other (tests check both)."""
    image = tf.convert_to_tensor(image, tf.float32)
    p, q, r = jitter_coefficients(factors, order)
    luma = _luma(image)
    return p * image + q * luma + r * tf.reduce_mean(luma)


def _jitter_draws(seed, strength=JITTER_STRENGTH):
    factor_seed, order_seed = _split_seed(seed, 2)
    factors = tf.random.stateless_uniform([3], factor_seed, 1.0 - strength, 1.0 + strength)
    order = tf.random.stateless_uniform([], order_seed, 0, len(_JITTER_ORDERS), dtype=tf.int32)
    return factors, order


def color_jitter(image, seed, strength=JITTER_STRENGTH):
    """Section 2.1 step 4, as the authors' code: brightness/contrast/saturation ~ U[1-s, 1+s], any order."""
    return apply_color_jitter(image, *_jitter_draws(seed, strength))


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


def _per_channel_affine(image, scale, offset):
    """image * scale + offset with RGB vectors `scale` (None: 1) and `offset` [3], computed on a [..., W * 3]
    view of the image: TensorFlow broadcasts over a trailing axis of W * 3 values several times faster than
    over one of 3 (tools/bench_input.py; normalising a 224 px image the plain way costs about as much as
    decoding it)."""
    shape = tf.shape(image)
    width = shape[-2]
    flat = tf.reshape(image, [-1, width * 3])
    if scale is not None:
        flat = flat * tf.tile(scale, [width])
    flat = flat + tf.tile(offset, [width])
    return tf.reshape(flat, shape)


# Plain tensor code: not converted by AutoGraph (why: the note above pipeline.check_example).
@tf.autograph.experimental.do_not_convert
def normalize(image):
    """Section 2.1 step 7: (image - mean) / std per RGB channel, float32 out."""
    image = tf.cast(image, tf.float32)
    scale = 1.0 / tf.constant(STD_RGB)
    return _per_channel_affine(image, scale, -tf.constant(MEAN_RGB) * scale)


def color_and_normalize(image, jitter=None, lighting_alpha=None):
    """Steps 4, 6 and 7 in one pass: normalize(lighting(apply_color_jitter(image, *jitter), alpha)).

    `jitter` is (factors [3], order) or None (off), `lighting_alpha` [3] or None (off); image float32
    [H, W, 3]. Jitter maps x to p x + q luma(x) + r mean_luma(x), a 3x3 matrix (p I + q w 1^T, w the luma
    weights) and an offset, since the mean luma is that of the image's mean colour; lighting adds an offset
    and normalising is a diagonal map: the whole chain is x M + b, one matrix product per pixel (or, with
    jitter off, a per-channel scale and offset).
    """
    image = tf.convert_to_tensor(image, tf.float32)
    inv_std = 1.0 / tf.constant(STD_RGB)
    offset = -tf.constant(MEAN_RGB)
    if lighting_alpha is not None:
        offset += lighting_offset(lighting_alpha)
    if jitter is None:
        return _per_channel_affine(image, inv_std, offset * inv_std)
    p, q, r = jitter_coefficients(*jitter)
    luma_weights = tf.constant(LUMA_RGB)
    shape = tf.shape(image)
    pixels = tf.reshape(image, [-1, 3])
    # The mean colour from a [H, W * 3] view (a reduction over a trailing axis of 3 is slow, see above).
    mean_rgb = tf.reduce_mean(tf.reshape(tf.reduce_mean(tf.reshape(image, [shape[0], -1]), 0), [-1, 3]), 0)
    offset += r * tf.tensordot(mean_rgb, luma_weights, 1)
    matrix = p * tf.eye(3) + q * luma_weights[:, None] * tf.ones([1, 3])
    out = tf.reshape(tf.matmul(pixels, matrix * inv_std[None, :]), shape)
    return _per_channel_affine(out, None, offset * inv_std)


# --------------------------------------------------------------------- the same steps, batched on the device


def to_uint8(image):
    """A float image with values in [0, 255] rounded (halves up) to uint8: what the host hands the
    accelerator under `on="device"` (a quarter of float32's bytes; the rounding moves a pixel by at most
    0.5, 0.009 of a normalised unit). Every caller passes a bilinear resize of uint8 pixels, whose values
    are convex combinations of them and so lie in [0, 255]: no clip is spent (one pass fewer per pixel,
    ~0.1 ms an image at 224 px in tools/bench_input.py)."""
    return tf.cast(image + 0.5, tf.uint8)


def draw_color_params(seed, batch_size, *, color_jitter=True, pca_lighting=True, strength=JITTER_STRENGTH):
    """One independent draw per image for `color_and_normalize_batch`: (jitter, lighting_alpha), where
    jitter = (factors [B, 3] ~ U[1-s, 1+s], order [B] uniform over the six orders) and lighting_alpha
    [B, 3] ~ N(0, 0.1), each None when switched off. The distributions of `color_jitter` and
    `random_lighting`; stateless from `seed` [2], Philox everywhere (under XLA "auto" would differ)."""
    factor_seed, order_seed, lighting_seed = _split_seed(seed, 3)
    jitter = alpha = None
    if color_jitter:
        factors = tf.random.stateless_uniform(
            [batch_size, 3], factor_seed, 1.0 - strength, 1.0 + strength, alg="philox")
        order = tf.random.stateless_uniform(
            [batch_size], order_seed, 0, len(_JITTER_ORDERS), dtype=tf.int32, alg="philox")
        jitter = (factors, order)
    if pca_lighting:
        alpha = LIGHTING_STD * tf.random.stateless_normal([batch_size, 3], lighting_seed, alg="philox")
    return jitter, alpha


@tf.autograph.experimental.do_not_convert
def color_and_normalize_batch(images, jitter=None, lighting_alpha=None):
    """`color_and_normalize` of every image of a batch [B, H, W, 3] (uint8 or float, 0-255) with its own
    parameters: jitter (factors [B, 3], order [B]) or None, lighting_alpha [B, 3] or None. Float32 out.

    The same affine map per image, x M_b + b_b: one batched [H·W, 3] × [3, 3] product (tests check it
    against `color_and_normalize` image by image).
    """
    images = tf.cast(images, tf.float32)
    inv_std = 1.0 / tf.constant(STD_RGB)
    offset = -tf.constant(MEAN_RGB)[None, :]  # [1 or B, 3]
    if lighting_alpha is not None:
        offset += lighting_offset(lighting_alpha)  # matvec broadcasts over the batch: [B, 3]
    if jitter is None:
        return images * inv_std + (offset * inv_std)[:, None, None, :]
    p, q, r = jitter_coefficients(*jitter)  # [B] each
    luma_weights = tf.constant(LUMA_RGB)
    shape = tf.shape(images)
    # Each image's mean colour, reduced in the order `color_and_normalize` reduces it.
    rows = tf.reduce_mean(tf.reshape(images, [shape[0], shape[1], -1]), axis=1)
    mean_rgb = tf.reduce_mean(tf.reshape(rows, [shape[0], -1, 3]), axis=1)
    offset += r[:, None] * tf.linalg.matvec(mean_rgb, luma_weights)[:, None]
    matrix = p[:, None, None] * tf.eye(3) + q[:, None, None] * (luma_weights[:, None] * tf.ones([1, 3]))
    pixels = tf.reshape(images, [shape[0], -1, 3])
    out = tf.matmul(pixels, matrix * inv_std) + (offset * inv_std)[:, None, :]
    return tf.reshape(out, shape)


@tf.autograph.experimental.do_not_convert
def augment_batch_on_device(images, seed, augmentation=Augmentation(on="device")):
    """Section 2.1 steps 4, 6 and 7 for a uint8 batch [B, S, S, 3] that `make_dataset` cropped, resized
    and flipped on the host (`augmentation.on == "device"`): jitter and lighting as `augmentation` switches
    them, drawn per image from `seed` [2] (`draw_color_params`), then normalisation; float32 out.

    Runs inside the compiled train step, on each replica's batch. With every switch off it is `normalize`.
    """
    if images.dtype != tf.uint8:
        raise ValueError(
            f"augment_batch_on_device takes the uint8 batches of make_dataset(augmentation.on='device'); "
            f"got {images.dtype.name} images."
        )
    jitter, alpha = draw_color_params(
        seed,
        tf.shape(images)[0],
        color_jitter=augmentation.color_jitter,
        pca_lighting=augmentation.pca_lighting,
    )
    return color_and_normalize_batch(images, jitter, alpha)


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


@tf.autograph.experimental.do_not_convert
def preprocess_for_eval(image, image_size, *, on="host"):
    """Validation transform (Section 2.1): uint8 [H, W, 3] → normalised float32 [S, S, 3].

    Shorter side to ceil(S / 0.875), centre crop S, normalise. The exported models' serving signature uses
    this same function. `on="device"` stops before normalising and returns uint8 (`to_uint8`): the
    evaluation step normalises the batch.
    """
    image = resize_shorter_side(image, eval_resize_size(image_size))
    image = center_crop(image, image_size)
    image = to_uint8(image) if on == "device" else normalize(image)
    image.set_shape([image_size, image_size, 3])
    return image


@tf.autograph.experimental.do_not_convert
def preprocess_for_train(encoded, image_size, seed, augmentation=Augmentation(), image_hw=None):
    """Training transform (Section 2.1 steps 2-7) of encoded bytes → normalised float32 [S, S, 3].

    `augmentation` switches steps off for ablations and picks the crop's area range and sampler; with
    `random_crop=False` the image is resized and centre cropped as for validation. With
    `augmentation.randaugment` (beyond the paper), RandAugment follows the flip, on uint8 pixels. One
    stateless `seed` [2] determines every draw. With `augmentation.on == "device"` it stops after the flip
    (and RandAugment) and returns uint8 [S, S, 3] (the same crop and flip for the same seed);
    `augment_batch_on_device` does the rest. `image_hw`: the header's [height, width], where the pipeline
    has read it (`decode_and_random_resized_crop`).
    """
    crop_seed, flip_seed, jitter_seed, lighting_seed = _split_seed(seed, 4)
    if augmentation.random_crop:
        image = decode_and_random_resized_crop(
            encoded,
            image_size,
            crop_seed,
            fused=augmentation.fused_crop,
            area_range=augmentation.crop_area_range,
            sampler=augmentation.crop_sampler,
            image_hw=image_hw,
        )
    else:
        image = center_crop(
            resize_shorter_side(decode_image(encoded), eval_resize_size(image_size)), image_size
        )
    if augmentation.on == "device":
        image = to_uint8(image)  # flipping a quarter of the bytes; the train step does steps 4-7
    if augmentation.flip:
        image = random_flip(image, flip_seed)
    if augmentation.randaugment:
        # timm's order: crop, flip, RandAugment, then colour and normalisation. A seed folded from the
        # image's (not a fifth split: the four draws above stay what they were without RandAugment).
        num_ops, magnitude = augmentation.randaugment
        randaugment_seed = tf.random.experimental.stateless_fold_in(
            tf.cast(seed, tf.int64), RANDAUGMENT_STREAM, alg="philox"
        )
        pixels = image if image.dtype == tf.uint8 else to_uint8(image)  # its ops work on uint8, as timm's
        pixels = randaugment_ops.randaugment(pixels, randaugment_seed, num_ops=num_ops, magnitude=magnitude)
        image = pixels if augmentation.on == "device" else tf.cast(pixels, tf.float32)
    if augmentation.on == "device":
        image.set_shape([image_size, image_size, 3])
        return image
    image = color_and_normalize(
        image,
        jitter=_jitter_draws(jitter_seed) if augmentation.color_jitter else None,
        lighting_alpha=LIGHTING_STD * tf.random.stateless_normal([3], lighting_seed)
        if augmentation.pca_lighting
        else None,
    )
    image.set_shape([image_size, image_size, 3])
    return image
