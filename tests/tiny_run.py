"""A tiny run directory as `bot_keras.train` leaves it, sample images, and the in-process inference path.

Shared by tests/test_export.py and tests/test_predict.py (pytest puts tests/ on sys.path).
"""

import functools
import io
import pathlib

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from bot_keras.data import make_dataset
from bot_keras.data.augment import preprocess_for_eval
from bot_keras.data.decode import decode_image
from bot_keras.models import build_model

MODEL = "resnet18_d"
IMAGE_SIZE = 32
CLASS_NAMES = ("cat", "dog", "fox", "owl", "yak")


def make_run(model_dir, *, precision="float32", seed=0, drop_path_rate=0.0):
    """Writes flags.txt, classes.txt and model.keras for a ResNet-18-D on 32 px images with 5 classes.

    The weights stand in for training: random convolutions, BatchNorm statistics and affine parameters
    drawn away from their (0, 1) initial values so inference-mode BN is not the identity, and a head scaled
    so the top class has a clear margin (a fresh network predicts nearly uniform probabilities, where
    export differences could swap classes that are tied to 1e-4). Returns (model_dir, model).
    """
    model_dir = pathlib.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(seed)
        model = build_model(MODEL, num_classes=len(CLASS_NAMES), input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                            drop_path_rate=drop_path_rate)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0.0, 0.1, beta.shape).astype("float32"),
                rng.normal(0.0, 0.2, mean.shape).astype("float32"),
                rng.uniform(0.5, 2.0, variance.shape).astype("float32"),
            ])
    head = model.get_layer("logits")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 8.0, rng.normal(0.0, 0.5, bias.shape).astype("float32")])
    model.save(model_dir / "model.keras")
    (model_dir / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    (model_dir / "flags.txt").write_text(
        "# flags as bot_keras.train writes them (a subset; all are train.py flags)\n"
        f"--model={MODEL}\n--image_size={IMAGE_SIZE}\n--precision={precision}\n--batch_size=8\n"
        f"--zero_gamma\n--nono_bias_decay\n--drop_path_rate={drop_path_rate}\n"
    )
    return model_dir, model


def pixels(height, width, seed):
    """A smooth gradient plus noise: a uint8 [height, width, 3] image whose resize is not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / width, y * 255.0 / height, (x + y) * 127.0 / (height + width)], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sample_images():
    """[(name, encoded bytes)]: PNG, JPEG and BMP files of different sizes and aspect ratios."""
    shapes = [(40, 50, "PNG"), (64, 48, "JPEG"), (32, 32, "PNG"), (37, 81, "BMP"), (90, 45, "JPEG")]
    return [(f"image{i}.{fmt.lower()}", encode(pixels(h, w, seed=i), fmt))
            for i, (h, w, fmt) in enumerate(shapes)]


def reference_logits(model, encoded_images, image_size=IMAGE_SIZE):
    """In-process inference, as evaluation runs it: decode_image → preprocess_for_eval → model."""
    batch = tf.stack([preprocess_for_eval(decode_image(data), image_size) for data in encoded_images])
    return np.asarray(model(batch, training=False), dtype=np.float32)


def write_image_folder(root, images=None):
    """Writes the images as an image-folder split ROOT/val/any/<name> (file order = list order); returns
    the file paths in that order."""
    class_dir = pathlib.Path(root) / "val" / "any"
    class_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in images or sample_images():
        (class_dir / name).write_bytes(data)
        paths.append(str(class_dir / name))
    return paths


def evaluation_logits(model, folder_root, image_size=IMAGE_SIZE):
    """Logits over the images of `write_image_folder` through the pipeline `bot_keras.evaluate` feeds
    (`make_dataset(..., training=False)`: in order, one pass), batch by batch as its eval step runs."""
    dataset = make_dataset(f"folder:{folder_root}", split="val", image_size=image_size, global_batch_size=2,
                           training=False)
    return np.concatenate([np.asarray(model(images, training=False), np.float32) for images, _ in dataset])


def jpeg_declaring(height, width, seed=0):
    """A small valid JPEG (8 x 8) whose frame header is patched to declare height x width: what a
    decompression bomb or a damaged header looks like to a reader of the header."""
    data = bytearray(encode(pixels(8, 8, seed), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@functools.lru_cache(maxsize=2)
def png_bomb(height, width):
    """A valid greyscale PNG of height x width black pixels, written with zlib row by row (Pillow would
    hold the whole image): 20000 x 20000 is about 0.4 MB on disk and 1.2 GB decoded as RGB."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), bytes(width + 1)  # filter byte 0, then `width` zero pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
