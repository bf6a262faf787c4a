"""Training-step throughput: the trainer's own compiled step on in-memory batches, beside its references.

    python tools/bench_train.py                           # the default set below, 128 px, batch 16
    python tools/bench_train.py --end_to_end /data/photos # also `python -m bot_keras.train` on a folder
    python tools/bench_train.py --grid --models resnet50 --precisions float32,mixed_bfloat16 --jit off,on

Times the function `bot_keras.train` runs (`steps.make_train_function`: its loss in float32, loss scaling
under mixed_float16, the replicas' overflow agreement, the metric sums), called one step at a time with its
sums fetched, as the trainer's loop does with --steps_per_execution=1. Every configuration is built and
warmed up (traced, compiled) first; then each of --rounds rounds times every configuration for --steps
steps, so that background load on a shared machine hits all of them alike, and the table gives each
configuration's median over the rounds.

A configuration is a model × precision × global batch × jit_compile × strategy × step. By default the
first value of each list is the base and every other value is tried with the rest at the base (one axis
at a time); --grid times every combination. The step is "trainer" (ours), "fit": Keras' own compiled
`model.fit` step (`model.train_function`, the same optimizer, softmax cross-entropy, top-1/top-5
metrics), timed on the base configuration unless --nofit, or "loop": our step inside the multi-step
while-loop that --steps_per_execution > 1 runs, one step a call (unless --noloop). Models are
`bot_keras.models` names or `keras:NAME` for `keras.applications.NAME(weights=None)` with logits out.

The ratios printed below the table come from the same run: each configuration's step time ÷ the base's
(for a `keras:` model, the base ÷ it: ours ÷ Keras'), the trainer's step ÷ model.fit's, and with
--end_to_end the trainer's images/s end to end on the photo folder ROOT (ROOT/train/<class>/*.jpg, full
Section 2.1 augmentation, in a subprocess) ÷ the base step's, with the input pipeline's own images/s on the
same cores for reference. With --end_to_end, `--augment_on=host,device` (the default) runs the trainer
once per value and round, alternating, and prints each one's median images/s, device ÷ host, and the
bytes of one batch that each hands to the accelerator (uint8 for device, float32 for host).
"""

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, replace
from itertools import product

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bot_keras  # noqa: E402, F401, I001 - first: it keeps TensorFlow's start-up lines off (bot_keras/console.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from bot_keras import cli, distribute, optimizers, steps  # noqa: E402
from bot_keras.data import Augmentation, make_dataset  # noqa: E402
from bot_keras.models import MODEL_NAMES, build_model  # noqa: E402

KERAS_PREFIX = "keras:"
COMMAND = "tools/bench_train.py"


@dataclass(frozen=True)
class Config:
    model: str
    precision: str
    batch: int
    jit: bool
    strategy: str
    step: str = "trainer"

    def label(self):
        jit = "xla" if self.jit else "-"
        return f"{self.model} {self.precision} b{self.batch} {jit} {self.strategy} {self.step}"


def configurations(args):
    """The base configuration first, then the others (one axis at a time, or the whole --grid)."""
    axes = dict(
        model=args.models, precision=args.precisions, batch=args.batch_sizes, jit=args.jit,
        strategy=args.strategies,
    )
    base = Config(**{name: values[0] for name, values in axes.items()})
    if args.grid:
        configs = [Config(*values) for values in product(*axes.values())]
    else:
        configs = [base] + [replace(base, **{name: v}) for name, values in axes.items() for v in values[1:]]
    if args.fit:
        configs.append(replace(base, step="fit"))
    if args.loop:
        configs.append(replace(base, step="loop"))
    return list(dict.fromkeys(configs))  # unique, base first


def build_classifier(name, *, num_classes, image_size):
    if name.startswith(KERAS_PREFIX):
        application = getattr(keras.applications, name[len(KERAS_PREFIX):])
        shape = (image_size, image_size, 3)
        return application(weights=None, classes=num_classes, input_shape=shape, classifier_activation=None)
    return build_model(name, num_classes=num_classes, input_shape=(image_size, image_size, 3))


class Bench:
    """One configuration, built and warmed up; `time(steps)` returns seconds per step."""

    def __init__(self, config, args):
        self.config = config
        distribute.set_precision(config.precision)
        strategy = distribute.create_strategy(config.strategy)
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        size = args.image_size
        images = rng.normal(0, 1, (config.batch, size, size, 3)).astype(np.float32)
        labels = np.eye(args.num_classes, dtype=np.float32)[rng.integers(0, args.num_classes, config.batch)]
        dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
        with strategy.scope():
            model = build_classifier(config.model, num_classes=args.num_classes, image_size=size)
            optimizer = optimizers.build_optimizer(0.1 * config.batch / 256, momentum=0.9, nesterov=True)
            if distribute.needs_loss_scaling(config.precision):
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            if config.step == "fit":
                model.compile(
                    optimizer=optimizer,
                    loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                    metrics=[keras.metrics.CategoricalAccuracy(), keras.metrics.TopKCategoricalAccuracy(5)],
                    jit_compile=config.jit,
                )
            else:
                optimizer.build(model.trainable_variables)
        keras.mixed_precision.set_global_policy("float32")
        if config.step == "fit":
            iterator = iter(strategy.experimental_distribute_dataset(dataset))
            model.make_train_function()
            train_function = model.train_function

            def one_step():
                return {name: float(value) for name, value in train_function(iterator).items()}
        else:
            loss = steps.make_per_example_loss(label_smoothing=0.0, temperature=1.0, hard_weight=None)
            train_function = steps.make_train_function(
                strategy, model, optimizer, per_example_loss=loss, global_batch_size=config.batch,
                jit_compile=config.jit,
            )
            if config.step == "loop":  # the same step inside the trainer's multi-step while-loop
                train_function = train_function.several_steps
            iterator = iter(strategy.experimental_distribute_dataset(dataset))
            self._step = 0
            self.train_function = train_function

            def one_step():
                self._step += 1
                sums = train_function(
                    iterator, tf.constant(self._step, tf.int64), tf.constant(1), tf.constant(False)
                )
                return {name: float(value) for name, value in sums.items()}

        self.one_step = one_step
        start = time.perf_counter()
        one_step()
        self.first_step_s = time.perf_counter() - start  # tracing and compiling

    def time(self, num_steps):
        start = time.perf_counter()
        for _ in range(num_steps):
            self.one_step()
        return (time.perf_counter() - start) / num_steps


def ratios(configs, seconds, base):
    """{description: ratio of step times} for every configuration against the base, from the medians."""
    result = {}
    for config in configs:
        if config == base:
            continue
        changed = [
            name for name in ("model", "precision", "batch", "jit", "strategy", "step")
            if getattr(config, name) != getattr(base, name)
        ]
        if len(changed) != 1:
            continue  # a --grid corner: in the table only
        name = changed[0]
        new, old = getattr(config, name), getattr(base, name)
        if name == "jit":
            new, old = ("xla" if new else "no xla"), ("xla" if old else "no xla")
        if name == "batch":  # per image, not per step
            value = (seconds[config] / config.batch) / (seconds[base] / base.batch)
            result[f"time per image, batch {new} ÷ batch {old}"] = value
        elif name == "model" and new.startswith(KERAS_PREFIX):
            result[f"step time, {old} ÷ {new}"] = seconds[base] / seconds[config]
        elif name == "step" and new == "fit":
            result[f"step time, {old} ÷ model.fit"] = seconds[base] / seconds[config]
        elif name == "step":
            result[f"step time, {old} ÷ the same step in a while-loop"] = seconds[base] / seconds[config]
        else:
            result[f"step time, {new} ÷ {old}"] = seconds[config] / seconds[base]
    return result


def input_images_per_second(root, args, batches, augment_on="device"):
    """images/s of the trainer's training input pipeline alone (all cores, default augmentation, the host
    half of `augment_on`)."""
    dataset = make_dataset(
        f"folder:{root}", split="train", image_size=args.image_size, global_batch_size=args.batch_sizes[0],
        training=True, seed=0, augmentation=Augmentation(on=augment_on),
    )
    iterator = iter(dataset.repeat())
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * args.batch_sizes[0] / (time.perf_counter() - start)


def end_to_end_images_per_second(root, base, args, augment_on="device"):
    """Runs `python -m bot_keras.train --augment_on=AUGMENT_ON` on folder ROOT for --end_to_end_steps
    steps; its images/s (the trainer leaves its first, compiling call out of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "run")
        command = [
            sys.executable, "-m", "bot_keras.train", f"--model={base.model}", f"--dataset=folder:{root}",
            "--eval_split=", f"--image_size={args.image_size}", f"--batch_size={base.batch}",
            f"--precision={base.precision}", f"--strategy={base.strategy}",
            f"--jit_compile={str(base.jit).lower()}", "--epochs=1",
            f"--steps_per_epoch={args.end_to_end_steps}", f"--max_steps={args.end_to_end_steps}",
            "--checkpoint_steps=0", "--verbose=0", f"--model_dir={model_dir}", f"--augment_on={augment_on}",
        ]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"end-to-end run failed ({' '.join(command)}):\n{proc.stderr[-2000:]}")
        with open(os.path.join(model_dir, "logs", "training.csv")) as f:
            rows = list(csv.DictReader(f))
        return float(rows[-1]["images_per_sec"]), command


def end_to_end(args, base, step_rate):
    """The trainer end to end on --end_to_end, per --augment_on value, --end_to_end_rounds rounds
    alternating between the values; prints each one's figures and returns the ratios."""
    rates = {on: [] for on in args.augment_on}
    for _ in range(args.end_to_end_rounds):
        for on in args.augment_on:
            rate, command = end_to_end_images_per_second(args.end_to_end, base, args, augment_on=on)
            rates[on].append(rate)
    print(f"\nend to end: {' '.join(command[1:-1])} --augment_on=…")
    result = {}
    for on, values in rates.items():
        rate = statistics.median(values)
        pipeline = input_images_per_second(args.end_to_end, args, max(4, args.end_to_end_steps), on)
        image_bytes = base.batch * args.image_size**2 * 3 * (1 if on == "device" else 4)
        print(
            f"  --augment_on={on}: {rate:.1f} images/s end to end (rounds: "
            f"{', '.join(f'{v:.1f}' for v in values)}); step alone {step_rate:.1f}; input pipeline alone "
            f"{pipeline:.1f} (all cores); step and pipeline sharing the cores: "
            f"1/(1/{step_rate:.1f} + 1/{pipeline:.1f}) = {1 / (1 / step_rate + 1 / pipeline):.1f}; "
            f"images moved to the device per batch: {image_bytes:,} bytes"
        )
        result[f"images/s, end to end ({on}) ÷ step alone"] = rate / step_rate
    if len(rates) == 2:
        host, device = (statistics.median(rates[on]) for on in ("host", "device"))
        result["images/s end to end, augment_on device ÷ host"] = device / host
    return result


def print_table(configs, seconds, spread, first_step, base):
    header = (
        f"{'model':18s} {'precision':15s} {'batch':>5s} {'xla':>4s} {'strategy':9s} {'step':8s} "
        f"{'ms/step':>9s} {'min-max ms':>15s} {'images/s':>9s} {'÷ base':>7s} {'1st step s':>10s}"
    )
    print(header)
    print("-" * len(header))
    for c in configs:
        low, high = spread[c]
        print(
            f"{c.model:18s} {c.precision:15s} {c.batch:5d} {'on' if c.jit else 'off':>4s} {c.strategy:9s} "
            f"{c.step:8s} {1e3 * seconds[c]:9.1f} {f'{1e3 * low:.0f}-{1e3 * high:.0f}':>15s} "
            f"{c.batch / seconds[c]:9.1f} {seconds[c] / seconds[base]:7.3f} {first_step[c]:10.1f}"
        )


def define_flags(fv):
    d = dict(flag_values=fv)
    models = ["resnet50", "resnet50_d", "keras:ResNet50"]
    precisions = ["float32", "mixed_bfloat16", "mixed_float16"]
    flags.DEFINE_list("models", models, "Model names or keras:NAME.", **d)
    flags.DEFINE_list("precisions", precisions, "Keras dtype policies.", **d)
    flags.DEFINE_list("batch_sizes", ["16"], "Global batch sizes.", **d)
    flags.DEFINE_list("jit", ["off", "on"], "off | on | off,on (XLA).", **d)
    flags.DEFINE_list("strategies", ["default", "mirrored"], "default and/or mirrored.", **d)
    flags.DEFINE_bool("fit", True, "Also time Keras' model.fit step on the base configuration.", **d)
    flags.DEFINE_bool("loop", True, "Also time the base step inside the trainer's multi-step loop "
                      "(what --steps_per_execution > 1 runs).", **d)
    flags.DEFINE_bool("grid", False, "Every combination, not one axis at a time.", **d)
    flags.DEFINE_integer("image_size", 128, "Input height and width.", **d)
    flags.DEFINE_integer("num_classes", 1000, "Classifier size.", **d)
    flags.DEFINE_integer("warmup", 2, "Untimed steps per configuration after the first (compiling).", **d)
    flags.DEFINE_integer("steps", 3, "Timed steps per configuration and round.", **d)
    flags.DEFINE_integer("rounds", 3, "Rounds; each times every configuration.", **d)
    flags.DEFINE_string("end_to_end", None, "Image folder ROOT/train/<class>/*.jpg.", **d)
    flags.DEFINE_integer("end_to_end_steps", 8, "Steps of the end-to-end run.", **d)
    flags.DEFINE_list("augment_on", ["host", "device"], "The trainer's --augment_on values run end to end.",
                      **d)
    flags.DEFINE_integer("end_to_end_rounds", 1, "End-to-end runs per --augment_on value (alternating).",
                         **d)


_ON_OFF = {"on": True, "off": False, "true": True, "false": False}


def check_flags(f):
    """The parsed flags as a namespace (--batch_sizes as ints, --jit as bools); raises SetupError naming
    every bad value in one line."""
    args = types.SimpleNamespace(**{name: f[name].value for name in f})
    problems = [
        f"--models: unknown {m!r}" for m in args.models
        if not (m in MODEL_NAMES or (m.startswith(KERAS_PREFIX) and hasattr(keras.applications, m[6:])))
    ]
    problems += [f"--precisions: unknown {p!r}" for p in args.precisions if p not in distribute.PRECISIONS]
    problems += [f"--strategies: {s!r} is not default or mirrored" for s in args.strategies
                 if s not in ("default", "mirrored")]
    if all(v.strip().lower() in _ON_OFF for v in args.jit):
        args.jit = [_ON_OFF[v.strip().lower()] for v in args.jit]
    else:
        problems.append(f"--jit={','.join(args.jit)!r}: use on, off or on,off")
    if all(b.isdigit() and int(b) > 0 for b in args.batch_sizes):
        args.batch_sizes = [int(b) for b in args.batch_sizes]
    else:
        problems.append(f"--batch_sizes={','.join(args.batch_sizes)!r}: positive integers")
    problems += [f"--augment_on: {v!r} is not host or device" for v in args.augment_on
                 if v not in ("host", "device")]
    for name in ("warmup", "steps", "rounds", "image_size", "num_classes", "end_to_end_steps",
                 "end_to_end_rounds"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            problems.append(f"--{name}={getattr(args, name)} is too small")
    if args.end_to_end and not os.path.isdir(os.path.join(args.end_to_end, "train")):
        problems.append(f"--end_to_end={args.end_to_end!r} has no train/ folder (ROOT/train/<class>/*.jpg)")
    if not all((args.models, args.precisions, args.batch_sizes, args.jit, args.strategies)):
        problems.append("--models, --precisions, --batch_sizes, --jit and --strategies each need a value")
    if problems:
        raise cli.SetupError("; ".join(problems))
    return args


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    measure(check_flags(f))


def measure(args):
    """Prints the table and the ratios; returns {"seconds": {Config: s/step}, "ratios": {name: value}}.
    `args`: check_flags' namespace."""
    tf.get_logger().setLevel("ERROR")  # one traced step function per configuration is not "retracing"
    configs = configurations(args)
    base = configs[0]
    print(
        f"{len(configs)} configurations, {args.image_size} px, {args.num_classes} classes; {args.rounds} "
        f"rounds x {args.steps} steps after 1 + {args.warmup} warm-up steps; {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    benches = {}
    for config in configs:
        benches[config] = Bench(config, args)
        print(f"  built {config.label()} (first step {benches[config].first_step_s:.1f} s)", flush=True)
    # Warm-up after all are built: a step function's first call after other functions were created is
    # slow again (measured: 3 s instead of 0.15 s for resnet18_d at 32 px), though it does not retrace.
    for config in configs:
        for _ in range(args.warmup):
            benches[config].one_step()
    times = {config: [] for config in configs}
    for _ in range(args.rounds):
        for config in configs:
            times[config].append(benches[config].time(args.steps))
    seconds = {c: statistics.median(t) for c, t in times.items()}
    spread = {c: (min(t), max(t)) for c, t in times.items()}
    print()
    print_table(configs, seconds, spread, {c: b.first_step_s for c, b in benches.items()}, base)
    result = ratios(configs, seconds, base)
    if args.end_to_end:
        result.update(end_to_end(args, base, base.batch / seconds[base]))
    print(f"\nratios (base: {base.label()}; medians of this run)")
    for name, value in result.items():
        print(f"  {name:55s} {value:7.3f}")
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return {"seconds": seconds, "ratios": result}


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND)
