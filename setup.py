"""Packaging for bot_keras: the paper's tricks for image classification in TensorFlow/Keras 3."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "bot_keras" / "__init__.py").read_text()).group(1)

# Bounds are the versions the test suite runs against. TensorFlow 2.21 ships with Keras 3
# (the `keras` package); tensorflow-addons is deliberately absent (end-of-life, broken under Keras 3).
INSTALL_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<4",
    "tensorflow-datasets>=4.9.9,<5",
    "absl-py>=2.1,<3",
    # TensorFlow 2.21 no longer pulls TensorBoard in; the trainer writes TensorBoard logs.
    "tensorboard>=2.20,<2.22",
    "numpy>=1.26,<3",
    # Reads timm's weights into numpy (models/timm_weights.py), no PyTorch. 0.4.0's numpy loader fails on
    # BF16 tensors; 0.4.5 and 0.8.0 pass tests/test_timm_weights.py (BF16 through TensorFlow's ml_dtypes).
    "safetensors>=0.4.5,<1",
]

EXTRAS = {
    # The test suite exercises the keras-hub heads (segmentation, detection) where keras-hub installs
    # (Python >= 3.11), COCO mAP through pycocotools, and the plots (evaluate's --confusion_png,
    # tools/ablation.py) through matplotlib.
    "test": [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",
        "pillow>=10",
        "keras-hub>=0.32,<0.33; python_version>='3.11'",
        "pycocotools>=2.0.8,<3",
        "matplotlib>=3.8",
    ],
    # Optional: keras-hub's task heads on our backbone (DeepLabV3 segmentation, detection). Not a core
    # dependency: it needs Python >= 3.11 and pulls tensorflow-text, kagglehub, tokenizers (docs/models.md).
    # bot_keras uses public keras-hub API only; the upper bound stays because keras-hub's development
    # branch pins tensorflow-text < 2.21, which would not install beside TensorFlow 2.21 if 0.33 ships so.
    "transfer": ["keras-hub>=0.32,<0.33; python_version>='3.11'"],
    # Optional: the timm-equivalence test of the weight converter (tests/test_timm_weights.py, `slow`).
    # The converter itself needs none of these. torchvision (a timm dependency) is pinned to the release
    # built for torch 2.13 so pip cannot swap torch for a newer one.
    "timm": ["torch==2.13.0", "torchvision==0.28.0", "timm>=1.0"],
    "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    # Only COCO mAP@[.5:.95] (bot_keras/detection/metrics.py, for `coco:` data) needs the reference
    # implementation; VOC mAP is ours, and the import is lazy, so detection on VOC runs without it.
    "coco": ["pycocotools>=2.0.8,<3"],
    # Only --backbone_weights=timm:NAME downloads through it (bot_keras/models/timm_weights.py, lazily).
    "hub": ["huggingface_hub>=0.20"],
    "lint": ["ruff>=0.6"],
    # Only tools/ablation.py's accuracy plot and evaluate's --confusion_png use it; training never does.
    "tools": ["matplotlib>=3.8"],
}

setup(
    name="bot-keras",
    version=VERSION,
    description="Bag of Tricks for Image Classification (He et al., 2018) in TensorFlow/Keras 3",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bot_keras", "bot_keras.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
