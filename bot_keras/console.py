"""A clean console: TensorFlow's C++ start-up lines are off by default, real errors still show.

Measured with TensorFlow 2.21 on a CPU machine: importing TensorFlow prints, before its C++ logging is
initialised (so `TF_CPP_MIN_LOG_LEVEL` does not reach them, at any level), `WARNING: All log messages
before absl::InitializeLog() ...`, `I0000 ... port.cc] oneDNN custom operations are on ...`,
`I0000 ... cudart_stub.cc] Could not find cuda drivers ...` and `cpu_feature_guard.cc`'s instruction-set
notice; the first device query adds `E0000 ... cuda_platform.cc] failed call to cuInit: ... CUDA error`,
which `TF_CPP_MIN_LOG_LEVEL=2` keeps and only 3 (which would also hide every real C++ error) drops.

One more line comes later, at ERROR level although it is a performance notice: the first graph holding a
`Transpose` of integers (Keras' `ops.take_along_axis` transposes its int64 indices; keras-hub's detection
NMS calls it) makes TensorFlow's oneDNN graph pass log `E0000 ... util.cc] oneDNN supports DT_INT64 only on
platforms with AVX-512. Falling back to the default Eigen-based implementation if present.` — on machines
with AVX-512 too, for int32 as well, whatever the op's size, and once per process (`absl::call_once`). No
cast avoids it and the op sits inside Keras, so on a machine without a GPU the start-up spends that one
line: it runs a one-op graph (an int32 `Transpose`, in a CPU-only `tf.compat.v1.Session` of its own, which
leaves the eager runtime and its device configuration untouched) while stderr is captured.

So `quiet_tensorflow_start_up()`, called by `bot_keras/__init__.py` before anything imports TensorFlow:
sets `TF_CPP_MIN_LOG_LEVEL=2` (C++ INFO and WARNING off, ERROR on, for the rest of the process), imports
TensorFlow, lists the devices and spends the oneDNN notice with file descriptor 2 sent to a temporary file,
and then writes back to stderr every captured line except those start-up lines (`START_UP_LINES`). A
Python warning or a real C++ error printed meanwhile is therefore still shown. A user who sets
`TF_CPP_MIN_LOG_LEVEL` (any value) gets TensorFlow's own behaviour, untouched.
"""

import contextlib
import os
import re
import sys
import tempfile

# What TensorFlow prints on every start on a machine without a (working) GPU.
START_UP_LINES = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} .*"  # C++ INFO / WARNING lines, the ones TF_CPP_MIN_LOG_LEVEL=2 means to hide
    r"|E\d{4} .*failed call to cuInit.*"
    r"|E\d{4} .*oneDNN supports DT_\w+ only on platforms with AVX-512.*"
    r"|To enable the following instructions: .*in other operations, rebuild TensorFlow .*)$"
)


def quiet_tensorflow_start_up():
    """Imports TensorFlow without its start-up lines (module docstring); a no-op if the user set
    TF_CPP_MIN_LOG_LEVEL or TensorFlow is already imported."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with _stderr_without_start_up_lines():
        import tensorflow as tf  # here: the import itself is what is silenced

        devices = tf.config.list_physical_devices()  # the cuInit line comes from the first device query
        # oneDNN rewrites CPU graphs; with a GPU those ops run there, and no session of ours touches it.
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0" and all(d.device_type == "CPU" for d in devices):
            _spend_onednn_data_type_notice(tf)


def _spend_onednn_data_type_notice(tf):
    """Runs a graph whose optimisation logs oneDNN's once-a-process data-type notice (docstring above)."""
    graph = tf.Graph()
    with graph.as_default():
        transposed = tf.transpose(tf.constant([[0, 1]], tf.int32))
    config = tf.compat.v1.ConfigProto(
        device_count={"GPU": 0}, inter_op_parallelism_threads=1, intra_op_parallelism_threads=1
    )
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        session.run(transposed)


@contextlib.contextmanager
def _stderr_without_start_up_lines():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines() if not START_UP_LINES.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
