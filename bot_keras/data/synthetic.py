"""The built-in `synthetic[:N]` source: 10 classes of procedural textures, 64 px JPEGs, offline and exact.

N training images (default 5000) and N // 5 validation images, the same bytes on every machine (a numpy
seed per split), for demos and tests that must not download anything.
"""

import functools

import numpy as np
import tensorflow as tf

from bot_keras.data import augment

CLASSES = (
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "rings",
    "dots",
    "grid_lines",
    "diamonds",
    "speckle",
    "gradient",
)
IMAGE_SIZE = 64
TRAIN_EXAMPLES = 5000
_SPLIT_SEEDS = {"train": 0, "validation": 1}


def split_size(argument, split):
    """Examples in `split` for the source argument N of 'synthetic[:N]' (N training, N // 5 validation)."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(
            f"The synthetic dataset has splits {sorted(_SPLIT_SEEDS)}; got split {split!r}."
        )
    train = int(argument) if argument else TRAIN_EXAMPLES
    return train if split == "train" else max(train // 5, 10)


def texture_image(label, rng, size=IMAGE_SIZE):
    """One uint8 [size, size, 3] image of texture class `label`, drawn with the numpy Generator `rng`.

    Class identity is a texture that fills the frame (stripe orientation, tiling, rings, dots, ...), so it
    survives a crop down to 8% of the area, a flip and colour jitter; colours, phase, scale (period 8-16
    px), a small rotation and the background noise are random.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tilt = np.deg2rad(rng.uniform(-8, 8))
    period = rng.uniform(8, 16)
    phase = rng.uniform(0, 2 * np.pi)

    def rotated(angle):
        return xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)

    u, v = rotated(tilt)
    name = CLASSES[label]
    if name == "horizontal_stripes":
        mask = np.sin(2 * np.pi * v / period + phase) > 0
    elif name == "vertical_stripes":
        mask = np.sin(2 * np.pi * u / period + phase) > 0
    elif name == "diagonal_stripes":
        d, _ = rotated(tilt + rng.choice([np.pi / 4, -np.pi / 4]))
        mask = np.sin(2 * np.pi * d / period + phase) > 0
    elif name in ("checkerboard", "diamonds"):
        if name == "diamonds":
            u, v = rotated(tilt + np.pi / 4)
        cell = period / 2
        mask = (np.floor(u / cell + phase) + np.floor(v / cell)) % 2 == 0
    elif name == "rings":
        cy, cx = rng.uniform(0, size, 2)
        mask = np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period + phase) > 0
    elif name == "dots":
        du = (u + phase) % period - period / 2
        dv = (v + phase) % period - period / 2
        mask = np.hypot(du, dv) < period * rng.uniform(0.25, 0.35)
    elif name == "grid_lines":
        width = rng.uniform(1.5, 3)
        mask = ((u + phase) % period < width) | ((v + phase) % period < width)
    elif name == "speckle":
        block = int(rng.integers(2, 4))
        cells = rng.random((size // block + 1, size // block + 1)) < 0.5
        mask = np.kron(cells, np.ones((block, block)))[:size, :size] > 0
    else:  # gradient: a smooth ramp in a random direction, no edges at all
        d, _ = rotated(rng.uniform(0, 2 * np.pi))
        mask = np.clip((d - d.min()) / (d.max() - d.min() + 1e-6), 0, 1)
    mask = mask.astype(np.float32)[..., None]
    background, foreground = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while abs((foreground - background) @ np.array(augment.LUMA_RGB)) < 60:
        background, foreground = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = background * (1 - mask) + foreground * mask + rng.normal(0, rng.uniform(0, 10), (size, size, 1))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def split_examples(split, num_examples):
    """(JPEG bytes, labels) of a synthetic split; deterministic (a numpy seed per split), cached."""
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    labels = np.arange(num_examples, dtype=np.int64) % len(CLASSES)
    images = [tf.io.encode_jpeg(texture_image(int(label), rng), quality=90).numpy() for label in labels]
    return images, labels
