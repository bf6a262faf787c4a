"""Print name, trainable parameters and MACs (multiply-accumulates) of every model at one image size.

    python tools/model_table.py                   # every name in MODEL_NAMES, 224×224, 1000 classes
    python tools/model_table.py --image-size 299 --models inception_v3

What is counted is documented in bot_keras/models/complexity.py (convs and Dense layers only). The paper's
Table 5 lists ResNet-50 / -B / -C / -D at 3.9 / 4.1 / 4.3 / 4.3 GFLOPs (i.e. G multiply-accumulates).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bot_keras  # noqa: E402, F401, I001 - first: it keeps TensorFlow's start-up lines off (bot_keras/console.py)
import keras  # noqa: E402

from bot_keras.models import MODEL_NAMES, build_model  # noqa: E402
from bot_keras.models.complexity import count_macs, count_trainable_params  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--models", nargs="*", default=list(MODEL_NAMES), help="names (default: all)")
    args = parser.parse_args(argv)
    print(f"{'model':<16}{'params':>14}{'GMACs':>9}   ({args.image_size}x{args.image_size}, "
          f"{args.num_classes} classes)")
    for name in args.models:
        model = build_model(name, num_classes=args.num_classes,
                            input_shape=(args.image_size, args.image_size, 3))
        print(f"{name:<16}{count_trainable_params(model):>14,}{count_macs(model) / 1e9:>9.3f}")
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
