"""RandAugment: each op on exact numbers (numpy and PIL, which timm's ops call), the magnitude table, the
per-image draws and their deterministic twin, tf.data against eager, the flag, and make_dataset."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from bot_keras import cli, finetune, train
from bot_keras.classification import task as classification
from bot_keras.data import augment, make_dataset
from bot_keras.data import randaugment as ra

FILL = np.array(ra.FILL_RGB)
INDEX = {name: i for i, name in enumerate(ra.OP_NAMES)}


def random_image(height=12, width=10, seed=0):
    """uint8 noise with one channel squeezed into [6, 76] (so auto-contrast and equalize have work)."""
    image = np.random.default_rng(seed).integers(20, 230, (height, width, 3), dtype=np.uint8)
    image[..., 1] //= 3
    return image


# ------------------------------------------------------------------------------- each op on exact numbers


def test_lookup_table_ops_by_hand():
    image = np.array([[[50, 0, 7], [100, 255, 7]], [[150, 128, 7], [100, 127, 7]]], np.uint8)
    # auto-contrast: channel 0 spans [50, 150] → 0, 127 (= int(127.5)), 255; channel 2 is constant: kept.
    out = ra.auto_contrast(image).numpy()
    np.testing.assert_array_equal(out[..., 0], [[0, 127], [255, 127]])
    np.testing.assert_array_equal(out[..., 1], image[..., 1])  # already spans [0, 255]
    np.testing.assert_array_equal(out[..., 2], 7)
    # solarize at 128: values >= 128 inverted; at 256 nothing is.
    np.testing.assert_array_equal(ra.solarize(image, 128).numpy()[..., 1], [[0, 0], [127, 127]])
    np.testing.assert_array_equal(ra.solarize(image, 256).numpy(), image)
    # solarize_add: +99 below 128, clipped at 255; 128 and above unchanged.
    np.testing.assert_array_equal(ra.solarize_add(image, 99).numpy()[..., 1], [[99, 255], [128, 226]])
    # posterize keeps the high bits: 100 = 0b01100100 → 1 bit: 0, 3 bits: 96; 0 bits: black.
    assert ra.posterize(image, 1).numpy()[0, 1, 0] == 0 and ra.posterize(image, 3).numpy()[0, 1, 0] == 96
    assert ra.posterize(image, 1).numpy()[1, 0, 0] == 128
    assert not ra.posterize(image, 0).numpy().any()
    np.testing.assert_array_equal(ra.invert(image).numpy(), 255 - image)


def equalize_reference(channel):
    """PIL's `ImageOps.equalize` look-up for one uint8 channel, in numpy."""
    hist = np.bincount(channel.ravel(), minlength=256)
    used = hist[hist > 0]
    step = (used.sum() - used[-1]) // 255
    if len(used) <= 1 or step == 0:
        return channel
    lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step, 255)
    return lut[channel].astype(np.uint8)


def test_equalize_and_autocontrast_match_numpy_references():
    image = random_image(40, 30)
    expected = np.stack([equalize_reference(image[..., c]) for c in range(3)], -1)
    np.testing.assert_array_equal(ra.equalize(image).numpy(), expected)
    assert not np.array_equal(expected, image)  # the reference did equalize
    lo, hi = image.min((0, 1)), image.max((0, 1))
    stretched = np.clip(np.floor(image * (255.0 / (hi - lo)) - lo * (255.0 / (hi - lo))), 0, 255)
    np.testing.assert_array_equal(ra.auto_contrast(image).numpy(), stretched.astype(np.uint8))


PIL_OPS = [
    ("auto_contrast", None, ImageOps.autocontrast),
    ("equalize", None, ImageOps.equalize),
    ("invert", None, ImageOps.invert),
    *[("posterize", bits, lambda im, b=bits: ImageOps.posterize(im, b)) for bits in (1, 3, 4)],
    *[("solarize", t, lambda im, t=t: ImageOps.solarize(im, t)) for t in (26, 128, 256)],
    ("solarize_add", 99, lambda im: im.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3)),
    *[
        (name, factor, lambda im, n=enhancer, f=factor: n(im).enhance(f))
        for name, enhancer in (("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
                               ("brightness", ImageEnhance.Brightness),
                               ("sharpness", ImageEnhance.Sharpness))
        for factor in (0.19, 0.55, 1.81)
    ],
]


def test_colour_ops_equal_pil_bit_for_bit():
    image = random_image(40, 30)  # equalize leaves images under 255 pixels (a step of 0) alone
    for name, argument, pil_op in PIL_OPS:
        ours = ra.OPS[name](image) if argument is None else ra.OPS[name](image, argument)
        theirs = np.asarray(pil_op(Image.fromarray(image)))
        np.testing.assert_array_equal(ours.numpy(), theirs, err_msg=f"{name}({argument})")
        assert argument in (1.0, 256) or not np.array_equal(theirs, image), name  # each op did something


def test_rotate_by_right_angles_and_integer_translation_are_exact():
    image = random_image(6, 6)
    np.testing.assert_array_equal(ra.rotate(image, 90).numpy(), np.rot90(image, 1))  # counter-clockwise
    np.testing.assert_array_equal(ra.rotate(image, -90).numpy(), np.rot90(image, -1))
    np.testing.assert_array_equal(ra.rotate(image, 180).numpy(), np.rot90(image, 2))
    shifted = np.broadcast_to(FILL, image.shape).copy()
    shifted[:, :-2] = image[:, 2:]  # +2 px: the output at x shows the input at x + 2, fill on the right
    np.testing.assert_array_equal(ra.translate_x(image, 2.0).numpy(), shifted)
    shifted = np.broadcast_to(FILL, image.shape).copy()
    shifted[1:] = image[:-1]  # -1 px: the content moves down one row
    np.testing.assert_array_equal(ra.translate_y(image, -1.0).numpy(), shifted)


def pil_affine(image, matrix):
    return np.asarray(Image.fromarray(image).transform(
        (image.shape[1], image.shape[0]), Image.AFFINE, matrix, resample=Image.BILINEAR,
        fillcolor=ra.FILL_RGB))


@pytest.mark.parametrize("name, argument", [("rotate", 27.0), ("rotate", -13.0), ("shear_x", 0.27),
                                            ("shear_y", -0.13), ("translate_x", 2.5)])
def test_geometry_matches_pil_where_pil_samples_inside_the_image(name, argument):
    """PIL (timm's ops) against ours where both sample between four pixels of the image; along the edge
    PIL clamps the neighbours and TensorFlow blends the fill colour in (module docstring)."""
    size = 24
    image = random_image(size, size)
    y, x = np.mgrid[0:size, 0:size] + 0.5  # PIL's pixel centres
    if name == "rotate":
        pil = np.asarray(Image.fromarray(image).rotate(argument, resample=Image.BILINEAR,
                                                       fillcolor=ra.FILL_RGB))
        angle = -np.radians(argument)
        c, s, centre = np.cos(angle), np.sin(angle), size / 2
        x_in = c * (x - centre) + s * (y - centre) + centre
        y_in = -s * (x - centre) + c * (y - centre) + centre
    else:
        matrix = {"shear_x": (1, argument, 0, 0, 1, 0), "shear_y": (1, 0, 0, argument, 1, 0),
                  "translate_x": (1, 0, argument, 0, 1, 0)}[name]
        pil = pil_affine(image, matrix)
        a, b, c, d, e, f = matrix
        x_in, y_in = a * x + b * y + c, d * x + e * y + f
    inside = ((x_in - 0.5 >= 0) & (x_in - 0.5 <= size - 1) & (y_in - 0.5 >= 0) & (y_in - 0.5 <= size - 1))
    diff = np.abs(ra.OPS[name](image, argument).numpy().astype(int) - pil)[inside]
    assert inside.sum() > size * size / 3
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02  # float32 against PIL's double, then truncation
    assert (np.abs(pil.astype(int) - image)[inside] > 1).mean() > 0.5  # the op did move the pixels


# ------------------------------------------------------------------------------------ magnitudes and draws


def test_magnitude_table_is_timms_increasing_one():
    at = {name: ra.op_argument(name, 9) for name in ra.OP_NAMES}
    assert at == pytest.approx({
        "auto_contrast": None, "equalize": None, "invert": None, "rotate": 27.0, "posterize": 1,
        "solarize": 26, "solarize_add": 99, "color": 0.81, "contrast": 0.81, "brightness": 0.81,
        "sharpness": 0.81, "shear_x": 0.27, "shear_y": 0.27, "translate_x": 0.405, "translate_y": 0.405,
    })
    assert ra.op_argument("posterize", 0) == 4 and ra.op_argument("posterize", 10) == 0
    assert ra.op_argument("solarize", 0) == 256 and ra.op_argument("rotate", 10) == 30.0
    assert len(ra.OP_NAMES) == 15


def test_the_twin_applies_the_drawn_ops_in_order_at_the_magnitude():
    image = random_image(16, 16)
    ops = [INDEX["solarize"], INDEX["rotate"], INDEX["contrast"]]
    out = ra.apply_ops(image, ops, [True, True, False], [False, True, False], 9).numpy()
    expected = ra.rotate(ra.solarize(image, 26), -27.0).numpy()  # negated: clockwise
    np.testing.assert_array_equal(out, expected)
    # A negated enhance op: factor 1 - 0.81; not applied: unchanged.
    out = ra.apply_ops(image, [INDEX["color"], INDEX["invert"]], [True, False], [True, True], 9).numpy()
    np.testing.assert_array_equal(out, ra.color(image, 1 - 0.81).numpy())
    # Translation is a fraction of the side: 0.405 x 16 = 6.48 px at M = 9.
    out = ra.apply_op(image, INDEX["translate_y"], 9).numpy()
    np.testing.assert_array_equal(out, ra.translate_y(image, 0.405 * 16).numpy())


def test_randaugment_is_its_twin_on_the_drawn_ops_and_draws_n_ops():
    image = random_image(16, 16)
    for seed in ([1, 2], [3, 4], [5, 6]):
        ops, applied, negate = ra.draw_ops(seed, 3)
        assert ops.shape == applied.shape == negate.shape == (3,)
        np.testing.assert_array_equal(
            ra.randaugment(image, seed, num_ops=3, magnitude=9).numpy(),
            ra.apply_ops(image, ops, applied, negate, 9).numpy(),
        )


def test_draws_are_uniform_over_ops_and_half_applied_half_negated():
    count, num_ops = 3000, 2
    seeds = tf.stack([tf.range(count, dtype=tf.int64), tf.fill([count], tf.constant(11, tf.int64))], 1)
    ops, applied, negate = tf.vectorized_map(lambda s: ra.draw_ops(s, num_ops), seeds)
    ops, applied, negate = ops.numpy(), applied.numpy(), negate.numpy()
    n = count * num_ops
    counts = np.bincount(ops.ravel(), minlength=15)
    assert counts.sum() == n and len(counts) == 15
    chi2 = ((counts - n / 15) ** 2 / (n / 15)).sum()
    assert chi2 < 36.1  # 14 degrees of freedom, p = 0.001
    for rate in (applied.mean(), negate.mean()):
        assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / n)
    # The two ops of one image are independent draws (with replacement, as timm's).
    assert abs((ops[:, 0] == ops[:, 1]).mean() - 1 / 15) < 4 * np.sqrt((1 / 15) * (14 / 15) / count)


def test_every_op_is_the_same_eagerly_and_inside_tf_data():
    image = random_image(16, 16)
    cases = [(i, negate) for i in range(len(ra.OP_NAMES)) for negate in (False, True)]
    eager = np.stack([ra.apply_op(image, i, 9, negate).numpy() for i, negate in cases])
    ds = tf.data.Dataset.from_tensor_slices(([c[0] for c in cases], [c[1] for c in cases]))
    inside = np.stack(list(ds.map(lambda i, n: ra.apply_op(image, i, 9, n)).as_numpy_iterator()))
    np.testing.assert_array_equal(eager, inside)  # (the make_dataset test checks whole draws in tf.data)


def test_negative_controls_n0_and_m0():
    image = random_image(16, 16)
    np.testing.assert_array_equal(ra.randaugment(image, [1, 2], num_ops=0, magnitude=9).numpy(), image)
    identity_at_zero = ("rotate", "solarize", "solarize_add", "color", "contrast", "brightness",
                        "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
    for name in identity_at_zero:
        for negate in (False, True):
            np.testing.assert_array_equal(ra.apply_op(image, INDEX[name], 0, negate).numpy(), image)
        assert not np.array_equal(ra.apply_op(image, INDEX[name], 9).numpy(), image), name
    # Posterize keeps 4 bits at M = 0 (timm's increasing scale): not the identity.
    assert not np.array_equal(ra.apply_op(image, INDEX["posterize"], 0).numpy(), image)
    with pytest.raises(ValueError, match="uint8"):
        ra.apply_op(image.astype(np.float32), 0, 9)


# ------------------------------------------------------------------------------------------------ the flag


def test_parse_and_augmentation_of_the_flag(parse, tmp_path):
    assert ra.parse_randaugment("") is None and ra.parse_randaugment(" 2, 9 ") == (2, 9)
    base = ["--model=resnet18_d", "--dataset=synthetic", f"--model_dir={tmp_path / 'run'}"]
    assert classification.augmentation(parse(*base)).randaugment is None  # off by default
    f = parse(*base, "--randaugment=2,9")
    train.validate_flags(f)
    assert classification.augmentation(f).randaugment == (2, 9)
    # The fine-tuning command shares the classifier's flags.
    tuned = finetune.parse_flags(["--task=classification", "--randaugment=3,5"])
    assert classification.augmentation(tuned).randaugment == (3, 5)
    with pytest.raises(ValueError, match="randaugment"):
        augment.Augmentation(randaugment=(2, 11))


@pytest.mark.parametrize("value", ["2", "2,x", "0,9", "2,11", "2,-1", "1,2,3"])
def test_bad_randaugment_exits_2_with_one_line_echoing_it(tmp_path, capsys, value):
    argv = ["--model=resnet18_d", "--dataset=synthetic", f"--model_dir={tmp_path / 'run'}",
            f"--randaugment={value}"]
    with pytest.raises(SystemExit) as exit_info:
        cli.call(train.main, train.define_flags, argv, command=train.COMMAND)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--randaugment={value!r}" in err[0], err


# ------------------------------------------------------------------------------------------- make_dataset


def element_seeds(seed, count):
    """The per-image seeds make_dataset pairs with its first `count` training examples."""
    ds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2).take(count)
    return [s for s in ds.as_numpy_iterator()]


def test_make_dataset_applies_randaugment_per_image_after_the_crop_and_flip(tmp_path):
    # Ten copies of one PNG: whatever the shuffle, example i is that image with the i-th per-image seed.
    png = tmp_path / "one.png"
    Image.fromarray(random_image(20, 24)).save(png)
    for i in range(10):
        (tmp_path / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / f"c{i % 2}" / f"{i}.png").write_bytes(png.read_bytes())
    kwargs = dict(split="train", image_size=16, global_batch_size=8, training=True, seed=3)

    def first_batch(**augmentation):
        ds = make_dataset(f"folder:{tmp_path}", augmentation=augment.Augmentation(**augmentation), **kwargs)
        return next(iter(ds))[0].numpy()

    randaugmented = first_batch(on="device", randaugment=(2, 9))
    # Each image is RandAugment (its own draws) of the crop and flip that the default pipeline (RandAugment
    # off) draws from the same seed, computed here eagerly.
    changed, expected = 0, []
    for i, seed in enumerate(element_seeds(3, 8)):
        plain = augment.preprocess_for_train(png.read_bytes(), 16, seed, augment.Augmentation(on="device"))
        ra_seed = tf.random.experimental.stateless_fold_in(seed, augment.RANDAUGMENT_STREAM, alg="philox")
        ops, applied, negate = ra.draw_ops(ra_seed, 2)
        expected.append(ra.apply_ops(plain, ops, applied, negate, 9).numpy())
        np.testing.assert_array_equal(randaugmented[i], expected[-1])
        changed += not np.array_equal(randaugmented[i], plain.numpy())
    assert changed >= 3  # P(an image has no op applied) = 1/4
    assert len({e.tobytes() for e in expected}) == 8  # per image: no two alike
    # The host path gives the same pixels, as floats through the rest of Section 2.1 (here: normalise).
    host = first_batch(on="host", randaugment=(2, 9), color_jitter=False, pca_lighting=False)
    np.testing.assert_allclose(host, augment.normalize(np.stack(expected)).numpy(), atol=1e-5)
