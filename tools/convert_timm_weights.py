"""Converts a timm ResNet state dict (`.safetensors`) into one of our ResNet-B/C/D Keras models.

    python tools/convert_timm_weights.py --model resnet50_d --weights model.safetensors \
        --output resnet50_d.keras [--num_classes 10] [--image_size 224]

timm's `resnetNN` is our `resnetNN_b`, `resnetNNc` our `resnetNN_c`, `resnetNNd` our `resnetNN_d`
(bot_keras/models/timm_weights.py has the full mapping). The classifier comes from the file unless
`--num_classes` asks for a different size; then it is freshly initialised (fine-tuning). An output ending in
`.weights.h5` gets the weights only (for `model.load_weights` on a model built with the same name and
number of classes, at any image size); `.keras` gets the whole model at `--image_size`.
No PyTorch is needed: the `safetensors` package reads the file into numpy.
"""

import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from bot_keras import cli  # noqa: E402
from bot_keras.models import MODEL_NAMES, build_model  # noqa: E402
from bot_keras.models.timm_weights import load_timm_weights, read_safetensors, timm_model_name  # noqa: E402

COMMAND = "convert_timm_weights"


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("model", None, "Our model name, e.g. resnet50_d (timm resnet50d).", **d)
    flags.DEFINE_string("weights", None, "timm state dict as .safetensors.", **d)
    flags.DEFINE_string("output", None, "Where to write: .keras (model) or .weights.h5.", **d)
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Classifier size; default: the file's. Another size gets a new, randomly initialised classifier.",
        **d,
    )
    flags.DEFINE_integer("image_size", 224, "Input height and width of the model.", **d)
    flags.DEFINE_alias("num-classes", "num_classes", flag_values=fv)
    flags.DEFINE_alias("image-size", "image_size", flag_values=fv)


def check_flags(f):
    """Raises SetupError for a flag value the conversion cannot use."""
    if f.model not in MODEL_NAMES:
        raise cli.SetupError(f"--model {f.model!r} is unknown; valid names: {', '.join(MODEL_NAMES)}")
    try:
        timm_model_name(f.model)
    except ValueError as error:
        raise cli.SetupError(f"--model {f.model!r}: {error}") from error
    if not pathlib.Path(f.weights).is_file():
        raise cli.SetupError(f"--weights {f.weights!r}: no such file")
    if not f.output.endswith((".keras", ".weights.h5")):
        raise cli.SetupError(f"--output {f.output!r} must end in .keras or .weights.h5")
    if f.num_classes is not None and f.num_classes < 1:
        raise cli.SetupError(f"--num_classes must be a positive integer, got {f.num_classes}")
    if f.image_size < 32:
        raise cli.SetupError(f"--image_size must be at least 32 (the network's stride), got {f.image_size}")


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags(f)
    with cli.setup_errors("--weights"):
        state = read_safetensors(f.weights)
    file_classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    num_classes = f.num_classes or file_classes
    if num_classes is None:
        raise cli.SetupError(f"--weights {f.weights!r} has no classifier (fc.weight); pass --num_classes")
    skip_classifier = num_classes != file_classes
    model = build_model(f.model, num_classes=num_classes, input_shape=(f.image_size, f.image_size, 3))
    with cli.setup_errors(f"--weights {f.weights!r}"):
        load_timm_weights(model, state, skip_classifier=skip_classifier)
    pathlib.Path(f.output).parent.mkdir(parents=True, exist_ok=True)
    if f.output.endswith(".weights.h5"):
        model.save_weights(f.output)
    else:
        model.save(f.output)
    classifier = (
        f"new {num_classes}-class classifier (randomly initialised)"
        if skip_classifier
        else f"timm's {num_classes}-class classifier"
    )
    print(f"Wrote {f.output}: {f.model} (timm {timm_model_name(f.model)}) with {classifier}.")


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("model", "weights", "output"))
