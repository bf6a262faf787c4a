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

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bot_keras.models import MODEL_NAMES, build_model  # noqa: E402
from bot_keras.models.timm_weights import load_timm_weights, read_safetensors, timm_model_name  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="convert_timm_weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="our model name, e.g. resnet50_d (timm resnet50d)")
    parser.add_argument("--weights", required=True, help="timm state dict as .safetensors")
    parser.add_argument("--output", required=True, help="where to write: .keras (model) or .weights.h5")
    parser.add_argument(
        "--num_classes",
        "--num-classes",
        type=int,
        default=None,
        help="classifier size; default: the file's. Another size gets a new, randomly initialised classifier",
    )
    parser.add_argument(
        "--image_size", "--image-size", type=int, default=224, help="input height and width of the model"
    )
    args = parser.parse_args(argv)
    if args.model not in MODEL_NAMES:
        parser.error(f"--model {args.model!r} is unknown; valid names: {', '.join(MODEL_NAMES)}")
    try:
        timm_model_name(args.model)
    except ValueError as error:
        parser.error(f"--model {args.model!r}: {error}")
    if not pathlib.Path(args.weights).is_file():
        parser.error(f"--weights {args.weights!r}: no such file")
    if not args.output.endswith((".keras", ".weights.h5")):
        parser.error(f"--output {args.output!r} must end in .keras or .weights.h5")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num_classes must be a positive integer, got {args.num_classes}")
    if args.image_size < 32:
        parser.error(f"--image_size must be at least 32 (the network's stride), got {args.image_size}")
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        state = read_safetensors(args.weights)
    except ValueError as error:
        parser.error(f"--weights: {error}")
    file_classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    num_classes = args.num_classes or file_classes
    if num_classes is None:
        parser.error(f"--weights {args.weights!r} has no classifier (fc.weight); pass --num_classes")
    skip_classifier = num_classes != file_classes
    model = build_model(
        args.model, num_classes=num_classes, input_shape=(args.image_size, args.image_size, 3)
    )
    try:
        load_timm_weights(model, state, skip_classifier=skip_classifier)
    except ValueError as error:
        parser.error(f"--weights {args.weights!r}: {error}")
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.output.endswith(".weights.h5"):
        model.save_weights(args.output)
    else:
        model.save(args.output)
    classifier = (
        f"new {num_classes}-class classifier (randomly initialised)"
        if skip_classifier
        else f"timm's {num_classes}-class classifier"
    )
    print(f"Wrote {args.output}: {args.model} (timm {timm_model_name(args.model)}) with {classifier}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
