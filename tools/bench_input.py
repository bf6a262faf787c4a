"""Input-pipeline throughput: fused decode-and-crop vs decode-then-crop, and the validation path.

    python tools/bench_input.py                     # 500 photo-like 500x375 JPEGs, 224 px, 1 thread
    python tools/bench_input.py --threads 4         # images/s with 4 tf.data threads, also divided per thread

Generates ~500 photo-like JPEGs (multi-scale smooth noise with edges and grain, 500x375, quality 90, about
the size and entropy of ImageNet photos) in a temporary image folder, then times `make_dataset` at 224 px:
the Section 2.1 training path with the fused `decode_and_crop_jpeg` (`fused_crop=True`, the default), the
same with the whole image decoded before cropping (`fused_crop=False`), and the validation path (decode,
shorter side to 256, centre crop). The tf.data private thread pool is limited to --threads, so the figures
are images/s per CPU core at --threads 1. Encoded bytes are cached in memory, so disk speed is not measured.
A second table times a CIFAR-sized folder (32x32 JPEGs at 32 px, all cores): the first pass reads files,
later passes come from the cache of encoded bytes.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bot_keras.data import make_dataset, sources  # noqa: E402


def photo_like(rng, height=375, width=500):
    """Smooth multi-scale colour noise plus a few hard-edged shapes and film grain, uint8 [H, W, 3]."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 90.0), (8, 45.0), (24, 20.0), (80, 8.0)):
        field = rng.normal(0, 1, (cells, int(cells * width / height) + 1, 3)).astype(np.float32)
        image += weight * tf.image.resize(field, [height, width], method="bicubic").numpy()
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.normal(0, 50, 3)
    image += 110 + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(root, count, make, quality=90, classes=10):
    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        folder = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        data = tf.io.encode_jpeg(make(rng), quality=quality).numpy()
        with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
            f.write(data)
        total += len(data)
    sources._list_folder.cache_clear()
    return total / count


def images_per_second(ds, images, batch_size, threads, warmup_batches=2):
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    iterator = iter(ds.repeat())
    for _ in range(warmup_batches):
        next(iterator)
    batches = max(1, images // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="tf.data threads (1: images/s per core)")
    parser.add_argument("--timed_images", type=int, default=1000, help="images timed per configuration")
    parser.add_argument(
        "--small_images", type=int, default=5000, help="32x32 JPEGs for the small-folder table"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        mean_bytes = write_images(tmp, args.num_images, photo_like)
        source = f"folder:{tmp}"
        print(
            f"{args.num_images} JPEGs 500x375 q90, mean {mean_bytes / 1024:.0f} KiB; {args.image_size} px, "
            f"batch {args.batch_size}, {args.threads} tf.data thread(s), {os.cpu_count()} CPUs on the machine"
        )
        common = dict(
            split="train", image_size=args.image_size, global_batch_size=args.batch_size, cache=True
        )
        rates = {
            "train, fused decode_and_crop_jpeg": images_per_second(
                make_dataset(source, training=True, seed=0, **common),
                args.timed_images,
                args.batch_size,
                args.threads,
            ),
            "train, decode then crop": images_per_second(
                make_dataset(source, training=True, seed=0, fused_crop=False, **common),
                args.timed_images,
                args.batch_size,
                args.threads,
            ),
            "validation (resize 256, centre crop)": images_per_second(
                make_dataset(source, training=False, **common),
                args.timed_images,
                args.batch_size,
                args.threads,
            ),
        }
        per = f"images/s per thread (x{args.threads})" if args.threads > 1 else "images/s per core"
        print(f"{'path':40s} {per:>28s}")
        for name, rate in rates.items():
            print(f"{name:40s} {rate / args.threads:28.1f}")
        fused, plain = rates["train, fused decode_and_crop_jpeg"], rates["train, decode then crop"]
        print(f"fused / decode-then-crop ratio: {fused / plain:.2f}x")

    if args.small_images:
        with tempfile.TemporaryDirectory() as tmp:
            small = lambda rng: photo_like(rng, 32, 32)
            write_images(tmp, args.small_images, small)
            ds = make_dataset(
                f"folder:{tmp}", split="train", image_size=32, global_batch_size=256, training=True
            )
            iterator = iter(ds)
            passes = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(args.small_images // 256):
                    next(iterator)
                passes.append((args.small_images // 256) * 256 / (time.perf_counter() - start))
            print(
                f"\nsmall folder: {args.small_images} 32x32 JPEGs at 32 px, batch 256, all cores "
                "(encoded bytes cached after pass 1)"
            )
            print("images/s by pass: " + ", ".join(f"pass {i + 1}: {r:.0f}" for i, r in enumerate(passes)))


if __name__ == "__main__":
    main()
