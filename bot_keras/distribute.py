"""The one place for distribution and precision (Sections 3.1 and 3.2 of the paper: large batch, fp16).

Everything the trainer needs to know about devices goes through here:

- `create_strategy(name)` builds the `tf.distribute.Strategy` for `--strategy`;
- `set_precision(name)` sets the Keras dtype policy for `--precision`, once, before any layer is built;
- `per_replica_batch_size(global_batch_size, num_replicas)` checks that the global batch (the only batch
  size a user sets) splits evenly over the replicas;
- `set_synchronized_batch_norm(model, on)` makes every BatchNorm compute global-batch statistics
  (`--sync_bn`);
- `is_chief(strategy)` / `worker_dir(model_dir, strategy)` implement the multi-worker rule that only the
  chief writes to the run directory (the TensorFlow multi-worker guide's pattern: the other workers
  write to a private temporary directory, because every worker must take part in saving);
- `stop_agreement(strategy)` makes every worker stop for preemption after the same step, whichever of
  them the signal reached.

The paper trains with fp16 on 8 GPUs; we follow the usual Keras 3 mixed-precision recipe (float16
compute, float32 variables, dynamic loss scaling), which is what the authors' MXNet code does with
`multi_precision=True`.
"""

import json
import os
import tempfile

import keras
import tensorflow as tf

from bot_keras.models.resnet import nested_layers

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def create_strategy(name, *, tpu_address=""):
    """Returns the `tf.distribute.Strategy` called `name` (one of `STRATEGIES`).

    - `default`: the no-op strategy on the first visible device (a GPU if there is one).
    - `mirrored`: synchronous data parallelism over all local GPUs (or the logical CPU devices when no
      GPU is visible, which is how the tests exercise it).
    - `multi_worker_mirrored`: synchronous data parallelism over the workers named in `TF_CONFIG`
      (each worker runs the same command; worker 0 is the chief).
    - `tpu`: a TPU reached through `tpu_address` (empty: the local TPU VM).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy name={name!r} is not one of {', '.join(STRATEGIES)}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if not devices:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker_mirrored":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    except ValueError as error:  # TensorFlow's "Please provide a TPU Name to connect to."
        where = f"at --tpu={tpu_address}" if tpu_address else "on this machine (no TPU VM; --tpu names one)"
        raise ValueError(f"--strategy=tpu: no TPU found {where}: {error}") from None
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _check_tf_config():
    """`multi_worker_mirrored` needs a TF_CONFIG naming this worker; say so instead of hanging."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise ValueError(
            "strategy multi_worker_mirrored needs the TF_CONFIG environment variable, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
            '"index": 0}}; it is not set.'
        )
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG={raw!r} is not a valid cluster description ({error!r}).") from None
    # A "chief" task is its own cluster entry (index 0); a "worker" task indexes the worker list.
    task_type = task.get("type")
    chiefs = config["cluster"].get("chief", [])
    valid = (task_type == "worker" and 0 <= index < len(workers)) or (
        task_type == "chief" and chiefs and index == 0
    )
    if not valid:
        raise ValueError(f"TF_CONFIG={raw!r}: task {task} does not name one of the workers {workers}.")


def set_precision(name):
    """Sets the global Keras dtype policy; call once, before the model is built.

    `mixed_float16` needs dynamic loss scaling (`keras.optimizers.LossScaleOptimizer`, see
    `needs_loss_scaling`); `mixed_bfloat16` has float32's exponent range and needs none. Models keep
    their logits in float32 (the float32 island at the classifier), and the trainer computes the loss
    in float32.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision name={name!r} is not one of {', '.join(PRECISIONS)}.")
    keras.mixed_precision.set_global_policy(name)
    return keras.mixed_precision.global_policy()


def precision_warning(precision, device_types=None):
    """A warning when float16 compute is asked for where it is slow, or None. On a CPU (no GPU or TPU
    among `device_types`, default: the visible logical devices) float16 has no fast kernels:
    measured ~1 image/s under mixed_float16 against ~20 in float32 for the same run."""
    if precision != "mixed_float16":
        return None
    if device_types is None:
        device_types = {device.device_type for device in tf.config.list_logical_devices()}
    if set(device_types) & {"GPU", "TPU"}:
        return None
    return (
        "--precision=mixed_float16 with no GPU visible: float16 runs very slowly on a CPU; use "
        "--precision=mixed_bfloat16 or --precision=float32 there."
    )


def needs_loss_scaling(precision):
    """Only float16 compute underflows small gradients; bfloat16 and float32 do not."""
    return precision == "mixed_float16"


def per_replica_batch_size(global_batch_size, num_replicas):
    """The global batch split over `num_replicas`; raises ValueError when it does not split evenly."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive.")
    if global_batch_size % num_replicas:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"{num_replicas} replicas of this strategy; use a multiple of {num_replicas}, e.g. "
            f"{(global_batch_size // num_replicas + 1) * num_replicas}."
        )
    return global_batch_size // num_replicas


def is_chief(strategy):
    """True on the one process that writes the run directory (every process except multi-worker ones)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    # With a "worker"-only cluster, worker 0 is the chief (TensorFlow's convention).
    return task_type == "chief" or (task_type == "worker" and task_id == 0) or task_type is None


def worker_dir(model_dir, strategy):
    """Where this process writes: `model_dir` on the chief, a private temporary directory elsewhere.

    Every worker must run the save (the variables' values are gathered collectively), but only the
    chief's files are kept; the others are deleted by the caller when training ends.
    """
    if is_chief(strategy):
        return model_dir
    return tempfile.mkdtemp(prefix=f"bot_keras_worker{strategy.cluster_resolver.task_id}_")


def worker_count(strategy):
    """The processes that train together: the chief and workers of a multi-worker strategy's cluster, 1
    for every other strategy (and for `multi_worker_mirrored` without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return max(len(jobs.get("chief", [])) + len(jobs.get("worker", [])), 1)


STOP_SIGNALS = ("SIGTERM", "SIGINT")  # the names `loop.stop_signals` records


def stop_agreement(strategy):
    """`agree(signal name or None) -> signal name or None`, the preemption decision every worker reaches
    (`loop.train_loop`'s `agree_to_stop`).

    A scheduler may send SIGTERM to one worker only, or to all of them while they are in different steps;
    a worker that stopped alone would leave the others waiting in the next step's all-reduce. Each call
    all-reduces (sums) one count per signal over the replicas of every worker, so all workers learn that
    someone received a signal after the same `train_function` call; a worker that received none reports
    "SIGTERM on another worker". A single worker pays nothing: its own decision is returned at once.

    Why not TensorFlow's `tf.distribute.experimental.PreemptionCheckpointHandler`: MultiWorkerMirrored-
    Strategy does start the coordination service it needs, but the handler counts its own `run` (or
    `save_checkpoint_if_preempted`) calls, one step each, keeps that count in a variable it adds to our
    checkpoint and restores the newest checkpoint itself when it is built (so checkpoints written without
    it would fail `--resume`'s check that every object matches), watches SIGTERM only, with a handler of
    its own, and ends the process itself through its `exit_fn`. One all-reduce in the loop that already
    counts the steps (in `--steps_per_execution` chunks, with epoch-end evaluation) gives the same
    agreement.
    """
    if worker_count(strategy) == 1:
        return lambda signal_name: signal_name

    @tf.function
    def summed(counts):
        def replica_fn(value):
            on_replica = tf.identity(value)  # the all-reduce needs a value placed on the replica's device
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, on_replica)

        return strategy.experimental_local_results(strategy.run(replica_fn, args=(counts,)))[0]

    def agree(signal_name):
        counts = summed(tf.constant([float(signal_name == name) for name in STOP_SIGNALS])).numpy()
        if signal_name:
            return signal_name
        received = [name for name, count in zip(STOP_SIGNALS, counts, strict=True) if count > 0]
        return f"{received[0]} on another worker" if received else None

    return agree


def set_synchronized_batch_norm(model, synchronized):
    """`--sync_bn`: every BatchNormalization of `model` computes global-batch statistics across replicas.

    Keras reads `synchronized` at call time, so switching it after the build converts the model in place.
    Returns how many layers it set.
    """

    count = 0
    for layer in nested_layers(model):  # nested models (a wrapped backbone) included
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized
            count += 1
    return count
