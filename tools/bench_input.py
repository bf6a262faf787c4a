"""Input-pipeline throughput (images/s per core) against the floor set by the ops the paper's crop needs.

    python tools/bench_input.py                                  # generated photo-like JPEGs only
    python tools/bench_input.py --folder /tmp/raccoon_folder     # and a real image folder ROOT/train/*/*
    python tools/bench_input.py --threads 4                      # 4 tf.data threads, images/s per thread

For each folder (the generated one: ~500 photo-like 500x375 JPEGs, multi-scale smooth noise with edges and
grain at quality 90, about the size and entropy of ImageNet photos; and `--folder ROOT`'s `--split`), the
encoded bytes are held in memory and these paths are timed at 224 px, batch 16, in interleaved rounds (so
background load hits every path alike; each path's best round is reported):

  decode_jpeg            the floor: `tf.io.decode_jpeg` of the whole file, nothing else;
  minimal fused chain    what the paper's crop needs at least: sample a box (8-100 % area, aspect 3/4-4/3),
                         `decode_and_crop_jpeg`, resize to 224, flip;
  ..., paper's crop      the same chain with the paper's crop sampler (`augment.sample_crop_window`);
  train, host for device `make_dataset(training=True)` with `on="device"` (the trainer's default,
                         `--augment_on=device`): crop, resize, flip, uint8 out; jitter, lighting and
                         normalisation are left to the train step;
  train, crop + flip     `make_dataset(training=True)` with jitter and lighting off;
  ..., TF sampler        the same with `crop_sampler="tf"`: the minimal chain's crop distribution (smaller
                         crops, so less to decode and resize than the paper's);
  train, Section 2.1     `make_dataset(training=True)`, every step (the default);
  train, unfused         the same with `fused_crop=False` (whole image decoded, then cropped);
  validation             `make_dataset(training=False)` (shorter side 256, centre crop);
  ..., RandAugment N,M   with `--randaugment=N,M` (default 2,9; empty: these rows are left out): the
                         host pipeline of `--augment_on=device` and the Section 2.1 one with RandAugment
                         (`Augmentation.randaugment`, bot_keras/data/randaugment.py) after the flip;
  ..., keras.layers.RandAugment  (`--keras_randaugment`) the host pipeline of `--augment_on=device` followed
                         by Keras' own layer (num_ops N, factor M/10), once per image (unbatch, map,
                         batch) and once per batch (its natural use: one op choice for the whole batch).

The tf.data private thread pool is limited to --threads (1: per-core figures). Ratios are against the
minimal fused chain of the same run; a summary line gives the host pipeline of `--augment_on=device`
against the chain with the paper's crop (the same crop distribution), and the bytes of one batch as each
path hands it to the accelerator. A last table times a CIFAR-sized folder (32x32 JPEGs at 32 px, all
cores): the first pass reads files, later passes come from the cache of encoded bytes.
"""

import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bot_keras  # noqa: E402, F401, I001 - first: it keeps TensorFlow's start-up lines off (bot_keras/console.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from bot_keras import cli  # noqa: E402
from bot_keras.data import augment, folder, make_dataset, pipeline  # noqa: E402
from bot_keras.data import randaugment as randaugment_ops  # noqa: E402

COMMAND = "tools/bench_input.py"


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
    for i in range(count):
        class_dir = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"{i:05d}.jpg"), "wb") as f:
            f.write(tf.io.encode_jpeg(make(rng), quality=quality).numpy())
    folder.list_folder.cache_clear()


def limit_threads(ds, threads):
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def reference_paths(encoded, image_size, batch_size):
    """The two floors, on the same bytes in memory, with one stateless seed per image like make_dataset."""
    seeds = tf.data.Dataset.random(seed=0, rerandomize_each_iteration=True).batch(2)
    images = tf.data.Dataset.from_tensor_slices(encoded).repeat()
    paired = tf.data.Dataset.zip(images, seeds)

    def decode_only(data, seed):
        return tf.shape(tf.io.decode_jpeg(data, channels=3))

    def minimal_chain(data, seed, paper_crop=False):
        box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        shape = tf.io.extract_jpeg_shape(data)
        if paper_crop:
            window = augment.sample_crop_window(shape[:2], box_seed)
        else:
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                shape,
                tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                seed=box_seed,
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0),
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
        crop = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(crop, [image_size, image_size], antialias=False)
        return tf.image.stateless_random_flip_left_right(image, flip_seed)

    return {
        "decode_jpeg (whole file)": paired.map(decode_only).batch(batch_size),
        "minimal fused chain": paired.map(minimal_chain).batch(batch_size),
        "minimal fused chain, paper's crop": paired.map(
            lambda data, seed: minimal_chain(data, seed, paper_crop=True)
        ).batch(batch_size),
    }


def waterfall_paths(encoded, image_size, batch_size):
    """Where the training path's time goes: the minimal chain, then one piece of `make_dataset(training=
    True)` added at a time, on the same bytes in memory (no cache, shuffle or file records), so that each
    row's cost over the previous one is that piece's. The last rows are the library's own paths."""
    seeds = tf.data.Dataset.random(seed=0, rerandomize_each_iteration=True).batch(2)
    records = {"encoded": encoded, "label": tf.zeros([len(encoded)], tf.int64), "key": [""] * len(encoded)}
    plain = tf.data.Dataset.from_tensor_slices(records).repeat()
    crop_flip = augment.Augmentation(color_jitter=False, pca_lighting=False)

    def paper_chain(example, seed, normalise=False):
        box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        data = example["encoded"]
        window = augment.sample_crop_window(tf.io.extract_jpeg_shape(data)[:2], box_seed)
        crop = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(crop, [image_size, image_size], antialias=False)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return augment.normalize(image) if normalise else image

    def train_transform(augmentation, checks=False):
        def transform(example, seed):
            if not checks:
                return augment.preprocess_for_train(example["encoded"], image_size, seed, augmentation)
            # make_dataset's own checks: the header read a batch at a time (`with_headers`, below), then per
            # image the framing, pixel limit and label checks and the one-hot label (`check_example`).
            data, label = pipeline.check_example(example, 1)
            return augment.preprocess_for_train(
                data, image_size, seed, augmentation, image_hw=example["header_hw"]
            ), label

        return transform

    steps = {
        "paper sampler in the minimal chain": (paper_chain, False),
        "+ normalise": (lambda example, seed: paper_chain(example, seed, normalise=True), False),
        "preprocess_for_train, crop + flip": (train_transform(crop_flip), False),
        "+ header read, framing, pixel limit and label checks, one-hot": (
            train_transform(crop_flip, checks=True), True
        ),
        "+ colour jitter": (train_transform(dataclasses.replace(crop_flip, color_jitter=True), checks=True),
                            True),
        "+ PCA lighting (all Section 2.1)": (train_transform(augment.Augmentation(), checks=True), True),
    }

    def mapped(transform, headers):
        examples = tf.data.Dataset.zip(pipeline.with_headers(plain) if headers else plain, seeds)
        return examples.map(transform).batch(batch_size)

    return {name: mapped(*step) for name, step in steps.items()}


def library_paths(source, split, image_size, batch_size, randaugment=None, keras_randaugment=False):
    common = dict(split=split, image_size=image_size, global_batch_size=batch_size, cache=True)
    crop_flip = augment.Augmentation(color_jitter=False, pca_lighting=False)
    paths = {
        "train, host for device": make_dataset(
            source, training=True, seed=0, augmentation=augment.Augmentation(on="device"), **common
        ),
        "train, crop + flip": make_dataset(source, training=True, seed=0, augmentation=crop_flip, **common),
        "train, crop + flip, TF sampler": make_dataset(
            source,
            training=True,
            seed=0,
            augmentation=dataclasses.replace(crop_flip, crop_sampler="tf"),
            **common,
        ),
        "train, Section 2.1": make_dataset(source, training=True, seed=0, **common),
        "train, unfused": make_dataset(
            source, training=True, seed=0, augmentation=augment.Augmentation(fused_crop=False), **common
        ),
        "validation": make_dataset(source, training=False, repeat=True, **common),
    }
    if randaugment:
        num_ops, magnitude = randaugment
        name = f"RandAugment {num_ops},{magnitude}"
        paths[f"train, host for device, {name}"] = make_dataset(
            source, training=True, seed=0,
            augmentation=augment.Augmentation(on="device", randaugment=randaugment), **common,
        )
        paths[f"train, Section 2.1, {name}"] = make_dataset(
            source, training=True, seed=0, augmentation=augment.Augmentation(randaugment=randaugment),
            **common,
        )
        if keras_randaugment:
            paths.update(keras_randaugment_paths(source, randaugment, common))
    return paths


def keras_randaugment_paths(source, randaugment, common):
    """The host pipeline of --augment_on=device, then `keras.layers.RandAugment` per image and per batch."""
    num_ops, magnitude = randaugment
    layer = keras.layers.RandAugment(
        value_range=(0, 255), num_ops=num_ops, factor=magnitude / randaugment_ops.MAX_MAGNITUDE, seed=0
    )
    uint8 = make_dataset(source, training=True, seed=0, augmentation=augment.Augmentation(on="device"),
                         **common)

    def augmented(images, labels):
        return layer(tf.cast(images, tf.float32)), labels

    batch_size = common["global_batch_size"]
    return {
        "train, host for device, keras.layers.RandAugment per image": (
            uint8.unbatch().map(augmented).batch(batch_size)
        ),
        "train, host for device, keras.layers.RandAugment per batch": uint8.map(augmented),
    }


def time_interleaved(datasets, threads, images, batch_size, rounds, warmup_batches=2):
    """{name: best images per CPU-second over `rounds` rounds}; each round times every dataset for `images`
    images, in the process's CPU time (all threads), which a busy machine inflates far less than wall time.

    Each round opens a fresh iterator per path and closes it after timing, so that no idle pipeline keeps
    working (and filling its prefetch buffers) in the background while another is timed; after
    `warmup_batches` the consumer waits on every batch, so the timed batches are produced while timed. The
    best round is the one least disturbed by other processes (as `timeit` takes the minimum time)."""
    datasets = {name: limit_threads(ds, threads) for name, ds in datasets.items()}
    batches = max(1, images // batch_size)
    rates = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, ds in datasets.items():
            iterator = iter(ds)
            for _ in range(warmup_batches):
                next(iterator)
            start = time.process_time()
            for _ in range(batches):
                next(iterator)
            rates[name].append(batches * batch_size / (time.process_time() - start))
            del iterator
    return {name: max(r) for name, r in rates.items()}


def bench_folder(title, root, split, args):
    """Times every path on the JPEGs of ROOT/SPLIT; `args`: the parsed flags (image_size, threads, ...)."""
    listing = folder.list_folder(root, split)
    encoded = [open(path, "rb").read() for path in listing.paths]
    sizes = [tf.io.extract_jpeg_shape(data).numpy()[:2] for data in encoded]
    print(
        f"\n{title}: {len(encoded)} JPEGs, mean {np.mean([len(e) for e in encoded]) / 1024:.0f} KiB, "
        f"mean {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f} px; "
        f"{args.image_size} px, batch {args.batch_size}, {args.threads} tf.data thread(s), "
        f"{args.rounds} interleaved rounds of {args.timed_images} images"
    )
    datasets = {
        **reference_paths(encoded, args.image_size, args.batch_size),
        **library_paths(f"folder:{root}", split, args.image_size, args.batch_size,
                        randaugment=randaugment_ops.parse_randaugment(args.randaugment),
                        keras_randaugment=args.keras_randaugment),
    }
    rates = time_interleaved(datasets, args.threads, args.timed_images, args.batch_size, args.rounds)
    floor = rates["minimal fused chain"]
    per = "images/s per thread" if args.threads > 1 else "images/s per core"
    print(f"| path | {per} | / minimal chain |\n| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate / args.threads:.0f} | {rate / floor:.2f} |")
    print(f"fused / unfused: {rates['train, Section 2.1'] / rates['train, unfused']:.2f}")
    paper_floor = rates["minimal fused chain, paper's crop"]
    print(
        f"host pipeline of --augment_on=device / minimal chain with the paper's crop: "
        f"{rates['train, host for device'] / paper_floor:.2f} (--augment_on=host, all Section 2.1: "
        f"{rates['train, Section 2.1'] / paper_floor:.2f})"
    )
    for name in ("train, host for device", "train, Section 2.1"):
        print(f"bytes per batch handed to the accelerator, {name}: {batch_bytes(datasets[name]):,}")
    for name in [n for n in rates if "RandAugment" in n]:
        without = "train, Section 2.1" if "Section 2.1" in name else "train, host for device"
        print(f"{name} / {without}: {rates[name] / rates[without]:.2f}")
    if args.waterfall:
        waterfall(encoded, source=f"folder:{root}", split=split, args=args)


def batch_bytes(ds):
    """Bytes of one (images, labels) batch as `ds` yields it: what crosses to the accelerator a step."""
    return sum(
        int(np.prod(spec.shape)) * spec.dtype.size for spec in tf.nest.flatten(ds.element_spec)
    )


def waterfall(encoded, *, source, split, args):
    """The minimal chain, each piece of the training path added in turn, then the library's paths:
    CPU µs per image, and each row's cost over the row before it."""
    datasets = {
        **{k: v for k, v in reference_paths(encoded, args.image_size, args.batch_size).items()
           if k == "minimal fused chain"},
        **waterfall_paths(encoded, args.image_size, args.batch_size),
    }
    library = library_paths(source, split, args.image_size, args.batch_size)
    datasets["make_dataset, host for device (uint8)"] = library["train, host for device"]
    datasets["make_dataset, crop + flip"] = library["train, crop + flip"]
    datasets["make_dataset, all Section 2.1"] = library["train, Section 2.1"]
    rates = time_interleaved(datasets, args.threads, args.timed_images, args.batch_size, args.rounds)
    print("\nwhere the time goes (CPU µs per image; each row adds one piece to the row above; the last three "
          "rows are make_dataset's own paths, with its cache, shuffle and record parsing)")
    print("| path | µs per image | + over the row above | / minimal chain |\n| --- | ---: | ---: | ---: |")
    floor, previous = rates["minimal fused chain"], None
    for name, rate in rates.items():
        micros = 1e6 * args.threads / rate
        step = "" if previous is None else f"{micros - previous:+.0f}"
        print(f"| {name} | {micros:.0f} | {step} | {rate / floor:.2f} |")
        previous = micros


def bench_small_folder(count):
    with tempfile.TemporaryDirectory() as tmp:
        write_images(tmp, count, lambda rng: photo_like(rng, 32, 32))
        ds = make_dataset(f"folder:{tmp}", split="train", image_size=32, global_batch_size=256, training=True)
        iterator = iter(ds)
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(count // 256):
                next(iterator)
            passes.append((count // 256) * 256 / (time.perf_counter() - start))
        print(
            f"\nsmall folder: {count} 32x32 JPEGs at 32 px, batch 256, all cores "
            "(encoded bytes cached after pass 1)"
        )
        print("images/s by pass: " + ", ".join(f"pass {i + 1}: {r:.0f}" for i, r in enumerate(passes)))


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("folder", None, "Also time this image folder ROOT (ROOT/<split>/<class>/*.jpg).", **d)
    flags.DEFINE_string("split", "train", "The split of --folder to read.", **d)
    flags.DEFINE_integer("num_images", 500, "Generated photo-like JPEGs (0: none).", lower_bound=0, **d)
    flags.DEFINE_integer("image_size", 224, "Output resolution of every path.", lower_bound=1, **d)
    flags.DEFINE_integer("batch_size", 16, "Batch size of every path.", lower_bound=1, **d)
    flags.DEFINE_integer("threads", 1, "tf.data threads (1: images/s per core).", lower_bound=1, **d)
    flags.DEFINE_integer("timed_images", 160, "Images timed per path and round.", lower_bound=1, **d)
    flags.DEFINE_integer("rounds", 9, "Interleaved rounds (the best is reported).", lower_bound=1, **d)
    flags.DEFINE_bool("waterfall", True, "Also time the training path piece by piece (where the time goes).",
                      **d)
    flags.DEFINE_integer("small_images", 5000, "32x32 JPEGs of the last table (0: none).", lower_bound=0, **d)
    flags.DEFINE_string("randaugment", "2,9", "RandAugment N,M of its rows (empty: no such rows).", **d)
    flags.DEFINE_bool("keras_randaugment", True, "Also time keras.layers.RandAugment (with --randaugment).",
                      **d)


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        randaugment_ops.parse_randaugment(f.randaugment)
    except ValueError as error:
        raise cli.SetupError(f"--randaugment={f.randaugment!r} {error}.") from None
    if f.folder:
        with cli.setup_errors(f"--folder {f.folder!r}"):
            folder.list_folder(f.folder, f.split)  # a bad folder fails before the generated benchmarks
    print(f"{os.cpu_count()} CPUs on the machine; TensorFlow {tf.__version__}")

    if f.folder:
        bench_folder(f"folder {f.folder}", f.folder, f.split, f)
    if f.num_images:
        with tempfile.TemporaryDirectory() as tmp:
            write_images(tmp, f.num_images, photo_like)
            bench_folder("generated photo-like 500x375 q90", tmp, "train", f)
    if f.small_images:
        bench_small_folder(f.small_images)


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND)
