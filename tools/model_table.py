"""Print name, trainable parameters and MACs (multiply-accumulates) of every model at one image size.

    python tools/model_table.py                   # every name in MODEL_NAMES, 224×224, 1000 classes
    python tools/model_table.py --image-size 299 --models inception_v3,resnet50_d

What is counted is documented in bot_keras/models/complexity.py (convs and Dense layers only). The paper's
Table 5 lists ResNet-50 / -B / -C / -D at 3.9 / 4.1 / 4.3 / 4.3 GFLOPs (i.e. G multiply-accumulates).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bot_keras  # noqa: E402, F401, I001 - first: it keeps TensorFlow's start-up lines off (bot_keras/console.py)
import keras  # noqa: E402
from absl import flags  # noqa: E402

from bot_keras import cli  # noqa: E402

from bot_keras.models import MODEL_NAMES, build_model  # noqa: E402
from bot_keras.models.complexity import count_macs, count_trainable_params  # noqa: E402


COMMAND = "model_table"


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_integer("image-size", 224, "Input height and width.", lower_bound=32, **d)
    flags.DEFINE_integer("num-classes", 1000, "Classifier size.", lower_bound=1, **d)
    flags.DEFINE_list("models", list(MODEL_NAMES), "Comma-separated model names (default: all).", **d)


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])} (--models takes NAME,NAME,...)")
    unknown = [name for name in f.models if name not in MODEL_NAMES]
    if unknown:
        raise cli.SetupError(f"--models: unknown {', '.join(unknown)}; valid names: {', '.join(MODEL_NAMES)}")
    size, num_classes = f["image-size"].value, f["num-classes"].value
    print(f"{'model':<16}{'params':>14}{'GMACs':>9}   ({size}x{size}, {num_classes} classes)")
    for name in f.models:
        model = build_model(name, num_classes=num_classes, input_shape=(size, size, 3))
        print(f"{name:<16}{count_trainable_params(model):>14,}{count_macs(model) / 1e9:>9.3f}")
        keras.backend.clear_session()


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND)
