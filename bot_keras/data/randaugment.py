"""RandAugment (Cubuk et al., 2019; beyond the paper) as timm's `rand-mM-nN-inc1`, per image, in tf.data.

Which list: timm's "increasing" RandAugment (`_RAND_INCREASING_TRANSFORMS`, the list of its `inc1`
configs and of the "ResNet strikes back" recipes), fifteen ops whose strength grows with the magnitude M
(0..10, fixed; no magnitude noise):

  auto_contrast, equalize, invert           no argument
  rotate                                    ±30·M/10 degrees (counter-clockwise for +), about the centre
  posterize                                 keep 4 - int(4·M/10) high bits (0 bits at M = 10: black)
  solarize                                  invert pixels >= 256 - int(256·M/10)
  solarize_add                              add int(110·M/10) to pixels < 128 (clipped at 255)
  color, contrast, brightness, sharpness    blend with a degenerate image, factor max(0.1, 1 ± 0.9·M/10)
  shear_x, shear_y                          shear factor ±0.3·M/10 (about the top-left corner, as PIL)
  translate_x, translate_y                  ±0.45·M/10 of the width / height

Per image: N ops drawn uniformly from the fifteen, with replacement; each applied with probability 0.5
(timm's `AugmentOp(prob=0.5)`), and each signed argument (±) negated with probability 0.5; applied in
order, uint8 in and out of every op (as timm's PIL images). `randaugment` draws that from one stateless
seed (`draw_ops`), `apply_ops` is its deterministic twin that takes the draws, and `apply_op` applies one
op; the ops themselves are pure functions of (uint8 image, argument). Only the chosen op runs
(`tf.switch_case`), so an image costs N ops, not fifteen.

Where we follow PIL (what timm's ops call) exactly, and where not:
  * auto_contrast, equalize, posterize, solarize, solarize_add, invert: PIL's look-up tables, bit for bit;
  * color, contrast, brightness, sharpness: PIL's `ImageEnhance` degenerate images (ITU-R 601 luma in
    PIL's fixed point, the rounded mean luma, black, PIL's 3x3 SMOOTH filter with the border kept) and
    `Image.blend`'s float32 arithmetic and truncation, bit for bit;
  * rotate, shear, translate: PIL's affine maps (pixel-centre convention) with bilinear sampling,
    truncated to uint8 as PIL's, and timm's fill colour, the ImageNet mean (124, 116, 104), outside the
    image. Inside the image they agree with PIL to one grey level (float32 here, double in PIL); along the
    edge PIL clamps the bilinear neighbours to the image, while TensorFlow blends the fill colour in, so
    the outermost pixels of the valid region can differ. timm picks bilinear or bicubic at random unless
    an interpolation is configured; we always use bilinear.

In the training pipeline (`augment.preprocess_for_train`) RandAugment runs where timm's transform puts it:
random-resized crop → flip → RandAugment → (jitter, lighting) → normalise → random erasing; on the host in
both `--augment_on` modes, on uint8 images.
"""

import math

import keras
import tensorflow as tf

MAX_MAGNITUDE = 10  # timm's `_LEVEL_DENOM`: M is on a 0..10 scale and clipped to it
APPLY_PROBABILITY = 0.5  # timm's `rand_augment_ops(prob=0.5)`: a chosen op runs half the time
FILL_RGB = (124, 116, 104)  # timm's `img_mean`: the ImageNet mean on 0-255, rounded

_SIGNED = frozenset(
    ("rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
     "translate_y")
)


def parse_randaugment(text):
    """`"N,M"` → (N, M) with integers N >= 1 and 0 <= M <= 10; "" → None (off). ValueError otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        num_ops, magnitude = (int(p) for p in parts)
    except ValueError:
        raise ValueError("must be N,M: the number of ops per image and the magnitude, e.g. 2,9") from None
    if num_ops < 1 or not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"needs N >= 1 ops per image and a magnitude M in [0, {MAX_MAGNITUDE}]")
    return num_ops, magnitude


# --------------------------------------------------------------------------------- colour (look-up tables)


def _apply_lut(image, lut):
    """Maps each channel of a uint8 [H, W, 3] image through its row of `lut` [3, 256] (any integer dtype)."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), index), tf.uint8)


def _histograms(image):
    """int32 [3, 256]: each channel's histogram."""
    index = tf.reshape(tf.cast(image, tf.int32) + tf.constant([0, 256, 512]), [-1])
    return tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])


def auto_contrast(image):
    """Stretches each channel to [0, 255] (PIL `ImageOps.autocontrast`: lut[i] = int(i·s - lo·s), s =
    255 / (hi - lo), in double precision; a constant channel is left alone)."""
    flat = tf.reshape(image, [-1, 3])
    lo = tf.cast(tf.reduce_min(flat, axis=0), tf.float64)[:, None]
    hi = tf.cast(tf.reduce_max(flat, axis=0), tf.float64)[:, None]
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    values = tf.range(256, dtype=tf.float64)[None, :]
    lut = tf.clip_by_value(tf.floor(values * scale - lo * scale), 0.0, 255.0)
    lut = tf.where(hi > lo, lut, values)
    return _apply_lut(image, tf.cast(lut, tf.int32))


def equalize(image):
    """Histogram equalisation per channel (PIL `ImageOps.equalize`): step = (pixels - count of the last
    non-empty bin) // 255, lut[i] = (step // 2 + pixels below i) // step; identity where step is 0."""
    hist = _histograms(image)
    nonzero = hist > 0
    last = 255 - tf.argmax(tf.cast(tf.reverse(nonzero, axis=[1]), tf.int32), axis=1, output_type=tf.int32)
    last_count = tf.gather(hist, last, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # [3]; 0 when one bin holds everything
    below = tf.cumsum(hist, axis=1, exclusive=True)
    safe_step = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((safe_step // 2 + below) // safe_step, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])
    return _apply_lut(image, lut)


def invert(image):
    """255 - x."""
    return tf.constant(255, tf.uint8) - image


def posterize(image, bits):
    """Keeps the `bits` (0..8) high bits of every value (PIL `ImageOps.posterize`)."""
    mask = (0xFF << (8 - int(bits))) & 0xFF
    return tf.bitwise.bitwise_and(image, tf.constant(mask, tf.uint8))


def solarize(image, threshold):
    """Inverts values >= `threshold` (PIL `ImageOps.solarize`; 256: identity)."""
    return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
    """Adds `addition` to values below `threshold`, clipped at 255 (timm's `solarize_add`)."""
    values = tf.cast(image, tf.int32)
    return tf.cast(tf.where(values < threshold, tf.minimum(values + addition, 255), values), tf.uint8)


# --------------------------------------------------------------------------- colour (PIL ImageEnhance)


def _blend(degenerate, image, factor):
    """PIL `Image.blend(degenerate, image, factor)`: d + f·(x - d) in float32, clipped, truncated."""
    degenerate = tf.cast(degenerate, tf.float32)
    mixed = degenerate + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)  # the cast truncates, as PIL's


def _pil_luma(image):
    """PIL's RGB → L conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16, int32 [H, W, 1]."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471
    return tf.bitwise.right_shift(weighted + 0x8000, 16)


def color(image, factor):
    """Saturation (PIL `ImageEnhance.Color`): blends towards each pixel's grey (factor 0: grey, 1: same)."""
    return _blend(_pil_luma(image), image, factor)


def contrast(image, factor):
    """PIL `ImageEnhance.Contrast`: blends towards the image's mean grey, rounded to an integer."""
    mean = tf.floor(tf.reduce_mean(tf.cast(_pil_luma(image), tf.float64)) + 0.5)
    return _blend(tf.cast(mean, tf.float32), image, factor)


def brightness(image, factor):
    """PIL `ImageEnhance.Brightness`: blends towards black (x · factor, truncated)."""
    return _blend(tf.zeros([], tf.float32), image, factor)


def sharpness(image, factor):
    """PIL `ImageEnhance.Sharpness`: blends with the image smoothed by PIL's SMOOTH filter (3x3 kernel
    1 1 1 / 1 5 1 / 1 1 1, over 13, rounded), whose border rows and columns keep the original pixels."""
    values = tf.cast(image, tf.float32)
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    # Integer sums are exact in float32; sum / 13 is never within 1/26 of a half, so rounding is PIL's.
    sums = tf.nn.depthwise_conv2d(values[None], kernel, strides=[1, 1, 1, 1], padding="SAME")[0]
    smooth = tf.floor(sums / 13.0 + 0.5)
    shape = tf.shape(image)
    rows = tf.range(shape[0])[:, None, None]
    columns = tf.range(shape[1])[None, :, None]
    border = (rows == 0) | (rows == shape[0] - 1) | (columns == 0) | (columns == shape[1] - 1)
    return _blend(tf.where(border, values, smooth), image, factor)


# -------------------------------------------------------------------------------------------- geometry


def _pil_affine(image, matrix):
    """PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=FILL_RGB)`: the output
    pixel at (x, y) samples the input at (a x + b y + c, d x + e y + f), in PIL's coordinates where pixel
    centres sit at +0.5; bilinear, truncated to uint8 as PIL's (after a 1e-3 allowance, so that float32
    error cannot turn an exact 200 into 199), the fill colour outside.

    The public `keras.ops.image.affine_transform` (TensorFlow's ImageProjectiveTransformV3 on this backend)
    works in pixel-index coordinates, so the offsets move by half a pixel: x_in = a x + b y + c + (a + b -
    1) / 2. It fills with one scalar; subtracting the fill colour first and adding it back after fills with
    the colour, since bilinear sampling is linear.
    """
    a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
    transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
    fill = tf.constant(FILL_RGB, tf.float32)
    moved = keras.ops.image.affine_transform(
        tf.cast(image, tf.float32) - fill, transform, interpolation="bilinear", fill_mode="constant",
        fill_value=0, data_format="channels_last",
    )
    return tf.cast(tf.clip_by_value(tf.floor(moved + fill + 1e-3), 0.0, 255.0), tf.uint8)


def rotate(image, degrees):
    """Rotates counter-clockwise by `degrees` about the image's centre (PIL `Image.rotate`, no expand)."""
    shape = tf.cast(tf.shape(image), tf.float32)
    centre_x, centre_y = shape[1] / 2.0, shape[0] / 2.0
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # PIL: the matrix [cos, sin; -sin, cos] about the centre (w / 2, h / 2).
    return _pil_affine(image, (
        cos, sin, centre_x - cos * centre_x - sin * centre_y,
        -sin, cos, centre_y + sin * centre_x - cos * centre_y,
    ))


def shear_x(image, factor):
    """PIL affine (1, factor, 0, 0, 1, 0): row y samples the input shifted right by factor · y."""
    return _pil_affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(image, factor):
    """PIL affine (1, 0, 0, factor, 1, 0)."""
    return _pil_affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0))


def translate_x(image, pixels):
    """The output at x shows the input at x + pixels (positive: the content moves left), fill outside."""
    return _pil_affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image, pixels):
    """The output at y shows the input at y + pixels (positive: the content moves up), fill outside."""
    return _pil_affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


OPS = {
    "auto_contrast": auto_contrast,
    "equalize": equalize,
    "invert": invert,
    "rotate": rotate,
    "posterize": posterize,
    "solarize": solarize,
    "solarize_add": solarize_add,
    "color": color,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}
OP_NAMES = tuple(OPS)  # timm's `_RAND_INCREASING_TRANSFORMS` order


# ------------------------------------------------------------------------------------ magnitude → argument


def op_argument(name, magnitude):
    """The argument of op `name` at magnitude M (0..10) before its random sign, as timm's increasing
    `*_level_to_arg` functions (None: the op takes none). Enhance ops return the factor's distance from 1."""
    level = min(max(float(magnitude), 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
    return {
        "rotate": 30.0 * level,
        "posterize": 4 - int(level * 4),
        "solarize": 256 - int(level * 256),
        "solarize_add": int(level * 110),
        "color": 0.9 * level,
        "contrast": 0.9 * level,
        "brightness": 0.9 * level,
        "sharpness": 0.9 * level,
        "shear_x": 0.3 * level,
        "shear_y": 0.3 * level,
        "translate_x": 0.45 * level,
        "translate_y": 0.45 * level,
    }.get(name)


_ENHANCE = ("color", "contrast", "brightness", "sharpness")


def _op_fn(name, magnitude, sign, image):
    """A no-argument function that applies op `name` at `magnitude` to `image`, with `sign` (±1.0, a float
    tensor) on signed arguments."""
    op = OPS[name]
    argument = op_argument(name, magnitude)
    if name in _ENHANCE:
        return lambda: op(image, tf.maximum(0.1, 1.0 + sign * argument))  # timm: max(0.1, 1 ± 0.9 level)
    if name in ("translate_x", "translate_y"):
        size = tf.cast(tf.shape(image)[1 if name == "translate_x" else 0], tf.float32)
        return lambda: op(image, sign * argument * size)  # timm: a fraction of the width (height)
    if name in _SIGNED:
        return lambda: op(image, sign * argument)
    if argument is None:
        return lambda: op(image)
    return lambda: op(image, argument)


# The entry points are plain tensor code (their loops run over Python ints), so tf.data's AutoGraph has
# nothing to convert in them; left to it, converting the fifteen branches takes seconds per pipeline.
@tf.autograph.experimental.do_not_convert
def apply_op(image, index, magnitude, negate=False):
    """Op `OP_NAMES[index]` at `magnitude` on a uint8 [H, W, 3] image; `negate` flips a signed argument.
    `index` may be a tensor (one `tf.switch_case`: only that op runs); -1 returns the image unchanged."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"RandAugment ops take uint8 images; got {image.dtype.name}.")
    sign = tf.where(tf.convert_to_tensor(negate), -1.0, 1.0)
    branches = [_op_fn(name, magnitude, sign, image) for name in OP_NAMES]
    out = tf.switch_case(tf.cast(index, tf.int32), branches, default=lambda: image)
    out.set_shape(image.shape)
    return out


# ------------------------------------------------------------------------------------------ per image


def draw_ops(seed, num_ops):
    """One image's draws from a stateless `seed` [2]: (op indices [N] int32 uniform over `OP_NAMES`, with
    replacement; applied [N] bool, each true with probability 0.5; negate [N] bool, probability 0.5)."""
    op_seed, coin_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2, alg="philox")
    )
    ops = tf.random.stateless_uniform(
        [num_ops], op_seed, 0, len(OP_NAMES), dtype=tf.int32, alg="philox"
    )
    coins = tf.random.stateless_uniform([2, num_ops], coin_seed, alg="philox")
    return ops, coins[0] < APPLY_PROBABILITY, coins[1] < 0.5


@tf.autograph.experimental.do_not_convert
def apply_ops(image, ops, applied, negate, magnitude):
    """The deterministic twin of `randaugment`: for i in 0..N-1, op `ops[i]` at `magnitude` when
    `applied[i]`, its signed argument negated when `negate[i]`; uint8 [H, W, 3] in and out."""
    image = tf.convert_to_tensor(image)
    for i in range(len(ops) if isinstance(ops, list | tuple) else int(ops.shape[0])):
        index = tf.where(tf.convert_to_tensor(applied[i]), tf.cast(ops[i], tf.int32), -1)
        image = apply_op(image, index, magnitude, negate[i])
    return image


@tf.autograph.experimental.do_not_convert
def randaugment(image, seed, *, num_ops, magnitude):
    """RandAugment of one uint8 [H, W, 3] image (module docstring): `num_ops` ops drawn from the stateless
    `seed` [2], each applied with probability 0.5, at `magnitude` (0..10). num_ops = 0 is the identity."""
    if num_ops == 0:
        return tf.convert_to_tensor(image)
    return apply_ops(image, *draw_ops(seed, num_ops), magnitude)
